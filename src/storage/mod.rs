//! Where bytes live: a small positional-I/O trait and its backends, plus
//! [`FaultStorage`], which simulates crashes, full disks and read-only media for tests,
//! and the [`Opener`] that decides which storage a file name reaches ([`MemOpener`]: a
//! file system in memory).
//!
//! Every method takes `&self`: backends use positional I/O (no shared cursor) or interior
//! locking, so several threads can read one image at once.

mod fault;
mod file;
mod memory;
#[cfg(test)]
pub(crate) mod recording;
mod zeros;

pub use fault::{FaultStorage, Unflushed};
pub use file::FileStorage;
pub use memory::{MemOpener, MemStorage};
pub(crate) use zeros::write_zeros;

use std::io;
use std::path::{Path, PathBuf};

/// What a stretch of storage is: stored bytes or a hole (see [`Storage::extent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// This many bytes are stored data.
    Data(u64),
    /// This many bytes are a hole: they read as zeros and occupy no space.
    Hole(u64),
}

impl Extent {
    /// The extent's length in bytes.
    pub fn len(self) -> u64 {
        match self {
            Extent::Data(n) | Extent::Hole(n) => n,
        }
    }

    /// Whether the extent is empty.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// Positional byte storage under an image.
pub trait Storage: Send + Sync {
    /// Fills all of `buf` from `offset`. Reading past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage (with zeros) as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Copies `len` bytes of `src` from `src_offset` to `offset` of this storage, growing
    /// it as [`Storage::write_at`] does. The default reads and writes through a bounded
    /// buffer; host files let the kernel copy ([`FileStorage`]), which file systems that
    /// share extents (XFS, Btrfs) do by sharing them: no data moves.
    fn copy_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        copy_through_buffer(src, src_offset, self, offset, len)
    }
    /// The host file behind this storage, for [`Storage::copy_from`] between files.
    fn as_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Whether copies into this storage from `src` ([`Storage::copy_from`]) share extents
    /// instead of moving data: both are host files on one file system that can (XFS,
    /// Btrfs). Elsewhere the kernel's copy only saves one memory copy, and reading ahead
    /// on several threads does better.
    fn shares_extents_with(&self, src: &dyn Storage) -> bool {
        let _ = src;
        false
    }
    /// Starts writing completed writes back to the device without waiting, so that a
    /// later [`Storage::flush`] finds less to do. Only a hint: nothing becomes durable
    /// until `flush` returns. Default: nothing.
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// True when the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Bytes the storage really occupies (for `actual-size`); `None` when unknown.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
    /// Whether `write_at` is refused.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Whether the byte at `offset` (below the length) is data or in a hole, and how many
    /// bytes of that kind follow, at most `max_len` (non-zero). Backends that cannot tell
    /// report data.
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        let _ = offset;
        Ok(Extent::Data(max_len))
    }
}

/// [`Storage::copy_from`] through a buffer of at most 1 MiB.
pub(crate) fn copy_through_buffer<D: Storage + ?Sized>(
    src: &dyn Storage,
    src_offset: u64,
    dst: &D,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], src_offset + done)?;
        dst.write_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

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
/// data files) through one when [`crate::ImageOptions::opener`] names it, and as
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
    /// [`crate::BackingPolicy::confine_to`] compares, and the name a merge stores for a
    /// backing file in another directory. Default: [`std::fs::canonicalize`].
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
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

/// Forwards every method of [`Storage`], the defaulted ones included, to the storage the
/// wrapper points at. A method left out would reach the trait's default through
/// `Box<dyn Storage>` and quietly do nothing (start no writeback, share no extents).
macro_rules! forward_storage {
    ($($wrapper:ident)::+) => {
        impl<S: Storage + ?Sized> Storage for $($wrapper)::+<S> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn copy_from(
                &self,
                src: &dyn Storage,
                src_offset: u64,
                offset: u64,
                len: u64,
            ) -> io::Result<()> {
                (**self).copy_from(src, src_offset, offset, len)
            }
            fn as_file(&self) -> Option<&std::fs::File> {
                (**self).as_file()
            }
            fn shares_extents_with(&self, src: &dyn Storage) -> bool {
                (**self).shares_extents_with(src)
            }
            fn start_writeback(&self) -> io::Result<()> {
                (**self).start_writeback()
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn is_empty(&self) -> io::Result<bool> {
                (**self).is_empty()
            }
            fn allocated_size(&self) -> Option<u64> {
                (**self).allocated_size()
            }
            fn is_read_only(&self) -> bool {
                (**self).is_read_only()
            }
            fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
                (**self).extent(offset, max_len)
            }
        }
    };
}

forward_storage!(std::sync::Arc);
forward_storage!(Box);

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::recording::{Recording, call_every_method};
    use super::*;

    #[test]
    fn boxed_and_shared_storages_forward_every_method() {
        let shared = Arc::new(Recording::from_bytes(vec![1; 16]));
        let boxed: Box<dyn Storage> = Box::new(Arc::clone(&shared));
        let methods = call_every_method(&boxed);
        let calls = shared.all_calls();
        assert_eq!(
            calls.len(),
            methods,
            "every method reached the storage: {calls:?}"
        );
        assert!(calls.values().all(|&n| n == 1), "{calls:?}");
        // Through a box of a box, too.
        let twice: Box<dyn Storage> = Box::new(boxed);
        call_every_method(&twice);
        assert!(shared.all_calls().values().all(|&n| n == 2));
    }
}
