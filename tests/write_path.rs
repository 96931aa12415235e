//! The write path against QEMU: we write, qemu-img checks and reads back.

mod common;

use common::{Rng, Scratch};
use qcow2_engine::{Chain, ChainOptions};

fn open_rw(s: &Scratch, name: &str) -> Chain {
    Chain::open_with(
        s.path(name),
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {name} for writing: {e}"))
}

/// `qemu-img check` exits 0: no corruption and no leak.
fn assert_clean(s: &Scratch, name: &str, label: &str) {
    let out = s.output("qemu-img", &["check", name]);
    assert!(
        out.status.success(),
        "{label}: qemu-img check {name} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A model disk: what the guest should read.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    fn zero(&mut self, offset: u64, len: u64) {
        self.0[offset as usize..(offset + len) as usize].fill(0);
    }
}

fn assert_model(s: &Scratch, name: &str, model: &Model, label: &str) {
    let got = s.reference(name, "qcow2");
    assert_eq!(got.len(), model.0.len(), "{label}: size");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != model.0[i]) {
        panic!(
            "{label}: qemu reads {:#x} at {i:#x}, the model {:#x}",
            got[i], model.0[i]
        );
    }
}

fn random_writes(options: &str, size: u64, with_backing: bool, seed: u64) {
    let label = format!("random writes [{options}] backing={with_backing}");
    let s = Scratch::new();
    let mut model = Model(vec![0; size as usize]);
    let top = if with_backing {
        s.create("base.qcow2", options, size);
        s.qemu_io(
            "base.qcow2",
            "qcow2",
            &[
                "write -P 0x11 0 300k".into(),
                format!("write -P 0x12 {} 200k", size / 2),
            ],
        );
        model.0[..300 << 10].fill(0x11);
        model.0[(size / 2) as usize..(size / 2 + (200 << 10)) as usize].fill(0x12);
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
        "top.qcow2"
    } else {
        s.create("top.qcow2", options, size);
        "top.qcow2"
    };
    let mut rng = Rng::new(seed);
    {
        let chain = open_rw(&s, top);
        for i in 0..60 {
            let len = 1 + rng.below(150_000);
            let offset = rng.below(size - len);
            let kind = rng.below(10);
            if kind < 7 {
                let data = rng.bytes(len as usize);
                chain.write_at(&data, offset).unwrap();
                model.write(offset, &data);
            } else if kind < 9 {
                let unmap = kind == 8;
                chain.write_zeroes(offset, len, unmap).unwrap();
                model.zero(offset, len);
            } else {
                chain.flush().unwrap();
            }
            if i % 20 == 19 {
                // Read back through the library while changes are still in memory.
                let mut buf = vec![0u8; len as usize];
                chain.read_at(&mut buf, offset).unwrap();
                assert_eq!(
                    buf,
                    model.0[offset as usize..(offset + len) as usize],
                    "{label}"
                );
            }
        }
        chain.close().unwrap();
    }
    assert_clean(&s, top, &label);
    assert_model(&s, top, &model, &label);
}

#[test]
fn random_writes_and_zeroes_match_the_model_and_pass_qemu_check() {
    for (i, options) in [
        "cluster_size=64k",
        "cluster_size=4k",
        "cluster_size=512",
        "cluster_size=64k,refcount_bits=1",
        "cluster_size=4k,refcount_bits=64",
        "cluster_size=64k,compat=0.10",
        "cluster_size=64k,extended_l2=on",
        "cluster_size=2M",
    ]
    .iter()
    .enumerate()
    {
        for backing in [false, true] {
            random_writes(options, 6 << 20, backing, 1 + i as u64);
        }
    }
}

#[test]
fn qemu_reads_what_we_wrote_and_we_read_what_qemu_wrote() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=64k", 4 << 20);
    {
        let chain = open_rw(&s, "a.qcow2");
        chain.write_at(&[0x5a; 100_000], 12_345).unwrap();
        chain.close().unwrap();
    }
    s.qemu_io(
        "a.qcow2",
        "qcow2",
        &[
            "read -P 0x5a 12345 100000".into(),
            "write -P 0x77 1M 70k".into(),
        ],
    );
    {
        let chain = open_rw(&s, "a.qcow2");
        let mut buf = vec![0u8; 70 << 10];
        chain.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
        chain.write_at(&[0x33; 5000], (1 << 20) + 100).unwrap();
        chain.close().unwrap();
    }
    s.qemu_io(
        "a.qcow2",
        "qcow2",
        &[
            "read -P 0x77 1M 100".into(),
            "read -P 0x33 1048676 5000".into(),
        ],
    );
    assert_clean(&s, "a.qcow2", "interleaved");
}

#[test]
fn writes_into_an_image_with_a_snapshot_copy_on_write() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=4k", 1 << 20);
    s.qemu_io("a.qcow2", "qcow2", &["write -P 0x41 0 64k".into()]);
    s.qemu_img(&["snapshot", "-c", "snap", "a.qcow2"]);
    {
        let chain = open_rw(&s, "a.qcow2");
        chain.write_at(&[0x42; 6000], 1000).unwrap();
        chain.close().unwrap();
    }
    assert_clean(&s, "a.qcow2", "after COW");
    s.qemu_io(
        "a.qcow2",
        "qcow2",
        &[
            "read -P 0x41 0 1000".into(),
            "read -P 0x42 1000 6000".into(),
            "read -P 0x41 7000 58536".into(),
        ],
    );
    s.qemu_img(&["snapshot", "-a", "snap", "a.qcow2"]);
    s.qemu_io("a.qcow2", "qcow2", &["read -P 0x41 0 64k".into()]);
    assert_clean(&s, "a.qcow2", "after revert");
}

#[test]
fn growing_past_the_refcount_table_moves_it_and_stays_clean() {
    // 512-byte clusters with 64-bit refcounts: one block covers 32 KiB, the first table
    // only a few MiB, so 24 MiB of writes moves the table several times.
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=512,refcount_bits=64", 32 << 20);
    let mut model = Model(vec![0; 32 << 20]);
    {
        let chain = open_rw(&s, "a.qcow2");
        for i in 0..24u64 {
            let data = vec![(i + 1) as u8; 1 << 20];
            chain.write_at(&data, i << 20).unwrap();
            model.write(i << 20, &data);
        }
        chain.close().unwrap();
    }
    assert_clean(&s, "a.qcow2", "table growth");
    assert_model(&s, "a.qcow2", &model, "table growth");
}

/// Discard leaves the same allocation as QEMU's: a version 3 image without a backing file
/// keeps discarded clusters it had allocated as zero clusters ("present" in the map),
/// leaves clusters it never allocated alone, and a version 2 image unallocates them.
#[test]
fn discard_without_a_backing_file_leaves_qemus_allocation() {
    for options in [
        "cluster_size=64k",
        "cluster_size=64k,compat=0.10",
        "cluster_size=64k,extended_l2=on",
    ] {
        let s = Scratch::new();
        s.create("ours.qcow2", options, 1 << 20);
        let setup = [
            "write -P 1 0 128k".to_string(),
            "write -z 256k 64k".to_string(),
        ];
        s.qemu_io("ours.qcow2", "qcow2", &setup);
        std::fs::copy(s.path("ours.qcow2"), s.path("theirs.qcow2")).unwrap();
        {
            let chain = open_rw(&s, "ours.qcow2");
            chain.discard(0, 512 << 10).unwrap();
            chain.close().unwrap();
        }
        s.qemu_io("theirs.qcow2", "qcow2", &["discard 0 512k".into()]);
        assert_clean(&s, "ours.qcow2", options);
        let present = |name: &str| -> Vec<(u64, u64, bool, bool)> {
            s.map(name, "qcow2")
                .iter()
                .map(|e| (e.start, e.length, e.present, e.zero))
                .collect()
        };
        assert_eq!(present("ours.qcow2"), present("theirs.qcow2"), "{options}");
        assert_eq!(
            s.reference("ours.qcow2", "qcow2"),
            vec![0u8; 1 << 20],
            "{options}"
        );
    }
}

#[test]
fn compressed_clusters_we_store_are_read_by_qemu_and_pass_check() {
    use qcow2_engine::format::CompressionType;
    use qcow2_engine::qcow2::compress_cluster;
    for (options, kind) in [
        ("cluster_size=64k", CompressionType::Zlib),
        (
            "cluster_size=4k,compression_type=zstd",
            CompressionType::Zstd,
        ),
        ("cluster_size=64k,extended_l2=on", CompressionType::Zlib),
    ] {
        let label = format!("compressed [{options}]");
        let s = Scratch::new();
        let cs: u64 = if options.starts_with("cluster_size=4k") {
            4096
        } else {
            65536
        };
        s.create("a.qcow2", options, 64 * cs);
        let mut model = Model(vec![0; 64 * cs as usize]);
        {
            let chain = open_rw(&s, "a.qcow2");
            for i in 0..40u64 {
                let data: Vec<u8> = (0..cs).map(|j| ((j / 97) as u8) ^ (i as u8)).collect();
                let c = compress_cluster(kind, &data)
                    .unwrap()
                    .expect("compressible");
                chain.write_compressed(i * cs, &c).unwrap();
                model.write(i * cs, &data);
            }
            // Overwrite some compressed clusters: partially (COW from the compressed
            // data) and wholly.
            chain.write_at(&[0xee; 100], 3 * cs + 10).unwrap();
            model.write(3 * cs + 10, &[0xee; 100]);
            chain.write_at(&vec![0xdd; cs as usize], 5 * cs).unwrap();
            model.write(5 * cs, &vec![0xdd; cs as usize]);
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", &label);
        assert_model(&s, "a.qcow2", &model, &label);
        let map = s.qemu_img(&["map", "--output=json", "a.qcow2"]);
        assert!(map.contains("\"compressed\": true"), "{label}: {map}");
    }
}

/// The last compressed cluster written since the image was opened ends where its data
/// does, inside the last sector its descriptor names: reading it back (and copying on
/// write from it) in the same session must read only what the file holds. Found by the
/// `ops` fuzz target.
#[test]
fn a_compressed_cluster_at_the_end_of_the_file_reads_back_before_closing() {
    use qcow2_engine::format::CompressionType;
    use qcow2_engine::qcow2::compress_cluster;
    for (options, kind) in [
        ("cluster_size=64k,compat=0.10", CompressionType::Zlib),
        (
            "cluster_size=4k,compression_type=zstd",
            CompressionType::Zstd,
        ),
    ] {
        let s = Scratch::new();
        let cs: u64 = if options.starts_with("cluster_size=4k") {
            4096
        } else {
            65536
        };
        s.create("a.qcow2", options, 8 * cs);
        let mut model = Model(vec![0; 8 * cs as usize]);
        let data: Vec<u8> = (0..cs).map(|j| (j / 512) as u8 ^ 0x3d).collect();
        let c = compress_cluster(kind, &data)
            .unwrap()
            .expect("compressible");
        assert_ne!(c.len() % 512, 0, "the test needs a partial last sector");
        let chain = open_rw(&s, "a.qcow2");
        chain.write_compressed(7 * cs, &c).unwrap();
        model.write(7 * cs, &data);
        let mut back = vec![0u8; cs as usize];
        chain
            .read_at(&mut back, 7 * cs)
            .unwrap_or_else(|e| panic!("[{options}] reading back: {e}"));
        assert!(back == data, "[{options}] reads other data");
        chain.write_at(&[0xee; 100], 7 * cs + 10).unwrap();
        model.write(7 * cs + 10, &[0xee; 100]);
        chain.close().unwrap();
        drop(chain);
        assert_clean(&s, "a.qcow2", options);
        assert_model(&s, "a.qcow2", &model, options);
    }
}

/// Zeroing part of a compressed cluster with extended L2 (some of its subclusters, or
/// the image's partial last cluster up to the end) works as in QEMU, which cannot zero
/// subclusters of a compressed cluster either and writes zeros instead. It was refused,
/// after the unaligned head had been written. Found by the `ops` fuzz target.
#[test]
fn zeroing_part_of_a_compressed_cluster_with_extended_l2_writes_zeros() {
    use qcow2_engine::format::CompressionType;
    use qcow2_engine::qcow2::compress_cluster;
    let cs: u64 = 64 << 10;
    // Four whole clusters and a partial fifth.
    let size = 4 * cs + 8192;
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=64k,extended_l2=on", size);
    let mut model = Model(vec![0; size as usize]);
    let chain = open_rw(&s, "a.qcow2");
    for i in 0..5 {
        let data: Vec<u8> = (0..cs).map(|j| (j / 700) as u8 ^ (i as u8 + 1)).collect();
        let c = compress_cluster(CompressionType::Zlib, &data)
            .unwrap()
            .expect("compressible");
        chain.write_compressed(i * cs, &c).unwrap();
        let len = cs.min(size - i * cs) as usize;
        model.write(i * cs, &data[..len]);
    }
    // Subclusters (2 KiB) in the middle of cluster 0, across clusters 1 and 2 (partial
    // at both ends, unaligned head), and from inside cluster 4 to the end.
    for (offset, len, unmap) in [
        (4096, 8192, false),
        (cs + cs / 2 + 100, cs, true),
        (4 * cs + 2048, 6144, false),
    ] {
        chain
            .write_zeroes(offset, len, unmap)
            .unwrap_or_else(|e| panic!("zeroing {offset:#x}+{len:#x}: {e}"));
        model.zero(offset, len);
    }
    // All of the partial last cluster, to the end of the image.
    chain.write_zeroes(4 * cs, 8192, true).unwrap();
    model.zero(4 * cs, 8192);
    let mut back = vec![0u8; size as usize];
    chain.read_at(&mut back, 0).unwrap();
    assert!(back == model.0, "the image does not read the model");
    chain.close().unwrap();
    drop(chain);
    assert_clean(&s, "a.qcow2", "zeroed compressed clusters");
    assert_model(&s, "a.qcow2", &model, "zeroed compressed clusters");
}

#[test]
fn resize_grows_the_l1_table_shrinks_without_leaks_and_hides_a_longer_backing_file() {
    let s = Scratch::new();
    // 512-byte clusters: one L1 entry maps 32 KiB, so 1 MiB -> 4 MiB needs a larger L1.
    s.create("a.qcow2", "cluster_size=512", 1 << 20);
    let mut model = Model(vec![0; 4 << 20]);
    {
        let chain = open_rw(&s, "a.qcow2");
        chain.write_at(&[0x61; 300_000], 700_000).unwrap();
        model.write(700_000, &[0x61; 300_000]);
        chain.resize(4 << 20, false).unwrap();
        assert_eq!(chain.size(), 4 << 20);
        chain.write_at(&[0x62; 100_000], 3 << 20).unwrap();
        model.write(3 << 20, &[0x62; 100_000]);
        chain.close().unwrap();
    }
    assert_clean(&s, "a.qcow2", "grown");
    assert_model(&s, "a.qcow2", &model, "grown");
    {
        let chain = open_rw(&s, "a.qcow2");
        assert!(
            chain.resize(1 << 20, false).is_err(),
            "shrinking needs permission"
        );
        chain.resize(800 << 10, true).unwrap();
        chain.close().unwrap();
    }
    assert_clean(&s, "a.qcow2", "shrunk");
    model.0.truncate(800 << 10);
    assert_model(&s, "a.qcow2", &model, "shrunk");
    {
        // Growing again: what lay past the old end must not come back.
        let chain = open_rw(&s, "a.qcow2");
        chain.resize(1 << 20, false).unwrap();
        chain.close().unwrap();
    }
    model.0.resize(1 << 20, 0);
    assert_clean(&s, "a.qcow2", "regrown");
    assert_model(&s, "a.qcow2", &model, "regrown");

    // An overlay shorter than its backing file: the grown area reads zeros.
    s.create("base.qcow2", "", 4 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 0x55 0 4M".into()]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", Some(1 << 20));
    {
        let chain = open_rw(&s, "top.qcow2");
        chain.resize(3 << 20, false).unwrap();
        chain.close().unwrap();
    }
    let mut expected = Model(vec![0; 3 << 20]);
    expected.0[..1 << 20].fill(0x55);
    assert_clean(&s, "top.qcow2", "grown overlay");
    assert_model(&s, "top.qcow2", &expected, "grown overlay");
}

/// Version 2 has no zero flag: QEMU zeroes whole clusters of an image without a backing
/// file by unallocating them, and ignores a discard when a backing file would show
/// through. Same content and same allocation as QEMU's.
#[test]
fn version_2_zero_writes_and_discards_match_qemu() {
    for backing in [false, true] {
        let s = Scratch::new();
        if backing {
            s.create("base.qcow2", "compat=0.10", 1 << 20);
            s.qemu_io("base.qcow2", "qcow2", &["write -P 0xb 0 1M".into()]);
            s.create_overlay("ours.qcow2", "base.qcow2", "qcow2", "compat=0.10", None);
        } else {
            s.create("ours.qcow2", "compat=0.10", 1 << 20);
        }
        s.qemu_io("ours.qcow2", "qcow2", &["write -P 1 0 512k".into()]);
        std::fs::copy(s.path("ours.qcow2"), s.path("theirs.qcow2")).unwrap();
        {
            let chain = open_rw(&s, "ours.qcow2");
            chain.write_zeroes(0, 128 << 10, false).unwrap();
            chain.write_zeroes(640 << 10, 64 << 10, true).unwrap();
            chain.discard(256 << 10, 128 << 10).unwrap();
            chain.close().unwrap();
        }
        s.qemu_io(
            "theirs.qcow2",
            "qcow2",
            &[
                "write -z 0 128k".into(),
                "write -z -u 640k 64k".into(),
                "discard 256k 128k".into(),
            ],
        );
        let label = format!("compat=0.10 backing={backing}");
        assert_clean(&s, "ours.qcow2", &label);
        assert_eq!(
            s.reference("ours.qcow2", "qcow2"),
            s.reference("theirs.qcow2", "qcow2"),
            "{label}"
        );
        let allocation = |name: &str| -> Vec<(u64, u64, usize, bool, bool)> {
            s.map(name, "qcow2")
                .iter()
                .map(|e| (e.start, e.length, e.depth, e.present, e.data))
                .collect()
        };
        assert_eq!(
            allocation("ours.qcow2"),
            allocation("theirs.qcow2"),
            "{label}"
        );
    }
}

/// Growing over a longer backing file needs zero clusters to hide it: a version 2 overlay
/// refuses, as QEMU; over a backing file no longer than the image nothing needs hiding,
/// and growing writes no data (we wrote zero-filled clusters over the whole new area).
#[test]
fn growing_a_version_2_overlay_hides_a_longer_backing_file_or_refuses() {
    let s = Scratch::new();
    s.create("base.qcow2", "", 4 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 0xb 0 4M".into()]);
    for (top_size, refused) in [(2 << 20, true), (4 << 20, false)] {
        let label = format!("compat=0.10 overlay of {top_size} over 4M");
        s.create_overlay(
            "a.qcow2",
            "base.qcow2",
            "qcow2",
            "compat=0.10",
            Some(top_size),
        );
        std::fs::copy(s.path("a.qcow2"), s.path("b.qcow2")).unwrap();
        let qemu_refuses = !s
            .output("qemu-img", &["resize", "b.qcow2", "64M"])
            .status
            .success();
        assert_eq!(qemu_refuses, refused, "{label}");
        {
            let chain = open_rw(&s, "a.qcow2");
            assert_eq!(chain.resize(64 << 20, false).is_err(), refused, "{label}");
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", &label);
        assert_eq!(
            s.reference("a.qcow2", "qcow2"),
            s.reference("b.qcow2", "qcow2"),
            "{label}"
        );
        assert!(
            s.map("a.qcow2", "qcow2")
                .iter()
                .all(|e| e.depth > 0 || !e.data),
            "{label}: growing wrote data"
        );
    }
}

/// An external data file follows the virtual size both ways, as QEMU truncates it; with
/// data_file_raw it is then still the whole disk as a raw image.
#[test]
fn resizing_resizes_the_external_data_file() {
    let s = Scratch::new();
    for raw in ["off", "on"] {
        let options = format!("data_file=d-{raw}.raw,data_file_raw={raw}");
        s.create("a.qcow2", &options, 1 << 20);
        s.qemu_io("a.qcow2", "qcow2", &["write -P 0x5 0 1M".into()]);
        for size in [4u64 << 20, 3 << 20, 512 << 10, 2 << 20] {
            {
                let chain = open_rw(&s, "a.qcow2");
                chain.resize(size, true).unwrap();
                chain.close().unwrap();
            }
            let label = format!("{options} resized to {size}");
            assert_clean(&s, "a.qcow2", &label);
            let len = std::fs::metadata(s.path(&format!("d-{raw}.raw")))
                .unwrap()
                .len();
            assert_eq!(len, size, "{label}: data file length");
        }
        let mut model = Model(vec![0; 2 << 20]);
        model.write(0, &[0x5; 512 << 10]);
        assert_model(&s, "a.qcow2", &model, &options);
        if raw == "on" {
            assert_eq!(
                s.reference("d-on.raw", "raw"),
                model.0,
                "{options}: raw view"
            );
        }
        std::fs::remove_file(s.path("a.qcow2")).unwrap();
    }
}

/// QEMU refuses to resize a version 2 image with snapshots (its snapshot table does not
/// record their sizes); version 3 images with snapshots resize.
#[test]
fn resizing_a_version_2_image_with_snapshots_is_refused() {
    let s = Scratch::new();
    for (options, refused) in [("compat=0.10", true), ("compat=1.1", false)] {
        s.create("a.qcow2", options, 1 << 20);
        s.qemu_img(&["snapshot", "-c", "snap", "a.qcow2"]);
        let qemu_refuses = !s
            .output("qemu-img", &["resize", "a.qcow2", "2M"])
            .status
            .success();
        assert_eq!(qemu_refuses, refused, "{options}");
        {
            let chain = open_rw(&s, "a.qcow2");
            assert_eq!(chain.resize(3 << 20, false).is_err(), refused, "{options}");
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", options);
        std::fs::remove_file(s.path("a.qcow2")).unwrap();
    }
}

#[test]
fn lazy_refcounts_mark_the_image_dirty_until_close_and_a_dirty_image_is_repaired() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=4k,lazy_refcounts=on", 4 << 20);
    let mut model = Model(vec![0; 4 << 20]);
    {
        // Without locks: a crash ends the process and its locks, a forgotten handle would
        // keep them.
        let chain = Chain::open_with(
            s.path("a.qcow2"),
            &ChainOptions {
                writable: true,
                locking: qcow2_engine::Locking::Off,
                ..ChainOptions::default()
            },
        )
        .unwrap();
        chain.write_at(&[0x71; 50_000], 10_000).unwrap();
        model.write(10_000, &[0x71; 50_000]);
        chain.flush().unwrap();
        let on_disk = Chain::open(s.path("a.qcow2")).unwrap();
        assert!(
            on_disk.top().as_qcow2().unwrap().is_dirty(),
            "dirty while refcounts lag"
        );
        // A crash: the image is never closed.
        std::mem::forget(chain);
    }
    {
        // qemu-io leaves an image dirty too when it aborts mid-session.
        let chain = open_rw(&s, "a.qcow2");
        assert!(
            !chain.top().as_qcow2().unwrap().is_dirty(),
            "repaired on open"
        );
        chain.write_at(&[0x72; 9000], 2 << 20).unwrap();
        model.write(2 << 20, &[0x72; 9000]);
        chain.close().unwrap();
    }
    assert_clean(&s, "a.qcow2", "lazy refcounts");
    assert_model(&s, "a.qcow2", &model, "lazy refcounts");
    // An image qemu left dirty: qemu-io's abort ends the process without a clean close.
    let out = s.output(
        "qemu-io",
        &["-c", "write -P 0x73 1M 64k", "-c", "abort", "a.qcow2"],
    );
    assert!(!out.status.success());
    model.write(1 << 20, &[0x73; 65536]);
    assert!(
        Chain::open(s.path("a.qcow2"))
            .unwrap()
            .top()
            .as_qcow2()
            .unwrap()
            .is_dirty()
    );
    open_rw(&s, "a.qcow2").close().unwrap();
    assert_clean(&s, "a.qcow2", "after qemu's abort");
    assert_model(&s, "a.qcow2", &model, "after qemu's abort");
}

#[test]
fn amend_changes_compat_refcount_width_lazy_refcounts_and_backing_like_qemu() {
    use qcow2_engine::qcow2::{AmendOptions, Compat};
    let s = Scratch::new();
    s.create("base.qcow2", "cluster_size=64k", 4 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 0x21 0 4M".into()]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x22 64k 128k".into(),
            "write -z 1M 256k".into(),
            "write -z 2M 10k".into(),
        ],
    );
    let before = s.reference("top.qcow2", "qcow2");
    let info = |field: &str| -> String {
        let out = s.qemu_img(&["info", "--output=json", "top.qcow2"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.pointer(field).map(|x| x.to_string()).unwrap_or_default()
    };
    let steps: Vec<(AmendOptions, &str, &str)> = vec![
        (
            AmendOptions {
                refcount_bits: Some(64),
                ..Default::default()
            },
            "/format-specific/data/refcount-bits",
            "64",
        ),
        (
            AmendOptions {
                lazy_refcounts: Some(true),
                ..Default::default()
            },
            "/format-specific/data/lazy-refcounts",
            "true",
        ),
        (
            AmendOptions {
                compat: Some(Compat::V0_10),
                refcount_bits: Some(16),
                lazy_refcounts: Some(false),
                ..Default::default()
            },
            "/format-specific/data/compat",
            "\"0.10\"",
        ),
        (
            AmendOptions {
                compat: Some(Compat::V1_1),
                ..Default::default()
            },
            "/format-specific/data/compat",
            "\"1.1\"",
        ),
        (
            AmendOptions {
                backing_file: Some(Some("base.qcow2".into())),
                backing_format: Some(Some("qcow2".into())),
                ..Default::default()
            },
            "/backing-filename-format",
            "\"qcow2\"",
        ),
    ];
    for (options, field, want) in steps {
        let label = format!("amend {options:?}");
        {
            let chain = open_rw(&s, "top.qcow2");
            chain
                .amend(&options)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            chain.close().unwrap();
        }
        assert_clean(&s, "top.qcow2", &label);
        assert_eq!(info(field), want, "{label}");
        assert_eq!(
            s.reference("top.qcow2", "qcow2"),
            before,
            "{label}: content"
        );
    }
    // Refused: 1-bit refcounts cannot count a cluster shared with a snapshot.
    s.qemu_img(&["snapshot", "-c", "s", "top.qcow2"]);
    let chain = open_rw(&s, "top.qcow2");
    let err = chain
        .amend(&AmendOptions {
            refcount_bits: Some(1),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.report().to_string().contains("references"), "{err}");
    chain.close().unwrap();
    drop(chain);
    assert_clean(&s, "top.qcow2", "refused amend");
}
