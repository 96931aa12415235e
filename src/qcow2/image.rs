//! Opening one qcow2 image and reading its data.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::{
    self, AutoclearFeatures, CompatibleFeatures, CompressionType, FeatureKind, Geometry, Header,
    HeaderExtensions, IncompatibleFeatures, L1Entry, SnapshotEntry,
};
use crate::storage::{Extent, Opener, Storage};

use super::compress::decompress;
use super::l2cache::{L2Cache, L2Table};
use super::mapping::{Mapping, Run};
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
}

impl Default for ImageOptions {
    fn default() -> ImageOptions {
        ImageOptions {
            l2_cache_bytes: 8 << 20,
            writable: false,
            opener: None,
        }
    }
}

impl std::fmt::Debug for ImageOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageOptions")
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("writable", &self.writable)
            .field("opener", &self.opener.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl ImageOptions {
    /// Opens the file at `path` through [`ImageOptions::opener`].
    pub(crate) fn open_storage(
        &self,
        path: &Path,
        writable: bool,
    ) -> std::io::Result<Box<dyn Storage>> {
        crate::storage::open_with(self.opener.as_deref(), path, writable)
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
    external_data_file: bool,
    pub(crate) meta: RwLock<Meta>,
    pub(crate) l2_cache: L2Cache,
    pub(crate) file_len: AtomicU64,
    /// The last decompressed cluster: reads smaller than a cluster hit it repeatedly.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Shared by reads and in-place overwrites; exclusive for metadata changes.
    pub(crate) io_lock: RwLock<()>,
    /// Write-side state; `None` for a read-only image.
    pub(crate) writer: Option<Mutex<Writer>>,
    /// Where metadata lives, for the overlap checks before writes (`overlap.rs`).
    pub(crate) overlap: RwLock<super::overlap::MetadataMap>,
}

/// The parts of an image that metadata changes rewrite.
#[derive(Debug)]
pub(crate) struct Meta {
    pub(crate) header: Header,
    pub(crate) extensions: HeaderExtensions,
    pub(crate) backing_file: Option<String>,
    pub(crate) l1: Vec<u64>,
    pub(crate) snapshots: Vec<SnapshotEntry>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("name", &self.name)
            .field("header", &self.meta().header)
            .finish_non_exhaustive()
    }
}

fn read_exact(
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
    /// Opens the qcow2 image at `path` read-only with default options. An external data
    /// file is opened relative to the image's directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        Image::open_with(path, &ImageOptions::default())
    }

    /// Opens the qcow2 image at `path` read-only.
    pub fn open_with(path: impl AsRef<Path>, options: &ImageOptions) -> Result<Image> {
        let path = path.as_ref();
        let storage = options
            .open_storage(path, options.writable)
            .map_err(|e| Error::io("opening", e).in_file(path))?;
        let read_only = ImageOptions {
            writable: false,
            ..options.clone()
        };
        let mut image = Image::from_storage_inner(storage, path.to_path_buf(), &read_only, None)
            .map_err(|e| e.in_file(path))?;
        if image.has_external_data_file() {
            let meta = image.meta();
            let name = meta
                .extensions
                .data_file()
                .map(str::to_owned)
                .ok_or_else(|| {
                    Error::invalid(
                        "incompatible_features",
                        meta.header.incompatible_features.bits(),
                        "external data file bit set but no data file name extension",
                    )
                    .in_file(path)
                })?;
            drop(meta);
            let data_path = crate::names::resolve_relative(path, &name);
            let data = options
                .open_storage(&data_path, options.writable)
                .map_err(|e| {
                    Error::io(
                        format!("opening external data file {}", data_path.display()),
                        e,
                    )
                    .in_file(path)
                })?;
            image.data_file = Some(data);
        }
        if options.writable {
            image.make_writable().map_err(|e| e.in_file(path))?;
        }
        Ok(image)
    }

    /// Opens the image at `path` for [`Image::repair`]: the file is opened for writing but
    /// the image is not prepared for guest writes, so a dirty or corrupt image opens
    /// as it is.
    pub fn open_for_repair(path: impl AsRef<Path>) -> Result<Image> {
        let path = path.as_ref();
        let options = ImageOptions::default();
        let storage = options
            .open_storage(path, true)
            .map_err(|e| Error::io("opening", e).in_file(path))?;
        Image::from_storage_inner(storage, path.to_path_buf(), &options, None)
            .map_err(|e| e.in_file(path))
    }

    /// Opens an image held in any [`Storage`]. `name` is used in error messages. An image
    /// with an external data file needs `data_file`.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        name: impl Into<PathBuf>,
        options: &ImageOptions,
        data_file: Option<Box<dyn Storage>>,
    ) -> Result<Image> {
        let name = name.into();
        let external = data_file.is_some();
        let mut image = Image::from_storage_inner(storage, name.clone(), options, data_file)
            .map_err(|e| e.in_file(&name))?;
        if image.has_external_data_file() && !external {
            return Err(Error::InvalidArgument(
                "image has an external data file but none was given".into(),
            )
            .in_file(&name));
        }
        if options.writable {
            image.make_writable().map_err(|e| e.in_file(&name))?;
        }
        Ok(image)
    }

    fn from_storage_inner(
        storage: Box<dyn Storage>,
        name: PathBuf,
        options: &ImageOptions,
        data_file: Option<Box<dyn Storage>>,
    ) -> Result<Image> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e))?;
        // The header and its extensions live in the first cluster; read what is there
        // (at most 2 MiB) and let decode say what is missing.
        let first = read_exact(&*storage, "header", 0, file_len.min(512), file_len)?;
        let probe = Header::decode(&first);
        let header = match probe {
            Ok(h) => h,
            Err(Error::Truncated { .. }) if file_len > 512 => Header::decode(&read_exact(
                &*storage,
                "header",
                0,
                file_len.min(1 << format::MAX_CLUSTER_BITS),
                file_len,
            )?)?,
            Err(e) => return Err(e),
        };
        let cluster_size = header.cluster_size();
        let first_cluster = read_exact(
            &*storage,
            "header cluster",
            0,
            file_len.min(cluster_size),
            file_len,
        )?;
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            cluster_size
        };
        let ext_start = u64::from(header.header_length);
        // Version 2 images have extensions too (after the 72-byte header), as QEMU reads them.
        let extensions = if ext_end > ext_start {
            let area_end = (ext_end as usize).min(first_cluster.len());
            let area = first_cluster
                .get(ext_start as usize..area_end)
                .unwrap_or(&[]);
            HeaderExtensions::decode(area, ext_start)?
        } else {
            HeaderExtensions::default()
        };
        extensions.validate(&header)?;
        check_features(&header, &extensions)?;
        // An empty name is no backing file, as QEMU reads it.
        let backing_file = if header.backing_file_offset != 0 && header.backing_file_size != 0 {
            let raw = read_exact(
                &*storage,
                "backing file name",
                header.backing_file_offset,
                header.backing_file_size.into(),
                file_len,
            )?;
            if raw.contains(&0) {
                // QEMU would cut the name at the NUL; a name holding one is not a path.
                return Err(Error::invalid(
                    "backing file name",
                    header.backing_file_offset,
                    "contains a NUL byte",
                ));
            }
            Some(String::from_utf8(raw).map_err(|_| {
                Error::invalid(
                    "backing file name",
                    header.backing_file_offset,
                    "not valid UTF-8",
                )
            })?)
        } else {
            None
        };
        let geometry = Geometry::new(header.cluster_bits, header.extended_l2());
        let l1_bytes = read_exact(
            &*storage,
            "L1 table",
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            file_len,
        )?;
        let l1 = format::decode_u64_table(&l1_bytes);
        let snapshots = read_snapshot_table(&*storage, &header, file_len)?;
        let tables = (options.l2_cache_bytes / cluster_size).max(4) as usize;
        Ok(Image {
            name,
            storage,
            data_file,
            geometry,
            external_data_file: header
                .incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
            meta: RwLock::new(Meta {
                header,
                extensions,
                backing_file,
                l1,
                snapshots,
            }),
            l2_cache: L2Cache::new(tables),
            file_len: AtomicU64::new(file_len),
            last_compressed: Mutex::new(None),
            io_lock: RwLock::new(()),
            writer: None,
            overlap: RwLock::new(Default::default()),
        })
    }

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
    /// Length of the image file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Relaxed)
    }
    /// Bytes the image file occupies on disk, when the storage knows.
    pub fn allocated_size(&self) -> Option<u64> {
        self.storage.allocated_size()
    }

    /// How the data file (the image itself unless it has an external one) stores the host
    /// range `host..host + max_len`: data or a hole, and for how many bytes. Past the end
    /// of the file, and from a hole that reaches the end, everything reads as zeros: the
    /// answer is a hole over all of `max_len`.
    pub fn host_extent(&self, host: u64, max_len: u64) -> Result<Extent> {
        let storage = self.data_storage();
        let io = |e| self.name_error(Error::io(format!("querying extent at {host:#x}"), e));
        let len = storage.len().map_err(io)?;
        if host >= len || max_len == 0 {
            return Ok(Extent::Hole(max_len));
        }
        Ok(
            match storage.extent(host, max_len.min(len - host)).map_err(io)? {
                Extent::Hole(n) if host + n >= len => Extent::Hole(max_len),
                other => other,
            },
        )
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

    pub(crate) fn l1_entry(&self, index: u64) -> Result<L1Entry> {
        let meta = self.meta();
        let raw = usize::try_from(index)
            .ok()
            .and_then(|i| meta.l1.get(i))
            .copied()
            .unwrap_or(0);
        let entry = L1Entry(raw);
        let l2 = entry.l2_offset();
        if l2 != 0 && l2 % self.cluster_size() != 0 {
            return Err(Error::corrupt(
                "L1 table",
                meta.header.l1_table_offset,
                format!("entry {index} points at unaligned L2 table {l2:#x}"),
            ));
        }
        Ok(entry)
    }

    pub(crate) fn l2_table(&self, offset: u64) -> Result<L2Table> {
        if let Some(t) = self.l2_cache.get(offset) {
            return Ok(t);
        }
        let bytes = read_exact(
            &*self.storage,
            "L2 table",
            offset,
            self.cluster_size(),
            self.file_len(),
        )?;
        let table: L2Table = Arc::new(format::decode_u64_table(&bytes));
        self.l2_cache.insert(offset, table.clone());
        Ok(table)
    }

    pub(crate) fn data_storage(&self) -> &dyn Storage {
        self.data_file.as_deref().unwrap_or(&*self.storage)
    }

    /// Fills `buf` with what `run`'s first `buf.len()` bytes read as in this image alone;
    /// unallocated ranges read as zeros. A buffer longer than the run is refused: the bytes
    /// past it are not the run's.
    pub fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        check_run_buffer(run, buf.len()).map_err(|e| self.name_error(e))?;
        match run.mapping {
            Mapping::Unallocated | Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => self.data_storage().read_at(buf, host).map_err(|e| {
                let len = buf.len() as u64;
                let file_len = self.data_storage().len().unwrap_or(0);
                // An L2 entry pointing past the end of the file: say so, not "failed to
                // fill whole buffer".
                self.name_error(if host.saturating_add(len) > file_len {
                    Error::Truncated {
                        structure: "guest data",
                        offset: host,
                        len,
                        file_len,
                    }
                } else {
                    Error::io(format!("reading data at host offset {host:#x}"), e)
                })
            }),
            Mapping::Compressed(d) => {
                let cluster = self.compressed_cluster(d.host_offset, d.len)?;
                let start = self.geometry.offset_in_cluster(run.offset) as usize;
                let src = cluster.get(start..start + buf.len()).ok_or_else(|| {
                    self.name_error(Error::corrupt(
                        "compressed cluster",
                        d.host_offset,
                        "run exceeds cluster",
                    ))
                })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Drops the cached decompressed cluster (its host clusters were freed).
    pub(crate) fn forget_compressed(&self) {
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn compressed_cluster(&self, host_offset: u64, len: u64) -> Result<Arc<[u8]>> {
        let mut last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, data)) = &*last {
            if *at == host_offset {
                return Ok(data.clone());
            }
        }
        drop(last);
        // The descriptor may claim sectors past the end of the file (qemu writes the last
        // compressed cluster without padding): read what exists.
        let available = self.file_len().saturating_sub(host_offset).min(len);
        if available == 0 {
            return Err(self.name_error(Error::Truncated {
                structure: "compressed cluster",
                offset: host_offset,
                len,
                file_len: self.file_len(),
            }));
        }
        let read = |available: u64, file_len: u64| {
            read_exact(
                &*self.storage,
                "compressed cluster",
                host_offset,
                available,
                file_len,
            )
        };
        let input = match read(available, self.file_len()) {
            // A cluster counts in `file_len` as soon as it is allocated, before anything is
            // written to it: the last compressed cluster written since the image was
            // opened ends where its data does (unpadded, as QEMU writes it), before the
            // end of the last sector its descriptor names. Read what the file holds.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                let real = self
                    .storage
                    .len()
                    .map_err(|e| self.name_error(Error::io("reading the file length", e)))?;
                match real.saturating_sub(host_offset).min(len) {
                    0 => Err(Error::Truncated {
                        structure: "compressed cluster",
                        offset: host_offset,
                        len,
                        file_len: real,
                    }),
                    available => read(available, real),
                }
            }
            other => other,
        }
        .map_err(|e| self.name_error(e))?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        decompress(self.compression_type(), &input, &mut out, host_offset)
            .map_err(|e| self.name_error(e))?;
        let data: Arc<[u8]> = out.into();
        last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *last = Some((host_offset, data.clone()));
        Ok(data)
    }

    /// Reads `buf.len()` bytes at guest `offset` from this image alone: ranges that are
    /// unallocated here read as zeros (use [`crate::Chain`] to read through backing files).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(self.name_error(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }));
        }
        let mut done = 0usize;
        for run in self.runs(offset, len) {
            let run = run?;
            let n = run.len as usize;
            self.read_run(&run, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

fn check_features(header: &Header, extensions: &HeaderExtensions) -> Result<()> {
    let unknown = header.incompatible_features.bits() & !IncompatibleFeatures::SUPPORTED.bits();
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        let name = extensions
            .feature_name(FeatureKind::Incompatible, bit)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"));
        return Err(Error::UnsupportedFeature { name });
    }
    if header.crypt_method != 0 {
        return Err(Error::Encrypted {
            method: header.crypt_method,
        });
    }
    let external = header
        .incompatible_features
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    if header
        .autoclear_features
        .contains(AutoclearFeatures::DATA_FILE_RAW)
        && !external
    {
        // QEMU ignores (and clears on write) the raw bit without a data file.
    }
    if external && header.nb_snapshots != 0 {
        return Err(Error::invalid(
            "nb_snapshots",
            header.nb_snapshots.into(),
            "internal snapshots are not allowed with an external data file",
        ));
    }
    Ok(())
}

fn read_snapshot_table(
    storage: &dyn Storage,
    header: &Header,
    file_len: u64,
) -> Result<Vec<SnapshotEntry>> {
    let count = header.nb_snapshots as usize;
    if count == 0 {
        return Ok(Vec::new());
    }
    // Each entry takes at least 40 bytes; check the minimum fits before reading anything,
    // so a huge count in a small file fails at once.
    let min_len = count as u64 * 40;
    let offset = header.snapshots_offset;
    if offset.checked_add(min_len).is_none_or(|end| end > file_len) {
        return Err(Error::Truncated {
            structure: "snapshot table",
            offset,
            len: min_len,
            file_len,
        });
    }
    // Nothing past QEMU's 64 MiB limit is ever needed.
    let readable = (file_len - offset).min(format::MAX_SNAPSHOT_TABLE_BYTES);
    // The largest entry: fixed part, maximal extra data, ID and name, padding.
    const MAX_ENTRY: u64 = 40 + format::MAX_SNAPSHOT_EXTRA_DATA as u64 + 2 * 0xffff + 8;
    // Read in pieces, so memory follows what the entries really use.
    const PIECE: u64 = 1 << 20;
    let mut snapshots = Vec::with_capacity(count.min(1024));
    let (mut pos, mut buf_start) = (0u64, 0u64);
    let mut buf = Vec::new();
    for _ in 0..count {
        let buf_end = buf_start + buf.len() as u64;
        if buf_end < readable && buf_end - pos < MAX_ENTRY {
            buf_start = pos;
            let want = (readable - pos).min(PIECE);
            buf = read_exact(storage, "snapshot table", offset + pos, want, file_len)?;
        }
        let chunk = &buf[(pos - buf_start) as usize..];
        let (entry, used) = match SnapshotEntry::decode(chunk, offset + pos) {
            Ok(decoded) => decoded,
            // The entry needs bytes past what may be read: past the end of the file, or
            // past QEMU's limit on the table.
            Err(Error::Truncated { len, .. }) => {
                return Err(if offset + pos + len > file_len {
                    Error::Truncated {
                        structure: "snapshot table entry",
                        offset: offset + pos,
                        len,
                        file_len,
                    }
                } else {
                    Error::invalid(
                        "snapshot table size",
                        pos + len,
                        "snapshot table larger than QEMU's 64 MiB limit",
                    )
                });
            }
            Err(e) => return Err(e),
        };
        if entry.l1_table_offset % header.cluster_size() != 0 {
            return Err(Error::corrupt(
                "snapshot table",
                offset + pos,
                format!(
                    "snapshot {} has unaligned L1 table offset {:#x}",
                    short_id(&entry.id),
                    entry.l1_table_offset
                ),
            ));
        }
        if u64::from(entry.l1_size) * 8 > format::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                offset + pos,
                format!(
                    "snapshot {} has an L1 table larger than 32 MiB",
                    short_id(&entry.id)
                ),
            ));
        }
        pos += used as u64;
        snapshots.push(entry);
    }
    Ok(snapshots)
}

/// A snapshot ID for a message: quoted, and cut after 32 characters (a hostile table may
/// hold 64 KiB IDs).
fn short_id(id: &str) -> String {
    match id.char_indices().nth(32) {
        Some((cut, _)) => format!("{:?}...", &id[..cut]),
        None => format!("{id:?}"),
    }
}

/// Refuses a buffer longer than the run it is to be filled from.
pub(crate) fn check_run_buffer(run: &Run, len: usize) -> Result<()> {
    if len as u64 > run.len {
        return Err(Error::InvalidArgument(format!(
            "a {len}-byte buffer for a {}-byte run at {:#x}",
            run.len, run.offset
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::create::{CreateOptions, create_on};
    use crate::layers::{Layer, RawImage};
    use crate::qcow2::{Image, ImageOptions, Mapping};
    use crate::storage::MemStorage;

    #[test]
    fn a_buffer_longer_than_its_run_is_refused_not_read_past_the_run() {
        let file = MemStorage::new();
        create_on(&file, &CreateOptions::qcow2(1 << 20)).unwrap();
        let image = Image::from_storage(
            Box::new(MemStorage::from_bytes(file.to_bytes())),
            "a.qcow2",
            &ImageOptions::default(),
            None,
        )
        .unwrap();
        let run = image.lookup(0, 512).unwrap();
        let mut buf = vec![1u8; 1024];
        let err = image.read_run(&run, &mut buf).unwrap_err();
        assert!(
            err.report().to_string().starts_with("a.qcow2: "),
            "{}",
            err.report()
        );
        image.read_run(&run, &mut buf[..512]).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..].iter().all(|&b| b == 1));

        let raw = Layer::Raw(
            RawImage::from_storage(Box::new(MemStorage::from_bytes(vec![7; 4096])), "r").unwrap(),
        );
        let run = raw.lookup(0, 1024).unwrap();
        assert!(matches!(run.mapping, Mapping::Data { .. }));
        let err = raw.read_run(&run, &mut vec![0u8; 2048]).unwrap_err();
        assert!(
            matches!(err.root(), crate::Error::InvalidArgument(_)),
            "{}",
            err.report()
        );
    }
}
