//! Limits checked through the library, and qimg's usage errors and refusal to write an
//! image marked corrupt.

use crate::chains::with_backing_name;
use crate::common::{self, HeaderField, Scratch};
use crate::layout::{Layout, put, put_field};

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
fn usage_errors_exit_1_in_one_line_and_help_exits_0() {
    let s = Scratch::new();
    for args in [
        &["info", "--bogus", "x.qcow2"][..],
        &["nosuchcommand"],
        &["info"],
        &["--confine-backing"],
        &["map", "--output=xml", "x.qcow2"],
        &["convert", "-S", "12q", "a", "b"],
    ] {
        // As qemu-img: exit code 1 (2 means "corruptions found" to check users).
        let out = s.qimg_output(args);
        common::assert_one_line_failure(&out, &format!("{args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("qimg: "), "{args:?}: {stderr}");
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
    let out = s.qimg_output(&["io", "-r", "-c", "read 0 4k", "img.qcow2"]);
    assert!(out.status.success());
}

/// An enabled bitmap whose damaged table offset points at the refcount table (whose first
/// entry, a refcount block's offset, reads as a bitmap data cluster): a write stores the
/// bitmap anew and must not free the refcount table and block as the bitmap's old
/// clusters. qemu-img check finds the damaged reference before, at most leaks after.
#[test]
fn storing_a_bitmap_never_frees_metadata_its_damaged_table_points_at() {
    let s = Scratch::new();
    s.create("img.qcow2", "cluster_size=64k", 4 << 20);
    s.qemu_io("img.qcow2", "qcow2", &["write -P 0x11 0 64k".into()]);
    s.qemu_img(&["bitmap", "--add", "-g", "4k", "img.qcow2", "b0"]);
    s.qemu_io("img.qcow2", "qcow2", &["write -P 0x33 512k 64k".into()]);
    let mut b = std::fs::read(s.path("img.qcow2")).unwrap();
    let l = Layout::parse(&b);
    let entry = l.bitmaps.unwrap().entries[0].at;
    put(&mut b, entry, 8, l.refcount_table);
    s.write_file("img.qcow2", &b);
    let out = s.qimg_output(&["io", "-c", "write -P 1 0 4k", "img.qcow2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = s.output("qemu-img", &["check", "img.qcow2"]);
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
