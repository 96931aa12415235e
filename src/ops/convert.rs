//! Converting a chain's guest content to a raw image.
//!
//! The output is sparse: ranges that read as zeros are never read nor written, and blocks
//! of data that are all zeros (of [`ConvertOptions::min_sparse`] bytes) are left as holes.
//! Data is read in large chunks on a reader thread while this thread writes.

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::storage::Storage;

use super::chunks::{Chunk, for_each_chunk};

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Blocks of this many bytes (at guest offsets that are multiples of it) that hold
    /// only zeros are not written, leaving holes (qemu-img's `-S`, default 4 KiB). 0 writes
    /// every byte, zeros included: a fully allocated output.
    pub min_sparse: u64,
    /// Bytes of data read at a time (default 4 MiB).
    pub chunk_size: usize,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            min_sparse: 4096,
            chunk_size: 4 << 20,
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
    progress: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<()> {
    if options.min_sparse % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "sparse size {} is not a multiple of 512",
            options.min_sparse
        )));
    }
    let total = chain.size();
    let write = |buf: &[u8], offset: u64| {
        out.write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing output at {offset:#x}"), e))
    };
    out.set_len(total)
        .map_err(|e| Error::io("setting the output's length", e))?;
    let zeros = if options.min_sparse == 0 {
        vec![0u8; options.chunk_size.max(512)]
    } else {
        Vec::new()
    };
    let mut done = 0u64;
    for_each_chunk(chain, options.chunk_size, |chunk| {
        match chunk {
            Chunk::Zero { offset, len } => {
                if options.min_sparse == 0 {
                    let mut pos = 0;
                    while pos < len {
                        let n = (len - pos).min(zeros.len() as u64);
                        write(&zeros[..n as usize], offset + pos)?;
                        pos += n;
                    }
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
        Ok(progress(done, total))
    })
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
