//! Which storage a file name reaches: the host file system by default, or an [`Opener`]
//! (a file system in memory, storages that inject faults).

use std::io;
use std::path::{Path, PathBuf};

use super::{FileStorage, Storage};

/// Which file a name refers to and what kind of file it is (see [`Opener::stat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileInfo {
    /// Identifies the file: every name of one file (links, `..`) gives the same value.
    /// For host files, the device and inode numbers.
    pub id: (u64, u64),
    /// A regular file (not a block or character device, FIFO or socket).
    pub regular: bool,
}

impl FileInfo {
    /// What the host file system says about the file at `path` (following links).
    pub fn of_host_file(path: impl AsRef<Path>) -> io::Result<FileInfo> {
        let path = path.as_ref();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(FileInfo {
            id: (meta.dev(), meta.ino()),
            regular: meta.is_file(),
        })
    }
}

/// Opens the storage behind a file name. Images and chains open their files (and external
/// data files) through one when their options name one (`ImageOptions::opener`), and as
/// [`FileStorage`]s otherwise: tests put every image of an operation in a
/// [`FaultStorage`] this way, or a whole chain in memory ([`MemOpener`]).
///
/// Chains also ask it which file a name refers to ([`Opener::stat`], to refuse loops,
/// apply the backing policy and find layers by name) and for canonical names
/// ([`Opener::canonicalize`]); by default both come from the host file system, so an
/// opener that serves host files under their own names implements only [`Opener::open`].
pub trait Opener: Send + Sync {
    /// Opens the existing file at `path`, for writing when `writable`.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>>;

    /// Looks up the file at `path` without opening it (following links). Default: the
    /// host file system's answer ([`FileInfo::of_host_file`]).
    fn stat(&self, path: &Path) -> io::Result<FileInfo> {
        FileInfo::of_host_file(path)
    }

    /// The absolute name of `path` with links and `..` resolved: what
    /// a backing policy's `confine_to` compares, and the name a merge stores for a
    /// backing file in another directory. Default: [`std::fs::canonicalize`].
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    /// The files and directories in directory `dir`, each as `dir` joined with its name,
    /// for finding the images that use one as backing file (the tree scan of `ops`).
    /// Default: [`io::ErrorKind::Unsupported`] (such openers cannot be searched).
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let _ = dir;
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Deletes the file at `path` (a layer `ops::remove` took out of every chain, its
    /// journal). Default: [`io::ErrorKind::Unsupported`] (the file is left).
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let _ = path;
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Creates the file at `path` empty (or empties it), for writing: the journal that
    /// lets an interrupted `ops::remove` be finished. Default:
    /// [`io::ErrorKind::Unsupported`] (removes through such an opener keep no journal).
    fn create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        let _ = path;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Opens `path` with `opener`, or as a [`FileStorage`] without one.
pub(crate) fn open_with(
    opener: Option<&dyn Opener>,
    path: &Path,
    writable: bool,
) -> io::Result<Box<dyn Storage>> {
    match opener {
        Some(o) => o.open(path, writable),
        None => Ok(Box::new(FileStorage::open(path, writable)?)),
    }
}

/// [`Opener::stat`] of `opener`, or of the host file system without one.
pub(crate) fn stat_with(opener: Option<&dyn Opener>, path: &Path) -> io::Result<FileInfo> {
    match opener {
        Some(o) => o.stat(path),
        None => FileInfo::of_host_file(path),
    }
}

/// [`Opener::canonicalize`] of `opener`, or of the host file system without one.
pub(crate) fn canonicalize_with(opener: Option<&dyn Opener>, path: &Path) -> io::Result<PathBuf> {
    match opener {
        Some(o) => o.canonicalize(path),
        None => std::fs::canonicalize(path),
    }
}

/// [`Opener::read_dir`] of `opener`, or the host directory's entries (sorted by name)
/// without one; from the host, at most `limit + 1` of them are read, so a caller bounded by
/// `limit` learns there are more without holding a huge directory in memory.
pub(crate) fn read_dir_with(
    opener: Option<&dyn Opener>,
    dir: &Path,
    limit: usize,
) -> io::Result<Vec<PathBuf>> {
    let mut entries = match opener {
        Some(o) => o.read_dir(dir)?,
        None => {
            // The empty name is the current directory; its entries keep bare names.
            let listing = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::read_dir(listing)?
                .take(limit.saturating_add(1))
                .map(|entry| entry.map(|e| dir.join(e.file_name())))
                .collect::<io::Result<Vec<_>>>()?
        }
    };
    entries.sort();
    Ok(entries)
}

/// [`Opener::remove_file`] of `opener`, or [`std::fs::remove_file`] without one.
pub(crate) fn remove_file_with(opener: Option<&dyn Opener>, path: &Path) -> io::Result<()> {
    match opener {
        Some(o) => o.remove_file(path),
        None => std::fs::remove_file(path),
    }
}

/// Opens host files with a cache mode ([`FileCache`]): what qemu-img's `-t` and `-T` ask
/// of the files of a chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheOpener {
    /// The cache mode of every file opened.
    pub cache: super::FileCache,
}

impl Opener for CacheOpener {
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>> {
        Ok(Box::new(FileStorage::open_cached(
            path, writable, self.cache,
        )?))
    }
    /// The host's directories, as without an opener (a cache mode changes no name).
    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        read_dir_with(None, dir, usize::MAX - 1)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        let storage = FileStorage::create(path).map_err(io::Error::other)?;
        Ok(Box::new(storage))
    }
}
