//! The rules every qimg run must keep, and the runner that checks them: a case, what it
//! must end in, the commands run on it under limits, and the tallies for the report.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::qimg_path;

/// Seconds a command may take before it counts as hung (it is killed).
pub(crate) const TIMEOUT_SECS: u32 = 10;
/// Address space a command may use: generous for the largest legitimate tables (a 32 MiB
/// L1 table, a 64 MiB snapshot table) and threads, far below what an image claiming
/// exabytes would make an unchecked allocation ask for.
const ADDRESS_SPACE: u64 = 1 << 30;

/// The read-only commands run on every case (the issue's list, then `snapshot -l` and
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
    &["io", "-r", "-c", "read 0 64k", "{img}"],
    &["snapshot", "-l", "{img}"],
    &["measure", "-O", "qcow2", "{img}"],
];

/// What a case must end in, beyond the rules every case keeps.
#[derive(Debug, Clone)]
pub(crate) enum Expect {
    /// Anything the rules allow.
    Any,
    /// Every command succeeds.
    Success,
    /// Every command that opens the backing chain fails, saying this. (`info` without
    /// `--backing-chain` does not open it.)
    ChainFails(&'static str),
    /// Every command fails, saying this.
    Fails(&'static str),
    /// The image probes as a format qimg recognises but does not open: `info` names it,
    /// every other command fails saying this.
    Foreign(&'static str),
}

type Setup = Box<dyn Fn(&Path) -> String + Send + Sync>;

/// One hostile case: `setup` writes its files into an empty directory and returns the
/// name of the image the commands get.
pub(crate) struct Case {
    pub(crate) label: String,
    pub(crate) setup: Setup,
    /// Global options given before the command (`--confine-backing DIR`, ...), with
    /// `{dir}` standing for the case directory.
    pub(crate) global: Vec<String>,
    pub(crate) expect: Expect,
    /// Compare `convert -O raw` with qemu-img's.
    pub(crate) against_qemu: bool,
}

impl Case {
    pub(crate) fn new(label: impl Into<String>, setup: Setup) -> Case {
        Case {
            label: label.into(),
            setup,
            global: Vec::new(),
            expect: Expect::Any,
            against_qemu: true,
        }
    }
    pub(crate) fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }
    pub(crate) fn global(mut self, args: &[&str]) -> Case {
        self.global = args.iter().map(|s| s.to_string()).collect();
        self
    }
    pub(crate) fn without_qemu(mut self) -> Case {
        self.against_qemu = false;
        self
    }
}

/// Tallies of what the suite saw, for the final report.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) runs: usize,
    pub(crate) failed_runs: usize,
    pub(crate) qemu_compared: usize,
    pub(crate) qemu_refused: usize,
    pub(crate) failures: Vec<String>,
    /// The slowest cases and their time.
    pub(crate) slowest: Vec<(Duration, String)>,
    /// Cases qemu-img converts and qimg refuses (with qimg's error), by category.
    pub(crate) qemu_only: std::collections::BTreeMap<&'static str, Vec<String>>,
    /// Cases and time per category.
    pub(crate) categories: std::collections::BTreeMap<&'static str, (usize, Duration)>,
}

/// The category a case label belongs to, for the report.
fn category(label: &str) -> &'static str {
    const CATEGORIES: &[(&str, &str)] = &[
        ("confine:", "backing confinement options"),
        ("chain:", "backing chains"),
        ("undamaged", "undamaged fixtures"),
        ("bitmap ", "bitmaps"),
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
pub(crate) fn run_limited(dir: &Path, args: &[String]) -> Output {
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
pub(crate) fn run_case(case: &Case, work: &Path, tally: &Mutex<Tally>) {
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
                Expect::Foreign(what) if command[0] != "info" => {
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
                Expect::Foreign(_) if command[0] == "info" => {
                    fail(format!("info does not name the format: {stderr}"))
                }
                Expect::Fails(what) | Expect::ChainFails(what) | Expect::Foreign(what)
                    if !stderr.contains(what) =>
                {
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
pub(crate) fn names_a_file(line: &str, img: &str) -> bool {
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
