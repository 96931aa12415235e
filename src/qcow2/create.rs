//! Creating images: a fresh qcow2 (version 2 or 3) or raw file, as `qemu-img create` makes
//! them.
//!
//! [`CreateOptions`] holds every choice qemu-img offers; [`create`] validates all of them
//! (and opens the backing file when the size comes from it) before the file is touched.
//!
//! The layout of a fresh qcow2 image, as QEMU's:
//!
//! ```text
//! cluster 0              header, header extensions, backing file name
//! next                   refcount table (one cluster unless preallocation needs more)
//! next                   refcount blocks covering every cluster the image will use
//! next                   L1 table (the exact number of entries the virtual size needs)
//! then, if preallocated  per L1 entry: its L2 table, then the data clusters it maps
//! ```
//!
//! Every cluster written has refcount one and nothing else is counted, so `qemu-img check`
//! finds no leak. The header extensions are QEMU's: backing format, external data file
//! name, and the feature-name table (QEMU writes it only with clusters of 8 KiB or more).

use std::path::{Path, PathBuf};

use crate::chain::{Format, Layer, resolve_relative};
use crate::error::{Error, Result};
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, FeatureKind, FeatureName, Geometry,
    Header, HeaderExtension, HeaderExtensions, IncompatibleFeatures, L1Entry, L2Entry,
    MAX_BACKING_FILE_NAME, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, encode_u64_table, set_refcount,
};
use crate::qcow2::ImageOptions;
use crate::storage::{FileStorage, Storage, write_zeros};

/// The largest virtual size QEMU accepts: `i64::MAX` rounded down to 1 GiB.
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// The qcow2 compatibility level (`compat=` in qemu-img).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// `0.10`: version 2 images, readable by very old QEMU; no v3 features.
    V0_10,
    /// `1.1`: version 3 images (the default).
    #[default]
    V1_1,
}

impl Compat {
    /// Parses qemu-img's names: `0.10`/`v2` and `1.1`/`v3`.
    pub fn from_name(name: &str) -> Result<Compat> {
        match name {
            "0.10" | "v2" => Ok(Compat::V0_10),
            "1.1" | "v3" => Ok(Compat::V1_1),
            other => Err(Error::InvalidArgument(format!(
                "compat {other:?} is not one of 0.10, 1.1, v2, v3"
            ))),
        }
    }
    /// The name qemu-img info shows (`0.10` or `1.1`).
    pub fn name(self) -> &'static str {
        match self {
            Compat::V0_10 => "0.10",
            Compat::V1_1 => "1.1",
        }
    }
    /// The header version.
    pub fn version(self) -> u32 {
        match self {
            Compat::V0_10 => 2,
            Compat::V1_1 => 3,
        }
    }
}

/// How much of the image to allocate up front (`preallocation=` in qemu-img).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1 table.
    #[default]
    Off,
    /// qcow2 only: every L2 table and data cluster is allocated and mapped, but the data
    /// clusters are left as holes in the file (its length covers them).
    Metadata,
    /// As `Metadata`, and the file system reserves the data clusters (`fallocate`). On a
    /// storage that cannot reserve space, zeros are written as with `Full`.
    Falloc,
    /// As `Metadata`, and zeros are written to every data cluster.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names: `off`, `metadata`, `falloc`, `full`.
    pub fn from_name(name: &str) -> Result<Preallocation> {
        Ok(match name {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "preallocation {other:?} is not one of off, metadata, falloc, full"
                )));
            }
        })
    }
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Everything `qemu-img create` can be told, with qemu-img's defaults
/// (`CreateOptions::default()` is a qcow2 v3 image with 64 KiB clusters and 16-bit
/// refcounts that still needs a size).
///
/// [`CreateOptions::validate`] checks the combination as qemu-img does; [`create`] calls
/// it before touching any file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// The image format: qcow2 or raw. Raw images take only `size` and `preallocation`
    /// (off, falloc or full).
    pub format: Format,
    /// Virtual size in bytes (qcow2 rounds it up to 512 bytes). May be `None` with a
    /// backing file that is opened: the size is then the backing file's.
    pub size: Option<u64>,
    /// Cluster size: a power of two from 512 bytes to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Refcount width: a power of two from 1 to 64 bits (default 16; 16 with compat 0.10).
    pub refcount_bits: u32,
    /// Compatibility level (default 1.1). 0.10 allows none of the options below except
    /// the backing file, its format and preallocation.
    pub compat: Compat,
    /// Extended L2 entries with 32 subclusters (clusters of 16 KiB or more).
    pub extended_l2: bool,
    /// Lazy refcounts (compat 1.1 only).
    pub lazy_refcounts: bool,
    /// Compression type for compressed clusters; zstd sets the incompatible bit.
    pub compression_type: CompressionType,
    /// Name of an external data file for guest data (compat 1.1). It is created raw,
    /// sized to the virtual size, relative to the image's directory unless absolute.
    pub data_file: Option<String>,
    /// The data file is a consistent raw image by itself (needs `data_file`, no backing).
    pub data_file_raw: bool,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name, stored as given and opened relative to the image's directory.
    pub backing_file: Option<String>,
    /// Backing file format, stored in the backing-format extension. When `None` and the
    /// backing file is opened, the probed format is stored.
    pub backing_format: Option<Format>,
    /// Open the backing file (to check it and to take its size). `false` is qemu-img's
    /// `-u`: then `size` is required.
    pub open_backing: bool,
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V1_1,
            extended_l2: false,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            open_backing: true,
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

impl CreateOptions {
    /// A qcow2 image of `size` bytes with qemu-img's defaults.
    pub fn qcow2(size: u64) -> CreateOptions {
        CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        }
    }

    /// A raw image of `size` bytes.
    pub fn raw(size: u64) -> CreateOptions {
        CreateOptions {
            format: Format::Raw,
            size: Some(size),
            ..CreateOptions::default()
        }
    }

    /// A qcow2 overlay on `backing` (of `format`); the size is the backing file's unless
    /// set.
    pub fn overlay(backing: impl Into<String>, format: Format) -> CreateOptions {
        CreateOptions {
            backing_file: Some(backing.into()),
            backing_format: Some(format),
            ..CreateOptions::default()
        }
    }

    /// Checks the options alone, as qemu-img does before creating anything. Does no I/O:
    /// whether the backing file opens is checked by [`create`].
    pub fn validate(&self) -> Result<()> {
        if self.format == Format::Raw {
            return self.validate_raw();
        }
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(invalid(format!(
                "cluster size {cs} is not a power of two between 512 and 2M"
            )));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(invalid(format!(
                "refcount width {rb} is not a power of two between 1 and 64 bits"
            )));
        }
        if self.compat == Compat::V0_10 {
            let v3_only = [
                (self.lazy_refcounts, "lazy refcounts"),
                (rb != 16, "refcount widths other than 16 bits"),
                (self.extended_l2, "extended L2 entries"),
                (
                    self.compression_type != CompressionType::Zlib,
                    "compression types other than zlib",
                ),
                (self.data_file.is_some(), "external data files"),
            ];
            if let Some((_, what)) = v3_only.iter().find(|(used, _)| *used) {
                return Err(invalid(format!(
                    "{what} need compat 1.1 (compat 0.10 makes a version 2 image)"
                )));
            }
        }
        if self.extended_l2 && cs < 16384 {
            return Err(invalid(format!(
                "extended L2 entries need clusters of at least 16k (cluster size is {cs})"
            )));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(invalid("data_file_raw needs data_file"));
        }
        if let Some(name) = &self.data_file {
            if name.is_empty() {
                return Err(invalid("the data file name is empty"));
            }
        }
        if let Some(name) = &self.backing_file {
            if name.is_empty() {
                return Err(invalid("the backing file name is empty"));
            }
            if name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(invalid(format!(
                    "backing file name is {} bytes long; at most {MAX_BACKING_FILE_NAME} fit",
                    name.len()
                )));
            }
            if self.data_file_raw {
                return Err(invalid(
                    "a backing file and data_file_raw cannot be used together",
                ));
            }
            if self.preallocation != Preallocation::Off && !self.extended_l2 {
                return Err(invalid(
                    "a backing file and preallocation can only be used together with extended_l2",
                ));
            }
            if !self.open_backing && self.size.is_none() {
                return Err(invalid(
                    "a size is needed when the backing file is not opened",
                ));
            }
        } else {
            if self.backing_format.is_some() {
                return Err(invalid("a backing format needs a backing file"));
            }
            if self.size.is_none() {
                return Err(invalid(
                    "a size is needed (or a backing file to take it from)",
                ));
            }
        }
        if let Some(size) = self.size {
            self.check_qcow2_size(size)?;
        }
        Ok(())
    }

    fn validate_raw(&self) -> Result<()> {
        let defaults = CreateOptions::default();
        let qcow2_only = [
            (self.cluster_size != defaults.cluster_size, "cluster_size"),
            (
                self.refcount_bits != defaults.refcount_bits,
                "refcount_bits",
            ),
            (self.compat != defaults.compat, "compat"),
            (self.extended_l2, "extended_l2"),
            (self.lazy_refcounts, "lazy_refcounts"),
            (
                self.compression_type != CompressionType::Zlib,
                "compression_type",
            ),
            (self.data_file.is_some(), "data_file"),
            (self.data_file_raw, "data_file_raw"),
            (self.backing_file.is_some(), "backing_file"),
            (self.backing_format.is_some(), "backing_fmt"),
        ];
        if let Some((_, what)) = qcow2_only.iter().find(|(used, _)| *used) {
            return Err(invalid(format!("raw images have no {what} option")));
        }
        if self.preallocation == Preallocation::Metadata {
            return Err(invalid(
                "raw images support preallocation off, falloc and full, not metadata",
            ));
        }
        match self.size {
            None => Err(invalid("a size is needed")),
            Some(size) if size > i64::MAX as u64 => Err(invalid(format!(
                "size {size} is larger than the largest image size {}",
                i64::MAX
            ))),
            Some(_) => Ok(()),
        }
    }

    /// The qcow2 virtual size for `size`: rounded up to 512 bytes, within QEMU's limits
    /// and small enough for a 32 MiB L1 table.
    fn check_qcow2_size(&self, size: u64) -> Result<u64> {
        let rounded = size.div_ceil(512).saturating_mul(512);
        if rounded > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!(
                "size {size} is larger than the largest image size {MAX_VIRTUAL_SIZE}"
            )));
        }
        let geometry = Geometry::new(self.cluster_size.trailing_zeros(), self.extended_l2);
        let l1 = geometry.l1_entries_for(rounded).unwrap_or(u64::MAX);
        if l1.saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid(format!(
                "size {size} is too large for qcow2 with {}-byte clusters (its L1 table \
                 would exceed 32 MiB; try a larger cluster size)",
                self.cluster_size
            )));
        }
        Ok(rounded)
    }

    /// Validates, opens the backing file when asked to, and settles the size and the
    /// backing format. Touches no file but the backing file (read-only).
    fn resolve(&self, path: &Path) -> Result<Resolved> {
        self.validate()?;
        let mut size = self.size;
        let mut backing_format = self.backing_format;
        if let (Some(name), true) = (&self.backing_file, self.open_backing) {
            let backing_path = resolve_relative(path, name);
            // A backing file that cannot be found or reached is its own error, keeping the
            // system's reason (not found, permission denied); a damaged one names itself.
            std::fs::metadata(&backing_path).map_err(|source| Error::BackingFile {
                path: backing_path.clone(),
                source,
            })?;
            let layer = Layer::open(&backing_path, self.backing_format, &ImageOptions::default())?;
            backing_format = Some(layer.format());
            if size.is_none() {
                size = Some(layer.size());
            }
        }
        let size = size.ok_or_else(|| invalid("a size is needed"))?;
        let size = match self.format {
            Format::Raw => size,
            Format::Qcow2 => self.check_qcow2_size(size)?,
        };
        Ok(Resolved {
            size,
            backing_format,
        })
    }
}

/// What [`CreateOptions::resolve`] settled.
struct Resolved {
    size: u64,
    backing_format: Option<Format>,
}

/// Creates (or truncates) the image at `path` as `options` say; with a data file, creates
/// that too. Everything is validated first: an invalid combination, a missing backing file
/// or a size out of range leaves no file behind.
pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let resolved = options.resolve(path).map_err(|e| e.in_file(path))?;
    let data_path = options
        .data_file
        .as_ref()
        .map(|name| resolve_relative(path, name));
    let existed = path.exists();
    let result = create_files(path, data_path.as_deref(), options, &resolved);
    if result.is_err() && !existed {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn create_files(
    path: &Path,
    data_path: Option<&Path>,
    options: &CreateOptions,
    resolved: &Resolved,
) -> Result<()> {
    let storage = FileStorage::create(path).map_err(|e| Error::io("creating", e).in_file(path))?;
    let falloc = options.preallocation == Preallocation::Falloc;
    match options.format {
        Format::Raw => {
            write_raw(&storage, resolved.size, options.preallocation, falloc)
                .map_err(|e| e.in_file(path))?;
            if falloc {
                fallocate(&storage, 0, resolved.size).map_err(|e| e.in_file(path))?;
            }
        }
        Format::Qcow2 => {
            if let Some(data_path) = data_path {
                let data = FileStorage::create(data_path)
                    .map_err(|e| Error::io("creating the data file", e).in_file(data_path))?;
                write_raw(&data, resolved.size, options.preallocation, falloc)
                    .map_err(|e| e.in_file(data_path))?;
                if falloc {
                    fallocate(&data, 0, resolved.size).map_err(|e| e.in_file(data_path))?;
                }
            }
            let layout = Layout::plan(options, resolved)?;
            layout
                .write(&storage, options.preallocation, falloc)
                .map_err(|e| e.in_file(path))?;
            if falloc && !layout.external_data {
                let start = layout.first_data_cluster_offset();
                let end = layout.file_end();
                if end > start {
                    fallocate(&storage, start, end - start).map_err(|e| e.in_file(path))?;
                }
            }
        }
    }
    storage
        .flush()
        .map_err(|e| Error::io("flushing", e).in_file(path))
}

/// Writes the image into `storage` (truncated first) as `options` say. `options` must not
/// name a data file: only the image itself is written. A relative backing file is opened
/// relative to the current directory.
pub fn create_on(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    if options.data_file.is_some() {
        return Err(invalid(
            "create_on writes one storage; use create() for an image with a data file",
        ));
    }
    let resolved = options.resolve(Path::new(""))?;
    match options.format {
        Format::Raw => write_raw(storage, resolved.size, options.preallocation, false)?,
        Format::Qcow2 => {
            Layout::plan(options, &resolved)?.write(storage, options.preallocation, false)?
        }
    }
    storage.flush().map_err(|e| Error::io("flushing", e))
}

fn fallocate(storage: &FileStorage, offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    rustix::fs::fallocate(
        storage.file(),
        rustix::fs::FallocateFlags::empty(),
        offset,
        len,
    )
    .map_err(|e| Error::io("reserving space (fallocate)", e.into()))
}

/// A raw image (or data file): truncated, then sized; zeros written for `Full`, and for
/// `Falloc` when the caller cannot reserve space itself (`falloc_done_by_caller` false).
fn write_raw(
    storage: &dyn Storage,
    size: u64,
    mode: Preallocation,
    falloc_done_by_caller: bool,
) -> Result<()> {
    storage.set_len(0).map_err(|e| Error::io("truncating", e))?;
    let write_zeros =
        mode == Preallocation::Full || (mode == Preallocation::Falloc && !falloc_done_by_caller);
    if write_zeros {
        write_zeros_at(storage, 0, size)?;
    }
    storage
        .set_len(size)
        .map_err(|e| Error::io("setting the file length", e))
}

fn write_zeros_at(storage: &dyn Storage, offset: u64, len: u64) -> Result<()> {
    write_zeros(offset, len, |zeros, at| {
        storage
            .write_at(zeros, at)
            .map_err(|e| Error::io(format!("writing zeros at {at:#x}"), e))
    })
}

/// The names QEMU puts in the feature-name table, in its order.
pub(crate) fn qemu_feature_names() -> Vec<FeatureName> {
    let names = [
        (FeatureKind::Incompatible, 0, "dirty bit"),
        (FeatureKind::Incompatible, 1, "corrupt bit"),
        (FeatureKind::Incompatible, 2, "external data file"),
        (FeatureKind::Incompatible, 3, "compression type"),
        (FeatureKind::Incompatible, 4, "extended L2 entries"),
        (FeatureKind::Compatible, 0, "lazy refcounts"),
        (FeatureKind::Autoclear, 0, "bitmaps"),
        (FeatureKind::Autoclear, 1, "raw external data"),
    ];
    names
        .iter()
        .map(|&(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_owned(),
        })
        .collect()
}

/// QEMU writes the feature-name table only into header clusters of at least 8 KiB.
pub(crate) const MIN_CLUSTER_FOR_FEATURE_TABLE: u64 = 8192;

/// Where everything of a fresh qcow2 image goes, in clusters counted from the start.
#[derive(Debug)]
struct Layout {
    geometry: Geometry,
    header_cluster: Vec<u8>,
    refcount_order: u32,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
    /// Whether L2 tables (and data clusters unless external) are allocated.
    preallocated: bool,
    external_data: bool,
    size: u64,
    /// Clusters with refcount one: all of them, from cluster 0.
    total_clusters: u64,
}

impl Layout {
    fn plan(options: &CreateOptions, resolved: &Resolved) -> Result<Layout> {
        let cs = options.cluster_size;
        let geometry = Geometry::new(cs.trailing_zeros(), options.extended_l2);
        let size = resolved.size;
        let refcount_order = options.refcount_bits.trailing_zeros();
        let l1_entries = geometry.l1_entries_for(size).unwrap_or(u64::MAX);
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let preallocated = options.preallocation != Preallocation::Off;
        let external_data = options.data_file.is_some();
        let data_clusters = if preallocated && !external_data {
            geometry.clusters_for(size)
        } else {
            0
        };
        let l2_tables = if preallocated { l1_entries } else { 0 };
        let fixed = 1 + l1_clusters + l2_tables + data_clusters;
        let per_block = (cs * 8) >> refcount_order;
        let (mut table, mut blocks) = (1u64, 1u64);
        loop {
            let new_blocks = (fixed + table + blocks).div_ceil(per_block);
            let new_table = (new_blocks * 8).div_ceil(cs);
            if (new_blocks, new_table) == (blocks, table) {
                break;
            }
            (blocks, table) = (new_blocks, new_table);
        }
        if table * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid(format!(
                "preallocating {size} bytes needs a refcount table larger than QEMU's 8 MiB \
                 limit; use larger clusters or wider refcounts"
            )));
        }
        let mut layout = Layout {
            geometry,
            header_cluster: Vec::new(),
            refcount_order,
            refcount_table_clusters: table,
            refcount_blocks: blocks,
            l1_entries,
            l1_clusters,
            preallocated,
            external_data,
            size,
            total_clusters: fixed + table + blocks,
        };
        layout.header_cluster = layout.encode_header_cluster(options, resolved)?;
        Ok(layout)
    }

    fn cs(&self) -> u64 {
        self.geometry.cluster_size()
    }
    fn refcount_table_offset(&self) -> u64 {
        self.cs()
    }
    fn refcount_block_offset(&self, i: u64) -> u64 {
        (1 + self.refcount_table_clusters + i) * self.cs()
    }
    fn l1_offset(&self) -> u64 {
        if self.l1_entries == 0 {
            0
        } else {
            self.refcount_block_offset(self.refcount_blocks)
        }
    }
    /// The first cluster after the L1 table: where preallocated L2 tables start.
    fn after_l1(&self) -> u64 {
        (1 + self.refcount_table_clusters + self.refcount_blocks + self.l1_clusters) * self.cs()
    }
    fn first_data_cluster_offset(&self) -> u64 {
        self.after_l1() + self.cs()
    }
    /// The file's length: the end of the L1 table (or of the refcount blocks) without
    /// preallocation, as QEMU leaves it; every counted cluster with it.
    fn file_end(&self) -> u64 {
        if self.preallocated {
            self.total_clusters * self.cs()
        } else if self.l1_entries == 0 {
            self.refcount_block_offset(self.refcount_blocks)
        } else {
            self.l1_offset() + self.l1_entries * 8
        }
    }

    fn encode_header_cluster(
        &self,
        options: &CreateOptions,
        resolved: &Resolved,
    ) -> Result<Vec<u8>> {
        let cs = self.cs();
        let mut header = Header::new_v3(self.geometry.cluster_bits(), self.size);
        header.l1_size = self.l1_entries as u32;
        header.l1_table_offset = self.l1_offset();
        header.refcount_table_offset = self.refcount_table_offset();
        header.refcount_table_clusters = self.refcount_table_clusters as u32;
        header.refcount_order = self.refcount_order;
        let mut extensions = Vec::new();
        if let (Some(_), Some(format)) = (&options.backing_file, resolved.backing_format) {
            extensions.push(HeaderExtension::BackingFormat(format.name().to_owned()));
        }
        if options.compat == Compat::V0_10 {
            header.version = 2;
            header.header_length = 72;
            header.unknown_tail.clear();
        } else {
            let mut incompatible = IncompatibleFeatures::empty();
            if let Some(name) = &options.data_file {
                incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
                extensions.push(HeaderExtension::DataFile(name.clone()));
            }
            if options.compression_type != CompressionType::Zlib {
                incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
            }
            if options.extended_l2 {
                incompatible |= IncompatibleFeatures::EXTENDED_L2;
            }
            header.incompatible_features = incompatible;
            header.compression_type = options.compression_type;
            if options.lazy_refcounts {
                header.compatible_features = CompatibleFeatures::LAZY_REFCOUNTS;
            }
            if options.data_file_raw {
                header.autoclear_features = AutoclearFeatures::DATA_FILE_RAW;
            }
        }
        let backing = options.backing_file.as_deref();
        let encode = |header: &mut Header, exts: &[HeaderExtension]| {
            let list = HeaderExtensions {
                list: exts.to_vec(),
            };
            crate::format::encode_header_cluster(header, &list, backing, cs)
        };
        if options.compat == Compat::V1_1 && cs >= MIN_CLUSTER_FOR_FEATURE_TABLE {
            let mut with_table = extensions.clone();
            with_table.push(HeaderExtension::FeatureNames(qemu_feature_names()));
            if let Some(cluster) = encode(&mut header, &with_table) {
                return Ok(cluster);
            }
        }
        let cluster = encode(&mut header, &extensions).ok_or_else(|| {
            invalid(format!(
                "the header, its extensions and the backing file name do not fit in one \
                 {cs}-byte cluster; use larger clusters or shorter names"
            ))
        })?;
        Ok(cluster)
    }

    /// Writes the whole image into `storage`, which is truncated first. For
    /// `Falloc`, `falloc_done_by_caller` says whether the caller reserves the data
    /// clusters afterwards; otherwise zeros are written as for `Full`.
    fn write(
        &self,
        storage: &dyn Storage,
        mode: Preallocation,
        falloc_done_by_caller: bool,
    ) -> Result<()> {
        let cs = self.cs();
        let io = |what: &'static str, at: u64| {
            move |e| Error::io(format!("writing the {what} at {at:#x}"), e)
        };
        storage.set_len(0).map_err(|e| Error::io("truncating", e))?;
        storage
            .write_at(&self.header_cluster, 0)
            .map_err(io("header", 0))?;

        // Refcount table and blocks: clusters 0..total_clusters have refcount one.
        let table: Vec<u64> = (0..self.refcount_blocks)
            .map(|i| self.refcount_block_offset(i))
            .collect();
        let mut table_bytes = vec![0u8; (self.refcount_table_clusters * cs) as usize];
        encode_u64_table(&table, &mut table_bytes);
        let at = self.refcount_table_offset();
        storage
            .write_at(&table_bytes, at)
            .map_err(io("refcount table", at))?;
        let per_block = (cs * 8) >> self.refcount_order;
        let mut block = vec![0u8; cs as usize];
        for i in 0..self.refcount_blocks {
            block.fill(0);
            let first = i * per_block;
            let used = self.total_clusters.saturating_sub(first).min(per_block);
            for index in 0..used {
                set_refcount(&mut block, index as usize, self.refcount_order, 1);
            }
            let at = self.refcount_block_offset(i);
            storage
                .write_at(&block, at)
                .map_err(io("refcount block", at))?;
        }

        // L2 tables (each followed by the data clusters it maps) and the L1 table.
        let write_zeros = mode == Preallocation::Full
            || (mode == Preallocation::Falloc && !falloc_done_by_caller);
        let mut l1 = vec![0u64; self.l1_entries as usize];
        if self.preallocated {
            let entries = self.geometry.l2_entries();
            let entry_bytes = self.geometry.l2_entry_bytes() as usize;
            let total_data = self.geometry.clusters_for(self.size);
            let mut cursor = self.after_l1();
            let mut l2 = vec![0u8; cs as usize];
            for (i, l1_entry) in l1.iter_mut().enumerate() {
                let l2_offset = cursor;
                cursor += cs;
                *l1_entry = L1Entry::new(l2_offset, true).0;
                l2.fill(0);
                let first_guest_cluster = i as u64 * entries;
                let count = (total_data - first_guest_cluster).min(entries);
                for j in 0..count {
                    let host = if self.external_data {
                        (first_guest_cluster + j) * cs
                    } else {
                        cursor + j * cs
                    };
                    let at = j as usize * entry_bytes;
                    l2[at..at + 8].copy_from_slice(&L2Entry::data(host, true).0.to_be_bytes());
                }
                storage
                    .write_at(&l2, l2_offset)
                    .map_err(io("L2 table", l2_offset))?;
                if !self.external_data {
                    if write_zeros {
                        write_zeros_at(storage, cursor, count * cs)?;
                    }
                    cursor += count * cs;
                }
            }
        }
        if self.l1_entries > 0 {
            let mut l1_bytes = vec![0u8; (self.l1_entries * 8) as usize];
            encode_u64_table(&l1, &mut l1_bytes);
            let at = self.l1_offset();
            storage
                .write_at(&l1_bytes, at)
                .map_err(io("L1 table", at))?;
        }
        storage
            .set_len(self.file_end())
            .map_err(|e| Error::io("setting the file length", e))
    }
}

/// The path of the data file `options` would create for an image at `path`.
pub fn data_file_path(path: impl AsRef<Path>, options: &CreateOptions) -> Option<PathBuf> {
    let path = path.as_ref();
    options
        .data_file
        .as_ref()
        .map(|name| resolve_relative(path, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Image;
    use crate::storage::MemStorage;
    use std::sync::Arc;

    fn open(storage: &Arc<MemStorage>) -> Image {
        Image::from_storage(
            Box::new(storage.clone()),
            "mem",
            &ImageOptions::default(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn default_image_has_qemus_layout() {
        let s = Arc::new(MemStorage::new());
        create_on(&*s, &CreateOptions::qcow2(1 << 30)).unwrap();
        let image = open(&s);
        let h = image.header();
        assert_eq!(h.version, 3);
        assert_eq!(h.header_length, 112);
        assert_eq!(h.refcount_table_offset, 0x10000);
        assert_eq!(h.l1_table_offset, 0x30000);
        assert_eq!(h.l1_size, 2);
        assert_eq!(image.file_len(), 0x30010);
        assert_eq!(
            image.extensions().feature_name(FeatureKind::Autoclear, 1),
            Some("raw external data")
        );
    }

    #[test]
    fn refcount_structures_cover_themselves() {
        // 512-byte clusters with 64-bit refcounts: 64 clusters per block, so a 1 GiB image
        // (512 L1 clusters) needs several blocks.
        let options = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..CreateOptions::qcow2(1 << 30)
        };
        let resolved = Resolved {
            size: 1 << 30,
            backing_format: None,
        };
        let layout = Layout::plan(&options, &resolved).unwrap();
        let per_block = 512 * 8 / 64;
        assert!(layout.refcount_blocks * per_block >= layout.total_clusters);
        assert_eq!(
            layout.total_clusters,
            1 + layout.refcount_table_clusters + layout.refcount_blocks + layout.l1_clusters
        );
    }

    #[test]
    fn v3_only_options_are_refused_with_compat_0_10() {
        let options = CreateOptions {
            compat: Compat::V0_10,
            lazy_refcounts: true,
            ..CreateOptions::qcow2(1 << 20)
        };
        let err = options.validate().unwrap_err().to_string();
        assert!(err.contains("lazy refcounts"), "{err}");
    }

    #[test]
    fn refcount_width_must_be_a_power_of_two() {
        let options = CreateOptions {
            refcount_bits: 3,
            ..CreateOptions::qcow2(1 << 20)
        };
        assert!(options.validate().is_err());
    }
}
