//! Crash consistency: a workload runs on an image in a `FaultStorage` that loses power
//! after its k-th write, for every k; the bytes a disk could hold then (the last flush's
//! state plus any subset of the writes since) must pass `qemu-img check` (leaks allowed),
//! open with the library, and read back every write that a successful flush covered.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::ops::{Model, Op, random_op};
use common::{Rng, Scratch};
use qcow2_engine::storage::{FaultStorage, MemStorage, Unflushed};
use qcow2_engine::{
    Chain, ChainOptions, CreateOptions, Format, Image, ImageOptions, Layer, create_on,
};

/// One image configuration and the workload run on it.
struct Case {
    name: &'static str,
    size: u64,
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    backing: bool,
    /// Create the image with qemu-img instead of `create_on`.
    qemu_created: bool,
    /// Random operations in the workload (a close ends it).
    ops: usize,
    /// Longest operation, in bytes.
    max_len: u64,
    seed: u64,
    /// The workload must move the refcount table (checked on the clean run).
    moves_refcount_table: bool,
    /// qemu-io commands run on the image before the workload.
    qemu_prefill: &'static [&'static str],
}

impl Case {
    fn new(name: &'static str, size: u64, cluster: u64) -> Case {
        Case {
            name,
            size,
            cluster,
            refcount_bits: 16,
            extended_l2: false,
            backing: false,
            qemu_created: false,
            ops: 20,
            max_len: 3 * cluster,
            seed: 1,
            moves_refcount_table: false,
            qemu_prefill: &[],
        }
    }
}

/// The image under test: its initial bytes, the base it sits on, what it reads at first.
struct Fixture {
    scratch: Scratch,
    template: Vec<u8>,
    initial: Model,
}

const BASE: &str = "base.qcow2";
const CRASHED: &str = "crashed.qcow2";

fn fixture(case: &Case) -> Fixture {
    let s = Scratch::new();
    let size = case.size;
    let mut below = vec![0u8; size as usize];
    if case.backing {
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
    }
    let template = if case.qemu_created {
        let mut opts = format!(
            "cluster_size={},refcount_bits={}",
            case.cluster, case.refcount_bits
        );
        if case.extended_l2 {
            opts.push_str(",extended_l2=on");
        }
        if case.backing {
            s.create_overlay("template.qcow2", BASE, "qcow2", &opts, Some(size));
        } else {
            s.create("template.qcow2", &opts, size);
        }
        std::fs::read(s.path("template.qcow2")).unwrap()
    } else {
        let mem = MemStorage::new();
        let mut opts = CreateOptions::qcow2(size);
        opts.cluster_size = case.cluster;
        opts.refcount_bits = case.refcount_bits;
        opts.extended_l2 = case.extended_l2;
        if case.backing {
            opts.backing_file = Some(BASE.into());
            opts.backing_format = Some(Format::Qcow2);
            opts.open_backing = false;
        }
        create_on(&mem, &opts).unwrap();
        mem.to_bytes()
    };
    let mut initial = Model::new(below, case.cluster, false);
    let template = if case.qemu_prefill.is_empty() {
        template
    } else {
        s.write_file("prefilled.qcow2", &template);
        let commands: Vec<String> = case.qemu_prefill.iter().map(|c| c.to_string()).collect();
        s.qemu_io("prefilled.qcow2", "qcow2", &commands);
        initial.bytes = s.reference("prefilled.qcow2", "qcow2");
        std::fs::read(s.path("prefilled.qcow2")).unwrap()
    };
    Fixture {
        scratch: s,
        template,
        initial,
    }
}

/// Opens the image in `disk` for writing, over the base file when the case has one.
fn open_top(s: &Scratch, case: &Case, disk: Arc<FaultStorage>) -> qcow2_engine::Result<Chain> {
    let options = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let top = Image::from_storage(Box::new(disk), "top.qcow2", &options, None)?;
    let mut layers = vec![Layer::Qcow2(top)];
    if case.backing {
        layers.push(Layer::Qcow2(Image::open(s.path(BASE))?));
    }
    Chain::from_layers(layers)
}

fn workload(case: &Case) -> Vec<Op> {
    let mut rng = Rng::new(case.seed);
    let mut ops: Vec<Op> = (0..case.ops)
        .map(|_| random_op(&mut rng, case.size, case.cluster, case.max_len, 4))
        .collect();
    // Rewrite what was written first: in-place overwrites of clusters the image owns.
    if let Some(Op::Write { offset, data }) = ops.iter().find(|o| matches!(o, Op::Write { .. })) {
        let (offset, len) = (*offset, data.len());
        ops.push(Op::Write {
            offset,
            data: rng.bytes(len),
        });
    }
    ops
}

/// What a run of the workload left: the model at the last successful flush (or close) and
/// the operations issued after it (the last one may have failed).
struct Outcome {
    flushed: Model,
    /// How many operations the last successful flush covered.
    flushed_ops: usize,
    after: Vec<Op>,
}

fn run(chain: &Chain, ops: &[Op], initial: &Model, disk: &FaultStorage) -> Outcome {
    let trace = std::env::var_os("CRASH_TRACE").is_some();
    let mut model = initial.clone();
    let mut out = Outcome {
        flushed: initial.clone(),
        flushed_ops: 0,
        after: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        let r = op.run(chain);
        if trace {
            eprintln!(
                "{} -> {:?} (writes {}, flushes {})",
                op.describe(),
                r.as_ref().err().map(ToString::to_string),
                disk.writes(),
                disk.flushes()
            );
        }
        let ok = r.is_ok();
        if *op == Op::Flush {
            if ok {
                out.flushed = model.clone();
                out.flushed_ops = i + 1;
                out.after.clear();
            }
        } else {
            out.after.push(op.clone());
            if ok {
                model.apply(op);
            }
        }
        if !ok {
            return out;
        }
    }
    if chain.close().is_ok() {
        out.flushed = model;
        out.flushed_ops = ops.len() + 1;
        out.after.clear();
    }
    out
}

/// A fingerprint of an image, cheap enough for unoptimized test builds.
fn fingerprint(bytes: &[u8]) -> (usize, u64) {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h = (h ^ u64::from_be_bytes(w)).wrapping_mul(0x100_0000_01b3);
    }
    (bytes.len(), h)
}

/// Keeps a failing image for inspection and says where.
fn keep(bytes: &[u8], label: &str) -> String {
    let name: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = std::env::temp_dir().join(format!("crash-{name}.qcow2"));
    std::fs::write(&path, bytes).unwrap();
    format!("image kept at {}", path.display())
}

/// Checks one crashed image; returns whether qemu-img found leaks.
fn verify(s: &Scratch, bytes: &[u8], outcome: &Outcome, label: &str) -> bool {
    std::fs::write(s.path(CRASHED), bytes).unwrap();
    let out = s.output("qemu-img", &["check", "-f", "qcow2", CRASHED]);
    let code = out.status.code();
    if code != Some(0) && code != Some(3) {
        panic!(
            "{label}: qemu-img check exits {code:?} ({}):\n{}{}\nops since the last flush: {:?}",
            keep(bytes, label),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            outcome.after.iter().map(Op::describe).collect::<Vec<_>>(),
        );
    }
    let chain = Chain::open(s.path(CRASHED)).unwrap_or_else(|e| {
        panic!(
            "{label}: opening the crashed image: {e} ({})",
            keep(bytes, label)
        )
    });
    let mut got = vec![0u8; outcome.flushed.bytes.len()];
    chain
        .read_at(&mut got, 0)
        .unwrap_or_else(|e| panic!("{label}: reading the crashed image: {e}"));
    let flushed = &outcome.flushed;
    const CHUNK: usize = 4096;
    for (i, (gc, fc)) in got
        .chunks(CHUNK)
        .zip(flushed.bytes.chunks(CHUNK))
        .enumerate()
    {
        if gc == fc {
            continue;
        }
        for (j, (&g, &f)) in gc.iter().zip(fc).enumerate() {
            let at = i * CHUNK + j;
            if g == f {
                continue;
            }
            let explained = outcome
                .after
                .iter()
                .any(|op| flushed.value_at(op, at as u64) == Some(g));
            if !explained {
                panic!(
                    "{label}: byte {at:#x} reads {g:#04x}; the last flush left {f:#04x} and no \
                     later operation writes {g:#04x} there ({})\nops since the last flush: {:?}",
                    keep(bytes, label),
                    outcome.after.iter().map(Op::describe).collect::<Vec<_>>(),
                );
            }
        }
    }
    code == Some(3)
}

/// After a crash the machine comes back: the crashed image (just verified, in
/// [`CRASHED`]) opens for writing, takes a write that allocates and one that frees, and
/// closes; qemu-img check still finds no corruption.
fn recover(s: &Scratch, case: &Case, label: &str) {
    let chain = Chain::open_with(
        s.path(CRASHED),
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{label}: reopening for writing: {e}"));
    let at = case.size / 2 / case.cluster * case.cluster;
    let data = vec![0x77; 3 * case.cluster as usize];
    chain.write_at(&data, at).unwrap();
    chain.discard(at, case.cluster).unwrap();
    chain.close().unwrap();
    drop(chain);
    let out = s.output("qemu-img", &["check", "-f", "qcow2", CRASHED]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{label}, then written again: qemu-img check exits {:?}:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    let mut buf = vec![0u8; data.len()];
    Chain::open(s.path(CRASHED))
        .unwrap()
        .read_at(&mut buf, at)
        .unwrap();
    assert!(
        buf[case.cluster as usize..].iter().all(|&b| b == 0x77),
        "{label}: rewrite lost"
    );
    assert!(
        buf[..case.cluster as usize].iter().all(|&b| b == 0),
        "{label}: discard lost"
    );
}

/// Subsets of the unflushed writes tried at every crash point.
const SUBSETS: [Unflushed; 4] = [
    Unflushed::Lost,
    Unflushed::Kept,
    Unflushed::Seeded(1),
    Unflushed::Seeded(2),
];

/// Runs `case` crashing at every write; returns (crash points, distinct images checked).
fn crash_everywhere(case: &Case) -> (u64, usize) {
    let f = fixture(case);
    let ops = workload(case);
    // A clean run: how many writes the workload issues, and that it is right.
    let disk = Arc::new(FaultStorage::from_bytes(f.template.clone()));
    let total = {
        let chain = open_top(&f.scratch, case, disk.clone()).unwrap();
        let outcome = run(&chain, &ops, &f.initial, &disk);
        assert!(outcome.after.is_empty(), "{}: clean run failed", case.name);
        disk.writes()
    };
    let clean = disk.crash_image(Unflushed::Lost);
    if case.moves_refcount_table {
        // Header field refcount_table_offset: bytes 48..56.
        assert_ne!(
            clean[48..56],
            f.template[48..56],
            "{}: the workload does not move the refcount table",
            case.name
        );
    }
    let mut expected = f.initial.clone();
    ops.iter().for_each(|op| expected.apply(op));
    verify(
        &f.scratch,
        &clean,
        &Outcome {
            flushed: expected,
            flushed_ops: ops.len() + 1,
            after: Vec::new(),
        },
        &format!("{} clean", case.name),
    );
    let mut seen = HashSet::new();
    let mut leaky = 0;
    let only: Option<u64> = std::env::var("CRASH_K").ok().map(|k| k.parse().unwrap());
    for k in 1..=total {
        if only.is_some_and(|o| o != k) {
            continue;
        }
        let disk = Arc::new(FaultStorage::from_bytes(f.template.clone()));
        disk.crash_after(k);
        let outcome = match open_top(&f.scratch, case, disk.clone()) {
            Ok(chain) => {
                let outcome = run(&chain, &ops, &f.initial, &disk);
                assert!(disk.is_crashed(), "{}: no crash after write {k}", case.name);
                outcome
            }
            // The crash hit while opening: nothing was written.
            Err(_) => Outcome {
                flushed: f.initial.clone(),
                flushed_ops: 0,
                after: Vec::new(),
            },
        };
        for subset in SUBSETS {
            let bytes = disk.crash_image(subset);
            let key = (
                fingerprint(&bytes),
                outcome.flushed_ops,
                outcome.after.len(),
            );
            if !seen.insert(key) {
                continue;
            }
            let label = format!("{} crash after write {k}/{total} {subset:?}", case.name);
            if verify(&f.scratch, &bytes, &outcome, &label) {
                leaky += 1;
            }
            if subset == Unflushed::Seeded(1) {
                recover(&f.scratch, case, &label);
            }
        }
    }
    println!(
        "{}: {total} crash points, {} distinct crashed images checked ({leaky} with leaks)",
        case.name,
        seen.len()
    );
    (total, seen.len())
}

#[test]
fn crash_64k_clusters() {
    crash_everywhere(&Case::new("64k", 4 << 20, 65536));
}

#[test]
fn crash_64k_clusters_over_a_backing_file() {
    crash_everywhere(&Case {
        backing: true,
        seed: 2,
        ..Case::new("64k backing", 4 << 20, 65536)
    });
}

#[test]
fn crash_512_byte_clusters() {
    crash_everywhere(&Case {
        seed: 3,
        ..Case::new("512", 256 << 10, 512)
    });
}

#[test]
fn crash_512_byte_clusters_over_a_backing_file() {
    crash_everywhere(&Case {
        backing: true,
        seed: 4,
        max_len: 8192,
        ..Case::new("512 backing", 256 << 10, 512)
    });
}

#[test]
fn crash_with_1_bit_refcounts() {
    crash_everywhere(&Case {
        refcount_bits: 1,
        seed: 5,
        ..Case::new("refcount_bits=1", 1 << 20, 4096)
    });
}

#[test]
fn crash_with_64_bit_refcounts_growing_the_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: a block covers 32 KiB, the first table
    // 2 MiB of file; QEMU fills most of it, so the workload moves the table.
    crash_everywhere(&Case {
        refcount_bits: 64,
        seed: 6,
        ops: 12,
        // Close to the 2 MiB of file the first refcount table covers.
        qemu_prefill: &["write -P 0x5a 0 1900k"],
        max_len: 256 << 10,
        moves_refcount_table: true,
        ..Case::new("refcount_bits=64 growth", 4 << 20, 512)
    });
}

#[test]
fn crash_with_extended_l2() {
    crash_everywhere(&Case {
        extended_l2: true,
        seed: 7,
        max_len: 100_000,
        ..Case::new("extended_l2", 2 << 20, 65536)
    });
}

#[test]
fn crash_with_extended_l2_over_a_backing_file() {
    crash_everywhere(&Case {
        extended_l2: true,
        backing: true,
        seed: 8,
        max_len: 100_000,
        ..Case::new("extended_l2 backing", 2 << 20, 32768)
    });
}

#[test]
fn crash_on_a_qemu_created_image_over_a_backing_file() {
    crash_everywhere(&Case {
        backing: true,
        qemu_created: true,
        seed: 9,
        ..Case::new("qemu-img created 4k backing", 1 << 20, 4096)
    });
}

/// A flush that changes only entries of an L2 table already on disk (no L1 entry, no
/// freed cluster) must still make that table durable before it returns.
#[test]
fn a_flush_makes_a_changed_l2_table_durable() {
    let s = Scratch::new();
    let case = Case::new("l2 only", 1 << 20, 65536);
    let f = fixture(&case);
    let disk = Arc::new(FaultStorage::from_bytes(f.template.clone()));
    let chain = open_top(&s, &case, disk.clone()).unwrap();
    chain.write_at(&[1; 65536], 0).unwrap();
    chain.flush().unwrap();
    // Same L2 table, a new data cluster: only the L2 table and a refcount change.
    chain.write_at(&[2; 65536], 65536).unwrap();
    chain.flush().unwrap();
    disk.crash_after(0);
    drop(chain);
    std::fs::write(s.path("a.qcow2"), disk.crash_image(Unflushed::Lost)).unwrap();
    let chain = Chain::open(s.path("a.qcow2")).unwrap();
    let mut buf = vec![0u8; 65536];
    chain.read_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "the flushed write was lost");
}

/// Runs `prepare` then a flush on a fresh image of `case`, crashing at every write of that
/// flush; at each crash point every subset of the unflushed writes (when there are at
/// most 8; else [`SUBSETS`]) must pass `qemu-img check`. Returns the crash points tried.
fn crash_inside_a_flush(case: &Case, prepare: impl Fn(&Chain)) -> u64 {
    let f = fixture(case);
    let s = &f.scratch;
    let disk = Arc::new(FaultStorage::from_bytes(f.template.clone()));
    let chain = open_top(s, case, disk.clone()).unwrap();
    prepare(&chain);
    let before = disk.writes();
    chain.flush().unwrap();
    let during = disk.writes() - before;
    drop(chain);
    for k in 1..=during {
        let disk = Arc::new(FaultStorage::from_bytes(f.template.clone()));
        disk.crash_after(before + k);
        let chain = open_top(s, case, disk.clone()).unwrap();
        prepare(&chain);
        assert!(chain.flush().is_err() || k == during);
        drop(chain);
        let n = disk.unflushed();
        let subsets: Vec<Unflushed> = if n <= 8 {
            (0..1u64 << n).map(Unflushed::Mask).collect()
        } else {
            SUBSETS.to_vec()
        };
        for subset in subsets {
            std::fs::write(s.path("a.qcow2"), disk.crash_image(subset)).unwrap();
            let out = s.output("qemu-img", &["check", "a.qcow2"]);
            assert!(
                matches!(out.status.code(), Some(0 | 3)),
                "{}: crash after write {k} of the flush, {subset:?}: {}{}",
                case.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    during
}

/// Dropping a cluster's refcount must wait until the L2 table that no longer points at it
/// is durable: otherwise a crash leaves a mapped cluster with refcount 0.
#[test]
fn a_discard_drops_the_refcount_only_after_the_l2_table_is_durable() {
    let case = Case::new("discard order", 1 << 20, 65536);
    crash_inside_a_flush(&case, |chain| {
        chain.write_at(&[1; 2 * 65536], 0).unwrap();
        chain.flush().unwrap();
        chain.discard(65536, 65536).unwrap();
    });
}

/// One allocation that needs refcount blocks for several ranges puts them together; a
/// block lying in another new block's range is counted there, so its refcount table entry
/// must not reach the disk before that block's entry.
#[test]
fn new_refcount_blocks_reach_the_table_in_dependency_order() {
    // 512-byte clusters, 64-bit refcounts: a block covers 64 clusters, so a 96 KiB write
    // needs blocks for four ranges at once.
    let case = Case {
        refcount_bits: 64,
        ..Case::new("refcount blocks", 1 << 20, 512)
    };
    crash_inside_a_flush(&case, |chain| {
        chain.write_at(&[7; 96 << 10], 0).unwrap();
    });
}

/// A crash anywhere in a preallocating resize (`qemu-img resize --preallocation`) leaves
/// an image that `qemu-img check` finds without corruption, with the old size or the new
/// one, its data intact and the new area reading as zeros (a longer backing file never
/// shows through: zero clusters, or in version 2 the new data clusters, are mapped before
/// the size grows).
#[test]
fn a_preallocating_resize_crashes_into_the_old_or_the_new_size() {
    use qcow2_engine::Preallocation;
    let cases = [
        (
            "cluster_size=4096",
            false,
            Preallocation::Falloc,
            1u64 << 20,
            3u64 << 20,
        ),
        (
            "cluster_size=512",
            false,
            Preallocation::Metadata,
            256 << 10,
            640 << 10,
        ),
        (
            "cluster_size=65536,compat=0.10",
            true,
            Preallocation::Full,
            1 << 20,
            3 << 20,
        ),
        (
            "cluster_size=65536",
            true,
            Preallocation::Metadata,
            1 << 20,
            3 << 20,
        ),
    ];
    // Without preallocation, over a longer backing file: zero clusters before the size.
    let off = (
        "cluster_size=65536,extended_l2=on",
        true,
        Preallocation::Off,
        1 << 20,
        3 << 20,
    );
    for (options, backing, mode, old_size, new_size) in cases.into_iter().chain([off]) {
        let s = Scratch::new();
        let case = Case {
            backing,
            ..Case::new("resize", old_size, 512)
        };
        if backing {
            s.create(BASE, "", 4 << 20);
            s.qemu_io(BASE, "qcow2", &["write -P 0x11 0 4M".to_string()]);
            s.create_overlay("top.qcow2", BASE, "qcow2", options, Some(old_size));
        } else {
            s.create("top.qcow2", options, old_size);
        }
        s.qemu_io("top.qcow2", "qcow2", &["write -P 0x33 4k 60k".to_string()]);
        let before = s.reference("top.qcow2", "qcow2");
        let template = std::fs::read(s.path("top.qcow2")).unwrap();
        let resize = |disk: &Arc<FaultStorage>| {
            let chain = open_top(&s, &case, disk.clone())?;
            chain.resize_preallocated(new_size, false, mode)?;
            chain.close()
        };
        let clean = Arc::new(FaultStorage::from_bytes(template.clone()));
        resize(&clean).unwrap();
        let total = clean.writes();
        for k in 0..=total {
            let disk = Arc::new(FaultStorage::from_bytes(template.clone()));
            disk.crash_after(k);
            let _ = resize(&disk);
            for unflushed in [Unflushed::Kept, Unflushed::Lost] {
                let label = format!("{options} {mode:?}: crash after {k}/{total} writes");
                let bytes = disk.crash_image(unflushed);
                std::fs::write(s.path(CRASHED), &bytes).unwrap();
                let out = s.output("qemu-img", &["check", "-f", "qcow2", CRASHED]);
                assert!(
                    matches!(out.status.code(), Some(0 | 3)),
                    "{label}: qemu-img check {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                let chain = Chain::open(s.path(CRASHED)).unwrap();
                let size = chain.size();
                assert!(size == old_size || size == new_size, "{label}: size {size}");
                let mut got = vec![0u8; size as usize];
                chain.read_at(&mut got, 0).unwrap();
                assert!(got[..old_size as usize] == before[..], "{label}: old data");
                assert!(
                    got[old_size as usize..].iter().all(|&b| b == 0),
                    "{label}: the new area"
                );
            }
        }
        assert!(total >= 2, "{options}: {total} writes");
    }
}
