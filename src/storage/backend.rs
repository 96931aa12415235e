//! The [`Storage`] trait every backend implements: positional I/O with `&self`, so several
//! threads read one image at once.

use std::io;

use super::LockMode;
use crate::error::Result;

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
    /// buffer; host files let the kernel copy ([`FileStorage`](super::FileStorage)), which file systems that
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
    /// Makes `offset..offset + len` (inside the storage) read as zeros, letting the space
    /// go where the storage can, as QEMU's zero writes that may unmap do. The default
    /// writes zeros; host files punch a hole
    /// ([`FileStorage`](super::FileStorage)).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        super::write_zeros(offset, len, |zeros, at| self.write_at(zeros, at))
    }
    /// The host file behind this storage, for [`Storage::copy_from`] between files.
    fn as_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Takes QEMU's image locks for `mode` on the file (see [`super::Locking`]), held
    /// until the storage is dropped or locked again; another process's conflicting use is
    /// [`crate::Error::Locked`]. Storages that are not host files have no locks to take
    /// (the default does nothing).
    fn lock(&self, mode: LockMode) -> Result<()> {
        let _ = mode;
        Ok(())
    }
    /// Whether copies into this storage from `src` ([`Storage::copy_from`]) share extents
    /// instead of moving data: both are host files on one file system that can (XFS,
    /// Btrfs). Elsewhere the kernel's copy only saves one memory copy, and reading ahead
    /// on several threads does better.
    fn shares_extents_with(&self, src: &dyn Storage) -> bool {
        let _ = src;
        false
    }
    /// Starts writing completed writes in the byte range `range` (`0..u64::MAX`: all of
    /// them) back to the device without waiting, so that a later [`Storage::flush`] finds
    /// less to do; the range's cached copy may be dropped. Only a hint: nothing becomes
    /// durable until `flush` returns. Default: nothing.
    fn start_writeback(&self, range: std::ops::Range<u64>) -> io::Result<()> {
        let _ = range;
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
            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, len)
            }
            fn as_file(&self) -> Option<&std::fs::File> {
                (**self).as_file()
            }
            fn lock(&self, mode: LockMode) -> Result<()> {
                (**self).lock(mode)
            }
            fn shares_extents_with(&self, src: &dyn Storage) -> bool {
                (**self).shares_extents_with(src)
            }
            fn start_writeback(&self, range: std::ops::Range<u64>) -> io::Result<()> {
                (**self).start_writeback(range)
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

    use super::*;
    use crate::storage::recording::{Recording, call_every_method};

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
