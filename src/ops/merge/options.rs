//! What a merge is asked to do and what it reports: [`MergeOptions`] (shared by the
//! merges), [`CommitOptions`], [`StorageCopy`], [`MergeReport`].

use std::path::PathBuf;

use crate::chain::ChainOptions;
use crate::storage::Locking;

/// What a merge copied (or, in a dry run, would copy).
///
/// `data_bytes + zero_bytes + already_done_bytes` is the merge's whole work: every byte
/// the destination must show is counted once, as written or as found in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Bytes of data written to the destination.
    pub data_bytes: u64,
    /// Bytes made to read as zeros in the destination (zero flags).
    pub zero_bytes: u64,
    /// Bytes the merge had to bring to the destination but found there already, equal,
    /// and so did not write: what an interrupted run of the same merge had copied (and
    /// flushed), or what the destination itself held equal before. Only what the
    /// destination allocates counts, so a fresh commit into an area its base does not
    /// allocate reports 0.
    pub already_done_bytes: u64,
    /// Bytes of the guest range examined.
    pub examined_bytes: u64,
}

/// The default of [`MergeOptions::checkpoint_bytes`]: 1 GiB. Each checkpoint waits for
/// the disk (several flushes) and stalls the copy; at 1 GiB they stay rare while an
/// interrupted long merge still keeps most of its work.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 1 << 30;

/// Options shared by the merges.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Only report what would be copied; change nothing.
    pub dry_run: bool,
    /// How images are opened: their storage ([`crate::ImageOptions::opener`]), the
    /// backing policy, the depth limit, the L2 cache. Each step of a merge sets
    /// `writable`, `no_backing` and `format` itself (formats are probed, or come from the
    /// backing format a chain stores).
    pub chain: ChainOptions,
    /// Flush the destination whenever this many bytes (data and zeros) went into it since
    /// the last flush, so that an interruption keeps them and a rerun skips them; 0
    /// flushes only at the end. Default [`DEFAULT_CHECKPOINT_BYTES`].
    pub checkpoint_bytes: u64,
    /// When data goes to the destination as a storage copy (`copy_file_range` for host
    /// files) instead of being read and written. Default [`StorageCopy::Auto`].
    pub storage_copy: StorageCopy,
    /// How `rebase` locks the new backing chain it opens to compare with: `None` as
    /// `chain` says; [`Locking::ForceShare`] is qemu-img rebase's `-U`, which opens the
    /// old and new backing files apart from the image (the image's own chain is still
    /// locked, as in qemu-img).
    pub new_backing_locking: Option<Locking>,
    /// `rebase`: store the clusters copied into the image compressed (qemu-img rebase's
    /// `-c`; qcow2 images).
    pub compress: bool,
}

impl Default for MergeOptions {
    fn default() -> MergeOptions {
        MergeOptions {
            dry_run: false,
            chain: ChainOptions::default(),
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            storage_copy: StorageCopy::Auto,
            new_backing_locking: None,
            compress: false,
        }
    }
}

/// When a merge lets the storage copy data ([`crate::storage::Storage::copy_from`])
/// instead of reading it and writing it. Only uncompressed data goes this way, and not
/// where the destination's own data is still compared with it (looking for what an
/// interrupted run left, see [`MergeReport::already_done_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageCopy {
    /// Where the copy shares extents: source and destination are host files on one XFS
    /// or Btrfs file system, and the kernel's `copy_file_range` makes the destination's
    /// clusters point at the source's blocks without moving data. Elsewhere data is read
    /// ahead on several threads and written, which measured faster than the kernel's
    /// copy (ext4 copies page by page, one request at a time).
    #[default]
    Auto,
    /// For all such data (for example to a file system that copies on the server).
    Always,
    /// Never: always read and write.
    Never,
}

/// `qemu-img commit` and libvirt blockcommit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The image to commit into (default: the backing file of `top`). Named as qemu-img
    /// names a base ([`Chain::find`](crate::Chain::find)): the backing name an image of
    /// the chain stores, or a path; so is `top`.
    pub base: Option<PathBuf>,
    /// The highest image whose data is committed (default: the image the command starts
    /// from). When it is below that image, the image directly above it is re-pointed at
    /// the base afterwards (libvirt's blockcommit of a middle range).
    pub top: Option<PathBuf>,
    /// Keep the committed image's data (`-d`); implied by `base` or a `top` below the
    /// starting image, as in qemu-img.
    pub keep: bool,
    /// Commit even when images outside the chain depend on the base and would change
    /// (see [`crate::Error::HasDependents`]); qemu-img never looks.
    pub force: bool,
    /// More directories to look for images depending on the base in, besides those of
    /// the chain's images.
    pub also_in: Vec<PathBuf>,
    /// Merge each committed layer's persistent bitmaps into the base's bitmap of the same
    /// name, as libvirt's blockcommit does, so that a backup chain over the base stays
    /// incremental: the base's bitmap then also holds what changed in the layers above it
    /// since that bitmap began. (The base's enabled bitmaps record the commit's own writes
    /// either way.) Bitmaps in use, and names the base lacks, are left alone.
    pub merge_bitmaps: bool,
    /// Shared options.
    pub merge: MergeOptions,
}
