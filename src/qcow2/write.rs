//! The write path of one image: allocation, copy-on-write, zeroing, discarding, flushing.
//!
//! # Crash ordering
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

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::format::{
    self, AutoclearFeatures, ClusterDescriptor, CompatibleFeatures, IncompatibleFeatures, L1Entry,
    L2Entry, SubclusterBitmap,
};
use crate::storage::{Storage, write_zeros};

use super::image::Image;
use super::mapping::Mapping;
use super::refcount::Refcounts;
use super::references::ReferenceKind;

/// Reads guest content below this image (its backing chain, zeros past its end) for
/// copy-on-write: fills the buffer with what the backing chain shows at the offset.
pub(crate) type BackingRead<'a> = &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync);

/// Write-side state of an image opened for writing.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) refcounts: Refcounts,
    /// L2 tables changed in memory (pinned in the cache).
    dirty_l2: BTreeSet<u64>,
    /// L1 indices changed in memory.
    dirty_l1: BTreeSet<usize>,
    /// Header fields changed in memory.
    header_dirty: bool,
    /// Refcount drops (cluster index, count) to apply after the next checkpoint.
    pending_free: Vec<(u64, u64)>,
    /// Refcount updates are postponed (lazy refcounts, dirty bit set while they lag).
    lazy: bool,
    /// Free bytes after the last compressed cluster stored since the last checkpoint
    /// (next byte, end of its host cluster): the next one is packed there.
    compressed_tail: Option<(u64, u64)>,
}

impl Writer {
    pub(crate) fn set_lazy(&mut self, lazy: bool) {
        self.lazy = lazy;
    }
}

/// How many changed L2 tables may wait in memory before a checkpoint writes them.
const MAX_DIRTY_L2_BYTES: u64 = 16 << 20;

impl Image {
    /// Sets up the write side: loads refcounts, clears unknown autoclear bits.
    pub(crate) fn make_writable(&mut self) -> Result<()> {
        if self.storage.is_read_only() {
            return Err(Error::ReadOnly {
                reason: "the file was opened read-only",
            });
        }
        let header = self.header();
        if header
            .incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
        {
            return Err(Error::MarkedCorrupt);
        }
        let refcounts = Refcounts::load(
            &*self.storage,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            self.file_len(),
        )?;
        let lazy = header
            .compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS);
        self.writer = Some(std::sync::Mutex::new(Writer {
            refcounts,
            dirty_l2: BTreeSet::new(),
            dirty_l1: BTreeSet::new(),
            header_dirty: false,
            pending_free: Vec::new(),
            lazy,
            compressed_tail: None,
        }));
        self.refresh_overlap_map(&*self.writer()?);
        if header
            .incompatible_features
            .contains(IncompatibleFeatures::DIRTY)
        {
            self.recover_dirty()?;
        }
        // Autoclear bits this crate does not maintain must be cleared before writing.
        let keep = AutoclearFeatures::DATA_FILE_RAW;
        if header.autoclear_features.bits() & !keep.bits() != 0 {
            let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
            let mut w = self.writer()?;
            self.meta_mut().header.autoclear_features &= keep;
            w.header_dirty = true;
            self.checkpoint(&mut w)?;
        }
        Ok(())
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writer.is_some() && self.is_corrupt() {
            return Err(Error::MarkedCorrupt);
        }
        match self.writer {
            Some(_) => Ok(()),
            None => Err(Error::ReadOnly {
                reason: "the image was opened read-only",
            }),
        }
    }

    pub(crate) fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        match &self.writer {
            Some(w) => Ok(w.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Err(Error::ReadOnly {
                reason: "the image was opened read-only",
            }),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn io_error(&self, what: &str, at: u64, e: std::io::Error) -> Error {
        Error::io(format!("{what} at {at:#x}"), e)
    }

    /// Writes `buf` at guest `offset`; partial clusters are completed from this image or,
    /// where it has nothing, from `backing`.
    pub(crate) fn write_at_with(
        &self,
        buf: &[u8],
        offset: u64,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.write_inner(Source::Bytes(buf), offset, backing)
            .map_err(|e| self.name_error(e))
    }

    /// Writes `len` bytes of `src` (the file `name`) from `src_offset` at guest `offset`,
    /// as [`Image::write_at_with`] would write them, but letting the storage copy them
    /// ([`Storage::copy_from`]): where the file system shares extents, whole clusters
    /// take no data I/O.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_in_with(
        &self,
        src: &dyn Storage,
        name: &std::path::Path,
        src_offset: u64,
        len: u64,
        offset: u64,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        let source = Source::Copy {
            storage: src,
            name,
            offset: src_offset,
            len,
        };
        self.write_inner(source, offset, backing)
            .map_err(|e| self.name_error(e))
    }

    fn write_inner(&self, buf: Source<'_>, offset: u64, backing: BackingRead<'_>) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, buf.len())?;
        if buf.len() == 0 {
            return Ok(());
        }
        // Fast path: overwrite clusters this image owns alone, sharing the image.
        let done = {
            let _io = self.io_lock.read().unwrap_or_else(PoisonError::into_inner);
            let mut done = 0u64;
            for run in self.runs(offset, buf.len()) {
                let run = run?;
                let Mapping::Data { host, copied: true } = run.mapping else {
                    break;
                };
                let part = buf.slice(done, done + run.len);
                self.check_overlap("data", host, run.len, None)?;
                part.write_to(self, host)?;
                done += run.len;
            }
            done
        };
        if done == buf.len() {
            return Ok(());
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let mut pos = offset + done;
        let end = offset + buf.len();
        while pos < end {
            let span_end = end.min((self.geometry.l1_index(pos) + 1) * self.geometry.l2_span());
            let src = buf.slice(pos - offset, span_end - offset);
            self.write_span(&mut w, src, pos, backing)?;
            pos = span_end;
        }
        self.maybe_checkpoint(&mut w)
    }

    /// Writes `buf` at `offset`, all inside one L2 table's span (exclusive access held).
    fn write_span(
        &self,
        w: &mut Writer,
        buf: Source<'_>,
        offset: u64,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let l1_index = g.l1_index(offset);
        let mut slot = self.l2_for_write(w, l1_index)?;
        let end = offset + buf.len();
        // Clusters that need a new host cluster get contiguous ones, allocated at once.
        let first_cluster = g.cluster_start(offset);
        let mut needs = 0u64;
        let mut c = first_cluster;
        while c < end {
            if self.cluster_needs_allocation(&slot.table, c)? {
                needs += 1;
            }
            c += cs;
        }
        let mut next_host = if needs > 0 && !self.has_external_data_file() {
            Some(self.allocate(w, needs)?)
        } else {
            None
        };
        let mut pending = PendingWrite::new(buf, offset);
        let mut c = first_cluster;
        while c < end {
            let from = offset.max(c);
            let to = end.min(c + cs);
            let part = buf.slice(from - offset, to - offset);
            let host = if self.cluster_needs_allocation(&slot.table, c)? {
                Some(match next_host.as_mut() {
                    Some(h) => {
                        let at = *h;
                        *h += cs;
                        at
                    }
                    None => c, // external data file: host offset = guest offset
                })
            } else {
                None
            };
            self.write_cluster(
                &mut slot.frees,
                &mut slot.table,
                c,
                from,
                part,
                host,
                backing,
                &mut pending,
            )?;
            c += cs;
        }
        pending.flush(self)?;
        self.commit_l2(w, l1_index, slot);
        Ok(())
    }

    /// Whether writing to guest cluster `cluster` needs a new host cluster.
    fn cluster_needs_allocation(&self, table: &[u64], cluster: u64) -> Result<bool> {
        let (entry, _) = self.entry(table, cluster);
        Ok(match self.descriptor(entry, cluster)? {
            ClusterDescriptor::Data { copied, .. } => !copied,
            ClusterDescriptor::Zero { host: Some(_) } if entry.copied() => false,
            _ => true,
        })
    }

    pub(crate) fn entry(&self, table: &[u64], cluster: u64) -> (L2Entry, SubclusterBitmap) {
        let i = self.geometry.l2_index(cluster) as usize;
        if self.geometry.extended_l2() {
            (L2Entry(table[2 * i]), SubclusterBitmap(table[2 * i + 1]))
        } else {
            (L2Entry(table[i]), SubclusterBitmap(0))
        }
    }

    pub(crate) fn set_entry(
        &self,
        table: &mut [u64],
        cluster: u64,
        entry: L2Entry,
        bitmap: SubclusterBitmap,
    ) {
        let i = self.geometry.l2_index(cluster) as usize;
        if self.geometry.extended_l2() {
            table[2 * i] = entry.0;
            table[2 * i + 1] = bitmap.0;
        } else {
            table[i] = entry.0;
        }
    }

    pub(crate) fn descriptor(&self, entry: L2Entry, cluster: u64) -> Result<ClusterDescriptor> {
        let d = entry.decode(self.geometry).map_err(|reason| {
            Error::corrupt(
                "L2 entry",
                cluster,
                format!(
                    "for guest cluster {cluster:#x} ({:#018x}): {reason}",
                    entry.0
                ),
            )
        })?;
        Ok(match d {
            ClusterDescriptor::Data { host: 0, .. } if !self.has_external_data_file() => {
                ClusterDescriptor::Unallocated
            }
            other => other,
        })
    }

    /// Writes `part` (guest `from..`) into guest cluster `cluster`. `new_host` is the new
    /// host cluster when the cluster needs one.
    #[allow(clippy::too_many_arguments)]
    fn write_cluster(
        &self,
        frees: &mut Vec<(u64, u64)>,
        table: &mut [u64],
        cluster: u64,
        from: u64,
        part: Source<'_>,
        new_host: Option<u64>,
        backing: BackingRead<'_>,
        pending: &mut PendingWrite<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let (entry, bitmap) = self.entry(table, cluster);
        let old = self.descriptor(entry, cluster)?;
        let to = from + part.len();
        let host = match (new_host, old) {
            (Some(h), _) => h,
            (None, ClusterDescriptor::Data { host, .. }) => host,
            (None, ClusterDescriptor::Zero { host: Some(h) }) => h,
            (None, _) => {
                return Err(Error::corrupt(
                    "L2 entry",
                    cluster,
                    "cluster without a host cluster was not allocated",
                ));
            }
        };
        // Subclusters the write touches (the whole cluster without extended L2).
        let (lo, hi) = if g.extended_l2() {
            (from / unit * unit, to.div_ceil(unit) * unit)
        } else {
            (cluster, cluster + cs)
        };
        // The host range to write: what the new entry will claim holds valid data.
        let (write_lo, write_hi, mut new_bitmap) = match old {
            _ if !g.extended_l2() => match (new_host, old) {
                (None, ClusterDescriptor::Data { .. }) => (from, to, SubclusterBitmap(0)),
                _ => (cluster, cluster + cs, SubclusterBitmap(0)),
            },
            // A moving extended-L2 cluster takes its allocated subclusters along; a
            // compressed one becomes a fully allocated cluster.
            ClusterDescriptor::Data { .. } if new_host.is_some() => (cluster, cluster + cs, bitmap),
            ClusterDescriptor::Compressed(_) => {
                (cluster, cluster + cs, SubclusterBitmap::ALL_ALLOCATED)
            }
            _ => (lo, hi, bitmap),
        };
        if g.extended_l2() {
            let mut s = lo;
            while s < hi {
                new_bitmap = new_bitmap.with((s - cluster) / unit, true, false);
                s += unit;
            }
        }
        if write_lo == from && write_hi == to {
            pending.push_borrowed(self, host + (from - cluster), from, part.len())?;
        } else {
            let mut bytes = vec![0u8; (write_hi - write_lo) as usize];
            let head = (from - write_lo) as usize;
            self.read_old(old, bitmap, write_lo, &mut bytes[..head], backing)?;
            let tail = (to - write_lo) as usize;
            self.read_old(old, bitmap, to, &mut bytes[tail..], backing)?;
            part.read_into(&mut bytes[head..tail])?;
            pending.push_owned(self, host + (write_lo - cluster), &bytes)?;
        }
        self.set_entry(table, cluster, L2Entry::data(host, true), new_bitmap);
        // The old host cluster, when replaced, loses this reference.
        if new_host.is_some() && !self.has_external_data_file() {
            self.release_descriptor(frees, old);
        }
        Ok(())
    }

    /// Fills `buf` with what guest `offset..` reads as under the old mapping of its cluster.
    fn read_old(
        &self,
        old: ClusterDescriptor,
        bitmap: SubclusterBitmap,
        offset: u64,
        buf: &mut [u8],
        backing: BackingRead<'_>,
    ) -> Result<()> {
        let g = self.geometry;
        let size = self.size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let unit_end = if g.extended_l2() {
                (at / g.subcluster_size() + 1) * g.subcluster_size()
            } else {
                g.cluster_start(at) + g.cluster_size()
            };
            let n = ((unit_end - at) as usize).min(buf.len() - pos);
            let out = &mut buf[pos..pos + n];
            let sc = g.offset_in_cluster(at) / g.subcluster_size();
            let in_cluster = g.offset_in_cluster(at);
            match old {
                ClusterDescriptor::Zero { .. } => out.fill(0),
                ClusterDescriptor::Compressed(d) => {
                    let run = super::mapping::Run {
                        offset: at,
                        len: n as u64,
                        mapping: Mapping::Compressed(d),
                    };
                    self.read_run(&run, out)?;
                }
                ClusterDescriptor::Data { host, .. }
                    if !g.extended_l2() || bitmap.allocated(sc) =>
                {
                    self.data_storage()
                        .read_at(out, host + in_cluster)
                        .map_err(|e| self.io_error("reading data", host + in_cluster, e))?;
                }
                _ if g.extended_l2() && bitmap.zero(sc) => out.fill(0),
                _ => {
                    // Unallocated here: the backing chain decides (zeros past the size).
                    if at >= size {
                        out.fill(0);
                    } else {
                        let m = (n as u64).min(size - at) as usize;
                        backing(&mut out[..m], at)?;
                        out[m..].fill(0);
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Queues in `frees` the refcount drop of whatever host clusters `old` referenced.
    fn release_descriptor(&self, frees: &mut Vec<(u64, u64)>, old: ClusterDescriptor) {
        let cb = self.geometry.cluster_bits();
        match old {
            ClusterDescriptor::Data { host, .. } | ClusterDescriptor::Zero { host: Some(host) } => {
                frees.push((host >> cb, 1));
            }
            ClusterDescriptor::Compressed(d) => {
                let first = d.host_offset >> cb;
                let last = (d.host_offset + d.len - 1) >> cb;
                frees.push((first, last - first + 1));
                self.forget_compressed();
            }
            _ => {}
        }
    }

    /// Allocates `count` contiguous clusters in the image file and returns the first's
    /// offset; a moved refcount table is committed to the header at once.
    pub(crate) fn allocate(&self, w: &mut Writer, count: u64) -> Result<u64> {
        let at = w.refcounts.allocate(&*self.storage, count)?;
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
    fn publish_table_move(&self, w: &mut Writer) -> Result<()> {
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

    /// The L2 table for L1 entry `l1_index`, ready to change: allocated when missing,
    /// copied to a new cluster when shared (COPIED clear).
    pub(crate) fn l2_for_write(&self, w: &mut Writer, l1_index: u64) -> Result<L2Slot> {
        let entry = self.l1_entry(l1_index)?;
        let old_offset = entry.l2_offset();
        if old_offset != 0 && entry.copied() {
            let table = self.l2_table(old_offset)?.to_vec();
            return Ok(L2Slot {
                offset: old_offset,
                table,
                new_l1: None,
                frees: Vec::new(),
            });
        }
        let words = (self.cluster_size() / 8) as usize;
        let mut table = if old_offset == 0 {
            vec![0u64; words]
        } else {
            // Shared with a snapshot: copy it. Its entries lose COPIED (their clusters are
            // shared too); their refcounts already count the snapshot's reference.
            let mut t = self.l2_table(old_offset)?.to_vec();
            let step = if self.geometry.extended_l2() { 2 } else { 1 };
            for e in t.iter_mut().step_by(step) {
                *e = L2Entry(*e).with_copied(false).0;
            }
            t
        };
        table.truncate(words);
        let offset = self.allocate(w, 1)?;
        self.note_new_l2_table(offset);
        let mut frees = Vec::new();
        if old_offset != 0 {
            frees.push((old_offset >> self.geometry.cluster_bits(), 1));
        }
        Ok(L2Slot {
            offset,
            table,
            new_l1: Some(L1Entry::new(offset, true)),
            frees,
        })
    }

    /// Publishes a changed L2 table (pinned in the cache) and its L1 entry, in memory, and
    /// queues the refcount drops of what it no longer references.
    pub(crate) fn commit_l2(&self, w: &mut Writer, l1_index: u64, slot: L2Slot) {
        w.pending_free.extend(slot.frees);
        self.l2_cache
            .insert_pinned(slot.offset, Arc::new(slot.table));
        w.dirty_l2.insert(slot.offset);
        if let Some(entry) = slot.new_l1 {
            self.meta_mut().l1[l1_index as usize] = entry.0;
            w.dirty_l1.insert(l1_index as usize);
        }
    }

    fn maybe_checkpoint(&self, w: &mut Writer) -> Result<()> {
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
        // 1. Data and raised refcounts.
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
        let wrote_l2 = !w.dirty_l2.is_empty();
        while let Some(&offset) = w.dirty_l2.first() {
            if let Some(table) = self.l2_cache.pinned(offset) {
                self.check_overlap(
                    "an L2 table",
                    offset,
                    self.cluster_size(),
                    Some(ReferenceKind::L2Table),
                )?;
                let mut bytes = vec![0u8; self.cluster_size() as usize];
                format::encode_u64_table(&table, &mut bytes);
                self.storage
                    .write_at(&bytes, offset)
                    .map_err(|e| self.io_error("writing L2 table", offset, e))?;
            }
            self.l2_cache.unpin(offset);
            w.dirty_l2.remove(&offset);
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

    /// Starts writing what was written back to the disk without waiting (see
    /// [`crate::storage::Storage::start_writeback`]): long copies call it as they go, so
    /// that the disk works while they do and the final flush is short. Durability still
    /// comes only from [`Image::flush`].
    pub fn start_writeback(&self) -> Result<()> {
        if let Some(data) = &self.data_file {
            data.start_writeback()
                .map_err(|e| self.name_error(Error::io("writing back", e)))?;
        }
        self.storage
            .start_writeback()
            .map_err(|e| self.name_error(Error::io("writing back", e)))
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
        if w.lazy && self.is_dirty() {
            w.refcounts.write_dirty(&*self.storage)?;
            self.sync()?;
            self.meta_mut().header.incompatible_features -= IncompatibleFeatures::DIRTY;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Makes guest `offset..offset + len` read as zeros. Whole clusters (or subclusters)
    /// get the zero flag — `unmap` also frees their host clusters; partial ones are
    /// written with zeros. Version 2 images have no zero flag: without a backing file
    /// their whole clusters become unallocated (as QEMU does), with one zeros are written.
    pub(crate) fn write_zeroes_with(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.zero_inner(offset, len, unmap, backing)
            .map_err(|e| self.name_error(e))
    }

    fn zero_inner(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let unit = g.subcluster_size();
        let v2 = self.header().version < 3;
        let raw_data_file = self.data_file_raw();
        // Version 2 has no zero flag; without a backing file, whole clusters are
        // unallocated instead (they read as zeros), as QEMU does.
        if (v2 && self.backing_file().is_some()) || raw_data_file {
            return self.write_zero_bytes(offset, len, backing);
        }
        let end = offset + len;
        // Unaligned head and tail: zeros written through the ordinary path.
        let aligned_lo = offset.div_ceil(unit) * unit;
        let size = self.size();
        let aligned_hi = if end == size {
            end.div_ceil(unit) * unit
        } else {
            end / unit * unit
        };
        if aligned_lo >= aligned_hi {
            return self.write_zero_bytes(offset, len, backing);
        }
        self.write_zero_bytes(offset, aligned_lo - offset, backing)?;
        if end < aligned_hi {
            // The image ends inside the last unit: everything up to the end is zeroed.
        } else {
            self.write_zero_bytes(aligned_hi, end - aligned_hi, backing)?;
        }
        let cs = g.cluster_size();
        // A range reaching the end of the image covers its partial last cluster whole, as
        // in QEMU.
        let mut lo = aligned_lo;
        let mut hi = if end == size {
            end.div_ceil(cs) * cs
        } else {
            aligned_hi
        };
        if g.extended_l2() {
            // Subclusters of a compressed cluster cannot be zeroed apart from the rest:
            // QEMU answers ENOTSUP and writes zeros instead, which turns the cluster into
            // an ordinary one. Only the first and the last cluster can be partial.
            if lo % cs != 0 {
                let head_end = (lo.div_ceil(cs) * cs).min(hi);
                if self.is_compressed_at(lo)? {
                    self.write_zero_bytes(lo, head_end.min(size) - lo, backing)?;
                    lo = head_end;
                }
            }
            if hi % cs != 0 && lo < hi {
                let tail_start = (hi / cs * cs).max(lo);
                if self.is_compressed_at(tail_start)? {
                    self.write_zero_bytes(tail_start, hi - tail_start, backing)?;
                    hi = tail_start;
                }
            }
            if lo >= hi {
                return Ok(());
            }
        }
        self.change_entries(lo, hi, |old, _| {
            if v2 {
                ZeroAction::Unallocate
            } else {
                ZeroAction::Zero {
                    unmap,
                    keep_old: old,
                }
            }
        })
    }

    fn is_compressed_at(&self, offset: u64) -> Result<bool> {
        Ok(matches!(
            self.lookup(offset, 1)?.mapping,
            Mapping::Compressed(_)
        ))
    }

    fn write_zero_bytes(&self, offset: u64, len: u64, backing: BackingRead<'_>) -> Result<()> {
        write_zeros(offset, len, |zeros, at| {
            self.write_inner(Source::Bytes(zeros), at, backing)
        })
    }

    /// Discards guest `offset..offset + len` as QEMU's discard: whole clusters lose their
    /// data and host clusters. In a version 3 image they then read as zeros (zero flag, or
    /// all-zero subclusters with extended L2) when the image has a backing file or
    /// allocated them (so a discarded cluster stays "present" in `qemu-img map`); version 2
    /// clusters become unallocated, unless the image has a backing file, which would show
    /// through: then nothing changes. Clusters this image does not allocate, without a
    /// backing file, are left as they are. Unaligned head and tail are left alone.
    pub(crate) fn discard_with(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        self.discard_inner(offset, len, has_backing)
            .map_err(|e| self.name_error(e))
    }

    fn discard_inner(&self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        self.ensure_writable()?;
        self.check_range(offset, len)?;
        let g = self.geometry;
        let unit = g.cluster_size();
        let end = offset + len;
        let lo = offset.div_ceil(unit) * unit;
        let hi = if end == self.size() {
            end.div_ceil(unit) * unit
        } else {
            end / unit * unit
        };
        if lo >= hi {
            return Ok(());
        }
        let zero_flag = self.header().version >= 3;
        if !zero_flag && has_backing {
            // Unallocating would expose the backing file and version 2 cannot mark zeros:
            // QEMU leaves the clusters alone (discard is advisory).
            return Ok(());
        }
        self.change_entries(lo, hi, |old, _| {
            if !has_backing && matches!(old, ClusterDescriptor::Unallocated) {
                // Reads as zeros already, and stays unallocated.
                ZeroAction::Keep
            } else if zero_flag {
                ZeroAction::Zero {
                    unmap: true,
                    keep_old: ClusterDescriptor::Unallocated,
                }
            } else {
                ZeroAction::Unallocate
            }
        })
    }

    /// Rewrites the entries of whole units (subclusters with extended L2, else clusters)
    /// in `lo..hi` as `action` says, freeing host clusters that lose their last use.
    fn change_entries(
        &self,
        lo: u64,
        hi: u64,
        action: impl Fn(ClusterDescriptor, u64) -> ZeroAction,
    ) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let unit = g.subcluster_size();
        let mut pos = lo;
        while pos < hi {
            let l1_index = g.l1_index(pos);
            let span_end = hi.min((l1_index + 1) * g.l2_span());
            if self.l1_entry(l1_index)?.l2_offset() == 0
                && matches!(
                    action(ClusterDescriptor::Unallocated, pos),
                    ZeroAction::Unallocate | ZeroAction::Keep
                )
            {
                pos = span_end; // nothing allocated, nothing to do
                continue;
            }
            let mut slot = self.l2_for_write(&mut w, l1_index)?;
            let mut c = g.cluster_start(pos);
            while c < span_end {
                let from = pos.max(c);
                let to = span_end.min(c + cs);
                let (entry, bitmap) = self.entry(&slot.table, c);
                let old = self.descriptor(entry, c)?;
                let whole = from == c && to == c + cs;
                match action(old, c) {
                    ZeroAction::Keep => {}
                    ZeroAction::Unallocate if whole || !g.extended_l2() => {
                        self.set_entry(
                            &mut slot.table,
                            c,
                            L2Entry::UNALLOCATED,
                            SubclusterBitmap(0),
                        );
                        self.release_unless_external(&mut slot.frees, old);
                    }
                    ZeroAction::Zero { unmap, .. } if whole || !g.extended_l2() => {
                        if g.extended_l2() {
                            // All subclusters zero; the host cluster goes when unmapping.
                            let keep = matches!(old, ClusterDescriptor::Data { .. }) && !unmap;
                            let host = match old {
                                ClusterDescriptor::Data { host, copied } if keep => {
                                    L2Entry::data(host, copied)
                                }
                                _ => L2Entry::UNALLOCATED,
                            };
                            self.set_entry(&mut slot.table, c, host, SubclusterBitmap::ALL_ZERO);
                            if !keep {
                                self.release_unless_external(&mut slot.frees, old);
                            }
                        } else {
                            let keep = match old {
                                _ if unmap => None,
                                ClusterDescriptor::Data { host, copied: true } => Some(host),
                                ClusterDescriptor::Zero { host: Some(h) } if entry.copied() => {
                                    Some(h)
                                }
                                _ => None,
                            };
                            self.set_entry(
                                &mut slot.table,
                                c,
                                L2Entry::zero(keep, keep.is_some()),
                                SubclusterBitmap(0),
                            );
                            if keep.is_none() {
                                self.release_unless_external(&mut slot.frees, old);
                            }
                        }
                    }
                    action => {
                        // Part of an extended-L2 cluster: change its subclusters' bits.
                        let mut nb = match old {
                            ClusterDescriptor::Compressed(_) => {
                                return Err(Error::Unsupported(
                                    "zeroing part of a compressed cluster with extended L2",
                                ));
                            }
                            _ => bitmap,
                        };
                        let mut s = from;
                        while s < to {
                            let i = (s - c) / unit;
                            nb = match action {
                                ZeroAction::Unallocate => nb.with(i, false, false),
                                ZeroAction::Zero { .. } => nb.with(i, false, true),
                                ZeroAction::Keep => nb,
                            };
                            s += unit;
                        }
                        self.set_entry(&mut slot.table, c, entry, nb);
                    }
                }
                c += cs;
            }
            self.commit_l2(&mut w, l1_index, slot);
            pos = span_end;
        }
        self.maybe_checkpoint(&mut w)
    }

    /// Queues a refcount drop for after the next checkpoint.
    pub(crate) fn queue_free(&self, w: &mut Writer, cluster: u64, count: u64) {
        w.pending_free.push((cluster, count));
    }

    pub(crate) fn mark_l1_dirty(&self, w: &mut Writer, index: u64) {
        w.dirty_l1.insert(index as usize);
    }

    /// Makes whole clusters in `lo..hi` unallocated whatever the backing file (shrinking,
    /// emptying a committed image). A range reaching the end of the image takes its
    /// partial last cluster whole, as QEMU does: the subclusters of a compressed cluster
    /// cannot go alone.
    pub(crate) fn discard_whole(&self, lo: u64, hi: u64) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let hi = if hi >= self.size() {
            hi.div_ceil(cs) * cs
        } else {
            hi
        };
        self.change_entries(lo, hi, |_, _| ZeroAction::Unallocate)
    }

    fn release_unless_external(&self, frees: &mut Vec<(u64, u64)>, old: ClusterDescriptor) {
        if !self.has_external_data_file() || matches!(old, ClusterDescriptor::Compressed(_)) {
            self.release_descriptor(frees, old);
        }
    }
}

impl Image {
    /// Stores one compressed cluster (from [`super::compress_cluster`]) for the guest
    /// cluster at `offset`, packed after the previous one as QEMU packs them.
    pub(crate) fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.write_compressed_inner(offset, compressed)
            .map_err(|e| self.name_error(e))
    }

    fn write_compressed_inner(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.ensure_writable()?;
        let g = self.geometry;
        let cs = g.cluster_size();
        if offset % cs != 0 || compressed.is_empty() || compressed.len() as u64 >= cs {
            return Err(Error::InvalidArgument(format!(
                "compressed cluster at {offset:#x}: need a cluster-aligned offset and 1 to {} bytes, got {}",
                cs - 1,
                compressed.len()
            )));
        }
        self.check_range(offset, 1)?;
        if self.has_external_data_file() {
            return Err(Error::Unsupported(
                "compressed clusters in an image with an external data file",
            ));
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let len = compressed.len() as u64;
        let cb = g.cluster_bits();
        // Packing into the previous compressed cluster's host cluster adds a reference to
        // it; a refcount already at its width's maximum (always, with 1-bit refcounts)
        // cannot take one more, so the cluster then starts a new host cluster, as in QEMU.
        let packable = match w.compressed_tail {
            Some((next, end)) if next + len <= end => {
                let max = format::max_refcount(self.header().refcount_order);
                w.refcounts.get(&*self.storage, next >> cb)? < max
            }
            _ => false,
        };
        let host = match w.compressed_tail {
            Some((next, _)) if packable => {
                // The packed cluster gains a reference.
                w.refcounts.add(&*self.storage, next >> cb, 1, 1)?;
                next
            }
            _ => self.allocate(&mut w, 1)?,
        };
        let end = (host >> cb << cb) + cs;
        w.compressed_tail = Some((host + len, end));
        self.check_overlap("a compressed cluster", host, len, None)?;
        // The last decompressed cluster may have lived here before it was freed (by a
        // snapshot operation, which does not go through this module's frees).
        self.forget_compressed();
        self.storage
            .write_at(compressed, host)
            .map_err(|e| self.io_error("writing a compressed cluster", host, e))?;
        self.file_len.fetch_max(host + len, Ordering::Relaxed);
        let l1_index = g.l1_index(offset);
        let mut slot = self.l2_for_write(&mut w, l1_index)?;
        let (entry, _) = self.entry(&slot.table, offset);
        let old = self.descriptor(entry, offset)?;
        let descriptor = format::CompressedDescriptor {
            host_offset: host,
            len,
        };
        self.set_entry(
            &mut slot.table,
            offset,
            L2Entry::compressed(g, descriptor),
            SubclusterBitmap(0),
        );
        self.release_descriptor(&mut slot.frees, old);
        self.commit_l2(&mut w, l1_index, slot);
        self.maybe_checkpoint(&mut w)
    }
}

/// What [`Image::change_entries`] does to a unit.
#[derive(Debug, Clone, Copy)]
enum ZeroAction {
    /// Read as zeros (zero flag / zero bits).
    Zero {
        /// Free the host cluster too.
        unmap: bool,
        /// The old descriptor (unused; kept for symmetry).
        #[allow(dead_code)]
        keep_old: ClusterDescriptor,
    },
    /// Become unallocated (the backing file shows through).
    Unallocate,
    /// Stay as it is.
    Keep,
}

/// An L2 table being changed: where it will live and its entries.
pub(crate) struct L2Slot {
    offset: u64,
    pub(crate) table: Vec<u64>,
    /// The L1 entry to publish when the table moved (allocated or copied).
    new_l1: Option<L1Entry>,
    /// Refcount drops (cluster index, count) for what the changed entries no longer
    /// reference. They reach the writer only when the slot is committed: a change that
    /// fails half way (a full disk) is dropped with its table, and the clusters it would
    /// have released are still in use.
    frees: Vec<(u64, u64)>,
}

impl L2Slot {
    /// Queues a refcount drop of `count` clusters from index `cluster`, taking effect
    /// only if this slot is committed (see [`Image::commit_l2`]).
    pub(crate) fn free_on_commit(&mut self, cluster: u64, count: u64) {
        self.frees.push((cluster, count));
    }
}

/// Coalesces data writes that continue each other, in the host file and in the caller's
/// buffer, into one positional write straight from that buffer.
struct PendingWrite<'b> {
    /// The caller's data and the guest offset of its first byte.
    src: Source<'b>,
    src_offset: u64,
    /// A run waiting to be written: host offset, start in `src`, length.
    run: Option<(u64, u64, u64)>,
}

impl<'b> PendingWrite<'b> {
    fn new(src: Source<'b>, src_offset: u64) -> PendingWrite<'b> {
        PendingWrite {
            src,
            src_offset,
            run: None,
        }
    }

    /// Queues `len` bytes of the caller's data from guest `guest` for host `host`.
    fn push_borrowed(&mut self, image: &Image, host: u64, guest: u64, len: u64) -> Result<()> {
        let start = guest - self.src_offset;
        if let Some((h, s, l)) = self.run {
            if h + l == host && s + l == start && l < 32 << 20 {
                self.run = Some((h, s, l + len));
                return Ok(());
            }
            self.flush(image)?;
        }
        self.run = Some((host, start, len));
        Ok(())
    }

    /// Writes bytes assembled elsewhere (copy-on-write), after what is queued.
    fn push_owned(&mut self, image: &Image, host: u64, bytes: &[u8]) -> Result<()> {
        self.flush(image)?;
        write_data(image, host, Source::Bytes(bytes))
    }

    fn flush(&mut self, image: &Image) -> Result<()> {
        match self.run.take() {
            Some((host, start, len)) => write_data(image, host, self.src.slice(start, start + len)),
            None => Ok(()),
        }
    }
}

/// Where the bytes of a write come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The caller's buffer.
    Bytes(&'a [u8]),
    /// `len` bytes of another file from `offset`, copied by the storage.
    Copy {
        storage: &'a dyn Storage,
        name: &'a std::path::Path,
        offset: u64,
        len: u64,
    },
}

impl<'a> Source<'a> {
    fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::Copy { len, .. } => *len,
        }
    }

    /// Bytes `from..to` of this source.
    fn slice(&self, from: u64, to: u64) -> Source<'a> {
        match *self {
            Source::Bytes(b) => Source::Bytes(&b[from as usize..to as usize]),
            Source::Copy {
                storage,
                name,
                offset,
                ..
            } => Source::Copy {
                storage,
                name,
                offset: offset + from,
                len: to - from,
            },
        }
    }

    /// Fills `buf` (as long as the source) with its bytes, for copy-on-write.
    fn read_into(&self, buf: &mut [u8]) -> Result<()> {
        match *self {
            Source::Bytes(b) => buf.copy_from_slice(b),
            Source::Copy {
                storage,
                name,
                offset,
                ..
            } => storage.read_at(buf, offset).map_err(|e| {
                Error::io(format!("reading at {offset:#x} to copy"), e).in_file(name)
            })?,
        }
        Ok(())
    }

    /// Writes the source at `host` of `image`'s data storage.
    fn write_to(&self, image: &Image, host: u64) -> Result<()> {
        let dst = image.data_storage();
        match *self {
            Source::Bytes(b) => dst
                .write_at(b, host)
                .map_err(|e| image.io_error("writing data", host, e)),
            Source::Copy {
                storage,
                name,
                offset,
                len,
            } => dst.copy_from(storage, offset, host, len).map_err(|e| {
                image.io_error(
                    &format!("copying data from {} at {offset:#x}", name.display()),
                    host,
                    e,
                )
            }),
        }
    }
}

/// Writes `source` at `host` of the image's data storage, after the overlap check.
fn write_data(image: &Image, host: u64, source: Source<'_>) -> Result<()> {
    image.check_overlap("data", host, source.len(), None)?;
    source.write_to(image, host)?;
    if image.data_file.is_none() {
        image
            .file_len
            .fetch_max(host + source.len(), Ordering::Relaxed);
    }
    Ok(())
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort: a caller that wants errors calls close() first.
        if self.writer.is_some() {
            let _ = self.close();
        }
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
