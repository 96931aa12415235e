//! `remove`: an external snapshot leaves every chain it is in. Each image that used it
//! shows exactly what it showed (checked with qemu-img against raw copies taken before)
//! and uses the layer's backing file (or none); every image passes `qemu-img check`; an
//! interruption at any point is completed by running the same command again.

mod common;

use std::path::Path;

use common::{Scratch, assert_one_line_failure, backing_of};
use qcow2_engine::ops::{self, RemoveMethod, RemoveOptions};
use qcow2_engine::{ChainOptions, Error};

const IMAGES: &[&str] = &[
    "base.qcow2",
    "mid.qcow2",
    "top.qcow2",
    "top2.qcow2",
    "other.qcow2",
];

/// base <- mid <- {top, top2}; with `sibling`, base <- other too. Every layer has data,
/// some of it overlapping.
fn tree(s: &Scratch, sibling: bool, options: &str) {
    s.create("base.qcow2", options, 2 << 20);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M".into(), "write -z 1M 64k".into()],
    );
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", options, None);
    s.qemu_io(
        "mid.qcow2",
        "qcow2",
        &["write -P 2 64k 128k".into(), "write -z 512k 64k".into()],
    );
    for (top, pattern) in [("top.qcow2", 3), ("top2.qcow2", 4)] {
        s.create_overlay(top, "mid.qcow2", "qcow2", options, None);
        s.qemu_io(top, "qcow2", &[format!("write -P {pattern} 96k 32k")]);
    }
    if sibling {
        s.create_overlay("other.qcow2", "base.qcow2", "qcow2", options, None);
        s.qemu_io("other.qcow2", "qcow2", &["write -P 5 1M 4k".into()]);
    }
}

/// What each image shows now, as raw files `NAME.raw` (qemu-img convert).
fn snapshot_views(s: &Scratch) {
    for image in IMAGES {
        if s.path(image).exists() {
            let raw = format!("{image}.raw");
            s.qemu_img(&["convert", "-U", "-O", "raw", image, &raw]);
        }
    }
}

/// The users of the removed layer (and their siblings) show what they showed; every image
/// still there passes `qemu-img check`. (The base may change: with the layer its only
/// user, it takes the layer's data.)
fn assert_views(s: &Scratch, label: &str) {
    for image in IMAGES {
        if !s.path(image).exists() {
            continue;
        }
        let raw = format!("{image}.raw");
        let kept = ["top.qcow2", "top2.qcow2", "other.qcow2"].contains(image);
        if kept && s.path(&raw).exists() {
            s.assert_same_content(image, &raw, &format!("{label}: {image}"));
        }
        s.assert_clean(image, &format!("{label}: {image}"));
    }
}

fn remove(
    s: &Scratch,
    layer: &str,
    options: &RemoveOptions,
) -> qcow2_engine::Result<ops::RemoveReport> {
    ops::remove(s.path(layer), options, &mut |_, _| true)
}

#[test]
fn a_layer_that_is_its_backing_files_only_user_goes_down_into_it() {
    for options in [
        "cluster_size=64k",
        "cluster_size=4k,extended_l2=off",
        "compat=0.10",
    ] {
        let s = Scratch::new();
        tree(&s, false, options);
        snapshot_views(&s);
        let before: Vec<Vec<u8>> = IMAGES
            .iter()
            .filter(|i| s.path(i).exists())
            .map(|i| std::fs::read(s.path(i)).unwrap())
            .collect();
        // A dry run plans and counts, and changes nothing.
        let dry = RemoveOptions {
            merge: ops::MergeOptions {
                dry_run: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let planned = remove(&s, "mid.qcow2", &dry).unwrap();
        assert_eq!(planned.method, RemoveMethod::CommitDown, "{options}");
        assert!(planned.merge.data_bytes > 0, "{planned:?}");
        let after: Vec<Vec<u8>> = IMAGES
            .iter()
            .filter(|i| s.path(i).exists())
            .map(|i| std::fs::read(s.path(i)).unwrap())
            .collect();
        assert!(after == before, "{options}: a dry run changed an image");

        let report = remove(&s, "mid.qcow2", &RemoveOptions::default()).unwrap();
        assert_eq!(report.method, RemoveMethod::CommitDown);
        assert_eq!(report.dependents.len(), 2);
        assert_eq!(
            report.merge.data_bytes, planned.merge.data_bytes,
            "{options}"
        );
        assert!(report.deleted && !s.path("mid.qcow2").exists());
        assert!(!s.path(".mid.qcow2.qimg-remove").exists());
        for top in ["top.qcow2", "top2.qcow2"] {
            assert_eq!(
                backing_of(&s, top).as_deref(),
                Some("base.qcow2"),
                "{options}"
            );
        }
        assert_views(&s, options);
    }
}

#[test]
fn a_layer_beside_other_users_of_its_backing_file_goes_up_into_its_users() {
    let s = Scratch::new();
    tree(&s, true, "");
    snapshot_views(&s);
    let base_before = std::fs::read(s.path("base.qcow2")).unwrap();
    let out = s.qimg(&["remove", "mid.qcow2"]);
    assert!(
        out.contains("Removed mid.qcow2: its data went up into"),
        "{out}"
    );
    assert!(!s.path("mid.qcow2").exists());
    assert_eq!(std::fs::read(s.path("base.qcow2")).unwrap(), base_before);
    for top in ["top.qcow2", "top2.qcow2"] {
        assert_eq!(backing_of(&s, top).as_deref(), Some("base.qcow2"));
    }
    assert_views(&s, "pull up");

    // The root: its data goes up into each user, which then stands alone.
    s.qimg(&["remove", "--keep", "base.qcow2"]);
    assert!(s.path("base.qcow2").exists(), "--keep deleted it");
    for image in ["top.qcow2", "top2.qcow2", "other.qcow2"] {
        assert_eq!(backing_of(&s, image), None, "{image}");
    }
    assert_views(&s, "root");
}

#[test]
fn refusals_name_the_layer_and_change_nothing() {
    let s = Scratch::new();
    tree(&s, true, "");
    let before: Vec<Vec<u8>> = IMAGES
        .iter()
        .map(|i| std::fs::read(s.path(i)).unwrap())
        .collect();
    for (args, expected) in [
        (
            &["remove", "top.qcow2"][..],
            "top.qcow2: invalid argument: no image uses it as backing file; removing it would \
             lose its data",
        ),
        (&["remove", "missing.qcow2"], "missing.qcow2"),
    ] {
        let out = s.qimg_output(args);
        assert_one_line_failure(&out, &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let after: Vec<Vec<u8>> = IMAGES
        .iter()
        .map(|i| std::fs::read(s.path(i)).unwrap())
        .collect();
    assert!(after == before, "a refused remove changed an image");

    // Internal snapshots: the layer's would be deleted with it; a user's would read a
    // new backing file after a pull.
    for (image, expected) in [
        (
            "mid.qcow2",
            "it holds internal snapshots (s) that deleting it would lose",
        ),
        (
            "top.qcow2",
            "top.qcow2 holds internal snapshots, which would show something else",
        ),
    ] {
        s.qemu_img(&["snapshot", "-c", "s", image]);
        let before = std::fs::read(s.path(image)).unwrap();
        let out = s.qimg_output(&["remove", "mid.qcow2"]);
        assert_one_line_failure(&out, image);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{image}: {stderr}");
        assert_eq!(std::fs::read(s.path(image)).unwrap(), before);
        s.qemu_img(&["snapshot", "-d", "s", image]);
    }
}

#[test]
fn users_in_other_directories_are_found_with_also_in() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("vm")).unwrap();
    s.create("base.qcow2", "", 1 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 256k".into()]);
    let base = s.path("base.qcow2").display().to_string();
    s.create_overlay("vm/disk.qcow2", &base, "qcow2", "", None);
    s.qemu_io("vm/disk.qcow2", "qcow2", &["write -P 2 0 64k".into()]);
    let before = s.reference("vm/disk.qcow2", "qcow2");
    let out = s.qimg_output(&["remove", "base.qcow2"]);
    assert_one_line_failure(&out, "users only in another directory");
    s.qimg(&["remove", "--also-in", "vm", "base.qcow2"]);
    assert_eq!(backing_of(&s, "vm/disk.qcow2"), None);
    assert_eq!(s.reference("vm/disk.qcow2", "qcow2"), before);
    s.assert_clean("vm/disk.qcow2", "also-in");
}

/// Stopped at every progress call of both methods, then run again: every image shows what
/// it showed at every stop and after, and the rerun finishes the same plan.
#[test]
fn an_interrupted_remove_is_completed_by_running_it_again() {
    for sibling in [false, true] {
        let mut k = 0;
        loop {
            k += 1;
            let s = Scratch::new();
            tree(&s, sibling, "cluster_size=4k");
            snapshot_views(&s);
            let options = RemoveOptions {
                merge: ops::MergeOptions {
                    checkpoint_bytes: 16 << 10,
                    ..Default::default()
                },
                ..Default::default()
            };
            let mut calls = 0;
            let result = ops::remove(s.path("mid.qcow2"), &options, &mut |_, _| {
                calls += 1;
                calls < k
            });
            let label = format!("sibling={sibling}, stopped at call {k}");
            match result {
                Err(e) => {
                    assert!(matches!(e.root(), Error::Cancelled), "{label}: {e}");
                    assert!(s.path("mid.qcow2").exists(), "{label}");
                    assert!(
                        s.path(".mid.qcow2.qimg-remove").exists(),
                        "{label}: journal"
                    );
                    assert_views(&s, &label);
                    let report = remove(&s, "mid.qcow2", &options)
                        .unwrap_or_else(|e| panic!("{label}: rerun: {}", e.report()));
                    let expected = if sibling {
                        RemoveMethod::PullUp
                    } else {
                        RemoveMethod::CommitDown
                    };
                    assert_eq!(report.method, expected, "{label}");
                }
                Ok(_) => break,
            }
            assert!(!s.path("mid.qcow2").exists(), "{label}");
            assert!(!s.path(".mid.qcow2.qimg-remove").exists(), "{label}");
            for top in ["top.qcow2", "top2.qcow2"] {
                assert_eq!(
                    backing_of(&s, top).as_deref(),
                    Some("base.qcow2"),
                    "{label}"
                );
            }
            assert_views(&s, &label);
            assert!(k < 10_000, "never finished");
        }
        assert!(k > 2, "sibling={sibling}: only {k} progress calls");
    }
}

/// Writes the journal of a remove of mid.qcow2 by hand, in the format documented in
/// `ops/merge/remove.rs`: `method` ("commit" or "pull"), names in the scratch directory.
fn write_journal(s: &Scratch, method: &str, backing: &str, dependents: &[&str]) {
    let hex = |name: &str| {
        let path = s.path(name).display().to_string();
        path.bytes().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut body = format!(
        "qimg remove journal 1\n{method}\nbacking {}\n",
        hex(backing)
    );
    for dependent in dependents {
        body.push_str(&format!("dependent {}\n", hex(dependent)));
    }
    let crc = crc32fast::hash(body.as_bytes());
    std::fs::write(
        s.path(".mid.qcow2.qimg-remove"),
        format!("{body}end {crc:08x}\n"),
    )
    .unwrap();
}

/// Every user re-pointed, the layer not yet deleted (a crash between the two): the
/// journal lets the same command finish instead of refusing a layer nobody uses.
#[test]
fn a_remove_stopped_before_deleting_the_layer_finishes_from_its_journal() {
    let s = Scratch::new();
    tree(&s, false, "");
    snapshot_views(&s);
    write_journal(&s, "commit", "base.qcow2", &["top.qcow2", "top2.qcow2"]);
    // The state the journal describes: mid's data in base, both users re-pointed.
    s.qemu_img(&["commit", "-d", "mid.qcow2"]);
    for top in ["top.qcow2", "top2.qcow2"] {
        s.qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "base.qcow2", top]);
    }
    assert_views(&s, "before the rerun");
    let report = ops::remove(
        s.path("mid.qcow2"),
        &RemoveOptions::default(),
        &mut |_, _| true,
    )
    .unwrap();
    assert!(report.deleted);
    assert_eq!(report.merge, ops::MergeReport::default());
    assert!(!s.path("mid.qcow2").exists());
    assert!(!s.path(".mid.qcow2.qimg-remove").exists());
    assert_views(&s, "after the rerun");
}

/// In memory through a `MemOpener`: the users are found by listing its directories.
#[test]
fn remove_runs_in_memory_through_a_mem_opener() {
    use std::sync::Arc;

    use qcow2_engine::storage::MemOpener;
    use qcow2_engine::{Chain, CreateOptions, Format, create_on};

    let fs = Arc::new(MemOpener::new());
    let chain_options = ChainOptions {
        opener: Some(fs.clone()),
        ..ChainOptions::default()
    };
    create_on(&*fs.create("vm/base.qcow2"), &CreateOptions::qcow2(1 << 20)).unwrap();
    for (name, backing) in [
        ("vm/mid.qcow2", "base.qcow2"),
        ("vm/a.qcow2", "mid.qcow2"),
        ("vm/b.qcow2", "mid.qcow2"),
    ] {
        let mut options = CreateOptions::overlay(backing, Format::Qcow2);
        options.size = Some(1 << 20);
        options.open_backing = false;
        create_on(&*fs.create(name), &options).unwrap();
    }
    let writable = chain_options.clone().writable(true);
    for (name, byte) in [("vm/base.qcow2", 1u8), ("vm/mid.qcow2", 2)] {
        let chain = Chain::open_with(name, &writable).unwrap();
        chain
            .write_at(&[byte; 4096], u64::from(byte) * 4096)
            .unwrap();
        chain.close().unwrap();
    }
    let read = |name: &str| {
        let chain = Chain::open_with(name, &chain_options).unwrap();
        let mut buf = vec![0u8; 16384];
        chain.read_at(&mut buf, 0).unwrap();
        buf
    };
    let before = read("vm/a.qcow2");
    let options = RemoveOptions {
        merge: ops::MergeOptions {
            chain: chain_options.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let report = ops::remove(Path::new("vm/mid.qcow2"), &options, &mut |_, _| true).unwrap();
    assert_eq!(report.method, RemoveMethod::CommitDown);
    assert!(report.deleted);
    assert!(fs.get("vm/mid.qcow2").is_none());
    assert_eq!(read("vm/a.qcow2"), before);
    assert_eq!(read("vm/b.qcow2"), before);
    let chain = Chain::open_with("vm/a.qcow2", &chain_options).unwrap();
    assert_eq!(chain.layers().len(), 2);
}

/// A journal a crash left behind for an older file of the same name does not steer a new
/// remove: its users are not the layer's users now, so the plan is made afresh.
#[test]
fn a_stale_journal_is_ignored() {
    let s = Scratch::new();
    tree(&s, false, "");
    snapshot_views(&s);
    // An old remove of another mid.qcow2, whose only user was gone.qcow2.
    write_journal(&s, "pull", "base.qcow2", &["gone.qcow2"]);
    let report = remove(&s, "mid.qcow2", &RemoveOptions::default()).unwrap();
    assert_eq!(report.method, RemoveMethod::CommitDown);
    assert_eq!(report.dependents.len(), 2);
    for top in ["top.qcow2", "top2.qcow2"] {
        assert_eq!(backing_of(&s, top).as_deref(), Some("base.qcow2"));
    }
    assert!(!s.path("mid.qcow2").exists());
    assert!(!s.path(".mid.qcow2.qimg-remove").exists());
    assert_views(&s, "stale journal");
}
