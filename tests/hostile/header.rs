//! Cases: header fields set to boundary and garbage values, and header extensions damaged.

use std::sync::Arc;

use crate::common::{HeaderField, Rng};
use crate::fixtures::{Fixture, damaged, name_seed};
use crate::layout::{put, put_field};
use crate::runner::{Case, Expect};

/// Each header field set to boundary and garbage values.
pub(crate) fn header_cases(f: &Arc<Fixture>, full: bool) -> Vec<Case> {
    use HeaderField::*;
    let l = &f.layout;
    let cluster = l.cluster;
    let len = f.bytes.len() as u64;
    let eof = len.div_ceil(cluster) * cluster;
    let l1_needed = l.l1_entries;
    let span = (cluster / if l.extended_l2 { 16 } else { 8 }) * cluster;
    let mut values: Vec<(HeaderField, u64)> = vec![
        (Magic, 0),
        (Magic, 0x5146_49fa),
        (Version, 0),
        (Version, 1),
        (Version, 4),
        (Version, u64::from(u32::MAX)),
        (BackingFileOffset, 1),
        (BackingFileOffset, 8),
        (BackingFileOffset, l.header_len + 4),
        (BackingFileOffset, cluster - 1),
        (BackingFileOffset, cluster),
        (BackingFileOffset, u64::MAX),
        (BackingFileSize, 1024),
        (BackingFileSize, u64::from(u32::MAX)),
        (ClusterBits, 0),
        (ClusterBits, 8),
        (ClusterBits, 9),
        (ClusterBits, 21),
        (ClusterBits, 22),
        (ClusterBits, 64),
        (ClusterBits, u64::from(u32::MAX)),
        (Size, 0),
        (Size, 1),
        (Size, 511),
        (Size, l1_needed * span),
        (Size, l1_needed * span + 1),
        (Size, i64::MAX as u64),
        (Size, u64::MAX),
        (CryptMethod, 1),
        (CryptMethod, 2),
        (CryptMethod, u64::from(u32::MAX)),
        (L1Size, 0),
        (L1Size, l1_needed.saturating_sub(1)),
        (L1Size, l1_needed + 1),
        (L1Size, 4 << 20),
        (L1Size, (4 << 20) + 1),
        (L1Size, u64::from(u32::MAX)),
        (L1TableOffset, 0),
        (L1TableOffset, 512),
        (L1TableOffset, cluster),
        (L1TableOffset, eof),
        (L1TableOffset, eof + 64 * cluster),
        (L1TableOffset, 1 << 56),
        (L1TableOffset, u64::MAX),
        (RefcountTableOffset, 0),
        (RefcountTableOffset, 512),
        (RefcountTableOffset, eof),
        (RefcountTableOffset, u64::MAX),
        (RefcountTableClusters, 0),
        (RefcountTableClusters, (8 << 20) / cluster),
        (RefcountTableClusters, (8 << 20) / cluster + 1),
        (RefcountTableClusters, u64::from(u32::MAX)),
        (NbSnapshots, 1),
        (NbSnapshots, 65536),
        (NbSnapshots, 65537),
        (NbSnapshots, u64::from(u32::MAX)),
        (SnapshotsOffset, 512),
        (SnapshotsOffset, cluster),
        (SnapshotsOffset, eof),
        (IncompatibleFeatures, u64::MAX),
        (CompatibleFeatures, u64::MAX),
        (AutoclearFeatures, u64::MAX),
        (RefcountOrder, 0),
        (RefcountOrder, 6),
        (RefcountOrder, 7),
        (RefcountOrder, u64::from(u32::MAX)),
        (HeaderLength, 0),
        (HeaderLength, 72),
        (HeaderLength, 100),
        (HeaderLength, 104),
        (HeaderLength, 105),
        (HeaderLength, 120),
        (HeaderLength, cluster),
        (HeaderLength, cluster + 8),
        (HeaderLength, u64::from(u32::MAX)),
        (CompressionType, 1),
        (CompressionType, 2),
        (CompressionType, 0xff),
    ];
    for bit in 0..6 {
        values.push((IncompatibleFeatures, 1 << bit));
    }
    values.push((CompatibleFeatures, 1));
    values.push((AutoclearFeatures, 1));
    values.push((AutoclearFeatures, 2));
    if !full {
        // The fields whose meaning depends on the geometry or version.
        values.retain(|(field, _)| {
            matches!(
                field,
                ClusterBits
                    | Size
                    | L1Size
                    | L1TableOffset
                    | BackingFileOffset
                    | HeaderLength
                    | IncompatibleFeatures
                    | Version
            )
        });
    }
    let mut rng = Rng::new(name_seed(f.name));
    for field in [Size, L1Size, L1TableOffset, HeaderLength, BackingFileOffset] {
        values.push((field, rng.next_u64()));
    }
    let v3 = l.header_len != 72;
    values
        .into_iter()
        .map(|(field, value)| {
            let case = damaged(f, format!("header {field:?} = {value:#x}"), move |b| {
                put_field(b, field, value)
            });
            // As qemu-img probes: version 1 is a qcow (version 1) image, which only info
            // describes; version 0 is no format (raw); later ones are qcow2 images that
            // the limits refuse.
            if field == Version && value == 1 {
                return case.expect(Expect::Foreign("qcow images are not supported"));
            }
            // Values the limits refuse by name, whatever else the image holds.
            let refused = match field {
                ClusterBits if !(9..=21).contains(&value) => Some("cluster_bits"),
                Version if value > 3 => Some("version"),
                L1Size if value > 4 << 20 => Some("l1_size"),
                RefcountTableClusters if value * cluster > 8 << 20 => {
                    Some("refcount_table_clusters")
                }
                NbSnapshots if value > 65536 => Some("nb_snapshots"),
                HeaderLength if v3 && (value < 104 || value % 8 != 0 || value > cluster) => {
                    Some("header_length")
                }
                CryptMethod if value != 0 => Some("encrypted"),
                _ => None,
            };
            match refused {
                Some(what) => case.expect(Expect::Fails(what)),
                None => case,
            }
        })
        .collect()
}

/// Each header extension damaged in each of its parts, and extension lists that never
/// end, repeat or hold too much.
pub(crate) fn extension_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = &f.layout;
    let mut cases = Vec::new();
    let area_end = l.cluster.min(f.bytes.len() as u64);
    for (i, &(at, kind, len)) in l.exts.iter().enumerate() {
        let room = area_end - at - 8;
        let name = format!("extension {i} ({kind:#x})");
        for (what, value) in [
            ("type 0 (end)", 0u64),
            ("unknown type", 0x1234_5678),
            ("backing format type", 0xe279_2aca),
            ("data file type", 0x4441_5441),
            ("bitmaps type", 0x2385_2875),
            ("encryption type", 0x0537_be77),
        ] {
            cases.push(damaged(f, format!("{name}: {what}"), move |b| {
                put(b, at, 4, value)
            }));
        }
        for value in [
            0,
            1,
            7,
            u64::from(len) + 1,
            room,
            room + 1,
            u64::from(u32::MAX),
        ] {
            cases.push(damaged(f, format!("{name}: length {value}"), move |b| {
                put(b, at + 4, 4, value)
            }));
        }
        let data_len = u64::from(len);
        for (what, byte) in [("0xff", 0xffu8), ("zeros", 0), ("NUL-free text", b'a')] {
            cases.push(damaged(f, format!("{name}: data {what}"), move |b| {
                for x in &mut b[(at + 8) as usize..(at + 8 + data_len) as usize] {
                    *x = byte;
                }
            }));
        }
    }
    if let Some(end) = l.end_marker {
        // No end marker: the area continues with zeros (an end) or garbage.
        cases.push(damaged(f, "end marker replaced by garbage", move |b| {
            put(b, end, 8, 0x0102_0304_0506_0708)
        }));
        // The rest of the first cluster full of tiny unknown extensions: more than the
        // limit allows, each type once, then all of one type.
        let cluster = l.cluster;
        cases.push(damaged(
            f,
            "first cluster full of distinct extensions",
            move |b| {
                let mut at = end;
                let mut kind = 0x1000_0000u64;
                while at + 8 <= cluster {
                    put(b, at, 4, kind);
                    put(b, at + 4, 4, 0);
                    at += 8;
                    kind += 1;
                }
            },
        ));
        cases.push(damaged(
            f,
            "first cluster full of one extension",
            move |b| {
                let mut at = end;
                while at + 8 <= cluster {
                    put(b, at, 8, 0x1000_0000_0000_0000);
                    at += 8;
                }
            },
        ));
        // Extensions appended: a backing format of 16 bytes, a bitmaps extension with
        // its bit set, a feature table naming every bit, an extension cut by the area end.
        cases.push(damaged(f, "16-byte backing format", move |b| {
            put(b, end, 4, 0xe279_2aca);
            put(b, end + 4, 4, 16);
            b[(end + 8) as usize..(end + 24) as usize].copy_from_slice(b"qcow2qcow2qcow2q");
            put(b, end + 24, 8, 0);
        }));
        for (what, nb, dir_size, dir_offset) in [
            ("bitmaps extension, no bitmaps", 0u64, 0u64, 0u64),
            ("bitmaps extension, 65536 bitmaps", 65536, 1 << 20, cluster),
            ("bitmaps extension, huge directory", 1, u64::MAX, cluster),
            ("bitmaps extension, directory past EOF", 1, 4096, 1 << 40),
        ] {
            cases.push(damaged(f, what, move |b| {
                put(b, end, 4, 0x2385_2875);
                put(b, end + 4, 4, 24);
                put(b, end + 8, 4, nb);
                put(b, end + 12, 4, 0);
                put(b, end + 16, 8, dir_size);
                put(b, end + 24, 8, dir_offset);
                put(b, end + 32, 8, 0);
                put_field(b, HeaderField::AutoclearFeatures, 1);
            }));
        }
        cases.push(damaged(f, "feature table naming unknown bits", move |b| {
            put(b, end, 4, 0x6803_f857);
            put(b, end + 4, 4, 48 * 3);
            for (i, kind) in [0u8, 1, 2].iter().enumerate() {
                let e = (end + 8 + 48 * i as u64) as usize;
                b[e] = *kind;
                b[e + 1] = 63;
                b[e + 2..e + 48].fill(b'x');
            }
            put(b, end + 8 + 144, 8, 0);
            put_field(b, HeaderField::IncompatibleFeatures, 1 << 63);
        }));
        cases.push(damaged(
            f,
            "extension header cut by the area end",
            move |b| {
                put(b, end, 4, 0x1234_5678);
                put(b, end + 4, 4, cluster - end - 12);
                put(b, cluster - 4, 4, 0x0bad_0bad);
            },
        ));
    }
    cases
}
