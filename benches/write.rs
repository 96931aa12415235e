//! Write throughput of one qcow2 image on a file in a temporary directory.
//!
//! Benchmarks (64 KiB clusters, 256 MiB virtual size, no backing file):
//! - `random_4k_allocating`: 4 KiB writes at random 4 KiB-aligned offsets, each in a
//!   cluster not allocated yet (allocation, the cluster's rest filled with zeros, the L2
//!   entry and refcount changed in memory).
//! - `random_4k_overwrite`: 4 KiB writes at random offsets of a fully allocated image
//!   (the in-place path under the shared lock).
//! - `seq_1m_allocating`: 1 MiB writes walking a fresh image front to back (contiguous
//!   allocation and one large data write per request, as a conversion does).
//! - `..._2_bitmaps`: the two random 4 KiB cases on an image with two enabled persistent
//!   bitmaps (64 KiB and 4 KiB granularity), which every write marks: the cost of keeping
//!   bitmaps valid (the target is at most 5% over the same case without).
//!
//! Only the writes are timed (criterion's `iter_custom`): creating a fresh image when the
//! current one is used up, and the flushes that follow, happen outside the measured time.
//! Metadata reaches the file at checkpoints (every 16 MiB of changed L2 tables) and when
//! an image is closed, so checkpoints inside a run are part of the numbers but the final
//! flush (an fsync) is not. Throughput is in bytes.
//!
//! `cargo bench --bench write` for the full run;
//! `cargo bench --bench write -- --warm-up-time 1 --measurement-time 2` for a short one.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Layer, create};

const VIRTUAL_SIZE: u64 = 256 << 20;
const CLUSTER: u64 = 64 << 10;
const CLUSTERS: u64 = VIRTUAL_SIZE / CLUSTER;

/// Park-Miller minimal standard generator: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0 * 16807 % 2_147_483_647;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Creates (or recreates) `path` as an empty qcow2 image and opens it for writing; with
/// `bitmaps`, the image has two enabled persistent bitmaps.
fn fresh(path: &Path, bitmaps: bool) -> Chain {
    let _ = std::fs::remove_file(path);
    create(path, &CreateOptions::qcow2(VIRTUAL_SIZE)).expect("creating the image");
    let chain = Chain::open_with(
        path,
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .expect("opening the image for writing");
    if bitmaps {
        let Layer::Qcow2(image) = chain.top() else {
            unreachable!("a qcow2 image")
        };
        image.add_bitmap("coarse", None, true).unwrap();
        image.add_bitmap("fine", Some(4096), true).unwrap();
    }
    chain
}

/// A writable image that is replaced by a fresh one after `capacity` writes.
struct Renewing {
    path: PathBuf,
    bitmaps: bool,
    chain: Option<Chain>,
    used: u64,
    capacity: u64,
}

impl Renewing {
    fn new(path: PathBuf, capacity: u64, bitmaps: bool) -> Renewing {
        Renewing {
            path,
            bitmaps,
            chain: None,
            used: 0,
            capacity,
        }
    }

    /// Runs `iters` writes (`write(chain, index_in_image)`), timing only the writes.
    fn run(&mut self, iters: u64, mut write: impl FnMut(&Chain, u64)) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        while done < iters {
            if self.chain.is_none() || self.used == self.capacity {
                // Untimed: closing (an fsync) and making a new image.
                if let Some(old) = self.chain.take() {
                    old.close().expect("closing the image");
                }
                self.chain = Some(fresh(&self.path, self.bitmaps));
                self.used = 0;
            }
            let chain = self.chain.as_ref().unwrap();
            let n = (iters - done).min(self.capacity - self.used);
            let start = Instant::now();
            for k in 0..n {
                write(chain, self.used + k);
            }
            total += start.elapsed();
            self.used += n;
            done += n;
        }
        total
    }
}

/// Guards the numbers: what the benches do leaves an image qemu-img finds clean and that
/// reads back what was written.
fn check_with_qemu(dir: &Path) {
    let path = dir.join("check.qcow2");
    let chain = fresh(&path, true);
    let mut rng = Rng(7);
    for _ in 0..200 {
        let off = rng.below(VIRTUAL_SIZE / 4096) * 4096;
        chain.write_at(&[0x5a; 4096], off).unwrap();
    }
    chain.write_at(&vec![0xa5; 4 << 20], 16 << 20).unwrap();
    chain.close().unwrap();
    drop(chain);
    let status = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&path)
        .status();
    match status {
        Ok(s) => assert!(
            s.success(),
            "qemu-img check found problems in the bench image"
        ),
        Err(e) => eprintln!("qemu-img not available ({e}); skipping the check"),
    }
    let chain = Chain::open(&path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    chain.read_at(&mut buf, 16 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
    std::fs::remove_file(&path).unwrap();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    check_with_qemu(dir.path());
    let mut group = c.benchmark_group("write");
    let block = [0x5au8; 4096];

    // Allocating: every write lands in a cluster of its own, in random order.
    let mut order: Vec<u64> = (0..CLUSTERS).collect();
    let mut rng = Rng(42);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let within: Vec<u64> = (0..CLUSTERS)
        .map(|_| rng.below(CLUSTER / 4096) * 4096)
        .collect();
    let mib = vec![0x11u8; 1 << 20];
    let offsets: Vec<u64> = (0..4096)
        .map(|_| rng.below(VIRTUAL_SIZE / 4096) * 4096)
        .collect();
    for (suffix, bitmaps) in [("", false), ("_2_bitmaps", true)] {
        let mut image = Renewing::new(dir.path().join("alloc.qcow2"), CLUSTERS, bitmaps);
        group.throughput(Throughput::Bytes(4096));
        group.bench_function(format!("random_4k_allocating{suffix}"), |b| {
            b.iter_custom(|iters| {
                image.run(iters, |chain, i| {
                    let c = order[i as usize];
                    chain
                        .write_at(black_box(&block), c * CLUSTER + within[c as usize])
                        .unwrap();
                })
            })
        });
        drop(image);

        // Overwriting: a fully allocated image, random 4 KiB blocks.
        let path = dir.path().join("full.qcow2");
        let full = fresh(&path, bitmaps);
        for off in (0..VIRTUAL_SIZE).step_by(1 << 20) {
            full.write_at(&mib, off).unwrap();
        }
        full.flush().unwrap();
        let mut i = 0;
        group.bench_function(format!("random_4k_overwrite{suffix}"), |b| {
            b.iter(|| {
                full.write_at(black_box(&block), offsets[i % offsets.len()])
                    .unwrap();
                i += 1;
            })
        });
        drop(full);
    }

    // Sequential 1 MiB writes into a fresh image.
    let mut image = Renewing::new(dir.path().join("seq.qcow2"), VIRTUAL_SIZE >> 20, false);
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("seq_1m_allocating", |b| {
        b.iter_custom(|iters| {
            image.run(iters, |chain, i| {
                chain.write_at(black_box(&mib), i << 20).unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(write, benches);
criterion_main!(write);
