//! Test helpers shared by the integration tests: make images with `qemu-img` and `qemu-io`
//! in a temporary directory, get the reference bytes QEMU reads (`qemu-img convert -O raw`),
//! compare them with what the library reads, and damage named header fields.
//!
//! Every helper fails loudly: a tool that exits non-zero panics with its command line and
//! stderr, so a broken fixture is never mistaken for a library bug.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod bitmaps;
pub mod holder;
pub mod ops;
pub mod power;

use qcow2_engine::{Chain, ChainRun, Layer, Mapping};

/// A temporary directory that the QEMU tools run in (so relative backing names work).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch::new()
    }
}

impl Scratch {
    /// A fresh empty directory, removed on drop.
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("qcow2-engine-test")
                .tempdir()
                .expect("creating a temporary directory"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `program args...` in the directory; panics with stderr unless it succeeds.
    /// Returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.output(program, args);
        if !out.status.success() {
            panic!(
                "`{program} {}` failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
            );
        }
        String::from_utf8(out.stdout).expect("tool output is UTF-8")
    }

    pub fn output(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new(program)
            .args(args)
            .current_dir(self.dir())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is QEMU installed?)"))
    }

    /// `qemu-img args...`; returns stdout.
    pub fn qemu_img(&self, args: &[&str]) -> String {
        self.run("qemu-img", args)
    }

    /// Creates a qcow2 image `name` of `size` bytes with `-o options` (may be empty).
    pub fn create(&self, name: &str, options: &str, size: u64) {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([name, &size]);
        self.qemu_img(&args);
    }

    /// Creates a qcow2 overlay `name` on `backing` (of format `backing_format`); its size is
    /// the backing file's unless given.
    pub fn create_overlay(
        &self,
        name: &str,
        backing: &str,
        backing_format: &str,
        options: &str,
        size: Option<u64>,
    ) {
        let size = size.map(|s| s.to_string());
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            backing_format,
        ];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.push(name);
        if let Some(size) = &size {
            args.push(size);
        }
        self.qemu_img(&args);
    }

    /// Runs qemu-io commands (`write -P 1 0 4k`, ...) on `name` opened as `format`, all in
    /// one process.
    pub fn qemu_io(&self, name: &str, format: &str, commands: &[String]) {
        if commands.is_empty() {
            return;
        }
        let mut args = vec!["-f", format];
        for c in commands {
            args.extend(["-c", c.as_str()]);
        }
        args.push(name);
        // qemu-io exits non-zero when any command fails.
        self.run("qemu-io", &args);
    }

    /// Writes a file with `bytes`.
    pub fn write_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).expect("writing a fixture file");
    }

    /// What QEMU reads from `name` (opened as `format`; a file name or a `json:` spec),
    /// through its backing chain: `qemu-img convert -O raw`.
    pub fn reference(&self, name: &str, format: &str) -> Vec<u8> {
        let out = "reference.raw";
        self.qemu_img(&["convert", "-f", format, "-O", "raw", name, out]);
        let bytes = std::fs::read(self.path(out)).expect("reading the raw conversion");
        std::fs::remove_file(self.path(out)).expect("removing the raw conversion");
        bytes
    }

    /// `qemu-img map --output=json` of `name` through its chain.
    pub fn map(&self, name: &str, format: &str) -> Vec<MapEntry> {
        let json = self.qemu_img(&["map", "-f", format, "--output=json", name]);
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("bad map JSON ({e}):\n{json}"))
    }

    /// Opens `name` and its chain with the library; panics with the error message.
    pub fn open(&self, name: &str) -> Chain {
        Chain::open(self.path(name)).unwrap_or_else(|e| panic!("opening {name}: {e}"))
    }

    /// Shortens (or extends) `name` to `len` bytes.
    pub fn truncate(&self, name: &str, len: u64) {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .and_then(|f| f.set_len(len))
            .expect("truncating a fixture");
    }

    /// Reads a big-endian u64 at `offset` of the file `name`.
    pub fn read_u64(&self, name: &str, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        std::fs::File::open(self.path(name))
            .and_then(|f| f.read_exact_at(&mut b, offset))
            .expect("reading a fixture");
        u64::from_be_bytes(b)
    }
}

impl Scratch {
    /// Writes a big-endian u64 at `offset` of the file `name`.
    pub fn write_u64(&self, name: &str, offset: u64, value: u64) {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .and_then(|f| f.write_all_at(&value.to_be_bytes(), offset))
            .expect("patching a fixture");
    }

    /// The file offset of the L2 entry mapping guest `offset` of the qcow2 image `name`,
    /// found from its header and L1 table; `None` when no L2 table maps it. Reads the
    /// header fields by name, independently of the library.
    pub fn l2_entry_location(&self, name: &str, offset: u64) -> Option<u64> {
        let path = self.path(name);
        let cluster_bits = read_header_field(&path, HeaderField::ClusterBits);
        let version = read_header_field(&path, HeaderField::Version);
        let extended = version >= 3
            && read_header_field(&path, HeaderField::IncompatibleFeatures) & (1 << 4) != 0;
        let entry_bytes = if extended { 16 } else { 8 };
        let l2_entries = (1u64 << cluster_bits) / entry_bytes;
        let cluster = offset >> cluster_bits;
        let l1_table = read_header_field(&path, HeaderField::L1TableOffset);
        let l1_entry = self.read_u64(name, l1_table + 8 * (cluster / l2_entries));
        let l2_table = l1_entry & L1_OFFSET_MASK;
        (l2_table != 0).then(|| l2_table + entry_bytes * (cluster % l2_entries))
    }
}

/// Bits 9-55 of an L1 entry: the L2 table's offset (spec: "Cluster mapping").
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    #[serde(default)]
    pub compressed: bool,
    pub offset: Option<u64>,
}

/// The fixed header fields of the spec ("Header"), named so that a test damages a field
/// by name instead of patching a magic offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderField {
    Magic,
    Version,
    BackingFileOffset,
    BackingFileSize,
    ClusterBits,
    Size,
    CryptMethod,
    L1Size,
    L1TableOffset,
    RefcountTableOffset,
    RefcountTableClusters,
    NbSnapshots,
    SnapshotsOffset,
    IncompatibleFeatures,
    CompatibleFeatures,
    AutoclearFeatures,
    RefcountOrder,
    HeaderLength,
    CompressionType,
}

impl HeaderField {
    /// Byte offset and width of the field (spec: "Header").
    pub fn location(self) -> (u64, usize) {
        use HeaderField::*;
        match self {
            Magic => (0, 4),
            Version => (4, 4),
            BackingFileOffset => (8, 8),
            BackingFileSize => (16, 4),
            ClusterBits => (20, 4),
            Size => (24, 8),
            CryptMethod => (32, 4),
            L1Size => (36, 4),
            L1TableOffset => (40, 8),
            RefcountTableOffset => (48, 8),
            RefcountTableClusters => (56, 4),
            NbSnapshots => (60, 4),
            SnapshotsOffset => (64, 8),
            IncompatibleFeatures => (72, 8),
            CompatibleFeatures => (80, 8),
            AutoclearFeatures => (88, 8),
            RefcountOrder => (96, 4),
            HeaderLength => (100, 4),
            CompressionType => (104, 1),
        }
    }
}

/// Reads a header field of the qcow2 file at `path`.
pub fn read_header_field(path: &Path, field: HeaderField) -> u64 {
    let (offset, width) = field.location();
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut b[8 - width..], offset))
        .unwrap_or_else(|e| panic!("reading {field:?} of {}: {e}", path.display()));
    u64::from_be_bytes(b)
}

/// Rewrites a header field of the qcow2 file at `path` (big-endian, the field's width).
pub fn write_header_field(path: &Path, field: HeaderField, value: u64) {
    let (offset, width) = field.location();
    assert!(
        width == 8 || value >> (8 * width) == 0,
        "{value:#x} does not fit {field:?}"
    );
    let bytes = value.to_be_bytes();
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(&bytes[8 - width..], offset))
        .unwrap_or_else(|e| panic!("writing {field:?} of {}: {e}", path.display()));
}

/// A small deterministic generator (splitmix64), so fixtures are varied but reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Name of a file of random bytes that `write -s` copies from (made by [`source_file`]).
pub const SOURCE: &str = "source.bin";

/// Makes [`SOURCE`] in `scratch`: `len` random bytes, so that `write -s` writes data whose
/// every position differs (a read from a wrong offset cannot match by luck).
pub fn source_file(scratch: &Scratch, seed: u64, len: usize) {
    scratch.write_file(SOURCE, &Rng::new(seed).bytes(len));
}

/// `count` random qemu-io commands for an image of `size` bytes with `cluster` byte
/// clusters: pattern writes (`pattern` and up), writes of non-repeating data from
/// [`SOURCE`] (which must hold `source_len` bytes), zero writes with and without unmap,
/// and discards, at unaligned offsets and lengths that often cross cluster boundaries.
pub fn random_ops(
    rng: &mut Rng,
    size: u64,
    cluster: u64,
    source_len: u64,
    pattern: u8,
    count: usize,
) -> Vec<String> {
    let mut ops = Vec::with_capacity(count);
    if size == 0 {
        return ops;
    }
    for i in 0..count {
        let max_len = (3 * cluster).clamp(1, size);
        let (off, len) = match rng.below(3) {
            // Unaligned anywhere.
            0 => {
                let off = rng.below(size);
                (off, 1 + rng.below(max_len.min(size - off)))
            }
            // Cluster aligned.
            1 => {
                let clusters = size.div_ceil(cluster);
                let off = rng.below(clusters) * cluster;
                let len = (cluster * (1 + rng.below(2))).min(size - off);
                (off, len)
            }
            // Straddling a cluster boundary.
            _ => {
                let boundary = cluster * (1 + rng.below(size.div_ceil(cluster)));
                let before = 1 + rng.below(cluster.min(boundary));
                let off = boundary - before;
                if off >= size {
                    (size - 1, 1)
                } else {
                    (off, (before + rng.below(cluster)).min(size - off).max(1))
                }
            }
        };
        let op = match rng.below(8) {
            0..=2 => format!("write -P {} {off} {len}", pattern.wrapping_add(i as u8) | 1),
            3 | 4 if len <= source_len => format!("write -s {SOURCE} {off} {len}"),
            3 | 4 => format!("write -P {} {off} {len}", pattern),
            5 => format!("write -z {off} {len}"),
            6 => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        ops.push(op);
    }
    ops
}

/// Reads all of `chain` with [`Chain::read_at`] in one call and in chunks of several odd
/// sizes, and asserts every byte equals `expected`. `label` names the case in failures.
pub fn assert_reads_match(chain: &Chain, expected: &[u8], label: &str) {
    assert_eq!(
        chain.size(),
        expected.len() as u64,
        "{label}: virtual size differs from QEMU's"
    );
    let mut whole = vec![0xa5u8; expected.len()];
    chain
        .read_at(&mut whole, 0)
        .unwrap_or_else(|e| panic!("{label}: reading the whole image: {e}"));
    assert_same(chain, &whole, expected, 0, &format!("{label} (one read)"));
    let mut chunk = vec![0u8; 3 * 65536 + 1];
    for size in [511usize, 4097, 3 * 65536 + 1] {
        let mut off = 0usize;
        while off < expected.len() {
            let n = size.min(expected.len() - off);
            let buf = &mut chunk[..n];
            buf.fill(0x5a);
            chain
                .read_at(buf, off as u64)
                .unwrap_or_else(|e| panic!("{label}: read of {n} at {off:#x}: {e}"));
            assert_same(
                chain,
                buf,
                &expected[off..off + n],
                off as u64,
                &format!("{label} ({size}-byte reads)"),
            );
            off += n;
        }
    }
}

/// Asserts `got == expected` (bytes read at guest `offset`); on a difference, says where
/// and which run of the chain covers it.
pub fn assert_same(chain: &Chain, got: &[u8], expected: &[u8], offset: u64, label: &str) {
    if got == expected {
        return;
    }
    let at = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    let guest = offset + at as u64;
    let run = chain.runs(guest, 1).next();
    let end = (at + 16).min(got.len()).min(expected.len());
    panic!(
        "{label}: first difference at guest offset {guest:#x}\n  got      {:02x?}\n  expected \
         {:02x?}\n  run: {run:?}",
        &got[at..end],
        &expected[at..end],
    );
}

/// Asserts that [`Chain::runs`] tiles the whole image: contiguous, non-empty, in order.
pub fn assert_runs_tile(chain: &Chain, label: &str) -> Vec<ChainRun> {
    let runs: Vec<ChainRun> = chain
        .runs(0, chain.size())
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{label}: resolving runs: {e}"));
    let mut pos = 0;
    for r in &runs {
        assert_eq!(
            r.offset, pos,
            "{label}: runs leave a gap or overlap at {pos:#x}"
        );
        assert!(r.len > 0, "{label}: empty run at {pos:#x}");
        assert!(
            r.depth < chain.layers().len(),
            "{label}: depth out of range"
        );
        pos = r.end();
    }
    assert_eq!(pos, chain.size(), "{label}: runs stop short of the end");
    runs
}

/// Compares [`Chain::runs`] with `qemu-img map`: ranges QEMU reports as data at depth d
/// resolve to data at depth d at the same host offset (or to a compressed cluster at depth
/// d); zero clusters of a qcow2 layer resolve to zero at that depth; ranges QEMU calls
/// absent read as unallocated.
pub fn assert_map_agrees(chain: &Chain, map: &[MapEntry], label: &str) {
    let mut covered = 0;
    for e in map {
        assert_eq!(e.start, covered, "{label}: qemu map has a gap");
        covered = e.start + e.length;
        let layer = chain.layers().get(e.depth);
        for run in chain.runs(e.start, e.length) {
            let run = run.unwrap_or_else(|e| panic!("{label}: resolving runs: {e}"));
            let fail = |what: &str| -> ! {
                let mut msg = String::new();
                let _ = write!(msg, "{label}: {what}\n  qemu: {e:?}\n  ours: {run:?}");
                panic!("{msg}");
            };
            if e.data && e.compressed {
                if run.depth != e.depth || !matches!(run.mapping, Mapping::Compressed(_)) {
                    fail("qemu says compressed data");
                }
            } else if e.data {
                let host = e.offset.expect("data has an offset") + (run.offset - e.start);
                if run.depth != e.depth
                    || !matches!(run.mapping, Mapping::Data { host: h, .. } if h == host)
                {
                    fail("qemu says data at this depth and host offset");
                }
            } else if e.present && e.zero && matches!(layer, Some(Layer::Qcow2(_))) {
                if run.depth != e.depth || !matches!(run.mapping, Mapping::Zero { .. }) {
                    fail("qemu says a zero cluster at this depth");
                }
            } else if !e.present && run.mapping != Mapping::Unallocated {
                fail("qemu says no layer allocates this range");
            }
        }
    }
    assert_eq!(
        covered,
        chain.size(),
        "{label}: qemu map does not cover the image"
    );
}

/// Everything one matrix case checks: bytes against `qemu-img convert`, runs tiling the
/// image, and (when `check_map`) runs against `qemu-img map`.
pub fn verify(scratch: &Scratch, top: &str, format: &str, check_map: bool, label: &str) {
    let expected = scratch.reference(top, format);
    let chain = scratch.open(top);
    assert_reads_match(&chain, &expected, label);
    assert_runs_tile(&chain, label);
    if check_map {
        let map = scratch.map(top, format);
        assert_map_agrees(&chain, &map, label);
    }
}

/// The virtual size of the chains [`merge_chain`] builds.
pub const MERGE_SIZE: u64 = 8 << 20;

/// base <- mid <- top with random writes, zero writes and discards in every layer, in
/// two directories `ours/` and `qemu/` holding identical copies.
pub fn merge_chain(s: &Scratch, options: &str, seed: u64) {
    let mut rng = Rng::new(seed);
    source_file(s, seed, 256 * 1024);
    s.create("base.qcow2", options, MERGE_SIZE);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 0x11 0 3M".into()]);
    let ops = random_ops(&mut rng, MERGE_SIZE, 64 * 1024, 256 * 1024, 0x20, 40);
    s.qemu_io("base.qcow2", "qcow2", &ops);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", options, None);
    let ops = random_ops(&mut rng, MERGE_SIZE, 64 * 1024, 256 * 1024, 0x60, 40);
    s.qemu_io("mid.qcow2", "qcow2", &ops);
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", options, None);
    let ops = random_ops(&mut rng, MERGE_SIZE, 64 * 1024, 256 * 1024, 0xa0, 40);
    s.qemu_io("top.qcow2", "qcow2", &ops);
    for dir in ["ours", "qemu"] {
        std::fs::create_dir_all(s.path(dir)).unwrap();
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            std::fs::copy(s.path(f), s.path(dir).join(f)).unwrap();
        }
    }
}

/// `qemu-img check PATH` (relative to the scratch directory) reports a clean image.
pub fn assert_check_clean(s: &Scratch, path: &str) {
    let out = s.output("qemu-img", &["check", path]);
    assert!(
        out.status.success(),
        "qemu-img check {path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare A B` finds the same visible content.
pub fn assert_same_content(s: &Scratch, a: &str, b: &str) {
    let out = s.output("qemu-img", &["compare", a, b]);
    assert!(
        out.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The backing file name PATH stores (`backing-filename` of `qemu-img info`).
pub fn backing_of(s: &Scratch, path: &str) -> Option<String> {
    let out = s.qemu_img(&["info", "--output=json", path]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_owned)
}

/// The `qimg` example, built once per test binary with `cargo build --example qimg`.
pub fn qimg_path() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--example", "qimg"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the qimg example failed");
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/examples/qimg")
    })
}

impl Scratch {
    /// Runs `qimg args...` in the directory and returns its output, whatever its status.
    pub fn qimg_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(qimg_path())
            .args(args)
            .current_dir(self.dir())
            .output()
            .expect("running qimg")
    }

    /// Runs `qimg args...`; panics with stderr unless it succeeds. Returns stdout.
    pub fn qimg(&self, args: &[&str]) -> String {
        let out = self.qimg_output(args);
        if !out.status.success() {
            panic!(
                "`qimg {}` failed ({}):\n--- stderr ---\n{}\n--- stdout ---\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
            );
        }
        String::from_utf8(out.stdout).expect("qimg output is UTF-8")
    }

    /// Panics unless `qemu-img check` finds `name` clean (no corruption, no leak).
    pub fn assert_clean(&self, name: &str, label: &str) {
        let out = self.output("qemu-img", &["check", name]);
        assert!(
            out.status.success(),
            "{label}: qemu-img check {name} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Panics unless `qemu-img compare` finds `a` and `b` equal in content.
    pub fn assert_same_content(&self, a: &str, b: &str, label: &str) {
        let out = self.output("qemu-img", &["compare", a, b]);
        assert!(
            out.status.success(),
            "{label}: qemu-img compare {a} {b} ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Copies `from` to `to` inside the directory.
    pub fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to)).expect("copying a fixture");
    }
}

/// Asserts that a failed command said one thing on one line of stderr and exited non-zero.
pub fn assert_one_line_failure(out: &std::process::Output, label: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{label}: succeeded");
    assert_ne!(out.status.code(), None, "{label}: killed by a signal");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{label}: stderr is not one line:\n{stderr}"
    );
}

/// Runs the `qimg` example (built once per test binary) in `dir`.
pub fn qimg(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(qimg_path())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running qimg")
}
