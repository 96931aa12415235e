use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use std::sync::{Mutex, PoisonError};

use super::{Extent, FileLock, LockMode, Storage};
use crate::error::Result;

/// A file on the host, accessed with positional reads and writes (`pread`/`pwrite`).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    read_only: bool,
    /// QEMU's image locks this handle takes part in ([`Storage::lock`]).
    lock: Mutex<Option<FileLock>>,
    /// A second descriptor opened with `O_DIRECT` ([`FileCache::direct`]): requests whose
    /// offset and length are multiples of [`DIRECT_ALIGN`] go through it, from a buffer
    /// aligned as well; the rest (8-byte metadata entries, headers) through `file`, the
    /// page cache. The two stay coherent: Linux writes back and drops the cached pages
    /// of a range before a direct read or write of it (`kiocb_write_and_wait`,
    /// `kiocb_invalidate_pages`) and drops them again after a direct write.
    direct: Option<File>,
    /// Flushes do nothing ([`FileCache::no_flush`]).
    no_flush: bool,
}

/// How a [`FileStorage`] uses the host's page cache: QEMU's cache modes.
/// `writeback` (the default) is `FileCache::default()`; `none` sets `direct`;
/// `writethrough` sets `write_through`; `directsync` both; `unsafe` sets `no_flush`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileCache {
    /// Bypass the page cache (`O_DIRECT`) for aligned requests.
    pub direct: bool,
    /// Every write is durable when it returns (`O_DSYNC`), as QEMU flushes after each
    /// write request in these modes.
    pub write_through: bool,
    /// Flushes do nothing (QEMU's `cache.no-flush`).
    pub no_flush: bool,
}

/// The alignment of offsets, lengths and buffers of `O_DIRECT` requests: 4096 covers the
/// logical block size of every common disk (512 or 4096).
pub const DIRECT_ALIGN: usize = 4096;

impl FileStorage {
    /// Opens an existing file, read-only or read-write. FIFOs and sockets are refused
    /// before opening (opening a FIFO would wait for a writer; neither holds a disk), and
    /// so are directories.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<FileStorage> {
        let path = path.as_ref();
        let kind = std::fs::metadata(path)?.file_type();
        if kind.is_fifo() || kind.is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                if kind.is_fifo() {
                    "is a FIFO, not a disk image"
                } else {
                    "is a socket, not a disk image"
                },
            ));
        }
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        Ok(FileStorage {
            file,
            read_only: !writable,
            lock: Mutex::new(None),
            direct: None,
            no_flush: false,
        })
    }

    /// [`FileStorage::open`] with a cache mode. A file system that refuses `O_DIRECT`
    /// (`EINVAL`: procfs, ramfs, tmpfs before Linux 6.6) fails the open, as QEMU's
    /// `cache=none` does, with QEMU's words: "filesystem does not support O_DIRECT".
    pub fn open_cached(
        path: impl AsRef<Path>,
        writable: bool,
        cache: FileCache,
    ) -> io::Result<FileStorage> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path.as_ref();
        let mut storage = FileStorage::open(path, writable)?;
        let sync = if cache.write_through && writable {
            rustix::fs::OFlags::DSYNC.bits()
        } else {
            0
        };
        if sync != 0 {
            storage.file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(sync as i32)
                .open(path)?;
        }
        if cache.direct {
            let direct = OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags((rustix::fs::OFlags::DIRECT.bits() | sync) as i32)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    // The file opened without O_DIRECT just above: EINVAL now is the
                    // file system refusing it, which QEMU says in these words.
                    Some(code) if code == rustix::io::Errno::INVAL.raw_os_error() => {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "filesystem does not support O_DIRECT",
                        )
                    }
                    _ => e,
                })?;
            storage.direct = Some(direct);
        }
        storage.no_flush = cache.no_flush;
        Ok(storage)
    }

    /// The `O_DIRECT` descriptor, when the storage was opened with [`FileCache::direct`].
    pub fn direct_file(&self) -> Option<&File> {
        self.direct.as_ref()
    }

    /// The direct descriptor when `offset` and `len` allow a direct request.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&File> {
        let align = DIRECT_ALIGN as u64;
        self.direct
            .as_ref()
            .filter(|_| len > 0 && offset % align == 0 && len as u64 % align == 0)
    }

    /// Creates a file for writing, or empties an existing one, as `qemu-img create` does:
    /// an existing file is emptied only after QEMU's write lock on it is taken
    /// ([`LockMode::WRITE`], kept while the storage lives), so a file another process uses
    /// is refused ([`crate::Error::Locked`]) and left as it was.
    pub fn create(path: impl AsRef<Path>) -> Result<FileStorage> {
        let path = path.as_ref();
        let io = |e| crate::Error::io("creating", e).in_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let storage = FileStorage {
            file,
            read_only: false,
            lock: Mutex::new(None),
            direct: None,
            no_flush: false,
        };
        storage.lock(LockMode::WRITE).map_err(|e| e.in_file(path))?;
        storage.file.set_len(0).map_err(io)?;
        Ok(storage)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "opened read-only",
            ));
        }
        Ok(())
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reserves `len` bytes of disk space from `offset` (`fallocate`), growing the file as
    /// needed; the reserved range reads as zeros where nothing was written.
    pub fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), offset, len)?;
        Ok(())
    }
}

/// A buffer of `len` bytes whose start is aligned for `O_DIRECT`: a slice of a larger
/// vector (no unsafe allocation needed).
fn aligned_buffer(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + DIRECT_ALIGN, 0);
    let skip = storage.as_ptr().align_offset(DIRECT_ALIGN);
    &mut storage[skip..skip + len]
}

fn is_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(direct) = self.direct_for(offset, buf.len()) else {
            return self.file.read_exact_at(buf, offset);
        };
        let done = if is_aligned(buf) {
            direct.read_exact_at(buf, offset)
        } else {
            let mut storage = Vec::new();
            let bounce = aligned_buffer(&mut storage, buf.len());
            direct
                .read_exact_at(bounce, offset)
                .map(|()| buf.copy_from_slice(bounce))
        };
        // A direct read reaching past the end of the file stops short there, and its
        // remainder is unaligned: the buffered read then gives the answer (data, or the
        // end-of-file error) as without O_DIRECT.
        done.or_else(|_| self.file.read_exact_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        match self.direct_for(offset, buf.len()) {
            Some(direct) if is_aligned(buf) => direct.write_all_at(buf, offset),
            Some(direct) => {
                let mut storage = Vec::new();
                let bounce = aligned_buffer(&mut storage, buf.len());
                bounce.copy_from_slice(buf);
                direct.write_all_at(bounce, offset)
            }
            None => self.file.write_all_at(buf, offset),
        }
    }
    fn flush(&self) -> io::Result<()> {
        if self.read_only || self.no_flush {
            return Ok(());
        }
        // One inode: syncing either descriptor makes both descriptors' writes durable.
        self.file.sync_data()
    }
    /// `copy_file_range` when `src` is a host file too (a reflink where the file system
    /// shares extents), else through a buffer; also through a buffer when the kernel
    /// refuses the pair (other file systems on old kernels, special files).
    fn copy_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        let Some(from) = src.as_file() else {
            return super::copy_through_buffer(src, src_offset, self, offset, len);
        };
        let mut done = 0u64;
        while done < len {
            let mut src_at = src_offset + done;
            let mut at = offset + done;
            let want = (len - done).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(
                from,
                Some(&mut src_at),
                &self.file,
                Some(&mut at),
                want,
            ) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the source ended before the copied range",
                    ));
                }
                Ok(n) => done += n as u64,
                Err(rustix::io::Errno::INTR) => {}
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {
                    return super::copy_through_buffer(
                        src,
                        src_offset + done,
                        self,
                        offset + done,
                        len - done,
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    /// Makes `offset..offset + len` (inside the file) read as zeros, as QEMU's file driver
    /// does for a zero write that may unmap: the range is punched out
    /// (`FALLOC_FL_PUNCH_HOLE`, keeping the length), else zeroed in place
    /// (`FALLOC_FL_ZERO_RANGE`), else written with zeros where the file system (or
    /// device) can do neither.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        for flags in [
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        ] {
            match rustix::fs::fallocate(&self.file, flags, offset, len) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
                // Block devices refuse ranges their discard cannot do exactly.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NODEV) => {}
                Err(e) => return Err(e.into()),
            }
        }
        super::write_zeros(offset, len, |zeros, at| self.write_at(zeros, at))
    }
    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn lock(&self, mode: LockMode) -> Result<()> {
        let mut held = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // The new share is taken before the old one is dropped: locking again never
        // lets go of the file in between.
        let new = FileLock::acquire(&self.file, mode)?;
        *held = new;
        Ok(())
    }
    fn shares_extents_with(&self, src: &dyn Storage) -> bool {
        // statfs(2) magic numbers of file systems whose copy_file_range shares extents.
        const XFS: u64 = 0x5846_5342;
        const BTRFS: u64 = 0x9123_683e;
        let Some(from) = src.as_file() else {
            return false;
        };
        let kind = |f: &File| rustix::fs::fstatfs(f).ok().map(|s| s.f_type as u64);
        let same_device = match (self.file.metadata(), from.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        };
        same_device && matches!(kind(&self.file), Some(XFS | BTRFS))
    }
    /// `posix_fadvise(POSIX_FADV_DONTNEED)` over the range: Linux queues its dirty pages
    /// for writing (without waiting) and drops the clean ones from the page cache, whose
    /// pages the next writes then reuse. (`sync_file_range` would only start the writing,
    /// but needs `unsafe`; a background `fdatasync` kept every page, and fresh pages cost
    /// more than the copy on these VMs.) What is dropped is re-read if needed: callers
    /// pass the range they wrote, not the metadata they will read.
    fn start_writeback(&self, range: std::ops::Range<u64>) -> io::Result<()> {
        if self.read_only || range.is_empty() {
            return Ok(());
        }
        let len = (range.end != u64::MAX).then(|| {
            std::num::NonZeroU64::new(range.end - range.start).expect("the range is not empty")
        });
        rustix::fs::fadvise(&self.file, range.start, len, rustix::fs::Advice::DontNeed)?;
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Asks the file system with `SEEK_DATA`/`SEEK_HOLE` (which move no shared state that
    /// positional I/O depends on); a file system that cannot answer reports data.
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        use rustix::fs::{SeekFrom, seek};
        let data = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(data) => data,
            // No data at or after `offset`: a trailing hole.
            Err(rustix::io::Errno::NXIO) => return Ok(Extent::Hole(max_len)),
            Err(_) => return Ok(Extent::Data(max_len)),
        };
        if data > offset {
            return Ok(Extent::Hole((data - offset).min(max_len)));
        }
        match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(hole) if hole > offset => Ok(Extent::Data((hole - offset).min(max_len))),
            _ => Ok(Extent::Data(max_len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn copy_from_copies_between_files_and_from_memory_and_grows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, pattern(3 << 20)).unwrap();
        let src = FileStorage::open(&src_path, false).unwrap();
        let dst = FileStorage::create(dir.path().join("dst")).unwrap();
        // Between host files (copy_file_range), unaligned, past the current end.
        dst.copy_from(&src, 12345, 4096 + 7, (2 << 20) + 3).unwrap();
        let mut got = vec![0u8; (2 << 20) + 3];
        dst.read_at(&mut got, 4096 + 7).unwrap();
        assert_eq!(got, pattern(3 << 20)[12345..12345 + got.len()]);
        assert_eq!(dst.len().unwrap(), 4096 + 7 + got.len() as u64);
        // From storage without a host file: through the buffer.
        let mem = MemStorage::from_bytes(pattern(1 << 20));
        dst.copy_from(&mem, 100, 0, 5000).unwrap();
        let mut head = vec![0u8; 5000];
        dst.read_at(&mut head, 0).unwrap();
        assert_eq!(head, pattern(1 << 20)[100..5100]);
        // A source shorter than the range is an error, not a short copy.
        let err = dst.copy_from(&src, (3 << 20) - 10, 0, 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        // Read-only storage refuses.
        let err = src.copy_from(&mem, 0, 0, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        // ext4 and tmpfs share no extents; a memory source never does.
        assert!(!dst.shares_extents_with(&mem));
    }

    #[test]
    fn write_zeroes_zeroes_inside_the_file_and_keeps_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, pattern(1 << 20)).unwrap();
        let file = FileStorage::open(&path, true).unwrap();
        file.write_zeroes(4096 + 3, 70000).unwrap();
        let mut got = vec![0u8; 1 << 20];
        file.read_at(&mut got, 0).unwrap();
        let mut want = pattern(1 << 20);
        want[4096 + 3..4096 + 3 + 70000].fill(0);
        assert!(got == want);
        assert_eq!(file.len().unwrap(), 1 << 20);
        let read_only = FileStorage::open(&path, false).unwrap();
        let err = read_only.write_zeroes(0, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
