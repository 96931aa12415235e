//! The read path against QEMU: images made by qemu-img/qemu-io at test time, every byte
//! `Chain::read_at` returns compared with `qemu-img convert -O raw`, and the runs of
//! `Chain::runs` compared with `qemu-img map` where QEMU reports data.
//!
//! Each test walks a slice of the matrix (cluster size, compat, refcount width, extended
//! L2, compression, external data files, chain depth, sizes, snapshots); the case label in
//! a failure says which cell broke.

mod common;

use common::{Rng, SOURCE, Scratch, assert_reads_match, random_ops, source_file, verify};
use qcow2_engine::{Chain, ChainOptions, Image, Mapping};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Makes [`SOURCE`] big enough for any write `random_ops` draws with `cluster`.
fn source_for(scratch: &Scratch, seed: u64, cluster: u64) -> u64 {
    let len = 3 * cluster;
    source_file(scratch, seed, len as usize);
    len
}

/// One image with a base under it, both with `options`, both written at random.
fn base_and_overlay_case(cluster: u64, options: &str, size: u64, seed: u64) {
    let label = format!("{options}, size {size}");
    let s = Scratch::new();
    let source_len = source_for(&s, seed, cluster);
    let mut rng = Rng::new(seed);
    s.create("base.qcow2", options, size);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, cluster, source_len, 0x10, 30),
    );
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, cluster, source_len, 0x80, 30),
    );
    verify(&s, "base.qcow2", "qcow2", true, &format!("{label}: base"));
    verify(&s, "top.qcow2", "qcow2", true, &format!("{label}: overlay"));
}

/// compat 0.10 (16-bit refcounts only) and compat 1.1 with refcount widths 1, 16 and 64, at
/// one cluster size; the virtual size is never a multiple of the cluster size.
fn cluster_size_cases(cluster: u64, clusters: u64) {
    let size = clusters * cluster + 3 * 512;
    let mut seed = cluster;
    for (compat, bits) in [("0.10", 16), ("1.1", 1), ("1.1", 16), ("1.1", 64)] {
        seed += 1;
        let options = format!("cluster_size={cluster},compat={compat},refcount_bits={bits}");
        base_and_overlay_case(cluster, &options, size, seed);
    }
}

#[test]
fn cluster_size_512_compat_and_refcount_widths() {
    // 512-byte clusters: 64 entries per L2 table, so 1 MiB spans 32 L2 tables.
    cluster_size_cases(512, 2048);
}

#[test]
fn cluster_size_4k_compat_and_refcount_widths() {
    cluster_size_cases(4 * K, 640);
}

#[test]
fn cluster_size_64k_compat_and_refcount_widths() {
    cluster_size_cases(64 * K, 40);
}

#[test]
fn cluster_size_2m_compat_and_refcount_widths() {
    cluster_size_cases(2 * M, 3);
}

/// Subcluster-sized random operations (writes, zero writes, discards) on `top`.
fn subcluster_ops(s: &Scratch, name: &str, rng: &mut Rng, size: u64, sub: u64, pattern: u8) {
    let source_len = 96 * sub;
    let mut ops = random_ops(rng, size, sub, source_len, pattern, 50);
    // A few whole-cluster operations as well, so fully allocated clusters are present.
    ops.extend(random_ops(
        rng,
        size,
        32 * sub,
        source_len,
        pattern ^ 0x40,
        6,
    ));
    s.qemu_io(name, "qcow2", &ops);
}

#[test]
fn extended_l2_subcluster_writes_zeroes_and_discards() {
    for (cluster, size) in [(64 * K, 4 * M + 3 * 512), (16 * K, 2 * M + 1024)] {
        let sub = cluster / 32;
        let options = format!("cluster_size={cluster},extended_l2=on");
        let label = format!("extended L2, {cluster}-byte clusters");
        let s = Scratch::new();
        source_file(&s, cluster, (3 * 32 * sub) as usize);
        let mut rng = Rng::new(cluster);
        s.create("one.qcow2", &options, size);
        subcluster_ops(&s, "one.qcow2", &mut rng, size, sub, 0x20);
        verify(&s, "one.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn extended_l2_on_backing_files() {
    let size = 3 * M + 512;
    let ext = "cluster_size=64k,extended_l2=on";
    let std4k = "cluster_size=4k";
    // (base options, overlay options): extended over extended, over standard, standard
    // over extended.
    for (i, (base, top)) in [
        (ext, ext),
        (std4k, ext),
        (ext, std4k),
        (ext, "cluster_size=32k,extended_l2=on"),
    ]
    .into_iter()
    .enumerate()
    {
        let label = format!("base [{base}] under overlay [{top}]");
        let s = Scratch::new();
        source_file(&s, i as u64, 3 * 64 * K as usize);
        let mut rng = Rng::new(100 + i as u64);
        s.create("base.qcow2", base, size);
        subcluster_ops(&s, "base.qcow2", &mut rng, size, 2 * K, 0x30);
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", top, None);
        subcluster_ops(&s, "top.qcow2", &mut rng, size, 2 * K, 0x90);
        verify(&s, "top.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn extended_l2_overlay_on_a_raw_base() {
    let size = 2 * M + 1000;
    let s = Scratch::new();
    source_file(&s, 7, 3 * 64 * K as usize);
    s.write_file("base.raw", &Rng::new(8).bytes(size as usize));
    s.create_overlay(
        "top.qcow2",
        "base.raw",
        "raw",
        "cluster_size=64k,extended_l2=on",
        None,
    );
    subcluster_ops(&s, "top.qcow2", &mut Rng::new(9), 2 * M, 2 * K, 0x44);
    verify(&s, "top.qcow2", "qcow2", true, "extended L2 over raw");
}

/// The number of compressed runs in the top image, and whether the compressed cluster
/// stored last reaches EOF (its descriptor's last sector cut by the end of the file, which
/// the reader must cope with).
fn compressed_runs(chain: &Chain) -> (usize, bool) {
    let image = chain.top().as_qcow2().expect("qcow2 top");
    let mut count = 0;
    let mut last_end = 0;
    for run in image.runs(0, image.size()) {
        if let Mapping::Compressed(d) = run.expect("runs").mapping {
            count += 1;
            last_end = last_end.max(d.host_offset + d.len);
        }
    }
    (count, count > 0 && last_end >= image.file_len())
}

#[test]
fn compressed_images_zlib_and_zstd() {
    let mut eof_cases = 0;
    for compression in ["zlib", "zstd"] {
        for (cluster, size) in [
            (512, M + 512),
            (4 * K, 2 * M + 1536),
            (64 * K, 3 * M),
            (2 * M, 6 * M),
        ] {
            let label = format!("{compression}, {cluster}-byte clusters");
            let s = Scratch::new();
            let source_len = source_for(&s, cluster + 1, cluster);
            let mut rng = Rng::new(cluster ^ 0x55);
            s.create("src.qcow2", &format!("cluster_size={cluster}"), size);
            // Mostly compressible patterns, some random data (stored uncompressed when it
            // does not shrink), some zeros.
            s.qemu_io(
                "src.qcow2",
                "qcow2",
                &random_ops(&mut rng, size, cluster, source_len, 0x60, 40),
            );
            let options = format!("cluster_size={cluster},compression_type={compression}");
            s.qemu_img(&[
                "convert",
                "-c",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-o",
                &options,
                "src.qcow2",
                "packed.qcow2",
            ]);
            let chain = s.open("packed.qcow2");
            let (count, at_eof) = compressed_runs(&chain);
            assert!(count > 0, "{label}: convert -c made no compressed cluster");
            eof_cases += usize::from(at_eof);
            verify(&s, "packed.qcow2", "qcow2", true, &label);

            // Compressed writes (QEMU allows them only into unallocated clusters) append
            // the cluster at EOF; the last two compress well and share the last cluster,
            // whose end is cut by EOF (first, random data that does not compress and so is
            // stored as a normal cluster).
            let last = (size / cluster - 1) * cluster;
            s.create("fresh.qcow2", &options, size);
            s.qemu_io(
                "fresh.qcow2",
                "qcow2",
                &[
                    format!("write -c -s {SOURCE} {last} {cluster}"),
                    format!("write -c -P 0x3c 0 {cluster}"),
                    format!("write -c -P 0x3d {cluster} {cluster}"),
                ],
            );
            let (count, at_eof) = compressed_runs(&s.open("fresh.qcow2"));
            assert!(count >= 2, "{label}: write -c made no compressed cluster");
            assert!(
                at_eof,
                "{label}: the last compressed write does not reach EOF"
            );
            verify(
                &s,
                "fresh.qcow2",
                "qcow2",
                true,
                &format!("{label}, write -c"),
            );

            // An overlay writing parts of compressed clusters.
            s.create_overlay("top.qcow2", "packed.qcow2", "qcow2", "", None);
            s.qemu_io(
                "top.qcow2",
                "qcow2",
                &random_ops(&mut rng, size, cluster, source_len, 0xa0, 15),
            );
            verify(&s, "top.qcow2", "qcow2", true, &format!("{label}, overlay"));
        }
    }
    assert!(
        eof_cases > 0,
        "no converted image had a compressed cluster at EOF"
    );
}

#[test]
fn external_data_file_with_and_without_data_file_raw() {
    for (cluster, raw) in [
        (64 * K, false),
        (64 * K, true),
        (4 * K, false),
        (4 * K, true),
    ] {
        let label = format!("external data file, {cluster}-byte clusters, data_file_raw={raw}");
        let size = 3 * M + 512;
        let s = Scratch::new();
        let source_len = source_for(&s, cluster, cluster);
        let raw = if raw { "on" } else { "off" };
        s.create(
            "img.qcow2",
            &format!("cluster_size={cluster},data_file=img.data,data_file_raw={raw}"),
            size,
        );
        s.qemu_io(
            "img.qcow2",
            "qcow2",
            &random_ops(&mut Rng::new(cluster), size, cluster, source_len, 0x70, 40),
        );
        let chain = s.open("img.qcow2");
        let image = chain.top().as_qcow2().unwrap();
        assert!(image.has_external_data_file(), "{label}");
        assert_eq!(
            image.data_file_name().as_deref(),
            Some("img.data"),
            "{label}"
        );
        assert_eq!(image.data_file_raw(), raw == "on", "{label}");
        verify(&s, "img.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn external_data_file_over_a_backing_file() {
    let size = 2 * M;
    let s = Scratch::new();
    let source_len = source_for(&s, 3, 64 * K);
    let mut rng = Rng::new(3);
    s.create("base.qcow2", "cluster_size=4k", size);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 4 * K, source_len, 0x11, 30),
    );
    s.create_overlay(
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "data_file=top.data",
        None,
    );
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 64 * K, source_len, 0x51, 20),
    );
    verify(&s, "top.qcow2", "qcow2", true, "data file over backing");
}

/// Options of the qcow2 layers of the chain tests, cycled through by depth.
const LAYER_OPTIONS: [&str; 5] = [
    "cluster_size=64k",
    "cluster_size=4k,refcount_bits=1",
    "cluster_size=512",
    "cluster_size=16k,extended_l2=on",
    "cluster_size=64k,compat=0.10",
];

/// A chain of `depth` layers (top first); the bottom is raw when `raw_base`. Every layer
/// writes its own patterns, zero writes and discards.
fn chain_case(depth: usize, raw_base: bool) {
    let size = 2 * M + 5 * 512;
    let label = format!(
        "depth {depth}, {} base",
        if raw_base { "raw" } else { "qcow2" }
    );
    let s = Scratch::new();
    let source_len = source_for(&s, depth as u64, 64 * K);
    let mut rng = Rng::new(1000 + depth as u64 + 100 * u64::from(raw_base));
    let mut below: Option<(String, &str)> = None;
    for layer in (0..depth).rev() {
        let pattern = (layer as u8 + 1) * 0x11;
        if layer == depth - 1 && raw_base {
            s.write_file("l0.raw", &[]);
            s.truncate("l0.raw", size);
            let ops = random_ops(&mut rng, size, 64 * K, source_len, pattern, 20);
            // Zero writes and discards on raw just punch holes; keep them anyway.
            s.qemu_io("l0.raw", "raw", &ops);
            below = Some(("l0.raw".into(), "raw"));
            continue;
        }
        let options = LAYER_OPTIONS[layer % LAYER_OPTIONS.len()];
        let name = format!("l{}.qcow2", depth - 1 - layer);
        match &below {
            None => s.create(&name, options, size),
            Some((b, f)) => s.create_overlay(&name, b, f, options, None),
        }
        let cluster = if options.contains("512") {
            4 * K
        } else {
            64 * K
        };
        let ops = random_ops(&mut rng, size, cluster, source_len, pattern, 20);
        s.qemu_io(&name, "qcow2", &ops);
        below = Some((name, "qcow2"));
    }
    let (top, format) = below.unwrap();
    let chain = s.open(&top);
    assert_eq!(chain.layers().len(), depth, "{label}: layers opened");
    verify(&s, &top, format, true, &label);
}

#[test]
fn chains_of_depth_1_to_8_with_a_raw_base() {
    for depth in 1..=8 {
        chain_case(depth, true);
    }
}

#[test]
fn qcow2_chains_of_depth_1_to_8() {
    for depth in 1..=8 {
        chain_case(depth, false);
    }
}

#[test]
fn backing_files_shorter_and_longer_than_the_overlay() {
    let s = Scratch::new();
    let source_len = source_for(&s, 5, 64 * K);
    let mut rng = Rng::new(5);
    // A raw base whose length is not even a multiple of 512.
    s.write_file("short.raw", &Rng::new(6).bytes(1_000_003));
    s.create_overlay(
        "over-raw.qcow2",
        "short.raw",
        "raw",
        "cluster_size=4k",
        Some(3 * M),
    );
    let ops = random_ops(&mut rng, 3 * M, 64 * K, source_len, 0x21, 25);
    s.qemu_io("over-raw.qcow2", "qcow2", &ops);
    verify(
        &s,
        "over-raw.qcow2",
        "qcow2",
        true,
        "3 MiB over a 1000003-byte raw",
    );

    // qcow2 layers growing upwards: 1 MiB, 2 MiB + 512, 3 MiB.
    s.create("small.qcow2", "cluster_size=64k", M);
    let ops = random_ops(&mut rng, M, 64 * K, source_len, 0x31, 15);
    s.qemu_io("small.qcow2", "qcow2", &ops);
    s.create_overlay(
        "mid.qcow2",
        "small.qcow2",
        "qcow2",
        "cluster_size=4k",
        Some(2 * M + 512),
    );
    let ops = random_ops(&mut rng, 2 * M + 512, 64 * K, source_len, 0x41, 15);
    s.qemu_io("mid.qcow2", "qcow2", &ops);
    s.create_overlay(
        "big.qcow2",
        "mid.qcow2",
        "qcow2",
        "cluster_size=64k",
        Some(3 * M),
    );
    // Mostly leave the top alone so the short layers show through.
    let ops = random_ops(&mut rng, 3 * M, 64 * K, source_len, 0x51, 4);
    s.qemu_io("big.qcow2", "qcow2", &ops);
    verify(
        &s,
        "big.qcow2",
        "qcow2",
        true,
        "1 MiB < 2 MiB + 512 < 3 MiB",
    );

    // A backing file longer than the overlay: only the overlay's size is visible.
    s.create("long.qcow2", "", 4 * M);
    s.qemu_io(
        "long.qcow2",
        "qcow2",
        &[format!("write -P 0x61 0 {}", 4 * M)],
    );
    s.create_overlay("shorter.qcow2", "long.qcow2", "qcow2", "", Some(M + 512));
    s.qemu_io("shorter.qcow2", "qcow2", &["write -P 0x62 4096 100".into()]);
    verify(
        &s,
        "shorter.qcow2",
        "qcow2",
        true,
        "overlay shorter than its base",
    );
}

#[test]
fn virtual_size_not_a_multiple_of_the_cluster_size() {
    for (options, size) in [
        ("cluster_size=64k", 100_000u64),
        ("cluster_size=2M", 2 * M + 512),
        ("cluster_size=16k,extended_l2=on", 16 * K * 3 + 1536),
    ] {
        let label = format!("[{options}] size {size}");
        let s = Scratch::new();
        source_file(&s, 9, 64 * K as usize);
        s.create("odd.qcow2", options, size);
        let size = s.open("odd.qcow2").size();
        assert_eq!(size % 512, 0, "{label}: qemu rounds sizes up to sectors");
        // Writes touching the very last bytes.
        s.qemu_io(
            "odd.qcow2",
            "qcow2",
            &[
                format!("write -s {SOURCE} {} 1000", size - 1000),
                format!("write -P 0x7e {} 1", size - 1),
                format!("write -z {} 300", size - 700),
                "write -P 0x11 0 513".into(),
            ],
        );
        verify(&s, "odd.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn zero_size_images() {
    let s = Scratch::new();
    s.create("empty.qcow2", "", 0);
    let chain = s.open("empty.qcow2");
    assert_eq!(chain.size(), 0);
    assert_eq!(s.reference("empty.qcow2", "qcow2").len(), 0);
    chain
        .read_at(&mut [], 0)
        .expect("empty read of an empty image");
    assert!(
        chain.read_at(&mut [0u8; 1], 0).is_err(),
        "read past the end"
    );
    assert_eq!(
        chain.runs(0, u64::MAX).count(),
        0,
        "an empty image has no runs"
    );
    verify(&s, "empty.qcow2", "qcow2", true, "empty qcow2");

    // An empty overlay on a non-empty base sees nothing of it.
    s.create("base.qcow2", "", M);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 65536".into()]);
    s.create_overlay("empty-top.qcow2", "base.qcow2", "qcow2", "", Some(0));
    let chain = s.open("empty-top.qcow2");
    assert_eq!(chain.layers().len(), 2);
    verify(&s, "empty-top.qcow2", "qcow2", true, "empty overlay");

    // An empty raw base under a non-empty overlay reads as zeros.
    s.write_file("empty.raw", &[]);
    s.create_overlay("over-empty.qcow2", "empty.raw", "raw", "", Some(M));
    s.qemu_io("over-empty.qcow2", "qcow2", &["write -P 2 4096 512".into()]);
    verify(
        &s,
        "over-empty.qcow2",
        "qcow2",
        true,
        "overlay on an empty raw base",
    );
}

#[test]
fn internal_snapshots_then_more_writes_read_the_latest_data() {
    for (i, options) in [
        "cluster_size=64k",
        "cluster_size=4k,compat=0.10",
        "cluster_size=16k,extended_l2=on",
    ]
    .into_iter()
    .enumerate()
    {
        let label = format!("snapshots [{options}]");
        let size = 2 * M + 512;
        let s = Scratch::new();
        let source_len = source_for(&s, 20 + i as u64, 64 * K);
        let mut rng = Rng::new(20 + i as u64);
        s.create("snap.qcow2", options, size);
        let mut pattern = 0x13;
        for snap in ["first", "second"] {
            let ops = random_ops(&mut rng, size, 64 * K, source_len, pattern, 20);
            s.qemu_io("snap.qcow2", "qcow2", &ops);
            s.qemu_img(&["snapshot", "-c", snap, "snap.qcow2"]);
            pattern += 0x20;
        }
        let ops = random_ops(&mut rng, size, 64 * K, source_len, pattern, 20);
        s.qemu_io("snap.qcow2", "qcow2", &ops);
        let chain = s.open("snap.qcow2");
        let names: Vec<String> = chain
            .top()
            .as_qcow2()
            .unwrap()
            .snapshots()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["first", "second"], "{label}");
        drop(chain);
        verify(&s, "snap.qcow2", "qcow2", true, &label);

        // Reverting to the first snapshot, then writing again.
        s.qemu_img(&["snapshot", "-a", "first", "snap.qcow2"]);
        let ops = random_ops(&mut rng, size, 4 * K, source_len, 0xe1, 10);
        s.qemu_io("snap.qcow2", "qcow2", &ops);
        verify(
            &s,
            "snap.qcow2",
            "qcow2",
            true,
            &format!("{label}, reverted"),
        );
    }
}

#[test]
fn internal_snapshots_in_an_overlay() {
    let size = M;
    let s = Scratch::new();
    let source_len = source_for(&s, 30, 64 * K);
    let mut rng = Rng::new(30);
    s.create("base.qcow2", "", size);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 64 * K, source_len, 3, 20),
    );
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "cluster_size=4k", None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 4 * K, source_len, 5, 20),
    );
    s.qemu_img(&["snapshot", "-c", "s", "top.qcow2"]);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 4 * K, source_len, 7, 20),
    );
    verify(&s, "top.qcow2", "qcow2", true, "snapshot in an overlay");
}

#[test]
fn l2_entry_with_only_the_copied_flag_reads_the_backing_file_like_qemu() {
    // Without an external data file, QEMU takes host offset 0 to mean "unallocated" even
    // with the COPIED flag set (only a data file makes offset 0 a real cluster), so the
    // backing file shows through.
    for options in ["cluster_size=64k", "cluster_size=64k,extended_l2=on"] {
        let label = format!("COPIED-only L2 entry [{options}]");
        let s = Scratch::new();
        s.create("base.qcow2", "", M);
        s.qemu_io("base.qcow2", "qcow2", &["write -P 0x22 0 128k".into()]);
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
        s.qemu_io("top.qcow2", "qcow2", &["write -P 0x33 0 128k".into()]);
        let entry = s.l2_entry_location("top.qcow2", 0).unwrap();
        s.write_u64("top.qcow2", entry, 1 << 63);
        if options.contains("extended_l2") {
            // No subcluster allocated either: a fully unallocated cluster.
            s.write_u64("top.qcow2", entry + 8, 0);
        }
        let expected = s.reference("top.qcow2", "qcow2");
        assert_eq!(expected[0], 0x22, "{label}: qemu reads the backing file");
        assert_eq!(expected[64 * 1024], 0x33, "{label}: qemu reads cluster 1");
        verify(&s, "top.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn preallocated_images() {
    for options in [
        "preallocation=metadata",
        "preallocation=metadata,compat=0.10",
        "preallocation=falloc,cluster_size=4k",
        "preallocation=full,extended_l2=on",
        "preallocation=metadata,data_file=img.data",
    ] {
        let label = format!("[{options}]");
        let size = 2 * M + 512;
        let s = Scratch::new();
        let source_len = source_for(&s, 40, 64 * K);
        s.create("img.qcow2", options, size);
        let ops = random_ops(&mut Rng::new(40), size, 64 * K, source_len, 0x17, 25);
        s.qemu_io("img.qcow2", "qcow2", &ops);
        verify(&s, "img.qcow2", "qcow2", true, &label);
    }
}

#[test]
fn dirty_and_corrupt_bits_do_not_stop_reading() {
    // QEMU opens such images read-only; so do we.
    use common::{HeaderField, read_header_field, write_header_field};
    for bit in [0u64, 1] {
        let label = format!("incompatible feature bit {bit} set");
        let size = M;
        let s = Scratch::new();
        let source_len = source_for(&s, 41, 64 * K);
        s.create("img.qcow2", "lazy_refcounts=on", size);
        let ops = random_ops(&mut Rng::new(41), size, 64 * K, source_len, 0x27, 20);
        s.qemu_io("img.qcow2", "qcow2", &ops);
        let path = s.path("img.qcow2");
        let bits = read_header_field(&path, HeaderField::IncompatibleFeatures);
        write_header_field(&path, HeaderField::IncompatibleFeatures, bits | 1 << bit);
        let chain = s.open("img.qcow2");
        let image = chain.top().as_qcow2().unwrap();
        assert_eq!((image.is_dirty(), image.is_corrupt()), (bit == 0, bit == 1));
        verify(&s, "img.qcow2", "qcow2", false, &label);
    }
}

#[test]
fn persistent_bitmaps_and_an_absolute_backing_name() {
    let size = 2 * M;
    let s = Scratch::new();
    let source_len = source_for(&s, 42, 64 * K);
    let mut rng = Rng::new(42);
    s.create("base.qcow2", "cluster_size=4k", size);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 4 * K, source_len, 3, 20),
    );
    let base = s.path("base.qcow2");
    s.create_overlay("top.qcow2", base.to_str().unwrap(), "qcow2", "", None);
    s.qemu_img(&["bitmap", "--add", "top.qcow2", "b0"]);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &random_ops(&mut rng, size, 64 * K, source_len, 9, 20),
    );
    let chain = s.open("top.qcow2");
    let top = chain.top().as_qcow2().unwrap();
    assert!(
        top.extensions().has_bitmaps(),
        "qemu-img bitmap --add made no extension"
    );
    assert_eq!(top.backing_file().as_deref(), base.to_str());
    verify(
        &s,
        "top.qcow2",
        "qcow2",
        true,
        "bitmaps, absolute backing name",
    );
}

#[test]
fn one_image_alone_reads_zeros_where_unallocated() {
    // Image::read_at and a chain opened with no_backing read the top image by itself;
    // QEMU does the same with `"backing": null`.
    let size = 2 * M + 512;
    let s = Scratch::new();
    let source_len = source_for(&s, 43, 64 * K);
    let mut rng = Rng::new(43);
    s.create("base.qcow2", "", size);
    s.qemu_io("base.qcow2", "qcow2", &[format!("write -P 0x5b 0 {size}")]);
    for options in ["cluster_size=4k", "cluster_size=64k,extended_l2=on"] {
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
        let ops = random_ops(&mut rng, size, 16 * K, source_len, 0x91, 30);
        s.qemu_io("top.qcow2", "qcow2", &ops);
        let alone = format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
            s.path("top.qcow2").display()
        );
        let expected = s.reference(&alone, "qcow2");
        assert!(expected.contains(&0), "[{options}]: no hole");
        let image = Image::open(s.path("top.qcow2")).unwrap();
        let mut got = vec![0xa5; size as usize];
        image.read_at(&mut got, 0).unwrap();
        assert!(
            got == expected,
            "[{options}]: Image::read_at differs from qemu"
        );
        let chain = Chain::open_with(
            s.path("top.qcow2"),
            &ChainOptions {
                no_backing: true,
                ..ChainOptions::default()
            },
        )
        .unwrap();
        assert_reads_match(&chain, &expected, &format!("[{options}] no_backing"));
        std::fs::remove_file(s.path("top.qcow2")).unwrap();
    }
}

#[test]
fn a_chain_deeper_than_the_128_layers_vm_managers_keep() {
    // Each layer writes one cluster of its own pattern; every 7th also zeroes the cluster
    // a deeper layer wrote, so the result depends on every layer's content.
    const DEPTH: usize = 160;
    let s = Scratch::new();
    s.create("l0.qcow2", "cluster_size=4k", 1 << 20);
    s.qemu_io("l0.qcow2", "qcow2", &["write -P 1 0 4k".into()]);
    for i in 1..DEPTH {
        let (below, name) = (format!("l{}.qcow2", i - 1), format!("l{i}.qcow2"));
        s.qemu_img(&[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            &below,
            "-F",
            "qcow2",
            &name,
            "1M",
        ]);
        let mut commands = vec![format!("write -P {} {} 4k", i % 250 + 1, i * 4096)];
        if i % 7 == 0 {
            commands.push(format!("write -z {} 4k", (i - 3) * 4096));
        }
        s.qemu_io(&name, "qcow2", &commands);
    }
    let top = format!("l{}.qcow2", DEPTH - 1);
    let chain = s.open(&top);
    assert_eq!(chain.layers().len(), DEPTH);
    let expected = s.reference(&top, "qcow2");
    assert_reads_match(&chain, &expected, "160-layer chain");
    // The run for cluster i is decided by layer DEPTH-1-i (top first), unless zeroed above.
    let run = chain.resolve(5 * 4096, 4096).unwrap();
    assert_eq!(run.depth, DEPTH - 1 - 5);
}

/// Version 2 images carry header extensions too: the backing format of a compat=0.10
/// overlay is read (QEMU reads and writes it), and the chain opens the backing file with it.
#[test]
fn a_version_2_overlay_keeps_its_backing_format() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "raw", "base.img", "1M"]);
    s.create_overlay("top.qcow2", "base.img", "raw", "compat=0.10", None);
    let image = Image::open(s.path("top.qcow2")).unwrap();
    assert_eq!(image.header().version, 2);
    assert_eq!(image.backing_format().as_deref(), Some("raw"));
    let chain = s.open("top.qcow2");
    assert_eq!(
        chain.top().backing(),
        Some(("base.img".to_owned(), Some("raw".to_owned())))
    );
    assert!(chain.warnings().is_empty(), "{:?}", chain.warnings());
}
