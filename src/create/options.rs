//! What `qemu-img create` can be told, checked as qemu-img checks it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{CompressionType, Geometry, MAX_BACKING_FILE_NAME, MAX_L1_BYTES};
use crate::layers::{Format, Layer};
use crate::names::resolve_relative;
use crate::qcow2::{Compat, ImageOptions, MAX_VIRTUAL_SIZE, Preallocation};
use crate::storage::Locking;

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

pub(super) fn invalid(message: impl Into<String>) -> Error {
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
        match self.format {
            Format::Raw => return self.validate_raw(),
            Format::Qcow2 => {}
            other => return Err(other.not_supported()),
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
    pub(super) fn check_qcow2_size(&self, size: u64) -> Result<u64> {
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
    pub(super) fn resolve(&self, path: &Path) -> Result<Resolved> {
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
            // Shared with everyone, as qemu-img create opens it: an overlay is made of a
            // base a running VM still writes (an external snapshot).
            let share = ImageOptions {
                locking: Locking::ForceShare,
                ..ImageOptions::default()
            };
            let layer = Layer::open(&backing_path, self.backing_format, &share)?;
            backing_format = Some(layer.format());
            if size.is_none() {
                size = Some(layer.size());
            }
        }
        let size = size.ok_or_else(|| invalid("a size is needed"))?;
        let size = match self.format {
            Format::Raw => size,
            Format::Qcow2 => self.check_qcow2_size(size)?,
            other => return Err(other.not_supported()),
        };
        Ok(Resolved {
            size,
            backing_format,
        })
    }
}

/// What [`CreateOptions::resolve`] settled.
pub(super) struct Resolved {
    pub(super) size: u64,
    pub(super) backing_format: Option<Format>,
}
