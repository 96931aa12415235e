//! A raw image: guest offset = file offset.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::qcow2::{Mapping, Run, check_run_buffer};
use crate::storage::{Extent, Storage, write_zeros};

/// A raw image layer.
pub struct RawImage {
    name: PathBuf,
    storage: Box<dyn Storage>,
    /// The file's length rounded up to 512 bytes.
    size: u64,
    /// The file's length.
    file_len: u64,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RawImage {
    /// Wraps a storage as a raw image. Its size is the storage's length rounded up to
    /// whole 512-byte sectors, as QEMU counts it; the bytes past the end read as zeros.
    pub fn from_storage(storage: Box<dyn Storage>, name: impl Into<PathBuf>) -> Result<RawImage> {
        let name = name.into();
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e).in_file(&name))?;
        Ok(RawImage {
            name,
            storage,
            size: file_len.div_ceil(512) * 512,
            file_len,
        })
    }

    /// The name given at open.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Size in bytes: the file's length rounded up to 512 bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes the file occupies on disk, when known.
    pub fn allocated_size(&self) -> Option<u64> {
        self.storage.allocated_size()
    }

    /// Whether `offset..offset + max_len` starts with data or a hole in the file, and for
    /// how many bytes (see [`Storage::extent`]). `offset` must be below the size.
    pub fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.storage.extent(offset, max_len).map_err(|e| {
            Error::io(format!("querying extent at {offset:#x}"), e).in_file(&self.name)
        })
    }

    pub(crate) fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }
            .in_file(&self.name));
        }
        Ok(())
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing at {offset:#x}"), e).in_file(&self.name))
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        write_zeros(offset, len, |zeros, at| self.write_at(zeros, at))
    }

    pub(crate) fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        if new_size < self.file_len && !allow_shrink {
            return Err(Error::InvalidArgument(
                "shrinking an image can lose data: allow it explicitly (--shrink)".into(),
            )
            .in_file(&self.name));
        }
        self.storage
            .set_len(new_size)
            .map_err(|e| Error::io("resizing", e).in_file(&self.name))
    }

    pub(crate) fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io("flushing", e).in_file(&self.name))
    }

    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        !self.storage.is_read_only()
    }

    /// Where the guest data lives: host offsets of data runs point here.
    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// What `offset..offset + max_len` is: data up to the end of the file, then zeros for
    /// the partial sector past it. `offset` must be below the size.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Result<Run> {
        if offset >= self.size || max_len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size: self.size,
            }
            .in_file(&self.name));
        }
        let end = offset.saturating_add(max_len).min(self.size);
        Ok(if offset < self.file_len {
            Run {
                offset,
                len: end.min(self.file_len) - offset,
                mapping: Mapping::Data {
                    host: offset,
                    copied: false,
                },
            }
        } else {
            // The partial sector past the end of the file reads as zeros.
            Run {
                offset,
                len: end - offset,
                mapping: Mapping::Zero { host: Some(offset) },
            }
        })
    }

    /// Fills `buf` with the first `buf.len()` bytes of `run` (a run of this file). A buffer
    /// longer than the run is refused.
    pub fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        check_run_buffer(run, buf.len()).map_err(|e| e.in_file(&self.name))?;
        match run.mapping {
            Mapping::Data { host, .. } => self
                .storage
                .read_at(buf, host)
                .map_err(|e| Error::io(format!("reading at {host:#x}"), e).in_file(&self.name)),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Copies `len` bytes that `src` (the file `src_name`) stores from `src_offset` to
    /// `offset`, letting the storage copy them ([`Storage::copy_from`]).
    pub(crate) fn copy_from(
        &self,
        src: &dyn Storage,
        src_name: &Path,
        src_offset: u64,
        len: u64,
        offset: u64,
    ) -> Result<()> {
        self.check(offset, len)?;
        self.storage
            .copy_from(src, src_offset, offset, len)
            .map_err(|e| {
                Error::io(
                    format!("copying from {} to {offset:#x}", src_name.display()),
                    e,
                )
                .in_file(&self.name)
            })
    }

    /// Starts writing completed writes back without waiting (see
    /// [`Storage::start_writeback`]).
    pub(crate) fn start_writeback(&self) -> Result<()> {
        self.storage
            .start_writeback()
            .map_err(|e| Error::io("writing back", e).in_file(&self.name))
    }
}
