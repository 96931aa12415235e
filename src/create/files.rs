//! Creating image files: the image (and its external data file) from [`CreateOptions`],
//! once everything is validated and the backing file opened.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::layers::Format;
use crate::names::resolve_relative;
use crate::qcow2::{Layout, LayoutOptions, Preallocation};
use crate::storage::{FileStorage, Storage, write_zeros};

use super::options::{CreateOptions, Resolved, invalid};

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
    let storage = FileStorage::create(path)?;
    let falloc = options.preallocation == Preallocation::Falloc;
    match options.format {
        Format::Raw => {
            write_raw(&storage, resolved.size, options.preallocation, falloc)
                .map_err(|e| e.in_file(path))?;
            if falloc {
                reserve(&storage, 0, resolved.size).map_err(|e| e.in_file(path))?;
            }
        }
        Format::Qcow2 => {
            if let Some(data_path) = data_path {
                let data = FileStorage::create(data_path)?;
                write_raw(&data, resolved.size, options.preallocation, falloc)
                    .map_err(|e| e.in_file(data_path))?;
                if falloc {
                    reserve(&data, 0, resolved.size).map_err(|e| e.in_file(data_path))?;
                }
            }
            let layout = Layout::plan(&layout_options(options, resolved))?;
            layout
                .write(&storage, options.preallocation, falloc)
                .map_err(|e| e.in_file(path))?;
            if falloc && !layout.external_data {
                let start = layout.first_data_cluster_offset();
                let end = layout.file_end();
                if end > start {
                    reserve(&storage, start, end - start).map_err(|e| e.in_file(path))?;
                }
            }
        }
        // `resolve` validated the options: no other format gets this far.
        other => return Err(other.not_supported().in_file(path)),
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
        Format::Qcow2 => Layout::plan(&layout_options(options, &resolved))?.write(
            storage,
            options.preallocation,
            false,
        )?,
        other => return Err(other.not_supported()),
    }
    storage.flush().map_err(|e| Error::io("flushing", e))
}

/// Reserves disk space for `offset..offset + len` of `storage` (`preallocation=falloc`).
fn reserve(storage: &FileStorage, offset: u64, len: u64) -> Result<()> {
    storage
        .reserve(offset, len)
        .map_err(|e| Error::io("reserving space (fallocate)", e))
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

/// The path of the data file `options` would create for an image at `path`.
pub fn data_file_path(path: impl AsRef<Path>, options: &CreateOptions) -> Option<PathBuf> {
    let path = path.as_ref();
    options
        .data_file
        .as_ref()
        .map(|name| resolve_relative(path, name))
}

/// The qcow2 layout `options` ask for, with what [`CreateOptions::resolve`] settled.
fn layout_options<'a>(options: &'a CreateOptions, resolved: &Resolved) -> LayoutOptions<'a> {
    LayoutOptions {
        size: resolved.size,
        cluster_size: options.cluster_size,
        refcount_bits: options.refcount_bits,
        compat: options.compat,
        extended_l2: options.extended_l2,
        lazy_refcounts: options.lazy_refcounts,
        compression_type: options.compression_type,
        data_file: options.data_file.as_deref(),
        data_file_raw: options.data_file_raw,
        preallocation: options.preallocation,
        backing_file: options.backing_file.as_deref(),
        backing_format: resolved.backing_format.map(Format::name),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::format::FeatureKind;
    use crate::qcow2::{Compat, Image, ImageOptions};
    use crate::storage::MemStorage;

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
    fn v3_only_options_are_refused_with_compat_0_10() {
        let options = CreateOptions {
            compat: Compat::V0_10,
            lazy_refcounts: true,
            ..CreateOptions::qcow2(1 << 20)
        };
        let err = options.validate().unwrap_err().report().to_string();
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
