//! Read throughput through a three-layer backing chain.
//!
//! Setup (outside every measurement) builds `base <- mid <- top` with `qemu-img` and
//! `qemu-io` in a temporary directory: 256 MiB virtual, 64 KiB clusters, scattered writes
//! in every layer (plus zeroed ranges in the overlays), so reads resolve through all three
//! layers and host layout is fragmented. The same chain is then benched twice: opened from
//! the files (page cache warm after the first pass) and held in memory (`MemStorage`), which
//! isolates the engine's own cost from the kernel's.
//!
//! Benchmarks: `random_4k` (4 KiB reads at random 4 KiB-aligned offsets) and `seq_1m`
//! (1 MiB reads walking the disk front to back, wrapping around). Throughput is in bytes.
//!
//! `cargo bench --bench read` for the full run;
//! `cargo bench --bench read -- --warm-up-time 1 --measurement-time 2` for a short one.

use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qcow2_engine::storage::MemStorage;
use qcow2_engine::{Chain, Image, ImageOptions, Layer};

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

/// qemu-io commands for one layer: scattered runs of 1-32 clusters covering about
/// `dirty_permille` of the disk, a few zeroed runs in overlays, distinct patterns per layer.
fn layer_commands(seed: u64, dirty_permille: u64, overlay: bool, pattern_base: u64) -> String {
    let mut rng = Rng(seed);
    let mut out = String::new();
    let target = CLUSTERS * dirty_permille / 1000;
    let mut done = 0;
    while done < target {
        let len = 1 + rng.below(32);
        let start = rng.below(CLUSTERS - len + 1);
        let pattern = pattern_base + rng.below(64);
        if overlay && rng.below(10) == 0 {
            out += &format!("write -q -z {} {}\n", start * CLUSTER, len * CLUSTER);
        } else {
            out += &format!(
                "write -q -P {pattern} {} {}\n",
                start * CLUSTER,
                len * CLUSTER
            );
        }
        done += len;
    }
    out
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("running qemu-img (is QEMU installed?)");
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn qemu_io(image: &Path, commands: &str) {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running qemu-io (is QEMU installed?)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "qemu-io on {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `base <- mid <- top` in `dir`.
fn build_chain(dir: &Path) {
    let create = |name: &str, backing: Option<&str>| {
        let mut cmd = Command::new("qemu-img");
        cmd.current_dir(dir)
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]);
        if let Some(b) = backing {
            cmd.args(["-b", b, "-F", "qcow2"]);
        }
        cmd.arg(name).arg(VIRTUAL_SIZE.to_string());
        run(&mut cmd);
    };
    create("base.qcow2", None);
    qemu_io(&dir.join("base.qcow2"), &layer_commands(1, 500, false, 1));
    create("mid.qcow2", Some("base.qcow2"));
    qemu_io(&dir.join("mid.qcow2"), &layer_commands(2, 250, true, 80));
    create("top.qcow2", Some("mid.qcow2"));
    qemu_io(&dir.join("top.qcow2"), &layer_commands(3, 250, true, 160));
}

/// The chain in `dir` with every layer's bytes held in memory.
fn memory_chain(dir: &Path) -> Chain {
    let layers = ["top.qcow2", "mid.qcow2", "base.qcow2"]
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            let storage = Box::new(MemStorage::from_bytes(bytes));
            Image::from_storage(storage, name, &ImageOptions::default(), None).map(Layer::Qcow2)
        })
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    Chain::from_layers(layers).unwrap()
}

/// Guards the numbers: the chain must read exactly what `qemu-img convert` produces.
fn check_against_qemu(dir: &Path, chain: &Chain) {
    run(Command::new("qemu-img").current_dir(dir).args([
        "convert",
        "-O",
        "raw",
        "top.qcow2",
        "expected.raw",
    ]));
    let expected = std::fs::read(dir.join("expected.raw")).unwrap();
    std::fs::remove_file(dir.join("expected.raw")).unwrap();
    let mut got = vec![0u8; VIRTUAL_SIZE as usize];
    chain.read_at(&mut got, 0).unwrap();
    assert!(
        got == expected,
        "chain content differs from qemu-img convert"
    );
}

fn bench_chain(c: &mut Criterion, storage: &str, chain: &Chain) {
    let mut group = c.benchmark_group("read");

    // A fixed set of random 4 KiB-aligned offsets, cycled through.
    let mut rng = Rng(42);
    let offsets: Vec<u64> = (0..4096)
        .map(|_| rng.below(VIRTUAL_SIZE / 4096) * 4096)
        .collect();
    let mut buf = vec![0u8; 4096];
    let mut i = 0;
    group.throughput(Throughput::Bytes(4096));
    group.bench_function(BenchmarkId::new("random_4k", storage), |b| {
        b.iter(|| {
            let off = offsets[i % offsets.len()];
            i += 1;
            chain.read_at(&mut buf, off).unwrap();
            black_box(&buf);
        })
    });

    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function(BenchmarkId::new("seq_1m", storage), |b| {
        b.iter(|| {
            chain.read_at(&mut buf, off).unwrap();
            black_box(&buf);
            off = (off + (1 << 20)) % VIRTUAL_SIZE;
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());

    let chain = Chain::open(dir.path().join("top.qcow2")).unwrap();
    assert_eq!(chain.layers().len(), 3);
    check_against_qemu(dir.path(), &chain);
    bench_chain(c, "file", &chain);

    let chain = memory_chain(dir.path());
    bench_chain(c, "mem", &chain);
}

criterion_group!(read, benches);
criterion_main!(read);
