//! Where an image's structures are, read from its bytes by the spec alone (not through the
//! library under test), and the big-endian byte helpers that damage them. Shared with
//! `tests/hostile_memory.rs`.

use std::collections::BTreeSet;

use crate::common::HeaderField;

pub(crate) fn get(b: &[u8], at: u64, width: usize) -> u64 {
    let at = at as usize;
    b.get(at..at + width)
        .map(|s| s.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
        .unwrap_or(0)
}

pub(crate) fn put(b: &mut Vec<u8>, at: u64, width: usize, value: u64) {
    let at = at as usize;
    if b.len() < at + width {
        b.resize(at + width, 0);
    }
    for i in 0..width {
        b[at + i] = (value >> (8 * (width - 1 - i))) as u8;
    }
}

pub(crate) fn put_field(b: &mut Vec<u8>, field: HeaderField, value: u64) {
    let (at, width) = field.location();
    let value = if width == 8 {
        value
    } else {
        value & ((1 << (8 * width)) - 1)
    };
    put(b, at, width, value);
}

/// Bits 9-55: the offset in L1 entries, standard L2 entries and refcount table entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where an image's structures are, read from its bytes by the spec alone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    pub(crate) cluster: u64,
    pub(crate) cluster_bits: u64,
    pub(crate) header_len: u64,
    pub(crate) extended_l2: bool,
    /// Extensions: offset of the 8-byte extension header, type, length.
    pub(crate) exts: Vec<(u64, u32, u32)>,
    /// Offset of the end marker, if there is one.
    pub(crate) end_marker: Option<u64>,
    pub(crate) l1_offset: u64,
    pub(crate) l1_entries: u64,
    /// L2 tables of the active L1 table.
    pub(crate) l2_tables: Vec<u64>,
    /// File offsets of non-zero L2 entries (the first word with extended L2).
    pub(crate) l2_entries: Vec<u64>,
    /// File offsets of compressed L2 entries.
    pub(crate) compressed: Vec<u64>,
    pub(crate) refcount_table: u64,
    pub(crate) refcount_table_bytes: u64,
    pub(crate) refcount_blocks: Vec<u64>,
    /// Snapshot table entries: offset, and their length.
    pub(crate) snapshots: Vec<(u64, u64)>,
    /// Snapshot L1 tables: offset and entries.
    pub(crate) snapshot_l1s: Vec<(u64, u64)>,
    /// The bitmaps extension, when there is one.
    pub(crate) bitmaps: Option<BitmapsLayout>,
}

/// The bitmaps extension's type.
pub(crate) const BITMAPS_EXTENSION: u32 = 0x2385_2875;

/// Where an image's bitmaps are (spec: "Bitmaps extension", "Bitmap directory").
#[derive(Debug, Clone, Default)]
pub(crate) struct BitmapsLayout {
    /// File offset of the extension's data: nb_bitmaps at +0, reserved at +4,
    /// bitmap_directory_size at +8, bitmap_directory_offset at +16.
    pub(crate) ext_data: u64,
    pub(crate) nb_bitmaps: u64,
    pub(crate) directory_size: u64,
    pub(crate) directory_offset: u64,
    pub(crate) entries: Vec<BitmapEntryLayout>,
}

/// One bitmap directory entry, and its table.
#[derive(Debug, Clone, Default)]
pub(crate) struct BitmapEntryLayout {
    /// File offset of the entry: bitmap_table_offset at +0, bitmap_table_size at +8,
    /// flags at +12, type at +16, granularity_bits at +17, name_size at +18,
    /// extra_data_size at +20, then extra data and the name from +24.
    pub(crate) at: u64,
    /// Bytes the entry takes (a multiple of 8).
    pub(crate) len: u64,
    pub(crate) name: Vec<u8>,
    pub(crate) table_offset: u64,
    pub(crate) table_size: u64,
    /// File offsets of the table's entries that point at a data cluster.
    pub(crate) data_entries: Vec<u64>,
}

impl BitmapsLayout {
    fn parse(b: &[u8], ext_data: u64) -> BitmapsLayout {
        let mut l = BitmapsLayout {
            ext_data,
            nb_bitmaps: get(b, ext_data, 4),
            directory_size: get(b, ext_data + 8, 8),
            directory_offset: get(b, ext_data + 16, 8),
            entries: Vec::new(),
        };
        let end = l.directory_offset + l.directory_size;
        let mut at = l.directory_offset;
        while at + 24 <= end && (l.entries.len() as u64) < l.nb_bitmaps {
            let name_size = get(b, at + 18, 2);
            let extra = get(b, at + 20, 4);
            let len = (24 + extra + name_size).div_ceil(8) * 8;
            let name_at = (at + 24 + extra) as usize;
            let table_offset = get(b, at, 8);
            let table_size = get(b, at + 8, 4);
            let data_entries = (0..table_size.min(1 << 16))
                .map(|i| table_offset + 8 * i)
                .filter(|&e| get(b, e, 8) & OFFSET_MASK != 0)
                .collect();
            l.entries.push(BitmapEntryLayout {
                at,
                len,
                name: b
                    .get(name_at..name_at + name_size as usize)
                    .unwrap_or_default()
                    .to_vec(),
                table_offset,
                table_size,
                data_entries,
            });
            at += len;
        }
        l
    }
}

impl Layout {
    pub(crate) fn parse(b: &[u8]) -> Layout {
        let version = get(b, 4, 4);
        let cluster_bits = get(b, 20, 4);
        let cluster = 1u64 << cluster_bits;
        let header_len = if version >= 3 { get(b, 100, 4) } else { 72 };
        let extended_l2 = version >= 3 && get(b, 72, 8) & 16 != 0;
        let backing = get(b, 8, 8);
        let ext_end = if backing != 0 { backing } else { cluster };
        let mut l = Layout {
            cluster,
            cluster_bits,
            header_len,
            extended_l2,
            ..Layout::default()
        };
        let mut pos = header_len;
        while pos + 8 <= ext_end {
            let (kind, len) = (get(b, pos, 4) as u32, get(b, pos + 4, 4) as u32);
            if kind == 0 {
                l.end_marker = Some(pos);
                break;
            }
            l.exts.push((pos, kind, len));
            if kind == BITMAPS_EXTENSION && len >= 24 {
                l.bitmaps = Some(BitmapsLayout::parse(b, pos + 8));
            }
            pos += 8 + u64::from(len).div_ceil(8) * 8;
        }
        l.l1_offset = get(b, 40, 8);
        l.l1_entries = get(b, 36, 4);
        let entry_bytes = if extended_l2 { 16 } else { 8 };
        let mut tables = BTreeSet::new();
        for i in 0..l.l1_entries {
            let l2 = get(b, l.l1_offset + 8 * i, 8) & OFFSET_MASK;
            if l2 != 0 {
                tables.insert(l2);
            }
        }
        l.l2_tables = tables.into_iter().collect();
        for &t in &l.l2_tables {
            for i in 0..cluster / entry_bytes {
                let at = t + i * entry_bytes;
                let e = get(b, at, 8);
                if e != 0 || (extended_l2 && get(b, at + 8, 8) != 0) {
                    l.l2_entries.push(at);
                }
                if e & 1 << 62 != 0 {
                    l.compressed.push(at);
                }
            }
        }
        l.refcount_table = get(b, 48, 8);
        l.refcount_table_bytes = get(b, 56, 4) * cluster;
        for i in 0..l.refcount_table_bytes / 8 {
            let block = get(b, l.refcount_table + 8 * i, 8);
            if block != 0 {
                l.refcount_blocks.push(block);
            }
        }
        let mut at = get(b, 64, 8);
        for _ in 0..get(b, 60, 4) {
            let len =
                (40 + get(b, at + 36, 4) + get(b, at + 12, 2) + get(b, at + 14, 2)).div_ceil(8) * 8;
            l.snapshots.push((at, len));
            l.snapshot_l1s.push((get(b, at, 8), get(b, at + 8, 4)));
            at += len;
        }
        l
    }

    /// The metadata ranges (offset, length) random flips land in.
    pub(crate) fn metadata(&self) -> Vec<(u64, u64)> {
        let ext_end = self
            .end_marker
            .map(|e| e + 8)
            .unwrap_or(self.header_len + 64);
        let mut r = vec![(0, ext_end), (self.l1_offset, self.l1_entries * 8)];
        r.extend(self.l2_tables.iter().map(|&t| (t, self.cluster)));
        r.push((self.refcount_table, self.refcount_table_bytes.min(4096)));
        r.extend(
            self.refcount_blocks
                .iter()
                .map(|&t| (t, self.cluster.min(4096))),
        );
        r.extend(self.snapshots.iter().copied());
        r.extend(self.snapshot_l1s.iter().map(|&(o, n)| (o, n * 8)));
        if let Some(bitmaps) = &self.bitmaps {
            r.push((bitmaps.directory_offset, bitmaps.directory_size));
            r.extend(
                bitmaps
                    .entries
                    .iter()
                    .map(|e| (e.table_offset, e.table_size * 8)),
            );
        }
        r.retain(|&(_, len)| len > 0);
        r
    }
}
