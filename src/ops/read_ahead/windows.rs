//! A chain's guest content, and optionally a second chain's content at the same guest
//! offsets, in aligned windows, read ahead (qcow2 convert).
//!
//! Converting to qcow2 decides per output cluster, so every piece of data handed to the
//! consumer starts at a multiple of the alignment (the output's cluster size) and holds
//! whole clusters (the last one may end at the image's end). Ranges where both chains read
//! as zeros by their mapping (unallocated, zero clusters, past the end of the second chain)
//! are never read and come as [`Window::Zero`], merged however long they are.

use crate::chain::{Chain, ChainRun};
use crate::error::Result;

use super::pipeline::{Piece, Plan, Shape, read_ahead};

/// A piece of guest content, in guest order.
pub(crate) enum Window<'b> {
    /// `len` bytes at `offset` read as zeros in both chains (nothing was read).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The content of `offset..offset + len`.
    Data {
        /// Guest offset, a multiple of the alignment.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The source's bytes; `None` when the source reads as zeros throughout.
        src: Option<&'b [u8]>,
        /// The second chain's bytes; `None` when there is no second chain or it reads as
        /// zeros throughout.
        base: Option<&'b [u8]>,
    },
}

/// Windows read ahead of the one being consumed: one reader keeps the consumer fed.
const DEPTH: usize = 4;

/// How the content is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    /// Largest data piece, in bytes; rounded up to a multiple of `align`.
    pub window: u64,
    /// Data pieces start at multiples of this (a power of two).
    pub align: u64,
}

/// Calls `consume` with the content of `src` (and of `base` at the same offsets, zeros
/// past its end), start to end of `src`. `consume` returns `Ok(false)` to stop early (the
/// result is then [`crate::Error::Cancelled`]).
pub(crate) fn for_each_window(
    src: &Chain,
    base: Option<&Chain>,
    cut: Windows,
    mut consume: impl FnMut(Window<'_>) -> Result<bool>,
) -> Result<()> {
    let window = cut.window.max(cut.align).div_ceil(cut.align) * cut.align;
    let plan = Cutter {
        src,
        base,
        cut: Windows { window, ..cut },
        pos: 0,
        zero_start: 0,
        after_zeros: None,
    };
    let shape = Shape {
        readers: 1,
        depth: DEPTH,
    };
    // The second chain reads as zeros where it is missing.
    let chains = [src, base.unwrap_or(src)];
    read_ahead(&chains, shape, plan, |piece, [src, base]| {
        match (src, base) {
            (None, None) => consume(Window::Zero {
                offset: piece.offset,
                len: piece.len,
            }),
            (src, base) => consume(Window::Data {
                offset: piece.offset,
                len: piece.len,
                src,
                base,
            }),
        }
    })
}

/// Cuts the guest range into windows.
struct Cutter<'c> {
    src: &'c Chain,
    base: Option<&'c Chain>,
    cut: Windows,
    /// Where planning goes on.
    pos: u64,
    /// Start of the zero range not yet planned; it reaches up to the next data.
    zero_start: u64,
    /// A data piece found after a zero range: it comes next.
    after_zeros: Option<Piece<()>>,
}

/// One chain's runs over a window: where its content is not zero by mapping.
struct ViewRuns {
    runs: Vec<ChainRun>,
    /// First and last non-zero byte range (start of the first, end of the last), if any.
    extent: Option<(u64, u64)>,
}

/// The runs of `chain` over `lo..hi`, clipped to its size.
fn view_runs(chain: &Chain, lo: u64, hi: u64) -> Result<ViewRuns> {
    let hi = hi.min(chain.size());
    let mut runs = Vec::new();
    let mut extent: Option<(u64, u64)> = None;
    if lo < hi {
        for run in chain.runs(lo, hi - lo) {
            let run = run?;
            if !run.reads_as_zero() {
                extent = Some(match extent {
                    Some((a, _)) => (a, run.end()),
                    None => (run.offset, run.end()),
                });
                runs.push(run);
            }
        }
    }
    Ok(ViewRuns { runs, extent })
}

/// Where the content of `chain` from `pos` on first stops reading as zeros by mapping
/// (`u64::MAX` when it never does before the chain's end).
fn zero_until(chain: &Chain, pos: u64) -> Result<u64> {
    if pos >= chain.size() {
        return Ok(u64::MAX);
    }
    let run = chain.resolve(pos, chain.size() - pos)?;
    Ok(match run.reads_as_zero() {
        true if run.end() >= chain.size() => u64::MAX,
        true => run.end(),
        false => pos,
    })
}

impl Plan for Cutter<'_> {
    type Step = ();

    fn next(&mut self) -> Result<Option<Piece<()>>> {
        if let Some(piece) = self.after_zeros.take() {
            return Ok(Some(piece));
        }
        let size = self.src.size();
        let align = self.cut.align;
        let window = self.cut.window;
        while self.pos < size {
            // Skip long zero stretches without cutting them into windows.
            let mut until = zero_until(self.src, self.pos)?;
            if let Some(b) = self.base {
                until = until.min(zero_until(b, self.pos)?);
            }
            if until >= size {
                break; // zeros to the end
            }
            let skip_to = (until / align * align).max(self.pos);
            if skip_to > self.pos {
                self.pos = skip_to;
                continue;
            }
            let end = size.min(self.pos / window * window + window);
            let s = view_runs(self.src, self.pos, end)?;
            let b = self.base.map(|b| view_runs(b, self.pos, end)).transpose()?;
            let extent = match (s.extent, b.as_ref().and_then(|b| b.extent)) {
                (Some((a, z)), Some((c, y))) => Some((a.min(c), z.max(y))),
                (e, None) | (None, e) => e,
            };
            let Some((first, last)) = extent else {
                self.pos = end;
                continue;
            };
            let lo = (first / align * align).max(self.pos);
            let hi = last.div_ceil(align).saturating_mul(align).min(end);
            let data = Piece {
                step: (),
                offset: lo,
                len: hi - lo,
                runs: [s.runs, b.map(|b| b.runs).unwrap_or_default()],
                read: true,
            };
            let zeros = (lo > self.zero_start)
                .then(|| Piece::unread((), self.zero_start, lo - self.zero_start));
            self.zero_start = hi;
            self.pos = end;
            return Ok(Some(match zeros {
                Some(zeros) => {
                    self.after_zeros = Some(data);
                    zeros
                }
                None => data,
            }));
        }
        self.pos = size;
        if size > self.zero_start {
            let zeros = Piece::unread((), self.zero_start, size - self.zero_start);
            self.zero_start = size;
            return Ok(Some(zeros));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_chain::{content, memory_chain};
    use super::*;

    #[test]
    fn data_windows_are_aligned_and_zeros_are_where_both_chains_read_zeros() {
        const KIB: u64 = 1 << 10;
        // Clusters of 64 KiB: the source allocates 64..256 KiB, the base 1024..1088 KiB.
        let src = memory_chain(4096 * KIB, &[(100 * KIB, &[1; 100 << 10])]);
        let base = memory_chain(2048 * KIB, &[(1024 * KIB, &[2; 64 << 10])]);
        let cut = Windows {
            window: 512 * KIB,
            align: 128 * KIB,
        };
        let mut seen = Vec::new();
        for_each_window(&src, Some(&base), cut, |window| {
            seen.push(match window {
                Window::Zero { offset, len } => (offset, len, false, false),
                Window::Data {
                    offset,
                    len,
                    src: s,
                    base: b,
                } => {
                    assert_eq!(offset % cut.align, 0);
                    if let Some(s) = s {
                        assert_eq!(s, content(&src, offset, len));
                    }
                    if let Some(b) = b {
                        assert_eq!(b, content(&base, offset, len));
                    }
                    (offset, len, s.is_some(), b.is_some())
                }
            });
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (0, 256 * KIB, true, false),
                (256 * KIB, 768 * KIB, false, false),
                (1024 * KIB, 128 * KIB, false, true),
                (1152 * KIB, 4096 * KIB - 1152 * KIB, false, false),
            ]
        );
    }
}
