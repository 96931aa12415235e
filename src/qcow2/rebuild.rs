//! Rebuilding refcounts from the mapping tables: for images left dirty by lazy refcounts,
//! and for changing the refcount width (`amend -o refcount_bits`).
//!
//! Every reference is counted (header, L1 tables of the active image and each snapshot,
//! L2 tables, data and compressed clusters, snapshot table) the way QEMU's check counts
//! them, then a fresh refcount table and blocks are written past the end of the file and
//! the header switches to them in one write. The old structures become free space; a
//! crash before the switch leaves the old, still-valid ones in use.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{
    self, ClusterDescriptor, IncompatibleFeatures, L1Entry, L2Entry, set_refcount,
};

use super::image::Image;
use super::refcount::Refcounts;
use super::write::Writer;

impl Image {
    /// Rebuilds the refcounts of a dirty image (called when opening it for writing).
    pub(crate) fn rebuild_refcounts(&self) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let order = self.header().refcount_order;
        self.rebuild_refcounts_locked(&mut w, order)
    }

    /// Writes fresh refcount structures of width `1 << order` (exclusive access held).
    pub(crate) fn rebuild_refcounts_locked(&self, w: &mut Writer, order: u32) -> Result<()> {
        self.checkpoint(w)?;
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let counts = self.count_references()?;
        let max = format::max_refcount(order);
        if let Some((c, &n)) = counts
            .iter()
            .enumerate()
            .find(|(_, n)| u64::from(**n) > max)
        {
            return Err(Error::InvalidArgument(format!(
                "cluster at {:#x} has {n} references, more than {}-bit refcounts hold",
                (c as u64) << cb,
                1u32 << order
            )));
        }
        let per_block = (cs * 8) >> order;
        let per_cluster = cs / 8;
        let area = (counts.len() as u64).max(self.file_len().div_ceil(cs));
        let used_ranges = |end: u64| -> Vec<u64> {
            let mut ranges: Vec<u64> = counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n != 0)
                .map(|(c, _)| c as u64 / per_block)
                .collect();
            ranges.extend((area..end).map(|c| c / per_block));
            ranges.dedup();
            ranges
        };
        // Table, then blocks, past everything: find sizes that cover themselves.
        let (mut table_clusters, mut blocks) = (1u64, 0u64);
        let (entries, ranges) = loop {
            let end = area + table_clusters + blocks;
            let ranges = used_ranges(end);
            let entries = end.div_ceil(per_block).div_ceil(per_cluster) * per_cluster;
            let tc = (entries * 8).div_ceil(cs);
            if tc == table_clusters && ranges.len() as u64 == blocks {
                break (entries, ranges);
            }
            table_clusters = tc;
            blocks = ranges.len() as u64;
        };
        let table_at = area;
        let blocks_at = area + table_clusters;
        let end = blocks_at + blocks;
        let mut table = vec![0u64; entries as usize];
        for (i, &range) in ranges.iter().enumerate() {
            let at = blocks_at + i as u64;
            table[range as usize] = at << cb;
            let mut bytes = vec![0u8; cs as usize];
            for c in range * per_block..((range + 1) * per_block).min(end) {
                let n = if c >= area {
                    1
                } else {
                    u64::from(counts.get(c as usize).copied().unwrap_or(0))
                };
                if n != 0 {
                    set_refcount(&mut bytes, (c - range * per_block) as usize, order, n);
                }
            }
            self.storage
                .write_at(&bytes, at << cb)
                .map_err(|e| Error::io("writing a rebuilt refcount block", e))?;
        }
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        format::encode_u64_table(&table, &mut bytes);
        self.storage
            .write_at(&bytes, table_at << cb)
            .map_err(|e| Error::io("writing the rebuilt refcount table", e))?;
        self.sync()?;
        {
            let mut meta = self.meta_mut();
            meta.header.refcount_order = order;
            meta.header.refcount_table_offset = table_at << cb;
            meta.header.refcount_table_clusters = table_clusters as u32;
            meta.header.incompatible_features -= IncompatibleFeatures::DIRTY;
        }
        self.write_header()?;
        self.sync()?;
        self.file_len
            .fetch_max(end << cb, std::sync::atomic::Ordering::Relaxed);
        w.refcounts = Refcounts::load(
            &*self.storage,
            cb,
            order,
            table_at << cb,
            table_clusters as u32,
            self.file_len(),
        )?;
        Ok(())
    }

    /// How many references each host cluster of the image file has, by cluster index.
    fn count_references(&self) -> Result<Vec<u32>> {
        if self.extensions().has_bitmaps() {
            return Err(Error::Unsupported(
                "rebuilding refcounts of an image with persistent bitmaps",
            ));
        }
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let file_clusters = self.file_len().div_ceil(cs);
        let mut counts = vec![0u32; file_clusters as usize];
        let mut add = |what: &'static str, offset: u64, len: u64| -> Result<()> {
            if len == 0 {
                return Ok(());
            }
            let first = offset >> cb;
            let last = (offset + len - 1) >> cb;
            if last >= file_clusters {
                return Err(Error::corrupt(
                    what,
                    offset,
                    "lies past the end of the file",
                ));
            }
            for c in first..=last {
                counts[c as usize] = counts[c as usize].saturating_add(1);
            }
            Ok(())
        };
        let header = self.header();
        add("header", 0, cs)?;
        let snapshots = self.snapshots();
        if header.nb_snapshots > 0 {
            let table_len: u64 = snapshots.iter().map(|s| s.encoded_len() as u64).sum();
            add("snapshot table", header.snapshots_offset, table_len)?;
        }
        let mut l1_tables = vec![(header.l1_table_offset, self.meta().l1.clone())];
        for s in &snapshots {
            let bytes = self.read_metadata(
                "snapshot L1 table",
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
            )?;
            l1_tables.push((s.l1_table_offset, format::decode_u64_table(&bytes)));
        }
        let external = self.has_external_data_file();
        let step = if self.geometry.extended_l2() { 2 } else { 1 };
        for (l1_offset, l1) in &l1_tables {
            add("L1 table", *l1_offset, l1.len() as u64 * 8)?;
            for &raw in l1 {
                let l2_offset = L1Entry(raw).l2_offset();
                if l2_offset == 0 {
                    continue;
                }
                add("L2 table", l2_offset, cs)?;
                let table = self.l2_table(l2_offset)?;
                for (i, &e) in table.iter().step_by(step).enumerate() {
                    let entry = L2Entry(e);
                    let d = entry.decode(self.geometry).map_err(|reason| {
                        Error::corrupt("L2 table", l2_offset, format!("entry {i}: {reason}"))
                    })?;
                    match d {
                        ClusterDescriptor::Data { host, .. }
                        | ClusterDescriptor::Zero { host: Some(host) }
                            if !external && host != 0 =>
                        {
                            add("data cluster", host, cs)?;
                        }
                        ClusterDescriptor::Compressed(c) => {
                            // Count each host cluster the compressed bytes touch, clipped
                            // to the file (qemu writes the last one unpadded).
                            let len = c
                                .len
                                .min(self.file_len().saturating_sub(c.host_offset))
                                .max(1);
                            add("compressed cluster", c.host_offset, len)?;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(counts)
    }
}
