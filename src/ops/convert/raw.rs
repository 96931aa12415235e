//! Raw output: a sparse file. Ranges that read as zeros are never read nor written, and
//! blocks of data that are all zeros (of [`ConvertOptions::min_sparse`] bytes) are left as
//! holes. Data is read ahead in large chunks while this thread writes. Into an existing
//! output (`-n`), the zeros are written too ([`fill_raw`]).

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::format::is_zero;
use crate::ops::read_ahead::{Chunk, for_each_chunk};
use crate::progress::{Progress, Tracker};
use crate::storage::{Storage, write_zeros};

use super::offload::{Part, for_each_part};
use super::options::ConvertOptions;

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
    out.set_len(chain.size())
        .map_err(|e| Error::io("setting the output's length", e))?;
    fill_raw(chain, out, None, options, progress)
}

/// Writes `chain`'s guest content over the start of `out`, whose length is kept. Where
/// the content reads as zeros, `zero(offset, len)` makes `out` read as zeros (`None`:
/// `out` reads as zeros there already, nothing is written); with
/// [`ConvertOptions::min_sparse`] 0, zeros are written as data instead.
pub(super) fn fill_raw(
    chain: &Chain,
    out: &dyn Storage,
    zero: Option<&dyn Fn(u64, u64) -> Result<()>>,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    options.check()?;
    if options.compress {
        return Err(Error::Unsupported("compressed clusters in a raw image"));
    }
    let total = chain.size();
    let mut tracker = Tracker::new(progress, total);
    let write = |buf: &[u8], offset: u64| {
        out.write_at(buf, offset)
            .map_err(|e| Error::io(format!("writing output at {offset:#x}"), e))
    };
    let zero = |offset: u64, len: u64| match zero {
        Some(zero) if len > 0 => zero(offset, len),
        _ => Ok(()),
    };
    let data = |offset: u64, bytes: &[u8]| -> Result<()> {
        if options.min_sparse == 0 {
            return write(bytes, offset);
        }
        let mut at = 0;
        for (start, end) in nonzero_spans(bytes, offset, options.min_sparse) {
            zero(offset + at as u64, (start - at) as u64)?;
            write(&bytes[start..end], offset + start as u64)?;
            at = end;
        }
        zero(offset + at as u64, (bytes.len() - at) as u64)
    };
    let zeros = |offset: u64, len: u64| match options.min_sparse {
        0 => write_zeros(offset, len, write),
        _ => zero(offset, len),
    };
    let mut done = 0u64;
    if options.copy_offload {
        for_each_part(chain, options.chunk_size, |part| {
            done += match part {
                Part::Zero { offset, len } => zeros(offset, len).map(|()| len)?,
                Part::Data { offset, bytes } => data(offset, bytes).map(|()| bytes.len() as u64)?,
                Part::Copy {
                    offset,
                    len,
                    from,
                    host,
                } => {
                    out.copy_from(from.data_storage(), host, offset, len)
                        .map_err(|e| {
                            Error::io(
                                format!("copying from {} to {offset:#x}", from.name().display()),
                                e,
                            )
                        })?;
                    len
                }
            };
            tracker.report(done)
        })?;
        return tracker.finish();
    }
    for_each_chunk(chain, options.chunk_size, |chunk| {
        match chunk {
            Chunk::Zero { offset, len } => {
                zeros(offset, len)?;
                done += len;
            }
            Chunk::Data { offset, bytes } => {
                data(offset, bytes)?;
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
