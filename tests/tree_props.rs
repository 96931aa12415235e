//! Random trees of images in memory (`MemOpener`), changed by random writes, new
//! overlays, `remove`s and commits: after every step each image reads what a simple model
//! of the tree says, and every image checks clean. The model: each image's own blocks
//! over its backing file's view; a remove moves the layer's blocks down into its backing
//! file (its only user) or up under each user's own, a commit moves them down and empties
//! the image, and the refusals happen where the model says an image would change.
//!
//! `PROPTEST_CASES` sets the number of cases (default 48).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions, RemoveMethod, RemoveOptions};
use qcow2_engine::storage::MemOpener;
use qcow2_engine::{
    Chain, ChainOptions, CreateOptions, Error, Format, Image, ImageOptions, create_on,
};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 16;
const SIZE: u64 = BLOCK * BLOCKS;

#[derive(Debug, Clone)]
enum Step {
    Overlay { on: usize },
    Write { image: usize, block: u64, byte: u8 },
    Remove { image: usize },
    Commit { image: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => any::<usize>().prop_map(|on| Step::Overlay { on }),
        3 => (any::<usize>(), 0..BLOCKS, 1..=255u8)
            .prop_map(|(image, block, byte)| Step::Write { image, block, byte }),
        2 => any::<usize>().prop_map(|image| Step::Remove { image }),
        1 => any::<usize>().prop_map(|image| Step::Commit { image }),
    ]
}

/// One image of the model: its backing file and the blocks it allocates.
#[derive(Debug, Clone)]
struct Model {
    backing: Option<usize>,
    own: BTreeMap<u64, u8>,
}

struct Tree {
    fs: Arc<MemOpener>,
    images: Vec<Option<Model>>,
}

fn name(i: usize) -> PathBuf {
    PathBuf::from(format!("/vm/i{i}.qcow2"))
}

impl Tree {
    fn options(&self) -> ChainOptions {
        ChainOptions {
            opener: Some(self.fs.clone()),
            ..ChainOptions::default()
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.images.len())
            .filter(|&i| self.images[i].is_some())
            .collect()
    }

    fn pick(&self, n: usize) -> usize {
        let live = self.live();
        live[n % live.len()]
    }

    fn users(&self, i: usize) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|&j| self.images[j].as_ref().unwrap().backing == Some(i))
            .collect()
    }

    fn view(&self, i: usize) -> Vec<u8> {
        let model = self.images[i].as_ref().unwrap();
        let mut view = match model.backing {
            Some(b) => self.view(b),
            None => vec![0; SIZE as usize],
        };
        for (&block, &byte) in &model.own {
            view[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize].fill(byte);
        }
        view
    }

    fn create(&mut self, backing: Option<usize>) {
        let i = self.images.len();
        let options = match backing {
            Some(b) => {
                let mut o = CreateOptions::overlay(
                    name(b).file_name().unwrap().to_str().unwrap(),
                    Format::Qcow2,
                );
                o.size = Some(SIZE);
                o.open_backing = false;
                o
            }
            None => CreateOptions::qcow2(SIZE),
        };
        let options = CreateOptions {
            cluster_size: BLOCK,
            ..options
        };
        create_on(&*self.fs.create(name(i)), &options).unwrap();
        self.images.push(Some(Model {
            backing,
            own: BTreeMap::new(),
        }));
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let merge = MergeOptions {
            chain: self.options(),
            ..MergeOptions::default()
        };
        match *step {
            Step::Overlay { on } => {
                let on = self.pick(on);
                self.create(Some(on));
            }
            Step::Write { image, block, byte } => {
                let image = self.pick(image);
                let chain = Chain::open_with(name(image), &self.options().writable(true)).unwrap();
                chain
                    .write_at(&[byte; BLOCK as usize], block * BLOCK)
                    .unwrap();
                chain.close().unwrap();
                self.images[image].as_mut().unwrap().own.insert(block, byte);
            }
            Step::Remove { image } => {
                let layer = self.pick(image);
                let users = self.users(layer);
                let options = RemoveOptions {
                    merge,
                    ..RemoveOptions::default()
                };
                let result = ops::remove(name(layer), &options, &mut |_, _| true);
                if users.is_empty() {
                    prop_assert!(result.is_err(), "removed i{layer}, which nobody uses");
                    return Ok(());
                }
                let report = result.map_err(|e| TestCaseError::fail(e.report().to_string()))?;
                let backing = self.images[layer].as_ref().unwrap().backing;
                let down = backing.is_some_and(|b| self.users(b) == [layer]);
                let model = self.images[layer].take().unwrap();
                match report.method {
                    RemoveMethod::CommitDown => {
                        prop_assert!(down, "committed i{layer} down beside other users");
                        let b = model.backing.unwrap();
                        let base = self.images[b].as_mut().unwrap();
                        base.own.extend(model.own.iter().map(|(&k, &v)| (k, v)));
                    }
                    RemoveMethod::PullUp => {
                        prop_assert!(
                            !down,
                            "pulled i{layer} up though its backing file had no other user"
                        );
                        for &u in &users {
                            let user = self.images[u].as_mut().unwrap();
                            for (&block, &byte) in &model.own {
                                user.own.entry(block).or_insert(byte);
                            }
                        }
                    }
                }
                for &u in &users {
                    self.images[u].as_mut().unwrap().backing = model.backing;
                }
                prop_assert!(self.fs.get(name(layer)).is_none(), "i{layer} not deleted");
            }
            Step::Commit { image } => {
                let image = self.pick(image);
                let result = ops::commit(
                    name(image),
                    &CommitOptions {
                        merge,
                        ..CommitOptions::default()
                    },
                    &mut |_, _| true,
                );
                let Some(b) = self.images[image].as_ref().unwrap().backing else {
                    prop_assert!(
                        result.is_err(),
                        "committed i{image}, which has no backing file"
                    );
                    return Ok(());
                };
                // Every other user of the base, and everything above them, would change.
                let others = self.users(b).into_iter().any(|u| u != image);
                match result {
                    Err(e) if matches!(e.root(), Error::HasDependents { .. }) => {
                        prop_assert!(others, "refused committing i{image}: {}", e.report());
                    }
                    Err(e) => return Err(TestCaseError::fail(e.report().to_string())),
                    Ok(_) => {
                        prop_assert!(!others, "committed i{image} into a shared base");
                        let own = std::mem::take(&mut self.images[image].as_mut().unwrap().own);
                        self.images[b].as_mut().unwrap().own.extend(own);
                    }
                }
            }
        }
        Ok(())
    }

    fn verify(&self, label: &str) -> Result<(), TestCaseError> {
        for i in self.live() {
            let chain = Chain::open_with(name(i), &self.options()).unwrap();
            let mut got = vec![0u8; SIZE as usize];
            chain.read_at(&mut got, 0).unwrap();
            prop_assert!(got == self.view(i), "{label}: i{i} reads something else");
            let backing = chain.layers().get(1).map(|l| l.name().to_path_buf());
            let expected = self.images[i].as_ref().unwrap().backing.map(name);
            prop_assert_eq!(
                backing.map(|b| b.file_name().unwrap().to_owned()),
                expected.map(|b| b.file_name().unwrap().to_owned()),
                "{}: i{} backing file",
                label,
                i
            );
            drop(chain);
            let image = Image::open_with(
                Path::new(&name(i)),
                &ImageOptions {
                    opener: Some(self.fs.clone()),
                    ..ImageOptions::default()
                },
            )
            .unwrap();
            let report = image.check().unwrap();
            prop_assert!(
                report.is_clean(),
                "{}: i{} check: {:?}",
                label,
                i,
                report.findings
            );
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_trees_keep_what_every_image_shows_through_removes_and_commits(
        steps in proptest::collection::vec(step(), 1..14)
    ) {
        let mut tree = Tree { fs: Arc::new(MemOpener::new()), images: Vec::new() };
        tree.create(None);
        for (n, step) in steps.iter().enumerate() {
            tree.run(step)?;
            tree.verify(&format!("after step {n} ({step:?})"))?;
        }
    }
}
