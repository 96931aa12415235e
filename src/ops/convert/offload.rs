//! Copy offloading (qemu-img convert's `-C`): the source's data ranges reach the output
//! as storage copies ([`crate::storage::Storage::copy_from`]: `copy_file_range` between
//! host files, shared extents where the file system can), not through memory.
//!
//! As qemu-img's copy range, a data range is copied whole, zeros included (no zero
//! detection: nothing is read), and what reads as zeros by its mapping is handled as
//! without `-C`. A raw layer's data ranges are its file's data extents (`SEEK_DATA`), as
//! QEMU's block status reports them; its holes read as zeros. Compressed clusters cannot
//! be copied as stored: they are read and written as without `-C` (qemu-img instead stops
//! offloading for the rest of the conversion at the first one, at a point that depends
//! on its coroutines' timing; the content is the same either way).

use crate::chain::Chain;
use crate::error::Result;
use crate::layers::Layer;
use crate::qcow2::Mapping;
use crate::storage::Extent;

/// A piece of the source's guest content, in guest order.
pub(super) enum Part<'c, 'b> {
    /// `len` bytes at `offset` read as zeros by their mapping (nothing was read).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Bytes that had to be read (a compressed cluster).
    Data {
        /// Guest offset.
        offset: u64,
        /// The content.
        bytes: &'b [u8],
    },
    /// `len` bytes that `from` stores at `host` of its data file, for guest `offset`.
    Copy {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The layer holding them.
        from: &'c Layer,
        /// Where in its data file.
        host: u64,
    },
}

/// Calls `consume` with `chain`'s content, start to end: zero ranges whole (adjacent ones
/// joined), copies and read data in pieces of at most `piece` bytes.
pub(super) fn for_each_part(
    chain: &Chain,
    piece: usize,
    mut consume: impl FnMut(Part<'_, '_>) -> Result<()>,
) -> Result<()> {
    let piece = piece.max(512) as u64;
    let mut buf = Vec::new();
    let mut zeros = Zeros(None);
    for run in chain.runs(0, chain.size()) {
        let run = run?;
        if run.reads_as_zero() {
            zeros.add(run.offset, run.len, &mut consume)?;
            continue;
        }
        let from = &chain.layers()[run.depth];
        match run.mapping {
            Mapping::Data { host, .. } => {
                let mut done = 0;
                while done < run.len {
                    let left = run.len - done;
                    let (is_data, n) = match from {
                        Layer::Raw(raw) => match raw.extent(host + done, left)? {
                            Extent::Data(n) => (true, n.clamp(1, left)),
                            Extent::Hole(n) => (false, n.clamp(1, left)),
                        },
                        Layer::Qcow2(_) => (true, left),
                    };
                    if !is_data {
                        zeros.add(run.offset + done, n, &mut consume)?;
                        done += n;
                        continue;
                    }
                    zeros.flush(&mut consume)?;
                    let end = done + n;
                    while done < end {
                        let len = (end - done).min(piece);
                        consume(Part::Copy {
                            offset: run.offset + done,
                            len,
                            from,
                            host: host + done,
                        })?;
                        done += len;
                    }
                }
            }
            _ => {
                zeros.flush(&mut consume)?;
                let mut done = 0;
                while done < run.len {
                    let len = (run.len - done).min(piece);
                    buf.resize(len as usize, 0);
                    chain.read_at(&mut buf, run.offset + done)?;
                    consume(Part::Data {
                        offset: run.offset + done,
                        bytes: &buf,
                    })?;
                    done += len;
                }
            }
        }
    }
    zeros.flush(&mut consume)
}

/// A zero range not handed on yet, so that the next one can join it.
struct Zeros(Option<(u64, u64)>);

impl Zeros {
    fn add(
        &mut self,
        offset: u64,
        len: u64,
        consume: &mut impl FnMut(Part<'_, '_>) -> Result<()>,
    ) -> Result<()> {
        match self.0 {
            Some((at, n)) if at + n == offset => self.0 = Some((at, n + len)),
            _ => {
                self.flush(consume)?;
                self.0 = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush(&mut self, consume: &mut impl FnMut(Part<'_, '_>) -> Result<()>) -> Result<()> {
        match self.0.take() {
            Some((offset, len)) => consume(Part::Zero { offset, len }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::chain::Chain;
    use crate::create::{CreateOptions, create_on};
    use crate::format::CompressionType;
    use crate::layers::Layer;
    use crate::ops::convert::{ConvertOptions, convert_into, convert_to_raw};
    use crate::ops::read_ahead::test_chain::memory_chain;
    use crate::qcow2::{Image, ImageOptions, compress_cluster};
    use crate::storage::Storage;
    use crate::storage::recording::Recording;

    const SIZE: u64 = 2 << 20;
    const CLUSTER: usize = 64 << 10;

    /// A qcow2 image in memory: data at 0, a data cluster of zeros at 128 KiB, a
    /// compressed cluster at 512 KiB, 4 KiB of data at 1 MiB; the rest unallocated.
    fn source() -> Chain {
        let chain = memory_chain(SIZE, &[(0, &[1; CLUSTER]), (128 << 10, &[0; CLUSTER])]);
        let packed = compress_cluster(CompressionType::Zlib, &[3; CLUSTER])
            .unwrap()
            .unwrap();
        chain.write_compressed(512 << 10, &packed).unwrap();
        chain.write_at(&[2; 4096], 1 << 20).unwrap();
        chain
    }

    fn content(chain: &Chain) -> Vec<u8> {
        let mut buf = vec![0; chain.size() as usize];
        chain.read_at(&mut buf, 0).unwrap();
        buf
    }

    fn options(copy_offload: bool) -> ConvertOptions {
        ConvertOptions {
            copy_offload,
            target_is_zero: true,
            ..ConvertOptions::default()
        }
    }

    #[test]
    fn raw_output_gets_the_data_ranges_as_storage_copies_zeros_included() {
        let src = source();
        for offload in [false, true] {
            let out = Recording::from_bytes(Vec::new());
            convert_to_raw(&src, &out, &options(offload), &mut |_, _| true).unwrap();
            let mut got = vec![0; SIZE as usize];
            out.read_at(&mut got, 0).unwrap();
            assert_eq!(got, content(&src), "offload {offload}");
            if offload {
                // Cluster 0, the zero-filled cluster and the 4 KiB at 1 MiB are copied;
                // the compressed cluster is read and written.
                assert_eq!(out.calls("copy_from"), 3, "{:?}", out.all_calls());
                assert_eq!(out.calls("write_at"), 1, "{:?}", out.all_calls());
            } else {
                assert_eq!(out.calls("copy_from"), 0, "{:?}", out.all_calls());
                // Without offloading the zero-filled cluster is found and left out.
                assert_eq!(out.calls("write_at"), 3, "{:?}", out.all_calls());
            }
        }
    }

    #[test]
    fn qcow2_output_gets_the_data_ranges_as_storage_copies_zeros_included() {
        let src = source();
        for offload in [false, true] {
            let file = Arc::new(Recording::from_bytes(Vec::new()));
            create_on(&*file, &CreateOptions::qcow2(SIZE)).unwrap();
            let image = Image::from_storage(
                Box::new(Arc::clone(&file)),
                "/out.qcow2",
                &ImageOptions {
                    writable: true,
                    ..ImageOptions::default()
                },
                None,
            )
            .unwrap();
            let out = Chain::from_layers(vec![Layer::Qcow2(image)]).unwrap();
            let copies_before = file.calls("copy_from");
            convert_into(&src, &out, None, &options(offload), &mut |_, _| true).unwrap();
            assert_eq!(content(&out), content(&src), "offload {offload}");
            let copies = file.calls("copy_from") - copies_before;
            let allocated = |at: u64| {
                let run = out.resolve(at, 1).unwrap();
                !run.reads_as_zero()
            };
            if offload {
                assert_eq!(copies, 3, "{:?}", file.all_calls());
                // The zero-filled data cluster is copied as data, as qemu-img -C does.
                assert!(allocated(128 << 10));
            } else {
                assert_eq!(copies, 0, "{:?}", file.all_calls());
                assert!(!allocated(128 << 10));
            }
            out.close().unwrap();
        }
    }
}
