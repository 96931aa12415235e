//! The bitmap directory: read as QEMU reads it, and replaced in one step.
//!
//! A changed directory is never written over the old one: it goes to new clusters, and one
//! write of the first cluster switches the bitmaps extension to it (spec: "Bitmaps
//! extension"). A crash before that write leaves the old directory, after it the new one;
//! the clusters the old one used are freed only then.

use crate::error::Result;
use crate::format::{
    AutoclearFeatures, BitmapDirectoryEntry, BitmapsExtension, HeaderExtension,
    decode_bitmap_directory, encode_bitmap_directory,
};

use crate::qcow2::image::Image;
use crate::qcow2::reference::ReferenceKind;
use crate::qcow2::write::Writer;

impl Image {
    /// The bitmaps extension, when QEMU would read it: version 3 with the autoclear
    /// bitmaps bit set (a program without bitmap support clears it, and the bitmaps are
    /// then stale).
    pub(crate) fn live_bitmaps_extension(&self) -> Option<BitmapsExtension> {
        let meta = self.meta();
        if meta.header.version < 3
            || !meta
                .header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
        {
            return None;
        }
        meta.extensions.bitmaps()
    }

    /// The bitmap directory as on disk, decoded and checked; empty without live bitmaps.
    pub(crate) fn read_bitmap_directory(&self) -> Result<Vec<BitmapDirectoryEntry>> {
        let Some(ext) = self.live_bitmaps_extension() else {
            return Ok(Vec::new());
        };
        let dir =
            self.read_metadata("bitmap directory", ext.directory_offset, ext.directory_size)?;
        decode_bitmap_directory(
            &dir,
            ext.directory_offset,
            ext.nb_bitmaps,
            self.cluster_size(),
        )
    }

    /// Makes `entries` the bitmap directory: written to new clusters, made durable with
    /// everything written before it (bitmap tables and data the entries point at), then
    /// switched to by one write of the first cluster. Afterwards the old directory and
    /// `frees` (host `(offset, bytes)` ranges the old entries used) are freed.
    ///
    /// `switched` runs once the new directory is live, before the frees: the caller's
    /// in-memory bitmaps must follow the disk even when freeing then fails (a corrupt
    /// refcount), or a retry would write the same change twice.
    pub(super) fn switch_bitmap_directory(
        &self,
        w: &mut Writer,
        entries: &[BitmapDirectoryEntry],
        frees: &[(u64, u64)],
        switched: impl FnOnce(),
    ) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let old = self.live_bitmaps_extension();
        let new = if entries.is_empty() {
            None
        } else {
            let bytes = encode_bitmap_directory(entries);
            let at = self.allocate(w, (bytes.len() as u64).div_ceil(cs))?;
            self.check_overlap(
                "the bitmap directory",
                at,
                bytes.len() as u64,
                Some(ReferenceKind::Bitmap),
            )?;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_error("writing the bitmap directory", at, e))?;
            Some(BitmapsExtension {
                nb_bitmaps: entries.len() as u32,
                directory_size: bytes.len() as u64,
                directory_offset: at,
            })
        };
        // Tables, data, the directory and their refcounts on disk before anything points
        // at them.
        self.checkpoint(w)?;
        {
            let mut meta = self.meta_mut();
            let list = &mut meta.extensions.list;
            let slot = list
                .iter()
                .position(|e| matches!(e, HeaderExtension::Bitmaps(_)));
            match (slot, new) {
                (Some(i), Some(ext)) => list[i] = HeaderExtension::Bitmaps(ext),
                (None, Some(ext)) => list.push(HeaderExtension::Bitmaps(ext)),
                (Some(i), None) => {
                    list.remove(i);
                }
                (None, None) => {}
            }
            meta.header
                .autoclear_features
                .set(AutoclearFeatures::BITMAPS, new.is_some());
            meta.bitmap_tables = table_ranges(entries);
        }
        self.write_header_cluster()?;
        switched();
        if let Some(old) = old {
            let clusters = old.directory_size.div_ceil(cs);
            self.queue_free(w, old.directory_offset >> cb, clusters);
        }
        for &(offset, bytes) in frees {
            self.queue_free(w, offset >> cb, bytes.div_ceil(cs));
        }
        self.checkpoint(w)
    }
}

/// Each entry's bitmap table as `(offset, bytes)`.
pub(super) fn table_ranges(entries: &[BitmapDirectoryEntry]) -> Vec<(u64, u64)> {
    entries
        .iter()
        .map(|e| (e.table_offset, u64::from(e.table_size) * 8))
        .collect()
}
