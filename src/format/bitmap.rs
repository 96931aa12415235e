//! Persistent bitmaps (spec: "Bitmaps", "Bitmap directory", "Bitmap table"): the entries of
//! the bitmap directory and of bitmap tables. The bitmaps extension (extensions.rs)
//! says where the directory is and how many entries it holds.
//!
//! Every field is checked against the spec and against what QEMU loads
//! (`block/qcow2-bitmap.c`), so an image QEMU would refuse to load bitmaps from is refused
//! here with the entry and the field at fault. Decoding allocates at most in proportion to
//! the directory's own bytes.

use std::collections::HashSet;

use super::{
    BITMAP_GRANULARITY_BITS, MAX_BITMAP_DATA_BYTES, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_NAME,
    MAX_BITMAP_TABLE_ENTRIES, be16, be32, be64, put_be16, put_be32, put_be64,
};
use crate::error::{Error, Result};

/// Bits 9-55: a cluster-aligned host offset, as in L1 and L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The fixed part of a directory entry, before its extra data and name.
const ENTRY_HEADER: usize = 24;
/// The only bitmap type the spec defines.
const DIRTY_TRACKING: u8 = 1;

bitflags::bitflags! {
    /// Flags of a bitmap directory entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct BitmapFlags: u32 {
        /// The bitmap was not saved correctly and may be inconsistent.
        const IN_USE = 1 << 0;
        /// The bitmap tracks every write (it is enabled).
        const AUTO = 1 << 1;
    }
}

/// One entry of the bitmap directory, decoded and checked.
///
/// ```text
/// bytes  0- 7  bitmap_table_offset (cluster aligned)
///        8-11  bitmap_table_size (entries)
///       12-15  flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
///          16  type (1: dirty tracking)
///          17  granularity_bits
///       18-19  name_size
///       20-23  extra_data_size
///    variable  extra data, then the name (no NUL), then zeros up to a multiple of 8
/// ```
///
/// QEMU supports no extra data (so no extra_data_compatible flag either): both are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapDirectoryEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// The flags.
    pub flags: BitmapFlags,
    /// log2 of the bytes of guest data one bit stands for.
    pub granularity_bits: u8,
    /// The bitmap's name, unique in the directory.
    pub name: String,
}

impl BitmapDirectoryEntry {
    /// Bytes of guest data one bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Bytes this entry takes in the directory (a multiple of 8).
    pub fn encoded_len(&self) -> usize {
        (ENTRY_HEADER + self.name.len()).div_ceil(8) * 8
    }

    /// Encodes the entry (padded with zeros to a multiple of 8 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        put_be64(&mut out, 0, self.table_offset);
        put_be32(&mut out, 8, self.table_size);
        put_be32(&mut out, 12, self.flags.bits());
        out[16] = DIRTY_TRACKING;
        out[17] = self.granularity_bits;
        put_be16(&mut out, 18, self.name.len() as u16);
        out[ENTRY_HEADER..ENTRY_HEADER + self.name.len()].copy_from_slice(self.name.as_bytes());
        out
    }
}

/// Decodes the bitmap directory `dir`, which starts at file offset `offset` and holds
/// `nb_bitmaps` entries (the bitmaps extension's count), in an image of `cluster_size`-byte
/// clusters. The entries must fill the directory exactly, as QEMU requires.
pub fn decode_bitmap_directory(
    dir: &[u8],
    offset: u64,
    nb_bitmaps: u32,
    cluster_size: u64,
) -> Result<Vec<BitmapDirectoryEntry>> {
    let whole = |reason: String| Error::corrupt("bitmap directory", offset, reason);
    if dir.is_empty() || dir.len() as u64 > MAX_BITMAP_DIRECTORY_BYTES {
        return Err(whole(format!(
            "bitmap_directory_size {:#x} must be 1 byte to QEMU's 64 MiB",
            dir.len()
        )));
    }
    // Every entry takes at least 32 bytes: a hostile count allocates nothing beyond that.
    let mut entries = Vec::with_capacity((nb_bitmaps as usize).min(dir.len() / 32));
    let mut names = HashSet::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let index = entries.len();
        let refuse = |field: &str, value: u64, reason: &str| {
            Error::corrupt(
                "bitmap directory",
                offset + pos as u64,
                format!("entry {index}: {field} {value:#x}: {reason}"),
            )
        };
        if index as u64 >= u64::from(nb_bitmaps) {
            return Err(refuse(
                "entry",
                index as u64,
                "more entries than the bitmaps extension's nb_bitmaps",
            ));
        }
        let Some(head) = dir.get(pos..pos + ENTRY_HEADER) else {
            return Err(refuse(
                "entry",
                index as u64,
                "runs past the end of the directory",
            ));
        };
        let table_offset = be64(head, 0);
        let table_size = be32(head, 8);
        let flags = be32(head, 12);
        let (kind, granularity_bits) = (head[16], head[17]);
        let name_size = usize::from(be16(head, 18));
        let extra_size = be32(head, 20);
        if extra_size != 0 {
            return Err(refuse(
                "extra_data_size",
                extra_size.into(),
                "QEMU supports no extra data",
            ));
        }
        let name_end = pos + ENTRY_HEADER + name_size;
        let end = (ENTRY_HEADER + name_size).div_ceil(8) * 8 + pos;
        if end > dir.len() {
            return Err(refuse(
                "name_size",
                name_size as u64,
                "the entry runs past the end of the directory",
            ));
        }
        if name_size == 0 || name_size > MAX_BITMAP_NAME {
            return Err(refuse(
                "name_size",
                name_size as u64,
                "must be 1 to QEMU's 1023 bytes",
            ));
        }
        if table_offset == 0 || table_offset % cluster_size != 0 || table_offset >= 1 << 56 {
            return Err(refuse(
                "bitmap_table_offset",
                table_offset,
                "not a cluster-aligned host offset past the header",
            ));
        }
        if table_size == 0 || table_size > MAX_BITMAP_TABLE_ENTRIES {
            return Err(refuse(
                "bitmap_table_size",
                table_size.into(),
                "must be 1 to QEMU's 0x8000000 entries",
            ));
        }
        if u64::from(table_size) * cluster_size > MAX_BITMAP_DATA_BYTES {
            return Err(refuse(
                "bitmap_table_size",
                table_size.into(),
                "the bitmap's clusters exceed QEMU's 512 MiB",
            ));
        }
        let Some(flags) = BitmapFlags::from_bits(flags) else {
            return Err(refuse(
                "flags",
                flags.into(),
                "reserved bits set (QEMU knows in_use and auto only)",
            ));
        };
        if kind != DIRTY_TRACKING {
            return Err(refuse(
                "type",
                kind.into(),
                "only 1 (dirty tracking) is defined",
            ));
        }
        if !BITMAP_GRANULARITY_BITS.contains(&granularity_bits) {
            return Err(refuse(
                "granularity_bits",
                granularity_bits.into(),
                "QEMU supports 9 to 31",
            ));
        }
        let name = &dir[pos + ENTRY_HEADER..name_end];
        if dir[name_end..end].iter().any(|&b| b != 0) {
            return Err(refuse(
                "padding",
                (name_end - pos) as u64,
                "padding bytes must be zero",
            ));
        }
        if !names.insert(name) {
            return Err(refuse(
                "name",
                name_size as u64,
                "another bitmap has the same name",
            ));
        }
        entries.push(BitmapDirectoryEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name: String::from_utf8_lossy(name).into_owned(),
        });
        pos = end;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(whole(format!(
            "holds {} entries, but the bitmaps extension's nb_bitmaps is {nb_bitmaps}",
            entries.len()
        )));
    }
    // Each bitmap has a table of its own: shared tables would let a small file claim
    // many bitmaps' worth of memory, and storing one would free another's clusters.
    let mut tables: Vec<(u64, u64, usize)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let clusters = (u64::from(e.table_size) * 8).div_ceil(cluster_size);
            (e.table_offset, e.table_offset + clusters * cluster_size, i)
        })
        .collect();
    tables.sort_unstable();
    for pair in tables.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(whole(format!(
                "entries {} and {} have bitmap tables in the same clusters",
                pair[0].2.min(pair[1].2),
                pair[0].2.max(pair[1].2)
            )));
        }
    }
    Ok(entries)
}

/// Encodes a bitmap directory: the entries one after the other.
pub fn encode_bitmap_directory(entries: &[BitmapDirectoryEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(BitmapDirectoryEntry::encode)
        .collect()
}

/// Entries of the bitmap table of a bitmap over `disk_size` bytes at `1 <<
/// granularity_bits` bytes per bit, in an image of `cluster_size`-byte clusters: one per
/// cluster of bitmap data (spec: "Bitmap table"), as QEMU requires of every bitmap it
/// loads.
pub fn bitmap_table_size(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    let data_bytes = disk_size.div_ceil(1 << granularity_bits).div_ceil(8);
    data_bytes.div_ceil(cluster_size).max(1)
}

/// A raw bitmap table entry.
///
/// ```text
/// bit      0  with offset 0: the cluster reads as all ones (else all zeros); reserved
///             when an offset is set
/// bits  1- 8  reserved (0)
/// bits  9-55  host offset of the data cluster (cluster aligned); 0 = not allocated
/// bits 56-63  reserved (0)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// Host offset of the bitmap data cluster, 0 when none is allocated.
    pub fn data_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Checks the reserved bits and the offset's alignment; `Err` says what is wrong.
    pub fn check(self, cluster_size: u64) -> Result<(), &'static str> {
        if self.0 & !OFFSET_MASK & !1 != 0 {
            return Err("reserved bits set in bitmap table entry");
        }
        let data = self.data_offset();
        if data != 0 && self.0 & 1 != 0 {
            return Err("all-ones flag set on an allocated bitmap cluster");
        }
        if data % cluster_size != 0 {
            return Err("bitmap data offset not aligned to a cluster");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 65536;

    fn entry(name: &str) -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: BitmapFlags::AUTO,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    fn directory(entries: &[BitmapDirectoryEntry]) -> Vec<u8> {
        encode_bitmap_directory(entries)
    }

    #[test]
    fn a_table_has_one_entry_per_cluster_of_bitmap_data() {
        // 1 TiB at 64 KiB per bit: 2 MiB of bits, 32 clusters of 64 KiB.
        assert_eq!(bitmap_table_size(1 << 40, 16, CS), 32);
        assert_eq!(bitmap_table_size((1 << 40) + 1, 16, CS), 33);
        assert_eq!(bitmap_table_size(512, 9, 512), 1);
    }

    /// The field the decoder blames for `dir` holding `nb` entries.
    fn refused(dir: &[u8], nb: u32) -> String {
        match decode_bitmap_directory(dir, 0x40000, nb, CS) {
            Err(Error::Corrupt { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_round_trips_through_its_entries() {
        let mut entries = [entry("a"), entry("a longer name, 23 bytes"), entry("b")];
        for (i, e) in entries.iter_mut().enumerate() {
            e.table_offset += i as u64 * CS;
        }
        let dir = directory(&entries);
        assert_eq!(dir.len(), 32 + 48 + 32);
        assert_eq!(
            decode_bitmap_directory(&dir, 0x40000, 3, CS).unwrap(),
            entries
        );
    }

    #[test]
    fn each_damaged_field_is_refused_by_name() {
        let good = directory(&[entry("a")]);
        let damaged = |at: usize, bytes: &[u8]| {
            let mut d = good.clone();
            d[at..at + bytes.len()].copy_from_slice(bytes);
            d
        };
        for (dir, field) in [
            (damaged(0, &[0; 8]), "bitmap_table_offset"),
            (damaged(6, &[0x02, 0x00]), "bitmap_table_offset"),
            (damaged(8, &[0; 4]), "bitmap_table_size"),
            (damaged(8, &[0x08, 0, 0, 1]), "bitmap_table_size"),
            // 8193 clusters of 64 KiB: past QEMU's 512 MiB.
            (damaged(8, &[0, 0, 0x20, 0x01]), "bitmap_table_size"),
            (damaged(12, &[0, 0, 0, 4]), "flags"),
            (damaged(16, &[2]), "type"),
            (damaged(17, &[8]), "granularity_bits"),
            (damaged(17, &[32]), "granularity_bits"),
            (damaged(18, &[0, 0]), "name_size"),
            (damaged(18, &[0, 9]), "name_size"),
            (damaged(20, &[0, 0, 0, 8]), "extra_data_size"),
            (damaged(31, &[1]), "padding"),
        ] {
            let reason = refused(&dir, 1);
            assert!(
                reason.starts_with(&format!("entry 0: {field} ")),
                "{field}: {reason}"
            );
        }
        let names = directory(&[entry("a"), entry("a")]);
        assert!(refused(&names, 2).starts_with("entry 1: name "));
    }

    #[test]
    fn the_count_must_match_the_extension_and_the_entries_fill_the_directory() {
        let dir = directory(&[entry("a"), entry("b")]);
        assert!(refused(&dir, 1).starts_with("entry 1: entry "));
        assert!(refused(&dir, 3).starts_with("holds 2 entries"));
        assert!(refused(&dir[..40], 2).starts_with("entry 1: entry "));
        assert!(refused(&[], 0).starts_with("bitmap_directory_size"));
    }

    #[test]
    fn bitmaps_may_not_share_table_clusters() {
        let mut b = entry("b");
        b.table_offset = 0x50000;
        assert!(refused(&directory(&[entry("a"), b.clone()]), 2).starts_with("entries 0 and 1"));
        b.table_offset = 0x60000;
        assert!(decode_bitmap_directory(&directory(&[entry("a"), b]), 0x40000, 2, CS).is_ok());
    }

    #[test]
    fn a_hostile_count_allocates_nothing_beyond_the_directory() {
        // 65535 bitmaps claimed, one 32-byte entry given: refused after one entry, with
        // room reserved for one.
        let dir = directory(&[entry("a")]);
        assert!(refused(&dir, 65535).starts_with("holds 1 entries"));
    }

    #[test]
    fn bitmap_table_entries_keep_reserved_bits_clear() {
        assert_eq!(BitmapTableEntry(0x50000).check(CS), Ok(()));
        assert_eq!(BitmapTableEntry(1).check(CS), Ok(()));
        assert_eq!(BitmapTableEntry(0x50000).data_offset(), 0x50000);
        for bad in [0x50001, 0x50002, 1 << 56, 0x50200] {
            assert!(BitmapTableEntry(bad).check(CS).is_err(), "{bad:#x}");
        }
    }
}
