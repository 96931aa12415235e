//! Guest data writes: clusters this image owns alone are overwritten in place under the
//! shared lock; anything else gets new host clusters, allocated together per L2 table, with
//! copy-on-write of the parts of a cluster the write does not cover (from the old
//! cluster, or from the backing chain where this image has nothing).

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{ClusterDescriptor, L2Entry, SubclusterBitmap, is_zero};
use crate::storage::Storage;

use crate::qcow2::image::Image;
use crate::qcow2::mapping::{Mapping, Run};

use super::source::{PendingWrite, Source, write_data};
use super::state::{BackingRead, Writer};

impl Image {
    /// Writes `buf` at guest `offset`; partial clusters are completed from this image or,
    /// where it has nothing, from `backing`.
    pub(crate) fn write_at_with(
        &self,
        buf: &[u8],
        offset: u64,
        backing: BackingRead<'_>,
    ) -> Result<()> {
        self.mark_dirty(offset, buf.len() as u64)
            .and_then(|()| self.write_inner(Source::Bytes(buf), offset, backing))
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
        self.mark_dirty(offset, len)
            .and_then(|()| self.write_inner(source, offset, backing))
            .map_err(|e| self.name_error(e))
    }

    pub(super) fn write_inner(
        &self,
        buf: Source<'_>,
        offset: u64,
        backing: BackingRead<'_>,
    ) -> Result<()> {
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
                write_data(self, host, part)?;
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
        // `file_len` is never below the file's length, and nothing is written past it
        // but what allocation places there: new clusters at or past it read as zeros
        // without being written (asked here, not of the file: a system call per write).
        let len_before = self.file_len();
        let mut next_host = if needs > 0 && !self.has_external_data_file() {
            Some(self.allocate(w, needs)?)
        } else {
            None
        };
        // Zeros such fresh clusters would get from copy-on-write are left as a hole
        // (QEMU leaves them so too), and the file is extended over them once their data
        // is written.
        let fresh_from = next_host.filter(|&first| first >= len_before);
        let mut holes_to = 0u64;
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
            let fresh = host.filter(|&h| fresh_from.is_some_and(|f| h >= f));
            let left_a_hole = self.write_cluster(
                &mut slot.frees,
                &mut slot.table,
                c,
                from,
                part,
                (host, fresh.is_some()),
                backing,
                &mut pending,
            )?;
            if left_a_hole {
                holes_to = holes_to.max(fresh.unwrap_or(0) + cs);
            }
            c += cs;
        }
        pending.flush(self)?;
        if holes_to > 0 {
            let len = self
                .storage
                .len()
                .map_err(|e| Error::io("reading the file length", e))?;
            if len < holes_to {
                self.storage
                    .set_len(holes_to)
                    .map_err(|e| self.io_error("extending the file", holes_to, e))?;
            }
        }
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

    /// Writes `part` (guest `from..`) into guest cluster `cluster`. `new_host` is the new
    /// host cluster when the cluster needs one, and whether it lies past the file's end
    /// (it reads as zeros unwritten). Returns whether zeros of the cluster were left
    /// unwritten: the file must then be extended over it.
    #[allow(clippy::too_many_arguments)]
    fn write_cluster(
        &self,
        frees: &mut Vec<(u64, u64)>,
        table: &mut [u64],
        cluster: u64,
        from: u64,
        part: Source<'_>,
        (new_host, fresh): (Option<u64>, bool),
        backing: BackingRead<'_>,
        pending: &mut PendingWrite<'_>,
    ) -> Result<bool> {
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
        let mut left_a_hole = false;
        if write_lo == from && write_hi == to {
            pending.push_borrowed(self, host + (from - cluster), from, part.len())?;
        } else {
            let mut bytes = vec![0u8; (write_hi - write_lo) as usize];
            let head = (from - write_lo) as usize;
            self.read_old(old, bitmap, write_lo, &mut bytes[..head], backing)?;
            let tail = (to - write_lo) as usize;
            self.read_old(old, bitmap, to, &mut bytes[tail..], backing)?;
            if fresh && is_zero(&bytes[..head]) && is_zero(&bytes[tail..]) {
                pending.push_borrowed(self, host + (from - cluster), from, part.len())?;
                left_a_hole = true;
            } else {
                part.read_into(&mut bytes[head..tail])?;
                pending.push_owned(self, host + (write_lo - cluster), &bytes)?;
            }
        }
        self.set_entry(table, cluster, L2Entry::data(host, true), new_bitmap);
        // The old host cluster, when replaced, loses this reference.
        if new_host.is_some() && !self.has_external_data_file() {
            self.release_descriptor(frees, old);
        }
        Ok(left_a_hole)
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
                    let run = Run {
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
}
