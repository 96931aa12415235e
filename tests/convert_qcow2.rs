//! Converting to qcow2 against QEMU: sources made with qemu-img/qemu-io, converted with
//! the library, then judged by qemu-img: `check` clean, `compare` identical to the source,
//! `info` showing the options asked for, `map` showing what is allocated, compressed or left
//! to the backing file.

mod common;

use common::{MapEntry, Scratch};
use qcow2_engine::format::CompressionType;
use qcow2_engine::ops::{self, ConvertOptions};
use qcow2_engine::{Chain, Compat, CreateOptions, Error, Format};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// base (6 MiB, shorter than the rest) <- mid (8 MiB) <- top (8 MiB), with data in every
/// layer, zero clusters, discards, a compressed cluster, unaligned writes, a zero-filled
/// data cluster, and a range past the base's end.
fn build_chain(s: &Scratch) {
    s.create("base.qcow2", "", 6 * MIB);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x12 2M 192k".into(),
            "write -c -P 0x13 3M 64k".into(),
            "write -P 0 4M 64k".into(),
            "write -P 0x14 5M 1M".into(),
        ],
    );
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "", Some(8 * MIB));
    s.qemu_io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x21 256k 128k".into(),
            "write -c -P 0x22 1M 64k".into(),
            "write -z 2M 64k".into(),
            "discard 5M 128k".into(),
            "write -P 0x23 6M 300k".into(),
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "", None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x31 512k 4k".into(),
            "write -P 0x32 1000k 100k".into(),
            "write -z 640k 64k".into(),
            "discard 768k 64k".into(),
            "write -z 5248k 64k".into(),
            "write -P 0x33 7M 12k".into(),
        ],
    );
}

/// Converts `src` to `dst` with the library.
fn convert(s: &Scratch, src: &str, dst: &str, create: &CreateOptions, options: &ConvertOptions) {
    let chain = s.open(src);
    ops::convert(&chain, s.path(dst), create, options, &mut |_, _| true)
        .unwrap_or_else(|e| panic!("converting {src} to {dst}: {e}"));
}

fn assert_clean(s: &Scratch, name: &str) {
    let out = s.output("qemu-img", &["check", name]);
    assert!(
        out.status.success(),
        "qemu-img check {name} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_identical(s: &Scratch, a: &str, b: &str) {
    let out = s.output("qemu-img", &["compare", a, b]);
    assert!(
        out.status.success(),
        "qemu-img compare {a} {b} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn info(s: &Scratch, name: &str) -> Value {
    let json = s.qemu_img(&["info", "--output=json", name]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("bad info JSON ({e}):\n{json}"))
}

/// The map of `name` alone (its own clusters are depth 0; with a backing file, deeper
/// entries come from it).
fn own_map(s: &Scratch, name: &str) -> Vec<MapEntry> {
    s.map(name, "qcow2")
}

/// Create options from qemu-img's `-o` text (a few keys), as qimg parses them.
fn qcow2_options(text: &str) -> CreateOptions {
    let mut o = CreateOptions::default();
    for kv in text.split(',').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap();
        match k {
            "cluster_size" => {
                o.cluster_size = match v {
                    "512" => 512,
                    "2M" => 2 * MIB,
                    "4k" => 4096,
                    other => other.parse().unwrap(),
                }
            }
            "compat" => o.compat = Compat::from_name(v).unwrap(),
            "extended_l2" => o.extended_l2 = v == "on",
            "refcount_bits" => o.refcount_bits = v.parse().unwrap(),
            "lazy_refcounts" => o.lazy_refcounts = v == "on",
            "compression_type" => {
                o.compression_type = match v {
                    "zstd" => CompressionType::Zstd,
                    _ => CompressionType::Zlib,
                }
            }
            other => panic!("test helper does not know {other}"),
        }
    }
    o
}

/// Every data extent of the converted image is compressed (the chain's data compresses).
fn assert_all_data_compressed(s: &Scratch, name: &str) {
    let map = own_map(s, name);
    assert!(map.iter().any(|e| e.data), "{name}: no data at all");
    for e in &map {
        if e.data {
            assert!(
                e.compressed,
                "{name}: data at {:#x} not compressed",
                e.start
            );
        }
    }
}

#[test]
fn converted_chains_check_clean_and_compare_identical_for_every_option() {
    let s = Scratch::new();
    build_chain(&s);
    let cases: &[(&str, bool)] = &[
        ("", false),
        ("cluster_size=512", false),
        ("cluster_size=2M", false),
        ("compat=0.10", false),
        ("extended_l2=on", false),
        ("refcount_bits=1", false),
        ("lazy_refcounts=on", false),
        ("", true),
        ("compression_type=zstd", true),
        ("cluster_size=512", true),
        ("cluster_size=2M,compression_type=zstd", true),
        ("compat=0.10", true),
        ("extended_l2=on", true),
        ("refcount_bits=1", true),
    ];
    for (i, &(text, compress)) in cases.iter().enumerate() {
        let dst = format!("out{i}.qcow2");
        let create = qcow2_options(text);
        let options = ConvertOptions {
            compress,
            ..ConvertOptions::default()
        };
        convert(&s, "top.qcow2", &dst, &create, &options);
        assert_clean(&s, &dst);
        assert_identical(&s, "top.qcow2", &dst);
        let info = info(&s, &dst);
        let label = format!("[{text}] compress={compress}");
        assert_eq!(info["virtual-size"], 8 * MIB, "{label}");
        assert_eq!(info["cluster-size"], create.cluster_size, "{label}");
        assert!(info.get("backing-filename").is_none(), "{label}");
        let data = &info["format-specific"]["data"];
        assert_eq!(data["compat"], create.compat.name(), "{label}");
        if create.compat == Compat::V1_1 {
            assert_eq!(data["refcount-bits"], create.refcount_bits, "{label}");
            assert_eq!(data["extended-l2"], create.extended_l2, "{label}");
            assert_eq!(data["lazy-refcounts"], create.lazy_refcounts, "{label}");
            assert_eq!(
                data["compression-type"],
                create.compression_type.name(),
                "{label}"
            );
        }
        if compress {
            assert_all_data_compressed(&s, &dst);
        } else {
            assert!(own_map(&s, &dst).iter().all(|e| !e.compressed), "{label}");
        }
    }
}

#[test]
fn zero_ranges_stay_unallocated_and_sparse_zero_disables_that() {
    let s = Scratch::new();
    build_chain(&s);
    let create = CreateOptions::default();
    convert(
        &s,
        "top.qcow2",
        "sparse.qcow2",
        &create,
        &ConvertOptions::default(),
    );
    let full = ConvertOptions {
        min_sparse: 0,
        ..ConvertOptions::default()
    };
    convert(&s, "top.qcow2", "full.qcow2", &create, &full);
    for name in ["sparse.qcow2", "full.qcow2"] {
        assert_clean(&s, name);
        assert_identical(&s, "top.qcow2", name);
    }
    // Default: exactly the 64 KiB clusters holding a non-zero byte are allocated.
    let reference = s.reference("top.qcow2", "qcow2");
    let nonzero: Vec<bool> = reference
        .chunks(65536)
        .map(|c| c.iter().any(|&b| b != 0))
        .collect();
    let map = own_map(&s, "sparse.qcow2");
    for (i, &data) in nonzero.iter().enumerate() {
        let at = i as u64 * 65536;
        let e = map
            .iter()
            .find(|e| e.start <= at && at < e.start + e.length)
            .unwrap();
        assert_eq!(e.data, data, "cluster {i}: {e:?}");
        assert!(
            !e.zero || !e.present,
            "no zero clusters without a backing file: {e:?}"
        );
    }
    // The base's zero-filled data cluster (4M) was read and not written.
    assert!(!nonzero[64]);
    // -S 0: every cluster is allocated as data.
    let map = own_map(&s, "full.qcow2");
    assert!(
        map.iter().all(|e| e.data && e.depth == 0),
        "-S 0 left something unallocated: {map:?}"
    );
    // -S larger than a cluster: a 128 KiB block with data in one half is written whole.
    let s2 = Scratch::new();
    s2.create("a.qcow2", "", 2 * MIB);
    s2.qemu_io("a.qcow2", "qcow2", &["write -P 7 64k 4k".into()]);
    let big = ConvertOptions {
        min_sparse: 128 << 10,
        ..ConvertOptions::default()
    };
    convert(&s2, "a.qcow2", "b.qcow2", &create, &big);
    assert_identical(&s2, "a.qcow2", "b.qcow2");
    let map = own_map(&s2, "b.qcow2");
    assert!(
        map[0].data && map[0].start == 0 && map[0].length == 128 << 10,
        "{map:?}"
    );
    assert!(map[1..].iter().all(|e| !e.data), "{map:?}");
}

/// Checks that `out` over `backing` reads as `src` and that `out` allocates exactly the
/// clusters (of `cluster` bytes) where `src` differs from `backing`: as zero clusters where
/// `src` reads zeros (`zero_flags`), as data elsewhere.
fn assert_only_differences(
    s: &Scratch,
    src: &str,
    backing: &str,
    out: &str,
    cluster: u64,
    zero_flags: bool,
) {
    assert_clean(s, out);
    assert_identical(s, src, out);
    let want = s.reference(src, "qcow2");
    let mut base = s.reference(backing, "qcow2");
    base.resize(want.len(), 0);
    let map = own_map(s, out);
    let mut differing = 0;
    for (i, (w, b)) in want
        .chunks(cluster as usize)
        .zip(base.chunks(cluster as usize))
        .enumerate()
    {
        let at = i as u64 * cluster;
        let e = map
            .iter()
            .find(|e| e.start <= at && at < e.start + e.length)
            .unwrap();
        let own = e.depth == 0 && e.present;
        if w == b {
            assert!(
                !own,
                "{out}: cluster {at:#x} equals the backing file's but is allocated: {e:?}"
            );
            continue;
        }
        differing += 1;
        assert!(
            own,
            "{out}: cluster {at:#x} differs but is not allocated: {e:?}"
        );
        if w.iter().all(|&x| x == 0) && zero_flags {
            assert!(
                e.zero && !e.data,
                "{out}: cluster {at:#x} should be a zero cluster: {e:?}"
            );
        } else {
            assert!(e.data, "{out}: cluster {at:#x} should hold data: {e:?}");
        }
    }
    assert!(differing > 0, "the test needs differences");
}

fn overlay_options(backing: &str, text: &str) -> CreateOptions {
    CreateOptions {
        backing_file: Some(backing.into()),
        backing_format: Some(Format::Qcow2),
        ..qcow2_options(text)
    }
}

#[test]
fn with_a_backing_file_only_differing_clusters_are_written() {
    let s = Scratch::new();
    build_chain(&s);
    // Over the shorter base (6 MiB of an 8 MiB source): everything past it differs only
    // where the source has data.
    let create = overlay_options("base.qcow2", "");
    convert(
        &s,
        "top.qcow2",
        "over-base.qcow2",
        &create,
        &ConvertOptions::default(),
    );
    let info = info(&s, "over-base.qcow2");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 8 * MIB);
    assert_only_differences(
        &s,
        "top.qcow2",
        "base.qcow2",
        "over-base.qcow2",
        65536,
        true,
    );
    // Over mid (the source's own backing file): only what top changed.
    let create = overlay_options("mid.qcow2", "");
    convert(
        &s,
        "top.qcow2",
        "over-mid.qcow2",
        &create,
        &ConvertOptions::default(),
    );
    assert_only_differences(&s, "top.qcow2", "mid.qcow2", "over-mid.qcow2", 65536, true);
    // Other cluster sizes, compressed, version 2 (zeros written as data).
    for (i, (text, compress)) in [
        ("cluster_size=512", false),
        ("cluster_size=2M", false),
        ("", true),
        ("compat=0.10", false),
        ("extended_l2=on", false),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("b{i}.qcow2");
        let create = overlay_options("base.qcow2", text);
        let options = ConvertOptions {
            compress,
            ..ConvertOptions::default()
        };
        convert(&s, "top.qcow2", &name, &create, &options);
        let v3 = create.compat == Compat::V1_1;
        assert_only_differences(
            &s,
            "top.qcow2",
            "base.qcow2",
            &name,
            create.cluster_size,
            v3,
        );
        if compress {
            let map = own_map(&s, &name);
            assert!(
                map.iter()
                    .filter(|e| e.depth == 0 && e.data)
                    .all(|e| e.compressed)
            );
        }
    }
}

#[test]
fn a_source_equal_to_its_backing_file_gives_an_empty_overlay() {
    let s = Scratch::new();
    build_chain(&s);
    let create = overlay_options("top.qcow2", "");
    convert(
        &s,
        "top.qcow2",
        "same.qcow2",
        &create,
        &ConvertOptions::default(),
    );
    assert_clean(&s, "same.qcow2");
    assert_identical(&s, "top.qcow2", "same.qcow2");
    let map = own_map(&s, "same.qcow2");
    assert!(map.iter().all(|e| e.depth > 0 || !e.present), "{map:?}");
}

#[test]
fn raw_sources_convert_with_their_holes_left_out() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "disk.raw", "3M"]);
    s.qemu_io(
        "disk.raw",
        "raw",
        &[
            "write -P 0x41 0 100k".into(),
            "write -P 0 1M 64k".into(),
            "write -P 0x42 2M 4k".into(),
        ],
    );
    for (i, compress) in [false, true].into_iter().enumerate() {
        let dst = format!("disk{i}.qcow2");
        let options = ConvertOptions {
            compress,
            ..ConvertOptions::default()
        };
        convert(&s, "disk.raw", &dst, &CreateOptions::default(), &options);
        assert_clean(&s, &dst);
        assert_identical(&s, "disk.raw", &dst);
        let allocated: u64 = own_map(&s, &dst)
            .iter()
            .filter(|e| e.data)
            .map(|e| e.length)
            .sum();
        // 100k of data spans two clusters, the 4k write one; the zeros at 1M are skipped.
        assert_eq!(allocated, 3 * 65536, "{dst}");
    }
}

#[test]
fn an_unaligned_virtual_size_keeps_its_last_partial_cluster() {
    let s = Scratch::new();
    let size = 5 * MIB + 512;
    s.create("odd.qcow2", "cluster_size=4096", size);
    s.qemu_io(
        "odd.qcow2",
        "qcow2",
        &[
            "write -P 0x51 0 10k".into(),
            format!("write -P 0x52 {} 512", size - 512),
        ],
    );
    for (i, (text, compress)) in [("", false), ("", true), ("cluster_size=2M", true)]
        .into_iter()
        .enumerate()
    {
        let dst = format!("odd{i}.qcow2");
        let options = ConvertOptions {
            compress,
            ..ConvertOptions::default()
        };
        convert(&s, "odd.qcow2", &dst, &qcow2_options(text), &options);
        assert_clean(&s, &dst);
        assert_identical(&s, "odd.qcow2", &dst);
        assert_eq!(info(&s, &dst)["virtual-size"], size);
    }
}

#[test]
fn subclusters_and_small_source_clusters_convert_exactly() {
    let s = Scratch::new();
    s.create("ext.qcow2", "extended_l2=on,cluster_size=64k", 4 * MIB);
    s.qemu_io(
        "ext.qcow2",
        "qcow2",
        &[
            "write -P 0x61 2k 3k".into(),
            "write -P 0x62 100k 8k".into(),
            "write -z 1M 256k".into(),
            "write -P 0x63 1056k 2k".into(),
        ],
    );
    s.create("small.qcow2", "cluster_size=512", 4 * MIB);
    s.qemu_io(
        "small.qcow2",
        "qcow2",
        &[
            "write -P 0x64 1536 1k".into(),
            "write -c -P 0x65 64k 512".into(),
            "write -P 0x66 3M 70k".into(),
        ],
    );
    for src in ["ext.qcow2", "small.qcow2"] {
        for (i, text) in ["", "cluster_size=512", "extended_l2=on"]
            .into_iter()
            .enumerate()
        {
            let dst = format!("{src}.{i}.qcow2");
            convert(
                &s,
                src,
                &dst,
                &qcow2_options(text),
                &ConvertOptions::default(),
            );
            assert_clean(&s, &dst);
            assert_identical(&s, src, &dst);
        }
    }
}

#[test]
fn cancelling_stops_with_cancelled() {
    let s = Scratch::new();
    build_chain(&s);
    let chain = s.open("top.qcow2");
    let options = ConvertOptions {
        chunk_size: 65536,
        ..ConvertOptions::default()
    };
    let mut calls = 0;
    let err = ops::convert(
        &chain,
        s.path("c.qcow2"),
        &CreateOptions::default(),
        &options,
        &mut |done, total| {
            assert!(done <= total);
            calls += 1;
            calls < 3
        },
    )
    .unwrap_err();
    assert!(matches!(err.root(), Error::Cancelled), "{err}");
}

#[test]
fn refusals_name_the_problem() {
    let s = Scratch::new();
    build_chain(&s);
    let chain: Chain = s.open("top.qcow2");
    let dst = s.path("x.qcow2");
    let compress = ConvertOptions {
        compress: true,
        ..ConvertOptions::default()
    };
    // Compression needs qcow2 output and no external data file.
    let raw = CreateOptions {
        format: Format::Raw,
        ..CreateOptions::default()
    };
    let err = ops::convert(&chain, &dst, &raw, &compress, &mut |_, _| true).unwrap_err();
    assert!(matches!(err.root(), Error::Unsupported(_)), "{err}");
    let data_file = CreateOptions {
        data_file: Some("x.data".into()),
        ..CreateOptions::default()
    };
    let err = ops::convert(&chain, &dst, &data_file, &compress, &mut |_, _| true).unwrap_err();
    assert!(matches!(err.root(), Error::Unsupported(_)), "{err}");
    assert!(!dst.exists());
    // Converting onto a file of the source chain would destroy it.
    let err = ops::convert(
        &chain,
        s.path("mid.qcow2"),
        &CreateOptions::default(),
        &ConvertOptions::default(),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(
        err.report()
            .to_string()
            .contains("destination is the source"),
        "{err}"
    );
    let err = ops::convert(
        &chain,
        s.path("base.qcow2"),
        &raw,
        &ConvertOptions::default(),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(
        err.report()
            .to_string()
            .contains("destination is the source"),
        "{err}"
    );
    assert_clean(&s, "mid.qcow2");
    assert_clean(&s, "base.qcow2");
    // A sparse size that is not a multiple of 512.
    let odd = ConvertOptions {
        min_sparse: 1000,
        ..ConvertOptions::default()
    };
    let err = ops::convert(
        &chain,
        &dst,
        &CreateOptions::default(),
        &odd,
        &mut |_, _| true,
    )
    .unwrap_err();
    assert!(matches!(err.root(), Error::InvalidArgument(_)), "{err}");
}

#[test]
fn an_external_data_file_receives_the_data() {
    let s = Scratch::new();
    build_chain(&s);
    let create = CreateOptions {
        data_file: Some("out.data".into()),
        ..CreateOptions::default()
    };
    convert(
        &s,
        "top.qcow2",
        "out.qcow2",
        &create,
        &ConvertOptions::default(),
    );
    assert_clean(&s, "out.qcow2");
    assert_identical(&s, "top.qcow2", "out.qcow2");
    let data = std::fs::read(s.path("out.data")).unwrap();
    assert_eq!(data[512 << 10], 0x31);
}
