//! Writing commands on damaged bitmaps: `qimg io -c 'write ...'` (which loads the enabled
//! bitmaps, records the write and stores them) and `qimg bitmap --add` (which rewrites the
//! directory) on a fresh copy of every damaged-bitmap case (`bitmaps.rs`). Each run keeps
//! the runner's rules — no panic, signal or hang; a failure is one line naming the file —
//! and a write that succeeds leaves an image `qemu-img check` finds free of corruption
//! (exit 0, or 3 for leaks). An image qemu-img already found corrupt, or could not check,
//! before the write may stay so, no worse; the report counts those.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::bitmaps::bitmap_cases;
use crate::common::{Scratch, qimg_path};
use crate::fixtures::{bitmaps_fixture, damaged};
use crate::runner::{Case, TIMEOUT_SECS, names_a_file, run_limited};

/// The writing commands, `{img}` the case's image.
const WRITES: &[&[&str]] = &[
    &["io", "-c", "write -P 1 0 4k", "{img}"],
    &["bitmap", "--add", "{img}", "new"],
];

/// What `qemu-img check` says of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QemuCheck {
    /// 0 clean, 1 not checked (the image did not open, or the check failed), 2 corrupt,
    /// 3 leaks only.
    code: i32,
    corruptions: u64,
}

fn qemu_check(dir: &Path, img: &str) -> QemuCheck {
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "30",
            "qemu-img",
            "check",
            "--output=json",
            img,
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running qemu-img check");
    let json = String::from_utf8_lossy(&out.stdout);
    let corruptions = json
        .split("\"corruptions\":")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    QemuCheck {
        code: out.status.code().unwrap_or(1),
        corruptions,
    }
}

#[derive(Default)]
struct Tally {
    runs: usize,
    failed: usize,
    clean: usize,
    /// Succeeded on an image qemu-img found corrupt before, and no more corrupt after.
    already_corrupt: Vec<String>,
    /// Succeeded on an image qemu-img could not check before, nor after.
    unchecked: Vec<String>,
    failures: Vec<String>,
}

/// Runs every writing command on a fresh copy of `case`.
fn run_writes(case: &Case, work: &Path, tally: &Mutex<Tally>) {
    let mut t = Tally::default();
    for command in WRITES {
        let dir = work.join("case");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = (case.setup)(&dir);
        let before = qemu_check(&dir, &img);
        let args: Vec<String> = command.iter().map(|a| a.replace("{img}", &img)).collect();
        let shown = format!("qimg {}", args.join(" "));
        let started = std::time::Instant::now();
        let output = run_limited(&dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let mut fail = |what: String| {
            t.failures
                .push(format!("{}: `{shown}`: {what}", case.label))
        };
        t.runs += 1;
        let Some(code) = output.status.code() else {
            fail(format!("killed by a signal ({})", output.status));
            continue;
        };
        if code == 137 || (code >= 124 && started.elapsed().as_secs() >= TIMEOUT_SECS.into()) {
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
        if code != 0 {
            t.failed += 1;
            let lines: Vec<&str> = stderr.lines().collect();
            if lines.len() != 1 {
                fail(format!("error is not one line:\n{stderr}"));
            } else if !lines[0].starts_with("qimg: ") {
                fail(format!("error does not start with 'qimg: ': {stderr}"));
            } else if !names_a_file(lines[0], &img) {
                fail(format!("error names no file: {stderr}"));
            }
            if case.label.contains("undamaged") {
                fail(format!("failed on the undamaged image: {stderr}"));
            }
            continue;
        }
        let after = qemu_check(&dir, &img);
        match after.code {
            0 | 3 => t.clean += 1,
            2 if before.code == 2 && after.corruptions <= before.corruptions => {
                t.already_corrupt.push(format!("{}: `{shown}`", case.label))
            }
            1 if before.code == 1 => t.unchecked.push(format!("{}: `{shown}`", case.label)),
            _ => fail(format!(
                "succeeded, and qemu-img check went from {before:?} to {after:?}"
            )),
        }
    }
    let mut all = tally.lock().unwrap();
    all.runs += t.runs;
    all.failed += t.failed;
    all.clean += t.clean;
    all.already_corrupt.extend(t.already_corrupt);
    all.unchecked.extend(t.unchecked);
    all.failures.extend(t.failures);
}

#[test]
fn writing_commands_on_damaged_bitmaps_never_crash_or_corrupt() {
    let s = Scratch::new();
    qimg_path();
    let f = bitmaps_fixture(&s);
    let mut cases = vec![damaged(&f, "undamaged", |_| ())];
    cases.extend(bitmap_cases(&f));
    if let Ok(filter) = std::env::var("HOSTILE_FILTER") {
        cases.retain(|c| c.label.contains(&filter));
    }
    let tally = Mutex::new(Tally::default());
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4);
    std::thread::scope(|scope| {
        for w in 0..workers {
            let (cases, tally, next) = (&cases, &tally, &next);
            let work = s.path(&format!("writer{w}"));
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    run_writes(case, &work, tally);
                }
            });
        }
    });
    let t = tally.into_inner().unwrap();
    eprintln!(
        "writes on damaged bitmaps: {} cases, {} qimg runs: {} failed cleanly, {} left \
         images qemu-img checks free of corruption, {} left corrupt images no worse, {} \
         images qemu-img could check neither before nor after",
        cases.len(),
        t.runs,
        t.failed,
        t.clean,
        t.already_corrupt.len(),
        t.unchecked.len()
    );
    let all = std::env::var("HOSTILE_ALL").is_ok();
    for (what, labels) in [
        ("already corrupt", &t.already_corrupt),
        ("qemu-img could not check", &t.unchecked),
    ] {
        for label in labels.iter().take(if all { usize::MAX } else { 3 }) {
            eprintln!("  {what}: {label}");
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
