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
//! case says what it broke. The limits that keep memory bounded by the file's real size
//! are checked with a counting allocator in `tests/hostile_memory.rs`, a binary of its
//! own: a global allocator serves every test of its binary.
//!
//! `cargo test --test hostile -- --nocapture` prints the report: cases per category, the
//! cases qemu-img reads and qimg refuses (with qimg's error; `HOSTILE_ALL=1` lists them
//! all), the slowest cases. `HOSTILE_FILTER=text` runs only the cases whose label holds
//! `text`. Needs qemu-img, qemu-io, timeout, prlimit and mkfifo.
//!
//! The files:
//! - `runner.rs`: the rules every qimg run must keep, and the runner that checks them;
//! - `layout.rs`: where an image's structures are, read by the spec alone, and the byte
//!   helpers that damage them;
//! - `fixtures.rs`: the valid images qemu-img makes, and a case that damages one;
//! - the cases by theme: `header.rs` (header fields and extensions), `tables.rs` (L1,
//!   L2, compressed, refcount and snapshot tables), `cuts_and_flips.rs` (truncation and
//!   random flips), `chains.rs` (backing chains and backing names), `data_file.rs`
//!   (external data files), `bitmaps.rs` (persistent bitmaps: the extension, directory
//!   entries, bitmap tables);
//! - `limits.rs`: limits checked through the library, and qimg's usage errors;
//! - `writes.rs`: writing commands on the damaged-bitmap cases, which must not corrupt
//!   what they write (checked with `qemu-img check`);
//! - here: every case in order, and the test that runs them and prints the report.

#[path = "../common/mod.rs"]
mod common;

mod bitmaps;
mod chains;
mod cuts_and_flips;
mod data_file;
mod fixtures;
mod header;
mod layout;
mod limits;
mod runner;
mod tables;
mod writes;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Scratch, qimg_path};

use bitmaps::bitmap_cases;
use chains::{backing_name_cases, chain_cases};
use cuts_and_flips::{random_cases, truncation_cases};
use data_file::{data_file_cases, data_file_policy_cases};
use fixtures::{damaged, fixture, make_fixtures};
use header::{extension_cases, header_cases};
use runner::{Case, Expect, Tally, run_case};
use tables::{compressed_cases, l1_cases, l2_cases, refcount_cases, snapshot_cases};

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
    cases.extend(bitmap_cases(f("bitmaps")));
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
        ("bitmaps", 0..20),
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
