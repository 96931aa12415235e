//! The checks: the chain's views, the top image's snapshot list, every image's
//! consistency and every reachable snapshot, each compared with the model.

use std::sync::Arc;

use crate::chain::Chain;
use crate::qcow2::{Image, ImageOptions, Mapping};
use crate::storage::MemStorage;

use super::config::SECTOR;
use super::model::{SnapshotModel, show_below};
use super::run::{Outcome, Run, Step};

impl Run {
    /// What the chain from layer `depth` down shows, `len` bytes, in the reused read
    /// buffer (fresh megabytes for every read cost more than all the rest).
    fn read_view(&self, depth: usize, len: u64) -> std::cell::RefMut<'_, [u8]> {
        let chain = self.chain();
        let mut buf = self.buf.borrow_mut();
        if buf.len() < len as usize {
            // Zeroed by the allocator: no slow resize in debug builds.
            *buf = vec![0; len as usize];
        }
        let mut buf = std::cell::RefMut::map(buf, |b| &mut b[..len as usize]);
        if depth == 0 {
            chain
                .read_at(&mut buf, 0)
                .unwrap_or_else(|e| self.fail(format_args!("reading: {}", e.report())));
            return buf;
        }
        let mut pos = 0;
        while pos < len {
            let run = chain
                .resolve_from(depth, pos, len - pos)
                .unwrap_or_else(|e| {
                    self.fail(format_args!("resolving layer {depth}: {}", e.report()))
                });
            chain
                .read_run(&run, &mut buf[pos as usize..run.end() as usize])
                .unwrap_or_else(|e| {
                    self.fail(format_args!("reading layer {depth}: {}", e.report()))
                });
            pos = run.end();
        }
        buf
    }

    fn compare(&self, what: &str, got: &[u8], want: &[u8]) {
        if got == want {
            return;
        }
        if got.len() != want.len() {
            self.fail(format_args!(
                "{what}: {} bytes, the model has {}",
                got.len(),
                want.len()
            ));
        }
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap_or(0);
        self.fail(format_args!(
            "{what} differs from the model at {first:#x}..={last:#x}: reads {:#04x}, the model \
             has {:#04x}",
            got[first], want[first]
        ))
    }

    /// The guest content must be the model's.
    pub(super) fn check_content(&self, what: &str) {
        let got = self.read_view(0, self.size());
        self.compare(what, &got, &self.layers[0].view);
    }

    /// Every layer's view must be the model's.
    pub(super) fn check_all_views(&self, what: &str) {
        self.check_content(what);
        let top_size = self.size();
        for (i, layer) in self.layers.iter().enumerate().skip(1) {
            let what = format!("{what}: layer {i} ({})", layer.name);
            if layer.view.len() as u64 <= top_size {
                let got = self.read_view(i, layer.view.len() as u64);
                self.compare(&what, &got, &layer.view);
                continue;
            }
            // Longer than the top: the chain from this layer down reads all of it.
            let chain =
                Chain::open_with(&layer.name, &self.chain_options(false)).unwrap_or_else(|e| {
                    self.fail(format_args!("opening {}: {}", layer.name, e.report()))
                });
            let mut got = vec![0u8; chain.size() as usize];
            chain.read_at(&mut got, 0).unwrap_or_else(|e| {
                self.fail(format_args!("reading {}: {}", layer.name, e.report()))
            });
            self.compare(&what, &got, &layer.view);
        }
    }

    /// The top image's snapshots must be the model's, in order.
    pub(super) fn check_snapshot_names(&self) {
        let names: Vec<String> = self.top().snapshots().into_iter().map(|s| s.name).collect();
        let want: Vec<&String> = self
            .snapshots
            .get(&self.layers[0].name)
            .map(|v| v.iter().map(|s| &s.name).collect())
            .unwrap_or_default();
        if names.iter().ne(want.iter().copied()) {
            self.fail(format_args!(
                "the top has snapshots {names:?}, the model {want:?}"
            ));
        }
    }

    /// Per sector of layer `depth`: whether that image decides it itself.
    pub(super) fn own_sectors(&self, depth: usize) -> Vec<bool> {
        let layer = &self.chain().layers()[depth];
        let size = layer.size();
        let mut own = vec![false; size.div_ceil(SECTOR) as usize];
        let mut pos = 0;
        while pos < size {
            let run = layer.lookup(pos, size - pos).unwrap_or_else(|e| {
                self.fail(format_args!("lookup in layer {depth}: {}", e.report()))
            });
            if run.mapping != Mapping::Unallocated {
                own[(run.offset / SECTOR) as usize..run.end().div_ceil(SECTOR) as usize].fill(true);
            }
            pos = run.end();
        }
        own
    }

    /// What a snapshot of layer `depth` shows: its own sectors, the layers below for the
    /// rest.
    pub(super) fn snapshot_view(&self, snapshot: &SnapshotModel, depth: usize) -> Vec<u8> {
        let below = self.layers.get(depth + 1).map(|l| &l.view[..]);
        let mut out = snapshot.bytes.clone();
        show_below(&mut out, &snapshot.own, below);
        out
    }

    /// Closes everything; every image must check clean and every snapshot of the chain's
    /// images read as the model says.
    pub(super) fn finish(mut self) {
        self.step = Step::End;
        self.check_all_views("at the end");
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
        for depth in 0..self.layers.len() {
            let name = self.layers[depth].name.clone();
            let snapshots = self.snapshots.get(&name).cloned().unwrap_or_default();
            for snapshot in &snapshots {
                self.check_snapshot(depth, snapshot);
            }
        }
        self.check_images();
    }

    /// Every image (all closed) must check clean. Images whose bytes did not change since
    /// they last did are skipped (checking costs more than the rest in a debug build).
    pub(super) fn check_images(&self) {
        for (path, storage) in self.fs.files() {
            let bytes = storage.to_bytes();
            if self.checked.borrow().get(&path) == Some(&bytes) {
                continue;
            }
            let image =
                Image::from_storage(Box::new(storage), &path, &ImageOptions::default(), None)
                    .unwrap_or_else(|e| {
                        self.fail(format_args!("opening {}: {}", path.display(), e.report()))
                    });
            let report = image.check().unwrap_or_else(|e| {
                self.fail(format_args!("checking {}: {}", path.display(), e.report()))
            });
            if !report.is_clean() {
                let shown: Vec<_> = report.findings.iter().take(8).collect();
                self.fail(format_args!(
                    "{} does not check clean ({} corruptions, {} leaks): {shown:?}",
                    path.display(),
                    report.corruptions,
                    report.leaks,
                ));
            }
            if image.is_dirty() {
                self.fail(format_args!("{} is still dirty", path.display()));
            }
            self.checked.borrow_mut().insert(path, bytes);
        }
    }

    /// Applies `snapshot` of layer `depth` to a copy of that image; the copy must show the
    /// snapshot's model.
    fn check_snapshot(&self, depth: usize, snapshot: &SnapshotModel) {
        const PROBE: &str = "probe.qcow2";
        let original = self
            .fs
            .get(&self.layers[depth].name)
            .expect("the image exists");
        self.fs
            .insert(PROBE, Arc::new(MemStorage::from_bytes(original.to_bytes())));
        let chain = Chain::open_with(PROBE, &self.chain_options(true))
            .unwrap_or_else(|e| self.fail(format_args!("opening a copy: {}", e.report())));
        let image = chain.top().as_qcow2().expect("qcow2");
        let r = image.snapshot_apply(&snapshot.name);
        let outcome = if self.layers[depth].config.refcount_bits < 16 {
            Outcome::MayBeRefused
        } else {
            Outcome::Succeeds
        };
        let what = format!("applying {} to a copy of layer {depth}", snapshot.name);
        if !self.expect(r, outcome, &what) {
            drop(chain);
            self.fs.remove(PROBE);
            return;
        }
        let mut got = vec![0u8; chain.size() as usize];
        chain
            .read_at(&mut got, 0)
            .unwrap_or_else(|e| self.fail(format_args!("reading a copy: {}", e.report())));
        drop(chain);
        self.fs.remove(PROBE);
        self.compare(
            &format!("snapshot {} of layer {depth}", snapshot.name),
            &got,
            &self.snapshot_view(snapshot, depth),
        );
    }
}
