//! Overlap checks before writes (QEMU's `overlap-check=cached`): an inconsistent image —
//! a refcount that calls a table's cluster free, an L2 entry that points into metadata —
//! must never get data or a table written over its header, L1 tables, active L2 tables,
//! refcount table and blocks, snapshot table, bitmap directory or bitmap tables. On detection the image is marked corrupt
//! (the header's corrupt bit) and the write fails; `check -r all` is the way back.
//!
//! The map of metadata clusters is rebuilt from memory (no I/O) whenever the writer
//! publishes metadata (every checkpoint, snapshot operation, resize, amend, repair); L2
//! tables allocated in between are added as they are allocated. Inactive L2 tables (those
//! only snapshots use) are not in it, as in QEMU's default mode: finding them means
//! reading every snapshot's L1 table.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{IncompatibleFeatures, L1Entry};

use super::image::Image;
use super::overlap_map::MetadataMap;
use super::reference::ReferenceKind;
use super::write::Writer;

impl Image {
    /// Rebuilds the metadata map from the header, the L1 table, the writer's refcount
    /// table and the snapshot table.
    pub(crate) fn refresh_overlap_map(&self, w: &Writer) {
        let cb = self.geometry.cluster_bits();
        let cs = self.cluster_size();
        let clusters = |offset: u64, len: u64| (offset >> cb, (offset + len).div_ceil(cs));
        let mut map = MetadataMap::default();
        map.add(0, 1, ReferenceKind::Header);
        let meta = self.meta();
        let header = &meta.header;
        let (a, b) = clusters(header.l1_table_offset, meta.l1.len() as u64 * 8);
        map.add(a, b, ReferenceKind::L1Table);
        for &raw in &meta.l1 {
            let l2 = L1Entry(raw).l2_offset();
            if l2 != 0 {
                map.add(l2 >> cb, (l2 >> cb) + 1, ReferenceKind::L2Table);
            }
        }
        let table = w.refcounts.table_location();
        let (a, b) = clusters(table.offset, u64::from(table.clusters) * cs);
        map.add(a, b, ReferenceKind::RefcountTable);
        for block in w.refcounts.block_offsets() {
            map.add(block >> cb, (block >> cb) + 1, ReferenceKind::RefcountBlock);
        }
        if !meta.snapshots.is_empty() {
            let len = crate::format::snapshot_table_len(&meta.snapshots);
            let (a, b) = clusters(header.snapshots_offset, len);
            map.add(a, b, ReferenceKind::SnapshotTable);
        }
        for s in &meta.snapshots {
            let (a, b) = clusters(s.l1_table_offset, u64::from(s.l1_size) * 8);
            map.add(a, b, ReferenceKind::L1Table);
        }
        // QEMU guards the bitmap directory; the tables too cost nothing here, and data
        // written over one would lose every bitmap on the next open.
        if let Some(ext) = meta.extensions.bitmaps() {
            let (a, b) = clusters(ext.directory_offset, ext.directory_size);
            map.add(a, b, ReferenceKind::Bitmap);
        }
        for &(offset, len) in &meta.bitmap_tables {
            let (a, b) = clusters(offset, len);
            map.add(a, b, ReferenceKind::Bitmap);
        }
        drop(meta);
        *self.overlap.write().unwrap_or_else(PoisonError::into_inner) = map;
    }

    /// Adds a newly allocated L2 table to the map.
    pub(crate) fn note_new_l2_table(&self, offset: u64) {
        let c = offset >> self.geometry.cluster_bits();
        self.overlap
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(c, c + 1, ReferenceKind::L2Table);
    }

    /// Fails, marking the image corrupt, if writing `len` bytes of `what` at `offset`
    /// would overwrite metadata other than `allowed` (the kind being written).
    pub(crate) fn check_overlap(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        allowed: Option<ReferenceKind>,
    ) -> Result<()> {
        if len == 0 || self.data_file.is_some() && allowed.is_none() {
            // Guest data in an external data file cannot hit this file's metadata.
            return Ok(());
        }
        let cb = self.geometry.cluster_bits();
        let found = self
            .overlap
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .overlap(
                offset >> cb,
                (offset + len).div_ceil(self.cluster_size()),
                allowed,
            );
        let Some((cluster, kind)) = found else {
            return Ok(());
        };
        let reason = format!(
            "prevented a write of {what} at {offset:#x} over the {} in cluster {cluster}; \
             the image is now marked corrupt (check -r all repairs it)",
            kind.name()
        );
        // Best effort: the write is refused whether or not the mark reaches the disk.
        self.meta_mut().header.incompatible_features |= IncompatibleFeatures::CORRUPT;
        if self.header().version >= 3 {
            let _ = self.write_header().and_then(|()| self.sync());
        }
        Err(Error::corrupt("image", offset, reason))
    }
}
