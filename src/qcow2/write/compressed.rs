//! Compressed clusters, packed after each other into host clusters as QEMU packs them.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::format::{self, L2Entry, SubclusterBitmap};

use crate::qcow2::image::Image;

impl Image {
    /// Stores one compressed cluster (from [`crate::qcow2::compress_cluster`]) for the guest
    /// cluster at `offset`, packed after the previous one as QEMU packs them.
    pub(crate) fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.mark_dirty(offset, self.cluster_size())
            .and_then(|()| self.write_compressed_inner(offset, compressed))
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
        self.data_written.note(host, len);
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
