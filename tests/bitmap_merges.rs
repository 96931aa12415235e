//! Bitmaps through the merges: after qimg's commit, pull, rebase and remove, every enabled
//! bitmap of every image still covers every byte its image's guest view changed (as after
//! QEMU's commit and stream), no bitmap loses a bit, disabled ones do not change, the
//! lists stay the same and `qemu-img check` stays silent. The libvirt-style commit merges
//! the committed layers' bitmaps into the base's.

mod common;

use std::collections::BTreeMap;

use common::bitmaps::{assert_check_silent, bitmap_list, dirty_ranges};
use common::{Rng, Scratch};
use qcow2_engine::ops::{self, CommitOptions};

const SIZE: u64 = 4 << 20;
const IMAGES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

/// base <- mid <- top, each with an enabled bitmap `on` (4 KiB) and a disabled `off`
/// holding some ranges, and scattered writes in every layer.
fn build(s: &Scratch, seed: u64) {
    s.create("base.qcow2", "cluster_size=65536", SIZE);
    s.create_overlay(
        "mid.qcow2",
        "base.qcow2",
        "qcow2",
        "cluster_size=65536",
        None,
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=4096", None);
    let mut rng = Rng::new(seed);
    for (i, image) in IMAGES.iter().enumerate() {
        s.run("qemu-io", &["-c", "write -P 1 3M 64k", image]);
        s.qemu_img(&["bitmap", "--add", "-g", "4k", image, "on"]);
        s.qemu_img(&["bitmap", "--add", image, "off"]);
        let mut commands = Vec::new();
        for _ in 0..12 {
            let off = rng.below(SIZE - 100_000);
            let len = 1 + rng.below(100_000);
            commands.push(match rng.below(4) {
                0 => format!("write -z {off} {len}"),
                _ => format!("write -P {} {off} {len}", 10 * i + 2),
            });
        }
        let mut args: Vec<&str> = commands.iter().flat_map(|c| ["-c", c.as_str()]).collect();
        args.push(image);
        s.run("qemu-io", &args);
        s.qemu_img(&["bitmap", "--disable", image, "off"]);
    }
}

/// What `image` shows through its chain.
fn view(s: &Scratch, image: &str) -> Vec<u8> {
    s.qemu_img(&["convert", "-U", "-O", "raw", image, "view.raw"]);
    std::fs::read(s.path("view.raw")).unwrap()
}

struct State {
    views: BTreeMap<&'static str, Vec<u8>>,
    lists: BTreeMap<&'static str, serde_json::Value>,
    dirty: BTreeMap<(&'static str, &'static str), Vec<(u64, u64)>>,
}

fn state(s: &Scratch, images: &[&'static str]) -> State {
    let mut st = State {
        views: BTreeMap::new(),
        lists: BTreeMap::new(),
        dirty: BTreeMap::new(),
    };
    for &image in images {
        st.views.insert(image, view(s, image));
        st.lists.insert(image, bitmap_list(s, image));
        for bitmap in ["on", "off"] {
            st.dirty
                .insert((image, bitmap), dirty_ranges(s, image, bitmap));
        }
    }
    st
}

fn covers(ranges: &[(u64, u64)], at: u64) -> bool {
    ranges.iter().any(|&(o, l)| o <= at && at < o + l)
}

/// `after`'s ranges include every one of `before`'s.
fn includes(after: &[(u64, u64)], before: &[(u64, u64)]) -> bool {
    before
        .iter()
        .all(|&(o, l)| (o..o + l).step_by(512).all(|at| covers(after, at)))
}

/// Runs a merge and checks what it left in `images` (those whose view must stay valid).
fn check_merge(label: &str, images: &[&'static str], run: impl FnOnce(&Scratch)) {
    let s = Scratch::new();
    build(&s, label.len() as u64);
    let before = state(&s, images);
    run(&s);
    let after = state(&s, images);
    for &image in images {
        let what = format!("{label}: {image}");
        assert_eq!(
            after.lists[image], before.lists[image],
            "{what}: bitmap list"
        );
        let on = &after.dirty[&(image, "on")];
        assert!(
            includes(on, &before.dirty[&(image, "on")]),
            "{what}: 'on' lost bits"
        );
        assert_eq!(
            after.dirty[&(image, "off")],
            before.dirty[&(image, "off")],
            "{what}: 'off'"
        );
        let (old, new) = (&before.views[image], &after.views[image]);
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            if a != b {
                assert!(
                    covers(on, i as u64),
                    "{what}: byte {i:#x} changed, 'on' is clean there"
                );
            }
        }
        assert_check_silent(&s, image, &what);
    }
}

#[test]
fn commit_into_the_backing_file_marks_what_it_writes() {
    check_merge("commit top", &IMAGES, |s| {
        s.qimg(&["commit", "top.qcow2"]);
    });
}

#[test]
fn commit_into_the_base_marks_what_it_writes() {
    // The middle image's view is not kept (as with qemu-img commit -b).
    check_merge("commit -b base", &["base.qcow2", "top.qcow2"], |s| {
        s.qimg(&["commit", "-b", "base.qcow2", "top.qcow2"]);
    });
}

#[test]
fn pulls_and_rebases_keep_every_bitmap_valid() {
    check_merge("pull", &IMAGES, |s| {
        s.qimg(&["pull", "top.qcow2"]);
    });
    check_merge("pull -b", &IMAGES, |s| {
        s.qimg(&["pull", "-b", "base.qcow2", "top.qcow2"]);
    });
    check_merge("rebase", &IMAGES, |s| {
        s.qimg(&["rebase", "-F", "qcow2", "-b", "base.qcow2", "top.qcow2"]);
    });
}

#[test]
fn remove_keeps_every_bitmap_valid() {
    check_merge("remove", &["base.qcow2", "top.qcow2"], |s| {
        s.qimg(&["remove", "mid.qcow2"]);
    });
}

#[test]
fn the_libvirt_commit_merges_the_layers_bitmaps_into_the_base() {
    let s = Scratch::new();
    build(&s, 7);
    let top_on = dirty_ranges(&s, "top.qcow2", "on");
    let mid_on = dirty_ranges(&s, "mid.qcow2", "on");
    let mid_off = dirty_ranges(&s, "mid.qcow2", "off");
    let options = CommitOptions {
        base: Some("base.qcow2".into()),
        merge_bitmaps: true,
        ..CommitOptions::default()
    };
    ops::commit(s.path("top.qcow2"), &options, &mut |_, _| true).unwrap();
    let base_on = dirty_ranges(&s, "base.qcow2", "on");
    assert!(includes(&base_on, &top_on) && includes(&base_on, &mid_on));
    // A disabled bitmap takes the merge too (it records no writes, but merges apply).
    assert!(includes(&dirty_ranges(&s, "base.qcow2", "off"), &mid_off));
    assert_check_silent(&s, "base.qcow2", "libvirt commit");
}
