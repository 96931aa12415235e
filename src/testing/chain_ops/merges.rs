//! The merges, commit, pull and rebase: run on the closed chain by `ops`, then the model
//! follows what they must have done.

use crate::chain::Chain;
use crate::ops::{self, CommitOptions};

use super::model::{LayerModel, show_below};
use super::run::{Outcome, Run};

impl Run {
    /// Closes the chain for a merge (merges open the images themselves).
    fn close_for_merge(&mut self) {
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
    }

    pub(super) fn commit(&mut self, mode: u8) {
        let n = self.layers.len();
        let dry_run = mode & 0x80 != 0;
        let index = usize::from(mode >> 2 & 15) % n;
        let (top, base, keep, options) = match mode & 3 {
            0 | 1 => (0, 1, mode & 3 == 1, CommitOptions::default()),
            2 => (
                0,
                index,
                true,
                CommitOptions {
                    base: Some(self.layers[index].name.clone().into()),
                    ..CommitOptions::default()
                },
            ),
            _ => (
                index,
                index + 1,
                true,
                CommitOptions {
                    top: Some(self.layers[index].name.clone().into()),
                    ..CommitOptions::default()
                },
            ),
        };
        let options = CommitOptions {
            keep,
            // The program models its chain alone: images it left behind in the file
            // system (re-pointed away, never deleted) may still use a layer, and would make
            // the commit refuse. Refusals are tested in tests/tree_props.rs.
            force: true,
            merge: self.merge_options(mode),
            ..options
        };
        let mut possible = top < base && base < n;
        if possible && !dry_run {
            // The base grows to the committed range's size first: version 2 refuses with
            // snapshots, or over a longer backing file past its partial last cluster.
            let dest = &self.layers[base];
            let (old_len, new_len) = (dest.view.len() as u64, self.layers[top].view.len() as u64);
            let grows = old_len < new_len;
            let cs = dest.config.cluster_size;
            let past_tail = new_len > old_len.div_ceil(cs) * cs;
            let has_snapshots = self
                .snapshots
                .get(&dest.name)
                .is_some_and(|s| !s.is_empty());
            let backing_longer = self
                .layers
                .get(base + 1)
                .is_some_and(|b| b.view.len() > dest.view.len());
            possible = !(dest.config.v2 && grows && (has_snapshots || backing_longer && past_tail));
        }
        self.close_for_merge();
        let r = ops::commit(&self.layers[0].name, &options, &mut |_, _| true).map(drop);
        let outcome = if possible {
            Outcome::Succeeds
        } else {
            Outcome::Refused
        };
        let committed = self.expect(r, outcome, &format!("commit {options:?}")) && !dry_run;
        if committed {
            let source = self.layers[top].view.clone();
            let dest = &mut self.layers[base].view;
            if dest.len() < source.len() {
                dest.resize(source.len(), 0);
            }
            dest[..source.len()].copy_from_slice(&source);
            if top > 0 {
                // The images above saw zeros past the end of the committed range's top;
                // re-pointed at the base, they still do.
                let reach = self.layers[..top]
                    .iter()
                    .map(|l| l.view.len())
                    .max()
                    .unwrap_or(0);
                let dest = &mut self.layers[base].view;
                let end = reach.min(dest.len());
                if end > source.len() {
                    dest[source.len()..end].fill(0);
                }
                // The image above the committed range now points at the base.
                self.layers.drain(top..base);
            }
        }
        self.reopen();
        if committed && top == 0 {
            self.rebase_views(base);
        }
        self.check_all_views("commit");
    }

    /// After a commit from the top into layer `base`: the layers between show their own
    /// data over the new content of the base.
    fn rebase_views(&mut self, base: usize) {
        for i in (1..base).rev() {
            let own = self.own_sectors(i);
            let (upper, lower) = self.layers.split_at_mut(i + 1);
            show_below(&mut upper[i].view, &own, Some(&lower[0].view));
        }
    }

    pub(super) fn pull(&mut self, mode: u8) {
        let n = self.layers.len();
        let dry_run = mode & 0x80 != 0;
        let choice = usize::from(mode & 0x7f) % (n + 1);
        let base = (choice < n).then_some(choice);
        let base_name = base.map(|b| self.layers[b].name.clone());
        self.close_for_merge();
        let r = ops::pull(
            &self.layers[0].name,
            base_name.as_deref().map(AsRef::as_ref),
            &self.merge_options(mode),
            &mut |_, _| true,
        )
        .map(drop);
        let outcome = if base == Some(0) {
            Outcome::Refused
        } else {
            Outcome::Succeeds
        };
        if self.expect(r, outcome, &format!("pull to {base_name:?}")) && !dry_run {
            self.layers.drain(1..base.unwrap_or(n));
        }
        self.reopen();
        self.check_all_views("pull");
    }

    pub(super) fn rebase(&mut self, mode: u8) {
        let n = self.layers.len();
        let index = usize::from(mode >> 2 & 15);
        let dry_run = mode & 0x80 != 0;
        let unsafe_ = mode & 3 == 3;
        // The new backing chain, top first: its images, or `None` for foreign ones whose
        // views the model does not know.
        let (target, outcome): (Option<String>, Outcome) = match mode & 3 {
            0 => {
                let b = index % n;
                let outcome = if b == 0 {
                    Outcome::Refused
                } else {
                    Outcome::Succeeds
                };
                (Some(self.layers[b].name.clone()), outcome)
            }
            1 => (None, Outcome::Succeeds),
            2 => {
                let foreign: Vec<String> = self
                    .fs
                    .files()
                    .into_iter()
                    .map(|(p, _)| p.file_name().expect("named").to_string_lossy().into_owned())
                    .filter(|name| self.layers.iter().all(|l| &l.name != name))
                    .collect();
                if foreign.is_empty() {
                    return;
                }
                let target = foreign[index % foreign.len()].clone();
                // A chain through the top would loop.
                let outcome = if self.foreign_names(&target).contains(&self.layers[0].name) {
                    Outcome::Refused
                } else {
                    Outcome::Succeeds
                };
                (Some(target), outcome)
            }
            _ if n > 1 => (
                Some(self.layers[1 + index % (n - 1)].name.clone()),
                Outcome::Succeeds,
            ),
            _ => (None, Outcome::Succeeds),
        };
        // What the top decides itself: after an unsafe rebase the rest shows the new chain.
        let own = unsafe_.then(|| self.own_sectors(0));
        self.close_for_merge();
        let r = ops::rebase(
            &self.layers[0].name,
            target.as_deref(),
            target.as_ref().map(|_| "qcow2"),
            unsafe_,
            &self.merge_options(mode),
            &mut |_, _| true,
        )
        .map(drop);
        let what = format!("rebase onto {target:?} (unsafe: {unsafe_})");
        if self.expect(r, outcome, &what) && !dry_run {
            let below = match &target {
                None => Vec::new(),
                Some(t) => match self.layers.iter().position(|l| &l.name == t) {
                    Some(b) => self.layers.split_off(b),
                    None => self.foreign_chain(t),
                },
            };
            self.layers.truncate(1);
            self.layers.extend(below);
            if let Some(own) = own {
                let below = self.layers.get(1).map(|l| l.view.clone());
                show_below(&mut self.layers[0].view, &own, below.as_deref());
            }
        }
        self.reopen();
        self.check_all_views("rebase");
    }

    /// The images of the chain of `name`, top first.
    fn foreign_names(&self, name: &str) -> Vec<String> {
        let chain = Chain::open_with(name, &self.chain_options(false))
            .unwrap_or_else(|e| self.fail(format_args!("opening {name}: {}", e.report())));
        chain
            .layers()
            .iter()
            .map(|l| l.name().display().to_string())
            .collect()
    }

    /// The models of the image `name` (not in the chain) and its backing chain, from what
    /// the library reads: nothing else knows them.
    fn foreign_chain(&self, name: &str) -> Vec<LayerModel> {
        self.foreign_names(name)
            .into_iter()
            .map(|name| {
                let below = Chain::open_with(&name, &self.chain_options(false))
                    .unwrap_or_else(|e| self.fail(format_args!("opening {name}: {}", e.report())));
                let mut view = vec![0u8; below.size() as usize];
                below
                    .read_at(&mut view, 0)
                    .unwrap_or_else(|e| self.fail(format_args!("reading {name}: {}", e.report())));
                LayerModel {
                    config: self.configs[&name],
                    name,
                    view,
                }
            })
            .collect()
    }
}
