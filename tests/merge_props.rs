//! Property tests of the merges: random chains (2 to 4 layers, cluster sizes that differ
//! per layer, a base that may be shorter than the top) written by the library, merged in a
//! random way; the active image must show what the model says, every image must pass
//! `qemu-img check`, and the backing pointers must be the expected ones.

mod common;

use common::{Rng, Scratch, backing_of};
use proptest::prelude::*;
use qcow2_engine::Format;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, create};

const CLUSTERS: [u64; 4] = [512, 4096, 65536, 16384];
const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Write {
    Data { offset: u64, len: u64, seed: u64 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Merge {
    /// `commit` into the backing file (top emptied unless `keep`).
    Commit { keep: bool },
    /// `commit -b layer` (layer counted from the bottom, below the top).
    CommitToBase { base: usize },
    /// `commit --top layer` (a middle range into the layer below it).
    CommitMiddle { top: usize },
    /// `pull`, or `pull -b layer`.
    Pull { base: Option<usize> },
}

fn write() -> impl Strategy<Value = Write> {
    (0..SIZE, 1..200_000u64, any::<u64>(), 0..10u8).prop_map(|(offset, len, seed, kind)| {
        let len = len.min(SIZE - offset).max(1);
        match kind {
            0..=6 => Write::Data { offset, len, seed },
            7 | 8 => Write::Zero { offset, len },
            _ => Write::Discard { offset, len },
        }
    })
}

fn case() -> impl Strategy<Value = (Vec<(usize, bool, Vec<Write>)>, Merge)> {
    (2..=4usize).prop_flat_map(|layers| {
        (
            prop::collection::vec(
                (
                    0..CLUSTERS.len(),
                    any::<bool>(),
                    prop::collection::vec(write(), 1..6),
                ),
                layers,
            ),
            prop_oneof![
                any::<bool>().prop_map(|keep| Merge::Commit { keep }),
                (0..layers - 1).prop_map(|base| Merge::CommitToBase { base }),
                (1..layers).prop_map(|top| Merge::CommitMiddle { top }),
                prop::option::of(0..layers - 1).prop_map(|base| Merge::Pull { base }),
            ],
        )
    })
}

fn name(i: usize) -> String {
    format!("l{i}.qcow2")
}

fn run(layers: &[(usize, bool, Vec<Write>)], merge: Merge) -> Result<(), TestCaseError> {
    let s = Scratch::new();
    let n = layers.len();
    let mut model = vec![0u8; SIZE as usize];
    for (i, (cluster, short, writes)) in layers.iter().enumerate() {
        // The bottom layer may be shorter than the rest (reads past it are zeros).
        let size = if i == 0 && *short {
            SIZE / 2 + 512
        } else {
            SIZE
        };
        let mut options = if i == 0 {
            CreateOptions::qcow2(size)
        } else {
            let mut o = CreateOptions::overlay(name(i - 1), Format::Qcow2);
            o.size = Some(size);
            o
        };
        options.cluster_size = CLUSTERS[*cluster];
        create(s.path(&name(i)), &options).unwrap();
        let chain = Chain::open_with(
            s.path(&name(i)),
            &ChainOptions {
                writable: true,
                ..ChainOptions::default()
            },
        )
        .unwrap();
        for w in writes {
            // Writes are drawn for the full size; clip them to this layer's.
            let (o, l) = match *w {
                Write::Data { offset, len, .. }
                | Write::Zero { offset, len }
                | Write::Discard { offset, len } => (offset, len),
            };
            if o >= size {
                continue;
            }
            let w = &match w.clone() {
                Write::Data { seed, .. } => Write::Data {
                    offset: o,
                    len: l.min(size - o),
                    seed,
                },
                Write::Zero { .. } => Write::Zero {
                    offset: o,
                    len: l.min(size - o),
                },
                Write::Discard { .. } => Write::Discard {
                    offset: o,
                    len: l.min(size - o),
                },
            };
            match *w {
                Write::Data { offset, len, seed } => {
                    let data = Rng::new(seed).bytes(len as usize);
                    chain.write_at(&data, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                }
                Write::Zero { offset, len } => {
                    chain.write_zeroes(offset, len, true).unwrap();
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                Write::Discard { offset, len } => {
                    // What a discard leaves is QEMU's business; the model reads it back.
                    chain.discard(offset, len).unwrap();
                    let mut back = vec![0u8; len as usize];
                    chain.read_at(&mut back, offset).unwrap();
                    model[offset as usize..(offset + len) as usize].copy_from_slice(&back);
                }
            }
        }
        chain.close().unwrap();
    }
    let top = s.path(&name(n - 1));
    let mut progress = |_, _| true;
    let expected_backing: Option<String> = match merge {
        Merge::Commit { keep } => {
            ops::commit(
                &top,
                &CommitOptions {
                    keep,
                    ..CommitOptions::default()
                },
                &mut progress,
            )
            .unwrap();
            Some(name(n - 2))
        }
        Merge::CommitToBase { base } => {
            ops::commit(
                &top,
                &CommitOptions {
                    base: Some(s.path(&name(base))),
                    ..CommitOptions::default()
                },
                &mut progress,
            )
            .unwrap();
            Some(name(n - 2))
        }
        Merge::CommitMiddle { top: t } => {
            // Layer `t` (from the bottom) and those between it and the one below go down.
            if t == n - 1 {
                ops::commit(&top, &CommitOptions::default(), &mut progress).unwrap();
                Some(name(n - 2))
            } else {
                ops::commit(
                    &top,
                    &CommitOptions {
                        top: Some(s.path(&name(t))),
                        ..CommitOptions::default()
                    },
                    &mut progress,
                )
                .unwrap();
                Some(if t + 1 == n - 1 {
                    name(t - 1)
                } else {
                    name(n - 2)
                })
            }
        }
        Merge::Pull { base } => {
            let base_path = base.map(|b| s.path(&name(b)));
            ops::pull(
                &top,
                base_path.as_deref(),
                &MergeOptions::default(),
                &mut progress,
            )
            .unwrap();
            base.map(name)
        }
    };
    let label = format!("{merge:?} over {n} layers");
    let got = s.reference(&name(n - 1), "qcow2");
    prop_assert!(got == model, "{}: the active image changed", label);
    prop_assert_eq!(backing_of(&s, &name(n - 1)), expected_backing, "{}", label);
    for i in 0..n {
        let out = s.output("qemu-img", &["check", &name(i)]);
        prop_assert!(
            out.status.success(),
            "{}: qemu-img check {}: {}{}",
            label,
            name(i),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_chains_merged_in_random_ways_keep_what_the_active_image_shows(
        (layers, merge) in case()
    ) {
        run(&layers, merge)?;
    }
}
