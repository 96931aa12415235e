//! Where the bytes of a write come from (the caller's buffer, or a storage copy), and how
//! consecutive pieces are coalesced into one positional write.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::storage::Storage;

use crate::qcow2::image::Image;

/// Coalesces data writes that continue each other, in the host file and in the caller's
/// buffer, into one positional write straight from that buffer.
pub(super) struct PendingWrite<'b> {
    /// The caller's data and the guest offset of its first byte.
    src: Source<'b>,
    src_offset: u64,
    /// A run waiting to be written: host offset, start in `src`, length.
    run: Option<(u64, u64, u64)>,
}

impl<'b> PendingWrite<'b> {
    pub(super) fn new(src: Source<'b>, src_offset: u64) -> PendingWrite<'b> {
        PendingWrite {
            src,
            src_offset,
            run: None,
        }
    }

    /// Queues `len` bytes of the caller's data from guest `guest` for host `host`.
    pub(super) fn push_borrowed(
        &mut self,
        image: &Image,
        host: u64,
        guest: u64,
        len: u64,
    ) -> Result<()> {
        let start = guest - self.src_offset;
        if let Some((h, s, l)) = self.run {
            if h + l == host && s + l == start && l < 32 << 20 {
                self.run = Some((h, s, l + len));
                return Ok(());
            }
            self.flush(image)?;
        }
        self.run = Some((host, start, len));
        Ok(())
    }

    /// Writes bytes assembled elsewhere (copy-on-write), after what is queued.
    pub(super) fn push_owned(&mut self, image: &Image, host: u64, bytes: &[u8]) -> Result<()> {
        self.flush(image)?;
        write_data(image, host, Source::Bytes(bytes))
    }

    pub(super) fn flush(&mut self, image: &Image) -> Result<()> {
        match self.run.take() {
            Some((host, start, len)) => write_data(image, host, self.src.slice(start, start + len)),
            None => Ok(()),
        }
    }
}

/// Where the bytes of a write come from.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// The caller's buffer.
    Bytes(&'a [u8]),
    /// `len` bytes of another file from `offset`, copied by the storage.
    Copy {
        storage: &'a dyn Storage,
        name: &'a std::path::Path,
        offset: u64,
        len: u64,
    },
}

impl<'a> Source<'a> {
    pub(super) fn len(&self) -> u64 {
        match self {
            Source::Bytes(b) => b.len() as u64,
            Source::Copy { len, .. } => *len,
        }
    }

    /// Bytes `from..to` of this source.
    pub(super) fn slice(&self, from: u64, to: u64) -> Source<'a> {
        match *self {
            Source::Bytes(b) => Source::Bytes(&b[from as usize..to as usize]),
            Source::Copy {
                storage,
                name,
                offset,
                ..
            } => Source::Copy {
                storage,
                name,
                offset: offset + from,
                len: to - from,
            },
        }
    }

    /// Fills `buf` (as long as the source) with its bytes, for copy-on-write.
    pub(super) fn read_into(&self, buf: &mut [u8]) -> Result<()> {
        match *self {
            Source::Bytes(b) => buf.copy_from_slice(b),
            Source::Copy {
                storage,
                name,
                offset,
                ..
            } => storage.read_at(buf, offset).map_err(|e| {
                Error::io(format!("reading at {offset:#x} to copy"), e).in_file(name)
            })?,
        }
        Ok(())
    }

    /// Writes the source at `host` of `image`'s data storage.
    pub(super) fn write_to(&self, image: &Image, host: u64) -> Result<()> {
        let dst = image.data_storage();
        match *self {
            Source::Bytes(b) => dst
                .write_at(b, host)
                .map_err(|e| image.io_error("writing data", host, e)),
            Source::Copy {
                storage,
                name,
                offset,
                len,
            } => dst.copy_from(storage, offset, host, len).map_err(|e| {
                image.io_error(
                    &format!("copying data from {} at {offset:#x}", name.display()),
                    host,
                    e,
                )
            }),
        }
    }
}

/// Writes `source` at `host` of the image's data storage, after the overlap check.
pub(super) fn write_data(image: &Image, host: u64, source: Source<'_>) -> Result<()> {
    image.check_overlap("data", host, source.len(), None)?;
    // Clusters this image holds start inside the file (QEMU may leave the last one
    // short); a damaged L2 entry may point far past it, and writing there would grow the
    // file by that much (reads refuse such clusters too).
    let file_len = image.file_len();
    let cluster = host & !(image.cluster_size() - 1);
    if image.data_file.is_none() && cluster >= file_len {
        return Err(crate::error::Error::Truncated {
            structure: "guest data",
            offset: host,
            len: source.len(),
            file_len,
        });
    }
    source.write_to(image, host)?;
    image.data_written.note(host, source.len());
    if image.data_file.is_none() {
        image
            .file_len
            .fetch_max(host + source.len(), Ordering::Relaxed);
    }
    Ok(())
}
