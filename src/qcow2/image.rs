//! One open qcow2 image: what it holds and how it is opened ([`ImageOptions`]). Opening is
//! `open.rs`, reading `read.rs`, the lookup `lookup.rs`, writing `write/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Geometry, Header, HeaderExtensions,
    IncompatibleFeatures, SnapshotEntry,
};
use crate::storage::{Locking, Opener, Storage};

use super::bitmaps::BitmapSet;
use super::l2cache::L2Cache;
use super::overlap_map::MetadataMap;
use super::write::Writer;

/// How to open an image.
#[derive(Clone)]
pub struct ImageOptions {
    /// Bytes of decoded L2 tables to keep cached (default 8 MiB: 64 GiB of guest data
    /// with 64 KiB clusters).
    pub l2_cache_bytes: u64,
    /// Open for writing (default: read-only).
    pub writable: bool,
    /// Opens the image's file and its external data file (default `None`: host files,
    /// [`crate::storage::FileStorage`]). Chains pass it on to every layer.
    pub opener: Option<Arc<dyn Opener>>,
    /// QEMU's image locks on the image's file and its external data file (default
    /// [`Locking::On`]: refused while another process writes the image, or reads it when
    /// opening for writing; held until the image is dropped).
    pub locking: Locking,
}

impl Default for ImageOptions {
    fn default() -> ImageOptions {
        ImageOptions {
            l2_cache_bytes: 8 << 20,
            writable: false,
            opener: None,
            locking: Locking::On,
        }
    }
}

impl std::fmt::Debug for ImageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageOptions")
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("writable", &self.writable)
            .field("opener", &self.opener.as_ref().map(|_| "custom"))
            .field("locking", &self.locking)
            .finish()
    }
}

impl ImageOptions {
    /// Opens the file at `path` through [`ImageOptions::opener`] and takes its locks
    /// ([`ImageOptions::locking`]); errors name the file.
    pub(crate) fn open_storage(&self, path: &Path, writable: bool) -> Result<Box<dyn Storage>> {
        self.open_unnamed(path, writable)
            .map_err(|e| e.in_file(path))
    }

    /// [`ImageOptions::open_storage`] with errors that leave naming the file to the
    /// caller.
    pub(crate) fn open_unnamed(&self, path: &Path, writable: bool) -> Result<Box<dyn Storage>> {
        let mode = self.locking.mode(writable)?;
        let storage = crate::storage::open_with(self.opener.as_deref(), path, writable)
            .map_err(|e| Error::io("opening", e))?;
        if let Some(mode) = mode {
            storage.lock(mode)?;
        }
        Ok(storage)
    }
}

/// One open qcow2 image (without its backing chain; see [`crate::Chain`]).
///
/// `Image` is `Send + Sync`: metadata sits behind short-lived locks and data I/O is
/// positional, so several threads read (and overwrite allocated clusters) at once, while
/// anything that changes metadata takes the image for itself.
pub struct Image {
    pub(crate) name: PathBuf,
    pub(crate) storage: Box<dyn Storage>,
    pub(crate) data_file: Option<Box<dyn Storage>>,
    pub(crate) geometry: Geometry,
    /// Guest data lives in `data_file` (fixed at open).
    pub(super) external_data_file: bool,
    pub(crate) meta: RwLock<Meta>,
    pub(crate) l2_cache: L2Cache,
    /// Never below the image file's length: its length at open, raised by every
    /// allocation and write past it (a file shrunk since leaves it above).
    pub(crate) file_len: AtomicU64,
    /// Where guest data went since the last [`Image::start_writeback`].
    pub(crate) data_written: WrittenRuns,
    /// The last decompressed cluster: reads smaller than a cluster hit it repeatedly.
    pub(super) last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Shared by reads and in-place overwrites; exclusive for metadata changes.
    pub(crate) io_lock: RwLock<()>,
    /// Write-side state; `None` for a read-only image.
    pub(crate) writer: Option<Mutex<Writer>>,
    /// Where metadata lives, for the overlap checks before writes (`overlap.rs`).
    pub(crate) overlap: RwLock<MetadataMap>,
    /// Persistent bitmaps kept valid by the writes of a writable image (`bitmaps/`).
    pub(crate) bitmaps: RwLock<BitmapSet>,
}

/// The parts of an image that metadata changes rewrite.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) header: Header,
    pub(crate) extensions: HeaderExtensions,
    pub(crate) backing_file: Option<String>,
    pub(crate) l1: Vec<u64>,
    pub(crate) snapshots: Vec<SnapshotEntry>,
    /// Where the live bitmap directory's tables are (`(offset, bytes)`), for the overlap
    /// map; known once a writable open read the directory.
    pub(crate) bitmap_tables: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("header", &self.meta().header)
            .finish_non_exhaustive()
    }
}

/// The host ranges written to since they were last taken: a hint for
/// [`Image::start_writeback`], which drops the pages it starts writing. So the ranges
/// are runs of what was written, not one span from the lowest byte to the highest: data
/// that filled a free cluster low in the file would make such a span cover every table
/// above it, which the copy then re-reads from the disk (6,242 L2 tables in one
/// metadata-heavy commit). Runs closer than a few clusters and a batch of L2 tables merge
/// (the gap holds what was allocated with the data: its new L2 tables and refcount
/// blocks, held in memory until written whole); past [`MAX_WRITTEN_RUNS`] the run
/// nearest to a write grows over it.
#[derive(Debug)]
pub(crate) struct WrittenRuns {
    runs: Mutex<Vec<std::ops::Range<u64>>>,
    merge_gap: u64,
}

/// How much of the file a batch of new L2 tables takes (see
/// [`Image::batch_new_l2_tables`]).
pub(crate) const L2_BATCH_BYTES: u64 = 256 << 10;

/// Runs kept between two takes. Few: each run costs the storage a writeback pass of its
/// own (with 64, the scattered in-place writes of a commit made 781 passes instead of 28
/// and took 2.5 times as long); with 4 the metadata-heavy commit kept its gain.
pub(crate) const MAX_WRITTEN_RUNS: usize = 4;

impl WrittenRuns {
    pub(crate) fn new(cluster_size: u64) -> WrittenRuns {
        WrittenRuns {
            runs: Mutex::new(Vec::new()),
            merge_gap: 4 * cluster_size + L2_BATCH_BYTES,
        }
    }

    /// Notes a write of `len` bytes at `host`.
    pub(crate) fn note(&self, host: u64, len: u64) {
        let end = host.saturating_add(len);
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        // Newest first: copies mostly write after what they wrote last.
        let near = |run: &std::ops::Range<u64>| {
            host <= run.end.saturating_add(self.merge_gap)
                && end.saturating_add(self.merge_gap) >= run.start
        };
        let run = match runs.iter().rposition(near) {
            Some(i) => i,
            None if runs.len() < MAX_WRITTEN_RUNS => {
                runs.push(host..end);
                return;
            }
            // Full: the nearest run grows over the gap, as one span would have.
            None => (0..runs.len())
                .min_by_key(|&i| {
                    runs[i]
                        .start
                        .saturating_sub(end)
                        .max(host.saturating_sub(runs[i].end))
                })
                .expect("the runs are full"),
        };
        let run = &mut runs[run];
        run.start = run.start.min(host);
        run.end = run.end.max(end);
    }

    /// The runs written since the last call, forgotten.
    pub(crate) fn take(&self) -> Vec<std::ops::Range<u64>> {
        std::mem::take(&mut *self.runs.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Reads `len` bytes at `offset` of `storage`, refusing a range past `file_len`.
pub(super) fn read_exact(
    storage: &dyn Storage,
    structure: &'static str,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<Vec<u8>> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > file_len) {
        return Err(Error::Truncated {
            structure,
            offset,
            len,
            file_len,
        });
    }
    let mut buf = vec![0u8; len as usize];
    storage
        .read_at(&mut buf, offset)
        .map_err(|e| Error::io(format!("reading {structure} at {offset:#x}"), e))?;
    Ok(buf)
}

impl Image {
    /// The name given at open (a path for files).
    pub fn name(&self) -> &Path {
        &self.name
    }
    pub(crate) fn meta(&self) -> RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn meta_mut(&self) -> RwLockWriteGuard<'_, Meta> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }
    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta().header.clone()
    }
    /// A copy of the header extensions.
    pub fn extensions(&self) -> HeaderExtensions {
        self.meta().extensions.clone()
    }
    /// Cluster and L2 geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }
    /// Virtual size in bytes: the header's size in whole 512-byte sectors, as QEMU reads
    /// it (QEMU only ever writes multiples of 512; a hostile header's odd tail is not part
    /// of the disk).
    pub fn size(&self) -> u64 {
        self.meta().header.size & !511
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geometry.cluster_size()
    }
    /// The backing file name as stored in the image.
    pub fn backing_file(&self) -> Option<String> {
        self.meta().backing_file.clone()
    }
    /// The backing file format from the header extension.
    pub fn backing_format(&self) -> Option<String> {
        self.meta().extensions.backing_format().map(str::to_owned)
    }
    /// The external data file name, if the image uses one.
    pub fn data_file_name(&self) -> Option<String> {
        if !self.has_external_data_file() {
            return None;
        }
        self.meta().extensions.data_file().map(str::to_owned)
    }
    fn incompatible(&self) -> IncompatibleFeatures {
        self.meta().header.incompatible_features
    }
    /// Whether guest data lives in an external data file.
    pub fn has_external_data_file(&self) -> bool {
        self.external_data_file
    }
    /// Whether the external data file is a consistent raw image by itself.
    pub fn data_file_raw(&self) -> bool {
        self.meta()
            .header
            .autoclear_features
            .contains(AutoclearFeatures::DATA_FILE_RAW)
    }
    /// A copy of the internal snapshot table.
    pub fn snapshots(&self) -> Vec<SnapshotEntry> {
        self.meta().snapshots.clone()
    }
    /// Compression used for compressed clusters.
    pub fn compression_type(&self) -> CompressionType {
        self.meta().header.compression_type
    }
    /// Whether the dirty bit is set.
    pub fn is_dirty(&self) -> bool {
        self.incompatible().contains(IncompatibleFeatures::DIRTY)
    }
    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible().contains(IncompatibleFeatures::CORRUPT)
    }
    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.meta()
            .header
            .compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
    }
    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }
    /// Lowers a read-only image's L2 cache to about `bytes` (at least one table); a
    /// writable image keeps its cache (its changed tables live there).
    pub(crate) fn limit_l2_cache(&self, bytes: u64) {
        let tables = (bytes / self.cluster_size()).max(1) as usize;
        if self.writer.is_none() && tables < self.l2_cache.capacity() {
            self.l2_cache.set_capacity(tables);
        }
    }
    /// Length of the image file in bytes, as this image knows it: its length at open,
    /// raised by every allocation and write past it (never below the file's length).
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Relaxed)
    }
    /// Bytes the image file occupies on disk, when the storage knows.
    pub fn allocated_size(&self) -> Option<u64> {
        self.storage.allocated_size()
    }

    pub(crate) fn name_error(&self, e: Error) -> Error {
        e.in_file(&self.name)
    }

    /// Reads `len` bytes of metadata at `offset` of the image file, refusing ranges past
    /// its end.
    pub(crate) fn read_metadata(
        &self,
        structure: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        read_exact(&*self.storage, structure, offset, len, self.file_len())
    }

    pub(crate) fn data_storage(&self) -> &dyn Storage {
        self.data_file.as_deref().unwrap_or(&*self.storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_runs_keep_distant_writes_apart_and_merge_near_ones() {
        let runs = WrittenRuns::new(4096);
        // Data after its freshly allocated L2 table, twice: one run over both.
        runs.note(1 << 20, 4096);
        runs.note((1 << 20) + 8192, 4096);
        // A free cluster filled far below: a run of its own.
        runs.note(20 << 20, 4096);
        // Overlapping and just below the first run: merged into it.
        runs.note((1 << 20) - 4096, 8192);
        assert_eq!(
            runs.take(),
            vec![
                (1 << 20) - 4096..(1 << 20) + 12288,
                (20 << 20)..(20 << 20) + 4096
            ]
        );
        assert!(runs.take().is_empty());
    }

    #[test]
    fn written_runs_are_bounded() {
        let runs = WrittenRuns::new(512);
        for i in 0..10 * MAX_WRITTEN_RUNS as u64 {
            runs.note(i << 20, 512);
        }
        let last = MAX_WRITTEN_RUNS - 1;
        let taken = runs.take();
        assert_eq!(taken.len(), MAX_WRITTEN_RUNS);
        // Every later write went into the last run, the nearest to them.
        let at = |i: usize| (i as u64) << 20;
        assert_eq!(taken[last - 1], at(last - 1)..at(last - 1) + 512);
        assert_eq!(taken[last], at(last)..at(10 * MAX_WRITTEN_RUNS - 1) + 512);
    }
}
