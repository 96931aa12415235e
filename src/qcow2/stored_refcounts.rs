//! Refcounts as the image file stores them (spec: "Host cluster management"): the one
//! reader of the refcount table and blocks. The writer's refcounts (`refcount.rs`) start
//! from the table read here; the check and the metadata-preallocation test read refcounts
//! through [`StoredRefcounts`], which tolerates damage.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::{self, get_refcount, refcounts_per_block};

use super::image::Image;
use super::refcount::Refcounts;

impl Image {
    /// The refcount table as stored (bounded by the file; checked by the caller).
    pub(crate) fn read_refcount_table(&self) -> Result<Vec<u64>> {
        let header = self.header();
        let len = u64::from(header.refcount_table_clusters) * self.cluster_size();
        let bytes = self.read_metadata("refcount table", header.refcount_table_offset, len)?;
        Ok(format::decode_u64_table(&bytes))
    }

    /// The writer's refcounts, starting from the refcount table the header names.
    pub(crate) fn load_refcounts(&self) -> Result<Refcounts> {
        let header = self.header();
        Refcounts::new(
            self.read_refcount_table()?,
            header.refcount_table_offset,
            header.cluster_bits,
            header.refcount_order,
        )
    }
}

/// Stored refcounts, read straight from the refcount table and blocks (a few blocks
/// cached), tolerating damage: a cluster no block covers has refcount 0, and one whose
/// block cannot be read (its offset unaligned or past the end of the file) has none.
pub(crate) struct StoredRefcounts<'a> {
    image: &'a Image,
    table: Vec<u64>,
    order: u32,
    per_block: u64,
    blocks: HashMap<usize, Block>,
}

/// A refcount block as [`StoredRefcounts`] found it.
enum Block {
    Read(Vec<u8>),
    /// No block: every refcount it would hold is 0.
    Missing,
    /// The table entry cannot be followed.
    Unusable,
}

impl<'a> StoredRefcounts<'a> {
    /// Reads the refcount table; one that cannot be read counts as empty.
    pub(crate) fn new(image: &'a Image) -> StoredRefcounts<'a> {
        let header = image.header();
        StoredRefcounts {
            image,
            table: image.read_refcount_table().unwrap_or_default(),
            order: header.refcount_order,
            per_block: refcounts_per_block(header.cluster_bits, header.refcount_order),
            blocks: HashMap::new(),
        }
    }

    /// The stored refcount of `cluster`; `None` when the refcount table entry covering it
    /// is unusable (unaligned, or past the end of the file).
    pub(crate) fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
        let index = (cluster / self.per_block) as usize;
        if !self.blocks.contains_key(&index) {
            if self.blocks.len() >= 64 {
                self.blocks.clear();
            }
            let cs = self.image.cluster_size();
            let block = match self.table.get(index) {
                None | Some(0) => Block::Missing,
                Some(&offset) if offset % cs != 0 => Block::Unusable,
                Some(&offset) => match self.image.read_metadata("refcount block", offset, cs) {
                    Ok(bytes) => Block::Read(bytes),
                    Err(Error::Truncated { .. }) => Block::Unusable,
                    Err(e) => return Err(e),
                },
            };
            self.blocks.insert(index, block);
        }
        Ok(match &self.blocks[&index] {
            Block::Read(bytes) => Some(get_refcount(
                bytes,
                (cluster % self.per_block) as usize,
                self.order,
            )),
            Block::Missing => Some(0),
            Block::Unusable => None,
        })
    }

    /// Clusters the refcount table covers (past them, every refcount is 0).
    pub(crate) fn covered(&self) -> u64 {
        self.table.len() as u64 * self.per_block
    }
}

impl Image {
    /// Whether one of the first `clusters` clusters past the end of the file has a
    /// non-zero stored refcount. A check leaves them out (QEMU's too), but a write that
    /// extends the file over one makes it a leak, in QEMU as here: the fuzz harnesses
    /// take an image as clean only without them.
    #[cfg(feature = "testing")]
    pub(crate) fn has_refcounts_past_end(&self, clusters: u64) -> Result<bool> {
        let first = self.file_len().div_ceil(self.cluster_size());
        let mut stored = StoredRefcounts::new(self);
        let end = first.saturating_add(clusters).min(stored.covered());
        for cluster in first..end {
            if stored.get(cluster)? != Some(0) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
