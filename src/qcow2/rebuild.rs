//! Rebuilding refcounts from the mapping tables: for images left dirty by lazy refcounts,
//! and for changing the refcount width (`amend -o refcount_bits`).
//!
//! Every reference is counted (header, L1 tables of the active image and each snapshot,
//! L2 tables, data and compressed clusters, snapshot table) the way QEMU's check counts
//! them, then a fresh refcount table and blocks are written past the end of the file and
//! the header switches to them in one write. The old structures become free space; a
//! crash before the switch leaves the old, still-valid ones in use.

use crate::error::{Error, Result};
use crate::format::{self, IncompatibleFeatures, set_refcount};

use super::check::{RepairMode, Severity};
use super::image::Image;
use super::reference::{Event, ReferenceKind, Scope};
use super::write::Writer;

impl Image {
    /// Repairs a dirty image (lazy refcounts left lagging) when it is opened for writing,
    /// as `check -r all` does; refuses to go on if corruption remains.
    pub(crate) fn recover_dirty(&self) -> Result<()> {
        let report = self.repair(RepairMode::All)?;
        if !report.is_clean() {
            let what = report
                .findings
                .iter()
                .find(|f| f.severity != Severity::Repaired)
                .map_or("", |f| f.message.as_str());
            return Err(Error::corrupt(
                "image",
                0,
                format!("the dirty image could not be repaired: {what}"),
            ));
        }
        Ok(())
    }

    /// Writes fresh refcount structures of width `1 << order` (exclusive access held).
    pub(crate) fn rebuild_refcounts_locked(&self, w: &mut Writer, order: u32) -> Result<()> {
        self.checkpoint(w)?;
        let counts = self.count_references()?;
        self.install_refcounts(&counts, order)?;
        w.refcounts = self.load_refcounts()?;
        self.refresh_overlap_map(w);
        Ok(())
    }

    /// Writes a refcount table and blocks of width `1 << order` holding `counts` (by
    /// cluster index) past the end of the file, then switches the header to them. The old
    /// structures are not counted: they become free space.
    pub(crate) fn install_refcounts(&self, counts: &[u32], order: u32) -> Result<()> {
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
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
        let per_block = format::refcounts_per_block(cb, order);
        let per_cluster = cs / 8;
        // A snapshot table reaching past the end of the file (read as zeros there) keeps
        // its clusters: the new structures go past it, or it would read them as entries.
        let snapshot_table = self.snapshot_table_clusters();
        let area = (counts.len() as u64)
            .max(self.file_len().div_ceil(cs))
            .max(snapshot_table.end);
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
                // The new structures, and the snapshot table's clusters past the file.
                let n = if c >= area || (c as usize >= counts.len() && snapshot_table.contains(&c))
                {
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
        Ok(())
    }

    /// The clusters the snapshot table occupies (empty without snapshots).
    fn snapshot_table_clusters(&self) -> std::ops::Range<u64> {
        let offset = self.header().snapshots_offset;
        let snapshots = self.snapshots();
        if snapshots.is_empty() {
            return 0..0;
        }
        let len = format::snapshot_table_len(&snapshots);
        let cs = self.cluster_size();
        offset / cs..offset.saturating_add(len).div_ceil(cs)
    }

    /// How many references each host cluster of the image file has, by cluster index,
    /// leaving out the refcount structures (a rebuild replaces them). Damage is an error:
    /// repairing it is `check -r all`'s job.
    fn count_references(&self) -> Result<Vec<u32>> {
        let cb = self.geometry.cluster_bits();
        let mut counts = vec![0u32; self.file_len().div_ceil(self.cluster_size()) as usize];
        let mut problem = None;
        self.walk_references(Scope::All, &mut |event| match event {
            Event::Problem(p) => {
                problem.get_or_insert(p.message);
            }
            Event::Reference(r) => {
                if matches!(
                    r.kind,
                    ReferenceKind::RefcountTable | ReferenceKind::RefcountBlock
                ) {
                    return;
                }
                for c in r.offset >> cb..=(r.offset + r.len - 1) >> cb {
                    let n = &mut counts[c as usize];
                    *n = n.saturating_add(1);
                }
            }
        })?;
        match problem {
            Some(message) => Err(Error::corrupt("image", 0, message)),
            None => Ok(counts),
        }
    }
}
