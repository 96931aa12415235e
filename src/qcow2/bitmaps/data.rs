//! A bitmap's contents on disk: its table and data clusters (spec: "Bitmap table",
//! "Bitmap data"), loaded into a [`DirtyBitmap`] and stored from one.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{self, BitmapDirectoryEntry, BitmapTableEntry, bitmap_table_size};

use crate::qcow2::image::Image;
use crate::qcow2::reference::ReferenceKind;
use crate::qcow2::write::Writer;

use super::dirty::DirtyBitmap;

/// Where a stored bitmap's contents went, and what its previous contents used.
pub(super) struct Stored {
    pub(super) table_offset: u64,
    pub(super) table_size: u32,
}

impl Image {
    /// Loads the contents of the bitmap `entry` describes over the current disk size.
    /// Its table must have exactly one entry per cluster of bitmap data, as QEMU requires.
    pub(crate) fn load_bitmap_data(&self, entry: &BitmapDirectoryEntry) -> Result<DirtyBitmap> {
        let cs = self.cluster_size();
        let size = self.size();
        let bad = |reason: String| Error::corrupt("bitmap table", entry.table_offset, reason);
        let expected = bitmap_table_size(size, entry.granularity_bits, cs);
        if u64::from(entry.table_size) != expected {
            return Err(bad(format!(
                "bitmap '{}' has {} table entries, but a {size}-byte disk at granularity {} \
                 needs {expected}",
                entry.name,
                entry.table_size,
                entry.granularity()
            )));
        }
        let mut bitmap = DirtyBitmap::new(size, entry.granularity_bits);
        let table = self.read_metadata(
            "bitmap table",
            entry.table_offset,
            u64::from(entry.table_size) * 8,
        )?;
        let data_len = bitmap.data_len();
        let mut cluster = vec![0u8; cs as usize];
        for (k, raw) in format::decode_u64_table(&table).into_iter().enumerate() {
            let e = BitmapTableEntry(raw);
            e.check(cs)
                .map_err(|reason| bad(format!("bitmap '{}', entry {k}: {reason}", entry.name)))?;
            let at = k as u64 * cs;
            let len = (data_len - at.min(data_len)).min(cs) as usize;
            match e.data_offset() {
                0 if raw & 1 == 0 => continue,
                0 => cluster[..len].fill(0xff),
                host => {
                    let bytes = self.read_metadata("bitmap data", host, len as u64)?;
                    cluster[..len].copy_from_slice(&bytes);
                }
            }
            bitmap.load_bytes(at, &cluster[..len]);
        }
        bitmap.set_unchanged();
        Ok(bitmap)
    }

    /// Writes `bitmap` to new clusters — data clusters for the parts that hold a dirty
    /// bit, then its table — and returns where the table is. Nothing points at them yet:
    /// the caller switches the directory ([`Image::switch_bitmap_directory`]), which makes
    /// them durable first.
    pub(super) fn store_bitmap_data(&self, w: &mut Writer, bitmap: &DirtyBitmap) -> Result<Stored> {
        let cs = self.cluster_size();
        let data_len = bitmap.data_len();
        let table_size = bitmap_table_size(bitmap.size(), bitmap.granularity_bits(), cs);
        let mut table = vec![0u64; table_size as usize];
        let mut cluster = vec![0u8; cs as usize];
        for (k, slot) in table.iter_mut().enumerate() {
            let at = k as u64 * cs;
            let len = (data_len - at.min(data_len)).min(cs) as usize;
            cluster.fill(0);
            bitmap.read_bytes(at, &mut cluster[..len]);
            if cluster.iter().all(|&b| b == 0) {
                continue;
            }
            let host = self.allocate(w, 1)?;
            self.check_overlap("bitmap data", host, cs, Some(ReferenceKind::Bitmap))?;
            self.storage
                .write_at(&cluster, host)
                .map_err(|e| self.io_error("writing bitmap data", host, e))?;
            *slot = host;
        }
        let mut bytes = vec![0u8; table.len() * 8];
        format::encode_u64_table(&table, &mut bytes);
        let table_offset = self.allocate(w, (bytes.len() as u64).div_ceil(cs))?;
        self.check_overlap(
            "a bitmap table",
            table_offset,
            bytes.len() as u64,
            Some(ReferenceKind::Bitmap),
        )?;
        self.storage
            .write_at(&bytes, table_offset)
            .map_err(|e| self.io_error("writing a bitmap table", table_offset, e))?;
        Ok(Stored {
            table_offset,
            table_size: table_size as u32,
        })
    }

    /// The host ranges `(offset, bytes)` the bitmap `entry` uses: its table and its data
    /// clusters, to free once nothing points at them. Entries that do not check out, and
    /// ranges over other metadata (a damaged table pointing at the refcount table, say),
    /// are left alone: a leak at worst, never a cluster freed that something else uses.
    pub(super) fn bitmap_clusters(&self, entry: &BitmapDirectoryEntry) -> Result<Vec<(u64, u64)>> {
        let cs = self.cluster_size();
        let len = u64::from(entry.table_size) * 8;
        let mut ranges = vec![(entry.table_offset, len)];
        let table = self.read_metadata("bitmap table", entry.table_offset, len)?;
        for raw in format::decode_u64_table(&table) {
            let e = BitmapTableEntry(raw);
            if e.check(cs).is_ok() && e.data_offset() != 0 {
                ranges.push((e.data_offset(), cs));
            }
        }
        ranges.retain(|&(offset, bytes)| !self.holds_other_metadata(offset, bytes));
        Ok(ranges)
    }

    /// Whether `offset..offset + len` overlaps metadata other than bitmaps (header, L1,
    /// L2 and refcount tables and blocks, snapshot table).
    fn holds_other_metadata(&self, offset: u64, len: u64) -> bool {
        let cb = self.geometry.cluster_bits();
        self.overlap
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .overlap(
                offset >> cb,
                (offset + len).div_ceil(self.cluster_size()),
                Some(ReferenceKind::Bitmap),
            )
            .is_some()
    }
}
