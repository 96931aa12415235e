//! Cases: the tables an image is read through damaged — L1 and L2 entries, compressed
//! cluster descriptors and data, the refcount structures, the snapshot table.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common::Rng;
use crate::fixtures::{Fixture, damaged};
use crate::layout::{OFFSET_MASK, get, put};
use crate::runner::{Case, Expect};

/// The active L1 table's entries set to values that point nowhere sensible.
pub(crate) fn l1_cases(f: &Arc<Fixture>, entries: usize) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    // Every allocated entry's index, plus one unallocated one.
    let mut indices: Vec<u64> = (0..l.l1_entries)
        .filter(|&i| get(&f.bytes, l.l1_offset + 8 * i, 8) != 0)
        .collect();
    if let Some(free) = (0..l.l1_entries).find(|&i| get(&f.bytes, l.l1_offset + 8 * i, 8) == 0) {
        indices.push(free);
    }
    for i in indices.into_iter().take(entries) {
        let at = l.l1_offset + 8 * i;
        let old = get(&f.bytes, at, 8);
        for (what, value) in [
            ("zero", 0),
            ("unaligned", (old | 512) & !(1 << 63)),
            ("reserved bit 1", old | 2),
            ("reserved bit 56", old | 1 << 56),
            ("COPIED toggled", old ^ 1 << 63),
            ("past EOF", eof + 4 * l.cluster),
            ("far past EOF", OFFSET_MASK & !(l.cluster - 1)),
            ("at the L1 table", l.l1_offset & !(l.cluster - 1)),
            ("at the refcount table", l.refcount_table),
            ("at cluster 1", l.cluster),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(f, format!("L1[{i}] {what}"), move |b| {
                put(b, at, 8, value)
            }));
        }
    }
    cases
}

/// L2 entries (and extended L2 bitmaps) set to corrupt values.
pub(crate) fn l2_cases(f: &Arc<Fixture>, per_table: usize) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    let mut picks: Vec<u64> = l.l2_entries.iter().copied().take(per_table).collect();
    if let Some(&t) = l.l2_tables.first() {
        // An unallocated entry near the end of the first table.
        let entry = if l.extended_l2 { 16 } else { 8 };
        let last = t + l.cluster - entry;
        if !picks.contains(&last) {
            picks.push(last);
        }
    }
    for at in picks {
        let old = get(&f.bytes, at, 8);
        let host = old & OFFSET_MASK;
        for (what, value) in [
            ("zero", 0),
            ("zero flag", 1),
            ("zero flag with host", old | 1),
            ("unaligned host", (old | 512) & !(1 << 62)),
            ("reserved bit 1", old | 2),
            ("reserved bit 56", old | 1 << 56),
            ("reserved bit 61", old | 1 << 61),
            ("compressed flag", old | 1 << 62),
            ("COPIED toggled", old ^ 1 << 63),
            ("host past EOF", 1 << 63 | (eof + 8 * l.cluster)),
            (
                "host far past EOF",
                1 << 63 | (OFFSET_MASK & !(l.cluster - 1)),
            ),
            ("host 0 with COPIED", 1 << 63),
            (
                "host at the L1 table",
                1 << 63 | (l.l1_offset & !(l.cluster - 1)),
            ),
            ("host + 1 cluster", 1 << 63 | (host + l.cluster)),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(
                f,
                format!("L2 entry at {at:#x} {what}"),
                move |b| put(b, at, 8, value),
            ));
        }
        if l.extended_l2 {
            let bitmap = at + 8;
            for (what, value) in [
                ("bitmap alloc and zero", 0x0000_0001_0000_0001u64),
                ("bitmap all allocated", 0xffff_ffff),
                ("bitmap all zero", 0xffff_ffff_0000_0000),
                ("bitmap all ones", u64::MAX),
                ("bitmap cleared", 0),
            ] {
                cases.push(damaged(
                    f,
                    format!("L2 entry at {at:#x} {what}"),
                    move |b| put(b, bitmap, 8, value),
                ));
            }
        }
    }
    cases
}

/// Compressed cluster descriptors pointing outside the file, into the header, at sizes
/// past their limits, and compressed data that does not decompress.
pub(crate) fn compressed_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let shift = 62 - (l.cluster_bits - 8);
    let offset_mask = (1u64 << shift) - 1;
    let len = f.bytes.len() as u64;
    let mut cases = Vec::new();
    let picks: Vec<u64> = [
        l.compressed.first(),
        l.compressed.get(l.compressed.len() / 2),
        l.compressed.last(),
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect::<BTreeSet<_>>()
    .into_iter()
    .collect();
    for at in picks {
        let old = get(&f.bytes, at, 8);
        let host = old & offset_mask;
        let sectors = old >> shift & ((1 << (l.cluster_bits - 8)) - 1);
        let with = move |h: u64, s: u64| 1 << 62 | s << shift | (h & offset_mask);
        for (what, value) in [
            ("most sectors", with(host, (1 << (l.cluster_bits - 8)) - 1)),
            ("one sector", with(host, 0)),
            ("host + 1", with(host + 1, sectors)),
            ("host - 1", with(host.saturating_sub(1), sectors)),
            ("host in the header", with(0, sectors)),
            ("host 100", with(100, sectors)),
            ("host at EOF - 10", with(len - 10, sectors)),
            ("host past EOF", with(len + l.cluster, sectors)),
            ("host at offset field max", with(offset_mask, sectors)),
            ("COPIED set", old | 1 << 63),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(
                f,
                format!("compressed entry at {at:#x}: {what}"),
                move |b| put(b, at, 8, value),
            ));
        }
        // The compressed stream itself: garbage, and cut short by zeros.
        let data = host as usize;
        for (what, seed) in [("garbage stream", 1u64), ("stream start zeroed", 0)] {
            cases.push(damaged(
                f,
                format!("compressed data at {host:#x}: {what}"),
                move |b| {
                    let end = (data + 256).min(b.len());
                    if seed == 0 {
                        b[data..end].fill(0);
                    } else {
                        let mut rng = Rng::new(seed);
                        b[data..end].copy_from_slice(&rng.bytes(end - data));
                    }
                },
            ));
        }
    }
    cases
}

/// Refcount structures damaged: read-only commands never need them.
pub(crate) fn refcount_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let mut cases = Vec::new();
    for (what, value) in [
        ("zero", 0),
        ("unaligned", l.refcount_blocks[0] | 512),
        ("past EOF", 1 << 40),
        ("all ones", u64::MAX),
    ] {
        let at = l.refcount_table;
        cases.push(
            damaged(f, format!("refcount table entry 0 {what}"), move |b| {
                put(b, at, 8, value)
            })
            .expect(Expect::Success),
        );
    }
    let block = l.refcount_blocks[0] as usize;
    let cluster = l.cluster as usize;
    cases.push(
        damaged(f, "refcount block all 0xff", move |b| {
            b[block..block + cluster].fill(0xff)
        })
        .expect(Expect::Success),
    );
    cases.push(
        damaged(f, "refcount block zeroed", move |b| {
            b[block..block + cluster].fill(0)
        })
        .expect(Expect::Success),
    );
    cases
}

/// Snapshot table fields and snapshot L1 tables damaged.
pub(crate) fn snapshot_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let eof = (f.bytes.len() as u64).div_ceil(l.cluster) * l.cluster;
    let mut cases = Vec::new();
    for (i, &(at, len)) in l.snapshots.iter().enumerate() {
        let fields: &[(&str, u64, usize, &[u64])] = &[
            ("l1_table_offset", 0, 8, &[0, 512, eof, 1 << 56, u64::MAX]),
            ("l1_size", 8, 4, &[0, 1 << 22, (1 << 22) + 1, 0xffff_ffff]),
            ("id_str_size", 12, 2, &[0, 1000, 0xffff]),
            ("name_size", 14, 2, &[0, 1000, 0xffff]),
            ("date", 16, 8, &[u64::MAX]),
            ("vm_clock_nsec", 24, 8, &[u64::MAX]),
            ("vm_state_size", 32, 4, &[0xffff_ffff]),
            (
                "extra_data_size",
                36,
                4,
                &[0, 7, 8, 1024, 1025, 0xffff_ffff],
            ),
        ];
        for &(field, offset, width, values) in fields {
            for &value in values {
                cases.push(damaged(
                    f,
                    format!("snapshot {i} {field} = {value:#x}"),
                    move |b| put(b, at + offset, width, value),
                ));
            }
        }
        cases.push(damaged(
            f,
            format!("snapshot {i} name bytes 0xff"),
            move |b| {
                let end = (at + len) as usize;
                let start = end.saturating_sub(8);
                b[start..end].fill(0xff);
            },
        ));
    }
    for (i, &(l1, _)) in l.snapshot_l1s.iter().enumerate() {
        for (what, value) in [
            ("past EOF", 1u64 << 40),
            ("unaligned", 512),
            ("all ones", u64::MAX),
        ] {
            cases.push(damaged(f, format!("snapshot {i} L1[0] {what}"), move |b| {
                put(b, l1, 8, value)
            }));
        }
    }
    // The table cut by the end of the file.
    let (last, _) = *l.snapshots.last().unwrap();
    cases.push(damaged(f, "snapshot table cut by EOF", move |b| {
        b.truncate(last as usize + 20)
    }));
    cases
}
