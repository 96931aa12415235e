//! Image creation and measuring against QEMU as the oracle: every image the library (or
//! `qimg create`) makes must pass `qemu-img check` with no leak, show its options in
//! `qemu-img info`, take qemu-io writes and read them back, and stay clean afterwards.
//! `qimg measure` must print what `qemu-img measure` prints.

mod common;

use std::process::{Command, Output};

use common::Scratch;
use qcow2_engine::format::CompressionType;
use qcow2_engine::{Chain, Compat, CreateOptions, Format, Preallocation, create};
use serde_json::Value;

fn qimg(s: &Scratch, args: &[&str]) -> Output {
    s.qimg_output(args)
}

fn tool(s: &Scratch, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(s.dir())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn json(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `qemu-img check` exits 0 and reports no leak and no corruption.
fn assert_clean(s: &Scratch, name: &str, context: &str) {
    let out = tool(s, "qemu-img", &["check", "--output=json", name]);
    let status = out.status.code();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        status,
        Some(0),
        "{context}: qemu-img check {name}: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in ["leaks", "corruptions", "check-errors"] {
        let n = report.get(key).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "{context}: {key} in {report}");
    }
}

/// Writes a pattern with qemu-io across a cluster boundary and at the end, reads it back.
fn qemu_io_round_trip(s: &Scratch, name: &str, cluster: u64, size: u64, context: &str) {
    let a = cluster / 2;
    let len = cluster.min(size - a).min(64 << 10);
    let tail = size - 4096;
    let cmds = [
        format!("write -P 0xab {a} {len}"),
        format!("write -P 0x5c {tail} 4096"),
        format!("read -P 0xab {a} {len}"),
        format!("read -P 0x5c {tail} 4096"),
    ];
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(name);
    let out = tool(s, "qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "{context}: qemu-io on {name}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Our reader sees QEMU's writes.
    let chain = s.open(name);
    let mut buf = vec![0u8; len as usize];
    chain.read_at(&mut buf, a).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0xab),
        "{context}: pattern read back"
    );
}

fn assert_reads_zeros(chain: &Chain, context: &str) {
    let mut buf = vec![0xffu8; 1 << 20];
    let mut offset = 0;
    while offset < chain.size() {
        let n = (chain.size() - offset).min(buf.len() as u64) as usize;
        chain.read_at(&mut buf[..n], offset).unwrap();
        assert!(
            buf[..n].iter().all(|&b| b == 0),
            "{context}: not zeros at {offset}"
        );
        offset += n as u64;
    }
}

/// One matrix case: create with the library, check, info, qemu-io, check again.
fn check_created(s: &Scratch, name: &str, options: &CreateOptions) {
    let context = format!("{name} {options:?}");
    create(s.path(name), options).unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_clean(s, name, &context);
    let info = json(
        &tool(s, "qemu-img", &["info", "--output=json", name]),
        &context,
    );
    let size = options.size.unwrap();
    assert_eq!(info["virtual-size"], size, "{context}");
    assert_eq!(info["cluster-size"], options.cluster_size, "{context}");
    let data = &info["format-specific"]["data"];
    assert_eq!(data["compat"], options.compat.name(), "{context}");
    assert_eq!(data["refcount-bits"], options.refcount_bits, "{context}");
    if options.compat == Compat::V1_1 {
        assert_eq!(data["lazy-refcounts"], options.lazy_refcounts, "{context}");
        assert_eq!(data["extended-l2"], options.extended_l2, "{context}");
        assert_eq!(
            data["compression-type"],
            options.compression_type.name(),
            "{context}"
        );
    }
    let chain = s.open(name);
    assert_eq!(chain.size(), size);
    assert_reads_zeros(&chain, &context);
    drop(chain);
    qemu_io_round_trip(s, name, options.cluster_size, size, &context);
    assert_clean(s, name, &format!("{context} after qemu-io"));
    std::fs::remove_file(s.path(name)).unwrap();
}

/// Every valid combination of compat, refcount width, extended L2, lazy refcounts,
/// compression and preallocation for one cluster size.
fn matrix(cluster_size: u64, size: u64) {
    let s = Scratch::new();
    let mut cases = 0;
    for compat in [Compat::V0_10, Compat::V1_1] {
        for refcount_bits in [1, 16, 64] {
            for extended_l2 in [false, true] {
                for lazy_refcounts in [false, true] {
                    for compression_type in [CompressionType::Zlib, CompressionType::Zstd] {
                        for preallocation in [
                            Preallocation::Off,
                            Preallocation::Metadata,
                            Preallocation::Full,
                        ] {
                            let options = CreateOptions {
                                cluster_size,
                                compat,
                                refcount_bits,
                                extended_l2,
                                lazy_refcounts,
                                compression_type,
                                preallocation,
                                ..CreateOptions::qcow2(size)
                            };
                            if options.validate().is_err() {
                                continue;
                            }
                            check_created(&s, "m.qcow2", &options);
                            cases += 1;
                        }
                    }
                }
            }
        }
    }
    let expected = if cluster_size >= 16384 { 75 } else { 39 };
    assert_eq!(cases, expected, "valid combinations for {cluster_size}");
}

#[test]
fn every_option_combination_with_512_byte_clusters_is_clean_in_qemu() {
    matrix(512, 1 << 20);
}

#[test]
fn every_option_combination_with_4k_clusters_is_clean_in_qemu() {
    matrix(4096, 3 << 20);
}

#[test]
fn every_option_combination_with_64k_clusters_is_clean_in_qemu() {
    matrix(65536, 5 << 20);
}

#[test]
fn every_option_combination_with_2m_clusters_is_clean_in_qemu() {
    matrix(2 << 20, 5 << 20);
}

#[test]
fn larger_images_need_several_refcount_blocks_and_l2_tables() {
    let s = Scratch::new();
    for (cluster_size, refcount_bits, size, preallocation) in [
        (512, 64, 1 << 30, Preallocation::Off),
        (512, 1, 300 << 20, Preallocation::Off),
        (512, 64, 4 << 20, Preallocation::Metadata),
        (4096, 16, 64 << 20, Preallocation::Metadata),
        (65536, 1, 5 << 30, Preallocation::Metadata),
    ] {
        let options = CreateOptions {
            cluster_size,
            refcount_bits,
            preallocation,
            ..CreateOptions::qcow2(size)
        };
        create(s.path("big.qcow2"), &options).unwrap();
        assert_clean(&s, "big.qcow2", &format!("{options:?}"));
        let theirs = s.map("big.qcow2", "qcow2");
        let ours = qcow2_engine::ops::map(&s.open("big.qcow2"))
            .map(|e| e.unwrap())
            .collect::<Vec<_>>();
        assert_eq!(theirs.len(), ours.len(), "map of {options:?}");
    }
}

/// The bytes qemu-img writes for these option sets are the bytes we write.
#[test]
fn simple_images_are_byte_identical_to_qemu_img() {
    let s = Scratch::new();
    for (opts, size) in [
        ("", "1G"),
        ("compat=0.10", "1G"),
        ("cluster_size=512", "1M"),
        ("cluster_size=8k,refcount_bits=1", "100M"),
        ("cluster_size=2M,refcount_bits=64,extended_l2=on", "10G"),
        (
            "lazy_refcounts=on,compression_type=zstd,extended_l2=on",
            "3G",
        ),
        ("preallocation=metadata", "3M"),
        (
            "preallocation=metadata,extended_l2=on,cluster_size=16k",
            "64k",
        ),
        ("preallocation=full", "3M"),
    ] {
        let mut qemu_args = vec!["create", "-q", "-f", "qcow2"];
        let mut our_args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            qemu_args.extend(["-o", opts]);
            our_args.extend(["-o", opts]);
        }
        qemu_args.extend(["theirs.qcow2", size]);
        our_args.extend(["ours.qcow2", size]);
        assert!(tool(&s, "qemu-img", &qemu_args).status.success());
        let out = qimg(&s, &our_args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = std::fs::read(s.path("theirs.qcow2")).unwrap();
        let ours = std::fs::read(s.path("ours.qcow2")).unwrap();
        if opts.contains("preallocation=full") {
            // QEMU moves the refcount structures for full preallocation; the length and
            // the feature table still agree.
            assert_eq!(ours.len(), theirs.len(), "length for {opts}");
            assert_eq!(ours[104..512], theirs[104..512], "extensions for {opts}");
            continue;
        }
        assert!(
            ours == theirs,
            "-o {opts:?} {size}: bytes differ from qemu-img's"
        );
    }
}

#[test]
fn overlay_takes_the_backing_size_and_reads_the_backing_content() {
    let s = Scratch::new();
    s.create("base.qcow2", "", 3 << 20);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 7 0 100k".into(), "write -P 9 2M 64k".into()],
    );
    std::fs::create_dir(s.path("sub")).unwrap();
    for (name, extra) in [
        ("top.qcow2", vec![]),
        ("v2.qcow2", vec!["-o", "compat=0.10"]),
        (
            "ext.qcow2",
            vec!["-o", "extended_l2=on,preallocation=metadata"],
        ),
    ] {
        let mut args = vec!["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"];
        args.extend(extra.iter().copied());
        args.push(name);
        let out = qimg(&s, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with(&format!("Formatting '{name}', fmt=qcow2"))
                && stdout.contains("size=3145728")
                && stdout.contains("backing_file=base.qcow2"),
            "{stdout}"
        );
        assert_clean(&s, name, name);
        let info = json(
            &tool(&s, "qemu-img", &["info", "--output=json", name]),
            name,
        );
        assert_eq!(info["virtual-size"], 3 << 20);
        assert_eq!(info["backing-filename"], "base.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        let mut ours = vec![0u8; 3 << 20];
        s.open(name).read_at(&mut ours, 0).unwrap();
        assert!(ours == s.reference(name, "qcow2"), "{name}: content");
        assert!(
            ours == s.reference("base.qcow2", "qcow2"),
            "{name}: base content"
        );
    }
    // A relative backing name is opened relative to the new image's directory.
    let out = qimg(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/top.qcow2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(&s, "sub/top.qcow2", "sub/top");
    let mut ours = vec![0u8; 3 << 20];
    s.open("sub/top.qcow2").read_at(&mut ours, 0).unwrap();
    assert!(ours == s.reference("base.qcow2", "qcow2"));
    // A raw backing file, with an explicit larger size.
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    s.qemu_io("base.raw", "raw", &["write -P 3 4k 4k".into()]);
    let out = qimg(
        &s,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "r.qcow2", "2M",
        ],
    );
    assert!(out.status.success());
    assert_clean(&s, "r.qcow2", "r.qcow2");
    let mut ours = vec![0u8; 2 << 20];
    s.open("r.qcow2").read_at(&mut ours, 0).unwrap();
    assert!(ours == s.reference("r.qcow2", "qcow2"));
    // -u: the backing file is not opened; the size must be given.
    let out = qimg(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "u.qcow2",
            "1M",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = qcow2_engine::Image::open(s.path("u.qcow2")).unwrap();
    assert_eq!(image.backing_file().as_deref(), Some("gone.qcow2"));
    assert_eq!(image.backing_format().as_deref(), Some("qcow2"));
}

#[test]
fn external_data_files_are_created_and_used_by_qemu() {
    let s = Scratch::new();
    for (name, opts, raw) in [
        ("d.qcow2", "data_file=d.data", false),
        ("dr.qcow2", "data_file=dr.data,data_file_raw=on", true),
        (
            "dm.qcow2",
            "data_file=dm.data,data_file_raw=on,preallocation=metadata",
            true,
        ),
        (
            "df.qcow2",
            "data_file=df.data,preallocation=full,extended_l2=on",
            false,
        ),
    ] {
        let out = qimg(&s, &["create", "-q", "-f", "qcow2", "-o", opts, name, "2M"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data_name = opts.split(['=', ',']).nth(1).unwrap();
        assert_eq!(std::fs::metadata(s.path(data_name)).unwrap().len(), 2 << 20);
        assert_clean(&s, name, opts);
        let info = json(
            &tool(&s, "qemu-img", &["info", "--output=json", name]),
            opts,
        );
        let data = &info["format-specific"]["data"];
        assert_eq!(data["data-file"], data_name, "{opts}");
        assert_eq!(data["data-file-raw"], raw, "{opts}");
        assert_reads_zeros(&s.open(name), opts);
        qemu_io_round_trip(&s, name, 65536, 2 << 20, opts);
        assert_clean(&s, name, opts);
        if raw {
            // The data file is the guest disk itself.
            let bytes = std::fs::read(s.path(data_name)).unwrap();
            assert!(
                bytes[32768..32768 + 65536].iter().all(|&b| b == 0xab),
                "{opts}"
            );
        }
    }
}

#[test]
fn raw_images_are_sparse_or_preallocated() {
    let s = Scratch::new();
    for (prealloc, allocated) in [("off", false), ("falloc", true), ("full", true)] {
        let name = format!("{prealloc}.raw");
        let opt = format!("preallocation={prealloc}");
        let out = qimg(
            &s,
            &["create", "-q", "-f", "raw", "-o", &opt, &name, "1000k"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta = std::fs::metadata(s.path(&name)).unwrap();
        assert_eq!(meta.len(), 1000 << 10);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.blocks() * 512 >= 1000 << 10, allocated, "{prealloc}");
        let info = json(
            &tool(&s, "qemu-img", &["info", "--output=json", &name]),
            &name,
        );
        assert_eq!(info["format"], "raw");
        assert_eq!(info["virtual-size"], 1000 << 10);
        assert_reads_zeros(&s.open(&name), &name);
    }
    // Raw sizes are not rounded; qcow2 sizes are rounded up to 512 bytes.
    create(s.path("odd.raw"), &CreateOptions::raw(1000)).unwrap();
    assert_eq!(std::fs::metadata(s.path("odd.raw")).unwrap().len(), 1000);
    create(s.path("odd.qcow2"), &CreateOptions::qcow2(1000)).unwrap();
    assert_eq!(s.open("odd.qcow2").size(), 1024);
    // Size 0 is accepted, as qemu-img accepts it.
    create(s.path("zero.qcow2"), &CreateOptions::qcow2(0)).unwrap();
    assert_clean(&s, "zero.qcow2", "size 0");
}

#[test]
fn invalid_options_fail_with_one_line_and_leave_no_file() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &["-f", "qcow2", "-o", "cluster_size=3000", "e.qcow2", "1M"],
            "cluster size",
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=4M", "e.qcow2", "1M"],
            "cluster size",
        ),
        (
            &["-f", "qcow2", "-o", "refcount_bits=3", "e.qcow2", "1M"],
            "refcount width",
        ),
        (
            &["-f", "qcow2", "-o", "refcount_bits=128", "e.qcow2", "1M"],
            "refcount width",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=4k",
                "e.qcow2",
                "1M",
            ],
            "16k",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                "e.qcow2",
                "1M",
            ],
            "compat 1.1",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=1",
                "e.qcow2",
                "1M",
            ],
            "compat 1.1",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,compression_type=zstd",
                "e.qcow2",
                "1M",
            ],
            "compat 1.1",
        ),
        (
            &["-f", "qcow2", "-o", "compat=0.9", "e.qcow2", "1M"],
            "compat",
        ),
        (
            &["-f", "qcow2", "-o", "data_file_raw=on", "e.qcow2", "1M"],
            "data_file",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,data_file=e.data",
                "e.qcow2",
                "1M",
            ],
            "compat 1.1",
        ),
        (
            &["-f", "qcow2", "-o", "foo=1", "e.qcow2", "1M"],
            "Invalid parameter 'foo'",
        ),
        (
            &["-f", "qcow2", "-o", "preallocation=bogus", "e.qcow2", "1M"],
            "preallocation",
        ),
        (
            &["-f", "qcow2", "-o", "compression_type=lz4", "e.qcow2", "1M"],
            "lz4",
        ),
        (
            &["-f", "raw", "-o", "cluster_size=4k", "e.qcow2", "1M"],
            "cluster_size",
        ),
        (
            &["-f", "raw", "-o", "preallocation=metadata", "e.qcow2", "1M"],
            "metadata",
        ),
        (&["-f", "qcow2", "e.qcow2"], "size"),
        (&["-f", "qcow2", "e.qcow2", "1E"], "too large"),
        (
            &["-f", "qcow2", "-o", "cluster_size=512", "e.qcow2", "1T"],
            "too large",
        ),
        (
            &["-f", "qcow2", "-o", "cluster_size=2M", "e.qcow2", "8E"],
            "largest",
        ),
        (&["-f", "qcow2", "e.qcow2", "99999999999E"], "size"),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "e.qcow2",
            ],
            "missing.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "e.qcow2",
                "1M",
            ],
            "missing.qcow2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-u",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "e.qcow2",
            ],
            "size",
        ),
        (
            &["-f", "qcow2", "-b", "base.qcow2", "e.qcow2"],
            "backing format",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "e.qcow2",
            ],
            "extended_l2",
        ),
        (
            &[
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "data_file=x.data,data_file_raw=on",
                "e.qcow2",
            ],
            "data_file_raw",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["create"];
        full.extend_from_slice(args);
        let out = qimg(&s, &full);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("qimg: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} lacks {needle:?}"
        );
        assert!(!s.path("e.qcow2").exists(), "{args:?} left e.qcow2 behind");
        assert!(
            !s.path("e.data").exists() && !s.path("x.data").exists(),
            "{args:?}"
        );
        // qemu-img refuses the same command.
        let theirs = tool(&s, "qemu-img", &full);
        assert!(!theirs.status.success(), "qemu-img accepted {args:?}");
        let _ = std::fs::remove_file(s.path("e.qcow2"));
    }
}

#[test]
fn library_refuses_bad_options_before_touching_the_file() {
    let s = Scratch::new();
    let path = s.path("lib.qcow2");
    std::fs::write(&path, b"keep me").unwrap();
    let bad = CreateOptions {
        cluster_size: 1000,
        ..CreateOptions::qcow2(1 << 20)
    };
    let err = create(&path, &bad).unwrap_err();
    assert!(
        matches!(err.root(), qcow2_engine::Error::InvalidArgument(_)),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    let overlay = CreateOptions::overlay("nothere.qcow2", Format::Qcow2);
    assert!(create(s.path("o.qcow2"), &overlay).is_err());
    assert!(!s.path("o.qcow2").exists());
    // Memory storage.
    let mem = qcow2_engine::storage::MemStorage::new();
    qcow2_engine::create_on(&mem, &CreateOptions::qcow2(5 << 20)).unwrap();
    let image = qcow2_engine::Image::from_storage(
        Box::new(mem),
        "mem",
        &qcow2_engine::ImageOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(image.size(), 5 << 20);
}

fn assert_measure_matches(s: &Scratch, args: &[&str]) {
    let mut full = vec!["measure", "--output=json"];
    full.extend_from_slice(args);
    let theirs = json(&tool(s, "qemu-img", &full), &format!("qemu-img {full:?}"));
    let ours = json(&qimg(s, &full), &format!("qimg {full:?}"));
    assert_eq!(ours, theirs, "measure {args:?}");
}

#[test]
fn measure_of_a_size_matches_qemu_img() {
    let s = Scratch::new();
    for size in [
        "0", "1", "1000", "64k", "1M", "100M", "1G", "3G", "100G", "1T", "16T",
    ] {
        for opts in [
            "",
            "cluster_size=512",
            "cluster_size=4k,refcount_bits=1",
            "cluster_size=2M,refcount_bits=64",
            "extended_l2=on",
            "cluster_size=16k,extended_l2=on,refcount_bits=8",
            "compat=0.10",
            "backing_file=x.qcow2",
            "preallocation=metadata",
            "preallocation=falloc,cluster_size=8k,refcount_bits=2",
            "preallocation=full",
        ] {
            if size.ends_with('T') && opts.contains("cluster_size=512") {
                continue; // too large for 512-byte clusters: both refuse
            }
            if size == "16T" && opts.contains("cluster_size=4k") {
                continue;
            }
            let mut args = vec!["-O", "qcow2", "--size", size];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            assert_measure_matches(&s, &args);
        }
        assert_measure_matches(&s, &["--size", size]);
    }
}

#[test]
fn measure_of_images_matches_qemu_img() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 10 << 20);
    s.qemu_io(
        "a.qcow2",
        "qcow2",
        &[
            "write -P 1 0 100k".into(),
            "write -z 1M 200k".into(),
            "write -P 2 3000k 1k".into(),
            "write -P 0 5M 64k".into(),
            "write -c -P 3 8M 64k".into(),
        ],
    );
    s.create_overlay("b.qcow2", "a.qcow2", "qcow2", "", None);
    s.qemu_io(
        "b.qcow2",
        "qcow2",
        &["write -z 0 32k".into(), "write -P 5 6M 4k".into()],
    );
    s.create_overlay(
        "c.qcow2",
        "a.qcow2",
        "qcow2",
        "extended_l2=on",
        Some(12 << 20),
    );
    s.qemu_io(
        "c.qcow2",
        "qcow2",
        &["write -P 7 2M 2k".into(), "write -P 7 2100k 1k".into()],
    );
    s.create("v2.qcow2", "compat=0.10", 5 << 20);
    s.qemu_io("v2.qcow2", "qcow2", &["write -P 1 100k 10k".into()]);
    s.create("pm.qcow2", "preallocation=metadata", 3 << 20);
    s.qemu_io("pm.qcow2", "qcow2", &["write -P 1 100k 10k".into()]);
    s.qemu_img(&["create", "-q", "-f", "raw", "r.raw", "4M"]);
    s.qemu_io(
        "r.raw",
        "raw",
        &["write -P 9 1M 12k".into(), "write -P 9 3M 1".into()],
    );
    s.create("bm.qcow2", "", 100 << 20);
    s.qemu_img(&["bitmap", "--add", "bm.qcow2", "b1"]);
    s.qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "512",
        "bm.qcow2",
        "a-longer-bitmap-name",
    ]);
    for file in [
        "a.qcow2", "b.qcow2", "c.qcow2", "v2.qcow2", "pm.qcow2", "r.raw", "bm.qcow2",
    ] {
        for opts in [
            "",
            "cluster_size=512",
            "cluster_size=4k",
            "cluster_size=2M",
            "extended_l2=on",
            "compat=0.10",
            "backing_file=x",
            "preallocation=full",
            "cluster_size=1k,refcount_bits=1",
        ] {
            let mut args = vec!["-O", "qcow2", file];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            assert_measure_matches(&s, &args);
        }
        assert_measure_matches(&s, &[file]);
    }
    // Human output names the same numbers.
    let out = qimg(&s, &["measure", "-O", "qcow2", "bm.qcow2"]);
    let theirs = tool(&s, "qemu-img", &["measure", "-O", "qcow2", "bm.qcow2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
}

#[test]
fn measure_refuses_what_qemu_img_refuses() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    for args in [
        vec!["-O", "qcow2", "-o", "foo=1", "--size", "1M"],
        vec!["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1M"],
        vec![
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "--size",
            "1M",
        ],
        vec![
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1M",
        ],
        vec!["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
        vec!["-O", "qcow2", "--size", "1M", "a.qcow2"],
        vec!["-O", "qcow2"],
    ] {
        let mut full = vec!["measure"];
        full.extend(args.iter().copied());
        let ours = qimg(&s, &full);
        let theirs = tool(&s, "qemu-img", &full);
        assert!(!theirs.status.success(), "qemu-img accepted {args:?}");
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}
