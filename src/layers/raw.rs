//! A raw image: guest offset = file offset.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::qcow2::{Mapping, Run, check_run_buffer};
use crate::storage::{Extent, Storage, write_zeros};

use super::{Format, PROBE_BYTES};

/// A raw image layer.
pub struct RawImage {
    name: PathBuf,
    storage: Box<dyn Storage>,
    /// The file's length rounded up to 512 bytes.
    size: u64,
    /// The file's length.
    file_len: u64,
    /// The format was probed, not given: writes must not make the file probe as another
    /// format (see [`RawImage::is_probed`]).
    probed: bool,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("probed", &self.probed)
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
            probed: false,
        })
    }

    /// This image, its format having been probed rather than given.
    pub(crate) fn mark_probed(self) -> RawImage {
        RawImage {
            probed: true,
            ..self
        }
    }

    /// Whether the image's format was probed (opened without saying it is raw). Then, as
    /// in QEMU, a write that would make its first sector probe as another format is
    /// refused ([`Error::ProbedRawWrite`]): a guest must not turn its disk into an image
    /// of another format (say qcow2 naming a host file as its backing file) that the next
    /// probe would believe. Opening it as [`Format::Raw`] lifts the guard.
    pub fn is_probed(&self) -> bool {
        self.probed
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
        self.check_first_sector(offset, buf.len() as u64, |part| {
            part.copy_from_slice(&buf[..part.len()]);
            Ok(())
        })?;
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing at {offset:#x}"), e).in_file(&self.name))
    }

    /// Refuses a write of `len` bytes at `offset` that would make the first sector of a
    /// probed image probe as another format, as QEMU's raw driver does (`raw_co_pwritev`
    /// in block/raw-format.c): a write touching the first 512 bytes is checked with the
    /// probe (no file name, so never dmg) on the sector as it would be, the old bytes
    /// (zeros past the end of the file) under the new ones, which `fill` writes into the
    /// part of the sector the write covers. (QEMU sees the whole sector: a probed raw
    /// image takes requests in whole sectors, and a partial one is read, merged and
    /// written whole. Zero writes are checked too: in QEMU a partial one is such a merged
    /// write, and a whole zero sector probes as raw anyway.)
    fn check_first_sector(
        &self,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if !self.probed || len == 0 || offset >= PROBE_BYTES as u64 {
            return Ok(());
        }
        let mut sector = [0u8; PROBE_BYTES];
        // The current length: a write in the last partial sector may have grown the file.
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading file length", e).in_file(&self.name))?;
        let have = file_len.min(PROBE_BYTES as u64) as usize;
        self.storage
            .read_at(&mut sector[..have], 0)
            .map_err(|e| Error::io("reading the first sector", e).in_file(&self.name))?;
        let start = offset as usize;
        let end = offset.saturating_add(len).min(PROBE_BYTES as u64) as usize;
        fill(&mut sector[start..end])?;
        match Format::probe_bytes(&sector, None) {
            Format::Raw => Ok(()),
            other => Err(Error::ProbedRawWrite {
                format: other.name(),
            }
            .in_file(&self.name)),
        }
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

    /// Grows the file from `old_len` to `new_size` (see [`RawImage::resize`]) and makes
    /// the new area take disk space as `mode` says, as QEMU's file driver truncates with
    /// preallocation: `Falloc` reserves it (`fallocate`; zeros are written on a storage
    /// that is not a host file), `Full` writes zeros. `Off` only grows; `Metadata` is
    /// refused before anything changes, as QEMU's raw driver refuses it.
    pub(crate) fn grow_preallocated(
        &self,
        old_len: u64,
        new_size: u64,
        mode: crate::qcow2::Preallocation,
    ) -> Result<()> {
        use crate::qcow2::Preallocation;
        let fail = |what: &str, e| Error::io(what.to_owned(), e).in_file(&self.name);
        match mode {
            Preallocation::Metadata => {
                return Err(Error::InvalidArgument(
                    "Unsupported preallocation mode: metadata".into(),
                )
                .in_file(&self.name));
            }
            Preallocation::Off => return self.resize(new_size, false),
            Preallocation::Falloc | Preallocation::Full => {}
        }
        let len = new_size.saturating_sub(old_len);
        match (mode, self.storage.as_file()) {
            (Preallocation::Falloc, Some(file)) if len > 0 => {
                rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), old_len, len)
                    .map_err(|e| fail("reserving space (fallocate)", e.into()))?;
            }
            _ => write_zeros(old_len, len, |zeros, at| {
                self.storage
                    .write_at(zeros, at)
                    .map_err(|e| fail("writing zeros", e))
            })?,
        }
        self.resize(new_size, false)
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
        self.check_first_sector(offset, len, |part| {
            src.read_at(part, src_offset).map_err(|e| {
                Error::io(format!("reading {}", src_name.display()), e).in_file(src_name)
            })
        })?;
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
            .start_writeback(0..u64::MAX)
            .map_err(|e| Error::io("writing back", e).in_file(&self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const QCOW2_HEADER: &[u8] = b"QFI\xfb\0\0\0\x03";

    fn image(bytes: Vec<u8>, probed: bool) -> RawImage {
        let raw =
            RawImage::from_storage(Box::new(MemStorage::from_bytes(bytes)), "disk.img").unwrap();
        if probed { raw.mark_probed() } else { raw }
    }

    fn first_bytes(raw: &RawImage, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        raw.storage().read_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn a_probed_image_refuses_a_first_sector_of_another_format() {
        let raw = image(vec![0; 4096], true);
        let e = raw.write_at(QCOW2_HEADER, 0).unwrap_err();
        assert!(matches!(
            e.root(),
            Error::ProbedRawWrite { format: "qcow2" }
        ));
        assert_eq!(
            e.report().to_string(),
            "disk.img: a write would make this probed raw image look like a qcow2 image; \
             open it with -f raw to allow it"
        );
        assert_eq!(first_bytes(&raw, 8), [0; 8], "nothing written");
        // The same bytes past the first sector change nothing the probe sees.
        raw.write_at(QCOW2_HEADER, 512).unwrap();
        // A write that keeps the sector raw passes.
        raw.write_at(b"hello", 0).unwrap();
    }

    #[test]
    fn the_check_sees_the_sector_as_it_would_be() {
        // The magic alone probes as raw (version 0); the version completing it does not.
        let raw = image(vec![0; 4096], true);
        raw.write_at(&QCOW2_HEADER[..4], 0).unwrap();
        let e = raw.write_at(&QCOW2_HEADER[4..], 4).unwrap_err();
        assert!(matches!(
            e.root(),
            Error::ProbedRawWrite { format: "qcow2" }
        ));
        // Zero writes too: zeroing a byte of LUKS version 0x0101 makes version 1.
        let raw = image(
            [b"LUKS\xba\xbe\x01\x01".as_slice(), &[0; 504]].concat(),
            true,
        );
        let e = raw.write_zeroes(6, 1).unwrap_err();
        assert!(matches!(e.root(), Error::ProbedRawWrite { format: "luks" }));
        // A whole zero sector is raw.
        raw.write_zeroes(0, 512).unwrap();
    }

    #[test]
    fn a_short_file_reads_zeros_past_its_end() {
        let raw = image(b"QFI\xfb".to_vec(), true);
        assert_eq!(raw.size(), 512);
        let e = raw.write_at(&[0, 0, 0, 2], 4).unwrap_err();
        assert!(matches!(
            e.root(),
            Error::ProbedRawWrite { format: "qcow2" }
        ));
    }

    #[test]
    fn no_name_so_never_dmg() {
        let raw = RawImage::from_storage(Box::new(MemStorage::from_bytes(vec![0; 512])), "x.dmg")
            .unwrap()
            .mark_probed();
        raw.write_at(b"anything", 0).unwrap();
    }

    #[test]
    fn an_image_opened_as_raw_writes_anything() {
        let raw = image(vec![0; 4096], false);
        raw.write_at(QCOW2_HEADER, 0).unwrap();
        assert_eq!(first_bytes(&raw, 8), QCOW2_HEADER);
    }

    #[test]
    fn copies_are_checked_with_the_bytes_they_copy() {
        let src = MemStorage::from_bytes([QCOW2_HEADER, &[0; 504]].concat());
        let raw = image(vec![0; 4096], true);
        let e = raw
            .copy_from(&src, Path::new("src.img"), 0, 512, 0)
            .unwrap_err();
        assert!(matches!(
            e.root(),
            Error::ProbedRawWrite { format: "qcow2" }
        ));
        // From an offset of the source that holds no header: allowed.
        raw.copy_from(&src, Path::new("src.img"), 8, 504, 0)
            .unwrap();
        // Only the header's first eight bytes: enough.
        let e = raw
            .copy_from(&src, Path::new("src.img"), 0, 8, 0)
            .unwrap_err();
        assert!(matches!(e.root(), Error::ProbedRawWrite { .. }));
    }
}
