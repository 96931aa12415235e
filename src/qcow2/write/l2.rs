//! L2 tables being changed: found or made writable (allocated, or copied when shared),
//! entries read and set, then committed to memory with the refcount drops they cause.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{ClusterDescriptor, L1Entry, L2Entry, SubclusterBitmap};

use crate::qcow2::image::{Image, L2_BATCH_BYTES};

use super::state::Writer;

impl Image {
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
        let offset = self.allocate_l2_table(w)?;
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

    /// A cluster for a new L2 table: the next of the reserve, taken `l2_batch` clusters at
    /// a time when batching (see [`Image::batch_new_l2_tables`]).
    fn allocate_l2_table(&self, w: &mut Writer) -> Result<u64> {
        if w.l2_reserve.is_empty() {
            if w.l2_batch <= 1 {
                return self.allocate(w, 1);
            }
            let first = self.allocate(w, w.l2_batch)? >> self.geometry.cluster_bits();
            w.l2_reserve = first..first + w.l2_batch;
        }
        let cluster = w.l2_reserve.start;
        w.l2_reserve.start += 1;
        Ok(cluster << self.geometry.cluster_bits())
    }

    /// Makes new L2 tables come from runs of clusters taken together ([`L2_BATCH_BYTES`]), instead of each from the cluster after the data last written. Merges ask
    /// for it: a scattered write then leaves data and tables each in runs of their own,
    /// and the disk writes long runs where it wrote every other 4 KiB block (the writes
    /// alone took 1.3-1.5 s against 0.65 s in order for a metadata-heavy commit,
    /// `scripts/floor-scattered.py`). Not for writes that must lay an image out as QEMU
    /// does (convert, create and resize preallocation keep QEMU's offsets). Unused
    /// clusters of a run are released at every checkpoint. Read-only images ignore it.
    pub(crate) fn batch_new_l2_tables(&self) {
        if let Ok(mut w) = self.writer() {
            w.l2_batch = (L2_BATCH_BYTES / self.cluster_size()).max(1);
        }
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

    /// Queues in `frees` the refcount drop of whatever host clusters `old` referenced.
    pub(crate) fn release_descriptor(&self, frees: &mut Vec<(u64, u64)>, old: ClusterDescriptor) {
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

    pub(super) fn release_unless_external(
        &self,
        frees: &mut Vec<(u64, u64)>,
        old: ClusterDescriptor,
    ) {
        if !self.has_external_data_file() || matches!(old, ClusterDescriptor::Compressed(_)) {
            self.release_descriptor(frees, old);
        }
    }

    /// Queues a refcount drop for after the next checkpoint.
    pub(crate) fn queue_free(&self, w: &mut Writer, cluster: u64, count: u64) {
        w.pending_free.push((cluster, count));
    }

    pub(crate) fn mark_l1_dirty(&self, w: &mut Writer, index: u64) {
        w.dirty_l1.insert(index as usize);
    }
}

/// An L2 table being changed: where it will live and its entries.
pub(crate) struct L2Slot {
    pub(super) offset: u64,
    pub(crate) table: Vec<u64>,
    /// The L1 entry to publish when the table moved (allocated or copied).
    pub(super) new_l1: Option<L1Entry>,
    /// Refcount drops (cluster index, count) for what the changed entries no longer
    /// reference. They reach the writer only when the slot is committed: a change that
    /// fails half way (a full disk) is dropped with its table, and the clusters it would
    /// have released are still in use.
    pub(super) frees: Vec<(u64, u64)>,
}

impl L2Slot {
    /// Queues a refcount drop of `count` clusters from index `cluster`, taking effect
    /// only if this slot is committed (see [`Image::commit_l2`]).
    pub(crate) fn free_on_commit(&mut self, cluster: u64, count: u64) {
        self.frees.push((cluster, count));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::create::{CreateOptions, create_on};
    use crate::qcow2::{Image, ImageOptions};
    use crate::storage::recording::Recording;

    use crate::qcow2::image::L2_BATCH_BYTES;

    /// Writes one 4 KiB cluster into each of `tables` L2 ranges of a fresh image (4 KiB
    /// clusters), flushing after `flush_after` of them, and returns the image.
    fn scattered(batch: bool, tables: u64, flush_after: u64) -> (Arc<Recording>, Image) {
        let file = Arc::new(Recording::default());
        let mut create = CreateOptions::qcow2(1 << 32);
        create.cluster_size = 4096;
        create_on(&*file, &create).unwrap();
        let options = ImageOptions {
            writable: true,
            ..ImageOptions::default()
        };
        let image = Image::from_storage(Box::new(Arc::clone(&file)), "t", &options, None).unwrap();
        if batch {
            image.batch_new_l2_tables();
        }
        // 512 entries of 4 KiB per table: one cluster per 2 MiB.
        for i in 0..tables {
            let zeros_below = |b: &mut [u8], _| {
                b.fill(0);
                Ok(())
            };
            image
                .write_at_with(&[i as u8 + 1; 4096], i << 21, &zeros_below)
                .unwrap();
            if i + 1 == flush_after {
                image.flush().unwrap();
            }
        }
        (file, image)
    }

    #[test]
    fn batched_l2_tables_lie_together_and_nothing_leaks() {
        let per_batch = L2_BATCH_BYTES / 4096;
        let tables = per_batch + per_batch / 2;
        // A checkpoint in the middle of the second batch releases its rest.
        let (_, image) = scattered(true, tables, per_batch + 3);
        let l2 = |i: u64| image.l1_entry(i).unwrap().l2_offset();
        for i in 1..per_batch {
            assert_eq!(l2(i), l2(i - 1) + 4096, "table {i}");
        }
        image.close().unwrap();
        let report = image.check().unwrap();
        assert!(report.is_clean(), "{report:?}");
        for i in 0..tables {
            let mut buf = [0u8; 4096];
            image.read_at(&mut buf, i << 21).unwrap();
            assert_eq!(buf, [i as u8 + 1; 4096], "cluster {i}");
        }
    }

    #[test]
    fn unbatched_l2_tables_alternate_with_their_data_as_qemu_lays_them_out() {
        let (_, image) = scattered(false, 8, 0);
        for i in 1..8 {
            let at = |i: u64| image.l1_entry(i).unwrap().l2_offset();
            assert_eq!(at(i), at(i - 1) + 2 * 4096, "table {i}");
        }
        image.close().unwrap();
        assert!(image.check().unwrap().is_clean());
    }
}
