//! The facts `qemu-img info` reports about an image, as plain values.
//!
//! Formatting (human text, JSON keys and their order) is the caller's business; this module
//! only gathers what qemu-img shows, with the same meaning.

use std::path::{Path, PathBuf};

use crate::chain::{Chain, ChainOptions};
use crate::error::Result;
use crate::format::SnapshotEntry;
use crate::layers::{ForeignImage, Format, Layer};
use crate::names::resolve_relative;
use crate::qcow2::BitmapInfo;

/// What `qemu-img info` says about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The name the image was opened by (`filename`).
    pub filename: PathBuf,
    /// The image's format (`format`).
    pub format: Format,
    /// Guest-visible size in bytes (`virtual-size`): always known for qcow2 and raw; for
    /// the formats this crate only recognises, where the first sector states it (see
    /// [`crate::layers::header_virtual_size`]).
    pub virtual_size: Option<u64>,
    /// Bytes the file occupies on disk, `st_blocks * 512` (`actual-size`).
    pub actual_size: Option<u64>,
    /// Length of the image file in bytes (the protocol node's `virtual-size`).
    pub file_length: u64,
    /// Cluster size for qcow2 (`cluster-size`).
    pub cluster_size: Option<u64>,
    /// The backing file name as stored (`backing-filename`).
    pub backing_filename: Option<String>,
    /// The backing file name joined to the image's directory (`full-backing-filename`).
    pub full_backing_filename: Option<PathBuf>,
    /// The backing format as stored (`backing-filename-format`).
    pub backing_filename_format: Option<String>,
    /// Whether the image is marked dirty (`dirty-flag`).
    pub dirty: bool,
    /// Internal snapshots (`snapshots`).
    pub snapshots: Vec<SnapshotInfo>,
    /// qcow2-specific facts (`format-specific`).
    pub qcow2: Option<Qcow2Info>,
}

impl ImageInfo {
    /// The facts of an image that has nothing but a format and sizes to show: a raw
    /// image, or one of a format this crate only recognises.
    fn sizes_only(
        filename: PathBuf,
        format: Format,
        virtual_size: Option<u64>,
        actual_size: Option<u64>,
        file_length: u64,
    ) -> ImageInfo {
        ImageInfo {
            filename,
            format,
            virtual_size,
            actual_size,
            file_length,
            cluster_size: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            dirty: false,
            snapshots: Vec::new(),
            qcow2: None,
        }
    }
}

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID (`id`).
    pub id: String,
    /// Name (`name`).
    pub name: String,
    /// Saved VM state size in bytes (`vm-state-size`).
    pub vm_state_size: u64,
    /// Wall-clock seconds when taken (`date-sec`).
    pub date_sec: u32,
    /// Nanosecond part of the date (`date-nsec`).
    pub date_nsec: u32,
    /// Whole seconds of guest run time (`vm-clock-sec`).
    pub vm_clock_sec: u64,
    /// Nanosecond part of the guest run time (`vm-clock-nsec`).
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count (`icount`): qemu-img shows it only when the entry
    /// stores one other than -1.
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// The facts of a snapshot table entry. QEMU holds the ID and name as C strings, so
    /// they end at a NUL byte (an entry cut short by the end of the file reads zeros
    /// there: its ID and name show as empty).
    pub fn from_entry(entry: &SnapshotEntry) -> SnapshotInfo {
        let c_string = |s: &str| s.split('\0').next().unwrap_or_default().to_owned();
        SnapshotInfo {
            id: c_string(&entry.id),
            name: c_string(&entry.name),
            vm_state_size: entry.vm_state_size(),
            date_sec: entry.date_sec,
            date_nsec: entry.date_nsec,
            vm_clock_sec: entry.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: entry.vm_clock_nsec % 1_000_000_000,
            icount: entry.extra.icount.filter(|&i| i != u64::MAX),
        }
    }
}

/// The qcow2 part of `format-specific.data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `"0.10"` for version 2, `"1.1"` for version 3 (`compat`).
    pub compat: &'static str,
    /// `"zlib"` or `"zstd"` (`compression-type`).
    pub compression_type: &'static str,
    /// Lazy refcounts (`lazy-refcounts`; qemu-img omits it for version 2).
    pub lazy_refcounts: bool,
    /// Bits per refcount entry (`refcount-bits`).
    pub refcount_bits: u32,
    /// The corrupt bit (`corrupt`; omitted for version 2).
    pub corrupt: bool,
    /// Extended L2 entries (`extended-l2`; omitted for version 2).
    pub extended_l2: bool,
    /// External data file name as stored (`data-file`).
    pub data_file: Option<String>,
    /// Whether the data file is raw-consistent (`data-file-raw`, shown with `data-file`).
    pub data_file_raw: bool,
    /// Persistent bitmaps (`bitmaps`; qemu-img omits the key when there are none).
    pub bitmaps: Vec<BitmapInfo>,
}

impl Qcow2Info {
    /// Whether the image is version 3 (qemu-img then shows the version 3 fields).
    pub fn is_v3(&self) -> bool {
        self.compat == "1.1"
    }
}

/// The facts about one layer.
pub fn info(layer: &Layer) -> Result<ImageInfo> {
    Ok(match layer {
        Layer::Raw(raw) => ImageInfo::sizes_only(
            raw.name().to_path_buf(),
            Format::Raw,
            Some(raw.size()),
            raw.allocated_size(),
            raw.file_len(),
        ),
        Layer::Qcow2(image) => {
            let header = image.header();
            let v3 = header.version >= 3;
            ImageInfo {
                filename: image.name().to_path_buf(),
                format: Format::Qcow2,
                virtual_size: Some(image.size()),
                actual_size: image.allocated_size(),
                file_length: image.file_len(),
                cluster_size: Some(image.cluster_size()),
                backing_filename: image.backing_file(),
                full_backing_filename: image.backing_file().map(|name| {
                    let name = name.strip_prefix("file:").unwrap_or(&name);
                    resolve_relative(image.name(), name)
                }),
                backing_filename_format: image.backing_file().and(image.backing_format()),
                dirty: image.is_dirty(),
                snapshots: image
                    .snapshots()
                    .iter()
                    .map(SnapshotInfo::from_entry)
                    .collect(),
                qcow2: Some(Qcow2Info {
                    compat: if v3 { "1.1" } else { "0.10" },
                    compression_type: image.compression_type().name(),
                    lazy_refcounts: image.lazy_refcounts(),
                    refcount_bits: header.refcount_bits(),
                    corrupt: image.is_corrupt(),
                    extended_l2: header.extended_l2(),
                    data_file: image.data_file_name(),
                    data_file_raw: image.data_file_raw(),
                    bitmaps: image.bitmaps()?,
                }),
            }
        }
    })
}

/// The facts about every layer of `chain`, top first (`qemu-img info --backing-chain`).
pub fn chain_info(chain: &Chain) -> Result<Vec<ImageInfo>> {
    chain.layers().iter().map(info).collect()
}

/// What can be said of an image of a format this crate recognises but does not open: its
/// format and sizes, nothing of its content or backing file.
pub fn foreign_info(image: &ForeignImage) -> ImageInfo {
    ImageInfo::sizes_only(
        image.name.clone(),
        image.format,
        image.virtual_size,
        image.allocated_size,
        image.file_len,
    )
}

/// Opens the image at `path` with `options` and describes it and, unless
/// `options.no_backing`, its backing chain, top first: `qemu-img info` (with
/// `--backing-chain` when the backing files are opened). An image of a format this crate
/// recognises but does not open is described ([`foreign_info`]) where every other
/// operation refuses it; it ends the chain.
pub fn open_info(path: impl AsRef<Path>, options: &ChainOptions) -> Result<Vec<ImageInfo>> {
    let (chain, foreign) = Chain::open_until_foreign(path.as_ref(), options)?;
    let mut infos = match &chain {
        Some(chain) => chain_info(chain)?,
        None => Vec::new(),
    };
    infos.extend(foreign.as_ref().map(foreign_info));
    Ok(infos)
}
