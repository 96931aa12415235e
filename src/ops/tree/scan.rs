//! Finding images and reading what each says about itself and its backing file: headers
//! only, so a directory of big images, or of hostile ones, costs a few reads per file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::layers::Format;
use crate::names::{backing_path_name, resolve_relative};
use crate::qcow2::Headers;
use crate::storage::{Locking, Opener, open_with, read_dir_with, stat_with};

/// How [`super::Forest::scan`] looks.
#[derive(Clone)]
pub struct TreeOptions {
    /// QEMU's locks on each file while its headers are read (default [`Locking::On`], as
    /// `qemu-img info`; [`Locking::ForceShare`] reads images a VM is writing).
    pub locking: Locking,
    /// The most images a scan reads, counting backing files outside the directories
    /// (default 100 000): a directory holding more is refused, not read for hours.
    pub max_images: usize,
    /// Lists directories and opens files (default `None`: the host's); an opener that
    /// cannot list ([`Opener::read_dir`]) cannot be searched.
    pub opener: Option<Arc<dyn Opener>>,
}

impl Default for TreeOptions {
    fn default() -> TreeOptions {
        TreeOptions {
            locking: Locking::On,
            max_images: 100_000,
            opener: None,
        }
    }
}

impl std::fmt::Debug for TreeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeOptions")
            .field("locking", &self.locking)
            .field("max_images", &self.max_images)
            .field("opener", &self.opener.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl TreeOptions {
    pub(super) fn opener(&self) -> Option<&dyn Opener> {
        self.opener.as_deref()
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
            stat_with(options.opener(), path).map_err(|e| Error::io("opening", e).in_file(path))?;
        if !info.regular {
            return Ok(None);
        }
        read_image(path, info.id, options)
            .map(Some)
            .map_err(|e| e.in_file(path))
    }
}

fn read_image(path: &Path, id: (u64, u64), options: &TreeOptions) -> Result<TreeImage> {
    let storage = open_with(options.opener(), path, false).map_err(|e| Error::io("opening", e))?;
    if let Some(mode) = options.locking.mode(false)? {
        storage.lock(mode)?;
    }
    let len = storage
        .len()
        .map_err(|e| Error::io("reading file length", e))?;
    let format = Format::probe(&*storage, path)?;
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
        let headers = Headers::read(&*storage, len)?;
        image.virtual_size = headers.header.size;
        image.snapshots = headers.snapshot_names(&*storage, len)?;
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
pub(super) fn files_in(paths: &[PathBuf], options: &TreeOptions) -> Result<Vec<PathBuf>> {
    let max = options.max_images;
    let mut files = Vec::new();
    for path in paths {
        match read_dir_with(options.opener(), path, max.saturating_sub(files.len())) {
            Ok(entries) => {
                if files.len() + entries.len() > max {
                    return Err(too_many(max).in_file(path));
                }
                files.extend(entries);
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => files.push(path.clone()),
            Err(e) => return Err(Error::io("listing", e).in_file(path)),
        }
    }
    Ok(files)
}

pub(super) fn too_many(max: usize) -> Error {
    Error::InvalidArgument(format!(
        "more than {max} images to read (TreeOptions::max_images)"
    ))
}
