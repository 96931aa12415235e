//! Positional reads (`pread`, what every storage of the crate does) against a memory map
//! of the same file (`memmap2`), for the three places where a map could help
//! (ARCHITECTURE.md, "Why positional I/O"): metadata tables (a 64 KiB L2 table read and
//! decoded), raw layers and the reader (1 MiB and 4 KiB of data copied into the caller's
//! buffer). The file (256 MiB) is in the page cache: cold, both wait for the disk alike.
//!
//! Each read goes to a pseudo-random aligned offset. `mapped` keeps one map for the whole
//! run, as a long-lived process would (every page faulted in once, then none); `fresh`
//! maps the file for each batch of 64 reads and unmaps it, as a short command does (every
//! page it touches costs a fault).

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const FILE_LEN: u64 = 256 << 20;
const BATCH: u64 = 64;

struct Offsets(u64);

impl Offsets {
    /// The next offset in `0..FILE_LEN`, aligned to `align`.
    fn next(&mut self, align: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 20) % (FILE_LEN / align) * align
    }
}

fn file() -> (tempfile::TempDir, File) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("data");
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("creating the file");
    for i in 0..FILE_LEN >> 20 {
        file.write_all_at(&chunk, i << 20)
            .expect("writing the file");
    }
    // Warm: read it once, so both paths find it in the page cache.
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..FILE_LEN >> 20 {
        file.read_exact_at(&mut buf, i << 20)
            .expect("reading the file");
    }
    (dir, file)
}

fn map(file: &File) -> memmap2::Mmap {
    // SAFETY: the file is private to this benchmark and never truncated while mapped.
    unsafe { memmap2::Mmap::map(file) }.expect("mapping the file")
}

fn decode(bytes: &[u8], table: &mut Vec<u64>) {
    table.clear();
    table.extend(
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))),
    );
}

fn io_paths(c: &mut Criterion) {
    let (_dir, file) = file();
    let mapped = map(&file);
    let mut group = c.benchmark_group("io_paths");
    for (what, len) in [
        ("l2_table", 64u64 << 10),
        ("data_1m", 1 << 20),
        ("data_4k", 4096),
    ] {
        group.throughput(Throughput::Bytes(len * BATCH));
        let mut buf = vec![0u8; len as usize];
        let mut table = Vec::with_capacity(len as usize / 8);
        let use_bytes = |bytes: &[u8], buf: &mut Vec<u8>, table: &mut Vec<u64>| {
            if what == "l2_table" {
                decode(bytes, table);
                black_box(&table);
            } else {
                buf.copy_from_slice(bytes);
                black_box(&buf);
            }
        };
        let mut offsets = Offsets(1);
        group.bench_function(format!("{what}/pread"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let at = offsets.next(len);
                    file.read_exact_at(&mut buf, at).expect("reading");
                    if what == "l2_table" {
                        decode(&buf, &mut table);
                        black_box(&table);
                    }
                }
                black_box(&buf);
            })
        });
        let mut offsets = Offsets(1);
        group.bench_function(format!("{what}/mapped"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let at = offsets.next(len) as usize;
                    use_bytes(&mapped[at..at + len as usize], &mut buf, &mut table);
                }
            })
        });
        let mut offsets = Offsets(1);
        group.bench_function(format!("{what}/fresh"), |b| {
            b.iter(|| {
                let fresh = map(&file);
                for _ in 0..BATCH {
                    let at = offsets.next(len) as usize;
                    use_bytes(&fresh[at..at + len as usize], &mut buf, &mut table);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, io_paths);
criterion_main!(benches);
