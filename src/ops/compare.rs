//! Comparing the guest-visible content of two chains, as `qemu-img compare` does.
//!
//! Ranges that read as zeros in both chains are skipped without reading. Offsets of
//! differences are reported at 512-byte sector granularity, like qemu-img. When the sizes
//! differ, the extra part of the larger image must read as zeros (unless strict, where any
//! size difference is a mismatch); strict mode also requires the same allocation status
//! (allocated in some layer, or not at all) everywhere.

use crate::chain::{Chain, ChainRun};
use crate::error::Result;
use crate::progress::{Progress, Tracker};
use crate::qcow2::Mapping;

use crate::format::is_zero;

/// Bytes compared at a time.
const WINDOW: u64 = 4 << 20;

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// The content is the same (`sizes_differ`: the larger image's extra part reads as
    /// zeros).
    Identical {
        /// Whether the virtual sizes differ.
        sizes_differ: bool,
    },
    /// The content differs; `offset` is the start of the first differing 512-byte sector.
    ContentMismatch {
        /// Guest offset of the first differing sector.
        offset: u64,
        /// Whether the virtual sizes differ.
        sizes_differ: bool,
    },
    /// Strict mode: the virtual sizes differ.
    SizeMismatch,
    /// Strict mode: one image allocates a range the other does not.
    BlockStatusMismatch {
        /// Guest offset where the allocation status first differs.
        offset: u64,
    },
}

impl Comparison {
    /// Whether the images compare equal.
    pub fn is_identical(&self) -> bool {
        matches!(self, Comparison::Identical { .. })
    }
}

/// Compares `a` and `b`. `progress(done, total)` is called as bytes are compared;
/// returning `false` cancels with [`crate::Error::Cancelled`].
pub fn compare(a: &Chain, b: &Chain, strict: bool, progress: Progress<'_>) -> Result<Comparison> {
    // The comparison is complete when it finds a difference too: it ends at the total.
    let mut tracker = Tracker::new(progress, a.size().max(b.size()));
    let comparison = compare_tracked(a, b, strict, &mut tracker)?;
    tracker.finish()?;
    Ok(comparison)
}

fn compare_tracked(
    a: &Chain,
    b: &Chain,
    strict: bool,
    tracker: &mut Tracker<'_, '_>,
) -> Result<Comparison> {
    let (size_a, size_b) = (a.size(), b.size());
    let sizes_differ = size_a != size_b;
    if strict && sizes_differ {
        return Ok(Comparison::SizeMismatch);
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let allocated = |r: &ChainRun| r.mapping != Mapping::Unallocated;
    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
    let mut pos = 0u64;
    while pos < common {
        let ra = a.resolve(pos, common - pos)?;
        let rb = b.resolve(pos, common - pos)?;
        if strict && allocated(&ra) != allocated(&rb) {
            return Ok(Comparison::BlockStatusMismatch { offset: pos });
        }
        if ra.reads_as_zero() && rb.reads_as_zero() {
            pos = ra.end().min(rb.end());
        } else {
            let mut end = (pos + WINDOW).min(common);
            if strict {
                end = end.min(ra.end()).min(rb.end());
            }
            let n = (end - pos) as usize;
            buf_a.resize(n, 0);
            buf_b.resize(n, 0);
            a.read_at(&mut buf_a, pos)?;
            b.read_at(&mut buf_b, pos)?;
            // Slice equality is one memcmp; look for the offset only when they differ.
            if buf_a != buf_b {
                let i = buf_a.iter().zip(&buf_b).position(|(x, y)| x != y);
                let i = i.unwrap_or(0);
                return Ok(Comparison::ContentMismatch {
                    offset: sector(pos + i as u64),
                    sizes_differ,
                });
            }
            pos = end;
        }
        tracker.report(pos)?;
    }
    let longer = if size_a > size_b { a } else { b };
    let mut buf = Vec::new();
    for run in longer.runs(common, total - common) {
        let run = run?;
        if run.reads_as_zero() {
            continue;
        }
        let mut done = 0;
        while done < run.len {
            let n = (run.len - done).min(WINDOW);
            buf.resize(n as usize, 0);
            longer.read_at(&mut buf, run.offset + done)?;
            if !is_zero(&buf) {
                let i = buf.iter().position(|&x| x != 0).unwrap_or(0);
                return Ok(Comparison::ContentMismatch {
                    offset: sector(run.offset + done + i as u64),
                    sizes_differ,
                });
            }
            done += n;
        }
        tracker.report(run.end())?;
    }
    Ok(Comparison::Identical { sizes_differ })
}

/// The start of the 512-byte sector holding `offset`.
fn sector(offset: u64) -> u64 {
    offset & !511
}
