//! Property tests of internal snapshots: random sequences of writes, zero writes, discards
//! and snapshot create / apply / delete against a model that remembers each snapshot's
//! content. The image reads the model after every apply; deleting a snapshot frees exactly
//! the bytes `du` called exclusive to it; after each case `qemu-img check` finds nothing,
//! our check agrees, and qemu-img reads every snapshot as the model remembers it.

mod common;

use common::ops::{Model, Op};
use common::{Rng, Scratch};
use proptest::prelude::*;
use qcow2_engine::ops;
use qcow2_engine::{Chain, ChainOptions, Image};

/// Image options (qemu-img `-o`) and cluster size.
const CONFIGS: [(&str, u64); 6] = [
    ("cluster_size=65536", 65536),
    ("cluster_size=4096,refcount_bits=8", 4096),
    ("cluster_size=512", 512),
    ("cluster_size=32768,extended_l2=on", 32768),
    ("cluster_size=4096,compat=0.10", 4096),
    ("cluster_size=16384,lazy_refcounts=on", 16384),
];

const IMAGE: &str = "snap.qcow2";
const MAX_SNAPSHOTS: usize = 4;

fn size_of(cluster: u64) -> u64 {
    match cluster {
        512 => (256 << 10) + 1536,
        _ => (1 << 20) + 7 * 512,
    }
}

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
    Create,
    /// Apply the snapshot at this index (modulo how many there are).
    Apply(usize),
    /// Delete the snapshot at this index (modulo how many there are).
    Delete(usize),
}

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
        4 => (range(size, cluster), any::<u64>())
            .prop_map(|((offset, len), seed)| Step::Write { offset, len, seed }),
        1 => (range(size, cluster), any::<bool>())
            .prop_map(|((offset, len), unmap)| Step::Zero { offset, len, unmap }),
        1 => range(size, cluster).prop_map(|(offset, len)| Step::Discard { offset, len }),
        2 => Just(Step::Create),
        1 => (0..MAX_SNAPSHOTS).prop_map(Step::Apply),
        1 => (0..MAX_SNAPSHOTS).prop_map(Step::Delete),
    ]
}

fn case() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (0..CONFIGS.len()).prop_flat_map(|c| {
        let cluster = CONFIGS[c].1;
        (
            Just(c),
            prop::collection::vec(step(size_of(cluster), cluster), 1..20),
        )
    })
}

fn fail(i: usize, step: &Step, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("step {i} {step:?}: {e}"))
}

fn content(chain: &Chain) -> Vec<u8> {
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).unwrap();
    buf
}

/// Referenced bytes that are not the image's own metadata (header, refcounts, snapshot
/// table): what snapshots and the active state hold.
fn owned_bytes(chain: &Chain) -> u64 {
    let report = ops::du(chain).unwrap();
    let c = report.layers[0].clusters.as_ref().unwrap();
    c.referenced - c.metadata
}

fn run_case(config: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let (options, cluster) = CONFIGS[config];
    let size = size_of(cluster);
    let s = Scratch::new();
    s.create(IMAGE, options, size);
    let mut model = Model::new(vec![0u8; size as usize], cluster, false);
    // (name, content) of each snapshot, in table order.
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    let mut next_name = 0;
    let writable = ChainOptions {
        writable: true,
        ..ChainOptions::default()
    };
    let chain = Chain::open_with(s.path(IMAGE), &writable).unwrap();
    for (i, step) in steps.iter().enumerate() {
        let top = chain.top().as_qcow2().unwrap();
        match *step {
            Step::Write { offset, len, seed } => {
                let op = Op::Write {
                    offset,
                    data: Rng::new(seed).bytes(len as usize),
                };
                op.run(&chain).map_err(|e| fail(i, step, e))?;
                model.apply(&op);
            }
            Step::Zero { offset, len, unmap } => {
                let op = Op::Zero { offset, len, unmap };
                op.run(&chain).map_err(|e| fail(i, step, e))?;
                model.apply(&op);
            }
            Step::Discard { offset, len } => {
                let op = Op::Discard { offset, len };
                op.run(&chain).map_err(|e| fail(i, step, e))?;
                model.apply(&op);
            }
            Step::Create => {
                if snapshots.len() == MAX_SNAPSHOTS {
                    continue;
                }
                let name = format!("s{next_name}");
                next_name += 1;
                top.snapshot_create(&name).map_err(|e| fail(i, step, e))?;
                snapshots.push((name, model.bytes.clone()));
            }
            Step::Apply(k) => {
                if snapshots.is_empty() {
                    continue;
                }
                let (name, bytes) = &snapshots[k % snapshots.len()];
                top.snapshot_apply(name).map_err(|e| fail(i, step, e))?;
                model.bytes = bytes.clone();
                prop_assert!(
                    content(&chain) == model.bytes,
                    "step {i} {step:?}: the image does not read the snapshot's content"
                );
            }
            Step::Delete(k) => {
                if snapshots.is_empty() {
                    continue;
                }
                let index = k % snapshots.len();
                chain.flush().map_err(|e| fail(i, step, e))?;
                let report = ops::du(&chain).unwrap();
                let exclusive = report.layers[0].snapshots[index].space.exclusive;
                let before = owned_bytes(&chain);
                let (name, _) = snapshots.remove(index);
                top.snapshot_delete(&name).map_err(|e| fail(i, step, e))?;
                let after = owned_bytes(&chain);
                prop_assert_eq!(
                    before - after,
                    exclusive,
                    "step {} {:?}: deleting {} freed other than its exclusive bytes",
                    i,
                    step,
                    name
                );
            }
        }
    }
    prop_assert!(
        content(&chain) == model.bytes,
        "the image does not read the model"
    );
    chain
        .close()
        .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
    drop(chain);

    let out = s.output("qemu-img", &["check", IMAGE]);
    prop_assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = Image::open(s.path(IMAGE)).unwrap().check().unwrap();
    prop_assert!(ours.is_clean(), "our check: {:?}", ours.findings);
    s.write_file("model.raw", &model.bytes);
    s.assert_same_content(IMAGE, "model.raw", "active");
    for (name, bytes) in &snapshots {
        s.copy(IMAGE, "applied.qcow2");
        s.qemu_img(&["snapshot", "-a", name, "applied.qcow2"]);
        s.write_file("model.raw", bytes);
        s.assert_same_content("applied.qcow2", "model.raw", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn snapshots_keep_their_content_and_free_what_du_says((config, steps) in case()) {
        run_case(config, &steps)?;
    }
}
