//! Where bytes live: a small positional-I/O trait and its backends, plus
//! [`FaultStorage`], which simulates crashes, full disks and read-only media for tests.
//!
//! Every method takes `&self`: backends use positional I/O (no shared cursor) or interior
//! locking, so several threads can read one image at once.

mod fault;
mod file;
mod memory;

pub use fault::{FaultStorage, Unflushed};
pub use file::FileStorage;
pub use memory::MemStorage;

use std::io;
use std::path::Path;

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

/// Opens the storage behind a file name. Images and chains open their files (and external
/// data files) through one when [`crate::ImageOptions::opener`] names it, and as
/// [`FileStorage`]s otherwise: tests put every image of an operation in a
/// [`FaultStorage`] this way. Chains still look each file up in the file system (to
/// refuse loops and apply the backing policy), so the files must exist; the opener only
/// decides what is read and written.
pub trait Opener: Send + Sync {
    /// Opens the existing file at `path`, for writing when `writable`.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn Storage>>;
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

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
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

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
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
