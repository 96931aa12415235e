//! Changing an image's virtual size (qemu-img resize).

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{self, L2Entry, SubclusterBitmap};
use crate::storage::write_zeros;

use super::image::Image;
use super::layout::Preallocation;
use super::write::{BackingRead, Writer};

impl Image {
    /// Changes the virtual size to `new_size` (a multiple of 512). Growing extends the L1
    /// table when needed; the new area reads as zeros even over a longer backing file
    /// (`backing_longer`: the backing file is longer than the image), which a version 2
    /// image cannot mark as zeros: refused, as QEMU does. Shrinking needs `allow_shrink`
    /// and frees the clusters past the new end.
    pub(crate) fn resize_with(
        &self,
        new_size: u64,
        allow_shrink: bool,
        backing_longer: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.resize_inner(new_size, allow_shrink, backing_longer, backing)
            .map_err(|e| self.name_error(e))
    }

    fn resize_inner(
        &self,
        new_size: u64,
        allow_shrink: bool,
        backing_longer: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        let old_size = self.size();
        if new_size == old_size {
            return Ok(());
        }
        let needed_l1 = self.check_resize(new_size, allow_shrink, backing_longer)?;
        let cs = self.cluster_size();
        // Every bitmap follows the new size (QEMU resizes them all): loaded and marked in
        // use before the size changes, stored with new tables on close.
        {
            let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
            let mut w = self.writer()?;
            self.load_all_bitmaps(&mut w)?;
        }
        if new_size < old_size {
            // Whole clusters past the new end lose their data and host clusters, the
            // partial last one included (whole, as in QEMU: a compressed cluster's
            // subclusters cannot go alone).
            let lo = new_size.div_ceil(cs) * cs;
            if lo < old_size {
                self.unallocate(lo, old_size.div_ceil(cs) * cs)?;
            }
            self.set_size(new_size, None)?;
            self.resize_bitmaps(new_size);
            return self.set_data_file_len(new_size);
        }
        self.set_data_file_len(new_size)?;
        let l1_size = u64::from(self.header().l1_size);
        let first = old_size.div_ceil(cs) * cs;
        let end = new_size.div_ceil(cs) * cs;
        let hide_backing = backing_longer && first < end;
        if hide_backing {
            // Whole new clusters become zero clusters before the size grows, as QEMU
            // orders it: a crash never shows the longer backing file there.
            if needed_l1 > l1_size {
                self.set_size(old_size, Some(needed_l1))?;
            }
            self.zero_new_clusters(first, end)?;
            self.set_size(new_size, None)?;
        } else if needed_l1 > l1_size {
            self.set_size(new_size, Some(needed_l1))?;
        } else {
            self.set_size(new_size, None)?;
        }
        // The new area is clean in every bitmap, as after QEMU's resize (the zeros
        // written over an old partial cluster below are marked).
        self.resize_bitmaps(new_size);
        // The new area must read as zeros: a partial last cluster may hold old bytes past
        // the old end, and a longer backing file would show through.
        let tail_end = new_size.min(first);
        let zero_to = if backing_longer && !hide_backing {
            new_size
        } else {
            tail_end
        };
        if zero_to > old_size {
            self.write_zeroes_with(old_size, zero_to - old_size, false, backing)?;
        }
        Ok(())
    }

    /// Makes the whole clusters `first..end` (past the old end, version 3) zero clusters,
    /// freeing whatever they mapped.
    fn zero_new_clusters(&self, first: u64, end: u64) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let g = self.geometry;
        let (entry, bitmap) = if g.extended_l2() {
            (L2Entry::UNALLOCATED, SubclusterBitmap::ALL_ZERO)
        } else {
            (L2Entry::zero(None, false), SubclusterBitmap(0))
        };
        let mut pos = first;
        while pos < end {
            let l1_index = g.l1_index(pos);
            let span_end = end.min((l1_index + 1) * g.l2_span());
            let mut slot = self.l2_for_write(&mut w, l1_index)?;
            let mut c = pos;
            while c < span_end {
                let (old, _) = self.entry(&slot.table, c);
                let mut frees = Vec::new();
                self.release_descriptor(&mut frees, self.descriptor(old, c)?);
                for (cluster, n) in frees {
                    slot.free_on_commit(cluster, n);
                }
                self.set_entry(&mut slot.table, c, entry, bitmap);
                c += g.cluster_size();
            }
            self.commit_l2(&mut w, l1_index, slot);
            self.maybe_checkpoint(&mut w)?;
            pos = span_end;
        }
        self.checkpoint(&mut w)
    }

    /// Checks a resize to `new_size` as QEMU does before changing anything; returns the
    /// L1 entries the new size needs.
    fn check_resize(&self, new_size: u64, allow_shrink: bool, backing_longer: bool) -> Result<u64> {
        if new_size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "the new size {new_size} is not a multiple of 512"
            )));
        }
        let old_size = self.size();
        // A version 2 snapshot table does not record each snapshot's size, so the
        // snapshots would take the new one: QEMU refuses.
        let header = self.header();
        if header.version < 3 && header.nb_snapshots > 0 {
            return Err(Error::Unsupported(
                "resizing a version 2 (compat=0.10) image that has snapshots",
            ));
        }
        // (Growth inside the partial last cluster is zeroed by writing zeros, as QEMU.)
        let cs = self.cluster_size();
        if header.version < 3 && backing_longer && new_size > old_size.div_ceil(cs) * cs {
            return Err(Error::Unsupported(
                "growing a version 2 (compat=0.10) image over a longer backing file (no zero \
                 clusters to hide it)",
            ));
        }
        let needed_l1 = self
            .geometry
            .l1_entries_for(new_size)
            .filter(|&n| n * 8 <= format::MAX_L1_BYTES)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "size {new_size} needs an L1 table larger than QEMU's 32 MiB limit"
                ))
            })?;
        if new_size < old_size && !allow_shrink {
            return Err(Error::InvalidArgument(
                "shrinking an image can lose data: allow it explicitly (--shrink)".into(),
            ));
        }
        Ok(needed_l1)
    }

    /// Grows the image to `new_size` as qemu-img resize `--preallocation=mode` does
    /// (`mode` not `Off`): the new area reads as zeros, as after [`Image::resize_with`],
    /// and every cluster of it gets a host cluster, mapped by (new) L2 tables. `Metadata`
    /// gives each L2 table then its data clusters and only lengthens the file over them;
    /// `Falloc` and `Full` take all the data clusters at once before the L2 tables, and
    /// reserve them (`fallocate`) or write zeros there. As QEMU, clusters mapped over a
    /// longer backing file read as zeros: `Metadata` keeps them zero clusters (with their
    /// host cluster), the others map them as data (the fresh host clusters hold zeros).
    pub(crate) fn grow_preallocated_with(
        &self,
        new_size: u64,
        mode: Preallocation,
        backing_longer: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.grow_preallocated_inner(new_size, mode, backing_longer, backing)
            .map_err(|e| self.name_error(e))
    }

    fn grow_preallocated_inner(
        &self,
        new_size: u64,
        mode: Preallocation,
        backing_longer: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        let old_size = self.size();
        if mode == Preallocation::Off || new_size <= old_size {
            return self.resize_inner(new_size, false, backing_longer, backing);
        }
        if self.has_external_data_file() {
            return Err(Error::Unsupported(
                "preallocation when resizing a qcow2 image with an external data file",
            ));
        }
        let cs = self.cluster_size();
        let first = old_size.div_ceil(cs) * cs;
        let end = new_size.div_ceil(cs) * cs;
        if self.header().version < 3 && backing_longer && mode != Preallocation::Metadata {
            // Version 2 has no zero clusters: the fresh data clusters alone hide the
            // longer backing file (QEMU's falloc/full succeed there, its metadata fails),
            // so they are mapped before the size grows: a crash leaves the old size.
            let needed_l1 = self.check_resize(new_size, false, false)?;
            if needed_l1 > u64::from(self.header().l1_size) {
                self.set_size(old_size, Some(needed_l1))?;
            }
            if first < end {
                self.map_new_clusters(first, end, mode, true)?;
            }
            self.resize_inner(new_size, false, false, backing)?;
        } else {
            // The plain growth first (new L1 table, size, zeros over a partial last
            // cluster and a longer backing file): a crash after it leaves a consistent,
            // grown image, whose new clusters are then mapped.
            self.resize_inner(new_size, false, backing_longer, backing)?;
            if first < end {
                self.map_new_clusters(first, end, mode, backing_longer)?;
            }
        }
        // A partial old last cluster that has no host cluster of its own gets one, its
        // old head copied (QEMU allocates it too); zeros written past the old end do it.
        let tail_end = new_size.min(first);
        if tail_end > old_size {
            let zeros = vec![0u8; (tail_end - old_size) as usize];
            self.write_at_with(&zeros, old_size, backing)?;
        }
        Ok(())
    }

    /// Maps every guest cluster in `first..end` (cluster-aligned, past the old end) to a
    /// new host cluster, as [`Image::grow_preallocated_with`] describes.
    fn map_new_clusters(
        &self,
        first: u64,
        end: u64,
        mode: Preallocation,
        backing_longer: bool,
    ) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let count = (end - first) / cs;
        // Falloc/full: the data clusters in one run, reserved or written before any L2
        // entry maps them (their refcounts reach the file at the checkpoint below,
        // before the L2 tables do).
        let mut next_host = if mode == Preallocation::Metadata {
            None
        } else {
            let at = self.allocate(&mut w, count)?;
            self.fill_preallocated(at, count * cs, mode)?;
            // Durable before a checkpoint in the loop below can map them.
            self.sync()?;
            Some(at)
        };
        let mut data_end = 0u64;
        let mut pos = first;
        while pos < end {
            let l1_index = g.l1_index(pos);
            let span_end = end.min((l1_index + 1) * g.l2_span());
            let mut slot = self.l2_for_write(&mut w, l1_index)?;
            // Metadata: each L2 table, then the data clusters it maps.
            let mut host = match next_host {
                Some(h) => h,
                None => self.allocate(&mut w, (span_end - pos) / cs)?,
            };
            let mut c = pos;
            while c < span_end {
                let (old, _) = self.entry(&slot.table, c);
                let old = self.descriptor(old, c)?;
                let mut frees = Vec::new();
                self.release_descriptor(&mut frees, old);
                for (cluster, n) in frees {
                    slot.free_on_commit(cluster, n);
                }
                let (entry, bitmap) = match (mode, g.extended_l2(), backing_longer) {
                    (Preallocation::Metadata, false, true) => {
                        (L2Entry::zero(Some(host), true), SubclusterBitmap(0))
                    }
                    (Preallocation::Metadata, true, true) => {
                        (L2Entry::data(host, true), SubclusterBitmap::ALL_ZERO)
                    }
                    (_, true, true) => (L2Entry::data(host, true), SubclusterBitmap::ALL_ALLOCATED),
                    // No backing file shows through: subclusters stay unallocated (they
                    // read as zeros), as QEMU leaves a preallocated cluster's bitmap.
                    _ => (L2Entry::data(host, true), SubclusterBitmap(0)),
                };
                self.set_entry(&mut slot.table, c, entry, bitmap);
                host += cs;
                c += cs;
            }
            data_end = data_end.max(host);
            if next_host.is_some() {
                next_host = Some(host);
            }
            self.commit_l2(&mut w, l1_index, slot);
            self.maybe_checkpoint(&mut w)?;
            pos = span_end;
        }
        // Metadata: the file covers the data clusters (as holes) before they are mapped.
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading the file length", e))?;
        if len < data_end {
            self.storage
                .set_len(data_end)
                .map_err(|e| self.io_error("extending the file", data_end, e))?;
        }
        self.sync()?;
        self.checkpoint(&mut w)
    }

    /// Reserves (`Falloc`) or writes zeros over (`Full`) `len` bytes of fresh host
    /// clusters from `at`, extending the file. A storage that cannot reserve gets zeros.
    fn fill_preallocated(&self, at: u64, len: u64, mode: Preallocation) -> Result<()> {
        if let (Preallocation::Falloc, Some(file)) = (mode, self.storage.as_file()) {
            return rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), at, len)
                .map_err(|e| self.io_error("reserving space (fallocate)", at, e.into()));
        }
        write_zeros(at, len, |zeros, off| {
            self.storage
                .write_at(zeros, off)
                .map_err(|e| self.io_error("writing zeros", off, e))
        })
    }

    /// An external data file follows the virtual size, as QEMU truncates it (with
    /// `data_file_raw` it must read as the whole disk).
    fn set_data_file_len(&self, len: u64) -> Result<()> {
        match &self.data_file {
            Some(data) => data
                .set_len(len)
                .map_err(|e| Error::io("resizing the data file", e)),
            None => Ok(()),
        }
    }

    /// Writes the new size (and a new, larger L1 table) to disk, crash-safely: pending
    /// metadata first, then the new L1 table, then the header in one write.
    fn set_size(&self, new_size: u64, new_l1_entries: Option<u64>) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        self.checkpoint(&mut w)?;
        let cb = self.geometry.cluster_bits();
        if let Some(entries) = new_l1_entries {
            let bytes_len = entries * 8;
            let clusters = bytes_len.div_ceil(self.cluster_size());
            let at = self.allocate(&mut w, clusters)?;
            let mut bytes = vec![0u8; bytes_len as usize];
            let (old_offset, old_entries) = {
                let mut meta = self.meta_mut();
                meta.l1.resize(entries as usize, 0);
                format::encode_u64_table(&meta.l1, &mut bytes);
                (meta.header.l1_table_offset, u64::from(meta.header.l1_size))
            };
            // The new table's refcounts, then the table, then the header switching to it.
            self.checkpoint(&mut w)?;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| Error::io("writing the new L1 table", e))?;
            self.sync()?;
            {
                let mut meta = self.meta_mut();
                meta.header.l1_table_offset = at;
                meta.header.l1_size = entries as u32;
                meta.header.size = new_size;
            }
            self.write_header()?;
            self.sync()?;
            if old_entries > 0 {
                let old_clusters = (old_entries * 8).div_ceil(self.cluster_size());
                self.queue_free(&mut w, old_offset >> cb, old_clusters);
            }
        } else {
            self.meta_mut().header.size = new_size;
            self.write_header()?;
            self.sync()?;
        }
        self.checkpoint(&mut w)
    }

    /// Makes whole clusters in `lo..hi` unallocated (shrinking), freeing their clusters
    /// and the L2 tables that end up mapping nothing past the end.
    fn unallocate(&self, lo: u64, hi: u64) -> Result<()> {
        self.discard_whole(lo, hi)?;
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let g = self.geometry;
        // L2 tables whose whole span lies past the new end go too.
        let first_unused = lo.div_ceil(g.l2_span());
        let l1_len = self.meta().l1.len() as u64;
        for index in first_unused..l1_len {
            let entry = self.l1_entry(index)?;
            if entry.l2_offset() != 0 {
                self.clear_l1_entry(&mut w, index, entry.l2_offset());
            }
        }
        self.checkpoint(&mut w)
    }

    /// Empties the image as `qemu-img commit` leaves the committed image: every cluster
    /// unallocated, its L2 tables freed, and the file cut after the last cluster still in
    /// use, so its space goes back to the file system. (With lazy refcounts the stored
    /// refcounts may lag, so the file is not cut.)
    pub(crate) fn make_empty(&self) -> Result<()> {
        let cs = self.cluster_size();
        self.unallocate(0, self.size().div_ceil(cs) * cs)
            .map_err(|e| self.name_error(e))?;
        if self.lazy_refcounts() {
            return Ok(());
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer().map_err(|e| self.name_error(e))?;
        let clusters = self.file_len().div_ceil(cs);
        let mut end = clusters;
        while end > 0 && w.refcounts.get(&*self.storage, end - 1)? == 0 {
            end -= 1;
        }
        if end < clusters {
            self.storage
                .set_len(end * cs)
                .map_err(|e| self.name_error(Error::io("cutting the emptied file", e)))?;
            self.file_len
                .store(end * cs, std::sync::atomic::Ordering::Relaxed);
            self.sync()?;
        }
        Ok(())
    }

    fn clear_l1_entry(&self, w: &mut Writer, index: u64, l2_offset: u64) {
        self.meta_mut().l1[index as usize] = 0;
        self.mark_l1_dirty(w, index);
        self.queue_free(w, l2_offset >> self.geometry.cluster_bits(), 1);
    }
}
