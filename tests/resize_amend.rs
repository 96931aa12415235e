//! `qimg resize` and `qimg amend` against `qemu-img resize` and `qemu-img amend` on copies
//! of the same image: the same content (`qemu-img compare`), the same `qemu-img info`
//! facts, `qemu-img check` clean after every step; refused requests fail with one line and
//! leave the image as it was.

mod common;

use common::{Scratch, assert_one_line_failure};
use serde_json::Value;

/// `qemu-img info --output=json` of `name`.
fn info(s: &Scratch, name: &str) -> Value {
    let json = s.qemu_img(&["info", "--output=json", name]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("bad info JSON ({e}):\n{json}"))
}

/// The facts resize and amend change, as `qemu-img info` shows them.
fn facts(s: &Scratch, name: &str) -> Value {
    let i = info(s, name);
    let data = &i["format-specific"]["data"];
    serde_json::json!({
        "virtual-size": i["virtual-size"],
        "cluster-size": i["cluster-size"],
        "backing-filename": i["backing-filename"],
        "backing-filename-format": i["backing-filename-format"],
        "dirty-flag": i["dirty-flag"],
        "compat": data["compat"],
        "lazy-refcounts": data["lazy-refcounts"],
        "refcount-bits": data["refcount-bits"],
        "extended-l2": data["extended-l2"],
        "corrupt": data["corrupt"],
    })
}

/// Makes `img.qcow2` with `options` holding data, zero clusters and a hole; over a longer
/// `base.qcow2` (full of 0x0b) when `backing`.
fn make_image(s: &Scratch, options: &str, backing: bool, size: u64) {
    if backing {
        s.create("base.qcow2", "", 2 * size);
        s.qemu_io(
            "base.qcow2",
            "qcow2",
            &[format!("write -q -P 0x0b 0 {}", 2 * size)],
        );
        s.create_overlay("img.qcow2", "base.qcow2", "qcow2", options, Some(size));
    } else {
        s.create("img.qcow2", options, size);
    }
    let ops = vec![
        "write -q -P 0x21 0 300k".to_string(),
        format!("write -q -P 0x22 {} 100k", size / 2),
        format!("write -q -z {} 64k", size / 4),
        format!("write -q -P 0x23 {} 4k", size - 4096),
    ];
    s.qemu_io("img.qcow2", "qcow2", &ops);
}

fn assert_same_image(s: &Scratch, ours: &str, theirs: &str, label: &str) {
    s.assert_clean(ours, label);
    s.assert_clean(theirs, label);
    s.assert_same_content(ours, theirs, label);
    // compare ignores a size difference over zeros: the sizes must be equal too.
    assert_eq!(facts(s, ours), facts(s, theirs), "{label}: qemu-img info");
}

const RESIZE_LAYOUTS: &[&str] = &[
    "cluster_size=512",
    "cluster_size=64k",
    "cluster_size=2M",
    "cluster_size=64k,compat=0.10",
    "cluster_size=64k,extended_l2=on",
    "cluster_size=4k,refcount_bits=1",
    "cluster_size=64k,refcount_bits=64",
    // A new L1 table with lazy refcounts: its refcount (and the old table's free) must
    // reach the disk though nothing else changes (found by the ops fuzz target).
    "cluster_size=512,lazy_refcounts=on",
];

#[test]
fn resize_grows_and_shrinks_like_qemu_img() {
    // Each step applies to both images in turn; shrinking cuts through data and zero
    // clusters, growing again must not bring old data back. Shrinks followed by a grow
    // are cluster aligned (see the next test for why); the unaligned shrink comes last.
    let steps: &[&[&str]] = &[
        &["+3M"],
        &["--shrink", "-5M"],
        &["7M"],
        &["--shrink", "4M"],
        &["+64M"],
        &["--shrink", "6M"],
        &["--shrink", "1049088"], // 1 MiB + 512: not cluster aligned
    ];
    for &options in RESIZE_LAYOUTS {
        for backing in [false, true] {
            let label = format!("[{options}] backing={backing}");
            let s = Scratch::new();
            make_image(&s, options, backing, 4 << 20);
            s.copy("img.qcow2", "ours.qcow2");
            s.copy("img.qcow2", "theirs.qcow2");
            for step in steps {
                let step_label = format!("{label} resize {step:?}");
                let (flags, size) = step.split_at(step.len() - 1);
                let mut args = vec!["resize", "-q"];
                args.extend(flags);
                args.extend(["theirs.qcow2", size[0]]);
                let qemu_ok = s.output("qemu-img", &args).status.success();
                let mut args = vec!["resize"];
                args.extend(flags);
                args.extend(["ours.qcow2", size[0]]);
                let out = s.qimg_output(&args);
                if qemu_ok {
                    assert!(
                        out.status.success(),
                        "{step_label}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert_eq!(out.stdout, b"Image resized.\n", "{step_label}");
                } else {
                    // QEMU refuses (a v2 overlay over a longer backing file): so do we.
                    assert_one_line_failure(&out, &step_label);
                }
                assert_same_image(&s, "ours.qcow2", "theirs.qcow2", &step_label);
            }
        }
    }
}

/// After a shrink that ends inside a cluster, QEMU keeps the cluster's old bytes past the
/// new end and a later grow shows them again; qimg's grow makes the whole new area read
/// as zeros, as growing promises. Everything else matches QEMU.
#[test]
fn growing_after_an_unaligned_shrink_reads_zeros_where_qemu_shows_old_data() {
    let s = Scratch::new();
    s.create("img.qcow2", "", 4 << 20);
    s.qemu_io("img.qcow2", "qcow2", &["write -q -P 0x21 0 4M".into()]);
    s.copy("img.qcow2", "theirs.qcow2");
    s.qimg(&["resize", "--shrink", "img.qcow2", "1049088"]);
    s.qimg(&["resize", "img.qcow2", "4M"]);
    s.qemu_img(&["resize", "-q", "--shrink", "theirs.qcow2", "1049088"]);
    s.qemu_img(&["resize", "-q", "theirs.qcow2", "4M"]);
    s.assert_clean("img.qcow2", "grown");
    let ours = s.reference("img.qcow2", "qcow2");
    let theirs = s.reference("theirs.qcow2", "qcow2");
    assert!(ours[..1049088].iter().all(|&b| b == 0x21));
    assert!(ours[1049088..].iter().all(|&b| b == 0));
    assert_eq!(ours[..1049088], theirs[..1049088]);
    assert!(
        theirs[1049088..1114112].iter().all(|&b| b == 0x21),
        "QEMU no longer shows the old bytes: make qimg match it exactly"
    );
}

/// Shrinking an image whose size ends inside a cluster frees that partial last cluster
/// whole, as QEMU does: with extended L2 and a compressed last cluster the shrink was
/// refused (its subclusters cannot be unallocated alone).
#[test]
fn shrinking_frees_a_compressed_partial_last_cluster_with_extended_l2() {
    let s = Scratch::new();
    s.create("img.qcow2", "extended_l2=on", 4 * 65536 + 8192);
    s.qemu_io(
        "img.qcow2",
        "qcow2",
        &[
            "write -q -P 0x31 0 256k".into(),
            "write -q -c -P 0x32 256k 8k".into(),
        ],
    );
    s.copy("img.qcow2", "ours.qcow2");
    s.copy("img.qcow2", "theirs.qcow2");
    s.qimg(&["resize", "--shrink", "ours.qcow2", "128k"]);
    s.qemu_img(&["resize", "-q", "--shrink", "theirs.qcow2", "128k"]);
    assert_same_image(&s, "ours.qcow2", "theirs.qcow2", "shrunk");
}

/// A version 3 image with an internal snapshot shrinks and grows like QEMU's, and applying
/// the snapshot afterwards brings back its size and content on both.
#[test]
fn resize_keeps_internal_snapshots_intact() {
    let s = Scratch::new();
    make_image(&s, "cluster_size=64k", false, 4 << 20);
    s.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
    s.copy("img.qcow2", "ours.qcow2");
    s.copy("img.qcow2", "theirs.qcow2");
    for step in [&["--shrink", "1M"][..], &["8M"]] {
        let (flags, size) = step.split_at(step.len() - 1);
        let mut ours = vec!["resize"];
        ours.extend(flags);
        ours.extend(["ours.qcow2", size[0]]);
        s.qimg(&ours);
        let mut theirs = vec!["resize", "-q"];
        theirs.extend(flags);
        theirs.extend(["theirs.qcow2", size[0]]);
        s.qemu_img(&theirs);
        assert_same_image(&s, "ours.qcow2", "theirs.qcow2", &format!("{step:?}"));
    }
    for name in ["ours.qcow2", "theirs.qcow2"] {
        s.qemu_img(&["snapshot", "-a", "s1", name]);
    }
    assert_same_image(&s, "ours.qcow2", "theirs.qcow2", "snapshot applied");
    s.assert_same_content("ours.qcow2", "img.qcow2", "snapshot applied");
}

#[test]
fn resize_of_a_raw_image_truncates_like_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "img.raw", "1M"]);
    s.qemu_io("img.raw", "raw", &["write -q -P 0x41 0 1M".into()]);
    s.copy("img.raw", "ours.raw");
    s.copy("img.raw", "theirs.raw");
    for step in [&["+1000"][..], &["--shrink", "-300k"], &["2M"]] {
        let mut ours = vec!["resize", "-f", "raw"];
        ours.extend(&step[..step.len() - 1]);
        ours.extend(["ours.raw", step[step.len() - 1]]);
        s.qimg(&ours);
        let mut theirs = vec!["resize", "-q", "-f", "raw"];
        theirs.extend(&step[..step.len() - 1]);
        theirs.extend(["theirs.raw", step[step.len() - 1]]);
        s.qemu_img(&theirs);
        assert_eq!(
            std::fs::read(s.path("ours.raw")).unwrap(),
            std::fs::read(s.path("theirs.raw")).unwrap(),
            "{step:?}"
        );
    }
}

#[test]
fn refused_resizes_print_one_line_and_change_nothing() {
    let s = Scratch::new();
    make_image(&s, "", false, 4 << 20);
    s.copy("img.qcow2", "before.qcow2");
    s.create("v2snap.qcow2", "compat=0.10", 1 << 20);
    s.qemu_img(&["snapshot", "-c", "snap", "v2snap.qcow2"]);
    s.copy("v2snap.qcow2", "v2before.qcow2");
    let cases: &[(&[&str], &str)] = &[
        (&["img.qcow2", "-1M"], "img"),             // shrinking needs --shrink
        (&["img.qcow2", "1M"], "img"),              // also absolute
        (&["--shrink", "img.qcow2", "-4M"], "img"), // not positive
        (&["--shrink", "img.qcow2", "-5M"], "img"),
        (&["img.qcow2", "0"], "img"),
        (&["img.qcow2", "+100"], "img"), // not a multiple of 512
        (&["img.qcow2", "abc"], "img"),
        (&["img.qcow2", "+1Q"], "img"),
        (&["img.qcow2", "1E"], "img"), // L1 table past QEMU's limit
        (&["v2snap.qcow2", "+1M"], "v2snap"),
    ];
    for (args, which) in cases {
        let mut full = vec!["resize"];
        full.extend(args.iter());
        let label = format!("{full:?}");
        let out = s.qimg_output(&full);
        assert_one_line_failure(&out, &label);
        assert_eq!(out.status.code(), Some(1), "{label}");
        // qemu-img refuses the same request.
        let theirs_name = format!("{which}.copy.qcow2");
        s.copy(&format!("{which}.qcow2"), &theirs_name);
        let mut theirs: Vec<&str> = full
            .iter()
            .map(|a| {
                if a.ends_with(".qcow2") {
                    theirs_name.as_str()
                } else {
                    a
                }
            })
            .collect();
        theirs.insert(1, "-q");
        assert!(
            !s.output("qemu-img", &theirs).status.success(),
            "{label}: qemu-img accepts it"
        );
        let (name, before) = if *which == "img" {
            ("img.qcow2", "before.qcow2")
        } else {
            ("v2snap.qcow2", "v2before.qcow2")
        };
        s.assert_clean(name, &label);
        s.assert_same_content(name, before, &label);
        assert_eq!(facts(&s, name), facts(&s, before), "{label}");
    }
}

/// One amend case: the layout to start from, whether it has a backing file, and the `-o`
/// text given to both tools.
const AMEND_CASES: &[(&str, bool, &str)] = &[
    ("", false, "compat=0.10"),
    ("", true, "compat=0.10"),
    ("cluster_size=512", false, "compat=0.10"),
    ("compat=0.10", false, "compat=1.1"),
    ("compat=0.10", true, "compat=1.1,lazy_refcounts=on"),
    ("", false, "lazy_refcounts=on"),
    ("lazy_refcounts=on", false, "lazy_refcounts=off"),
    ("", false, "refcount_bits=1"),
    ("cluster_size=512", false, "refcount_bits=1"),
    ("", true, "refcount_bits=64"),
    ("cluster_size=4k,refcount_bits=64", false, "refcount_bits=2"),
    ("refcount_bits=1", false, "refcount_bits=16,compat=0.10"),
    ("", false, "size=16M"),
    ("", false, "size=1M"),
    ("cluster_size=2M", true, "size=3M"),
    ("", false, "compat=0.10,size=6M"),
    ("extended_l2=on", false, "lazy_refcounts=on,refcount_bits=8"),
    // The current backing file and format: a no-op both tools accept.
    ("", true, "backing_file=base.qcow2,backing_fmt=qcow2"),
];

#[test]
fn amend_changes_what_qemu_img_amend_changes() {
    for &(options, backing, amend) in AMEND_CASES {
        let label = format!("[{options}] backing={backing} amend -o {amend}");
        let s = Scratch::new();
        make_image(&s, options, backing, 4 << 20);
        s.copy("img.qcow2", "ours.qcow2");
        s.copy("img.qcow2", "theirs.qcow2");
        let out = s.qimg(&["amend", "-o", amend, "ours.qcow2"]);
        assert_eq!(out, "", "{label}: amend prints nothing");
        s.qemu_img(&["amend", "-o", amend, "theirs.qcow2"]);
        assert_same_image(&s, "ours.qcow2", "theirs.qcow2", &label);
        // qemu-io can still write to and read from the amended image.
        s.qemu_io(
            "ours.qcow2",
            "qcow2",
            &[
                "write -q -P 0x77 100k 70k".into(),
                "read -q -P 0x77 100k 70k".into(),
            ],
        );
        s.assert_clean("ours.qcow2", &format!("{label}, then written by qemu-io"));
    }
}

#[test]
fn amend_backing_options_change_the_names_like_rebase_unsafe() {
    let s = Scratch::new();
    make_image(&s, "", true, 4 << 20);
    s.qemu_img(&["convert", "-O", "raw", "base.qcow2", "base.raw"]);
    s.copy("base.qcow2", "other.qcow2");
    // (amend -o, the equivalent rebase -u arguments)
    let cases: &[(&str, &[&str])] = &[
        (
            "backing_file=other.qcow2",
            &["-b", "other.qcow2", "-F", "qcow2"],
        ),
        (
            "backing_file=base.raw,backing_fmt=raw",
            &["-b", "base.raw", "-F", "raw"],
        ),
        ("backing_fmt=raw", &["-b", "base.raw", "-F", "raw"]),
        ("backing_file=", &["-b", ""]),
    ];
    s.copy("img.qcow2", "ours.qcow2");
    s.copy("img.qcow2", "theirs.qcow2");
    for (amend, rebase) in cases {
        let label = format!("amend -o {amend}");
        s.qimg(&["amend", "-o", amend, "ours.qcow2"]);
        let mut args = vec!["rebase", "-u"];
        args.extend(rebase.iter());
        args.push("theirs.qcow2");
        s.qemu_img(&args);
        assert_same_image(&s, "ours.qcow2", "theirs.qcow2", &label);
    }
}

#[test]
fn refused_amends_print_one_line_and_change_nothing() {
    let s = Scratch::new();
    make_image(&s, "", false, 4 << 20);
    s.copy("img.qcow2", "before.qcow2");
    s.create("xl2.qcow2", "extended_l2=on", 1 << 20);
    s.copy("xl2.qcow2", "xl2before.qcow2");
    let cases: &[(&str, &str)] = &[
        ("compat=2.0", "img"),
        ("refcount_bits=3", "img"),
        ("refcount_bits=128", "img"),
        ("refcount_bits=x", "img"),
        ("lazy_refcounts=maybe", "img"),
        ("size=1000", "img"),
        ("size=abc", "img"),
        ("cluster_size=4k", "img"),
        ("extended_l2=on", "img"),
        ("foo=1", "img"),
        ("lazy_refcounts=on,compat=0.10", "img"),
        ("refcount_bits=64,compat=0.10", "img"),
        ("compat=0.10", "xl2"),
    ];
    for (amend, which) in cases {
        let label = format!("amend -o {amend} {which}");
        let name = format!("{which}.qcow2");
        let out = s.qimg_output(&["amend", "-o", amend, &name]);
        assert_one_line_failure(&out, &label);
        assert_eq!(out.status.code(), Some(1), "{label}");
        let copy = format!("{which}.copy.qcow2");
        s.copy(&name, &copy);
        assert!(
            !s.output("qemu-img", &["amend", "-o", amend, &copy])
                .status
                .success(),
            "{label}: qemu-img accepts it"
        );
        let before = format!("{which}before.qcow2").replace("imgbefore", "before");
        s.assert_clean(&name, &label);
        s.assert_same_content(&name, &before, &label);
        assert_eq!(facts(&s, &name), facts(&s, &before), "{label}");
    }
    // A raw image cannot be amended.
    s.qemu_img(&["create", "-q", "-f", "raw", "img.raw", "1M"]);
    let out = s.qimg_output(&["amend", "-f", "raw", "-o", "size=2M", "img.raw"]);
    assert_one_line_failure(&out, "amend raw");
    assert_eq!(std::fs::metadata(s.path("img.raw")).unwrap().len(), 1 << 20);
}

/// Amending an image with an internal snapshot: the same outcome as qemu-img amend (1-bit
/// refcounts cannot count a shared cluster: both refuse), and the snapshot still applies.
#[test]
fn amend_with_an_internal_snapshot_matches_qemu_img() {
    for (amend, accepted) in [
        ("refcount_bits=1", false),
        ("refcount_bits=4", true),
        ("lazy_refcounts=on", true),
        ("size=8M", true),
        ("compat=0.10", true),
    ] {
        let s = Scratch::new();
        s.create("img.qcow2", "", 4 << 20);
        s.qemu_io(
            "img.qcow2",
            "qcow2",
            &[
                "write -q -P 0x21 0 1M".into(),
                "write -q -P 0x22 2M 64k".into(),
            ],
        );
        s.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
        s.qemu_io("img.qcow2", "qcow2", &["write -q -P 0x23 0 64k".into()]);
        s.copy("img.qcow2", "ours.qcow2");
        s.copy("img.qcow2", "theirs.qcow2");
        let label = format!("amend -o {amend} with a snapshot");
        let theirs = s.output("qemu-img", &["amend", "-o", amend, "theirs.qcow2"]);
        assert_eq!(theirs.status.success(), accepted, "{label}: qemu-img");
        let ours = s.qimg_output(&["amend", "-o", amend, "ours.qcow2"]);
        if accepted {
            assert!(
                ours.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&ours.stderr)
            );
        } else {
            assert_one_line_failure(&ours, &label);
        }
        assert_same_image(&s, "ours.qcow2", "theirs.qcow2", &label);
        for name in ["ours.qcow2", "theirs.qcow2"] {
            s.qemu_img(&["snapshot", "-a", "s1", name]);
        }
        assert_same_image(
            &s,
            "ours.qcow2",
            "theirs.qcow2",
            &format!("{label}, applied"),
        );
    }
}
