//! The write side's own state, apart from the image it writes (so that `Image` can hold
//! it without importing the write path).

use std::collections::BTreeSet;

use crate::error::Result;

use crate::qcow2::refcount::Refcounts;

/// Reads guest content below this image (its backing chain, zeros past its end) for
/// copy-on-write: fills the buffer with what the backing chain shows at the offset.
pub(crate) type BackingRead<'a> = &'a (dyn Fn(&mut [u8], u64) -> Result<()> + Sync);

/// Write-side state of an image opened for writing.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) refcounts: Refcounts,
    /// L2 tables changed in memory (pinned in the cache).
    pub(super) dirty_l2: BTreeSet<u64>,
    /// L1 indices changed in memory.
    pub(super) dirty_l1: BTreeSet<usize>,
    /// Header fields changed in memory.
    pub(super) header_dirty: bool,
    /// Refcount drops (cluster index, count) to apply after the next checkpoint.
    pub(super) pending_free: Vec<(u64, u64)>,
    /// Refcount updates are postponed (lazy refcounts, dirty bit set while they lag).
    pub(super) lazy: bool,
    /// Free bytes after the last compressed cluster stored since the last checkpoint
    /// (next byte, end of its host cluster): the next one is packed there.
    pub(super) compressed_tail: Option<(u64, u64)>,
    /// Clusters (indices) allocated for new L2 tables ahead of need and not used yet:
    /// see [`crate::qcow2::Image::batch_new_l2_tables`]. Released at every checkpoint
    /// before refcounts are written, so no image on disk counts them.
    pub(super) l2_reserve: std::ops::Range<u64>,
    /// How many clusters a new reserve takes (1: none, each table allocated alone).
    pub(super) l2_batch: u64,
}

impl Writer {
    /// A writer over `refcounts` with nothing pending, refcounts kept current.
    pub(crate) fn new(refcounts: Refcounts) -> Writer {
        Writer {
            refcounts,
            dirty_l2: BTreeSet::new(),
            dirty_l1: BTreeSet::new(),
            header_dirty: false,
            pending_free: Vec::new(),
            lazy: false,
            compressed_tail: None,
            l2_reserve: 0..0,
            l2_batch: 1,
        }
    }

    pub(crate) fn set_lazy(&mut self, lazy: bool) {
        self.lazy = lazy;
    }
}
