//! Zeroing and discarding guest ranges, as QEMU chooses: zero flags (zero subclusters with
//! extended L2) in version 3, unallocated clusters or written zeros in version 2, written
//! zeros for partial clusters and where a compressed cluster's subclusters cannot go alone.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{ClusterDescriptor, L2Entry, SubclusterBitmap};
use crate::storage::write_zeros;

use crate::qcow2::image::Image;
use crate::qcow2::mapping::Mapping;

use super::source::Source;
use super::state::BackingRead;

impl Image {
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
        self.mark_dirty(offset, len)
            .and_then(|()| self.zero_inner(offset, len, unmap, backing))
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
        self.change_entries(lo, hi, |_, _| {
            if v2 {
                ZeroAction::Unallocate
            } else {
                ZeroAction::Zero { unmap }
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
        self.mark_dirty(offset, len)
            .and_then(|()| self.discard_inner(offset, len, has_backing))
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
                ZeroAction::Zero { unmap: true }
            } else {
                ZeroAction::Unallocate
            }
        })
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
}

/// What [`Image::change_entries`] does to a unit.
#[derive(Debug, Clone, Copy)]
enum ZeroAction {
    /// Read as zeros (zero flag / zero bits).
    Zero {
        /// Free the host cluster too.
        unmap: bool,
    },
    /// Become unallocated (the backing file shows through).
    Unallocate,
    /// Stay as it is.
    Keep,
}
