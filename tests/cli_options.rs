//! qemu-img's smaller options, each run with qemu-img and qimg on twin images: `measure
//! -l`, `compare -q` and `-T`, `amend -t`, `rebase -U`. Exit codes, parsed JSON, the text
//! and the resulting images are compared.

mod common;

use common::Scratch;
use common::holder::Holder;
use serde_json::Value;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn json(out: &std::process::Output, what: &str) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// An image with a snapshot of 4 MiB of data, then 16 MiB more written, and a bitmap.
fn snapshotted(s: &Scratch, name: &str) {
    s.create(name, "cluster_size=65536", 64 << 20);
    s.qemu_io(name, "qcow2", &["write -P 1 0 4M".to_string()]);
    s.qemu_img(&["snapshot", "-c", "one", name]);
    s.qemu_io(name, "qcow2", &["write -P 2 8M 16M".to_string()]);
    s.qemu_img(&["bitmap", "--add", name, "b0"]);
}

#[test]
fn measure_l_measures_the_snapshot_as_qemu_img() {
    let s = Scratch::new();
    snapshotted(&s, "m.qcow2");
    let mut measured_snapshot = None;
    for param in [
        None,
        Some("one"),
        Some("1"),
        Some("snapshot.name=one"),
        Some("snapshot.id=1"),
        Some("snapshot.id=1,snapshot.name=one"),
        Some("nope"),
        Some("snapshot.id=1,snapshot.name=two"),
        Some("snapshot.foo=1"),
    ] {
        for out_fmt in ["qcow2", "raw"] {
            let mut args = vec!["measure", "--output=json", "-O", out_fmt];
            if let Some(p) = param {
                args.extend(["-l", p]);
            }
            args.push("m.qcow2");
            let what = format!("{args:?}");
            let theirs = s.output("qemu-img", &args);
            let ours = s.qimg_output(&args);
            assert_eq!(code(&ours), code(&theirs), "{what}");
            if theirs.status.success() {
                let o = json(&ours, &what);
                assert_eq!(o, json(&theirs, &what), "{what}");
                if param == Some("one") && out_fmt == "qcow2" {
                    measured_snapshot = Some(o["required"].as_u64().unwrap());
                }
            } else {
                common::assert_one_line_failure(&ours, &what);
            }
        }
    }
    // The snapshot holds 4 MiB, the active image 20 MiB: -l measured the snapshot.
    let active = json(
        &s.qimg_output(&["measure", "--output=json", "-O", "qcow2", "m.qcow2"]),
        "active",
    )["required"]
        .as_u64()
        .unwrap();
    let snapshot = measured_snapshot.unwrap();
    assert!(
        snapshot < 8 << 20 && active > 20 << 20,
        "{snapshot} {active}"
    );
}

#[test]
fn compare_q_and_t_as_qemu_img() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 4 << 20);
    s.qemu_io("a.qcow2", "qcow2", &["write -P 7 1M 64k".to_string()]);
    s.copy("a.qcow2", "same.qcow2");
    s.copy("a.qcow2", "other.qcow2");
    s.qemu_io("other.qcow2", "qcow2", &["write -P 8 2M 4k".to_string()]);
    for b in ["same.qcow2", "other.qcow2", "missing.qcow2"] {
        for extra in [
            &["-q"][..],
            &["-q", "-p"],
            &["-T", "none"],
            &["-q", "-T", "writeback", "-s"],
            &["-T", "directsync"],
        ] {
            let args = [&["compare"][..], extra, &["a.qcow2", b]].concat();
            let what = format!("{args:?}");
            let theirs = s.output("qemu-img", &args);
            let ours = s.qimg_output(&args);
            assert_eq!(code(&ours), code(&theirs), "{what}");
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "{what}"
            );
            if extra.contains(&"-q") {
                assert!(ours.stdout.is_empty(), "{what}: -q printed");
            }
        }
    }
    // A cache mode qemu-img does not know is a usage error for both.
    let args = ["compare", "-T", "bogus", "a.qcow2", "same.qcow2"];
    let theirs = s.output("qemu-img", &args);
    let ours = s.qimg_output(&args);
    assert_ne!(code(&theirs), Some(0));
    assert_ne!(code(&ours), Some(0));
}

#[test]
fn amend_t_as_qemu_img() {
    let s = Scratch::new();
    s.create("src.qcow2", "cluster_size=65536,lazy_refcounts=on", 8 << 20);
    s.qemu_io("src.qcow2", "qcow2", &["write -P 3 0 1M".to_string()]);
    for cache in ["none", "writeback", "writethrough", "directsync", "unsafe"] {
        let (q, o) = ("q.qcow2", "o.qcow2");
        s.copy("src.qcow2", q);
        s.copy("src.qcow2", o);
        let args = |f: &'static str| ["amend", "-t", cache, "-o", "lazy_refcounts=off", f];
        let theirs = s.output("qemu-img", &args(q));
        let ours = s.qimg_output(&args(o));
        assert_eq!(code(&ours), Some(0), "-t {cache}: {ours:?}");
        assert_eq!(code(&theirs), Some(0), "-t {cache}");
        s.assert_clean(o, cache);
        s.assert_same_content(q, o, cache);
        let info = |f: &str| {
            let v: Value =
                serde_json::from_str(&s.qemu_img(&["info", "--output=json", f])).unwrap();
            v["format-specific"]["data"].clone()
        };
        assert_eq!(info(o), info(q), "-t {cache}");
        assert_eq!(info(o)["lazy-refcounts"], Value::Bool(false));
    }
    let args = [
        "amend",
        "-t",
        "bogus",
        "-o",
        "lazy_refcounts=off",
        "src.qcow2",
    ];
    assert_eq!(code(&s.output("qemu-img", &args)), Some(1));
    let ours = s.qimg_output(&args);
    assert_eq!(code(&ours), Some(1));
    common::assert_one_line_failure(&ours, "-t bogus");
}

#[test]
fn amend_o_help_and_force_as_qemu_img() {
    let s = Scratch::new();
    s.create("img.qcow2", "", 1 << 20);
    s.write_file("img.raw", &[0u8; 4096]);
    // The header and the options qimg can change, each line as qemu-img prints it (its
    // list also has data_file, data_file_raw and the encryption options qimg refuses).
    for args in [
        &["amend", "-o", "help", "img.qcow2"][..],
        &["amend", "-f", "qcow2", "-o", "help", "no-such-file"],
        &["amend", "-o", "lazy_refcounts=on,?", "img.qcow2"],
    ] {
        let what = format!("{args:?}");
        let theirs = s.output("qemu-img", args);
        let ours = s.qimg_output(args);
        assert_eq!(code(&theirs), Some(0), "{what}");
        assert_eq!(code(&ours), Some(0), "{what}: {ours:?}");
        let theirs = String::from_utf8_lossy(&theirs.stdout).into_owned();
        let ours = String::from_utf8_lossy(&ours.stdout).into_owned();
        let mut lines = ours.lines();
        assert_eq!(lines.next(), theirs.lines().next(), "{what}");
        let listed: Vec<&str> = lines.collect();
        assert_eq!(listed.len(), 6, "{what}: {ours}");
        for line in listed {
            assert!(
                theirs.lines().any(|l| l == line),
                "{what}: {line:?} not in {theirs}"
            );
        }
    }
    // Formats without amendable options: refused by both, in one line.
    for args in [
        &["amend", "-f", "raw", "-o", "help", "img.raw"][..],
        &["amend", "-o", "help", "img.raw"],
    ] {
        let what = format!("{args:?}");
        assert_eq!(code(&s.output("qemu-img", args)), Some(1), "{what}");
        let ours = s.qimg_output(args);
        assert_eq!(code(&ours), Some(1), "{what}");
        common::assert_one_line_failure(&ours, &what);
    }
    // --force is accepted and amends as without it.
    s.copy("img.qcow2", "q.qcow2");
    s.copy("img.qcow2", "o.qcow2");
    let args = |f: &'static str| ["amend", "--force", "-o", "lazy_refcounts=on", f];
    assert_eq!(code(&s.output("qemu-img", &args("q.qcow2"))), Some(0));
    assert_eq!(code(&s.qimg_output(&args("o.qcow2"))), Some(0));
    let info = |f: &str| {
        let v: Value = serde_json::from_str(&s.qemu_img(&["info", "--output=json", f])).unwrap();
        v["format-specific"]["data"].clone()
    };
    assert_eq!(info("o.qcow2"), info("q.qcow2"));
    s.assert_clean("o.qcow2", "--force");
}

#[test]
fn rebase_u_opens_the_new_backing_file_as_qemu_img() {
    let s = Scratch::new();
    s.create("base.qcow2", "", 1 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 64k".to_string()]);
    s.create("base2.qcow2", "", 1 << 20);
    s.qemu_io("base2.qcow2", "qcow2", &["write -P 2 64k 64k".to_string()]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 3 128k 4k".to_string()]);
    s.copy("top.qcow2", "q.qcow2");
    s.copy("top.qcow2", "o.qcow2");
    s.copy("top.qcow2", "reference.qcow2");
    // A writer holds the new backing file.
    let holder = Holder::start(
        &s,
        "qemu-io",
        &["-c", "sleep 60000", "base2.qcow2"],
        "base2.qcow2",
        101,
    );
    let args = |force: bool, f: &'static str| {
        let mut a = vec!["rebase"];
        if force {
            a.push("-U");
        }
        a.extend(["-b", "base2.qcow2", "-F", "qcow2", f]);
        a
    };
    // Without -U both refuse and change nothing; with -U both rebase.
    let theirs = s.output("qemu-img", &args(false, "q.qcow2"));
    let ours = s.qimg_output(&args(false, "o.qcow2"));
    assert_eq!(code(&theirs), Some(1));
    assert_eq!(code(&ours), Some(1));
    common::assert_one_line_failure(&ours, "rebase without -U");
    assert_eq!(
        common::backing_of(&s, "o.qcow2").as_deref(),
        Some("base.qcow2")
    );
    let theirs = s.output("qemu-img", &args(true, "q.qcow2"));
    let ours = s.qimg_output(&args(true, "o.qcow2"));
    assert_eq!(code(&theirs), Some(0), "{theirs:?}");
    assert_eq!(code(&ours), Some(0), "{ours:?}");
    drop(holder);
    for f in ["q.qcow2", "o.qcow2"] {
        assert_eq!(common::backing_of(&s, f).as_deref(), Some("base2.qcow2"));
        s.assert_clean(f, f);
        s.assert_same_content(f, "reference.qcow2", f);
    }
    s.assert_same_content("q.qcow2", "o.qcow2", "twins");
}

#[test]
fn rebase_c_stores_the_copied_clusters_compressed_as_qemu_img() {
    let s = Scratch::new();
    // zlib and zstd; a size that ends inside a cluster.
    for (options, size, tail) in [
        ("cluster_size=65536", "8M", "write -P 8 7M 1k"),
        // The last cluster holds 1536 bytes of the image.
        (
            "cluster_size=65536,compression_type=zstd",
            "8390144",
            "write -P 8 8M 1k",
        ),
    ] {
        for f in ["base.qcow2", "new.qcow2"] {
            s.qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, f, size]);
        }
        s.qemu_io(
            "base.qcow2",
            "qcow2",
            &[
                "write -P 1 0 3M".to_string(),
                "write -P 9 5M 100k".to_string(),
                tail.to_string(),
            ],
        );
        s.qemu_io("new.qcow2", "qcow2", &["write -P 1 1M 64k".to_string()]);
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            options,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        s.qemu_io("top.qcow2", "qcow2", &["write -P 2 2M 70k".to_string()]);
        s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "view.raw"]);
        s.copy("top.qcow2", "q.qcow2");
        s.copy("top.qcow2", "o.qcow2");
        let args = |f: &'static str| ["rebase", "-c", "-b", "new.qcow2", "-F", "qcow2", f];
        assert_eq!(code(&s.output("qemu-img", &args("q.qcow2"))), Some(0));
        let ours = s.qimg_output(&args("o.qcow2"));
        assert_eq!(code(&ours), Some(0), "{options}: {ours:?}");
        s.assert_same_content("o.qcow2", "view.raw", options);
        s.assert_clean("o.qcow2", options);
        // The same clusters compressed, in the same places of the map, each the same
        // compressed bytes (same clusters chosen, same compression level). Not the same
        // host offsets: qemu-img compresses a request's clusters on a thread pool and
        // places each as its thread finishes: two of its runs on twin images differ in
        // the order of the compressed clusters in the file (seen on qemu-img 10.0), an
        // order no other program can reproduce. qimg places them in guest order.
        let (q, o) = (
            compressed_streams(&s, "q.qcow2"),
            compressed_streams(&s, "o.qcow2"),
        );
        assert!(!q.is_empty(), "{options}");
        assert!(o == q, "{options}: the compressed streams differ");
        let map = |f: &str| -> Value {
            serde_json::from_str(&s.qemu_img(&["map", "--output=json", f])).unwrap()
        };
        let strip = |mut v: Value| {
            for e in v.as_array_mut().unwrap() {
                e.as_object_mut().unwrap().remove("offset");
            }
            v
        };
        assert_eq!(strip(map("o.qcow2")), strip(map("q.qcow2")), "{options}");
        let check = |f: &str| -> Value {
            serde_json::from_str(&s.qemu_img(&["check", "--output=json", f])).unwrap()
        };
        let (o, q) = (check("o.qcow2"), check("q.qcow2"));
        assert_eq!(
            o["compressed-clusters"], q["compressed-clusters"],
            "{options}"
        );
        assert!(o["compressed-clusters"].as_u64().unwrap() > 0, "{options}");
        assert_eq!(
            common::backing_of(&s, "o.qcow2").as_deref(),
            Some("new.qcow2")
        );
    }
}

/// Each compressed cluster's stored stream (its deflate or zstd data, without the bytes
/// of whatever follows it in its last sector), by guest offset.
fn compressed_streams(s: &Scratch, image: &str) -> std::collections::BTreeMap<u64, Vec<u8>> {
    use qcow2_engine::format::CompressionType;
    use qcow2_engine::{Chain, Mapping};
    let chain = Chain::open(s.path(image)).unwrap();
    let top = chain.top().as_qcow2().unwrap();
    let file = std::fs::read(s.path(image)).unwrap();
    let mut streams = std::collections::BTreeMap::new();
    for run in top.runs(0, top.size()) {
        let run = run.unwrap();
        let Mapping::Compressed(d) = run.mapping else {
            continue;
        };
        let end = (d.host_offset + d.len).min(file.len() as u64);
        let stored = &file[d.host_offset as usize..end as usize];
        let len = match top.compression_type() {
            CompressionType::Zlib => {
                let mut inflate = flate2::Decompress::new(false);
                let mut out = vec![0u8; 2 << 20];
                inflate
                    .decompress(stored, &mut out, flate2::FlushDecompress::Finish)
                    .unwrap();
                inflate.total_in() as usize
            }
            CompressionType::Zstd => zstd::zstd_safe::find_frame_compressed_size(stored).unwrap(),
        };
        streams.insert(run.offset, stored[..len].to_vec());
    }
    streams
}

/// `resize --preallocation` against qemu-img on twin raw files: off leaves the new area
/// a hole, falloc and full make it take disk space, metadata and an unknown mode are
/// refused with qemu-img's words, and preallocating a shrink too. On qcow2 images only
/// off is done so far (QEMU allocates the new clusters there): the other modes are refused
/// in one line, nothing changed.
#[test]
fn resize_preallocation_as_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    s.qemu_io("r.raw", "raw", &["write -P 1 0 64k".to_string()]);
    let blocks = |f: &str| std::fs::metadata(s.path(f)).unwrap().blocks() * 512;
    for (mode, size, fails) in [
        ("off", "+1M", None),
        ("falloc", "+1M", None),
        ("full", "+1M", None),
        (
            "metadata",
            "+1M",
            Some("Unsupported preallocation mode: metadata"),
        ),
        ("bogus", "+1M", Some("Invalid preallocation mode 'bogus'")),
        (
            "full",
            "512k",
            Some("Preallocation can only be used for growing images"),
        ),
    ] {
        let label = format!("{mode} {size}");
        let arg = format!("--preallocation={mode}");
        for f in ["q.raw", "o.raw"] {
            s.copy("r.raw", f);
        }
        let start = (blocks("q.raw"), blocks("o.raw"));
        let args = |f: &'static str| ["resize", "-f", "raw", "--shrink", &arg, f, size];
        let theirs = s.output("qemu-img", &args("q.raw"));
        let ours = s.qimg_output(&args("o.raw"));
        assert_eq!(code(&ours), code(&theirs), "{label}: {ours:?}");
        match fails {
            Some(message) => {
                assert!(String::from_utf8_lossy(&theirs.stderr).contains(message));
                common::assert_one_line_failure(&ours, &label);
                assert!(String::from_utf8_lossy(&ours.stderr).contains(message));
                assert!(
                    std::fs::read(s.path("o.raw")).unwrap()
                        == std::fs::read(s.path("r.raw")).unwrap()
                );
            }
            None => {
                let (q, o) = (
                    std::fs::read(s.path("q.raw")).unwrap(),
                    std::fs::read(s.path("o.raw")).unwrap(),
                );
                assert!(q == o && o.len() == 2 << 20, "{label}: contents");
                // The new area takes disk space exactly when qemu-img's does.
                let (q_grown, o_grown) = (
                    blocks("q.raw") - start.0 >= 1 << 20,
                    blocks("o.raw") - start.1 >= 1 << 20,
                );
                assert_eq!(o_grown, q_grown, "{label}: allocation");
                assert_eq!(o_grown, mode != "off", "{label}");
            }
        }
    }
    s.qemu_img(&["create", "-q", "-f", "qcow2", "q.qcow2", "1M"]);
    s.copy("q.qcow2", "o.qcow2");
    let off = ["resize", "--preallocation=off", "o.qcow2", "+1M"];
    assert_eq!(
        s.qimg(&off),
        s.qemu_img(&["resize", "--preallocation=off", "q.qcow2", "+1M"])
    );
    s.assert_same_content("o.qcow2", "q.qcow2", "qcow2 off");
}

/// `qemu-img map` of `name` without host offsets, adjacent runs that then look alike
/// merged; `host_zero` false drops the zero flag of data runs, which depends on where
/// the file's holes fall (their placement differs below the file system's block size).
fn map_shape(s: &Scratch, name: &str, host_zero: bool) -> Vec<(u64, u64, usize, bool, bool, bool)> {
    let mut runs: Vec<(u64, u64, usize, bool, bool, bool)> = Vec::new();
    for e in s.map(name, "qcow2") {
        let zero = e.zero && (host_zero || !e.data);
        match runs.last_mut() {
            Some(last)
                if (last.2, last.3, last.4, last.5) == (e.depth, e.present, zero, e.data) =>
            {
                last.1 += e.length;
            }
            _ => runs.push((e.start, e.length, e.depth, e.present, zero, e.data)),
        }
    }
    runs
}

/// qcow2 images grown with `--preallocation=metadata|falloc|full` by qemu-img and by qimg
/// on twins of several layouts: same exit code (and message where qemu-img's is ours),
/// same content, a clean image, the same map but for host offsets (and with them where
/// the layout is QEMU's: metadata with clusters of 4 KiB and more), the new area on disk
/// exactly when qemu-img's is, and a file of about the same length.
#[test]
fn qcow2_resize_preallocation_as_qemu_img() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    s.create("b.qcow2", "", 4 << 20);
    s.qemu_io("b.qcow2", "qcow2", &["write -P 7 0 4M".to_string()]);
    let blocks = |f: &str| std::fs::metadata(s.path(f)).unwrap().blocks() * 512;
    let len = |f: &str| std::fs::metadata(s.path(f)).unwrap().len();
    // (label, options, size, data written, on the backing file, new size)
    #[rustfmt::skip]
    let layouts: [(&str, &str, u64, &str, bool, &str); 10] = [
        ("64k", "cluster_size=65536", 1 << 20, "write -P 1 0 64k", false, "+1M"),
        ("64k-ext", "cluster_size=65536,extended_l2=on", 1 << 20, "write -P 1 0 64k", false,
         "+1M"),
        ("4k", "cluster_size=4096", 1 << 20, "", false, "+5M"),
        ("512", "cluster_size=512", 1 << 20, "write -P 1 0 64k", false, "+3M"),
        ("v2", "cluster_size=4096,compat=0.10", 1 << 20, "write -P 1 0 64k", false, "+2M"),
        ("partial", "cluster_size=65536", 1000 << 10, "write -P 1 0 1000k", false, "+1100k"),
        ("backing", "cluster_size=65536", 1000 << 10, "write -P 1 0 4k", true, "3M"),
        ("backing-ext", "cluster_size=65536,extended_l2=on", 1 << 20, "", true, "3M"),
        ("v2-backing", "cluster_size=65536,compat=0.10", 1 << 20, "", true, "3M"),
        // Growth inside the partial last cluster: zeros written, even in version 2.
        ("v2-tail", "cluster_size=65536,compat=0.10", 1000 << 10, "", true, "1020k"),
    ];
    for (name, options, size, write, on_backing, new_size) in layouts {
        for mode in ["metadata", "falloc", "full"] {
            let label = format!("{name} {mode}");
            for f in ["q.qcow2", "o.qcow2"] {
                if on_backing {
                    s.create_overlay(f, "b.qcow2", "qcow2", options, Some(size));
                } else {
                    s.create(f, options, size);
                }
                if !write.is_empty() {
                    s.qemu_io(f, "qcow2", &[write.to_string()]);
                }
            }
            let start = (blocks("q.qcow2"), blocks("o.qcow2"));
            let before = std::fs::read(s.path("o.qcow2")).unwrap();
            let arg = format!("--preallocation={mode}");
            let theirs = s.output("qemu-img", &["resize", &arg, "q.qcow2", new_size]);
            let ours = s.qimg_output(&["resize", &arg, "o.qcow2", new_size]);
            assert_eq!(code(&ours), code(&theirs), "{label}: {ours:?} {theirs:?}");
            if !theirs.status.success() {
                // Only version 2 over a longer backing file with metadata: QEMU fails
                // once it zeroes the new clusters; qimg refuses before changing anything.
                assert_eq!((name, mode), ("v2-backing", "metadata"), "{label}");
                common::assert_one_line_failure(&ours, &label);
                assert!(
                    std::fs::read(s.path("o.qcow2")).unwrap() == before,
                    "{label}"
                );
                continue;
            }
            s.assert_same_content("o.qcow2", "q.qcow2", &label);
            s.assert_clean("o.qcow2", &label);
            let big_clusters = !options.contains("cluster_size=512");
            let host_zero = mode != "metadata" || big_clusters;
            assert_eq!(
                map_shape(&s, "o.qcow2", host_zero),
                map_shape(&s, "q.qcow2", host_zero),
                "{label}: map"
            );
            if mode == "metadata" && big_clusters {
                let offsets = |f: &str| {
                    let map = s.map(f, "qcow2");
                    map.iter().map(|e| (e.start, e.offset)).collect::<Vec<_>>()
                };
                assert_eq!(offsets("o.qcow2"), offsets("q.qcow2"), "{label}: offsets");
            }
            if name == "v2-tail" {
                continue;
            }
            // The new area (at least 1 MiB) takes disk space exactly when qemu-img's does.
            let grown = |now: u64, then: u64| now.saturating_sub(then) >= 1 << 20;
            let (q_grown, o_grown) = (
                grown(blocks("q.qcow2"), start.0),
                grown(blocks("o.qcow2"), start.1),
            );
            assert_eq!(o_grown, q_grown, "{label}: allocation");
            assert_eq!(o_grown, mode != "metadata", "{label}: allocation");
            // Refcount structures are placed apart from QEMU's (its falloc/full move the
            // refcount table first): a few clusters apart at most.
            let (q_len, o_len) = (len("q.qcow2"), len("o.qcow2"));
            assert!(
                o_len.abs_diff(q_len) <= 256 << 10,
                "{label}: file length {o_len}, qemu-img's {q_len}"
            );
        }
    }
    // Without preallocation too, version 2 grows inside its partial last cluster over a
    // longer backing file.
    for f in ["q.qcow2", "o.qcow2"] {
        s.create_overlay(f, "b.qcow2", "qcow2", "compat=0.10", Some(1000 << 10));
    }
    assert_eq!(
        s.qimg(&["resize", "o.qcow2", "1020k"]),
        s.qemu_img(&["resize", "q.qcow2", "1020k"])
    );
    s.assert_same_content("o.qcow2", "q.qcow2", "v2 tail off");
    // Not even to the same size, as qemu-img.
    s.create("q.qcow2", "", 1 << 20);
    s.copy("q.qcow2", "o.qcow2");
    for mode in ["metadata", "falloc", "full"] {
        let arg = format!("--preallocation={mode}");
        let theirs = s.output("qemu-img", &["resize", &arg, "q.qcow2", "1M"]);
        let ours = s.qimg_output(&["resize", &arg, "o.qcow2", "1M"]);
        assert_eq!(code(&ours), code(&theirs), "same size {mode}");
        common::assert_one_line_failure(&ours, mode);
        let message = "Preallocation can only be used for growing images";
        assert!(String::from_utf8_lossy(&theirs.stderr).contains(message));
        assert!(String::from_utf8_lossy(&ours.stderr).contains(message));
    }
}
