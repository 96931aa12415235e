//! Converting a chain's guest content to a new image: [`convert`] creates the destination
//! and dispatches on its format; [`convert_to_raw`] fills a raw file (qcow2 output is in
//! `convert_qcow2.rs`).
//!
//! Raw output is sparse: ranges that read as zeros are never read nor written, and blocks
//! of data that are all zeros (of [`ConvertOptions::min_sparse`] bytes) are left as holes.
//! Data is read in large chunks on a reader thread while this thread writes.

use std::path::Path;

use crate::chain::Chain;
use crate::create::{CreateOptions, create};
use crate::error::{Error, Result};
use crate::layers::Format;
use crate::progress::{Progress, Tracker};
use crate::storage::{FileStorage, Storage, write_zeros};

use super::chunks::{Chunk, for_each_chunk};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Blocks of this many bytes (at guest offsets that are multiples of it) that hold
    /// only zeros are not written, leaving holes (qemu-img's `-S`, default 4 KiB). 0 writes
    /// every byte, zeros included: a fully allocated output.
    pub min_sparse: u64,
    /// Bytes of data read at a time (default 1 MiB). Each chunk is read into a buffer and
    /// written from it: a buffer that still sits in the CPU's caches when it is written
    /// halves the CPU time of a conversion compared with 4 MiB chunks (measured).
    pub chunk_size: usize,
    /// Store clusters compressed (qcow2 output only; qemu-img's `-c`).
    pub compress: bool,
    /// Threads compressing clusters; 0 (the default) uses every core.
    pub threads: usize,
    /// Flush the output to stable storage when done. Off by default, as qemu-img
    /// convert's default cache mode (`unsafe`) leaves it: the data is in the page cache
    /// and reaches the disk as the kernel writes it back.
    pub sync: bool,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            min_sparse: 4096,
            chunk_size: 1 << 20,
            compress: false,
            threads: 0,
            sync: false,
        }
    }
}

/// Creates `dst` as `create` says (format, qcow2 options, backing file; the size is always
/// the source's) and copies `chain`'s guest content into it: see [`convert_to_raw`] and
/// [`super::convert_to_qcow2`]. `progress(done, total)` is called as bytes are handled;
/// returning `false` cancels with [`Error::Cancelled`].
pub fn convert(
    chain: &Chain,
    dst: impl AsRef<Path>,
    create_options: &CreateOptions,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let dst = dst.as_ref();
    match create_options.format {
        Format::Qcow2 => super::convert_to_qcow2(chain, dst, create_options, options, progress),
        Format::Raw => {
            if options.compress {
                return Err(Error::Unsupported("compressed clusters in a raw image").in_file(dst));
            }
            let raw = CreateOptions {
                size: Some(chain.size()),
                ..create_options.clone()
            };
            raw.validate().map_err(|e| e.in_file(dst))?;
            super::convert_qcow2::refuse_overwriting_a_source(chain, dst)?;
            create(dst, &raw)?;
            let out =
                FileStorage::open(dst, true).map_err(|e| Error::io("opening", e).in_file(dst))?;
            convert_to_raw(chain, &out, options, progress).map_err(|e| e.in_file(dst))?;
            if options.sync {
                out.flush()
                    .map_err(|e| Error::io("flushing", e).in_file(dst))?;
            }
            Ok(())
        }
    }
}

/// Writes `chain`'s guest content to `out` as a raw image of the chain's virtual size.
/// `out` should be empty (fresh): holes are left where the content reads as zeros.
/// `progress(done, total)` is called as bytes are handled; returning `false` cancels
/// with [`Error::Cancelled`].
pub fn convert_to_raw(
    chain: &Chain,
    out: &dyn Storage,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    if options.min_sparse % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "sparse size {} is not a multiple of 512",
            options.min_sparse
        )));
    }
    if options.compress {
        return Err(Error::Unsupported("compressed clusters in a raw image"));
    }
    let total = chain.size();
    let mut tracker = Tracker::new(progress, total);
    let write = |buf: &[u8], offset: u64| {
        out.write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing output at {offset:#x}"), e))
    };
    out.set_len(total)
        .map_err(|e| Error::io("setting the output's length", e))?;
    let mut done = 0u64;
    for_each_chunk(chain, options.chunk_size, |chunk| {
        match chunk {
            Chunk::Zero { offset, len } => {
                if options.min_sparse == 0 {
                    write_zeros(offset, len, write)?;
                }
                done += len;
            }
            Chunk::Data { offset, bytes } => {
                if options.min_sparse == 0 {
                    write(bytes, offset)?;
                } else {
                    for (start, end) in nonzero_spans(bytes, offset, options.min_sparse) {
                        write(&bytes[start..end], offset + start as u64)?;
                    }
                }
                done += bytes.len() as u64;
            }
        }
        tracker.report(done)?;
        Ok(true)
    })?;
    tracker.finish()
}

/// The byte ranges of `bytes` (guest offset `offset`) to write: everything except blocks
/// of `block` bytes, aligned to guest multiples of `block`, that are all zeros. Adjacent
/// ranges are merged.
fn nonzero_spans(bytes: &[u8], offset: u64, block: u64) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let to_boundary = (block - (offset + pos as u64) % block) as usize;
        let end = (pos + to_boundary).min(bytes.len());
        if !is_zero(&bytes[pos..end]) {
            match spans.last_mut() {
                Some(last) if last.1 == pos => last.1 = end,
                _ => spans.push((pos, end)),
            }
        }
        pos = end;
    }
    spans
}

/// Whether `bytes` are all zeros (written so the compiler can vectorise it).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_left_out_of_the_spans() {
        let mut bytes = vec![0u8; 16384];
        bytes[5000] = 1;
        bytes[12288] = 2;
        assert_eq!(
            nonzero_spans(&bytes, 0, 4096),
            vec![(4096, 8192), (12288, 16384)]
        );
    }

    #[test]
    fn spans_follow_guest_alignment() {
        let mut bytes = vec![1u8; 6144];
        bytes[2048..6144].fill(0);
        // Guest offset 2048: the first block ends at guest 4096 (2048 bytes in).
        assert_eq!(nonzero_spans(&bytes, 2048, 4096), vec![(0, 2048)]);
        bytes[4096] = 9;
        assert_eq!(nonzero_spans(&bytes, 2048, 4096), vec![(0, 6144)]);
    }
}
