//! Checkpoints: metadata changes kept in memory reach the disk in a crash-safe order.
//!
//! Guest data goes straight to its host cluster. Metadata changes (L2 tables, L1 entries,
//! refcounts, header fields) stay in memory until a *checkpoint* writes them in this order,
//! with a flush between the steps, so that the image on disk is consistent at every
//! moment and a crash leaks clusters at worst:
//!
//! 1. data and raised refcounts (new clusters counted before anything points at them),
//! 2. L2 tables (data before the L2 entry that maps it),
//! 3. L1 entries and header fields (an L2 table before the L1 entry that points at it),
//! 4. dropped refcounts (a pointer removed before its refcount is dropped).
//!
//! A cluster whose refcount drops is not reused before step 4: until then the image on disk
//! may still point at it. Writes that overwrite clusters this image owns alone (COPIED) go
//! in place under a shared lock; everything that changes metadata holds the image
//! exclusively.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{self, IncompatibleFeatures};

use crate::qcow2::image::Image;
use crate::qcow2::reference::ReferenceKind;

use super::state::Writer;

/// How many changed L2 tables may wait in memory before a checkpoint writes them.
const MAX_DIRTY_L2_BYTES: u64 = 16 << 20;

/// The most a checkpoint writes of consecutive L2 tables at once.
const MAX_L2_WRITE_BYTES: u64 = 1 << 20;

impl Image {
    pub(crate) fn maybe_checkpoint(&self, w: &mut Writer) -> Result<()> {
        if w.dirty_l2.len() as u64 * self.cluster_size() > MAX_DIRTY_L2_BYTES {
            self.checkpoint(w)?;
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.storage.flush().map_err(|e| Error::io("flushing", e))
    }

    /// Writes the header (fields and feature bits) in one write at offset 0.
    pub(crate) fn write_header(&self) -> Result<()> {
        let meta = self.meta();
        let mut bytes = vec![0u8; meta.header.header_length.max(72) as usize];
        meta.header.encode(&mut bytes);
        drop(meta);
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| Error::io("writing the header", e))
    }

    /// Writes the first cluster as it stands in memory — header, extensions, backing file
    /// name — in one write, and flushes: the one step that switches extensions (a new
    /// bitmap directory, a backing format) at once.
    pub(crate) fn write_header_cluster(&self) -> Result<()> {
        let mut meta = self.meta_mut();
        let backing = meta.backing_file.clone();
        let extensions = meta.extensions.clone();
        let cluster = format::encode_header_cluster(
            &mut meta.header,
            &extensions,
            backing.as_deref(),
            self.cluster_size(),
        )
        .ok_or_else(|| {
            Error::InvalidArgument(
                "the header, its extensions and the backing file name do not fit in the first cluster"
                    .into(),
            )
        })?;
        drop(meta);
        self.storage
            .write_at(&cluster, 0)
            .map_err(|e| Error::io("writing the header cluster", e))?;
        self.sync()
    }

    /// Writes every metadata change in the crash-safe order (see the module docs).
    pub(crate) fn checkpoint(&self, w: &mut Writer) -> Result<()> {
        self.publish_table_move(w)?;
        let metadata_changes = !w.dirty_l2.is_empty() || !w.dirty_l1.is_empty() || w.header_dirty;
        // Refcounts also lag when only they changed (an allocation or a free by an
        // operation that writes its tables itself, such as a new L1 table) or frees are
        // about to apply (step 4).
        let refcounts_lag = w.refcounts.has_changes() || !w.pending_free.is_empty();
        if (metadata_changes || refcounts_lag) && w.lazy && !self.is_dirty() {
            // Lazy refcounts: mark the image dirty before refcounts start to lag.
            self.meta_mut().header.incompatible_features |= IncompatibleFeatures::DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        // 1. Data and raised refcounts. Clusters reserved for L2 tables and not used are
        // released first: nothing points at them, and no refcount on disk may count them.
        if !w.l2_reserve.is_empty() {
            let unused = w.l2_reserve.clone();
            w.refcounts
                .add(&*self.storage, unused.start, unused.end - unused.start, -1)?;
            w.l2_reserve = 0..0;
        }
        if let Some(data) = &self.data_file {
            data.flush()
                .map_err(|e| Error::io("flushing the data file", e))?;
        }
        if !w.lazy {
            w.refcounts.write_dirty(&*self.storage)?;
        }
        self.sync()?;
        // 2. L2 tables.
        // Each table stays dirty (and pinned) until written: after a failed write (a
        // full disk) the next checkpoint retries it, and step 3 never publishes an L1
        // entry for a table that is not on disk.
        // Tables in consecutive clusters (new tables taken in batches) go in one write.
        let wrote_l2 = !w.dirty_l2.is_empty();
        let cs = self.cluster_size();
        let max_run = (MAX_L2_WRITE_BYTES / cs).max(1) as usize;
        let mut bytes = Vec::new();
        while let Some(&first) = w.dirty_l2.first() {
            let mut run = 0;
            bytes.clear();
            for &offset in w.dirty_l2.range(first..).take(max_run) {
                if offset != first + run as u64 * cs {
                    break;
                }
                let Some(table) = self.l2_cache.pinned(offset) else {
                    break;
                };
                self.check_overlap("an L2 table", offset, cs, Some(ReferenceKind::L2Table))?;
                bytes.resize((run + 1) * cs as usize, 0);
                format::encode_u64_table(&table, &mut bytes[run * cs as usize..]);
                run += 1;
            }
            if run > 0 {
                self.storage
                    .write_at(&bytes, first)
                    .map_err(|e| self.io_error("writing L2 table", first, e))?;
            }
            // The first table without a copy in the cache has nothing to write.
            for i in 0..run.max(1) as u64 {
                let offset = first + i * cs;
                self.l2_cache.unpin(offset);
                w.dirty_l2.remove(&offset);
            }
        }
        // The L2 tables must be durable before an L1 entry points at them, before a
        // refcount they no longer use drops (step 4), and before the flush returns — also
        // when neither L1 nor the header changed (an existing table gained entries).
        if wrote_l2 {
            self.sync()?;
        }
        // 3. L1 entries and the header.
        if !w.dirty_l1.is_empty() || w.header_dirty {
            // Like the L2 tables, L1 entries and header fields are forgotten only once
            // written.
            if let (Some(&lo), Some(&hi)) = (w.dirty_l1.first(), w.dirty_l1.last()) {
                let meta = self.meta();
                let mut bytes = vec![0u8; (hi - lo + 1) * 8];
                format::encode_u64_table(&meta.l1[lo..=hi], &mut bytes);
                let at = meta.header.l1_table_offset + lo as u64 * 8;
                drop(meta);
                self.check_overlap(
                    "the L1 table",
                    at,
                    bytes.len() as u64,
                    Some(ReferenceKind::L1Table),
                )?;
                self.storage
                    .write_at(&bytes, at)
                    .map_err(|e| self.io_error("writing the L1 table", at, e))?;
                w.dirty_l1.clear();
            }
            if w.header_dirty {
                self.write_header()?;
                w.header_dirty = false;
            }
            self.sync()?;
        }
        // A packed cluster's refcount may drop below: start packing afresh.
        w.compressed_tail = None;
        // 4. Dropped refcounts, now that nothing on disk points at those clusters.
        let frees = std::mem::take(&mut w.pending_free);
        for &(cluster, count) in &frees {
            w.refcounts.add(&*self.storage, cluster, count, -1)?;
        }
        if !frees.is_empty() && !w.lazy {
            w.refcounts.write_dirty(&*self.storage)?;
            self.sync()?;
        }
        self.refresh_overlap_map(w);
        Ok(())
    }

    /// Makes every completed write durable: data, then metadata, in the crash-safe order.
    pub fn flush(&self) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer().map_err(|e| self.name_error(e))?;
        self.checkpoint(&mut w).map_err(|e| self.name_error(e))
    }

    /// Starts writing the guest data written since the last call back to the disk
    /// without waiting (see [`crate::storage::Storage::start_writeback`]): long copies
    /// call it as they go, so that the disk works while they do and the final flush is
    /// short. Durability still comes only from [`Image::flush`].
    ///
    /// Only the host runs the data went to (`data_written`): the rest of the file holds
    /// the metadata the copy reads as it goes (a metadata-heavy commit re-read thousands
    /// of L2 tables from the disk when the whole file's cache was dropped).
    pub fn start_writeback(&self) -> Result<()> {
        for run in self.data_written.take() {
            self.data_storage()
                .start_writeback(run)
                .map_err(|e| self.name_error(Error::io("writing back", e)))?;
        }
        Ok(())
    }

    /// Flushes, and with lazy refcounts also writes the refcounts and clears the dirty
    /// bit, so the image is clean on disk. Dropping a writable image does this too, but
    /// cannot report errors.
    pub fn close(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer().map_err(|e| self.name_error(e))?;
        self.close_locked(&mut w).map_err(|e| self.name_error(e))
    }

    fn close_locked(&self, w: &mut Writer) -> Result<()> {
        self.checkpoint(w)?;
        self.store_bitmaps(w)?;
        if w.lazy && self.is_dirty() {
            w.refcounts.write_dirty(&*self.storage)?;
            self.sync()?;
            self.meta_mut().header.incompatible_features -= IncompatibleFeatures::DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::create::{CreateOptions, create_on};
    use crate::qcow2::{Image, ImageOptions};
    use crate::storage::recording::Recording;

    #[test]
    fn start_writeback_reaches_the_storage_under_the_image() {
        let file = Arc::new(Recording::default());
        create_on(&*file, &CreateOptions::qcow2(1 << 20)).unwrap();
        let options = ImageOptions {
            writable: true,
            ..ImageOptions::default()
        };
        let image = Image::from_storage(Box::new(Arc::clone(&file)), "t", &options, None).unwrap();
        image
            .write_at_with(&[1; 4096], 0, &|b, _| {
                b.fill(0);
                Ok(())
            })
            .unwrap();
        image.start_writeback().unwrap();
        assert_eq!(file.calls("start_writeback"), 1);
    }
}
