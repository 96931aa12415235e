//! Reference counts of host clusters (spec: "Host cluster management"): reading them,
//! raising and dropping them in memory, allocating free clusters, and growing the refcount
//! structures — new blocks are placed inside the range they describe and count themselves.
//!
//! Changes stay in memory (dirty blocks) until [`Refcounts::write_dirty`], which the image's
//! checkpoint calls before any table that points at the new clusters reaches the disk.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::format::{self, get_refcount, max_refcount, set_refcount};
use crate::storage::Storage;

/// Dirty blocks are never evicted; clean ones are once more than this many are cached.
const CLEAN_BLOCKS_KEPT: usize = 64;

#[derive(Debug)]
struct Block {
    bytes: Vec<u8>,
    dirty: bool,
}

/// The refcount table and a cache of refcount blocks.
#[derive(Debug)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount table: host offsets of refcount blocks (0 = none yet).
    table: Vec<u64>,
    table_offset: u64,
    /// Table entries changed in memory (written after the blocks they point at).
    dirty_table: BTreeSet<usize>,
    blocks: BTreeMap<usize, Block>,
    /// Where the search for free clusters starts (a cluster index).
    free_hint: u64,
    /// Set when the header must be rewritten (the table moved).
    pub(crate) header_changed: bool,
    /// The old table after a move: its clusters are freed once the header points at the
    /// new one.
    pub(crate) pending_table_free: Option<TableLocation>,
    /// A table growth wrote blocks or a table, possibly past the end of the file.
    pub(crate) grew: bool,
}

/// Where the refcount table lives after [`Refcounts::grow_table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableLocation {
    pub offset: u64,
    pub clusters: u32,
}

impl Refcounts {
    /// The writer's refcounts over `table` (the refcount table at `table_offset`, as
    /// stored), for `1 << order`-bit refcounts. Refuses a table entry that is not a
    /// cluster-aligned block offset.
    pub(crate) fn new(
        table: Vec<u64>,
        table_offset: u64,
        cluster_bits: u32,
        order: u32,
    ) -> Result<Refcounts> {
        let cluster_mask = (1u64 << cluster_bits) - 1;
        for (i, &entry) in table.iter().enumerate() {
            if entry & cluster_mask != 0 {
                return Err(Error::corrupt(
                    "refcount table",
                    table_offset,
                    format!("entry {i} points at unaligned refcount block {entry:#x}"),
                ));
            }
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            dirty_table: BTreeSet::new(),
            blocks: BTreeMap::new(),
            free_hint: 0,
            header_changed: false,
            pending_table_free: None,
            grew: false,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    fn per_block(&self) -> u64 {
        format::refcounts_per_block(self.cluster_bits, self.order)
    }

    /// Offsets of the refcount blocks the table points at (in memory, so also blocks not
    /// on disk yet).
    pub(crate) fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&o| o != 0)
    }

    /// Where the table lives now.
    pub(crate) fn table_location(&self) -> TableLocation {
        let bytes = (self.table.len() as u64 * 8).max(1);
        TableLocation {
            offset: self.table_offset,
            clusters: bytes.div_ceil(self.cluster_size()) as u32,
        }
    }

    fn block(&mut self, storage: &dyn Storage, index: usize) -> Result<Option<&mut Block>> {
        let Some(&offset) = self.table.get(index) else {
            return Ok(None);
        };
        if offset == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&index) {
            if self.blocks.len() >= CLEAN_BLOCKS_KEPT {
                let clean: Vec<usize> = self
                    .blocks
                    .iter()
                    .filter(|(_, b)| !b.dirty)
                    .map(|(&i, _)| i)
                    .collect();
                for i in clean {
                    self.blocks.remove(&i);
                }
            }
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            storage
                .read_at(&mut bytes, offset)
                .map_err(|e| Error::io(format!("reading refcount block at {offset:#x}"), e))?;
            self.blocks.insert(
                index,
                Block {
                    bytes,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&index))
    }

    /// The refcount of host cluster `cluster` (an index, not an offset).
    pub(crate) fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        let per_block = self.per_block();
        let order = self.order;
        let index = usize::try_from(cluster / per_block).unwrap_or(usize::MAX);
        Ok(match self.block(storage, index)? {
            Some(b) => get_refcount(&b.bytes, (cluster % per_block) as usize, order),
            None => 0,
        })
    }

    /// Adds `delta` to the refcount of `count` clusters from `cluster`. The blocks must
    /// exist (clusters in use always have one). Fails, changing nothing further, when a
    /// refcount would overflow its width or drop below zero.
    pub(crate) fn add(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        count: u64,
        delta: i64,
    ) -> Result<()> {
        let per_block = self.per_block();
        let order = self.order;
        let max = max_refcount(order);
        for c in cluster..cluster + count {
            let index = usize::try_from(c / per_block).unwrap_or(usize::MAX);
            let cluster_size = self.cluster_size();
            let block = self.block(storage, index)?.ok_or_else(|| {
                Error::corrupt(
                    "refcount table",
                    0,
                    format!("no refcount block for cluster at {:#x}", c * cluster_size),
                )
            })?;
            let i = (c % per_block) as usize;
            let old = get_refcount(&block.bytes, i, order);
            let new = old
                .checked_add_signed(delta)
                .filter(|&n| n <= max)
                .ok_or_else(|| {
                    Error::corrupt(
                        "refcount block",
                        c * cluster_size,
                        format!("refcount {old} of this cluster cannot change by {delta}"),
                    )
                })?;
            set_refcount(&mut block.bytes, i, order, new);
            block.dirty = true;
            if new == 0 && c < self.free_hint {
                self.free_hint = c;
            }
        }
        Ok(())
    }

    /// Finds `count` contiguous free clusters, raises their refcounts to 1 and returns the
    /// host offset of the first. Ranges without a refcount block get one, placed just
    /// before the run (and counted); a table too small to cover the run is moved to a
    /// larger one at once (see [`Refcounts::grow_table`]).
    ///
    /// `metadata(first, end)` names the first cluster of `first..end` that holds known
    /// metadata: such clusters are never handed out, whatever the refcounts say (a
    /// damaged refcount table may leave the header's range without a block, which reads
    /// as free; QEMU refuses a refcount block at offset 0 for the same reason).
    pub(crate) fn allocate(
        &mut self,
        storage: &dyn Storage,
        count: u64,
        metadata: &dyn Fn(u64, u64) -> Option<u64>,
    ) -> Result<u64> {
        debug_assert!(count > 0);
        let per_block = self.per_block();
        let mut start = self.free_hint;
        loop {
            // New blocks go first, then the run: find how many ranges of the whole
            // stretch lack a block (more blocks can make the stretch reach one more range).
            let mut blocks = 0u64;
            loop {
                let end = start + blocks + count;
                let missing = (start / per_block..=(end - 1) / per_block)
                    .filter(|&r| self.block_offset(r) == 0)
                    .count() as u64;
                if missing == blocks {
                    break;
                }
                blocks = missing;
            }
            let end = start + blocks + count;
            if (end - 1) / per_block >= self.table.len() as u64 {
                self.grow_table(storage, end)?;
                continue;
            }
            if let Some(used) = metadata(start, end) {
                start = used + 1;
                continue;
            }
            if let Some(used) = self.first_used(storage, start, end)? {
                start = used + 1;
                continue;
            }
            let mut at = start;
            for range in start / per_block..=(end - 1) / per_block {
                if self.block_offset(range) == 0 {
                    self.new_block_at(range as usize, at);
                    at += 1;
                }
            }
            self.add(storage, start, blocks + count, 1)?;
            self.free_hint = end;
            return Ok((start + blocks) << self.cluster_bits);
        }
    }

    /// The offset of refcount block `range` (0 when it has none or lies past the table).
    fn block_offset(&self, range: u64) -> u64 {
        usize::try_from(range)
            .ok()
            .and_then(|r| self.table.get(r))
            .copied()
            .unwrap_or(0)
    }

    /// The first cluster in `start..end` with a non-zero refcount.
    fn first_used(&mut self, storage: &dyn Storage, start: u64, end: u64) -> Result<Option<u64>> {
        let per_block = self.per_block();
        let mut c = start;
        while c < end {
            if self.block_offset(c / per_block) == 0 {
                c = (c / per_block + 1) * per_block; // a range without a block is free
                continue;
            }
            if self.get(storage, c)? != 0 {
                return Ok(Some(c));
            }
            c += 1;
        }
        Ok(None)
    }

    /// Creates an empty refcount block for range `index` at cluster `at` (the caller
    /// counts the cluster).
    fn new_block_at(&mut self, index: usize, at: u64) {
        let bytes = vec![0u8; self.cluster_size() as usize];
        self.blocks.insert(index, Block { bytes, dirty: true });
        self.table[index] = at << self.cluster_bits;
        self.dirty_table.insert(index);
    }

    /// Moves the refcount table to a larger one covering at least `cover` clusters, placed
    /// past everything in use together with the blocks that describe it. Writes the new
    /// blocks and table, then flushes, so that the caller can switch the header to it.
    fn grow_table(&mut self, storage: &dyn Storage, cover: u64) -> Result<()> {
        self.grew = true;
        let per_block = self.per_block();
        let per_cluster = self.cluster_size() / 8;
        let old_entries = self.table.len() as u64;
        let old = self.table_location();
        // Everything at or past the old coverage is free, and so is everything past the
        // file's end: put the new area past both (a damaged table may cover nothing, or
        // less than the file, whose clusters may still hold metadata).
        let file_clusters = storage
            .len()
            .map_err(|e| Error::io("reading the file length", e))?
            .div_ceil(self.cluster_size());
        let area = (old_entries * per_block).max(file_clusters);
        let mut entries = (old_entries * 2).max(cover.div_ceil(per_block)).max(1);
        let (table_clusters, blocks) = loop {
            let table_clusters = (entries * 8).div_ceil(self.cluster_size());
            // Blocks follow the table; count those needed to cover the table and them.
            let mut blocks = 0u64;
            loop {
                let end = area + table_clusters + blocks;
                let needed = end.div_ceil(per_block).saturating_sub(old_entries);
                if needed <= blocks {
                    break;
                }
                blocks = needed;
            }
            let end = area + table_clusters + blocks;
            if end.div_ceil(per_block) <= entries {
                break (table_clusters, blocks);
            }
            entries = end.div_ceil(per_block);
        };
        let entries = entries.div_ceil(per_cluster) * per_cluster;
        let table_at = area;
        let blocks_at = area + table_clusters;
        // Build the new table and blocks aside and adopt them only once they are on disk:
        // if a write fails (a full disk), the refcounts in memory still describe the old
        // table, which is the one the header names.
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        let mut new_blocks = Vec::new();
        for b in 0..blocks {
            let cluster = blocks_at + b;
            let index = (old_entries + b) as usize;
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            // Count every cluster of the new area that falls in this block's range.
            let range = (index as u64) * per_block..(index as u64 + 1) * per_block;
            for c in table_at..blocks_at + blocks {
                if range.contains(&c) {
                    set_refcount(&mut bytes, (c % per_block) as usize, self.order, 1);
                }
            }
            storage
                .write_at(&bytes, cluster << self.cluster_bits)
                .map_err(|e| Error::io("writing a new refcount block", e))?;
            table[index] = cluster << self.cluster_bits;
            new_blocks.push((index, bytes));
        }
        // Blocks the old table pointed at but whose entries are still only in memory
        // must reach the disk before a table that points at them.
        self.write_blocks(storage)?;
        let mut bytes = vec![0u8; (table_clusters * self.cluster_size()) as usize];
        format::encode_u64_table(&table, &mut bytes);
        storage
            .write_at(&bytes, table_at << self.cluster_bits)
            .map_err(|e| Error::io("writing the new refcount table", e))?;
        storage
            .flush()
            .map_err(|e| Error::io("flushing the new refcount table", e))?;
        self.table = table;
        for (index, bytes) in new_blocks {
            self.blocks.insert(
                index,
                Block {
                    bytes,
                    dirty: false,
                },
            );
        }
        self.table_offset = table_at << self.cluster_bits;
        self.dirty_table.clear();
        self.header_changed = true;
        self.free_hint = self.free_hint.max(blocks_at + blocks);
        // The old table's clusters are freed once the header points at the new one; the
        // caller writes the header before the next checkpoint writes these refcounts.
        self.pending_table_free = Some(old);
        Ok(())
    }

    /// Whether refcounts changed in memory since they were last written.
    pub(crate) fn has_changes(&self) -> bool {
        !self.dirty_table.is_empty() || self.blocks.values().any(|b| b.dirty)
    }

    /// Writes dirty refcount blocks (not the table).
    fn write_blocks(&mut self, storage: &dyn Storage) -> Result<()> {
        for (&index, block) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let offset = self.table[index];
            storage
                .write_at(&block.bytes, offset)
                .map_err(|e| Error::io(format!("writing refcount block at {offset:#x}"), e))?;
            block.dirty = false;
        }
        Ok(())
    }

    /// Writes every dirty block, then (after a flush, when any table entry changed) the
    /// changed table entries: a table entry never reaches the disk before its block, nor
    /// before the table entry of the block that counts it.
    pub(crate) fn write_dirty(&mut self, storage: &dyn Storage) -> Result<()> {
        self.write_blocks(storage)?;
        if self.dirty_table.is_empty() {
            return Ok(());
        }
        storage
            .flush()
            .map_err(|e| Error::io("flushing new refcount blocks", e))?;
        // A new block may lie in (and be counted by) another range whose block is new
        // too: `allocate` puts all the blocks a run needs just before it. Its table entry
        // must wait until that range's entry is durable, or a crash leaves a block that
        // the table points at without a refcount. So write in rounds — the entries whose
        // block counts itself or is counted by a range already on disk, then a flush.
        let per_block = self.per_block();
        while !self.dirty_table.is_empty() {
            let waits = |index: usize| {
                let counted_by = (self.table[index] >> self.cluster_bits) / per_block;
                counted_by != index as u64
                    && usize::try_from(counted_by).is_ok_and(|r| self.dirty_table.contains(&r))
            };
            let mut ready: Vec<usize> = self
                .dirty_table
                .iter()
                .copied()
                .filter(|&i| !waits(i))
                .collect();
            if ready.is_empty() {
                // Cannot happen (blocks are counted by lower ranges); write them all.
                ready = self.dirty_table.iter().copied().collect();
            }
            for index in ready {
                let entry = self.table[index].to_be_bytes();
                let at = self.table_offset + index as u64 * 8;
                storage
                    .write_at(&entry, at)
                    .map_err(|e| Error::io("writing the refcount table", e))?;
                // Forgotten only once written, so that a failed write is retried.
                self.dirty_table.remove(&index);
            }
            if !self.dirty_table.is_empty() {
                storage
                    .flush()
                    .map_err(|e| Error::io("flushing the refcount table", e))?;
            }
        }
        Ok(())
    }
}
