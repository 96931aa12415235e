//! End-to-end tests of the `qimg` example against qemu-img/qemu-io as the oracle.
//!
//! Images are built with qemu-img and qemu-io in a temporary directory; `qimg` is built once
//! with `cargo build --example qimg`.

use std::path::Path;
use std::process::{Command, Output};

mod common;

use common::qimg_path;
use qcow2_engine::{Chain, ops};
use serde_json::Value;

fn run(program: &str, dir: &Path, args: &[&str]) -> Output {
    let program = if program == "qimg" {
        qimg_path().as_os_str().to_owned()
    } else {
        program.into()
    };
    Command::new(&program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {program:?}: {e}"))
}

/// Runs a qemu tool that must succeed.
fn qemu(dir: &Path, program: &str, args: &[&str]) {
    let out = run(program, dir, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs qemu-io commands on an image.
fn qemu_io(dir: &Path, image: &str, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    if image.ends_with(".raw") {
        args = vec!["-f", "raw"];
    }
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    qemu(dir, "qemu-io", &args);
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Asserts that `qimg map --output=json` equals `qemu-img map --output=json` on `image`.
fn assert_map_matches(dir: &Path, image: &str) {
    let theirs = json_of(&run("qemu-img", dir, &["map", "--output=json", image]));
    let ours = json_of(&run("qimg", dir, &["map", "--output=json", image]));
    assert_eq!(ours, theirs, "map of {image}");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temporary directory")
}

#[test]
fn map_matches_qemu_img_on_a_chain_with_zeros_discards_and_a_shorter_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 1 0 128k", "write -P 2 512k 64k"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "2M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 3 64k 64k",
            "write -z 128k 64k",
            "discard 0 64k",
            "write -P 4 1536k 64k",
            "write -z 1600k 64k",
        ],
    );
    assert_map_matches(d, "top.qcow2");
    // The human format lists the data ranges with the file that holds them.
    let human = run("qimg", d, &["map", "top.qcow2"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("0x80000         0x10000         0x70000         base.qcow2"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 4, "{text}");
}

#[test]
fn map_matches_qemu_img_on_compressed_clusters_and_human_map_refuses_them() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "1M"],
    );
    qemu_io(
        d,
        "c.qcow2",
        &[
            "write -c -P 1 0 64k",
            "write -c -P 2 64k 64k",
            "write -P 3 128k 64k",
        ],
    );
    assert_map_matches(d, "c.qcow2");
    let ours = run("qimg", d, &["map", "c.qcow2"]);
    assert!(!ours.status.success());
    assert!(String::from_utf8_lossy(&ours.stderr).contains("compressed clusters"));
}

#[test]
fn map_matches_qemu_img_with_512_byte_and_2_mib_clusters() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "s.qcow2",
            "1M",
        ],
    );
    qemu_io(
        d,
        "s.qcow2",
        &["write -P 1 0 3k", "write -z 1k 512", "write -P 9 100k 50k"],
    );
    assert_map_matches(d, "s.qcow2");
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "b.qcow2",
            "10M",
        ],
    );
    qemu_io(d, "b.qcow2", &["write -P 1 1M 3M", "write -z 6M 2M"]);
    assert_map_matches(d, "b.qcow2");
}

#[test]
fn map_matches_qemu_img_with_extended_l2_subclusters() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "1M",
        ],
    );
    qemu_io(
        d,
        "x.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 8k 2k",
            "write -z 32k 2k",
            "write -z 256k 64k",
        ],
    );
    assert_map_matches(d, "x.qcow2");
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "x.qcow2",
            "-F",
            "qcow2",
            "xo.qcow2",
        ],
    );
    qemu_io(d, "xo.qcow2", &["write -P 5 2k 4k", "write -z 40k 2k"]);
    assert_map_matches(d, "xo.qcow2");
}

#[test]
fn map_matches_qemu_img_on_raw_holes_and_preallocated_metadata() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::File::create(d.join("r.raw"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("creating r.raw");
    qemu_io(d, "r.raw", &["write -P 1 64k 4k", "write -P 0 512k 64k"]);
    assert_map_matches(d, "r.raw");
    qemu(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "o.qcow2",
        ],
    );
    assert_map_matches(d, "o.qcow2");
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "p.qcow2",
            "256k",
        ],
    );
    qemu_io(d, "p.qcow2", &["write -z 0 64k", "write -P 5 128k 64k"]);
    assert_map_matches(d, "p.qcow2");
}

#[test]
fn info_json_matches_qemu_img_for_the_documented_keys() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,lazy_refcounts=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "2M",
        ],
    );
    qemu_io(d, "top.qcow2", &["write -P 3 64k 64k"]);
    qemu(d, "qemu-img", &["snapshot", "-c", "snap1", "top.qcow2"]);
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ],
    );
    let keys = [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
        "snapshots",
        "format-specific",
    ];
    for image in ["top.qcow2", "v2.qcow2"] {
        let theirs = json_of(&run("qemu-img", d, &["info", "--output=json", image]));
        let ours = json_of(&run("qimg", d, &["info", "--output=json", image]));
        for key in keys {
            assert_eq!(ours.get(key), theirs.get(key), "{image}: key {key}");
        }
    }
    let theirs = json_of(&run(
        "qemu-img",
        d,
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    ));
    let ours = json_of(&run(
        "qimg",
        d,
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    ));
    assert_eq!(ours.as_array().map(Vec::len), Some(2));
    for (o, t) in ours
        .as_array()
        .unwrap()
        .iter()
        .zip(theirs.as_array().unwrap())
    {
        for key in keys {
            assert_eq!(o.get(key), t.get(key), "chain: key {key}");
        }
    }
}

/// Builds a small chain with data in every layer, zeros, discards and a compressed cluster.
fn build_chain(d: &Path) {
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu_io(
        d,
        "base.qcow2",
        &[
            "write -P 1 0 1M",
            "write -c -P 2 2M 64k",
            "write -P 0 3M 64k",
        ],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    );
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -P 3 512k 4k",
            "write -z 640k 64k",
            "discard 768k 64k",
            "write -P 4 5M 100k",
        ],
    );
}

#[test]
fn convert_to_raw_is_byte_equal_to_qemu_img_and_sparse() {
    let dir = tempdir();
    let d = dir.path();
    build_chain(d);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "theirs.raw"],
    );
    let out = run(
        "qimg",
        d,
        &["convert", "-O", "raw", "top.qcow2", "ours.raw"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = std::fs::read(d.join("ours.raw")).unwrap();
    let theirs = std::fs::read(d.join("theirs.raw")).unwrap();
    assert_eq!(ours.len(), 6 << 20);
    assert!(ours == theirs, "converted content differs from qemu-img's");
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(d.join("ours.raw")).unwrap().blocks() * 512;
    // About 1.2 MiB of non-zero data in a 6 MiB image (the zero-filled cluster is a hole).
    assert!(
        blocks < 2 << 20,
        "output is not sparse: {blocks} bytes allocated"
    );
    // -S 0 allocates everything.
    let out = run(
        "qimg",
        d,
        &["convert", "-S", "0", "-O", "raw", "top.qcow2", "full.raw"],
    );
    assert!(out.status.success());
    let blocks = std::fs::metadata(d.join("full.raw")).unwrap().blocks() * 512;
    assert!(blocks >= 6 << 20, "-S 0 left holes: {blocks}");
    assert!(std::fs::read(d.join("full.raw")).unwrap() == theirs);
}

#[test]
fn convert_to_qcow2_with_options_compression_and_a_backing_file() {
    let dir = tempdir();
    let d = dir.path();
    build_chain(d);
    let ok = |args: &[&str]| {
        let out = run("qimg", d, args);
        assert!(
            out.status.success(),
            "qimg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=8",
        "top.qcow2",
        "a.qcow2",
    ]);
    ok(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "top.qcow2",
        "c.qcow2",
    ]);
    ok(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "b.qcow2",
    ]);
    ok(&[
        "convert",
        "-p",
        "-S",
        "0",
        "-O",
        "qcow2",
        "top.qcow2",
        "s.qcow2",
    ]);
    for name in ["a.qcow2", "c.qcow2", "b.qcow2", "s.qcow2"] {
        qemu(d, "qemu-img", &["check", name]);
        qemu(d, "qemu-img", &["compare", "top.qcow2", name]);
    }
    let info = json_of(&run("qemu-img", d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 8);
    let info = json_of(&run("qemu-img", d, &["info", "--output=json", "c.qcow2"]));
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    let map = json_of(&run("qemu-img", d, &["map", "--output=json", "c.qcow2"]));
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true)
    );
    let info = json_of(&run("qemu-img", d, &["info", "--output=json", "b.qcow2"]));
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    // What qemu-img refuses, qimg refuses: a backing file without its format, compressed
    // raw output, unknown -o keys.
    for (args, what) in [
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "top.qcow2",
                "x.qcow2",
            ][..],
            "backing format",
        ),
        (
            &["convert", "-c", "-O", "raw", "top.qcow2", "x.raw"][..],
            "Compression not supported",
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "foo=1",
                "top.qcow2",
                "x.qcow2",
            ][..],
            "Invalid parameter 'foo'",
        ),
    ] {
        let out = run("qimg", d, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("qimg: x.") && err.contains(what),
            "{args:?}: {err}"
        );
        assert!(!d.join("x.qcow2").exists() && !d.join("x.raw").exists());
    }
}

#[test]
fn compare_exit_codes_follow_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    build_chain(d);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
    );
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "top.qcow2", "other.qcow2"],
    );
    qemu_io(d, "other.qcow2", &["write -P 9 1000 1"]);
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"],
    );
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "2M"],
    );

    let same = run("qimg", d, &["compare", "top.qcow2", "flat.qcow2"]);
    assert_eq!(same.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&same.stdout),
        "Images are identical.\n"
    );

    let differ = run("qimg", d, &["compare", "top.qcow2", "other.qcow2"]);
    assert_eq!(differ.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&differ.stdout),
        "Content mismatch at offset 512!\n"
    );
    // qemu-img agrees on the code and the offset.
    let theirs = run("qemu-img", d, &["compare", "top.qcow2", "other.qcow2"]);
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(theirs.stdout, differ.stdout);

    // Sizes differ but the extra part reads as zeros: identical unless strict.
    let sized = run("qimg", d, &["compare", "small.qcow2", "empty.qcow2"]);
    assert_eq!(sized.status.code(), Some(0));
    let strict = run("qimg", d, &["compare", "-s", "small.qcow2", "empty.qcow2"]);
    assert_eq!(strict.status.code(), Some(1));
    // Sizes differ and so does content: past the shorter image, after the size warning;
    // in the common part, without it (qemu-img compares that part first).
    qemu_io(d, "empty.qcow2", &["write -P 7 1536k 4k"]);
    let past = run("qimg", d, &["compare", "small.qcow2", "empty.qcow2"]);
    assert_eq!(
        String::from_utf8_lossy(&past.stdout),
        "Warning: Image size mismatch!\nContent mismatch at offset 1572864!\n"
    );
    let theirs = run("qemu-img", d, &["compare", "small.qcow2", "empty.qcow2"]);
    assert_eq!(theirs.stdout, past.stdout);
    qemu_io(d, "small.qcow2", &["write -P 7 0 4k"]);
    let common = run("qimg", d, &["compare", "small.qcow2", "empty.qcow2"]);
    assert_eq!(
        String::from_utf8_lossy(&common.stdout),
        "Content mismatch at offset 0!\n"
    );
    let theirs = run("qemu-img", d, &["compare", "small.qcow2", "empty.qcow2"]);
    assert_eq!(theirs.stdout, common.stdout);
    assert_eq!(theirs.status.code(), Some(1));

    let missing = run("qimg", d, &["compare", "top.qcow2", "missing.qcow2"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).starts_with("qimg: missing.qcow2: "));
}

#[test]
fn checksum_is_equal_across_layouts_and_differs_for_other_content() {
    let dir = tempdir();
    let d = dir.path();
    build_chain(d);
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"],
    );
    qemu(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "top.qcow2", "packed.qcow2"],
    );
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    qemu(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "top.qcow2", "other.qcow2"],
    );
    qemu_io(d, "other.qcow2", &["write -P 9 5M 1"]);
    let sum = |image: &str| {
        let v = json_of(&run("qimg", d, &["checksum", "--output=json", image]));
        assert_eq!(v["algorithm"], "crc32");
        assert_eq!(v["virtual-size"], 6 << 20);
        v["checksum"].as_str().unwrap().to_owned()
    };
    let reference = sum("top.qcow2");
    assert_eq!(reference.len(), 8);
    // The CRC of the raw bytes computed directly.
    let raw = std::fs::read(d.join("flat.raw")).unwrap();
    assert_eq!(reference, format!("{:08x}", crc32fast::hash(&raw)));
    for image in ["flat.qcow2", "packed.qcow2", "flat.raw"] {
        assert_eq!(sum(image), reference, "{image}");
    }
    assert_ne!(sum("other.qcow2"), reference);
    // The library agrees with the CLI.
    let chain = Chain::open(d.join("packed.qcow2")).unwrap();
    let crc = ops::checksum(&chain, &mut |_, _| true).unwrap();
    assert_eq!(format!("{crc:08x}"), reference);
}

#[test]
fn io_read_verifies_patterns() {
    let dir = tempdir();
    let d = dir.path();
    build_chain(d);
    let ok = run(
        "qimg",
        d,
        &[
            "io",
            "-c",
            "read -P 1 0 512k",
            "-c",
            "read -P 0x3 0x80000 4k",
            "top.qcow2",
        ],
    );
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("read 524288/524288 bytes at offset 0\n"),
        "{text}"
    );
    assert!(
        text.contains("read 4096/4096 bytes at offset 524288\n"),
        "{text}"
    );
    let bad = run("qimg", d, &["io", "-c", "read -P 1 1M 4k", "top.qcow2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stdout)
            .contains("Pattern verification failed at offset 1048576")
    );
}

#[test]
fn errors_name_the_file_on_one_line() {
    let dir = tempdir();
    let d = dir.path();
    let out = run("qimg", d, &["info", "nothere.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("qimg: nothere.qcow2: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `args` with `{}` replaced by `image`.
fn with_image<'a>(args: &[&'a str], image: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|&a| if a == "{}" { image } else { a })
        .collect()
}

#[test]
fn usage_errors_are_one_line_and_exit_1_as_in_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    let before = std::fs::read(d.join("a.qcow2")).unwrap();
    // (arguments, what qimg's line says)
    let cases: &[(&[&str], &str)] = &[
        (&["check", "--bogus", "{}"], "'--bogus'"),
        (&["check", "-Z", "{}"], "'-Z'"),
        (&["check", "-T"], "a value is required"),
        (
            &["check", "-T", "fast", "{}"],
            "Invalid source cache option: fast",
        ),
        (&["check", "-r", "some", "{}"], "'some'"),
        (&["check", "--output=xml", "{}"], "'xml'"),
        (&["check"], "<FILE>"),
        (&["check", "{}", "b.qcow2"], "'b.qcow2'"),
        (
            &["commit", "-r", "1x", "{}"],
            "Invalid rate limit specified: '1x'.",
        ),
        (&["commit", "-r", "-5", "{}"], "Must be between 0 and"),
        (
            &["commit", "-t", "fast", "{}"],
            "Invalid cache option: fast",
        ),
        (&["snapshot", "-c"], "-c"),
        (&["bogus"], "'bogus'"),
        (&[], "qimg --help"),
        (&["info"], "<FILE>"),
    ];
    for (args, needle) in cases {
        let args = with_image(args, "a.qcow2");
        let ours = run("qimg", d, &args);
        let stderr = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(ours.status.code(), Some(1), "qimg {args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "qimg {args:?}: {stderr}");
        assert!(
            stderr.starts_with("qimg: ") && stderr.contains(needle),
            "qimg {args:?}: {stderr:?} does not say {needle:?}"
        );
        assert!(ours.stdout.is_empty(), "qimg {args:?} printed on stdout");
        let theirs = run("qemu-img", d, &args);
        assert_eq!(theirs.status.code(), Some(1), "qemu-img {args:?}");
    }
    assert_eq!(std::fs::read(d.join("a.qcow2")).unwrap(), before);
    // A cache mode check accepts: the same report as qemu-img's.
    for cache in ["none", "writeback", "writethrough", "directsync", "unsafe"] {
        let args = ["check", "-T", cache, "a.qcow2"];
        let ours = run("qimg", d, &args);
        let theirs = run("qemu-img", d, &args);
        assert_eq!(ours.status.code(), Some(0), "qimg {args:?}");
        assert_eq!(theirs.status.code(), Some(0), "qemu-img {args:?}");
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
    }
}

#[test]
fn help_and_version_print_on_stdout_and_exit_0() {
    let dir = tempdir();
    let d = dir.path();
    for args in [
        &["--help"][..],
        &["-h"],
        &["check", "--help"],
        &["help", "commit"],
    ] {
        let out = run("qimg", d, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: qimg"),
            "{args:?}"
        );
        assert!(out.stderr.is_empty(), "{args:?}");
    }
    // Shaped as qemu-img's: a version line naming the tool, then a line about it.
    let theirs = run("qemu-img", d, &["--version"]);
    let theirs = String::from_utf8_lossy(&theirs.stdout);
    assert!(theirs.starts_with("qemu-img version "), "{theirs}");
    for flag in ["--version", "-V"] {
        let ours = run("qimg", d, &[flag]);
        assert_eq!(ours.status.code(), Some(0));
        let text = String::from_utf8_lossy(&ours.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), theirs.lines().count(), "{text}");
        assert_eq!(
            lines[0],
            format!("qimg version {} (qcow2-engine)", env!("CARGO_PKG_VERSION"))
        );
        assert!(lines[1].contains("qcow2-engine"), "{text}");
    }
}

/// Runs `program args` in `dir` with its stdout closed before it writes anything (a reader
/// gone, as `| head` leaves it).
fn with_stdout_closed(program: &str, dir: &Path, args: &[&str]) -> Output {
    let program = if program == "qimg" {
        qimg_path().as_os_str().to_owned()
    } else {
        program.into()
    };
    let mut child = Command::new(&program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program:?}: {e}"));
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_the_output_quietly_as_in_qemu_img() {
    let dir = tempdir();
    let d = dir.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    // Clusters written last to first: none of the map's extents merge.
    let writes: Vec<String> = (0..200)
        .rev()
        .map(|i| format!("write -P {} {}k 4k", i % 250 + 1, i * 128))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(d, "a.qcow2", &writes);
    qemu(d, "qemu-img", &["snapshot", "-c", "one", "a.qcow2"]);
    for args in [
        &["info", "a.qcow2"][..],
        &["map", "a.qcow2"],
        &["map", "--output=json", "a.qcow2"],
        &["snapshot", "-l", "a.qcow2"],
        &["check", "a.qcow2"],
        &["compare", "a.qcow2", "a.qcow2"],
    ] {
        for program in ["qemu-img", "qimg"] {
            let out = with_stdout_closed(program, d, args);
            assert_eq!(out.status.code(), Some(0), "{program} {args:?}");
            assert!(
                out.stderr.is_empty(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // The work goes on without its reader: a convert with progress completes.
    for program in ["qemu-img", "qimg"] {
        let copy = format!("{program}.qcow2");
        let args = ["convert", "-p", "-O", "qcow2", "a.qcow2", &copy];
        let out = with_stdout_closed(program, d, &args);
        assert_eq!(out.status.code(), Some(0), "{program} {args:?}");
        assert!(out.stderr.is_empty(), "{program} {args:?}");
        qemu(d, "qemu-img", &["compare", "a.qcow2", &copy]);
    }
    // A stdout that fails otherwise is an error, on one line.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full");
    if let Ok(full) = full {
        let out = Command::new(qimg_path())
            .args(["info", "a.qcow2"])
            .current_dir(d)
            .stdout(full)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("qimg: stdout: "), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

/// Splits what a command with `-p` printed into a pipe into its progress lines (each
/// ended by `\r`) and what follows the last one.
fn split_progress(stdout: &[u8], label: &str) -> (Vec<f64>, String) {
    let text = String::from_utf8(stdout.to_vec()).unwrap();
    let mut parts: Vec<&str> = text.split('\r').collect();
    let tail = parts.pop().unwrap_or_default().to_owned();
    let percents = parts
        .iter()
        .map(|line| {
            let number = line
                .strip_prefix("    (")
                .and_then(|r| r.strip_suffix("/100%)"))
                .unwrap_or_else(|| panic!("{label}: not a progress line: {line:?}"));
            let decimals = number.split_once('.').map(|(_, d)| d.len());
            assert_eq!(decimals, Some(2), "{label}: {line:?}");
            number.parse::<f64>().unwrap()
        })
        .collect();
    (percents, tail)
}

/// Progress lines start at 0.00, never go back and (when `complete`) end at 100.00.
fn assert_progress(percents: &[f64], complete: bool, label: &str) {
    assert_eq!(percents.first(), Some(&0.0), "{label}: {percents:?}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "{label}: {percents:?}"
    );
    if complete {
        assert_eq!(percents.last(), Some(&100.0), "{label}: {percents:?}");
    }
}

#[test]
fn progress_into_a_pipe_prints_qemu_img_lines_on_stdout() {
    let dir = tempdir();
    for twin in ["ours", "qemu"] {
        std::fs::create_dir(dir.path().join(twin)).unwrap();
        build_chain(&dir.path().join(twin));
    }
    let ours = dir.path().join("ours");
    let qemu_dir = dir.path().join("qemu");
    // (arguments, whether progress reaches 100): run in order on both twins.
    let steps: &[(&[&str], bool)] = &[
        (
            &["convert", "-p", "-O", "qcow2", "top.qcow2", "c.qcow2"],
            true,
        ),
        (&["compare", "-p", "top.qcow2", "c.qcow2"], true),
        (&["compare", "-p", "top.qcow2", "base.qcow2"], false),
        (&["amend", "-p", "-o", "lazy_refcounts=on", "c.qcow2"], true),
        (&["commit", "-p", "-d", "top.qcow2"], true),
        (&["rebase", "-p", "-b", "", "top.qcow2"], true),
    ];
    for (args, complete) in steps {
        let label = format!("{args:?}");
        let mine = run("qimg", &ours, args);
        let theirs = run("qemu-img", &qemu_dir, args);
        assert_eq!(mine.status.code(), theirs.status.code(), "{label}");
        assert!(mine.stderr.is_empty(), "{label}: {mine:?}");
        let (percents, tail) = split_progress(&mine.stdout, &format!("qimg {label}"));
        let (their_percents, their_tail) =
            split_progress(&theirs.stdout, &format!("qemu-img {label}"));
        assert_progress(&percents, *complete, &format!("qimg {label}"));
        assert_progress(&their_percents, *complete, &format!("qemu-img {label}"));
        // What follows the lines is the same: the newline that ends them and the verdict
        // or message, in qemu-img's order (besides qimg's line on what a merge found in
        // place already).
        let tail: String = tail
            .split_inclusive('\n')
            .filter(|line| !line.starts_with("Already in place: "))
            .collect();
        assert_eq!(tail, their_tail, "{label}");
    }
    // Commands beyond qemu-img print the same lines.
    for args in [
        &["checksum", "-p", "c.qcow2"][..],
        &["pull", "-p", "--dry-run", "c.qcow2"],
    ] {
        let out = run("qimg", &ours, args);
        assert!(out.status.success(), "{args:?}");
        let (percents, tail) = split_progress(&out.stdout, &format!("{args:?}"));
        assert_progress(&percents, true, &format!("{args:?}"));
        assert!(
            tail.starts_with('\n') && tail.len() > 1,
            "{args:?}: {tail:?}"
        );
    }
    // JSON stays alone on stdout; -q silences progress, as in qemu-img.
    let json = json_of(&run(
        "qimg",
        &ours,
        &["checksum", "-p", "--output=json", "c.qcow2"],
    ));
    assert_eq!(json["algorithm"], "crc32");
    for (program, dir) in [("qimg", &ours), ("qemu-img", &qemu_dir)] {
        let out = run(program, dir, &["commit", "-q", "-p", "c.qcow2"]);
        assert!(out.stdout.is_empty(), "{program}: {out:?}");
    }
}
