//! Merges of chains held in memory (no disk in the numbers): the merge engine's own cost —
//! walking runs, reading, allocating, writing tables.
//!
//! Each chain is built once with the library in a temporary directory. Each iteration
//! merges fresh in-memory copies of its files (copied outside the timed part) through an
//! `Opener`; the files on disk only anchor the paths.
//!
//! Group `merge`, the standard chain (`base <- mid <- top`, 64 MiB virtual, 64 KiB
//! clusters): base holds 1 MiB of data every 2 MiB, mid 256 KiB pieces every 3 MiB and
//! two zeroed ranges, top 64 KiB pieces every 1.5 MiB and a discard.
//!
//! - `commit_top`: `qimg commit -d top.qcow2` (top's data into mid).
//! - `commit_base`: `qimg commit -b base.qcow2 top.qcow2` (top and mid into base).
//! - `pull_all`: `qimg pull top.qcow2` (everything into top, which then stands alone).
//! - `pull_base`: `qimg pull -b base.qcow2 top.qcow2` (mid's data into top).
//!
//! Throughput is the data bytes each merge copies (from a dry run).
//!
//! Group `merge_deep` (scripts/mkworkload.sh deep128 in small): 128 layers, 256 MiB
//! virtual, 64 KiB clusters, each layer 8 writes of 4-256 KiB at seeded offsets in the
//! first 64 MiB, so layers overlap: `commit_base` and `pull_all` as above, every layer
//! resolved for every run.
//!
//! Group `merge_metadata` (mkworkload.sh meta4k in small): 3 layers, 16 GiB virtual,
//! 4 KiB clusters, each layer 4,000 4 KiB writes at seeded offsets over the whole disk —
//! one cluster and mostly one L2 table each: `commit_base` and `pull_all`, throughput in
//! clusters (the clusters per second).
//!
//! `cargo bench --bench merge`; `-- --warm-up-time 1 --measurement-time 2` for a short run.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};
use qcow2_engine::storage::{MemStorage, Opener, Storage};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Format, create};

/// The files of a chain, bottom first: the last is the top.
type Files = Vec<(PathBuf, Vec<u8>)>;

/// Serves the chain's files from memory, by canonical path.
struct MemOpener(HashMap<PathBuf, Arc<MemStorage>>);

impl Opener for MemOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn Storage>> {
        let path = std::fs::canonicalize(path)?;
        self.0
            .get(&path)
            .map(|m| Box::new(m.clone()) as Box<dyn Storage>)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in memory"))
    }
}

fn writable() -> ChainOptions {
    ChainOptions {
        writable: true,
        ..ChainOptions::default()
    }
}

/// A chain to build: `layers` images of `size` bytes and `cluster_size` clusters, layer
/// `i` (0: the base) written by `fill(i, &chain)`.
struct Layout<'f> {
    layers: usize,
    size: u64,
    cluster_size: u64,
    fill: &'f dyn Fn(usize, &Chain),
}

/// The name of layer `i` of `layers`: base, mid, top for three, numbered between.
fn layer_name(i: usize, layers: usize) -> String {
    match i {
        0 => "base.qcow2".into(),
        i if i + 1 == layers => "top.qcow2".into(),
        i if i + 2 == layers => "mid.qcow2".into(),
        i => format!("l{i:04}.qcow2"),
    }
}

/// Builds the chain in `dir` and returns each file's bytes, bottom first.
fn build(dir: &Path, layout: &Layout<'_>) -> Files {
    let names: Vec<String> = (0..layout.layers)
        .map(|i| layer_name(i, layout.layers))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let path = dir.join(name);
        let mut options = CreateOptions::qcow2(layout.size);
        options.cluster_size = layout.cluster_size;
        if i > 0 {
            options.backing_file = Some(names[i - 1].clone());
            options.backing_format = Some(Format::Qcow2);
        }
        create(&path, &options).unwrap();
        let chain = Chain::open_with(&path, &writable()).unwrap();
        (layout.fill)(i, &chain);
        chain.close().unwrap();
    }
    names
        .iter()
        .map(|n| {
            let path = std::fs::canonicalize(dir.join(n)).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// The standard chain (see the module docs).
fn fill_standard(i: usize, chain: &Chain) {
    let (piece, step, fill): (u64, u64, u8) = match i {
        0 => (1 << 20, 2 << 20, 0x11),
        1 => (256 << 10, 3 << 20, 0x22),
        _ => (64 << 10, 3 << 19, 0x33),
    };
    let data = vec![fill; piece as usize];
    let mut at = (i as u64) << 16;
    while at + piece <= chain.size() {
        chain.write_at(&data, at).unwrap();
        at += step;
    }
    match i {
        1 => {
            chain.write_zeroes(5 << 20, 1 << 20, false).unwrap();
            chain.write_zeroes(40 << 20, 512 << 10, true).unwrap();
        }
        2 => chain.discard(20 << 20, 2 << 20).unwrap(),
        _ => {}
    }
}

/// A Park-Miller generator, as scripts/mkworkload.sh uses: seeded per layer.
struct Lehmer(u64);

impl Lehmer {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0 * 16807 % 2_147_483_647;
        self.0 % n
    }
}

/// `writes` writes of `min..=max` bytes (multiples of `align`) at `align`-aligned
/// offsets below `span`, each of one byte value per layer.
fn fill_scattered(
    i: usize,
    chain: &Chain,
    writes: usize,
    align: u64,
    sizes: (u64, u64),
    span: u64,
) {
    let mut rng = Lehmer(1 + 7919 * i as u64);
    let data = vec![(i % 250) as u8 + 1; sizes.1 as usize];
    for _ in 0..writes {
        let len = (sizes.0 / align + rng.below((sizes.1 - sizes.0) / align + 1)) * align;
        let at = rng.below((span - len) / align) * align;
        chain.write_at(&data[..len as usize], at).unwrap();
    }
}

/// Merge options over fresh in-memory copies of `files`.
fn fresh(files: &Files) -> MergeOptions {
    let map = files
        .iter()
        .map(|(p, b)| (p.clone(), Arc::new(MemStorage::from_bytes(b.clone()))))
        .collect();
    MergeOptions {
        chain: ChainOptions {
            opener: Some(Arc::new(MemOpener(map))),
            ..ChainOptions::default()
        },
        // Flushes of memory cost nothing; one at the end, as a merge of this size does.
        checkpoint_bytes: 0,
        ..MergeOptions::default()
    }
}

#[derive(Clone, Copy)]
enum Merge {
    CommitTop,
    CommitBase,
    PullAll,
    PullBase,
}

fn run(merge: Merge, dir: &Path, options: MergeOptions) -> ops::MergeReport {
    let top = dir.join("top.qcow2");
    let base = dir.join("base.qcow2");
    let result = match merge {
        Merge::CommitTop => ops::commit(
            &top,
            &CommitOptions {
                keep: true,
                merge: options,
                ..CommitOptions::default()
            },
            &mut |_, _| true,
        ),
        Merge::CommitBase => ops::commit(
            &top,
            &CommitOptions {
                base: Some(base),
                merge: options,
                ..CommitOptions::default()
            },
            &mut |_, _| true,
        ),
        Merge::PullAll => ops::pull(&top, None, &options, &mut |_, _| true),
        Merge::PullBase => ops::pull(&top, Some(&base), &options, &mut |_, _| true),
    };
    result.expect("merging")
}

/// Benches `merges` on the chain `files` (in `dir`) as group `name`; throughput in
/// bytes, or in clusters of `per_cluster` bytes.
fn bench_group(
    c: &mut Criterion,
    name: &str,
    dir: &Path,
    files: &Files,
    merges: &[(&str, Merge)],
    per_cluster: Option<u64>,
) {
    let mut group = c.benchmark_group(name);
    for &(name, merge) in merges {
        let mut dry = fresh(files);
        dry.dry_run = true;
        let bytes = run(merge, dir, dry).data_bytes;
        assert!(bytes > 0, "{name} copies nothing");
        group.throughput(match per_cluster {
            Some(cluster) => Throughput::Elements(bytes / cluster),
            None => Throughput::Bytes(bytes),
        });
        group.bench_function(name, |b| {
            b.iter_batched(
                || fresh(files),
                |options| run(merge, dir, options),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let standard = Layout {
        layers: 3,
        size: 64 << 20,
        cluster_size: 64 << 10,
        fill: &fill_standard,
    };
    let files = build(dir.path(), &standard);
    bench_group(
        c,
        "merge",
        dir.path(),
        &files,
        &[
            ("commit_top", Merge::CommitTop),
            ("commit_base", Merge::CommitBase),
            ("pull_all", Merge::PullAll),
            ("pull_base", Merge::PullBase),
        ],
        None,
    );
    let both = [
        ("commit_base", Merge::CommitBase),
        ("pull_all", Merge::PullAll),
    ];

    let dir = tempfile::tempdir().unwrap();
    let deep = Layout {
        layers: 128,
        size: 256 << 20,
        cluster_size: 64 << 10,
        fill: &|i, chain| fill_scattered(i, chain, 8, 4 << 10, (4 << 10, 256 << 10), 64 << 20),
    };
    let files = build(dir.path(), &deep);
    bench_group(c, "merge_deep", dir.path(), &files, &both, None);

    let dir = tempfile::tempdir().unwrap();
    let metadata = Layout {
        layers: 3,
        size: 16 << 30,
        cluster_size: 4 << 10,
        fill: &|i, chain| fill_scattered(i, chain, 4000, 4 << 10, (4 << 10, 4 << 10), 16 << 30),
    };
    let files = build(dir.path(), &metadata);
    bench_group(
        c,
        "merge_metadata",
        dir.path(),
        &files,
        &both,
        Some(4 << 10),
    );
}

criterion_group!(merge, benches);
criterion_main!(merge);
