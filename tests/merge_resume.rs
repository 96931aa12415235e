//! Resuming merges: a merge cancelled halfway keeps what it copied, running it again
//! finishes it and reports what it found already in place (`already_done_bytes`), and
//! written + already done is (nearly: see `compare_probed`) the whole work a fresh run has
//! before it. A fresh merge into a destination that allocates nothing there finds nothing
//! in place.

mod common;

use common::{Scratch, assert_check_clean as check, backing_of, merge_chain};
use qcow2_engine::Error;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions, MergeReport, Progress};

const IMAGES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

type Merge = fn(&Scratch, &MergeOptions, Progress<'_>) -> qcow2_engine::Result<MergeReport>;

fn commit_through_mid(
    s: &Scratch,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> qcow2_engine::Result<MergeReport> {
    let commit = CommitOptions {
        base: Some(s.path("ours/base.qcow2")),
        merge: options.clone(),
        ..CommitOptions::default()
    };
    ops::commit(s.path("ours/top.qcow2"), &commit, progress)
}

fn commit_and_empty(
    s: &Scratch,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> qcow2_engine::Result<MergeReport> {
    let commit = CommitOptions {
        merge: options.clone(),
        ..CommitOptions::default()
    };
    ops::commit(s.path("ours/top.qcow2"), &commit, progress)
}

fn pull(
    s: &Scratch,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> qcow2_engine::Result<MergeReport> {
    ops::pull(s.path("ours/top.qcow2"), None, options, progress)
}

fn rebase_onto_other(
    s: &Scratch,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> qcow2_engine::Result<MergeReport> {
    ops::rebase(
        s.path("ours/top.qcow2"),
        Some("other.qcow2"),
        Some("qcow2"),
        false,
        options,
        progress,
    )
}

fn work(r: &MergeReport) -> u64 {
    r.data_bytes + r.zero_bytes + r.already_done_bytes
}

/// Cancels `merge` halfway through, runs it again, and checks what the rerun reports.
fn cancel_and_resume(options: &str, seed: u64, name: &str, merge: Merge) {
    let label = format!("{name} ({options})");
    let s = Scratch::new();
    merge_chain(&s, options, seed);
    s.create("ours/other.qcow2", "cluster_size=64k", common::MERGE_SIZE);
    s.qemu_io(
        "ours/other.qcow2",
        "qcow2",
        &["write -P 0x77 1M 3M".into(), "write -z 5M 1M".into()],
    );
    let shown = s.reference("ours/top.qcow2", "qcow2");
    let dry = MergeOptions {
        dry_run: true,
        ..MergeOptions::default()
    };
    let whole = merge(&s, &dry, &mut |_, _| true).unwrap();
    assert!(work(&whole) > 0, "{label}: nothing to do");

    let mut halfway = |done: u64, total: u64| done < total / 2;
    let err = merge(&s, &MergeOptions::default(), &mut halfway).unwrap_err();
    assert!(matches!(err.root(), Error::Cancelled), "{label}: {err}");
    for f in IMAGES {
        check(&s, &format!("ours/{f}"));
    }
    assert!(
        s.reference("ours/top.qcow2", "qcow2") == shown,
        "{label}: the cancelled merge changed what top shows"
    );
    // A dry run now sees what the cancelled run did, as the rerun will.
    let left = merge(&s, &dry, &mut |_, _| true).unwrap();

    let rerun = merge(&s, &MergeOptions::default(), &mut |_, _| true).unwrap();
    assert_eq!(rerun, left, "{label}: the dry run after the cancel");
    assert!(
        rerun.already_done_bytes > whole.already_done_bytes,
        "{label}: rerun {rerun:?}, fresh {whole:?}"
    );
    // Written + already done covers the whole work, except pieces counted as different
    // because their first block differs (`compare_probed`: a resumed merge reads one
    // block of a piece the guest changed, not the piece); those are at most a few.
    assert!(
        work(&rerun) <= work(&whole) && work(&rerun) * 10 >= work(&whole) * 9,
        "{label}: rerun {rerun:?}, fresh {whole:?}"
    );
    assert!(
        rerun.data_bytes + rerun.zero_bytes < whole.data_bytes + whole.zero_bytes,
        "{label}: rerun {rerun:?}, fresh {whole:?}"
    );
    for f in IMAGES {
        check(&s, &format!("ours/{f}"));
    }
    assert!(
        s.reference("ours/top.qcow2", "qcow2") == shown,
        "{label}: the finished merge changed what top shows"
    );
    eprintln!("{label}: fresh {whole:?}; after a cancel halfway {rerun:?}");
}

const OPTIONS: [&str; 3] = [
    "cluster_size=64k",
    "cluster_size=4k",
    // The top's own data and pulled data share clusters (not subclusters).
    "cluster_size=64k,extended_l2=on",
];

#[test]
fn a_cancelled_commit_through_mid_resumes() {
    for (i, options) in OPTIONS.iter().enumerate() {
        cancel_and_resume(
            options,
            100 + i as u64,
            "commit -b base",
            commit_through_mid,
        );
    }
}

#[test]
fn a_cancelled_commit_into_mid_resumes() {
    for (i, options) in OPTIONS.iter().enumerate() {
        cancel_and_resume(options, 110 + i as u64, "commit", commit_and_empty);
    }
}

#[test]
fn a_cancelled_pull_resumes() {
    for (i, options) in OPTIONS.iter().enumerate() {
        cancel_and_resume(options, 120 + i as u64, "pull", pull);
    }
}

#[test]
fn a_cancelled_safe_rebase_resumes() {
    for (i, options) in OPTIONS.iter().enumerate() {
        cancel_and_resume(
            options,
            130 + i as u64,
            "rebase -b other",
            rebase_onto_other,
        );
    }
}

#[test]
fn fresh_merges_into_an_empty_destination_find_nothing_in_place() {
    let s = Scratch::new();
    let size = 4u64 << 20;
    s.create("base.qcow2", "cluster_size=64k", size);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "cluster_size=4k", None);
    s.qemu_io(
        "mid.qcow2",
        "qcow2",
        &["write -P 0x21 0 1M".into(), "write -z 2M 512k".into()],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=64k", None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x31 512k 1M".into(),
            "write -P 0x32 3M 64k".into(),
        ],
    );
    for f in IMAGES {
        s.copy(f, &format!("pulled-{f}"));
    }
    for f in ["mid.qcow2", "top.qcow2"] {
        // The copies must name the copies below them.
        let backing = if f == "top.qcow2" {
            "pulled-mid.qcow2"
        } else {
            "pulled-base.qcow2"
        };
        s.qemu_img(&[
            "rebase",
            "-u",
            "-b",
            backing,
            "-F",
            "qcow2",
            &format!("pulled-{f}"),
        ]);
    }
    // Commit into a base that allocates nothing.
    let commit = CommitOptions {
        base: Some(s.path("base.qcow2")),
        ..CommitOptions::default()
    };
    let report = ops::commit(s.path("top.qcow2"), &commit, &mut |_, _| true).unwrap();
    assert_eq!(report.already_done_bytes, 0, "{report:?}");
    // 0..1.5 MiB and 3 MiB..+64 KiB.
    assert_eq!(report.data_bytes, (1536 + 64) << 10, "{report:?}");
    check(&s, "base.qcow2");
    // Pull into a top whose own clusters hold only its own data.
    let report = ops::pull(
        s.path("pulled-top.qcow2"),
        None,
        &MergeOptions::default(),
        &mut |_, _| true,
    )
    .unwrap();
    assert_eq!(report.already_done_bytes, 0, "{report:?}");
    assert!(report.data_bytes >= 512 << 10, "{report:?}");
    check(&s, "pulled-top.qcow2");
    assert_eq!(backing_of(&s, "pulled-top.qcow2"), None);
}

#[test]
fn a_dry_run_counts_what_is_in_place_without_reading_it_as_data() {
    // The destination already holds what the merge brings: nothing is written.
    let s = Scratch::new();
    s.create("base.qcow2", "cluster_size=64k", 1 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 0x11 0 256k".into()]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 0x11 64k 128k".into()]);
    let commit = |dry_run| CommitOptions {
        keep: true,
        merge: MergeOptions {
            dry_run,
            ..MergeOptions::default()
        },
        ..CommitOptions::default()
    };
    let before = std::fs::read(s.path("base.qcow2")).unwrap();
    let dry = ops::commit(s.path("top.qcow2"), &commit(true), &mut |_, _| true).unwrap();
    let real = ops::commit(s.path("top.qcow2"), &commit(false), &mut |_, _| true).unwrap();
    assert_eq!(dry, real);
    assert_eq!(real.already_done_bytes, 128 << 10, "{real:?}");
    assert_eq!(real.data_bytes, 0, "{real:?}");
    assert!(
        std::fs::read(s.path("base.qcow2")).unwrap() == before,
        "the base was rewritten"
    );
}
