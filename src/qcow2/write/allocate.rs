//! Allocating host clusters, and switching the header to a refcount table that grew.

use std::sync::atomic::Ordering;

use crate::error::Result;

use crate::qcow2::image::Image;

use super::state::Writer;

impl Image {
    /// Allocates `count` contiguous clusters in the image file and returns the first's
    /// offset; a moved refcount table is committed to the header at once.
    pub(crate) fn allocate(&self, w: &mut Writer, count: u64) -> Result<u64> {
        let at = {
            let overlap = self.overlap.read().unwrap_or_else(|e| e.into_inner());
            w.refcounts.allocate(&*self.storage, count, &|first, end| {
                overlap.overlap(first, end, None).map(|(c, _)| c)
            })?
        };
        let end = at + (count << self.geometry.cluster_bits());
        // Refcounts that call metadata free would hand it out again.
        self.check_overlap("newly allocated clusters", at, end - at, None)?;
        self.file_len.fetch_max(end, Ordering::Relaxed);
        self.publish_table_move(w)?;
        // Blocks and a table written by a table growth may have extended the file; reads
        // of metadata past the old end must see the new length. (Asked only then: it is a
        // system call, and this runs for every allocation.)
        if std::mem::take(&mut w.refcounts.grew) {
            if let Ok(len) = self.storage.len() {
                self.file_len.fetch_max(len, Ordering::Relaxed);
            }
        }
        Ok(at)
    }

    /// Switches the header to a refcount table that moved (written and flushed already),
    /// then frees the old table. Retried by the next checkpoint when the header write
    /// failed: until the header names the new table, nothing may be written to it.
    pub(super) fn publish_table_move(&self, w: &mut Writer) -> Result<()> {
        if !w.refcounts.header_changed {
            return Ok(());
        }
        let location = w.refcounts.table_location();
        {
            let mut meta = self.meta_mut();
            meta.header.refcount_table_offset = location.offset;
            meta.header.refcount_table_clusters = location.clusters;
        }
        self.write_header()?;
        self.sync()?;
        w.refcounts.header_changed = false;
        if let Some(old) = w.refcounts.pending_table_free.take() {
            let cb = self.geometry.cluster_bits();
            w.refcounts
                .add(&*self.storage, old.offset >> cb, old.clusters.into(), -1)?;
        }
        // The old table's clusters may be allocated again from now on.
        self.refresh_overlap_map(w);
        let new_end =
            location.offset + (u64::from(location.clusters) << self.geometry.cluster_bits());
        self.file_len.fetch_max(new_end, Ordering::Relaxed);
        Ok(())
    }
}
