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
//!
//! The files: `machine.rs` (the disks behind one power switch), `case.rs` (a chain and
//! the merge run on it), `crash.rs` (the crash at every write and what is checked after
//! it), `files.rs` (the images of a case as files, and what they hold), `chains.rs` (the
//! chains the cases build); here, the cases.

#[path = "../common/mod.rs"]
mod common;

mod case;
mod chains;
mod crash;
mod files;
mod machine;

use qcow2_engine::ops::StorageCopy;

use case::{Case, Op};
use chains::{extended_l2, mixed, mixed_and_other, raw_base, snapshot_base};
use crash::{crash_every_write, crash_every_write_copying};

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
        name: "commit --top mid (mid into base, top re-pointed; 64k/4k/512 clusters)",
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
        name: "commit --top mid (into a base with an internal snapshot)",
        build: snapshot_base,
        images: CHAIN,
        active: "top.qcow2",
        dest: "base.qcow2",
        unchanged: &["top.qcow2", "mid.qcow2"],
        snapshot: Some("snap"),
        op: commit(None, Some("mid.qcow2"), false),
    });
}
