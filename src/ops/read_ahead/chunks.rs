//! A chain's guest content in large chunks, read ahead (checksum, raw convert): contiguous
//! data is gathered into chunks of at most a given size; ranges that read as zeros by
//! their mapping are one chunk however long, and never read.

use crate::chain::{Chain, ChainRun, ChainRuns};
use crate::error::Result;

use super::pipeline::{Piece, Plan, Shape, read_ahead};

/// A piece of guest content, in guest order.
pub(crate) enum Chunk<'b> {
    /// `len` bytes at `offset` read as zeros (nothing was read).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The bytes at `offset`.
    Data {
        /// Guest offset.
        offset: u64,
        /// The content.
        bytes: &'b [u8],
    },
}

/// Chunks read ahead of the one being consumed: one reader keeps the consumer fed.
const DEPTH: usize = 4;

/// Calls `consume` with the content of `chain`, start to end, in chunks of at most
/// `chunk_size` bytes of data (zero ranges are one chunk however long). `consume` returns
/// `Ok(false)` to stop early (the result is then [`crate::Error::Cancelled`]).
pub(crate) fn for_each_chunk(
    chain: &Chain,
    chunk_size: usize,
    mut consume: impl FnMut(Chunk<'_>) -> Result<bool>,
) -> Result<()> {
    let chunk_size = chunk_size.max(512);
    let plan = Chunks {
        runs: chain.runs(0, chain.size()),
        pending: None,
        chunk_size: chunk_size as u64,
    };
    let shape = Shape {
        readers: 1,
        depth: DEPTH,
    };
    read_ahead(&[chain], shape, plan, |piece, content| match content[0] {
        Some(bytes) => consume(Chunk::Data {
            offset: piece.offset,
            bytes,
        }),
        None => consume(Chunk::Zero {
            offset: piece.offset,
            len: piece.len,
        }),
    })
}

/// Cuts the runs into chunks.
struct Chunks<'c> {
    runs: ChainRuns<'c>,
    /// A run (or the rest of one) that the last chunk did not take.
    pending: Option<ChainRun>,
    chunk_size: u64,
}

impl Chunks<'_> {
    fn next_run(&mut self) -> Result<Option<ChainRun>> {
        match self.pending.take() {
            Some(run) => Ok(Some(run)),
            None => self.runs.next().transpose(),
        }
    }
}

impl Plan for Chunks<'_> {
    type Step = ();

    fn next(&mut self) -> Result<Option<Piece<()>>> {
        let Some(first) = self.next_run()? else {
            return Ok(None);
        };
        let offset = first.offset;
        if first.reads_as_zero() {
            let mut len = first.len;
            while let Some(next) = self.next_run()? {
                if !next.reads_as_zero() {
                    self.pending = Some(next);
                    break;
                }
                len += next.len;
            }
            return Ok(Some(Piece::unread((), offset, len)));
        }
        let mut runs = Vec::new();
        let mut len = 0;
        let mut current = Some(first);
        while let Some(run) = current.take() {
            if run.reads_as_zero() || len == self.chunk_size {
                self.pending = Some(run);
                break;
            }
            let n = run.len.min(self.chunk_size - len);
            runs.push(ChainRun { len: n, ..run });
            len += n;
            if n < run.len {
                self.pending = Some(ChainRun {
                    offset: run.offset + n,
                    len: run.len - n,
                    mapping: run.mapping.advanced(n),
                    ..run
                });
                break;
            }
            current = self.next_run()?;
        }
        Ok(Some(Piece {
            step: (),
            offset,
            len,
            runs: [runs, Vec::new()],
            read: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_chain::{content, memory_chain};
    use super::*;

    #[test]
    fn zero_ranges_come_whole_and_data_in_chunks_of_at_most_the_chunk_size() {
        const MIB: u64 = 1 << 20;
        let data = vec![7u8; (5 * MIB / 2) as usize];
        let chain = memory_chain(8 * MIB, &[(MIB, &data), (6 * MIB, &[9; 4096])]);
        let mut seen = Vec::new();
        for_each_chunk(&chain, MIB as usize, |chunk| {
            seen.push(match chunk {
                Chunk::Zero { offset, len } => (offset, len, false),
                Chunk::Data { offset, bytes } => {
                    assert_eq!(bytes, content(&chain, offset, bytes.len() as u64));
                    (offset, bytes.len() as u64, true)
                }
            });
            Ok(true)
        })
        .unwrap();
        // The last write allocates its whole 64 KiB cluster.
        let cluster = 64 << 10;
        assert_eq!(
            seen,
            [
                (0, MIB, false),
                (MIB, MIB, true),
                (2 * MIB, MIB, true),
                (3 * MIB, MIB / 2, true),
                (7 * MIB / 2, 5 * MIB / 2, false),
                (6 * MIB, cluster, true),
                (6 * MIB + cluster, 2 * MIB - cluster, false),
            ]
        );
    }
}
