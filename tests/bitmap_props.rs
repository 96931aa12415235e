//! Property tests of persistent bitmaps: random writes, zero writes, discards, resizes,
//! enables, disables and reopens against a model bitmap per bitmap (the granules each
//! guest change touched while the bitmap was enabled). After each case every bitmap read
//! back from the closed image equals its model, and `qemu-img check` finds the image clean
//! without a warning.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::Scratch;
use common::bitmaps::assert_check_silent;
use proptest::prelude::*;
use qcow2_engine::storage::MemStorage;
use qcow2_engine::{Chain, CreateOptions, Image, ImageOptions, Layer, create_on};

/// Cluster size, extended L2, and the bitmaps: (name, granularity, enabled at start).
const CLUSTERS: [(u64, bool); 4] = [(512, false), (4096, false), (65536, false), (65536, true)];
const BITMAPS: [(&str, u64, bool); 3] = [
    ("fine", 512, true),
    ("page", 4096, true),
    ("off", 65536, false),
];

#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, len: u64 },
    Zero { offset: u64, len: u64, unmap: bool },
    Discard { offset: u64, len: u64 },
    Resize { size: u64 },
    Toggle { bitmap: usize },
    Reopen,
}

fn step(size: u64) -> impl Strategy<Value = Step> {
    let range =
        (0..size).prop_flat_map(move |offset| (Just(offset), 1..=(size - offset).min(300_000)));
    prop_oneof![
        4 => range.clone().prop_map(|(offset, len)| Step::Write { offset, len }),
        2 => (range.clone(), any::<bool>()).prop_map(|((offset, len), unmap)| Step::Zero { offset, len, unmap }),
        2 => range.prop_map(|(offset, len)| Step::Discard { offset, len }),
        1 => (1u64..=8).prop_map(|m| Step::Resize { size: m * (512 << 10) + 512 }),
        1 => (0usize..3).prop_map(|bitmap| Step::Toggle { bitmap }),
        1 => Just(Step::Reopen),
    ]
}

/// What each bitmap should hold: dirty granule indices and whether it is enabled.
struct ModelBitmap {
    granularity: u64,
    enabled: bool,
    dirty: BTreeSet<u64>,
}

impl ModelBitmap {
    fn mark(&mut self, offset: u64, len: u64, size: u64) {
        if !self.enabled || offset >= size || len == 0 {
            return;
        }
        let end = (offset + len).min(size);
        self.dirty
            .extend(offset / self.granularity..end.div_ceil(self.granularity));
    }

    fn resize(&mut self, size: u64) {
        let granules = size.div_ceil(self.granularity);
        self.dirty.retain(|&g| g < granules);
    }
}

fn open(storage: &Arc<MemStorage>) -> Chain {
    let options = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let image =
        Image::from_storage(Box::new(Arc::clone(storage)), "mem.qcow2", &options, None).unwrap();
    Chain::from_layers(vec![Layer::Qcow2(image)]).unwrap()
}

fn image(chain: &Chain) -> &Image {
    match chain.top() {
        Layer::Qcow2(image) => image,
        _ => unreachable!(),
    }
}

fn run_case(cluster: u64, extended_l2: bool, steps: &[Step]) {
    let mut size = 2 << 20;
    let storage = Arc::new(MemStorage::new());
    let mut options = CreateOptions::qcow2(size);
    options.cluster_size = cluster;
    options.extended_l2 = extended_l2;
    create_on(&*storage, &options).unwrap();
    let mut models: Vec<ModelBitmap> = BITMAPS
        .iter()
        .map(|&(_, granularity, enabled)| ModelBitmap {
            granularity,
            enabled,
            dirty: BTreeSet::new(),
        })
        .collect();
    let mut chain = open(&storage);
    for &(name, granularity, enabled) in &BITMAPS {
        image(&chain)
            .add_bitmap(name, Some(granularity), enabled)
            .unwrap();
    }
    for step in steps {
        let label = format!("{cluster} {extended_l2} {step:?}");
        match *step {
            Step::Write { offset, len } if offset + len <= size => {
                chain
                    .write_at(&vec![0x5a; len as usize], offset)
                    .expect(&label);
                models.iter_mut().for_each(|m| m.mark(offset, len, size));
            }
            Step::Zero { offset, len, unmap } if offset + len <= size => {
                chain.write_zeroes(offset, len, unmap).expect(&label);
                models.iter_mut().for_each(|m| m.mark(offset, len, size));
            }
            Step::Discard { offset, len } if offset + len <= size => {
                chain.discard(offset, len).expect(&label);
                models.iter_mut().for_each(|m| m.mark(offset, len, size));
            }
            Step::Resize { size: new } => {
                chain.resize(new, true).expect(&label);
                let old = size;
                size = new;
                models.iter_mut().for_each(|m| {
                    m.resize(new);
                    // The new area is clean, as after QEMU's resize; the zeros written over
                    // the old partial last cluster are a change.
                    if new > old {
                        let tail = old.div_ceil(cluster) * cluster;
                        m.mark(old, tail.min(new) - old, new);
                    }
                });
            }
            Step::Toggle { bitmap } => {
                let m = &mut models[bitmap];
                let name = BITMAPS[bitmap].0;
                if m.enabled {
                    image(&chain).disable_bitmap(name).expect(&label);
                } else {
                    image(&chain).enable_bitmap(name).expect(&label);
                }
                m.enabled = !m.enabled;
            }
            Step::Reopen => {
                chain.close().expect(&label);
                drop(chain);
                chain = open(&storage);
            }
            _ => {}
        }
    }
    chain.close().unwrap();
    drop(chain);
    let read_only = Image::from_storage(
        Box::new(Arc::clone(&storage)),
        "mem.qcow2",
        &ImageOptions::default(),
        None,
    )
    .unwrap();
    let infos = read_only.bitmaps().unwrap();
    for ((&(name, granularity, _), model), info) in BITMAPS.iter().zip(&models).zip(&infos) {
        assert_eq!(info.name, name);
        assert_eq!(info.granularity, granularity);
        assert_eq!(info.enabled, model.enabled, "{name}");
        assert!(!info.in_use, "{name} left in use");
        let bitmap = read_only.load_bitmap(name).unwrap();
        let dirty: BTreeSet<u64> = bitmap
            .runs()
            .flat_map(|(offset, len)| offset / granularity..(offset + len).div_ceil(granularity))
            .collect();
        assert_eq!(dirty, model.dirty, "bitmap {name} after {steps:?}");
    }
    let s = Scratch::new();
    std::fs::write(s.path("case.qcow2"), storage.to_bytes()).unwrap();
    assert_check_silent(&s, "case.qcow2", &format!("{cluster} {extended_l2}"));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    #[test]
    fn bitmaps_hold_exactly_the_granules_changed_while_enabled(
        config in 0usize..CLUSTERS.len(),
        steps in proptest::collection::vec(step(2 << 20), 1..24),
    ) {
        let (cluster, extended_l2) = CLUSTERS[config];
        run_case(cluster, extended_l2, &steps);
    }
}
