//! Hostile images (issue #6): images made by qemu-img, then damaged field by field and by
//! seeded random byte flips, and backing chains that loop, run 1000 deep or point at a
//! directory, a device, a FIFO or nothing.
//!
//! Every read-only qimg command runs on each case as a subprocess, under a timeout and an
//! address-space limit, and must:
//! - exit with a code below 101 (no panic, no signal, no hang);
//! - on failure print exactly one line on stderr, `qimg: ...`, naming a file;
//! - leave every file of the case byte for byte unchanged;
//! - when `convert -O raw` succeeds and `qemu-img convert -O raw` does too, produce the same
//!   bytes. (The one difference the suite found, a virtual size that is not a whole number
//!   of sectors, was ours to fix: QEMU counts sectors.) qimg may refuse what qemu-img
//!   reads, with a clear error: reserved bits set in L2 entries, data clusters past the
//!   end of the file, a header extension that is cut or repeated, a NUL in a backing file
//!   name... The report counts those cases by category.
//!
//! The damage is described by name (a header field, an extension, an L1 or L2 entry, a
//! snapshot table field) from a layout parsed here independently of the library, so each
//! case says what it broke. The library-level tests at the end check the limits that keep
//! memory bounded by the file's real size, with a counting allocator.
//!
//! `cargo test --test hostile -- --nocapture` prints the report: cases per category, the
//! cases qemu-img reads and qimg refuses (with qimg's error; `HOSTILE_ALL=1` lists them
//! all), the slowest cases. `HOSTILE_FILTER=text` runs only the cases whose label holds
//! `text`. Needs qemu-img, qemu-io, timeout, prlimit and mkfifo.

mod common;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{HeaderField, Rng, Scratch, qimg_path};

// ---------------------------------------------------------------------------------------
// The rules every qimg run must keep.

/// Seconds a command may take before it counts as hung (it is killed).
const TIMEOUT_SECS: u32 = 10;
/// Address space a command may use: generous for the largest legitimate tables (a 32 MiB
/// L1 table, a 64 MiB snapshot table) and threads, far below what an image claiming
/// exabytes would make an unchecked allocation ask for.
const ADDRESS_SPACE: u64 = 1 << 30;

/// The read-only commands run on every case (the list, then `snapshot -l` and
/// `measure`, which only read too); `{img}` is the case's image, `{out}` a file in a
/// directory of its own.
const COMMANDS: &[&[&str]] = &[
    &["info", "{img}"],
    &["info", "--output=json", "{img}"],
    &["info", "--backing-chain", "--output=json", "{img}"],
    &["map", "{img}"],
    &["map", "--output=json", "{img}"],
    &["checksum", "{img}"],
    &["compare", "{img}", "{img}"],
    &["convert", "-O", "raw", "{img}", "{out}"],
    &["io", "-c", "read 0 64k", "{img}"],
    &["snapshot", "-l", "{img}"],
    &["measure", "-O", "qcow2", "{img}"],
];

/// What a case must end in, beyond the rules every case keeps.
#[derive(Debug, Clone)]
enum Expect {
    /// Anything the rules allow.
    Any,
    /// Every command succeeds.
    Success,
    /// Every command that opens the backing chain fails, saying this. (`info` without
    /// `--backing-chain` does not open it.)
    ChainFails(&'static str),
    /// Every command fails, saying this.
    Fails(&'static str),
}

type Setup = Box<dyn Fn(&Path) -> String + Send + Sync>;

/// One hostile case: `setup` writes its files into an empty directory and returns the
/// name of the image the commands get.
struct Case {
    label: String,
    setup: Setup,
    /// Global options given before the command (`--confine-backing DIR`, ...), with
    /// `{dir}` standing for the case directory.
    global: Vec<String>,
    expect: Expect,
    /// Compare `convert -O raw` with qemu-img's.
    against_qemu: bool,
}

impl Case {
    fn new(label: impl Into<String>, setup: Setup) -> Case {
        Case {
            label: label.into(),
            setup,
            global: Vec::new(),
            expect: Expect::Any,
            against_qemu: true,
        }
    }
    fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }
    fn global(mut self, args: &[&str]) -> Case {
        self.global = args.iter().map(|s| s.to_string()).collect();
        self
    }
    fn without_qemu(mut self) -> Case {
        self.against_qemu = false;
        self
    }
}

/// Tallies of what the suite saw, for the final report.
#[derive(Default)]
struct Tally {
    runs: usize,
    failed_runs: usize,
    qemu_compared: usize,
    qemu_refused: usize,
    failures: Vec<String>,
    /// The slowest cases and their time.
    slowest: Vec<(Duration, String)>,
    /// Cases qemu-img converts and qimg refuses (with qimg's error), by category.
    qemu_only: std::collections::BTreeMap<&'static str, Vec<String>>,
    /// Cases and time per category.
    categories: std::collections::BTreeMap<&'static str, (usize, Duration)>,
}

/// The category a case label belongs to, for the report.
fn category(label: &str) -> &'static str {
    const CATEGORIES: &[(&str, &str)] = &[
        ("confine:", "backing confinement options"),
        ("chain:", "backing chains"),
        ("undamaged", "undamaged fixtures"),
        ("header ", "header fields"),
        ("extension", "header extensions"),
        ("end marker", "header extensions"),
        ("first cluster full", "header extensions"),
        ("backing format", "header extensions"),
        ("bitmaps extension", "header extensions"),
        ("feature table", "header extensions"),
        ("extension header", "header extensions"),
        ("L1[", "L1 entries"),
        ("L2 entry", "L2 entries"),
        ("compressed", "compressed clusters"),
        ("refcount", "refcount table and blocks"),
        ("snapshot", "snapshot table"),
        ("cut at", "truncated files"),
        ("random flips", "random metadata flips"),
        ("backing name", "backing file names"),
        ("data file", "external data file"),
    ];
    CATEGORIES
        .iter()
        .find(|(key, _)| label.contains(key))
        .map(|&(_, name)| name)
        .unwrap_or("other")
}

/// Runs `qimg` with a timeout and an address-space limit.
fn run_limited(dir: &Path, args: &[String]) -> Output {
    Command::new("timeout")
        .arg("-s")
        .arg("KILL")
        .arg(TIMEOUT_SECS.to_string())
        .arg("prlimit")
        .arg(format!("--as={ADDRESS_SPACE}"))
        // The usual soft limit on open files: qimg raises it for deep chains.
        .arg("--nofile=1024:")
        .arg("--")
        .arg(qimg_path())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running timeout/prlimit/qimg")
}

/// The bytes of every regular file under `dir` (not following links), by name.
fn snapshot_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

/// Runs every command on one case and records what breaks the rules.
fn run_case(case: &Case, work: &Path, tally: &Mutex<Tally>) {
    let dir = work.join("case");
    let out_dir = work.join("out");
    for d in [&dir, &out_dir] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap();
    }
    let started = Instant::now();
    let img = (case.setup)(&dir);
    let before = snapshot_files(&dir);
    let out = out_dir.join("out.raw");
    let global: Vec<String> = case
        .global
        .iter()
        .map(|g| g.replace("{dir}", &dir.display().to_string()))
        .collect();
    let mut failures = Vec::new();
    let mut failed_runs = 0;
    let mut convert_ok = false;
    let mut convert_error = String::new();
    for command in COMMANDS {
        let mut args = global.clone();
        args.extend(command.iter().map(|a| {
            a.replace("{img}", &img)
                .replace("{out}", &out.display().to_string())
        }));
        let shown = format!("qimg {}", args.join(" "));
        let run_started = Instant::now();
        let output = run_limited(&dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let mut fail = |what: String| failures.push(format!("{}: `{shown}`: {what}", case.label));
        let Some(code) = output.status.code() else {
            fail(format!("killed by a signal ({})", output.status));
            continue;
        };
        if code == 137 || (code >= 124 && run_started.elapsed().as_secs() >= TIMEOUT_SECS.into()) {
            fail(format!("timed out or killed (exit {code}): {stderr}"));
            continue;
        }
        if code >= 101 {
            fail(format!("exit code {code}: {stderr}"));
            continue;
        }
        if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
            fail(format!("panic text on stderr: {stderr}"));
        }
        let is_compare = command[0] == "compare";
        // `info` alone and `snapshot -l` look at the image only, as in qemu-img.
        let opens_chain = match command[0] {
            "info" => command.contains(&"--backing-chain"),
            "snapshot" => false,
            _ => true,
        };
        if code == 0 || (is_compare && code == 1) {
            if is_compare && code == 1 {
                fail("compare says an image differs from itself".into());
            }
            if !stderr.is_empty() {
                fail(format!("succeeded but wrote to stderr: {stderr}"));
            }
            if command[0] == "convert" {
                convert_ok = true;
            }
            match &case.expect {
                Expect::Fails(what) => fail(format!("succeeded; expected an error about {what}")),
                Expect::ChainFails(what) if opens_chain => {
                    fail(format!("succeeded; expected an error about {what}"))
                }
                _ => {}
            }
        } else {
            failed_runs += 1;
            if command[0] == "convert" {
                convert_error = stderr.trim_end().to_string();
            }
            let lines: Vec<&str> = stderr.lines().collect();
            if lines.len() != 1 {
                fail(format!("error is not one line:\n{stderr}"));
            } else if !lines[0].starts_with("qimg: ") {
                fail(format!("error does not start with 'qimg: ': {stderr}"));
            } else if !names_a_file(lines[0], &img) {
                fail(format!("error names no file: {stderr}"));
            }
            if is_compare && code != 2 {
                fail(format!("compare failed with {code}, not 2"));
            }
            match &case.expect {
                // qemu-img map's human output cannot show compressed clusters either.
                Expect::Success
                    if command == &["map", "{img}"] && stderr.contains("compressed clusters") => {}
                Expect::Success => fail(format!("failed; expected success: {stderr}")),
                Expect::Fails(what) | Expect::ChainFails(what) if !stderr.contains(what) => {
                    fail(format!("error does not say {what:?}: {stderr}"))
                }
                _ => {}
            }
        }
    }
    let after = snapshot_files(&dir);
    if before != after {
        let changed: Vec<String> = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0.display().to_string())
            .collect();
        failures.push(format!(
            "{}: read-only commands changed files: {changed:?} ({} files before, {} after)",
            case.label,
            before.len(),
            after.len()
        ));
    }
    let mut compared = false;
    let mut refused = false;
    let mut qemu_only = false;
    if case.against_qemu {
        let qemu_out = out_dir.join("qemu.raw");
        let q = Command::new("timeout")
            .args(["-s", "KILL", "20", "qemu-img", "convert", "-O", "raw"])
            .arg(&img)
            .arg(&qemu_out)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("running qemu-img");
        match (convert_ok, q.status.success()) {
            (true, true) => {
                compared = true;
                if !same_file_content(&out, &qemu_out) {
                    failures.push(format!(
                        "{}: convert -O raw differs from qemu-img's conversion",
                        case.label
                    ));
                }
            }
            (true, false) => refused = true,
            // We may refuse what QEMU reads, with a clear error (checked above).
            (false, true) => qemu_only = true,
            (false, false) => {}
        }
    }
    let mut t = tally.lock().unwrap();
    let entry = t.categories.entry(category(&case.label)).or_default();
    entry.0 += 1;
    entry.1 += started.elapsed();
    t.slowest.push((started.elapsed(), case.label.clone()));
    t.slowest.sort_by(|a, b| b.cmp(a));
    t.slowest.truncate(5);
    t.runs += COMMANDS.len();
    t.failed_runs += failed_runs;
    t.qemu_compared += usize::from(compared);
    t.qemu_refused += usize::from(refused);
    if qemu_only {
        t.qemu_only
            .entry(category(&case.label))
            .or_default()
            .push(format!("{} ({convert_error})", case.label));
    }
    t.failures.extend(failures);
}

/// Whether an error line names a file: the image, or any path or image-like name.
fn names_a_file(line: &str, img: &str) -> bool {
    let body = &line["qimg: ".len()..];
    body.contains(img) || body.contains('/') || body.contains(".qcow2") || body.contains(".raw")
}

/// Whether two raw files have the same length and bytes: `qemu-img compare`, which skips
/// holes (a conversion may be a sparse file of hundreds of GiB). Not `-s`: that also
/// compares which ranges are holes.
fn same_file_content(a: &Path, b: &Path) -> bool {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    len(a) == len(b)
        && Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .args([a, b])
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------
// Fixtures: valid images made by qemu-img, and their layout read independently.

/// A valid image (and the files it needs), made once by qemu-img.
struct Fixture {
    name: &'static str,
    /// The image's bytes.
    bytes: Vec<u8>,
    /// Other files the image needs (a backing file, a data file), by name.
    others: Vec<(String, Vec<u8>)>,
    layout: Layout,
}

impl Fixture {
    fn load(s: &Scratch, name: &'static str, file: &str, others: &[&str]) -> Arc<Fixture> {
        let bytes = std::fs::read(s.path(file)).unwrap();
        let layout = Layout::parse(&bytes);
        Arc::new(Fixture {
            name,
            bytes,
            others: others
                .iter()
                .map(|o| (o.to_string(), std::fs::read(s.path(o)).unwrap()))
                .collect(),
            layout,
        })
    }
}

/// The image name every fixture case writes.
const IMG: &str = "img.qcow2";

/// A case: `fixture` with `damage` applied to the image's bytes.
fn damaged(
    fixture: &Arc<Fixture>,
    what: impl Into<String>,
    damage: impl Fn(&mut Vec<u8>) + Send + Sync + 'static,
) -> Case {
    let f = fixture.clone();
    Case::new(
        format!("{}: {}", fixture.name, what.into()),
        Box::new(move |dir| {
            for (name, bytes) in &f.others {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            let mut bytes = f.bytes.clone();
            damage(&mut bytes);
            std::fs::write(dir.join(IMG), bytes).unwrap();
            IMG.to_string()
        }),
    )
}

fn get(b: &[u8], at: u64, width: usize) -> u64 {
    let at = at as usize;
    b.get(at..at + width)
        .map(|s| s.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
        .unwrap_or(0)
}

fn put(b: &mut Vec<u8>, at: u64, width: usize, value: u64) {
    let at = at as usize;
    if b.len() < at + width {
        b.resize(at + width, 0);
    }
    for i in 0..width {
        b[at + i] = (value >> (8 * (width - 1 - i))) as u8;
    }
}

fn put_field(b: &mut Vec<u8>, field: HeaderField, value: u64) {
    let (at, width) = field.location();
    let value = if width == 8 {
        value
    } else {
        value & ((1 << (8 * width)) - 1)
    };
    put(b, at, width, value);
}

/// Bits 9-55: the offset in L1 entries, standard L2 entries and refcount table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where an image's structures are, read from its bytes by the spec alone.
#[derive(Debug, Clone, Default)]
struct Layout {
    cluster: u64,
    cluster_bits: u64,
    header_len: u64,
    extended_l2: bool,
    /// Extensions: offset of the 8-byte extension header, type, length.
    exts: Vec<(u64, u32, u32)>,
    /// Offset of the end marker, if there is one.
    end_marker: Option<u64>,
    l1_offset: u64,
    l1_entries: u64,
    /// L2 tables of the active L1 table.
    l2_tables: Vec<u64>,
    /// File offsets of non-zero L2 entries (the first word with extended L2).
    l2_entries: Vec<u64>,
    /// File offsets of compressed L2 entries.
    compressed: Vec<u64>,
    refcount_table: u64,
    refcount_table_bytes: u64,
    refcount_blocks: Vec<u64>,
    /// Snapshot table entries: offset, and their length.
    snapshots: Vec<(u64, u64)>,
    /// Snapshot L1 tables: offset and entries.
    snapshot_l1s: Vec<(u64, u64)>,
}

impl Layout {
    fn parse(b: &[u8]) -> Layout {
        let version = get(b, 4, 4);
        let cluster_bits = get(b, 20, 4);
        let cluster = 1u64 << cluster_bits;
        let header_len = if version >= 3 { get(b, 100, 4) } else { 72 };
        let extended_l2 = version >= 3 && get(b, 72, 8) & 16 != 0;
        let backing = get(b, 8, 8);
        let ext_end = if backing != 0 { backing } else { cluster };
        let mut l = Layout {
            cluster,
            cluster_bits,
            header_len,
            extended_l2,
            ..Layout::default()
        };
        let mut pos = header_len;
        while pos + 8 <= ext_end {
            let (kind, len) = (get(b, pos, 4) as u32, get(b, pos + 4, 4) as u32);
            if kind == 0 {
                l.end_marker = Some(pos);
                break;
            }
            l.exts.push((pos, kind, len));
            pos += 8 + u64::from(len).div_ceil(8) * 8;
        }
        l.l1_offset = get(b, 40, 8);
        l.l1_entries = get(b, 36, 4);
        let entry_bytes = if extended_l2 { 16 } else { 8 };
        let mut tables = BTreeSet::new();
        for i in 0..l.l1_entries {
            let l2 = get(b, l.l1_offset + 8 * i, 8) & OFFSET_MASK;
            if l2 != 0 {
                tables.insert(l2);
            }
        }
        l.l2_tables = tables.into_iter().collect();
        for &t in &l.l2_tables {
            for i in 0..cluster / entry_bytes {
                let at = t + i * entry_bytes;
                let e = get(b, at, 8);
                if e != 0 || (extended_l2 && get(b, at + 8, 8) != 0) {
                    l.l2_entries.push(at);
                }
                if e & 1 << 62 != 0 {
                    l.compressed.push(at);
                }
            }
        }
        l.refcount_table = get(b, 48, 8);
        l.refcount_table_bytes = get(b, 56, 4) * cluster;
        for i in 0..l.refcount_table_bytes / 8 {
            let block = get(b, l.refcount_table + 8 * i, 8);
            if block != 0 {
                l.refcount_blocks.push(block);
            }
        }
        let mut at = get(b, 64, 8);
        for _ in 0..get(b, 60, 4) {
            let len =
                (40 + get(b, at + 36, 4) + get(b, at + 12, 2) + get(b, at + 14, 2)).div_ceil(8) * 8;
            l.snapshots.push((at, len));
            l.snapshot_l1s.push((get(b, at, 8), get(b, at + 8, 4)));
            at += len;
        }
        l
    }

    /// The metadata ranges (offset, length) random flips land in.
    fn metadata(&self) -> Vec<(u64, u64)> {
        let ext_end = self
            .end_marker
            .map(|e| e + 8)
            .unwrap_or(self.header_len + 64);
        let mut r = vec![(0, ext_end), (self.l1_offset, self.l1_entries * 8)];
        r.extend(self.l2_tables.iter().map(|&t| (t, self.cluster)));
        r.push((self.refcount_table, self.refcount_table_bytes.min(4096)));
        r.extend(
            self.refcount_blocks
                .iter()
                .map(|&t| (t, self.cluster.min(4096))),
        );
        r.extend(self.snapshots.iter().copied());
        r.extend(self.snapshot_l1s.iter().map(|&(o, n)| (o, n * 8)));
        r.retain(|&(_, len)| len > 0);
        r
    }
}

/// Makes every fixture with qemu-img and qemu-io.
fn make_fixtures(s: &Scratch) -> Vec<Arc<Fixture>> {
    let io = |name: &str, cmds: &[&str]| {
        s.qemu_io(
            name,
            "qcow2",
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    let data = [
        "write -P 0x11 0 64k",
        "write -P 0x22 192k 100k",
        "write -z 512k 64k",
        "write -P 0x33 1m 4k",
        "write -P 0x44 3m 512k",
        "discard 3m 64k",
    ];
    s.create("c64k.qcow2", "cluster_size=64k", 4 << 20);
    io("c64k.qcow2", &data);
    s.create("c512.qcow2", "cluster_size=512", 4 << 20);
    io("c512.qcow2", &data);
    s.create("c2m.qcow2", "cluster_size=2M", 8 << 20);
    io(
        "c2m.qcow2",
        &["write -P 0x55 1m 64k", "write -P 0x66 6m 2m"],
    );
    s.create("v2.qcow2", "compat=0.10,cluster_size=64k", 4 << 20);
    io("v2.qcow2", &data);
    s.create("extl2.qcow2", "extended_l2=on,cluster_size=64k", 4 << 20);
    io(
        "extl2.qcow2",
        &[
            "write -P 0x11 0 4k",
            "write -P 0x22 70k 10k",
            "write -z 130k 6k",
            "write -P 0x33 1m 128k",
        ],
    );
    s.create("snap.qcow2", "cluster_size=64k", 4 << 20);
    io("snap.qcow2", &["write -P 0x11 0 128k"]);
    s.qemu_img(&["snapshot", "-c", "first", "snap.qcow2"]);
    io("snap.qcow2", &["write -P 0x22 64k 128k"]);
    s.qemu_img(&["snapshot", "-c", "a-second-snapshot", "snap.qcow2"]);
    io("snap.qcow2", &["write -P 0x33 1m 64k"]);
    // Compressed clusters from a raw file of compressible, varied data.
    let mut raw = vec![0u8; 2 << 20];
    let mut rng = Rng::new(6);
    for (i, chunk) in raw.chunks_mut(4096).enumerate() {
        if i % 5 != 4 {
            let b = rng.next_u64() as u8;
            chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = b ^ (j / 64) as u8);
        }
    }
    s.write_file("src.raw", &raw);
    for (name, opts) in [
        ("comp.qcow2", "cluster_size=64k"),
        ("zstd.qcow2", "cluster_size=64k,compression_type=zstd"),
        ("comp4k.qcow2", "cluster_size=4k"),
    ] {
        s.qemu_img(&[
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", name,
        ]);
    }
    s.create("base.qcow2", "cluster_size=64k", 4 << 20);
    io("base.qcow2", &["write -P 0x71 0 1m", "write -P 0x72 2m 1m"]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    io("top.qcow2", &["write -P 0x73 512k 1m", "write -z 2m 64k"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "rawbase.raw", "2M"]);
    s.qemu_io("rawbase.raw", "raw", &["write -P 0x74 0 1m".to_string()]);
    s.create_overlay(
        "rawtop.qcow2",
        "rawbase.raw",
        "raw",
        "cluster_size=64k",
        None,
    );
    io("rawtop.qcow2", &["write -P 0x75 64k 64k"]);
    s.create("ext.qcow2", "cluster_size=64k,data_file=ext.data", 4 << 20);
    io("ext.qcow2", &["write -P 0x76 0 256k"]);
    vec![
        Fixture::load(s, "c64k", "c64k.qcow2", &[]),
        Fixture::load(s, "c512", "c512.qcow2", &[]),
        Fixture::load(s, "c2m", "c2m.qcow2", &[]),
        Fixture::load(s, "v2", "v2.qcow2", &[]),
        Fixture::load(s, "extl2", "extl2.qcow2", &[]),
        Fixture::load(s, "snap", "snap.qcow2", &[]),
        Fixture::load(s, "comp", "comp.qcow2", &[]),
        Fixture::load(s, "zstd", "zstd.qcow2", &[]),
        Fixture::load(s, "comp4k", "comp4k.qcow2", &[]),
        Fixture::load(s, "top", "top.qcow2", &["base.qcow2"]),
        Fixture::load(s, "rawtop", "rawtop.qcow2", &["rawbase.raw"]),
        Fixture::load(s, "ext", "ext.qcow2", &["ext.data"]),
    ]
}

fn fixture<'a>(all: &'a [Arc<Fixture>], name: &str) -> &'a Arc<Fixture> {
    all.iter().find(|f| f.name == name).unwrap()
}

// ---------------------------------------------------------------------------------------
// The cases.

/// Each header field set to boundary and garbage values.
fn header_cases(f: &Arc<Fixture>, full: bool) -> Vec<Case> {
    use HeaderField::*;
    let l = &f.layout;
    let cluster = l.cluster;
    let len = f.bytes.len() as u64;
    let eof = len.div_ceil(cluster) * cluster;
    let l1_needed = l.l1_entries;
    let span = (cluster / if l.extended_l2 { 16 } else { 8 }) * cluster;
    let mut values: Vec<(HeaderField, u64)> = vec![
        (Magic, 0),
        (Magic, 0x5146_49fa),
        (Version, 0),
        (Version, 1),
        (Version, 4),
        (Version, u64::from(u32::MAX)),
        (BackingFileOffset, 1),
        (BackingFileOffset, 8),
        (BackingFileOffset, l.header_len + 4),
        (BackingFileOffset, cluster - 1),
        (BackingFileOffset, cluster),
        (BackingFileOffset, u64::MAX),
        (BackingFileSize, 1024),
        (BackingFileSize, u64::from(u32::MAX)),
        (ClusterBits, 0),
        (ClusterBits, 8),
        (ClusterBits, 9),
        (ClusterBits, 21),
        (ClusterBits, 22),
        (ClusterBits, 64),
        (ClusterBits, u64::from(u32::MAX)),
        (Size, 0),
        (Size, 1),
        (Size, 511),
        (Size, l1_needed * span),
        (Size, l1_needed * span + 1),
        (Size, i64::MAX as u64),
        (Size, u64::MAX),
        (CryptMethod, 1),
        (CryptMethod, 2),
        (CryptMethod, u64::from(u32::MAX)),
        (L1Size, 0),
        (L1Size, l1_needed.saturating_sub(1)),
        (L1Size, l1_needed + 1),
        (L1Size, 4 << 20),
        (L1Size, (4 << 20) + 1),
        (L1Size, u64::from(u32::MAX)),
        (L1TableOffset, 0),
        (L1TableOffset, 512),
        (L1TableOffset, cluster),
        (L1TableOffset, eof),
        (L1TableOffset, eof + 64 * cluster),
        (L1TableOffset, 1 << 56),
        (L1TableOffset, u64::MAX),
        (RefcountTableOffset, 0),
        (RefcountTableOffset, 512),
        (RefcountTableOffset, eof),
        (RefcountTableOffset, u64::MAX),
        (RefcountTableClusters, 0),
        (RefcountTableClusters, (8 << 20) / cluster),
        (RefcountTableClusters, (8 << 20) / cluster + 1),
        (RefcountTableClusters, u64::from(u32::MAX)),
        (NbSnapshots, 1),
        (NbSnapshots, 65536),
        (NbSnapshots, 65537),
        (NbSnapshots, u64::from(u32::MAX)),
        (SnapshotsOffset, 512),
        (SnapshotsOffset, cluster),
        (SnapshotsOffset, eof),
        (IncompatibleFeatures, u64::MAX),
        (CompatibleFeatures, u64::MAX),
        (AutoclearFeatures, u64::MAX),
        (RefcountOrder, 0),
        (RefcountOrder, 6),
        (RefcountOrder, 7),
        (RefcountOrder, u64::from(u32::MAX)),
        (HeaderLength, 0),
        (HeaderLength, 72),
        (HeaderLength, 100),
        (HeaderLength, 104),
        (HeaderLength, 105),
        (HeaderLength, 120),
        (HeaderLength, cluster),
        (HeaderLength, cluster + 8),
        (HeaderLength, u64::from(u32::MAX)),
        (CompressionType, 1),
        (CompressionType, 2),
        (CompressionType, 0xff),
    ];
    for bit in 0..6 {
        values.push((IncompatibleFeatures, 1 << bit));
    }
    values.push((CompatibleFeatures, 1));
    values.push((AutoclearFeatures, 1));
    values.push((AutoclearFeatures, 2));
    if !full {
        // The fields whose meaning depends on the geometry or version.
        values.retain(|(field, _)| {
            matches!(
                field,
                ClusterBits
                    | Size
                    | L1Size
                    | L1TableOffset
                    | BackingFileOffset
                    | HeaderLength
                    | IncompatibleFeatures
                    | Version
            )
        });
    }
    let mut rng = Rng::new(name_seed(f.name));
    for field in [Size, L1Size, L1TableOffset, HeaderLength, BackingFileOffset] {
        values.push((field, rng.next_u64()));
    }
    let v3 = l.header_len != 72;
    values
        .into_iter()
        .map(|(field, value)| {
            let case = damaged(f, format!("header {field:?} = {value:#x}"), move |b| {
                put_field(b, field, value)
            });
            // Values the limits refuse by name, whatever else the image holds.
            let refused = match field {
                ClusterBits if !(9..=21).contains(&value) => Some("cluster_bits"),
                Version if value != 2 && value != 3 => Some("version"),
                L1Size if value > 4 << 20 => Some("l1_size"),
                RefcountTableClusters if value * cluster > 8 << 20 => {
                    Some("refcount_table_clusters")
                }
                NbSnapshots if value > 65536 => Some("nb_snapshots"),
                HeaderLength if v3 && (value < 104 || value % 8 != 0 || value > cluster) => {
                    Some("header_length")
                }
                CryptMethod if value != 0 => Some("encrypted"),
                _ => None,
            };
            match refused {
                Some(what) => case.expect(Expect::Fails(what)),
                None => case,
            }
        })
        .collect()
}

/// Each header extension damaged in each of its parts, and extension lists that never
/// end, repeat or hold too much.
fn extension_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = &f.layout;
    let mut cases = Vec::new();
    let area_end = l.cluster.min(f.bytes.len() as u64);
    for (i, &(at, kind, len)) in l.exts.iter().enumerate() {
        let room = area_end - at - 8;
        let name = format!("extension {i} ({kind:#x})");
        for (what, value) in [
            ("type 0 (end)", 0u64),
            ("unknown type", 0x1234_5678),
            ("backing format type", 0xe279_2aca),
            ("data file type", 0x4441_5441),
            ("bitmaps type", 0x2385_2875),
            ("encryption type", 0x0537_be77),
        ] {
            cases.push(damaged(f, format!("{name}: {what}"), move |b| {
                put(b, at, 4, value)
            }));
        }
        for value in [
            0,
            1,
            7,
            u64::from(len) + 1,
            room,
            room + 1,
            u64::from(u32::MAX),
        ] {
            cases.push(damaged(f, format!("{name}: length {value}"), move |b| {
                put(b, at + 4, 4, value)
            }));
        }
        let data_len = u64::from(len);
        for (what, byte) in [("0xff", 0xffu8), ("zeros", 0), ("NUL-free text", b'a')] {
            cases.push(damaged(f, format!("{name}: data {what}"), move |b| {
                for x in &mut b[(at + 8) as usize..(at + 8 + data_len) as usize] {
                    *x = byte;
                }
            }));
        }
    }
    if let Some(end) = l.end_marker {
        // No end marker: the area continues with zeros (an end) or garbage.
        cases.push(damaged(f, "end marker replaced by garbage", move |b| {
            put(b, end, 8, 0x0102_0304_0506_0708)
        }));
        // The rest of the first cluster full of tiny unknown extensions: more than the
        // limit allows, each type once, then all of one type.
        let cluster = l.cluster;
        cases.push(damaged(
            f,
            "first cluster full of distinct extensions",
            move |b| {
                let mut at = end;
                let mut kind = 0x1000_0000u64;
                while at + 8 <= cluster {
                    put(b, at, 4, kind);
                    put(b, at + 4, 4, 0);
                    at += 8;
                    kind += 1;
                }
            },
        ));
        cases.push(damaged(
            f,
            "first cluster full of one extension",
            move |b| {
                let mut at = end;
                while at + 8 <= cluster {
                    put(b, at, 8, 0x1000_0000_0000_0000);
                    at += 8;
                }
            },
        ));
        // Extensions appended: a backing format of 16 bytes, a bitmaps extension with
        // its bit set, a feature table naming every bit, an extension cut by the area end.
        cases.push(damaged(f, "16-byte backing format", move |b| {
            put(b, end, 4, 0xe279_2aca);
            put(b, end + 4, 4, 16);
            b[(end + 8) as usize..(end + 24) as usize].copy_from_slice(b"qcow2qcow2qcow2q");
            put(b, end + 24, 8, 0);
        }));
        for (what, nb, dir_size, dir_offset) in [
            ("bitmaps extension, no bitmaps", 0u64, 0u64, 0u64),
            ("bitmaps extension, 65536 bitmaps", 65536, 1 << 20, cluster),
            ("bitmaps extension, huge directory", 1, u64::MAX, cluster),
            ("bitmaps extension, directory past EOF", 1, 4096, 1 << 40),
        ] {
            cases.push(damaged(f, what, move |b| {
                put(b, end, 4, 0x2385_2875);
                put(b, end + 4, 4, 24);
                put(b, end + 8, 4, nb);
                put(b, end + 12, 4, 0);
                put(b, end + 16, 8, dir_size);
                put(b, end + 24, 8, dir_offset);
                put(b, end + 32, 8, 0);
                put_field(b, HeaderField::AutoclearFeatures, 1);
            }));
        }
        cases.push(damaged(f, "feature table naming unknown bits", move |b| {
            put(b, end, 4, 0x6803_f857);
            put(b, end + 4, 4, 48 * 3);
            for (i, kind) in [0u8, 1, 2].iter().enumerate() {
                let e = (end + 8 + 48 * i as u64) as usize;
                b[e] = *kind;
                b[e + 1] = 63;
                b[e + 2..e + 48].fill(b'x');
            }
            put(b, end + 8 + 144, 8, 0);
            put_field(b, HeaderField::IncompatibleFeatures, 1 << 63);
        }));
        cases.push(damaged(
            f,
            "extension header cut by the area end",
            move |b| {
                put(b, end, 4, 0x1234_5678);
                put(b, end + 4, 4, cluster - end - 12);
                put(b, cluster - 4, 4, 0x0bad_0bad);
            },
        ));
    }
    cases
}

/// The active L1 table's entries set to values that point nowhere sensible.
fn l1_cases(f: &Arc<Fixture>, entries: usize) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    // Every allocated entry's index, plus one unallocated one.
    let mut indices: Vec<u64> = (0..l.l1_entries)
        .filter(|&i| get(&f.bytes, l.l1_offset + 8 * i, 8) != 0)
        .collect();
    if let Some(free) = (0..l.l1_entries).find(|&i| get(&f.bytes, l.l1_offset + 8 * i, 8) == 0) {
        indices.push(free);
    }
    for i in indices.into_iter().take(entries) {
        let at = l.l1_offset + 8 * i;
        let old = get(&f.bytes, at, 8);
        for (what, value) in [
            ("zero", 0),
            ("unaligned", (old | 512) & !(1 << 63)),
            ("reserved bit 1", old | 2),
            ("reserved bit 56", old | 1 << 56),
            ("COPIED toggled", old ^ 1 << 63),
            ("past EOF", eof + 4 * l.cluster),
            ("far past EOF", OFFSET_MASK & !(l.cluster - 1)),
            ("at the L1 table", l.l1_offset & !(l.cluster - 1)),
            ("at the refcount table", l.refcount_table),
            ("at cluster 1", l.cluster),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(f, format!("L1[{i}] {what}"), move |b| {
                put(b, at, 8, value)
            }));
        }
    }
    cases
}

/// L2 entries (and extended L2 bitmaps) set to corrupt values.
fn l2_cases(f: &Arc<Fixture>, per_table: usize) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    let mut picks: Vec<u64> = l.l2_entries.iter().copied().take(per_table).collect();
    if let Some(&t) = l.l2_tables.first() {
        // An unallocated entry near the end of the first table.
        let entry = if l.extended_l2 { 16 } else { 8 };
        let last = t + l.cluster - entry;
        if !picks.contains(&last) {
            picks.push(last);
        }
    }
    for at in picks {
        let old = get(&f.bytes, at, 8);
        let host = old & OFFSET_MASK;
        for (what, value) in [
            ("zero", 0),
            ("zero flag", 1),
            ("zero flag with host", old | 1),
            ("unaligned host", (old | 512) & !(1 << 62)),
            ("reserved bit 1", old | 2),
            ("reserved bit 56", old | 1 << 56),
            ("reserved bit 61", old | 1 << 61),
            ("compressed flag", old | 1 << 62),
            ("COPIED toggled", old ^ 1 << 63),
            ("host past EOF", 1 << 63 | (eof + 8 * l.cluster)),
            (
                "host far past EOF",
                1 << 63 | (OFFSET_MASK & !(l.cluster - 1)),
            ),
            ("host 0 with COPIED", 1 << 63),
            (
                "host at the L1 table",
                1 << 63 | (l.l1_offset & !(l.cluster - 1)),
            ),
            ("host + 1 cluster", 1 << 63 | (host + l.cluster)),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(
                f,
                format!("L2 entry at {at:#x} {what}"),
                move |b| put(b, at, 8, value),
            ));
        }
        if l.extended_l2 {
            let bitmap = at + 8;
            for (what, value) in [
                ("bitmap alloc and zero", 0x0000_0001_0000_0001u64),
                ("bitmap all allocated", 0xffff_ffff),
                ("bitmap all zero", 0xffff_ffff_0000_0000),
                ("bitmap all ones", u64::MAX),
                ("bitmap cleared", 0),
            ] {
                cases.push(damaged(
                    f,
                    format!("L2 entry at {at:#x} {what}"),
                    move |b| put(b, bitmap, 8, value),
                ));
            }
        }
    }
    cases
}

/// Compressed cluster descriptors pointing outside the file, into the header, at sizes
/// past their limits, and compressed data that does not decompress.
fn compressed_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let shift = 62 - (l.cluster_bits - 8);
    let offset_mask = (1u64 << shift) - 1;
    let len = f.bytes.len() as u64;
    let mut cases = Vec::new();
    let picks: Vec<u64> = [
        l.compressed.first(),
        l.compressed.get(l.compressed.len() / 2),
        l.compressed.last(),
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect::<BTreeSet<_>>()
    .into_iter()
    .collect();
    for at in picks {
        let old = get(&f.bytes, at, 8);
        let host = old & offset_mask;
        let sectors = old >> shift & ((1 << (l.cluster_bits - 8)) - 1);
        let with = move |h: u64, s: u64| 1 << 62 | s << shift | (h & offset_mask);
        for (what, value) in [
            ("most sectors", with(host, (1 << (l.cluster_bits - 8)) - 1)),
            ("one sector", with(host, 0)),
            ("host + 1", with(host + 1, sectors)),
            ("host - 1", with(host.saturating_sub(1), sectors)),
            ("host in the header", with(0, sectors)),
            ("host 100", with(100, sectors)),
            ("host at EOF - 10", with(len - 10, sectors)),
            ("host past EOF", with(len + l.cluster, sectors)),
            ("host at offset field max", with(offset_mask, sectors)),
            ("COPIED set", old | 1 << 63),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(
                f,
                format!("compressed entry at {at:#x}: {what}"),
                move |b| put(b, at, 8, value),
            ));
        }
        // The compressed stream itself: garbage, and cut short by zeros.
        let data = host as usize;
        for (what, seed) in [("garbage stream", 1u64), ("stream start zeroed", 0)] {
            cases.push(damaged(
                f,
                format!("compressed data at {host:#x}: {what}"),
                move |b| {
                    let end = (data + 256).min(b.len());
                    if seed == 0 {
                        b[data..end].fill(0);
                    } else {
                        let mut rng = Rng::new(seed);
                        b[data..end].copy_from_slice(&rng.bytes(end - data));
                    }
                },
            ));
        }
    }
    cases
}

/// Refcount structures damaged: read-only commands never need them.
fn refcount_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let mut cases = Vec::new();
    for (what, value) in [
        ("zero", 0),
        ("unaligned", l.refcount_blocks[0] | 512),
        ("past EOF", 1 << 40),
        ("all ones", u64::MAX),
    ] {
        let at = l.refcount_table;
        cases.push(
            damaged(f, format!("refcount table entry 0 {what}"), move |b| {
                put(b, at, 8, value)
            })
            .expect(Expect::Success),
        );
    }
    let block = l.refcount_blocks[0] as usize;
    let cluster = l.cluster as usize;
    cases.push(
        damaged(f, "refcount block all 0xff", move |b| {
            b[block..block + cluster].fill(0xff)
        })
        .expect(Expect::Success),
    );
    cases.push(
        damaged(f, "refcount block zeroed", move |b| {
            b[block..block + cluster].fill(0)
        })
        .expect(Expect::Success),
    );
    cases
}

/// Snapshot table fields and snapshot L1 tables damaged.
fn snapshot_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    for (i, &(at, len)) in l.snapshots.iter().enumerate() {
        let fields: &[(&str, u64, usize, &[u64])] = &[
            ("l1_table_offset", 0, 8, &[0, 512, eof, 1 << 56, u64::MAX]),
            ("l1_size", 8, 4, &[0, 1 << 22, (1 << 22) + 1, 0xffff_ffff]),
            ("id_str_size", 12, 2, &[0, 1000, 0xffff]),
            ("name_size", 14, 2, &[0, 1000, 0xffff]),
            ("date", 16, 8, &[u64::MAX]),
            ("vm_clock_nsec", 24, 8, &[u64::MAX]),
            ("vm_state_size", 32, 4, &[0xffff_ffff]),
            (
                "extra_data_size",
                36,
                4,
                &[0, 7, 8, 1024, 1025, 0xffff_ffff],
            ),
        ];
        for &(field, offset, width, values) in fields {
            for &value in values {
                cases.push(damaged(
                    f,
                    format!("snapshot {i} {field} = {value:#x}"),
                    move |b| put(b, at + offset, width, value),
                ));
            }
        }
        cases.push(damaged(
            f,
            format!("snapshot {i} name bytes 0xff"),
            move |b| {
                let end = (at + len) as usize;
                let start = end.saturating_sub(8);
                b[start..end].fill(0xff);
            },
        ));
    }
    for (i, &(l1, _)) in l.snapshot_l1s.iter().enumerate() {
        for (what, value) in [
            ("past EOF", 1u64 << 40),
            ("unaligned", 512),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(f, format!("snapshot {i} L1[0] {what}"), move |b| {
                put(b, l1, 8, value)
            }));
        }
    }
    // The table cut by the end of the file.
    let (last, _) = *l.snapshots.last().unwrap();
    cases.push(damaged(f, "snapshot table cut by EOF", move |b| {
        b.truncate(last as usize + 20)
    }));
    cases
}

/// The file cut at interesting places.
fn truncation_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let len = f.bytes.len() as u64;
    let mut cuts = vec![0, 4, 71, 72, 103, 104, l.header_len, 511, l.cluster / 2];
    cuts.push(l.l1_offset);
    cuts.push(l.l1_offset + 4);
    if let Some(&t) = l.l2_tables.first() {
        cuts.push(t + l.cluster / 2);
    }
    cuts.push(len - 1);
    cuts.push(len - l.cluster.min(len) + 1);
    cuts.into_iter()
        .filter(|&c| c < len)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|cut| {
            damaged(f, format!("cut at {cut:#x}"), move |b| {
                b.truncate(cut as usize)
            })
        })
        .collect()
}

/// A seed that differs between fixtures.
fn name_seed(name: &str) -> u64 {
    name.bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

/// Seeded random damage inside the metadata clusters.
fn random_cases(f: &Arc<Fixture>, seeds: std::ops::Range<u64>) -> Vec<Case> {
    let regions = f.layout.metadata();
    seeds
        .map(|seed| {
            let regions = regions.clone();
            let name = f.name;
            damaged(f, format!("random flips, seed {seed}"), move |b| {
                let mut rng = Rng::new(seed ^ name_seed(name) << 16);
                for _ in 0..1 + rng.below(8) {
                    // The header is small and matters most: hit it a third of the time.
                    let (start, len) = if rng.below(3) == 0 {
                        regions[0]
                    } else {
                        regions[rng.below(regions.len() as u64) as usize]
                    };
                    let at = (start + rng.below(len)) as usize;
                    if at >= b.len() {
                        continue;
                    }
                    match rng.below(3) {
                        0 => b[at] ^= 1 << rng.below(8),
                        1 => b[at] = rng.next_u64() as u8,
                        _ => b[at] = [0, 0xff, 0x80, 0x7f][rng.below(4) as usize],
                    }
                }
            })
        })
        .collect()
}

/// Writes a small qcow2 image made from `template` (an overlay qemu-img made with the
/// 11-byte backing name `l0000.qcow2`) with its backing name replaced by `backing` of the
/// same length, or with no backing file.
fn layer_from(template: &[u8], backing: Option<&str>) -> Vec<u8> {
    let mut b = template.to_vec();
    let offset = get(&b, 8, 8) as usize;
    match backing {
        Some(name) => {
            assert_eq!(name.len(), 11, "{name}");
            b[offset..offset + 11].copy_from_slice(name.as_bytes());
        }
        None => {
            put_field(&mut b, HeaderField::BackingFileOffset, 0);
            put_field(&mut b, HeaderField::BackingFileSize, 0);
        }
    }
    b
}

/// Overlays whose backing file names loop, run deep, or name odd files; and the
/// `--confine-backing`/`--regular-backing-only` options.
fn chain_cases(s: &Scratch) -> Vec<Case> {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-o",
        "cluster_size=512",
        "-b",
        "l0000.qcow2",
        "-F",
        "qcow2",
        "layer.qcow2",
        "1M",
    ]);
    let template = Arc::new(std::fs::read(s.path("layer.qcow2")).unwrap());
    let mut cases = Vec::new();
    // Loops.
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: image is its own backing file",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0000.qcow2")))
                    .unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: two images back each other",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0001.qcow2")))
                    .unwrap();
                std::fs::write(dir.join("l0001.qcow2"), layer_from(&t, Some("l0000.qcow2")))
                    .unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: loop through a symbolic link",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0001.qcow2")))
                    .unwrap();
                symlink("l0000.qcow2", dir.join("l0001.qcow2")).unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    // Deep chains: 1000 layers open; past the limit of 1024 they are refused.
    for (depth, expect) in [
        (1000usize, Expect::Success),
        (1030, Expect::ChainFails("deeper than 1024")),
    ] {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: {depth} layers"),
                Box::new(move |dir| {
                    for i in 0..depth {
                        let below = format!("l{:04}.qcow2", i + 1);
                        let backing = (i + 1 < depth).then_some(below.as_str());
                        std::fs::write(dir.join(format!("l{i:04}.qcow2")), layer_from(&t, backing))
                            .unwrap();
                    }
                    "l0000.qcow2".into()
                }),
            )
            .expect(expect)
            // qemu-img reads a 1000-deep chain slowly; the depth is ours to check.
            .without_qemu(),
        );
    }
    // Backing names that are not images.
    type Make = Box<dyn Fn(&Path) + Send + Sync>;
    let odd: Vec<(&str, &str, Expect, Make)> = vec![
        (
            "a directory",
            "ldir.qcow2",
            Expect::ChainFails("directory"),
            Box::new(|dir| std::fs::create_dir(dir.join("ldir.qcow2")).unwrap()),
        ),
        (
            "a missing file",
            "lnone.qcow2",
            Expect::ChainFails("lnone.qcow2"),
            Box::new(|_| {}),
        ),
        (
            "a FIFO",
            "lfifo.qcow2",
            Expect::ChainFails("FIFO"),
            Box::new(|dir| {
                let made = Command::new("mkfifo").arg(dir.join("lfifo.qcow2")).status();
                assert!(made.unwrap().success());
            }),
        ),
        (
            "a symlink loop",
            "lloop.qcow2",
            Expect::ChainFails("lloop.qcow2"),
            Box::new(|dir| symlink("lloop.qcow2", dir.join("lloop.qcow2")).unwrap()),
        ),
        ("/dev/zero", "/dev/zero", Expect::Any, Box::new(|_| {})),
        ("/dev/null", "/dev/null", Expect::Any, Box::new(|_| {})),
        ("/", "/", Expect::ChainFails("directory"), Box::new(|_| {})),
    ];
    for (what, name, expect, make) in odd {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: backing file is {what}"),
                Box::new(move |dir| {
                    make(dir);
                    std::fs::write(dir.join("top.qcow2"), with_backing_name(&t, name)).unwrap();
                    "top.qcow2".into()
                }),
            )
            .expect(expect)
            .without_qemu(),
        );
    }
    // The backing format extension naming a format we do not read, and a device read
    // as qcow2 because the extension says so.
    for (what, format, backing) in [
        ("vmdk", "vmdk", "l0001.qcow2"),
        ("qcow2 for /dev/zero", "qcow2", "/dev/zero"),
        ("empty", "", "l0001.qcow2"),
    ] {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: backing format {what}"),
                Box::new(move |dir| {
                    let b = with_backing_format(&with_backing_name(&t, backing), format);
                    std::fs::write(dir.join("l0001.qcow2"), layer_from(&t, None)).unwrap();
                    std::fs::write(dir.join("top.qcow2"), b).unwrap();
                    "top.qcow2".into()
                }),
            )
            .without_qemu(),
        );
    }
    // Confinement: a backing file outside the directory, reached by `..` and by a link;
    // one inside; and a device with and without --regular-backing-only.
    for (what, name, refused) in [
        ("outside, by ..", "../base.qcow2", true),
        ("outside, by a link", "l0001.qcow2", true),
        ("inside", "l0002.qcow2", false),
    ] {
        let t = template.clone();
        let case = Case::new(
            format!("confine: backing file {what}"),
            Box::new(move |dir| {
                let jail = dir.join("jail");
                std::fs::create_dir(&jail).unwrap();
                std::fs::write(dir.join("base.qcow2"), layer_from(&t, None)).unwrap();
                std::fs::write(jail.join("l0002.qcow2"), layer_from(&t, None)).unwrap();
                symlink("../base.qcow2", jail.join("l0001.qcow2")).unwrap();
                std::fs::write(jail.join("top.qcow2"), with_backing_name(&t, name)).unwrap();
                "jail/top.qcow2".into()
            }),
        )
        .global(&["--confine-backing", "{dir}/jail"])
        .without_qemu();
        cases.push(if refused {
            case.expect(Expect::ChainFails("outside the directory"))
        } else {
            case.expect(Expect::Success)
        });
    }
    for (flag, expect) in [
        (true, Expect::ChainFails("not a regular file")),
        (false, Expect::Success),
    ] {
        let t = template.clone();
        let mut case = Case::new(
            format!("confine: /dev/zero backing, --regular-backing-only {flag}"),
            Box::new(move |dir| {
                let b = with_backing_format(&with_backing_name(&t, "/dev/zero"), "raw");
                std::fs::write(dir.join("top.qcow2"), b).unwrap();
                "top.qcow2".into()
            }),
        )
        .expect(expect)
        .without_qemu();
        if flag {
            case = case.global(&["--regular-backing-only"]);
        }
        cases.push(case);
    }
    cases
}

/// `template` with backing name `name` (any length that fits before the cluster end).
fn with_backing_name(template: &[u8], name: &str) -> Vec<u8> {
    let mut b = template.to_vec();
    let offset = get(&b, 8, 8) as usize;
    if b.len() < offset + name.len() {
        b.resize(offset + name.len(), 0);
    }
    b[offset..offset + 11].fill(0);
    b[offset..offset + name.len()].copy_from_slice(name.as_bytes());
    put_field(&mut b, HeaderField::BackingFileSize, name.len() as u64);
    b
}

/// `image` (whose backing format extension says `qcow2`) with the backing format `format`
/// (at most 5 bytes, so the extension keeps its padded size).
fn with_backing_format(image: &[u8], format: &str) -> Vec<u8> {
    let mut b = image.to_vec();
    let l = Layout::parse(image);
    let (at, _, _) = *l.exts.iter().find(|e| e.1 == 0xe279_2aca).unwrap();
    put(&mut b, at + 4, 4, format.len() as u64);
    let data = (at + 8) as usize;
    b[data..data + 8].fill(0);
    b[data..data + format.len()].copy_from_slice(format.as_bytes());
    b
}

/// Backing-name damage on the chain fixture: names that are empty, too long, hold a NUL,
/// use a protocol or `json:`.
fn backing_name_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let off = get(&f.bytes, 8, 8);
    let size = get(&f.bytes, 16, 4);
    let mut cases = Vec::new();
    for (what, name) in [
        ("json:", "json:{\"driver\":\"raw\"}".to_string()),
        ("nbd:", "nbd://localhost/x".to_string()),
        ("file:", "file:base.qcow2".to_string()),
        ("1023 bytes", "a".repeat(1023)),
        ("absolute missing", "/nonexistent/base.qcow2".to_string()),
        ("dot-dot", "../base.qcow2".to_string()),
        ("NUL inside", "base\0.qcow2".to_string()),
        ("invalid UTF-8", "base\u{fffd}.qcow2".to_string()),
        ("with a newline", "no\nsuch\r\nbase.qcow2".to_string()),
        ("with an escape sequence", "\u{1b}[2Jbase.qcow2".to_string()),
    ] {
        let bytes = if what == "invalid UTF-8" {
            b"base\xff.qcow2".to_vec()
        } else {
            name.into_bytes()
        };
        cases.push(damaged(f, format!("backing name {what}"), move |b| {
            let o = off as usize;
            b[o..o + size as usize].fill(0);
            if b.len() < o + bytes.len() {
                b.resize(o + bytes.len(), 0);
            }
            b[o..o + bytes.len()].copy_from_slice(&bytes);
            put_field(b, HeaderField::BackingFileSize, bytes.len() as u64);
        }));
    }
    cases.push(damaged(f, "backing name empty", move |b| {
        put_field(b, HeaderField::BackingFileSize, 0)
    }));
    cases
}

/// External data file name damage.
fn data_file_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let Some(&(at, _, len)) = l.exts.iter().find(|e| e.1 == 0x4441_5441) else {
        return Vec::new();
    };
    let mut cases = Vec::new();
    for (what, name) in [
        ("missing", "nothere"),
        ("/dev/zero", "/dev/zero"),
        ("the image itself", IMG),
        ("a directory", "/tmp"),
        ("a name with a newline", "a\nb"),
    ] {
        let name = name.to_string();
        cases.push(damaged(f, format!("data file is {what}"), move |b| {
            let start = (at + 8) as usize;
            b[start..start + len as usize].fill(0);
            let n = name.len().min(len as usize);
            b[start..start + n].copy_from_slice(&name.as_bytes()[..n]);
            put(b, at + 4, 4, n as u64);
        }));
    }
    cases.push(damaged(f, "data file bit cleared", |b| {
        let v = get(b, 72, 8) & !4;
        put(b, 72, 8, v);
    }));
    cases
}

/// `--confine-backing` and `--regular-backing-only` on the external data file of the
/// `ext` fixture, which names `ext.data`: a link out of the directory, a real file
/// inside, a link to a device.
fn data_file_policy_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let mut cases = Vec::new();
    for (what, global, expect) in [
        (
            "a link out of the directory",
            &["--confine-backing", "{dir}/jail"][..],
            Expect::Fails("external data file"),
        ),
        (
            "inside the directory",
            &["--confine-backing", "{dir}/jail"],
            Expect::Success,
        ),
        (
            "a link to /dev/zero",
            &["--regular-backing-only"],
            Expect::Fails("not a regular file"),
        ),
    ] {
        let fx = f.clone();
        let case = Case::new(
            format!("confine: data file is {what}"),
            Box::new(move |dir| {
                let jail = dir.join("jail");
                std::fs::create_dir(&jail).unwrap();
                std::fs::write(jail.join(IMG), &fx.bytes).unwrap();
                let data = &fx.others[0].1;
                if what.contains("out of") {
                    std::fs::write(dir.join("ext.data"), data).unwrap();
                    symlink("../ext.data", jail.join("ext.data")).unwrap();
                } else if what.contains("zero") {
                    symlink("/dev/zero", jail.join("ext.data")).unwrap();
                } else {
                    std::fs::write(jail.join("ext.data"), data).unwrap();
                }
                format!("jail/{IMG}")
            }),
        )
        .global(global)
        .expect(expect)
        .without_qemu();
        cases.push(case);
    }
    cases
}

/// Every case, in a fixed order.
fn all_cases(s: &Scratch) -> Vec<Case> {
    let fixtures = make_fixtures(s);
    let f = |name| fixture(&fixtures, name);
    let mut cases = Vec::new();
    // Undamaged fixtures: every command succeeds and matches qemu-img.
    for fx in &fixtures {
        cases.push(damaged(fx, "undamaged", |_| ()).expect(Expect::Success));
    }
    cases.extend(header_cases(f("c64k"), true));
    for name in ["c2m", "v2", "extl2", "top"] {
        cases.extend(header_cases(f(name), false));
    }
    for name in ["c64k", "top", "v2"] {
        cases.extend(extension_cases(f(name)));
    }
    for (name, entries) in [
        ("c64k", 3),
        ("c512", 3),
        ("extl2", 2),
        ("snap", 2),
        ("c2m", 1),
    ] {
        cases.extend(l1_cases(f(name), entries));
    }
    for (name, entries) in [("c64k", 2), ("extl2", 2), ("v2", 1)] {
        cases.extend(l2_cases(f(name), entries));
    }
    for name in ["comp", "zstd", "comp4k"] {
        cases.extend(compressed_cases(f(name)));
    }
    cases.extend(refcount_cases(f("c64k")));
    cases.extend(snapshot_cases(f("snap")));
    for name in ["c64k", "comp", "c512", "top"] {
        cases.extend(truncation_cases(f(name)));
    }
    cases.extend(backing_name_cases(f("top")));
    cases.extend(data_file_cases(f("ext")));
    cases.extend(data_file_policy_cases(f("ext")));
    for (name, seeds) in [
        ("c64k", 0..50),
        ("snap", 0..40),
        ("comp", 0..30),
        ("extl2", 0..30),
        ("c512", 0..20),
        ("top", 0..20),
        ("v2", 0..10),
    ] {
        cases.extend(random_cases(f(name), seeds));
    }
    cases.extend(chain_cases(s));
    cases
}

#[test]
fn hostile_images_never_crash_hang_or_change_qimg_read_only_commands() {
    let started = Instant::now();
    let s = Scratch::new();
    qimg_path();
    let mut cases = all_cases(&s);
    // HOSTILE_FILTER=text runs only the cases whose label holds it.
    if let Ok(filter) = std::env::var("HOSTILE_FILTER") {
        cases.retain(|c| c.label.contains(&filter));
    }
    let made = started.elapsed();
    let tally = Mutex::new(Tally::default());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4);
    std::thread::scope(|scope| {
        for w in 0..workers {
            let (cases, tally, next) = (&cases, &tally, &next);
            let work = s.path(&format!("worker{w}"));
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    run_case(case, &work, tally);
                }
            });
        }
    });
    let t = tally.into_inner().unwrap();
    eprintln!(
        "hostile images: {} cases, {} qimg runs ({} failed cleanly), {} conversions \
         compared with qemu-img ({} more qemu-img refused), fixtures {:.1?}, total {:.1?}",
        cases.len(),
        t.runs,
        t.failed_runs,
        t.qemu_compared,
        t.qemu_refused,
        made,
        started.elapsed()
    );
    for (name, (n, time)) in &t.categories {
        eprintln!("  {n:4} cases of {name} ({time:.1?} of worker time)");
    }
    eprintln!("  slowest cases: {:?}", t.slowest);
    for (name, labels) in &t.qemu_only {
        eprintln!(
            "  qemu-img converts {} {name} cases that qimg refuses, e.g.:",
            labels.len()
        );
        for label in labels.iter().take(if std::env::var("HOSTILE_ALL").is_ok() {
            usize::MAX
        } else {
            3
        }) {
            eprintln!("    {label}");
        }
    }
    if !t.failures.is_empty() {
        let shown: Vec<&str> = t.failures.iter().take(60).map(String::as_str).collect();
        panic!(
            "{} rule violations (first {}):\n{}",
            t.failures.len(),
            shown.len(),
            shown.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bounded memory: claims are checked against the file before anything is allocated.

/// Counts the bytes this thread has allocated and not freed, and the peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: the thread-local may be gone while a thread shuts down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// thread-local cells that allocate nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes `f` had allocated at once on this thread (beyond what was live before).
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// A small valid image (64 KiB clusters) made by qemu-img, as bytes.
fn small_image(s: &Scratch, name: &str, options: &str) -> Vec<u8> {
    s.create(name, options, 1 << 20);
    std::fs::read(s.path(name)).unwrap()
}

/// Opens `bytes` from memory, read-only or for writing; returns the error message and
/// the peak allocation.
fn open_in_memory(bytes: Vec<u8>, writable: bool) -> (Result<(), String>, usize) {
    use qcow2_engine::storage::MemStorage;
    use qcow2_engine::{Image, ImageOptions};
    let storage = Box::new(MemStorage::from_bytes(bytes));
    peak_allocation(|| {
        let options = ImageOptions {
            writable,
            ..ImageOptions::default()
        };
        Image::from_storage(storage, "claims.qcow2", &options, None)
            .map(drop)
            .map_err(|e| e.report().to_string())
    })
}

#[test]
fn claims_larger_than_the_file_fail_fast_without_allocating_them() {
    let s = Scratch::new();
    let base = small_image(&s, "small.qcow2", "cluster_size=64k");
    let base_len = base.len();
    let mut claims: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    let mut with = |what, writable, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = base.clone();
        f(&mut b);
        claims.push((what, b, writable));
    };
    with("a 32 MiB L1 table", false, &|b| {
        put_field(b, HeaderField::L1Size, 4 << 20)
    });
    with("a 32 MiB L1 table at the last 56-bit offset", false, &|b| {
        put_field(b, HeaderField::L1Size, 4 << 20);
        put_field(b, HeaderField::L1TableOffset, (1 << 56) - 0x10000);
    });
    with("an 8 MiB refcount table (opened for writing)", true, &|b| {
        put_field(b, HeaderField::RefcountTableClusters, 128)
    });
    with("65536 snapshots", false, &|b| {
        put_field(b, HeaderField::NbSnapshots, 65536);
        put_field(b, HeaderField::SnapshotsOffset, 0x10000);
    });
    with("a snapshot of 129 KiB", false, &|b| {
        // The entry starts 64 KiB before the end of the file and needs 129 KiB.
        put_field(b, HeaderField::NbSnapshots, 1);
        put_field(b, HeaderField::SnapshotsOffset, 0x20000);
        put(b, 0x20000 + 12, 2, 0xffff);
        put(b, 0x20000 + 14, 2, 0xffff);
        put(b, 0x20000 + 36, 4, 1024);
    });
    with("a bitmap directory over QEMU's 64 MiB limit", false, &|b| {
        let end = Layout::parse(b).end_marker.unwrap();
        put(b, end, 4, 0x2385_2875);
        put(b, end + 4, 4, 24);
        put(b, end + 8, 4, 1);
        put(b, end + 16, 8, 64 << 20);
        put(b, end + 24, 8, 0x10000);
        put(b, end + 32, 8, 0);
        put_field(b, HeaderField::AutoclearFeatures, 1);
    });
    for (what, bytes, writable) in claims {
        let len = bytes.len();
        let started = Instant::now();
        let (result, peak) = open_in_memory(bytes, writable);
        let elapsed = started.elapsed();
        eprintln!("{what}: {result:?}, peak {peak} bytes, {elapsed:?}");
        assert!(result.is_err(), "{what}: opened");
        // What may be allocated: copies of what the file holds, a few clusters more.
        assert!(
            peak < 4 * len.max(base_len) + (1 << 20),
            "{what}: {peak} bytes allocated for a {len}-byte file"
        );
        assert!(elapsed < Duration::from_secs(2), "{what}: took {elapsed:?}");
    }
}

#[test]
fn snapshot_table_past_64_mib_is_refused_with_its_own_message() {
    use qcow2_engine::Chain;
    let s = Scratch::new();
    let mut b = small_image(&s, "many.qcow2", "cluster_size=64k");
    // 1030 entries with 65535-byte names of 'a': 67.5 MB of table, past QEMU's 64 MiB.
    let table = 0x100000u64;
    let entry = (40u64 + 0xffff).div_ceil(8) * 8;
    let count = 1030u64;
    b.resize((table + entry * count) as usize, 0);
    for i in 0..count {
        let at = table + entry * i;
        put(&mut b, at, 8, 0x30000);
        put(&mut b, at + 8, 4, 1);
        put(&mut b, at + 14, 2, 0xffff);
        b[(at + 40) as usize..(at + 40 + 0xffff) as usize].fill(b'a');
    }
    put_field(&mut b, HeaderField::NbSnapshots, count);
    put_field(&mut b, HeaderField::SnapshotsOffset, table);
    s.write_file("many.qcow2", &b);
    let err = Chain::open(s.path("many.qcow2"))
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("64 MiB"), "{err}");
    // One entry fewer than the limit needs opens.
    put_field(&mut b, HeaderField::NbSnapshots, 1023);
    s.write_file("many.qcow2", &b);
    let chain = Chain::open(s.path("many.qcow2")).unwrap();
    assert_eq!(chain.top().as_qcow2().unwrap().snapshots().len(), 1023);
}

#[test]
fn extension_area_full_of_extensions_fails_fast() {
    use qcow2_engine::Chain;
    let s = Scratch::new();
    // 2 MiB clusters: room for 262144 empty extensions, each of another type.
    let mut b = small_image(&s, "exts.qcow2", "cluster_size=2M");
    let end = Layout::parse(&b).end_marker.unwrap();
    let mut at = end;
    let mut kind = 0x1000_0000u64;
    while at + 8 <= 2 << 20 {
        put(&mut b, at, 4, kind);
        put(&mut b, at + 4, 4, 0);
        at += 8;
        kind += 1;
    }
    s.write_file("exts.qcow2", &b);
    let started = Instant::now();
    let err = Chain::open(s.path("exts.qcow2"))
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("1024 header extensions"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Limits checked through the library, and qimg's usage errors.

#[test]
fn snapshot_l1_tables_over_32_mib_and_odd_backing_names() {
    use qcow2_engine::{Chain, ChainOptions};
    let s = Scratch::new();
    s.create("snap.qcow2", "cluster_size=64k", 1 << 20);
    s.qemu_img(&["snapshot", "-c", "one", "snap.qcow2"]);
    let mut b = std::fs::read(s.path("snap.qcow2")).unwrap();
    let (entry, _) = Layout::parse(&b).snapshots[0];
    put(&mut b, entry + 8, 4, (4 << 20) + 1);
    s.write_file("snap.qcow2", &b);
    let err = Chain::open(s.path("snap.qcow2"))
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("L1 table larger than 32 MiB"), "{err}");

    s.create("base.qcow2", "", 1 << 20);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    let top = std::fs::read(s.path("top.qcow2")).unwrap();
    let alone = ChainOptions {
        no_backing: true,
        ..ChainOptions::default()
    };
    // A NUL inside the name: QEMU would cut the name there; refused.
    s.write_file("nul.qcow2", &with_backing_name(&top, "base\0.qcow2"));
    let err = Chain::open_with(s.path("nul.qcow2"), &alone).unwrap_err();
    assert!(err.report().to_string().contains("NUL"), "{err}");
    // An empty name is no backing file, as QEMU reads it.
    let mut empty = top.clone();
    put_field(&mut empty, HeaderField::BackingFileSize, 0);
    s.write_file("empty.qcow2", &empty);
    let chain = Chain::open(s.path("empty.qcow2")).unwrap();
    assert_eq!(chain.layers().len(), 1);
    assert_eq!(chain.top().backing(), None);
}

#[test]
fn usage_errors_exit_2_with_clap_text_and_help_exits_0() {
    let s = Scratch::new();
    for args in [
        &["info", "--bogus", "x.qcow2"][..],
        &["nosuchcommand"],
        &["info"],
        &["--confine-backing"],
        &["map", "--output=xml", "x.qcow2"],
        &["convert", "-S", "12q", "a", "b"],
    ] {
        let out = s.qimg_output(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
    let help = s.qimg_output(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--confine-backing"));
}

#[test]
fn write_commands_refuse_an_image_marked_corrupt_in_one_line() {
    let s = Scratch::new();
    s.create("img.qcow2", "cluster_size=64k", 1 << 20);
    common::write_header_field(&s.path("img.qcow2"), HeaderField::IncompatibleFeatures, 2);
    let before = std::fs::read(s.path("img.qcow2")).unwrap();
    for args in [
        &["io", "-c", "write 0 4k", "img.qcow2"][..],
        &["snapshot", "-c", "x", "img.qcow2"],
        &["resize", "img.qcow2", "+1M"],
        &["amend", "-o", "lazy_refcounts=on", "img.qcow2"],
    ] {
        let out = s.qimg_output(args);
        common::assert_one_line_failure(&out, &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("marked corrupt"), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(s.path("img.qcow2")).unwrap(), before);
    // Reading it is fine.
    let out = s.qimg_output(&["io", "-c", "read 0 4k", "img.qcow2"]);
    assert!(out.status.success());
}
