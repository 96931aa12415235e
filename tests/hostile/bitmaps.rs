//! Cases: persistent bitmaps damaged (spec: "Bitmaps extension", "Bitmap directory",
//! "Bitmap table") — each field of the extension and of every directory entry, the
//! entries of the bitmap tables, and the autoclear bit that makes them live. Labels start
//! with "bitmap " (the report's category).

use std::sync::Arc;

use crate::common::HeaderField;
use crate::fixtures::{Fixture, damaged};
use crate::layout::{OFFSET_MASK, get, put, put_field};
use crate::runner::{Case, Expect};

/// Every damaged-bitmap case of `f`, a fixture with bitmaps.
pub(crate) fn bitmap_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = &f.layout;
    let bm = l.bitmaps.clone().expect("a fixture with bitmaps");
    let cluster = l.cluster;
    let eof = (f.bytes.len() as u64).div_ceil(cluster) * cluster;
    let mut cases = Vec::new();
    let field = |what: String, at: u64, width: usize, value: u64| {
        damaged(f, format!("bitmap {what} = {value:#x}"), move |b| {
            put(b, at, width, value)
        })
    };

    // The extension.
    let ext = bm.ext_data;
    let n = bm.nb_bitmaps;
    for value in [0, n - 1, n + 1, 65535, 65536, u64::from(u32::MAX)] {
        cases.push(field("extension nb_bitmaps".into(), ext, 4, value));
    }
    cases.push(field("extension reserved".into(), ext + 4, 4, 1));
    let size = bm.directory_size;
    let last = bm.entries.last().unwrap().len;
    for value in [
        0,
        8,
        size - 8,
        size - last,
        size + 8,
        size + cluster,
        64 << 20,
        (64 << 20) + 1,
        u64::MAX,
    ] {
        cases.push(field("extension directory size".into(), ext + 8, 8, value));
    }
    let dir = bm.directory_offset;
    for value in [
        0,
        8,
        dir + 8,
        dir + 512,
        eof,
        eof + 64 * cluster,
        1 << 56,
        u64::MAX,
        l.l1_offset,
        l.refcount_table,
    ] {
        cases.push(field(
            "extension directory offset".into(),
            ext + 16,
            8,
            value,
        ));
    }

    // Each directory entry, field by field.
    let dir_end = dir + size;
    for (i, e) in bm.entries.iter().enumerate() {
        let at = e.at;
        let old = e.table_offset;
        for value in [
            0,
            old + 512,
            old + 1,
            eof,
            eof + 4 * cluster,
            OFFSET_MASK & !(cluster - 1),
            old | 1 << 56,
            u64::MAX,
            l.l1_offset,
            l.refcount_table,
            dir & !(cluster - 1),
        ] {
            cases.push(field(format!("{i} table offset"), at, 8, value));
        }
        // 1 entry is what the 4 MiB disk needs; 0x2000 clusters of 64 KiB are QEMU's
        // 512 MiB; 0x8000000 entries QEMU's table limit.
        for value in [0, 2, 0x2000, 0x2001, 0x800_0000, 0x800_0001, 0xffff_ffff] {
            cases.push(field(format!("{i} table size"), at + 8, 4, value));
        }
        for value in [0, 1, 2, 3, 4, 6, 0x8000_0002, 0xffff_ffff] {
            cases.push(field(format!("{i} flags"), at + 12, 4, value));
        }
        for value in [0, 2, 0xff] {
            cases.push(field(format!("{i} type"), at + 16, 1, value));
        }
        for value in [0, 8, 9, 16, 31, 32, 63, 0xff] {
            cases.push(field(format!("{i} granularity bits"), at + 17, 1, value));
        }
        let name_len = e.name.len() as u64;
        for value in [
            0,
            1,
            name_len + 1,
            name_len + 7,
            dir_end - at - 24,
            dir_end - at - 23,
            1023,
            1024,
            0xffff,
        ] {
            cases.push(field(format!("{i} name size"), at + 18, 2, value));
        }
        for value in [1, 8, name_len, 0xffff_ffff] {
            cases.push(field(format!("{i} extra data size"), at + 20, 4, value));
        }
        let name = at + 24;
        let padding = name + name_len;
        if padding < at + e.len {
            cases.push(damaged(
                f,
                format!("bitmap {i} padding not zero"),
                move |b| put(b, padding, 1, 1),
            ));
        }
        for (what, byte) in [("0xff", 0xffu8), ("NUL", 0), ("'/'", b'/')] {
            cases.push(damaged(
                f,
                format!("bitmap {i} name bytes {what}"),
                move |b| b[name as usize..(name + name_len) as usize].fill(byte),
            ));
        }
        if i > 0 {
            let first = bm.entries[0].clone();
            if first.name.len() == e.name.len() {
                cases.push(damaged(
                    f,
                    format!("bitmap {i} name duplicates bitmap 0's"),
                    move |b| {
                        b[name as usize..(name + name_len) as usize].copy_from_slice(&first.name)
                    },
                ));
            }
            // The entry's table shared with bitmap 0.
            let table = first.table_offset;
            cases.push(damaged(
                f,
                format!("bitmap {i} table shared with bitmap 0"),
                move |b| put(b, at, 8, table),
            ));
        }
        // The table's entries: the first, allocated or not, and each data cluster entry.
        let mut picks = vec![e.table_offset];
        picks.extend(e.data_entries.iter().copied());
        picks.dedup();
        for t in picks {
            let old = get(&f.bytes, t, 8);
            let host = old & OFFSET_MASK;
            for (what, value) in [
                ("zero", 0),
                ("all-ones flag", 1),
                ("all-ones flag with offset", old | 1),
                ("reserved bit 1", old | 2),
                ("reserved bit 8", old | 0x100),
                ("reserved bit 56", old | 1 << 56),
                ("unaligned offset", (old | 512) & !1),
                ("offset past EOF", eof + 4 * cluster),
                ("offset far past EOF", OFFSET_MASK & !(cluster - 1)),
                ("offset at the L1 table", l.l1_offset & !(cluster - 1)),
                ("offset at the refcount table", l.refcount_table),
                ("offset at the directory", dir & !(cluster - 1)),
                ("all ones", u64::MAX),
            ] {
                cases.push(damaged(
                    f,
                    format!("bitmap {i} table entry at {t:#x} {what}"),
                    move |b| put(b, t, 8, value),
                ));
            }
            if host != 0 {
                cases.push(damaged(
                    f,
                    format!("bitmap {i} data at {host:#x} all ones"),
                    move |b| b[host as usize..(host + cluster) as usize].fill(0xff),
                ));
            }
        }
    }

    // The directory as a whole.
    for (what, byte) in [("zeroed", 0u8), ("all 0xff", 0xff)] {
        cases.push(damaged(f, format!("bitmap directory {what}"), move |b| {
            b[dir as usize..(dir + size) as usize].fill(byte)
        }));
    }
    cases.push(damaged(f, "bitmap directory cut by EOF", move |b| {
        b.truncate((dir + size / 2) as usize)
    }));
    // Without the autoclear bit the bitmaps are stale: QEMU ignores them (and drops them
    // when it writes), and so does every command here.
    cases.push(
        damaged(f, "bitmap autoclear bit cleared", |b| {
            put_field(b, HeaderField::AutoclearFeatures, 0)
        })
        .expect(Expect::Success),
    );
    cases
}
