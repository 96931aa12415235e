//! Damaged, unsupported and badly chained images: opening or reading must return an error
//! (never panic) whose message names the file and the problem.
//!
//! Fixtures are valid images made by qemu-img, then damaged through named header fields
//! or truncated at a structure the test locates from the header.

mod common;

use std::path::Path;

use common::{HeaderField, L1_OFFSET_MASK, Scratch, read_header_field, write_header_field};
use qcow2_engine::{Chain, ChainOptions, Error, Format};

/// Asserts `result` is an error whose message names `file` and contains every one of
/// `parts`; returns the error.
#[track_caller]
fn assert_error<T>(result: Result<T, Error>, file: &Path, parts: &[&str]) -> Error {
    let err = match result {
        Ok(_) => panic!("expected an error about {} ({parts:?})", file.display()),
        Err(e) => e,
    };
    let msg = err.report().to_string();
    assert!(
        msg.contains(&file.display().to_string()),
        "message does not name {}: {msg}",
        file.display()
    );
    for part in parts {
        assert!(msg.contains(part), "message lacks {part:?}: {msg}");
    }
    err
}

/// Opens `name` and reads all of it.
fn open_and_read(s: &Scratch, name: &str) -> Result<(), Error> {
    let chain = Chain::open(s.path(name))?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0)
}

fn open_as_qcow2(path: &Path) -> Result<Chain, Error> {
    Chain::open_with(
        path,
        &ChainOptions {
            format: Some(Format::Qcow2),
            ..ChainOptions::default()
        },
    )
}

#[test]
fn image_cut_in_the_middle_of_an_l2_table() {
    let s = Scratch::new();
    s.create("img.qcow2", "cluster_size=64k", 4 << 20);
    s.qemu_io("img.qcow2", "qcow2", &["write -P 7 0 128k".into()]);
    let l2 = s
        .l2_entry_location("img.qcow2", 0)
        .expect("the write allocated an L2 table");
    s.truncate("img.qcow2", l2 + 32 * 1024);
    let err = assert_error(
        open_and_read(&s, "img.qcow2"),
        &s.path("img.qcow2"),
        &["L2 table", &format!("{l2:#x}"), "past the end of the file"],
    );
    assert!(matches!(
        err.root(),
        Error::Truncated {
            structure: "L2 table",
            ..
        }
    ));
}

#[test]
fn image_cut_in_the_middle_of_the_l1_table() {
    let s = Scratch::new();
    // 512-byte clusters: a 4 MiB image needs 128 L1 entries (1 KiB).
    s.create("img.qcow2", "cluster_size=512", 4 << 20);
    let path = s.path("img.qcow2");
    let l1 = read_header_field(&path, HeaderField::L1TableOffset);
    assert_eq!(read_header_field(&path, HeaderField::L1Size), 128);
    s.truncate("img.qcow2", l1 + 500);
    assert_error(
        Chain::open(&path),
        &path,
        &["L1 table", &format!("{l1:#x}"), "past the end of the file"],
    );
}

#[test]
fn image_cut_in_the_middle_of_the_header() {
    for (compat, cut) in [("0.10", 50), ("1.1", 50), ("1.1", 90), ("1.1", 4)] {
        let s = Scratch::new();
        s.create("img.qcow2", &format!("compat={compat}"), 1 << 20);
        s.truncate("img.qcow2", cut);
        let path = s.path("img.qcow2");
        // Probing sees the magic and a version; forcing qcow2 must fail the same way. With
        // the magic alone the version reads as 0, and qemu-img probes it as raw.
        if cut >= 8 {
            assert_error(
                Chain::open(&path),
                &path,
                &["header", "past the end of the file"],
            );
        } else {
            let chain = Chain::open(&path).unwrap();
            assert_eq!(chain.top().format(), qcow2_engine::Format::Raw);
        }
        assert_error(open_as_qcow2(&path), &path, &["header", "past the end"]);
    }
}

#[test]
fn file_that_is_not_qcow2_opened_as_qcow2() {
    let s = Scratch::new();
    s.write_file("disk.raw", &[0x42; 4096]);
    let path = s.path("disk.raw");
    let err = assert_error(
        open_as_qcow2(&path),
        &path,
        &["not a qcow2 image", "0x42424242"],
    );
    assert!(matches!(err.root(), Error::BadMagic { found: 0x4242_4242 }));
    // Probed, the same file is a raw image.
    assert_eq!(Chain::open(&path).unwrap().size(), 4096);

    s.write_file("empty", &[]);
    let path = s.path("empty");
    assert_error(open_as_qcow2(&path), &path, &["header", "past the end"]);
}

#[test]
fn backing_file_whose_format_is_given_wrongly_as_qcow2() {
    let s = Scratch::new();
    s.write_file("base.raw", &[0x42; 1 << 20]);
    s.create_overlay("top.qcow2", "base.raw", "raw", "", None);
    s.qemu_img(&["rebase", "-u", "-b", "base.raw", "-F", "qcow2", "top.qcow2"]);
    assert_error(
        Chain::open(s.path("top.qcow2")),
        &s.path("base.raw"),
        &["not a qcow2 image"],
    );
}

#[test]
fn unknown_incompatible_feature_bit() {
    let s = Scratch::new();
    s.create("img.qcow2", "", 1 << 20);
    let path = s.path("img.qcow2");
    let bits = read_header_field(&path, HeaderField::IncompatibleFeatures);
    write_header_field(&path, HeaderField::IncompatibleFeatures, bits | 1 << 20);
    // QEMU refuses it too.
    let out = std::process::Command::new("qemu-img")
        .args(["info", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-img opened an unknown feature bit"
    );
    let err = assert_error(
        Chain::open(&path),
        &path,
        &["unsupported incompatible feature", "bit 20"],
    );
    assert!(matches!(err.root(), Error::UnsupportedFeature { .. }));
}

#[test]
fn encrypted_image() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "enc.qcow2",
        "1M",
    ]);
    let path = s.path("enc.qcow2");
    assert_eq!(read_header_field(&path, HeaderField::CryptMethod), 2);
    let err = assert_error(Chain::open(&path), &path, &["encrypted", "crypt_method 2"]);
    assert!(matches!(err.root(), Error::Encrypted { method: 2 }));
}

#[test]
fn backing_chain_loops() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    s.create_overlay("b.qcow2", "a.qcow2", "qcow2", "", None);
    s.qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    let top = s.path("b.qcow2");
    let err = assert_error(Chain::open(&top), &top, &["backing chain loops back to"]);
    assert!(matches!(err.root(), Error::BackingLoop { .. }));
    assert!(err.report().to_string().contains("b.qcow2"), "{err}");

    // An image that is its own backing file.
    s.create("self.qcow2", "", 1 << 20);
    s.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    let path = s.path("self.qcow2");
    assert_error(Chain::open(&path), &path, &["loops back"]);
}

#[test]
fn missing_backing_file() {
    let s = Scratch::new();
    s.create("base.qcow2", "", 1 << 20);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    std::fs::remove_file(s.path("base.qcow2")).unwrap();
    assert_error(
        Chain::open(s.path("top.qcow2")),
        &s.path("top.qcow2"),
        &[
            "could not open backing file",
            &s.path("base.qcow2").display().to_string(),
            "No such file",
        ],
    );
    // Without following the backing file, the overlay alone opens.
    let alone = Chain::open_with(
        s.path("top.qcow2"),
        &ChainOptions {
            no_backing: true,
            ..ChainOptions::default()
        },
    )
    .unwrap();
    assert_eq!(alone.layers().len(), 1);
}

#[test]
fn missing_external_data_file() {
    let s = Scratch::new();
    s.create("img.qcow2", "data_file=img.data", 1 << 20);
    std::fs::remove_file(s.path("img.data")).unwrap();
    assert_error(
        Chain::open(s.path("img.qcow2")),
        &s.path("img.data"),
        &["data file", "No such file"],
    );
}

#[test]
fn chain_deeper_than_the_depth_limit() {
    let s = Scratch::new();
    s.create("l0.qcow2", "", 1 << 20);
    for i in 1..4 {
        s.create_overlay(
            &format!("l{i}.qcow2"),
            &format!("l{}.qcow2", i - 1),
            "qcow2",
            "",
            None,
        );
    }
    let top = s.path("l3.qcow2");
    let with_limit = |max_depth| {
        Chain::open_with(
            &top,
            &ChainOptions {
                max_depth,
                ..ChainOptions::default()
            },
        )
    };
    assert_eq!(with_limit(4).unwrap().layers().len(), 4);
    for limit in [1, 2, 3] {
        let err = assert_error(
            with_limit(limit),
            &top,
            &["deeper than", &format!("{limit} layers")],
        );
        assert!(matches!(err.root(), Error::ChainTooDeep { .. }));
    }
}

#[test]
fn l2_entry_with_an_unaligned_host_offset() {
    let s = Scratch::new();
    s.create("img.qcow2", "cluster_size=64k", 1 << 20);
    s.qemu_io("img.qcow2", "qcow2", &["write -P 7 0 64k".into()]);
    let entry = s.l2_entry_location("img.qcow2", 0).unwrap();
    let host = s.read_u64("img.qcow2", entry) & L1_OFFSET_MASK;
    s.write_u64("img.qcow2", entry, 1 << 63 | (host + 512));
    // QEMU refuses to read it too.
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read 0 512"])
        .arg(s.path("img.qcow2"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu read an unaligned cluster"
    );
    assert_error(
        open_and_read(&s, "img.qcow2"),
        &s.path("img.qcow2"),
        &["L2 table", "entry 0", "not aligned"],
    );
}

#[test]
fn a_backing_policy_confines_backing_files_and_refuses_special_files() {
    use qcow2_engine::BackingPolicy;
    let s = Scratch::new();
    std::fs::create_dir(s.path("vm")).unwrap();
    s.create("base.qcow2", "", 1 << 20);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        "vm/escape.qcow2",
    ]);
    std::os::unix::fs::symlink("../base.qcow2", s.path("vm/link.qcow2")).unwrap();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "link.qcow2",
        "-F",
        "qcow2",
        "vm/via-link.qcow2",
    ]);
    s.create("vm/inside-base.qcow2", "", 1 << 20);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "inside-base.qcow2",
        "-F",
        "qcow2",
        "vm/inside.qcow2",
    ]);
    s.qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "/dev/null",
        "-F",
        "raw",
        "vm/device.qcow2",
        "1M",
    ]);
    let confined = ChainOptions {
        backing_policy: BackingPolicy {
            confine_to: Some(s.path("vm")),
            regular_files_only: true,
        },
        ..ChainOptions::default()
    };
    for name in ["vm/escape.qcow2", "vm/via-link.qcow2"] {
        // qemu-img's behaviour by default: the backing file opens.
        assert_eq!(
            Chain::open(s.path(name)).unwrap().layers().len(),
            2,
            "{name}"
        );
        let err = Chain::open_with(s.path(name), &confined).unwrap_err();
        assert!(
            matches!(err.root(), Error::BackingRefused { .. }),
            "{name}: {err}"
        );
        let msg = err.report().to_string();
        assert!(msg.contains(name) && msg.contains("confined"), "{msg}");
    }
    assert_eq!(
        Chain::open_with(s.path("vm/inside.qcow2"), &confined)
            .unwrap()
            .layers()
            .len(),
        2
    );
    assert_eq!(
        Chain::open(s.path("vm/device.qcow2"))
            .unwrap()
            .layers()
            .len(),
        2
    );
    let err = Chain::open_with(s.path("vm/device.qcow2"), &confined).unwrap_err();
    assert!(
        err.report().to_string().contains("not a regular file"),
        "{err}"
    );
}
