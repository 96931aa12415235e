//! Merges of a small three-layer chain held in memory (no disk in the numbers): the merge
//! engine's own cost — walking runs, reading, allocating, writing tables.
//!
//! The chain (`base <- mid <- top`, 64 MiB virtual, 64 KiB clusters) is built once with the
//! library in a temporary directory: base holds 1 MiB of data every 2 MiB, mid 256 KiB
//! pieces every 3 MiB and two zeroed ranges, top 64 KiB pieces every 1.5 MiB and a
//! discard. Each iteration merges fresh in-memory copies of the three files (copied
//! outside the timed part) through an `Opener`; the files on disk only anchor the paths.
//!
//! - `commit_top`: `qimg commit -d top.qcow2` (top's data into mid).
//! - `commit_base`: `qimg commit -b base.qcow2 top.qcow2` (top and mid into base).
//! - `pull_all`: `qimg pull top.qcow2` (everything into top, which then stands alone).
//! - `pull_base`: `qimg pull -b base.qcow2 top.qcow2` (mid's data into top).
//!
//! Throughput is the data bytes each merge copies (from a dry run).
//! `cargo bench --bench merge`; `-- --warm-up-time 1 --measurement-time 2` for a short run.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};
use qcow2_engine::storage::{MemStorage, Opener, Storage};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Format, create};

const SIZE: u64 = 64 << 20;
const NAMES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

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

/// Builds the chain in `dir` and returns each file's bytes.
fn build(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut previous: Option<&str> = None;
    for (i, name) in NAMES.iter().enumerate() {
        let path = dir.join(name);
        let mut options = CreateOptions::qcow2(SIZE);
        if let Some(b) = previous {
            options.backing_file = Some(b.into());
            options.backing_format = Some(Format::Qcow2);
        }
        create(&path, &options).unwrap();
        let chain = Chain::open_with(&path, &writable()).unwrap();
        let (piece, step, fill): (u64, u64, u8) = match i {
            0 => (1 << 20, 2 << 20, 0x11),
            1 => (256 << 10, 3 << 20, 0x22),
            _ => (64 << 10, 3 << 19, 0x33),
        };
        let data = vec![fill; piece as usize];
        let mut at = (i as u64) << 16;
        while at + piece <= SIZE {
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
        chain.close().unwrap();
        previous = Some(name);
    }
    NAMES
        .iter()
        .map(|n| {
            let path = std::fs::canonicalize(dir.join(n)).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect()
}

/// Merge options over fresh in-memory copies of `files`.
fn fresh(files: &[(PathBuf, Vec<u8>)]) -> MergeOptions {
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

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let files = build(dir.path());
    let mut group = c.benchmark_group("merge");
    for (name, merge) in [
        ("commit_top", Merge::CommitTop),
        ("commit_base", Merge::CommitBase),
        ("pull_all", Merge::PullAll),
        ("pull_base", Merge::PullBase),
    ] {
        let mut dry = fresh(&files);
        dry.dry_run = true;
        let bytes = run(merge, dir.path(), dry).data_bytes;
        assert!(bytes > 0, "{name} copies nothing");
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(name, |b| {
            b.iter_batched(
                || fresh(&files),
                |options| run(merge, dir.path(), options),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(merge, benches);
criterion_main!(merge);
