//! L2 tables being changed: found or made writable (allocated, or copied when shared),
//! entries read and set, then committed to memory with the refcount drops they cause.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{ClusterDescriptor, L1Entry, L2Entry, SubclusterBitmap};

use crate::qcow2::image::Image;

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
