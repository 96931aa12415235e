//! Reading guest data from one image: each run read as its mapping says, compressed
//! clusters decompressed (the last one kept for the reads that follow).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::storage::Extent;

use super::compress::decompress;
use super::image::{Image, read_exact};
use super::mapping::{Mapping, Run, fill_by_runs};

impl Image {
    /// How the data file (the image itself unless it has an external one) stores the host
    /// range `host..host + max_len`: data or a hole, and for how many bytes. Past the end
    /// of the file, and from a hole that reaches the end, everything reads as zeros: the
    /// answer is a hole over all of `max_len`.
    pub fn host_extent(&self, host: u64, max_len: u64) -> Result<Extent> {
        let storage = self.data_storage();
        let io = |e| self.name_error(Error::io(format!("querying extent at {host:#x}"), e));
        let len = storage.len().map_err(io)?;
        if host >= len || max_len == 0 {
            return Ok(Extent::Hole(max_len));
        }
        Ok(
            match storage.extent(host, max_len.min(len - host)).map_err(io)? {
                Extent::Hole(n) if host + n >= len => Extent::Hole(max_len),
                other => other,
            },
        )
    }

    /// Fills `buf` with what `run`'s first `buf.len()` bytes read as in this image alone;
    /// unallocated ranges read as zeros. A buffer longer than the run is refused: the bytes
    /// past it are not the run's.
    pub fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        check_run_buffer(run, buf.len()).map_err(|e| self.name_error(e))?;
        match run.mapping {
            Mapping::Unallocated | Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => self.data_storage().read_at(buf, host).map_err(|e| {
                let len = buf.len() as u64;
                let file_len = self.data_storage().len().unwrap_or(0);
                // An L2 entry pointing past the end of the file: say so, not "failed to
                // fill whole buffer".
                self.name_error(if host.saturating_add(len) > file_len {
                    Error::Truncated {
                        structure: "guest data",
                        offset: host,
                        len,
                        file_len,
                    }
                } else {
                    Error::io(format!("reading data at host offset {host:#x}"), e)
                })
            }),
            Mapping::Compressed(d) => {
                let cluster = self.compressed_cluster(d.host_offset, d.len)?;
                let start = self.geometry.offset_in_cluster(run.offset) as usize;
                let src = cluster.get(start..start + buf.len()).ok_or_else(|| {
                    self.name_error(Error::corrupt(
                        "compressed cluster",
                        d.host_offset,
                        "run exceeds cluster",
                    ))
                })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }
    }

    /// Drops the cached decompressed cluster (its host clusters were freed).
    pub(crate) fn forget_compressed(&self) {
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn compressed_cluster(&self, host_offset: u64, len: u64) -> Result<Arc<[u8]>> {
        let mut last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((at, data)) = &*last {
            if *at == host_offset {
                return Ok(data.clone());
            }
        }
        drop(last);
        // The descriptor may claim sectors past the end of the file (qemu writes the last
        // compressed cluster without padding): read what exists.
        let available = self.file_len().saturating_sub(host_offset).min(len);
        if available == 0 {
            return Err(self.name_error(Error::Truncated {
                structure: "compressed cluster",
                offset: host_offset,
                len,
                file_len: self.file_len(),
            }));
        }
        let read = |available: u64, file_len: u64| {
            read_exact(
                &*self.storage,
                "compressed cluster",
                host_offset,
                available,
                file_len,
            )
        };
        let input = match read(available, self.file_len()) {
            // A cluster counts in `file_len` as soon as it is allocated, before anything is
            // written to it: the last compressed cluster written since the image was
            // opened ends where its data does (unpadded, as QEMU writes it), before the
            // end of the last sector its descriptor names. Read what the file holds.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                let real = self
                    .storage
                    .len()
                    .map_err(|e| self.name_error(Error::io("reading the file length", e)))?;
                match real.saturating_sub(host_offset).min(len) {
                    0 => Err(Error::Truncated {
                        structure: "compressed cluster",
                        offset: host_offset,
                        len,
                        file_len: real,
                    }),
                    available => read(available, real),
                }
            }
            other => other,
        }
        .map_err(|e| self.name_error(e))?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        decompress(self.compression_type(), &input, &mut out, host_offset)
            .map_err(|e| self.name_error(e))?;
        let data: Arc<[u8]> = out.into();
        last = self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *last = Some((host_offset, data.clone()));
        Ok(data)
    }

    /// Reads `buf.len()` bytes at guest `offset` from this image alone: ranges that are
    /// unallocated here read as zeros (use [`crate::Chain`] to read through backing files).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(self.name_error(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }));
        }
        fill_by_runs(
            buf,
            self.runs(offset, len),
            |r| r.len,
            |run, part| self.read_run(run, part),
        )
    }
}

/// Refuses a buffer longer than the run it is to be filled from.
pub(crate) fn check_run_buffer(run: &Run, len: usize) -> Result<()> {
    if len as u64 > run.len {
        return Err(Error::InvalidArgument(format!(
            "a {len}-byte buffer for a {}-byte run at {:#x}",
            run.len, run.offset
        )));
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    use crate::create::{CreateOptions, create_on};
    use crate::layers::{Layer, RawImage};
    use crate::qcow2::{Image, ImageOptions, Mapping};
    use crate::storage::MemStorage;

    #[test]
    fn a_buffer_longer_than_its_run_is_refused_not_read_past_the_run() {
        let file = MemStorage::new();
        create_on(&file, &CreateOptions::qcow2(1 << 20)).unwrap();
        let image = Image::from_storage(
            Box::new(MemStorage::from_bytes(file.to_bytes())),
            "a.qcow2",
            &ImageOptions::default(),
            None,
        )
        .unwrap();
        let run = image.lookup(0, 512).unwrap();
        let mut buf = vec![1u8; 1024];
        let err = image.read_run(&run, &mut buf).unwrap_err();
        assert!(
            err.report().to_string().starts_with("a.qcow2: "),
            "{}",
            err.report()
        );
        image.read_run(&run, &mut buf[..512]).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..].iter().all(|&b| b == 1));

        let raw = Layer::Raw(
            RawImage::from_storage(Box::new(MemStorage::from_bytes(vec![7; 4096])), "r").unwrap(),
        );
        let run = raw.lookup(0, 1024).unwrap();
        assert!(matches!(run.mapping, Mapping::Data { .. }));
        let err = raw.read_run(&run, &mut vec![0u8; 2048]).unwrap_err();
        assert!(
            matches!(err.root(), crate::Error::InvalidArgument(_)),
            "{}",
            err.report()
        );
    }
}
