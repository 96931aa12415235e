//! Finding images and reading what each says about itself and its backing file: headers
//! only, so a directory of big images, or of hostile ones, costs a few reads per file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::layers::Format;
use crate::names::{backing_path_name, resolve_relative};
use crate::qcow2::Headers;
use crate::storage::{FileInfo, FileStorage, Locking, Storage};

/// How [`super::Forest::scan`] looks.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    /// QEMU's locks on each file while its headers are read (default [`Locking::On`], as
    /// `qemu-img info`; [`Locking::ForceShare`] reads images a VM is writing).
    pub locking: Locking,
    /// The most images a scan reads, counting backing files outside the directories
    /// (default 100 000): a directory holding more is refused, not read for hours.
    pub max_images: usize,
}

impl Default for TreeOptions {
    fn default() -> TreeOptions {
        TreeOptions {
            locking: Locking::On,
            max_images: 100_000,
        }
    }
}

/// One image of a [`super::Forest`]: what its headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeImage {
    /// The file, as found (a directory's name joined with the file's, or as given).
    pub path: PathBuf,
    /// Its format, probed.
    pub format: Format,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes its file occupies on disk.
    pub actual_size: u64,
    /// The backing file's name as the image stores it.
    pub backing_name: Option<String>,
    /// The names of its internal snapshots, in table order.
    pub snapshots: Vec<String>,
    /// Which file it is (device and inode).
    pub(super) id: (u64, u64),
    /// Where its backing file is, resolved as QEMU resolves it (relative to the image's
    /// directory); `None` without one, or for a name that is no file (`json:`, protocols).
    pub(super) backing_path: Option<PathBuf>,
}

impl TreeImage {
    /// Reads the image at `path`; `Ok(None)` for what cannot be an image (directories,
    /// FIFOs, sockets, devices are left alone).
    pub(super) fn read(path: &Path, options: &TreeOptions) -> Result<Option<TreeImage>> {
        let info =
            FileInfo::of_host_file(path).map_err(|e| Error::io("opening", e).in_file(path))?;
        if !info.regular {
            return Ok(None);
        }
        read_image(path, info.id, options)
            .map(Some)
            .map_err(|e| e.in_file(path))
    }
}

fn read_image(path: &Path, id: (u64, u64), options: &TreeOptions) -> Result<TreeImage> {
    let storage = FileStorage::open(path, false).map_err(|e| Error::io("opening", e))?;
    if let Some(mode) = options.locking.mode(false)? {
        storage.lock(mode)?;
    }
    let len = storage
        .len()
        .map_err(|e| Error::io("reading file length", e))?;
    let format = Format::probe(&storage)?;
    let actual_size = storage.allocated_size().unwrap_or(len);
    let mut image = TreeImage {
        path: path.to_path_buf(),
        format,
        virtual_size: len,
        actual_size,
        backing_name: None,
        snapshots: Vec::new(),
        id,
        backing_path: None,
    };
    if format == Format::Qcow2 {
        let headers = Headers::read(&storage, len)?;
        image.virtual_size = headers.header.size;
        image.snapshots = headers.snapshot_names(&storage, len)?;
        image.backing_path = headers
            .backing_file
            .as_deref()
            .and_then(|name| backing_path_name(name).ok())
            .map(|name| resolve_relative(path, name));
        image.backing_name = headers.backing_file;
    }
    Ok(image)
}

/// The files to read: each directory's entries (sorted by name; not recursive) and each
/// file named, at most `max` of them.
pub(super) fn files_in(paths: &[PathBuf], max: usize) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        // The empty name is the current directory (the parent of a bare file name), and
        // its files keep bare names.
        let listing = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path.as_path()
        };
        let meta = std::fs::metadata(listing).map_err(|e| Error::io("opening", e).in_file(path))?;
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut names = Vec::new();
        for entry in
            std::fs::read_dir(listing).map_err(|e| Error::io("listing", e).in_file(path))?
        {
            let entry = entry.map_err(|e| Error::io("listing", e).in_file(path))?;
            names.push(entry.file_name());
            if files.len() + names.len() > max {
                return Err(too_many(max).in_file(path));
            }
        }
        names.sort();
        files.extend(names.into_iter().map(|name| path.join(name)));
    }
    Ok(files)
}

pub(super) fn too_many(max: usize) -> Error {
    Error::InvalidArgument(format!(
        "more than {max} images to read (TreeOptions::max_images)"
    ))
}
