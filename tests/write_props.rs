//! Property tests of the write path: random sequences of writes, zero writes, discards,
//! resizes, flushes and reopens, on memory and file storage, against a model disk. After each case
//! the library reads the model, `qemu-img check` finds nothing (no corruption, no leak)
//! and `qemu-img compare` finds the image identical to the model as a raw file.

mod common;

use std::sync::Arc;

use common::ops::{Model, Op};
use common::{Rng, Scratch};
use proptest::prelude::*;
use qcow2_engine::storage::MemStorage;
use qcow2_engine::{Chain, ChainOptions, Image, ImageOptions, Layer};

/// Image options (qemu-img `-o`), whether it has a backing file, its cluster size.
const CONFIGS: [(&str, bool, u64); 9] = [
    ("cluster_size=65536", false, 65536),
    ("cluster_size=65536", true, 65536),
    ("cluster_size=4096,refcount_bits=1", false, 4096),
    ("cluster_size=512", true, 512),
    ("cluster_size=512,refcount_bits=64", false, 512),
    ("cluster_size=65536,extended_l2=on", true, 65536),
    ("cluster_size=32768,extended_l2=on", false, 32768),
    ("cluster_size=4096,compat=0.10", true, 4096),
    ("cluster_size=16384,lazy_refcounts=on", true, 16384),
];

const BASE: &str = "base.qcow2";
const TOP: &str = "top.qcow2";

fn size_of(cluster: u64) -> u64 {
    // A few L2 tables' worth for small clusters; odd sizes test the partial last cluster.
    match cluster {
        512 => (512 << 10) + 1536,
        4096 => (2 << 20) - 512,
        _ => (3 << 20) + 7 * 512,
    }
}

/// An operation of a case (data described by a seed, so that failures print short).
#[derive(Debug, Clone)]
enum Step {
    Write {
        offset: u64,
        len: u64,
        seed: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Close the chain and open it again.
    Reopen,
    /// Resize to the case's size plus `extra` bytes (a multiple of 512; 0 shrinks back).
    Resize {
        extra: u64,
    },
}

impl Step {
    fn op(&self) -> Option<Op> {
        Some(match *self {
            Step::Write { offset, len, seed } => Op::Write {
                offset,
                data: Rng::new(seed).bytes(len as usize),
            },
            Step::Zero { offset, len, unmap } => Op::Zero { offset, len, unmap },
            Step::Discard { offset, len } => Op::Discard { offset, len },
            Step::Flush => Op::Flush,
            Step::Reopen | Step::Resize { .. } => return None,
        })
    }
}

/// A range: anywhere, or whole clusters.
fn range(size: u64, cluster: u64) -> impl Strategy<Value = (u64, u64)> {
    let max_len = 4 * cluster + 1000;
    (0..size, 1..max_len, any::<bool>()).prop_map(move |(off, len, aligned)| {
        let (off, len) = if aligned {
            (off / cluster * cluster, len.div_ceil(cluster) * cluster)
        } else {
            (off, len)
        };
        (off, len.min(size - off).max(1))
    })
}

fn step(size: u64, cluster: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (range(size, cluster), any::<u64>())
            .prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
        2 => (range(size, cluster), any::<bool>())
            .prop_map(|((offset, len), unmap)| Step::Zero { offset, len, unmap }),
        2 => range(size, cluster).prop_map(|(offset, len)| Step::Discard { offset, len }),
        1 => Just(Step::Flush),
        1 => Just(Step::Reopen),
        1 => (0..4 * cluster / 512 + 2).prop_map(|sectors| Step::Resize { extra: sectors * 512 }),
    ]
}

fn case() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (0..CONFIGS.len()).prop_flat_map(|c| {
        let cluster = CONFIGS[c].2;
        (
            Just(c),
            prop::collection::vec(step(size_of(cluster), cluster), 1..24),
        )
    })
}

fn writable() -> ImageOptions {
    ImageOptions {
        writable: true,
        ..ImageOptions::default()
    }
}

/// Where the top image lives during a case.
enum Storage {
    Memory(Arc<MemStorage>),
    File,
}

fn open(s: &Scratch, storage: &Storage, backing: bool) -> Chain {
    match storage {
        Storage::Memory(mem) => {
            let top = Image::from_storage(Box::new(mem.clone()), TOP, &writable(), None)
                .unwrap_or_else(|e| panic!("opening the image in memory: {e}"));
            let mut layers = vec![Layer::Qcow2(top)];
            if backing {
                layers.push(Layer::Qcow2(Image::open(s.path(BASE)).unwrap()));
            }
            Chain::from_layers(layers).unwrap()
        }
        Storage::File => Chain::open_with(
            s.path(TOP),
            &ChainOptions {
                writable: true,
                ..ChainOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("opening {TOP}: {e}")),
    }
}

fn run_case(config: usize, steps: &[Step], in_memory: bool) -> Result<(), TestCaseError> {
    let (options, backing, cluster) = CONFIGS[config];
    let size = size_of(cluster);
    let s = Scratch::new();
    let mut below = vec![0u8; size as usize];
    if backing {
        s.create(BASE, "cluster_size=65536", size);
        s.qemu_io(
            BASE,
            "qcow2",
            &[
                format!("write -P 0x11 0 {}", size / 3),
                format!("write -P 0x22 {} {}", size / 2, size / 4),
            ],
        );
        below = s.reference(BASE, "qcow2");
        s.create_overlay(TOP, BASE, "qcow2", options, Some(size));
    } else {
        s.create(TOP, options, size);
    }
    let v2 = options.contains("compat=0.10");
    let mut model = Model::new(below, cluster, backing && v2);
    let storage = if in_memory {
        let bytes = std::fs::read(s.path(TOP)).unwrap();
        Storage::Memory(Arc::new(MemStorage::from_bytes(bytes)))
    } else {
        Storage::File
    };
    let mut chain = open(&s, &storage, backing);
    for (i, step) in steps.iter().enumerate() {
        match step.op() {
            Some(op) => {
                op.run(&chain)
                    .map_err(|e| TestCaseError::fail(format!("step {i} {step:?}: {e}")))?;
                model.apply(&op);
            }
            // Ranges are drawn below the case's size, so they stay valid at any size.
            None if matches!(step, Step::Resize { .. }) => {
                let Step::Resize { extra } = *step else {
                    unreachable!()
                };
                chain
                    .resize(size + extra, true)
                    .map_err(|e| TestCaseError::fail(format!("step {i} {step:?}: {e}")))?;
                // A shrink loses what lay past the end; a growth reads as zeros.
                model.bytes.resize((size + extra) as usize, 0);
            }
            None => {
                chain
                    .close()
                    .map_err(|e| TestCaseError::fail(format!("step {i} close: {e}")))?;
                drop(chain);
                chain = open(&s, &storage, backing);
            }
        }
    }
    prop_assert_eq!(chain.size(), model.bytes.len() as u64, "[{}] size", options);
    let mut got = vec![0u8; model.bytes.len()];
    chain.read_at(&mut got, 0).unwrap();
    if let Some(at) = (0..got.len()).find(|&i| got[i] != model.bytes[i]) {
        return Err(TestCaseError::fail(format!(
            "[{options}] we read {:#04x} at {at:#x}, the model {:#04x}",
            got[at], model.bytes[at]
        )));
    }
    chain.close().unwrap();
    drop(chain);
    if let Storage::Memory(mem) = &storage {
        s.write_file(TOP, &mem.to_bytes());
    }
    let check = s.output("qemu-img", &["check", TOP]);
    let report = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    prop_assert!(
        check.status.success() && report.contains("No errors were found"),
        "[{options}] qemu-img check exits {:?}:\n{report}",
        check.status.code()
    );
    s.write_file("model.raw", &model.bytes);
    let compare = s.output(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", TOP, "model.raw"],
    );
    prop_assert!(
        compare.status.success(),
        "[{options}] qemu-img compare: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn random_operations_in_memory_match_the_model((config, steps) in case()) {
        run_case(config, &steps, true)?;
    }

    #[test]
    fn random_operations_on_a_file_match_the_model((config, steps) in case()) {
        run_case(config, &steps, false)?;
    }
}
