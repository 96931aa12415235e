//! Power loss during merges: every image of a small chain sits in a `FaultStorage`, all of
//! them behind one power switch, and the merge loses power after its k-th write (counted
//! over all the images together), for every k until the merge finishes (no stride: the
//! chains are small enough). For each crash point and three choices of which unflushed
//! writes reached the disks (none, all, a seeded subset per disk), the images a disk could
//! hold are written to files and:
//!
//! - `qemu-img check` finds no corruption in any of them (leaks are allowed);
//! - the active image (the one the command starts from) shows exactly what it showed
//!   before (`qemu-img convert` of the crashed files against `qemu-img convert` of the
//!   originals), and so do the other images the merge must not change (read with the
//!   library, against `qemu-img convert` of the originals), and the destination's
//!   internal snapshot, when it has one;
//! - every backing pointer is the old or the new one; since the content checks pass
//!   whichever it is, the data a new pointer exposes was flushed before it was written;
//! - running the same merge again on these files completes it: the same backing pointers
//!   and image views as an uninterrupted run, `qemu-img check` with no corruption and no
//!   more leaked clusters than the crash left (leaks are allowed, not repaired: the rerun
//!   does not repair them, as qemu-img commit does not; `qemu-img check -r leaks` would),
//!   and a report whose `data + zero + already_done` bytes are the uninterrupted run's
//!   whole work as long as only the destination had been written (less once the final
//!   step, re-pointing or emptying, had begun).
//!
//! One exception: a commit of a middle range whose crash left the image above already
//! re-pointed at the base is complete, and a rerun is refused as qemu-img refuses it (the
//! top is no longer in the chain); its files are checked as the finished merge instead.
//!
//! The chains are tiny (1 MiB, a few clusters per layer) so that every write is a crash
//! point; the merges flush every 16 KiB copied (`checkpoint_bytes`) so that crashes also
//! land between checkpoints in the middle of the copy. Each test prints how many crash
//! points and distinct crashed image sets it checked. Lazy refcounts are left out: a
//! crashed dirty image needs its refcounts rebuilt before `qemu-img check` can judge it.

mod common;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::Scratch;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions, MergeReport, StorageCopy};
use qcow2_engine::storage::{Extent, FaultStorage, Opener, Storage, Unflushed};
use qcow2_engine::{Chain, ChainOptions, Image};

/// The disks of one machine, one per image, and one power switch: the `crash_at`-th write
/// to any of them is the last before the power goes.
struct Machine {
    disks: Vec<(PathBuf, Arc<FaultStorage>)>,
    power: Mutex<Power>,
}

#[derive(Default)]
struct Power {
    writes: u64,
    crash_at: Option<u64>,
}

impl Machine {
    fn new(paths: &[PathBuf], bytes: &[Vec<u8>], crash_at: Option<u64>) -> Arc<Machine> {
        let disks = paths
            .iter()
            .zip(bytes)
            .map(|(p, b)| (p.clone(), Arc::new(FaultStorage::from_bytes(b.clone()))))
            .collect();
        Arc::new(Machine {
            disks,
            power: Mutex::new(Power {
                writes: 0,
                crash_at,
            }),
        })
    }

    /// Counts one write; at the crash point every disk loses power.
    fn wrote(&self) {
        let mut p = self.power.lock().unwrap();
        p.writes += 1;
        if p.crash_at == Some(p.writes) {
            for (_, d) in &self.disks {
                d.crash_after(d.writes());
            }
        }
    }

    fn writes(&self) -> u64 {
        self.power.lock().unwrap().writes
    }

    fn crashed(&self) -> bool {
        self.disks.iter().any(|(_, d)| d.is_crashed())
    }

    /// Merge options that open every image on this machine's disks.
    fn options(self: &Arc<Machine>, base: &MergeOptions) -> MergeOptions {
        MergeOptions {
            chain: ChainOptions {
                opener: Some(Arc::new(MachineOpener(self.clone()))),
                ..ChainOptions::default()
            },
            ..base.clone()
        }
    }
}

/// One image's disk: a `FaultStorage` whose writes count on the machine's switch.
struct Disk {
    fault: Arc<FaultStorage>,
    machine: Arc<Machine>,
}

impl Storage for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fault.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fault.write_at(buf, offset)?;
        self.machine.wrote();
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.fault.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.fault.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fault.set_len(len)?;
        self.machine.wrote();
        Ok(())
    }
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        self.fault.extent(offset, max_len)
    }
}

/// Opens the files of a case on the machine's disks (by canonical path).
struct MachineOpener(Arc<Machine>);

impl Opener for MachineOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn Storage>> {
        let want = std::fs::canonicalize(path)?;
        let (_, fault) = self
            .0
            .disks
            .iter()
            .find(|(p, _)| *p == want)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is not on the machine", path.display()),
                )
            })?;
        Ok(Box::new(Disk {
            fault: fault.clone(),
            machine: self.0.clone(),
        }))
    }
}

/// The merge a case runs, with image names relative to the directory it runs in.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `commit` from the active image with these options.
    Commit {
        base: Option<&'static str>,
        top: Option<&'static str>,
        keep: bool,
    },
    /// `pull` into the active image.
    Pull { base: Option<&'static str> },
    /// Safe `rebase` of the active image onto this file.
    Rebase { backing: &'static str },
}

impl Op {
    fn run(
        self,
        dir: &Path,
        active: &str,
        options: &MergeOptions,
    ) -> qcow2_engine::Result<MergeReport> {
        let p = |n: &str| dir.join(n);
        let mut progress = |_: u64, _: u64| true;
        match self {
            Op::Commit { base, top, keep } => ops::commit(
                p(active),
                &CommitOptions {
                    base: base.map(p),
                    top: top.map(p),
                    keep,
                    merge: options.clone(),
                },
                &mut progress,
            ),
            Op::Pull { base } => {
                ops::pull(p(active), base.map(p).as_deref(), options, &mut progress)
            }
            Op::Rebase { backing } => ops::rebase(
                p(active),
                Some(backing),
                None,
                false,
                options,
                &mut progress,
            ),
        }
    }

    /// Whether a rerun after the merge completed is refused (a commit of a middle range:
    /// its top is no longer in the chain).
    fn refuses_rerun_when_complete(self) -> bool {
        matches!(self, Op::Commit { top: Some(_), .. })
    }
}

/// One chain and one merge.
struct Case {
    name: &'static str,
    /// Makes the images in the scratch directory.
    build: fn(&Scratch),
    /// Every file the merge may open (the chain and any new backing file).
    images: &'static [&'static str],
    /// The image the command starts from.
    active: &'static str,
    /// The image the merge writes its data into.
    dest: &'static str,
    /// The images that must keep showing what they showed, at every moment (the active
    /// one always; images between it and the destination may change, as with qemu-img).
    unchanged: &'static [&'static str],
    /// An internal snapshot of the destination, whose content must never change.
    snapshot: Option<&'static str>,
    op: Op,
}

/// Unflushed-write choices tried at each crash point (seeds vary with the point).
fn modes(k: u64) -> [Unflushed; 3] {
    [Unflushed::Lost, Unflushed::Kept, Unflushed::Seeded(k)]
}

/// The same choice for another disk (independent subsets per disk).
fn for_disk(mode: Unflushed, disk: usize) -> Unflushed {
    match mode {
        Unflushed::Seeded(s) => {
            Unflushed::Seeded(s.wrapping_mul(31).wrapping_add(disk as u64 * 1_000_003))
        }
        other => other,
    }
}

fn fingerprint<T: Hash>(value: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

fn is_qcow2(bytes: &[u8]) -> bool {
    bytes.starts_with(b"QFI\xfb")
}

/// The backing file name an image stores (none for raw files).
fn pointer(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).unwrap();
    if !is_qcow2(&bytes) {
        return None;
    }
    Image::open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .backing_file()
}

/// What `qemu-img convert` reads from `dir/name` through its chain.
fn view(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    let rel = format!("{dir}/{name}");
    let bytes = std::fs::read(s.path(&rel)).unwrap();
    s.reference(&rel, if is_qcow2(&bytes) { "qcow2" } else { "raw" })
}

/// Panics with `message`, keeping the crashed images (`crash/`, and `before/` as they
/// were before the rerun) in a directory the message names.
fn fail(s: &Scratch, label: &str, message: &str) -> ! {
    let kept = std::env::temp_dir().join(format!("merge-crash-{:x}", fingerprint(&label)));
    for dir in ["crash", "before"] {
        let Ok(entries) = std::fs::read_dir(s.path(dir)) else {
            continue;
        };
        std::fs::create_dir_all(kept.join(dir)).unwrap();
        for entry in entries {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), kept.join(dir).join(entry.file_name())).unwrap();
        }
    }
    panic!("{label}: {message} (images kept in {})", kept.display())
}

/// What the library reads from `dir/name` through its chain (cheaper than a process; the
/// expected views all come from qemu-img).
fn our_view(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    let chain = Chain::open(s.path(&format!("{dir}/{name}")))
        .unwrap_or_else(|e| panic!("opening {dir}/{name}: {e}"));
    let mut bytes = vec![0u8; chain.size() as usize];
    chain.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// What internal snapshot `snapshot` of `dir/name` holds.
fn snapshot_view(s: &Scratch, dir: &str, name: &str, snapshot: &str) -> Vec<u8> {
    let rel = format!("{dir}/{name}");
    let l = format!("snapshot.name={snapshot}");
    s.qemu_img(&["convert", "-l", &l, "-O", "raw", &rel, "snapshot.raw"]);
    let bytes = std::fs::read(s.path("snapshot.raw")).unwrap();
    std::fs::remove_file(s.path("snapshot.raw")).unwrap();
    bytes
}

/// `qemu-img check` of `dir/name`: fails on corruption; returns the leaked clusters.
fn leaks(s: &Scratch, dir: &str, name: &str, label: &str) -> u64 {
    let rel = format!("{dir}/{name}");
    let out = s.output("qemu-img", &["check", "--output=json", &rel]);
    let text = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => 0,
        Some(3) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["leaks"].as_u64().unwrap_or(0)
        }
        code => fail(
            s,
            label,
            &format!(
                "qemu-img check {rel} exits {code:?}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    }
}

fn write_all(s: &Scratch, dir: &str, names: &[&str], bytes: &[Vec<u8>]) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    for (name, b) in names.iter().zip(bytes) {
        std::fs::write(s.path(&format!("{dir}/{name}")), b).unwrap();
    }
}

fn read_all(s: &Scratch, dir: &str, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(s.path(&format!("{dir}/{n}"))).unwrap())
        .collect()
}

fn work(r: &MergeReport) -> u64 {
    r.data_bytes + r.zero_bytes + r.already_done_bytes
}

/// Runs `case` crashing after every write; see the module docs for what is checked.
fn crash_every_write(case: &Case) {
    crash_every_write_copying(case, StorageCopy::Never);
}

/// [`crash_every_write`] with data going to the destination as storage copies
/// (`storage_copy`): on these disks, the default copy through a buffer.
fn crash_every_write_copying(case: &Case, storage_copy: StorageCopy) {
    let s = Scratch::new();
    (case.build)(&s);
    let names = case.images;
    let n = names.len();
    // Originals live in orig/, untouched; the merges run there on in-memory disks.
    std::fs::create_dir_all(s.path("orig")).unwrap();
    for name in names {
        std::fs::rename(s.path(name), s.path(&format!("orig/{name}"))).unwrap();
    }
    let orig_dir = s.path("orig");
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|n| std::fs::canonicalize(orig_dir.join(n)).unwrap())
        .collect();
    let originals = read_all(&s, "orig", names);
    let dest = names.iter().position(|n| *n == case.dest).unwrap();
    assert!(case.unchanged.contains(&case.active), "{}", case.name);
    let views_before: Vec<Option<Vec<u8>>> = (0..n)
        .map(|i| {
            case.unchanged
                .contains(&names[i])
                .then(|| view(&s, "orig", names[i]))
        })
        .collect();
    let pointers_before: Vec<Option<String>> =
        names.iter().map(|m| pointer(&orig_dir.join(m))).collect();
    let snapshot_before = case
        .snapshot
        .map(|snap| snapshot_view(&s, "orig", case.dest, snap));
    let snapshot_unchanged = |dir: &str, label: &str| {
        if let (Some(snap), Some(before)) = (case.snapshot, &snapshot_before) {
            if snapshot_view(&s, dir, case.dest, snap) != *before {
                fail(
                    &s,
                    label,
                    &format!("snapshot {snap} of {} changed", case.dest),
                );
            }
        }
    };
    let base_options = MergeOptions {
        checkpoint_bytes: 16 << 10,
        storage_copy,
        ..MergeOptions::default()
    };

    // The uninterrupted run, on the machine (it counts the writes) and then on files.
    let machine = Machine::new(&paths, &originals, None);
    let clean = case
        .op
        .run(&orig_dir, case.active, &machine.options(&base_options))
        .unwrap_or_else(|e| panic!("{}: uninterrupted run: {e}", case.name));
    let total = machine.writes();
    let finished: Vec<Vec<u8>> = machine.disks.iter().map(|(_, d)| d.live_bytes()).collect();
    write_all(&s, "clean", names, &finished);
    let mut pointers_after = Vec::new();
    let mut views_after = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if is_qcow2(&finished[i]) {
            assert_eq!(
                leaks(&s, "clean", name, case.name),
                0,
                "{}: {name} leaks after an uninterrupted run",
                case.name
            );
        }
        pointers_after.push(pointer(&s.path(&format!("clean/{name}"))));
        views_after.push(view(&s, "clean", name));
    }
    for i in 0..n {
        if let Some(before) = &views_before[i] {
            assert!(
                views_after[i] == *before,
                "{}: the uninterrupted merge changed what {} shows",
                case.name,
                names[i]
            );
        }
    }
    snapshot_unchanged("clean", case.name);
    // The same merge on files gives the same images.
    write_all(&s, "files", names, &originals);
    let on_files = case
        .op
        .run(&s.path("files"), case.active, &base_options)
        .unwrap();
    assert_eq!(on_files, clean, "{}: report on files", case.name);
    for (i, name) in names.iter().enumerate() {
        assert!(
            read_all(&s, "files", &[name])[0] == finished[i],
            "{}: {name} differs between the run on files and on the machine",
            case.name
        );
    }

    let mut seen = HashSet::new();
    let mut checked: HashMap<(usize, u64), u64> = HashMap::new();
    let mut finals = HashSet::new();
    let (mut crash_points, mut states, mut resumed) = (0u64, 0u64, 0u64);
    for k in 1..=total {
        let machine = Machine::new(&paths, &originals, Some(k));
        let result = case
            .op
            .run(&orig_dir, case.active, &machine.options(&base_options));
        assert!(
            machine.crashed(),
            "{}: no crash at write {k} of {total}",
            case.name
        );
        assert!(
            result.is_err(),
            "{}: the merge succeeded despite a crash at write {k}",
            case.name
        );
        crash_points += 1;
        for mode in modes(k) {
            let crashed: Vec<Vec<u8>> = machine
                .disks
                .iter()
                .enumerate()
                .map(|(i, (_, d))| d.crash_image(for_disk(mode, i)))
                .collect();
            if !seen.insert(fingerprint(&crashed)) {
                continue;
            }
            states += 1;
            let label = format!(
                "{}: crash after write {k} of {total}, unflushed {mode:?}",
                case.name
            );
            write_all(&s, "crash", names, &crashed);
            // No corruption; remember the leaks. A crash can leave refcounts raised for
            // clusters past the end of the file (raised refcounts are durable before the
            // clusters are written), which qemu-img check does not count until a rerun
            // grows the file; so the leaks are counted on a copy padded to cover every
            // cluster the interrupted run could have allocated: it is a prefix of the
            // uninterrupted run, so no further than that run's file, or the live one.
            let mut leaked = vec![0u64; n];
            for i in 0..n {
                if crashed[i] == originals[i] || !is_qcow2(&crashed[i]) {
                    continue;
                }
                let reach = machine.disks[i].1.live_bytes().len().max(finished[i].len());
                leaked[i] = *checked
                    .entry((i, fingerprint(&crashed[i])))
                    .or_insert_with(|| {
                        leaks(&s, "crash", names[i], &label);
                        let mut padded = crashed[i].clone();
                        padded.resize(padded.len().max(reach), 0);
                        // Beside the others, so that its backing file opens.
                        let name = format!("padded-{}", names[i]);
                        write_all(&s, "crash", &[&name], &[padded]);
                        let found = leaks(&s, "crash", &name, &label);
                        std::fs::remove_file(s.path(&format!("crash/{name}"))).unwrap();
                        found
                    });
            }
            // Old or new backing pointers, and the content they expose unchanged (the
            // active image's as qemu-img reads it, the others' as the library does).
            let crash_pointers: Vec<Option<String>> = names
                .iter()
                .map(|m| pointer(&s.path(&format!("crash/{m}"))))
                .collect();
            for i in 0..n {
                let p = &crash_pointers[i];
                assert!(
                    *p == pointers_before[i] || *p == pointers_after[i],
                    "{label}: {} points at {p:?}, neither {:?} nor {:?}",
                    names[i],
                    pointers_before[i],
                    pointers_after[i]
                );
                if let Some(before) = &views_before[i] {
                    let now = if names[i] == case.active {
                        view(&s, "crash", names[i])
                    } else {
                        our_view(&s, "crash", names[i])
                    };
                    assert!(
                        now == *before,
                        "{label}: {} no longer shows what it showed",
                        names[i]
                    );
                }
            }
            snapshot_unchanged("crash", &label);
            // Running the same merge again completes it.
            let complete = crash_pointers == pointers_after;
            if complete && case.op.refuses_rerun_when_complete() {
                // Re-pointed already: the merge is done; these files are its result.
            } else {
                write_all(&s, "before", names, &crashed);
                let rerun = case
                    .op
                    .run(&s.path("crash"), case.active, &base_options)
                    .unwrap_or_else(|e| panic!("{label}: rerun: {e}"));
                // Until the final step (re-pointing, emptying) began, the rerun has the
                // whole work before it, done or not.
                let only_dest_written = (0..n).all(|i| i == dest || crashed[i] == originals[i])
                    && crash_pointers == pointers_before;
                let counted = if only_dest_written {
                    work(&rerun) == work(&clean)
                } else {
                    work(&rerun) <= work(&clean)
                };
                if !counted {
                    fail(
                        &s,
                        &label,
                        &format!("rerun {rerun:?}, uninterrupted {clean:?}"),
                    );
                }
                if rerun.already_done_bytes > clean.already_done_bytes {
                    resumed += 1;
                }
            }
            // What the rerun left (sets seen before were checked then, but the leaks).
            let result = read_all(&s, "crash", names);
            let first_time = finals.insert(fingerprint(&result));
            for i in 0..n {
                let name = names[i];
                if is_qcow2(&result[i]) && result[i] != originals[i] {
                    let after = *checked
                        .entry((i, fingerprint(&result[i])))
                        .or_insert_with(|| leaks(&s, "crash", name, &format!("{label}, rerun")));
                    if after > leaked[i] {
                        let before = leaked[i];
                        fail(
                            &s,
                            &label,
                            &format!(
                                "{name} leaks {after} clusters after the rerun, {before} before"
                            ),
                        );
                    }
                }
                if !first_time {
                    continue;
                }
                assert_eq!(
                    pointer(&s.path(&format!("crash/{name}"))),
                    pointers_after[i],
                    "{label}: {name} after the rerun"
                );
                let now = if name == case.active {
                    view(&s, "crash", name)
                } else {
                    our_view(&s, "crash", name)
                };
                assert!(
                    now == views_after[i],
                    "{label}: {name} after the rerun does not show what an uninterrupted merge leaves"
                );
            }
            if first_time {
                snapshot_unchanged("crash", &format!("{label}, rerun"));
            }
        }
    }
    eprintln!(
        "{}: {total} writes; {crash_points} crash points, {states} distinct crashed sets of {n} images \
         checked and re-run ({resumed} reruns found more already done than a fresh run: {clean:?})",
        case.name
    );
}

const MIB: u64 = 1 << 20;

fn io(s: &Scratch, name: &str, format: &str, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    s.qemu_io(name, format, &commands);
}

/// base (64 KiB clusters, one compressed) <- mid (4 KiB) <- top (512 bytes): data,
/// zero clusters over data below, discards.
fn mixed(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=64k", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x11 0 512k",
            "write -c -P 0x12 768k 64k",
            "write -P 0x13 896k 64k",
        ],
    );
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "cluster_size=4k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x21 60k 72k",
            "write -z 256k 64k",
            "write -P 0x22 800k 32k",
            "discard 808k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=512", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x31 4k 2k",
            "write -P 0x32 100k 3k",
            "write -z 300k 8k",
            "write -P 0x33 900k 16k",
            "write -P 0x34 500k 4k",
            "discard 502k 1k",
            "write -z -u 64k 4k",
            "write -P 0x35 140k 20k",
            "write -P 0x36 200k 12k",
            "write -P 0x37 770k 6k",
            "write -z 840k 24k",
        ],
    );
}

/// [`mixed`] and another image to rebase onto, equal to the old chain in part.
fn mixed_and_other(s: &Scratch) {
    mixed(s);
    s.create("other.qcow2", "cluster_size=64k", MIB);
    io(
        s,
        "other.qcow2",
        "qcow2",
        &[
            "write -P 0xd1 0 128k",
            "write -P 0x11 128k 128k",
            "write -z 600k 64k",
        ],
    );
}

/// A raw base under mid (4 KiB clusters) and top (64 KiB).
fn raw_base(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    io(
        s,
        "base.raw",
        "raw",
        &["write -P 0x51 0 384k", "write -P 0x52 640k 128k"],
    );
    s.create_overlay("mid.qcow2", "base.raw", "raw", "cluster_size=4k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x61 16k 40k",
            "write -z 320k 32k",
            "write -P 0x62 700k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=64k", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x71 64k 64k",
            "write -z 640k 64k",
            "write -P 0x72 1000k 8k",
        ],
    );
}

/// base (32 KiB clusters, extended L2: 1 KiB subclusters) <- top (64 KiB, extended L2).
fn extended_l2(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=32k,extended_l2=on", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x81 0 200k",
            "write -P 0x82 300k 1k",
            "write -z 96k 3k",
        ],
    );
    s.create_overlay(
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "cluster_size=64k,extended_l2=on",
        None,
    );
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x91 2k 2k",
            "write -P 0x92 70k 6k",
            "write -z 128k 8k",
            "write -P 0x93 520k 64k",
            "discard 530k 4k",
        ],
    );
}

/// base (4 KiB clusters) with an internal snapshot and writes after it (so some clusters
/// are shared with the snapshot) <- mid (64 KiB) <- top (512 bytes).
fn snapshot_base(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=4k", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &["write -P 0xa1 0 256k", "write -P 0xa2 512k 64k"],
    );
    s.qemu_img(&["snapshot", "-c", "snap", "base.qcow2"]);
    io(s, "base.qcow2", "qcow2", &["write -P 0xa3 128k 16k"]);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0xb1 64k 128k",
            "write -z 512k 16k",
            "write -P 0xb2 900k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=512", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &["write -P 0xc1 0 1k", "write -P 0xc2 200k 4k"],
    );
}

const CHAIN: &[&str] = &["top.qcow2", "mid.qcow2", "base.qcow2"];

fn commit(base: Option<&'static str>, top: Option<&'static str>, keep: bool) -> Op {
    Op::Commit { base, top, keep }
}

#[test]
fn commit_keep_top_into_mid() {
    crash_every_write(&Case {
        name: "commit -d (top into mid; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "mid.qcow2",
        unchanged: &["top.qcow2", "base.qcow2"],
        snapshot: None,
        op: commit(None, None, true),
    });
}

#[test]
fn commit_top_into_mid_and_empty_it() {
    crash_every_write(&Case {
        name: "commit (top into mid, top emptied; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "mid.qcow2",
        unchanged: &["top.qcow2", "base.qcow2"],
        snapshot: None,
        op: commit(None, None, false),
    });
}

#[test]
fn commit_through_mid_into_base() {
    crash_every_write(&Case {
        name: "commit -b base (top and mid into base; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "base.qcow2",
        unchanged: &["top.qcow2"],
        snapshot: None,
        op: commit(Some("base.qcow2"), None, false),
    });
}

#[test]
fn commit_through_mid_into_base_by_storage_copies() {
    crash_every_write_copying(
        &Case {
            name: "commit -b base by storage copies (64k/4k/512 clusters)",
            build: mixed,
            images: CHAIN,
            active: "top.qcow2",
            dest: "base.qcow2",
            unchanged: &["top.qcow2"],
            snapshot: None,
            op: commit(Some("base.qcow2"), None, false),
        },
        StorageCopy::Always,
    );
}

#[test]
fn pull_everything_by_storage_copies() {
    crash_every_write_copying(
        &Case {
            name: "pull by storage copies (64k/4k/512 clusters)",
            build: mixed,
            images: CHAIN,
            active: "top.qcow2",
            dest: "top.qcow2",
            unchanged: CHAIN,
            snapshot: None,
            op: Op::Pull { base: None },
        },
        StorageCopy::Always,
    );
}

#[test]
fn commit_middle_range_and_repoint_top() {
    crash_every_write(&Case {
        name: "commit -t mid (mid into base, top re-pointed; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "base.qcow2",
        unchanged: &["top.qcow2", "mid.qcow2"],
        snapshot: None,
        op: commit(None, Some("mid.qcow2"), false),
    });
}

#[test]
fn pull_everything() {
    crash_every_write(&Case {
        name: "pull (everything into top; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "top.qcow2",
        unchanged: CHAIN,
        snapshot: None,
        op: Op::Pull { base: None },
    });
}

#[test]
fn pull_down_to_base() {
    crash_every_write(&Case {
        name: "pull -b base (mid into top; 64k/4k/512 clusters)",
        build: mixed,
        images: CHAIN,
        active: "top.qcow2",
        dest: "top.qcow2",
        unchanged: CHAIN,
        snapshot: None,
        op: Op::Pull {
            base: Some("base.qcow2"),
        },
    });
}

#[test]
fn safe_rebase_onto_another_image() {
    crash_every_write(&Case {
        name: "rebase -b other (safe; 64k/4k/512 clusters)",
        build: mixed_and_other,
        images: &["top.qcow2", "mid.qcow2", "base.qcow2", "other.qcow2"],
        active: "top.qcow2",
        dest: "top.qcow2",
        unchanged: &["top.qcow2", "mid.qcow2", "base.qcow2", "other.qcow2"],
        snapshot: None,
        op: Op::Rebase {
            backing: "other.qcow2",
        },
    });
}

#[test]
fn commit_into_an_extended_l2_base() {
    crash_every_write(&Case {
        name: "commit -d (into a base with extended L2)",
        build: extended_l2,
        images: &["top.qcow2", "base.qcow2"],
        active: "top.qcow2",
        dest: "base.qcow2",
        unchanged: &["top.qcow2"],
        snapshot: None,
        op: commit(None, None, true),
    });
}

#[test]
fn pull_into_an_extended_l2_top() {
    crash_every_write(&Case {
        name: "pull (into a top with extended L2)",
        build: extended_l2,
        images: &["top.qcow2", "base.qcow2"],
        active: "top.qcow2",
        dest: "top.qcow2",
        unchanged: &["top.qcow2", "base.qcow2"],
        snapshot: None,
        op: Op::Pull { base: None },
    });
}

#[test]
fn commit_into_a_raw_base() {
    crash_every_write(&Case {
        name: "commit -b base.raw (top and mid into a raw base)",
        build: raw_base,
        images: &["top.qcow2", "mid.qcow2", "base.raw"],
        active: "top.qcow2",
        dest: "base.raw",
        unchanged: &["top.qcow2"],
        snapshot: None,
        op: commit(Some("base.raw"), None, false),
    });
}

#[test]
fn pull_from_a_raw_base() {
    crash_every_write(&Case {
        name: "pull (everything from a raw base into top)",
        build: raw_base,
        images: &["top.qcow2", "mid.qcow2", "base.raw"],
        active: "top.qcow2",
        dest: "top.qcow2",
        unchanged: &["top.qcow2", "mid.qcow2", "base.raw"],
        snapshot: None,
        op: Op::Pull { base: None },
    });
}

#[test]
fn commit_into_a_base_with_an_internal_snapshot() {
    crash_every_write(&Case {
        name: "commit -t mid (into a base with an internal snapshot)",
        build: snapshot_base,
        images: CHAIN,
        active: "top.qcow2",
        dest: "base.qcow2",
        unchanged: &["top.qcow2", "mid.qcow2"],
        snapshot: Some("snap"),
        op: commit(None, Some("mid.qcow2"), false),
    });
}
