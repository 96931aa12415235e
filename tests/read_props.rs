//! Properties of the read path and of the on-disk codecs.
//!
//! - Random reads (biased towards cluster and L2-table boundaries) of two fixed chains,
//!   built once with qemu-img/qemu-io, against `qemu-img convert -O raw`; the same through
//!   the `Read + Seek` adapter, and from four threads at once.
//! - `decode(encode(x)) == x` for every codec: header (v2 and v3), header extensions, L1
//!   and L2 entries, subcluster bitmaps, refcount entries of every width, snapshot entries;
//!   and no decoder panics on arbitrary bytes.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::OnceLock;

use common::{Rng, SOURCE, Scratch, random_ops, source_file};
use proptest::prelude::*;
use qcow2_engine::format::{
    AutoclearFeatures, BitmapsExtension, ClusterDescriptor, CompatibleFeatures,
    CompressedDescriptor, CompressionType, FeatureKind, FeatureName, Geometry, Header,
    HeaderExtension, HeaderExtensions, IncompatibleFeatures, L1Entry, L2Entry, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, SnapshotEntry, SnapshotExtra, SubclusterBitmap, get_refcount,
    max_refcount, set_refcount,
};
use qcow2_engine::{Chain, ChainReader, Image};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// An open chain and what QEMU reads from it. The files are deleted once opened: the
/// chain keeps them open.
struct Fixture {
    chain: Chain,
    expected: Vec<u8>,
}

/// Raw base (5 MiB + 1000 bytes, partly sparse) < qcow2 with 4 KiB clusters (whose L2 tables
/// span 2 MiB each) < qcow2 with 64 KiB clusters.
fn three_layers() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let size = 5 * M + 1000;
        let s = Scratch::new();
        source_file(&s, 1, 3 * 64 * K as usize);
        let mut rng = Rng::new(1);
        s.write_file("base.raw", &[]);
        s.truncate("base.raw", size);
        s.qemu_io(
            "base.raw",
            "raw",
            &random_ops(&mut rng, size, 64 * K, 3 * 64 * K, 0x01, 25),
        );
        s.create_overlay("mid.qcow2", "base.raw", "raw", "cluster_size=4k", None);
        let mut ops = random_ops(&mut rng, size, 4 * K, 3 * 64 * K, 0x41, 60);
        // Straddle the L2 table boundaries at 2 and 4 MiB.
        ops.push(format!("write -s {SOURCE} {} 10000", 2 * M - 5000));
        ops.push(format!("write -z {} 9000", 4 * M - 4500));
        s.qemu_io("mid.qcow2", "qcow2", &ops);
        s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "", None);
        let ops = random_ops(&mut rng, size, 64 * K, 3 * 64 * K, 0x81, 30);
        s.qemu_io("top.qcow2", "qcow2", &ops);
        Fixture {
            expected: s.reference("top.qcow2", "qcow2"),
            chain: s.open("top.qcow2"),
        }
    })
}

/// A zstd-compressed base with 512-byte clusters (L2 tables span 32 KiB), 2 MiB, under an
/// extended-L2 overlay with 16 KiB clusters (512-byte subclusters, L2 tables span 16 MiB)
/// of 17 MiB.
fn compressed_under_subclusters() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base_size = 2 * M;
        let size = 17 * M;
        let s = Scratch::new();
        source_file(&s, 2, 3 * 16 * K as usize);
        let mut rng = Rng::new(2);
        s.create("src.qcow2", "cluster_size=512", base_size);
        let ops = random_ops(&mut rng, base_size, 4 * K, 48 * K, 0x11, 60);
        s.qemu_io("src.qcow2", "qcow2", &ops);
        s.qemu_img(&[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512,compression_type=zstd",
            "src.qcow2",
            "base.qcow2",
        ]);
        s.create_overlay(
            "top.qcow2",
            "base.qcow2",
            "qcow2",
            "cluster_size=16k,extended_l2=on",
            Some(size),
        );
        let mut ops = random_ops(&mut rng, base_size + 64 * K, 512, 48 * K, 0x51, 60);
        ops.extend(random_ops(&mut rng, size, 16 * K, 48 * K, 0x91, 30));
        ops.push(format!("write -s {SOURCE} {} 40000", 16 * M - 20000));
        ops.push(format!("write -z {} 1000", 16 * M + 100));
        s.qemu_io("top.qcow2", "qcow2", &ops);
        Fixture {
            expected: s.reference("top.qcow2", "qcow2"),
            chain: s.open("top.qcow2"),
        }
    })
}

/// A read: an offset (anywhere, below `busy` where every layer has data, or near a
/// multiple of one of `boundaries`) and a length that fits in `size`.
fn read_strategy(
    size: u64,
    busy: u64,
    boundaries: &'static [u64],
) -> impl Strategy<Value = (u64, usize)> {
    let anywhere = (0..size).boxed();
    let busy = (0..busy.min(size)).boxed();
    let near_boundary = (0..boundaries.len(), any::<u64>(), -4096i64..4096)
        .prop_map(move |(g, k, delta)| {
            let gran = boundaries[g];
            let b = (k % (size / gran + 1)) * gran;
            b.saturating_add_signed(delta).min(size - 1)
        })
        .boxed();
    prop_oneof![anywhere, busy, near_boundary].prop_flat_map(move |off| {
        let max = (size - off).min(200 * K) as usize;
        (Just(off), prop_oneof![0..=max.min(600), 0..=max])
    })
}

fn check_random_read(f: &Fixture, off: u64, len: usize) -> Result<(), TestCaseError> {
    let mut buf = vec![0xeeu8; len];
    f.chain
        .read_at(&mut buf, off)
        .map_err(|e| TestCaseError::fail(format!("read of {len} at {off:#x}: {e}")))?;
    let expected = &f.expected[off as usize..off as usize + len];
    if buf != expected {
        let at = buf.iter().zip(expected).position(|(a, b)| a != b).unwrap();
        return Err(TestCaseError::fail(format!(
            "read of {len} at {off:#x} differs at guest offset {:#x}",
            off + at as u64
        )));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_reads_of_a_three_layer_chain_match_qemu(
        (off, len) in read_strategy(5 * M + 1000, 5 * M + 1000, &[512, 4 * K, 64 * K, 2 * M])
    ) {
        let f = three_layers();
        prop_assert_eq!(f.chain.size(), f.expected.len() as u64);
        check_random_read(f, off, len)?;
    }

    #[test]
    fn random_reads_of_subclusters_over_compressed_clusters_match_qemu(
        (off, len) in read_strategy(17 * M, 2 * M + 64 * K, &[512, 16 * K, 32 * K, 2 * M, 16 * M])
    ) {
        let f = compressed_under_subclusters();
        prop_assert_eq!(f.chain.size(), f.expected.len() as u64);
        check_random_read(f, off, len)?;
    }

    /// `runs` remembers each layer's last run; it must give exactly what resolving one
    /// offset at a time gives.
    #[test]
    fn chain_runs_equal_one_resolve_at_a_time(
        (off, len) in read_strategy(17 * M, 2 * M + 64 * K, &[512, 16 * K, 32 * K, 2 * M, 16 * M]),
        which in 0u8..2,
    ) {
        let f = if which == 0 { three_layers() } else { compressed_under_subclusters() };
        let size = f.chain.size();
        let off = off.min(size - 1);
        let end = (off + len as u64).min(size);
        let runs: Vec<_> = f.chain.runs(off, end - off).collect::<Result<_, _>>().unwrap();
        let mut pos = off;
        let mut fresh = Vec::new();
        while pos < end {
            let run = f.chain.resolve(pos, end - pos).unwrap();
            pos = run.end();
            fresh.push(run);
        }
        prop_assert_eq!(runs, fresh);
    }

    #[test]
    fn reads_past_the_end_are_errors(extra in 1u64..100_000, back in 0u64..100_000) {
        let f = three_layers();
        let size = f.chain.size();
        let off = size.saturating_sub(back);
        let mut buf = vec![0u8; (back + extra) as usize];
        let err = f.chain.read_at(&mut buf, off).expect_err("read past the end");
        prop_assert!(err.report().to_string().contains("past the end"), "{}", err);
    }

    #[test]
    fn the_read_seek_adapter_reads_the_same_bytes(
        seeks in proptest::collection::vec((0u8..3, any::<i64>(), 0usize..70_000), 1..8)
    ) {
        for f in [three_layers(), compressed_under_subclusters()] {
            let size = f.chain.size() as i64;
            let mut reader = ChainReader::new(&f.chain);
            let mut pos = 0i64;
            for &(whence, raw, len) in &seeks {
                // Targets inside (or at the end of) the image, through all three SeekFroms.
                let target = raw.rem_euclid(size + 1);
                let to = match whence {
                    0 => SeekFrom::Start(target as u64),
                    1 => SeekFrom::Current(target - pos),
                    _ => SeekFrom::End(target - size),
                };
                prop_assert_eq!(reader.seek(to).unwrap(), target as u64);
                let mut buf = vec![0u8; len];
                let mut got = 0;
                loop {
                    let n = reader.read(&mut buf[got..]).unwrap();
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                let want = len.min((size - target) as usize);
                prop_assert_eq!(got, want, "short read at {}", target);
                let start = target as usize;
                prop_assert!(buf[..got] == f.expected[start..start + got], "bytes at {}", target);
                pos = target + got as i64;
                prop_assert_eq!(reader.stream_position().unwrap(), pos as u64);
            }
        }
    }
}

#[test]
fn the_read_seek_adapter_reads_whole_images_and_refuses_seeking_before_the_start() {
    for f in [three_layers(), compressed_under_subclusters()] {
        let mut reader = ChainReader::new(&f.chain);
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert!(all == f.expected, "read_to_end differs from qemu's bytes");
        assert_eq!(reader.read(&mut [0u8; 10]).unwrap(), 0, "read at EOF");
        assert!(
            reader
                .seek(SeekFrom::Current(-(all.len() as i64) - 1))
                .is_err()
        );
        assert!(reader.seek(SeekFrom::End(-(all.len() as i64) - 1)).is_err());
        // Past the end is allowed and reads nothing, like a file.
        reader.seek(SeekFrom::End(10)).unwrap();
        assert_eq!(reader.read(&mut [0u8; 10]).unwrap(), 0);
    }
}

#[test]
fn chain_and_image_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Chain>();
    assert_send_sync::<Image>();
}

#[test]
fn four_threads_read_one_chain_at_once() {
    for (n, f) in [three_layers(), compressed_under_subclusters()]
        .into_iter()
        .enumerate()
    {
        let size = f.chain.size();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    let mut rng = Rng::new(t * 7919 + n as u64);
                    let mut buf = vec![0u8; 128 * K as usize];
                    for i in 0..300 {
                        let off = rng.below(size);
                        let len = 1 + rng.below((size - off).min(128 * K)) as usize;
                        let buf = &mut buf[..len];
                        f.chain.read_at(buf, off).unwrap_or_else(|e| {
                            panic!("thread {t}, read {i}: {len} bytes at {off:#x}: {e}")
                        });
                        let start = off as usize;
                        assert!(
                            *buf == f.expected[start..start + len],
                            "thread {t}, read {i}: {len} bytes at {off:#x} differ"
                        );
                    }
                });
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// Codecs.

fn header_strategy() -> impl Strategy<Value = Header> {
    (9u32..=21, any::<bool>()).prop_flat_map(|(cluster_bits, v3)| {
        let cs = 1u64 << cluster_bits;
        let extended = if v3 && cluster_bits >= 14 {
            any::<bool>().boxed()
        } else {
            Just(false).boxed()
        };
        // Tables never start in the header cluster.
        let aligned = move || (1..(1u64 << 56) >> cluster_bits).prop_map(move |k| k * cs);
        let backing = prop_oneof![
            any::<u32>().prop_map(|len| (0u64, len)),
            (1..cs).prop_flat_map(move |off| (Just(off), 0..=(cs - off).min(1023) as u32)),
        ];
        (
            extended,
            0..=(MAX_L1_BYTES / 8) as u32,
            any::<u64>(),
            backing,
            any::<u32>(),
            (aligned(), aligned(), aligned()),
            0..=(MAX_REFCOUNT_TABLE_BYTES / cs) as u32,
            0..=65536u32,
            (any::<u64>(), any::<u64>(), any::<u64>(), 0u32..=6),
            (0u32..=32).prop_map(|n| 104 + 8 * n),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 256),
        )
            .prop_map(
                move |(
                    extended,
                    l1_size,
                    size_seed,
                    (backing_file_offset, backing_file_size),
                    crypt_method,
                    (l1_table_offset, refcount_table_offset, snapshots_offset),
                    refcount_table_clusters,
                    nb_snapshots,
                    (incompatible, compatible, autoclear, refcount_order),
                    header_length,
                    zstd,
                    tail,
                )| {
                    let g = Geometry::new(cluster_bits, extended);
                    let max_size = (u64::from(l1_size) * g.l2_span()).min(i64::MAX as u64);
                    let size = size_seed % (max_size + 1);
                    let mut h = Header {
                        version: 2,
                        backing_file_offset,
                        backing_file_size,
                        cluster_bits,
                        size,
                        crypt_method,
                        l1_size,
                        l1_table_offset,
                        refcount_table_offset,
                        refcount_table_clusters,
                        nb_snapshots,
                        snapshots_offset,
                        incompatible_features: IncompatibleFeatures::empty(),
                        compatible_features: CompatibleFeatures::empty(),
                        autoclear_features: AutoclearFeatures::empty(),
                        refcount_order: 4,
                        header_length: 72,
                        compression_type: CompressionType::Zlib,
                        unknown_tail: Vec::new(),
                    };
                    if v3 {
                        let header_length = header_length.min(cs as u32);
                        let zstd = zstd && header_length > 104;
                        let mut bits = incompatible
                            & !(IncompatibleFeatures::EXTENDED_L2
                                | IncompatibleFeatures::COMPRESSION_TYPE)
                                .bits();
                        if extended {
                            bits |= IncompatibleFeatures::EXTENDED_L2.bits();
                        }
                        if zstd {
                            bits |= IncompatibleFeatures::COMPRESSION_TYPE.bits();
                        }
                        h.version = 3;
                        h.incompatible_features = IncompatibleFeatures::from_bits_retain(bits);
                        h.compatible_features = CompatibleFeatures::from_bits_retain(compatible);
                        h.autoclear_features = AutoclearFeatures::from_bits_retain(autoclear);
                        h.refcount_order = refcount_order;
                        h.header_length = header_length;
                        h.compression_type = if zstd {
                            CompressionType::Zstd
                        } else {
                            CompressionType::Zlib
                        };
                        h.unknown_tail =
                            tail[..(header_length as usize).saturating_sub(105)].to_vec();
                    }
                    // A backing file name starts past the header (and its extensions).
                    if h.backing_file_offset != 0
                        && h.backing_file_offset < u64::from(h.header_length)
                    {
                        h.backing_file_offset = u64::from(h.header_length);
                        let room = cs.saturating_sub(h.backing_file_offset).min(1023) as u32;
                        h.backing_file_size = h.backing_file_size.min(room);
                    }
                    h
                },
            )
    })
}

fn extension_strategy() -> impl Strategy<Value = HeaderExtensions> {
    use qcow2_engine::format::{
        EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_DATA_FILE, EXT_ENCRYPTION, EXT_FEATURE_TABLE,
    };
    let known = [
        EXT_BACKING_FORMAT,
        EXT_BITMAPS,
        EXT_DATA_FILE,
        EXT_ENCRYPTION,
        EXT_FEATURE_TABLE,
    ];
    let feature =
        (0u8..3, any::<u8>(), "[a-z0-9 _-]{0,46}").prop_map(|(k, bit, name)| FeatureName {
            kind: match k {
                0 => FeatureKind::Incompatible,
                1 => FeatureKind::Compatible,
                _ => FeatureKind::Autoclear,
            },
            bit,
            name,
        });
    (
        // QEMU keeps a backing format name in 16 bytes.
        proptest::option::of(
            "\\PC{0,15}"
                .prop_filter("at most 15 bytes", |f| f.len() <= 15)
                .prop_map(HeaderExtension::BackingFormat),
        ),
        proptest::option::of("\\PC{0,40}".prop_map(HeaderExtension::DataFile)),
        proptest::option::of((any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
            |(nb_bitmaps, directory_size, directory_offset)| {
                HeaderExtension::Bitmaps(BitmapsExtension {
                    nb_bitmaps,
                    directory_size,
                    directory_offset,
                })
            },
        )),
        proptest::option::of(
            (any::<u64>(), any::<u64>())
                .prop_map(|(offset, length)| HeaderExtension::Encryption { offset, length }),
        ),
        proptest::collection::vec(
            proptest::collection::vec(feature, 0..4).prop_map(HeaderExtension::FeatureNames),
            0..3,
        ),
        proptest::collection::btree_map(
            (1u32..).prop_filter("a known type", move |k| !known.contains(k)),
            proptest::collection::vec(any::<u8>(), 0..40),
            0..4,
        ),
    )
        .prop_flat_map(|(backing, data, bitmaps, encryption, features, unknown)| {
            let mut list: Vec<HeaderExtension> = [backing, data, bitmaps, encryption]
                .into_iter()
                .flatten()
                .collect();
            list.extend(features);
            list.extend(
                unknown
                    .into_iter()
                    .map(|(kind, data)| HeaderExtension::Unknown { kind, data }),
            );
            Just(list).prop_shuffle()
        })
        .prop_map(|list| HeaderExtensions { list })
}

fn geometry_strategy() -> impl Strategy<Value = Geometry> {
    (9u32..=21, any::<bool>()).prop_map(|(bits, ext)| Geometry::new(bits, ext && bits >= 14))
}

fn descriptor_strategy(g: Geometry) -> BoxedStrategy<ClusterDescriptor> {
    let cs = g.cluster_size();
    let host = (0..(1u64 << 56) >> g.cluster_bits()).prop_map(move |k| k * cs);
    let shift = g.compressed_size_shift();
    let max_host = (1u64 << shift.min(56)) - 1;
    let max_extra_sectors = (1u64 << (62 - shift)) - 1;
    let compressed = (0..=max_host, 0..=max_extra_sectors).prop_map(|(host_offset, extra)| {
        ClusterDescriptor::Compressed(CompressedDescriptor {
            host_offset,
            len: (extra + 1) * 512 - (host_offset & 511),
        })
    });
    let data = (host.clone(), any::<bool>())
        .prop_filter("host 0 without COPIED is unallocated", |(h, c)| {
            *h != 0 || *c
        })
        .prop_map(|(host, copied)| ClusterDescriptor::Data { host, copied });
    if g.extended_l2() {
        prop_oneof![Just(ClusterDescriptor::Unallocated), data, compressed].boxed()
    } else {
        let zero = proptest::option::of(host.prop_filter("nonzero", |h| *h != 0))
            .prop_map(|host| ClusterDescriptor::Zero { host });
        prop_oneof![Just(ClusterDescriptor::Unallocated), data, zero, compressed].boxed()
    }
}

fn encode_descriptor(g: Geometry, d: ClusterDescriptor, copied: bool) -> L2Entry {
    match d {
        ClusterDescriptor::Unallocated => L2Entry::UNALLOCATED,
        ClusterDescriptor::Zero { host } => L2Entry::zero(host, copied),
        ClusterDescriptor::Data { host, copied } => L2Entry::data(host, copied),
        ClusterDescriptor::Compressed(c) => L2Entry::compressed(g, c),
    }
}

fn snapshot_strategy() -> impl Strategy<Value = SnapshotEntry> {
    let extra = prop_oneof![
        // A prefix of the known fields.
        (0usize..=3, any::<[u64; 3]>()).prop_map(|(n, v)| SnapshotExtra {
            vm_state_size_large: (n > 0).then_some(v[0]),
            disk_size: (n > 1).then_some(v[1]),
            icount: (n > 2).then_some(v[2]),
            unknown: Vec::new(),
        }),
        // All known fields and bytes QEMU does not know after them.
        (
            any::<[u64; 3]>(),
            proptest::collection::vec(any::<u8>(), 1..1000)
        )
            .prop_map(|(v, unknown)| SnapshotExtra {
                vm_state_size_large: Some(v[0]),
                disk_size: Some(v[1]),
                icount: Some(v[2]),
                unknown,
            }),
        // Fewer bytes than the known fields, not a whole field: kept verbatim.
        proptest::collection::vec(any::<u8>(), 1..24)
            .prop_filter("not whole fields", |b| b.len() % 8 != 0)
            .prop_map(|unknown| SnapshotExtra {
                unknown,
                ..SnapshotExtra::default()
            }),
    ];
    (
        any::<u64>(),
        any::<u32>(),
        "\\PC{0,12}",
        "\\PC{0,40}",
        any::<(u32, u32, u64, u32)>(),
        extra,
    )
        .prop_map(
            |(l1_table_offset, l1_size, id, name, (date_sec, date_nsec, clock, vm), extra)| {
                SnapshotEntry {
                    l1_table_offset,
                    l1_size,
                    id,
                    name,
                    date_sec,
                    date_nsec,
                    vm_clock_nsec: clock,
                    vm_state_size32: vm,
                    extra,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn headers_round_trip(h in header_strategy()) {
        let len = (h.header_length as usize).max(72);
        let mut bytes = vec![0u8; len];
        h.encode(&mut bytes);
        let decoded = Header::decode(&bytes);
        prop_assert!(decoded.is_ok(), "{:?}: {}", h, decoded.unwrap_err());
        let decoded = decoded.unwrap();
        prop_assert_eq!(&decoded, &h);
        let mut again = vec![0u8; len];
        decoded.encode(&mut again);
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn header_extensions_round_trip(exts in extension_strategy(), start in 0u64..4096) {
        let bytes = exts.encode();
        prop_assert_eq!(bytes.len() % 8, 0);
        let decoded = HeaderExtensions::decode(&bytes, start);
        prop_assert!(decoded.is_ok(), "{:?}: {}", exts, decoded.unwrap_err());
        prop_assert_eq!(decoded.unwrap(), exts);
    }

    #[test]
    fn l1_entries_round_trip(raw in any::<u64>()) {
        let e = L1Entry(raw);
        let rebuilt = L1Entry::new(e.l2_offset(), e.copied());
        prop_assert_eq!(rebuilt.0 | e.reserved_bits(), raw);
        prop_assert_eq!(rebuilt.reserved_bits(), 0);
        prop_assert_eq!(rebuilt.l2_offset() % 512, 0);
    }

    #[test]
    fn l2_descriptors_encode_and_decode_back(
        (g, d, copied) in geometry_strategy()
            .prop_flat_map(|g| (Just(g), descriptor_strategy(g), any::<bool>()))
    ) {
        let entry = encode_descriptor(g, d, copied);
        prop_assert_eq!(entry.decode(g), Ok(d), "entry {:#018x}", entry.0);
    }

    #[test]
    fn l2_entries_decode_then_encode_to_the_same_bits(
        g in geometry_strategy(), bits in any::<u64>(), mask in 0usize..4
    ) {
        // Random words mostly have reserved bits set; also try words limited to the
        // fields of a standard entry (COPIED, offset, zero flag), aligned or not.
        let aligned = 0x80ff_ffff_ffff_fe01 & !(g.cluster_size() - 1) | 1;
        let raw = bits & [u64::MAX, 0x80ff_ffff_ffff_fe01, aligned, aligned & !(1 << 63)][mask];
        let entry = L2Entry(raw);
        // Decoding never panics; what decodes re-encodes to the same descriptor and, for
        // canonical entries, to the same bits.
        if let Ok(d) = entry.decode(g) {
            let again = encode_descriptor(g, d, entry.copied());
            prop_assert_eq!(again.decode(g), Ok(d));
            let canonical = match d {
                ClusterDescriptor::Unallocated => raw == 0,
                ClusterDescriptor::Zero { host: None } => raw & !1 == 0,
                ClusterDescriptor::Compressed(_) => raw >> 63 == 0,
                // With extended L2, QEMU ignores the zero flag (bit 0) of data entries.
                ClusterDescriptor::Data { .. } => raw & 1 == 0,
                ClusterDescriptor::Zero { .. } => true,
            };
            if canonical {
                prop_assert_eq!(again.0, raw, "{:?}", d);
            }
        }
    }

    #[test]
    fn subcluster_bitmaps_set_one_subcluster(
        raw in any::<u64>(), i in 0u64..32, allocated: bool, zero: bool
    ) {
        let b = SubclusterBitmap(raw).with(i, allocated, zero);
        prop_assert_eq!(b.allocated(i), allocated);
        prop_assert_eq!(b.zero(i), zero);
        let others = !(1u64 << i | 1u64 << (32 + i));
        prop_assert_eq!(b.0 & others, raw & others);
        prop_assert_eq!(SubclusterBitmap(b.0).with(i, allocated, zero), b);
        let conflicting = (raw as u32) & ((raw >> 32) as u32);
        prop_assert_eq!(SubclusterBitmap(raw).conflicting(), conflicting);
    }

    #[test]
    fn refcount_entries_of_every_width_round_trip(
        order in 0u32..=6,
        block in proptest::collection::vec(any::<u8>(), 64),
        index_seed: usize,
        value_seed: u64,
    ) {
        let entries = (block.len() * 8) >> order;
        let index = index_seed % entries;
        let value = value_seed & max_refcount(order);
        let mut new = block.clone();
        set_refcount(&mut new, index, order, value);
        prop_assert_eq!(get_refcount(&new, index, order), value);
        for other in (0..entries).filter(|&j| j != index) {
            prop_assert_eq!(get_refcount(&new, other, order), get_refcount(&block, other, order));
        }
        // The layout the spec gives: big-endian entries, sub-byte entries from bit 0 up.
        let bits = 1usize << order;
        if bits >= 8 {
            let width = bits / 8;
            prop_assert_eq!(
                &new[index * width..(index + 1) * width],
                &value.to_be_bytes()[8 - width..]
            );
        } else {
            let bit = index * bits;
            prop_assert_eq!(u64::from(new[bit / 8] >> (bit % 8)) & ((1 << bits) - 1), value);
        }
    }

    #[test]
    fn snapshot_entries_round_trip(entries in proptest::collection::vec(snapshot_strategy(), 1..4)) {
        let mut table = Vec::new();
        for e in &entries {
            let bytes = e.encode();
            prop_assert_eq!(bytes.len(), e.encoded_len());
            prop_assert_eq!(bytes.len() % 8, 0);
            table.extend(bytes);
        }
        let mut pos = 0;
        for e in &entries {
            let (decoded, used) = SnapshotEntry::decode(&table[pos..], 0x1000 + pos as u64)
                .map_err(|err| TestCaseError::fail(format!("{e:?}: {err}")))?;
            prop_assert_eq!(&decoded, e);
            prop_assert_eq!(used, e.encoded_len());
            pos += used;
        }
        prop_assert_eq!(pos, table.len());
    }

    #[test]
    fn decoders_do_not_panic_on_arbitrary_bytes(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..600), magic: bool, start in 0u64..1000
    ) {
        if magic && bytes.len() >= 8 {
            bytes[..4].copy_from_slice(&qcow2_engine::format::QCOW2_MAGIC.to_be_bytes());
            bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        }
        let _ = Header::decode(&bytes);
        let _ = HeaderExtensions::decode(&bytes, start);
        let _ = SnapshotEntry::decode(&bytes, start);
    }
}
