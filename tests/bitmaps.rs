//! Persistent dirty bitmaps against QEMU: the same writes and the same `bitmap`
//! operations done by qimg on one copy of an image and by qemu-io / qemu-img on its twin
//! must leave the same bitmap list (`qemu-img info`), the same dirty ranges (read through
//! `qemu-nbd -B`), the same content, and both images clean for `qemu-img check` with
//! nothing on stderr (QEMU warns when a program without bitmap support wrote an image).

mod common;

use common::bitmaps::{assert_check_silent, bitmap_list, dirty_ranges};
use common::{Rng, Scratch, assert_one_line_failure};

/// Image options and sizes: cluster sizes from 512 B to 2 MiB, 1-bit and 64-bit
/// refcounts, extended L2, lazy refcounts, zstd.
const VARIANTS: &[(&str, u64)] = &[
    ("cluster_size=512", 2 << 20),
    ("cluster_size=4096,refcount_bits=1", 8 << 20),
    ("cluster_size=65536", 64 << 20),
    ("cluster_size=2M,refcount_bits=64", 64 << 20),
    ("cluster_size=65536,extended_l2=on", 32 << 20),
    (
        "cluster_size=16384,lazy_refcounts=on,compression_type=zstd",
        16 << 20,
    ),
];

/// `count` qemu-io commands that change guest data: pattern writes, zero writes (with
/// and without unmap), discards; unaligned, aligned, crossing clusters.
fn guest_changes(rng: &mut Rng, size: u64, cluster: u64, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let (off, len) = match rng.below(3) {
                0 => {
                    let off = rng.below(size);
                    (off, 1 + rng.below((3 * cluster).min(size - off)))
                }
                1 => {
                    let off = rng.below(size / cluster) * cluster;
                    (off, (cluster * (1 + rng.below(3))).min(size - off))
                }
                _ => {
                    let boundary = cluster * (1 + rng.below(size / cluster - 1));
                    let before = 1 + rng.below(cluster);
                    (boundary - before, before + rng.below(cluster))
                }
            };
            match rng.below(6) {
                0..=2 => format!("write -P {} {off} {len}", i % 200 + 1),
                3 => format!("write -z {off} {len}"),
                4 => format!("write -z -u {off} {len}"),
                _ => format!("discard {off} {len}"),
            }
        })
        .collect()
}

/// Runs `commands` on `image` with qemu-io (the twin) or with `qimg io`.
fn io(s: &Scratch, image: &str, commands: &[String], with_qimg: bool) {
    let mut args: Vec<&str> = Vec::new();
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(image);
    if with_qimg {
        let mut qimg_args = vec!["io", "-f", "qcow2"];
        qimg_args.extend(args);
        s.qimg(&qimg_args);
    } else {
        let mut qemu_args = vec!["-f", "qcow2"];
        qemu_args.extend(args);
        s.run("qemu-io", &qemu_args);
    }
}

/// Runs `qemu-img bitmap ARGS` on the twin and `qimg bitmap ARGS` on the other; both must
/// succeed or both fail. Returns whether they succeeded.
fn bitmap_both(
    s: &Scratch,
    args: &[&str],
    twin: &'static str,
    ours: &'static str,
    label: &str,
) -> bool {
    // `bitmap OPS... IMAGE NAME`: the last of `args` is the bitmap's name.
    let (name, ops) = args.split_last().expect("a bitmap name");
    let line = |image: &'static str| -> Vec<&str> {
        let mut a = vec!["bitmap"];
        a.extend(ops);
        a.extend([image, *name]);
        a
    };
    let qemu = s.output("qemu-img", &line(twin));
    let qimg = s.qimg_output(&line(ours));
    assert_eq!(
        qemu.status.success(),
        qimg.status.success(),
        "{label}: bitmap {args:?}: qemu-img {}: {} / qimg {}: {}",
        qemu.status,
        String::from_utf8_lossy(&qemu.stderr),
        qimg.status,
        String::from_utf8_lossy(&qimg.stderr)
    );
    if !qimg.status.success() {
        assert_one_line_failure(&qimg, label);
    }
    qimg.status.success()
}

/// The twin and ours show the same bitmaps, the same dirty ranges in each consistent
/// one, the same content, and both pass `qemu-img check` silently.
fn assert_twins(s: &Scratch, twin: &str, ours: &str, label: &str) {
    let list = bitmap_list(s, twin);
    assert_eq!(bitmap_list(s, ours), list, "{label}: bitmap lists");
    for bitmap in list.as_array().into_iter().flatten() {
        let name = bitmap["name"].as_str().unwrap();
        if bitmap["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "in-use")
        {
            continue;
        }
        assert_eq!(
            dirty_ranges(s, ours, name),
            dirty_ranges(s, twin, name),
            "{label}: dirty ranges of bitmap {name}"
        );
    }
    assert_check_silent(s, twin, label);
    assert_check_silent(s, ours, label);
    s.assert_same_content(twin, ours, label);
}

fn cluster_of(options: &str) -> u64 {
    let text = options
        .split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .unwrap();
    match text {
        "2M" => 2 << 20,
        t => t.parse().unwrap(),
    }
}

#[test]
fn writes_leave_the_dirty_ranges_qemu_io_leaves() {
    for &(options, size) in VARIANTS {
        let s = Scratch::new();
        let cluster = cluster_of(options);
        s.create("twin.qcow2", options, size);
        s.run("qemu-io", &["-c", "write -P 7 0 1M", "twin.qcow2"]);
        s.qemu_img(&["bitmap", "--add", "twin.qcow2", "auto"]);
        s.qemu_img(&["bitmap", "--add", "-g", "512", "twin.qcow2", "fine"]);
        s.qemu_img(&["bitmap", "--add", "-g", "1M", "twin.qcow2", "coarse"]);
        s.qemu_img(&["bitmap", "--add", "--disable", "twin.qcow2", "off"]);
        s.copy("twin.qcow2", "ours.qcow2");
        let mut rng = Rng::new(cluster ^ size);
        for batch in 0..3 {
            let label = format!("{options}, batch {batch}");
            let commands = guest_changes(&mut rng, size, cluster, 25);
            io(&s, "twin.qcow2", &commands, false);
            io(&s, "ours.qcow2", &commands, true);
            assert_twins(&s, "twin.qcow2", "ours.qcow2", &label);
            // Between batches the set of recording bitmaps changes.
            let (op, name) = if batch == 0 {
                ("--disable", "fine")
            } else {
                ("--enable", "off")
            };
            assert!(bitmap_both(
                &s,
                &[op, name],
                "twin.qcow2",
                "ours.qcow2",
                &label
            ));
        }
    }
}

#[test]
fn bitmap_operations_in_any_order_match_qemu_img() {
    const NAMES: [&str; 3] = ["a", "b", "long name with spaces"];
    for seed in 0..4u64 {
        let s = Scratch::new();
        let options = [
            "cluster_size=65536",
            "cluster_size=4096",
            "cluster_size=512",
        ][seed as usize % 3];
        let cluster = cluster_of(options);
        let size = 4 << 20;
        s.create("twin.qcow2", options, size);
        s.copy("twin.qcow2", "ours.qcow2");
        let mut rng = Rng::new(seed);
        for step in 0..24 {
            let name = NAMES[rng.below(3) as usize];
            let other = NAMES[rng.below(3) as usize];
            let granularity = ["512", "4k", "64k", "1M"][rng.below(4) as usize];
            let ops: Vec<&str> = match rng.below(10) {
                0 | 1 => vec!["--add", "-g", granularity],
                2 => vec!["--add", "--disable"],
                3 => vec!["--remove"],
                4 => vec!["--clear"],
                5 => vec!["--enable"],
                6 => vec!["--disable"],
                7 => vec!["--merge", other],
                8 => vec!["--add", "--merge", other, "--disable"],
                _ => {
                    let commands = guest_changes(&mut rng, size, cluster, 4);
                    io(&s, "twin.qcow2", &commands, false);
                    io(&s, "ours.qcow2", &commands, true);
                    continue;
                }
            };
            let mut args = ops.clone();
            args.push(name);
            let label = format!("{options} seed {seed} step {step}: {args:?}");
            bitmap_both(&s, &args, "twin.qcow2", "ours.qcow2", &label);
            assert_eq!(
                bitmap_list(&s, "ours.qcow2"),
                bitmap_list(&s, "twin.qcow2"),
                "{label}"
            );
        }
        assert_twins(&s, "twin.qcow2", "ours.qcow2", &format!("seed {seed}"));
    }
}

#[test]
fn a_merge_from_another_image_takes_its_dirty_ranges() {
    let s = Scratch::new();
    s.create("src.qcow2", "", 8 << 20);
    s.qemu_img(&["bitmap", "--add", "-g", "4k", "src.qcow2", "x"]);
    s.run(
        "qemu-io",
        &["-c", "write 100k 10k", "-c", "write 5M 1M", "src.qcow2"],
    );
    s.create("twin.qcow2", "", 8 << 20);
    s.qemu_img(&["bitmap", "--add", "twin.qcow2", "y"]);
    s.copy("twin.qcow2", "ours.qcow2");
    let args = ["--merge", "x", "-b", "src.qcow2", "-F", "qcow2", "y"];
    assert!(bitmap_both(
        &s,
        &args,
        "twin.qcow2",
        "ours.qcow2",
        "merge -b"
    ));
    assert_eq!(
        dirty_ranges(&s, "ours.qcow2", "y"),
        [(64 << 10, 64 << 10), (5 << 20, 1 << 20)]
    );
    assert_twins(&s, "twin.qcow2", "ours.qcow2", "merge -b");
}

#[test]
fn resizing_resizes_every_bitmap_as_qemu_img_does() {
    let s = Scratch::new();
    s.create("twin.qcow2", "cluster_size=4096", 8 << 20);
    s.qemu_img(&["bitmap", "--add", "twin.qcow2", "on"]);
    s.qemu_img(&[
        "bitmap",
        "--add",
        "--disable",
        "-g",
        "512",
        "twin.qcow2",
        "off",
    ]);
    s.run(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "write 7M 1M", "twin.qcow2"],
    );
    s.qemu_img(&["bitmap", "--enable", "twin.qcow2", "off"]);
    s.run("qemu-io", &["-c", "write 3M 4k", "twin.qcow2"]);
    s.qemu_img(&["bitmap", "--disable", "twin.qcow2", "off"]);
    s.copy("twin.qcow2", "ours.qcow2");
    for (size, shrink) in [("20M", false), ("5000k", true), ("+3M", false)] {
        let mut args = vec!["resize"];
        if shrink {
            args.push("--shrink");
        }
        let twin = [args.as_slice(), &["twin.qcow2", size]].concat();
        let ours = [args.as_slice(), &["ours.qcow2", size]].concat();
        s.qemu_img(&twin);
        s.qimg(&ours);
        assert_twins(&s, "twin.qcow2", "ours.qcow2", &format!("resize {size}"));
        let commands = vec![format!("write -P 3 4500k 100k")];
        io(&s, "twin.qcow2", &commands, false);
        io(&s, "ours.qcow2", &commands, true);
        assert_twins(
            &s,
            "twin.qcow2",
            "ours.qcow2",
            &format!("after resize {size}"),
        );
    }
}

#[test]
fn an_in_use_bitmap_stays_in_use_and_can_only_be_removed() {
    let s = Scratch::new();
    s.create("twin.qcow2", "", 4 << 20);
    s.qemu_img(&["bitmap", "--add", "twin.qcow2", "crashed"]);
    s.qemu_img(&["bitmap", "--add", "twin.qcow2", "kept"]);
    // qemu-io killed while the image is open leaves its bitmaps in use.
    let out = s.output(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "sigraise 9", "twin.qcow2"],
    );
    assert!(!out.status.success());
    s.qemu_img(&["bitmap", "--remove", "twin.qcow2", "kept"]);
    s.copy("twin.qcow2", "ours.qcow2");
    let list = bitmap_list(&s, "ours.qcow2");
    assert_eq!(list[0]["flags"], serde_json::json!(["in-use", "auto"]));
    let commands = vec!["write -P 1 1M 64k".to_string()];
    io(&s, "twin.qcow2", &commands, false);
    io(&s, "ours.qcow2", &commands, true);
    assert_twins(&s, "twin.qcow2", "ours.qcow2", "written");
    for op in ["--clear", "--enable", "--disable"] {
        assert!(!bitmap_both(
            &s,
            &[op, "crashed"],
            "twin.qcow2",
            "ours.qcow2",
            op
        ));
    }
    assert!(!bitmap_both(
        &s,
        &["--add", "--merge", "crashed", "new"],
        "twin.qcow2",
        "ours.qcow2",
        "merge"
    ));
    assert!(bitmap_both(
        &s,
        &["--remove", "new"],
        "twin.qcow2",
        "ours.qcow2",
        "remove new"
    ));
    assert!(bitmap_both(
        &s,
        &["--remove", "crashed"],
        "twin.qcow2",
        "ours.qcow2",
        "remove"
    ));
    assert_eq!(bitmap_list(&s, "ours.qcow2"), serde_json::Value::Null);
    assert_twins(&s, "twin.qcow2", "ours.qcow2", "removed");
}

#[test]
fn snapshots_are_taken_beside_bitmaps_but_not_applied() {
    let s = Scratch::new();
    s.create("ours.qcow2", "", 4 << 20);
    s.qimg(&["bitmap", "--add", "ours.qcow2", "b"]);
    s.qimg(&["snapshot", "-c", "s1", "ours.qcow2"]);
    io(&s, "ours.qcow2", &["write 0 4k".to_string()], true);
    let out = s.qimg_output(&["snapshot", "-a", "s1", "ours.qcow2"]);
    assert_one_line_failure(&out, "snapshot -a with bitmaps");
    let twin = s.output("qemu-img", &["snapshot", "-a", "s1", "ours.qcow2"]);
    assert!(!twin.status.success(), "qemu-img refuses it too");
    s.qimg(&["snapshot", "-d", "s1", "ours.qcow2"]);
    assert_eq!(dirty_ranges(&s, "ours.qcow2", "b"), [(0, 65536)]);
    assert_check_silent(&s, "ours.qcow2", "snapshots");
}

#[test]
fn version_2_images_cannot_hold_bitmaps() {
    let s = Scratch::new();
    s.create("twin.qcow2", "compat=0.10", 1 << 20);
    s.copy("twin.qcow2", "ours.qcow2");
    assert!(!bitmap_both(
        &s,
        &["--add", "b"],
        "twin.qcow2",
        "ours.qcow2",
        "v2"
    ));
}

#[test]
fn usage_errors_are_one_line_and_exit_1() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    for args in [
        &["bitmap", "a.qcow2", "b"][..],
        &["bitmap", "--add", "a.qcow2"],
        &["bitmap", "--clear", "-g", "4k", "a.qcow2", "b"],
        &["bitmap", "--add", "-g", "1000", "a.qcow2", "b"],
        &["bitmap", "--remove", "a.qcow2", "missing"],
    ] {
        let out = s.qimg_output(args);
        assert_one_line_failure(&out, &format!("{args:?}"));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let twin = s.output("qemu-img", args);
        assert_eq!(twin.status.code(), Some(1), "qemu-img {args:?}");
    }
}

#[test]
fn bitmaps_a_program_without_support_left_stale_stay_stale() {
    // Autoclear bit 0 cleared (as a program without bitmap support leaves it): QEMU
    // ignores the bitmaps and counts their clusters as leaked; so does qimg, and its
    // writes do not bring them back.
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    s.qemu_img(&["bitmap", "--add", "a.qcow2", "b"]);
    let path = s.path("a.qcow2");
    let autoclear = common::read_header_field(&path, common::HeaderField::AutoclearFeatures);
    common::write_header_field(
        &path,
        common::HeaderField::AutoclearFeatures,
        autoclear & !1,
    );
    s.qimg(&["io", "-c", "write 0 4k", "a.qcow2"]);
    assert_eq!(bitmap_list(&s, "a.qcow2"), serde_json::Value::Null);
    let qemu = s.output("qemu-img", &["check", "a.qcow2"]);
    let ours = s.qimg_output(&["check", "a.qcow2"]);
    assert_eq!(qemu.status.code(), Some(3), "qemu-img sees leaks");
    assert_eq!(ours.status.code(), Some(3), "and so does qimg");
}

#[test]
fn convert_carries_bitmaps_as_qemu_img_convert_bitmaps() {
    let s = Scratch::new();
    s.create("src.qcow2", "cluster_size=4096", 16 << 20);
    s.qemu_img(&["bitmap", "--add", "src.qcow2", "a"]);
    s.qemu_img(&[
        "bitmap",
        "--add",
        "--disable",
        "-g",
        "64k",
        "src.qcow2",
        "b",
    ]);
    s.run(
        "qemu-io",
        &["-c", "write 1M 64k", "-c", "write -z 9M 4k", "src.qcow2"],
    );
    let both = |args: &[&str], twin: &str, ours: &str| {
        let q = s.output(
            "qemu-img",
            &[&["convert"], args, &["src.qcow2", twin]].concat(),
        );
        let o = s.qimg_output(&[&["convert"], args, &["src.qcow2", ours]].concat());
        assert_eq!(q.status.code(), o.status.code(), "convert {args:?}: {o:?}");
        o.status.success()
    };
    assert!(both(
        &["--bitmaps", "-O", "qcow2"],
        "twin.qcow2",
        "ours.qcow2"
    ));
    assert_twins(&s, "twin.qcow2", "ours.qcow2", "convert --bitmaps");
    assert!(!both(&["--bitmaps", "-O", "raw"], "twin.raw", "ours.raw"));
    assert!(!both(
        &["--skip-broken-bitmaps", "-O", "qcow2"],
        "t2.qcow2",
        "o2.qcow2"
    ));
    // An in-use bitmap: refused before anything is written, or skipped on request.
    let out = s.output(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", "src.qcow2"],
    );
    assert!(!out.status.success());
    assert!(!both(&["--bitmaps", "-O", "qcow2"], "t3.qcow2", "o3.qcow2"));
    assert!(!s.path("o3.qcow2").exists(), "nothing written");
    let args = ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"];
    assert!(both(&args, "t4.qcow2", "o4.qcow2"));
    let o = s.qimg_output(&[&["convert"], &args[..], &["src.qcow2", "o5.qcow2"]].concat());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Skipping inconsistent bitmap"));
    assert_twins(&s, "t4.qcow2", "o4.qcow2", "skip broken");
}

/// `check --output=json` of qemu-img and of qimg on `image`: exit codes and the counts
/// must agree.
fn assert_checks_agree(s: &Scratch, image: &str, expected: i32, label: &str) {
    let q = s.output("qemu-img", &["check", "--output=json", image]);
    let o = s.qimg_output(&["check", "--output=json", image]);
    assert_eq!(q.status.code(), Some(expected), "{label}: qemu-img {q:?}");
    assert_eq!(o.status.code(), Some(expected), "{label}: qimg {o:?}");
    let q: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
    let o: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["check-errors", "corruptions", "leaks", "image-end-offset"] {
        assert_eq!(o.get(key), q.get(key), "{label}: {key}");
    }
}

#[test]
fn check_and_repair_treat_bitmaps_as_qemu_img() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=4096", 8 << 20);
    s.qemu_img(&["bitmap", "--add", "-g", "512", "a.qcow2", "b"]);
    s.qemu_img(&["bitmap", "--add", "--disable", "a.qcow2", "d"]);
    s.run("qemu-io", &["-c", "write 0 1M", "a.qcow2"]);
    assert_checks_agree(&s, "a.qcow2", 0, "clean");
    // In use (a killed writer): not an error for either.
    s.copy("a.qcow2", "in-use.qcow2");
    let _ = s.output(
        "qemu-io",
        &["-c", "write 0 4k", "-c", "sigraise 9", "in-use.qcow2"],
    );
    assert_checks_agree(&s, "in-use.qcow2", 0, "in use");
    // Stale (autoclear bit clear): their clusters are leaks, and -r all frees them.
    for tool in ["qemu-img", "qimg"] {
        let name = format!("stale-{tool}.qcow2");
        s.copy("a.qcow2", &name);
        let path = s.path(&name);
        let autoclear = common::read_header_field(&path, common::HeaderField::AutoclearFeatures);
        common::write_header_field(
            &path,
            common::HeaderField::AutoclearFeatures,
            autoclear & !1,
        );
        assert_checks_agree(&s, &name, 3, "stale");
        let repair = if tool == "qimg" {
            s.qimg_output(&["check", "-r", "all", &name])
        } else {
            s.output("qemu-img", &["check", "-r", "all", &name])
        };
        assert_eq!(
            repair.status.code(),
            Some(0),
            "{tool} check -r all: {repair:?}"
        );
        assert_checks_agree(&s, &name, 0, "stale, repaired");
    }
    // A bitmap table entry with a reserved bit: a corruption to both.
    s.copy("a.qcow2", "bad-entry.qcow2");
    let image = qcow2_engine::Image::open(s.path("bad-entry.qcow2")).unwrap();
    let table = image.bitmap_directory().unwrap()[0].table_offset;
    drop(image);
    let entry = s.read_u64("bad-entry.qcow2", table);
    assert_ne!(entry, 0, "the first data cluster of bitmap b is allocated");
    s.write_u64("bad-entry.qcow2", table, entry | 2);
    // QEMU loads bitmaps when it opens an image and so cannot check this one at all;
    // qimg checks it and reports the entry as a corruption.
    let q = s.output("qemu-img", &["check", "bad-entry.qcow2"]);
    assert_eq!(q.status.code(), Some(1), "{q:?}");
    let o = s.qimg_output(&["check", "--output=json", "bad-entry.qcow2"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["corruptions"], 1, "{report}");
}

#[test]
fn amend_keeps_bitmaps_and_a_downgrade_drops_them_cleanly() {
    let s = Scratch::new();
    s.create("twin.qcow2", "cluster_size=4096", 8 << 20);
    s.qemu_img(&["bitmap", "--add", "twin.qcow2", "b"]);
    s.run(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "write 5M 8k", "twin.qcow2"],
    );
    s.copy("twin.qcow2", "ours.qcow2");
    for options in ["refcount_bits=1", "lazy_refcounts=on", "refcount_bits=64"] {
        s.qemu_img(&["amend", "-o", options, "twin.qcow2"]);
        s.qimg(&["amend", "-o", options, "ours.qcow2"]);
        assert_twins(&s, "twin.qcow2", "ours.qcow2", options);
    }
    // QEMU downgrades and loses the bitmaps (leaking their clusters); qimg loses them
    // too, freeing their clusters.
    s.qemu_img(&["amend", "-o", "compat=0.10,refcount_bits=16", "twin.qcow2"]);
    s.qimg(&["amend", "-o", "compat=0.10,refcount_bits=16", "ours.qcow2"]);
    assert_eq!(bitmap_list(&s, "ours.qcow2"), serde_json::Value::Null);
    assert_check_silent(&s, "ours.qcow2", "downgraded");
    s.assert_same_content("twin.qcow2", "ours.qcow2", "downgraded");
}
