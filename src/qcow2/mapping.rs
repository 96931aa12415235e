//! What a guest range is in one image: a [`Run`] of one [`Mapping`], as the one lookup API
//! (`lookup.rs`) answers it.

use crate::error::Result;
use crate::format::CompressedDescriptor;

/// What a guest range is in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated in this image: the backing file decides (zeros without one).
    Unallocated,
    /// Reads as zeros. `host` is the preallocated host offset of the run's first byte, if
    /// the clusters keep one.
    Zero {
        /// Preallocated host offset of the run's start, if any.
        host: Option<u64>,
    },
    /// Data stored at `host` (the host offset of the run's first byte) in the image's data
    /// file (the image itself unless it has an external data file); host-contiguous.
    Data {
        /// Host offset of the run's first byte.
        host: u64,
        /// Whether the clusters are this image's alone (refcount 1, the COPIED flag), so
        /// that they may be overwritten in place.
        copied: bool,
    },
    /// One compressed cluster (a run never spans two). The run may start inside it.
    Compressed(CompressedDescriptor),
}

impl Mapping {
    /// Whether reading this mapping needs no data I/O (it reads zeros or defers).
    pub fn is_zero_or_unallocated(&self) -> bool {
        matches!(self, Mapping::Zero { .. } | Mapping::Unallocated)
    }

    /// This mapping advanced by `delta` guest bytes (host offsets move along).
    pub fn advanced(self, delta: u64) -> Mapping {
        match self {
            Mapping::Data { host, copied } => Mapping::Data {
                host: host + delta,
                copied,
            },
            Mapping::Zero { host } => Mapping::Zero {
                host: host.map(|h| h + delta),
            },
            other => other,
        }
    }

    /// Whether `next`, found `delta` bytes after the start of this mapping, continues it.
    pub(crate) fn continued_by(self, next: Mapping, delta: u64) -> bool {
        match (self, next) {
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            (Mapping::Zero { host: None }, Mapping::Zero { host: None }) => true,
            (Mapping::Zero { host: Some(a) }, Mapping::Zero { host: Some(b) }) => a + delta == b,
            (Mapping::Data { host: a, copied: x }, Mapping::Data { host: b, copied: y }) => {
                a + delta == b && x == y
            }
            _ => false,
        }
    }
}

/// A guest range with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What the range is.
    pub mapping: Mapping,
}

impl Run {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The position of an iterator over the runs of `pos..end` (one image's, or a chain's):
/// each step resolves the run at the position and moves past it; an error ends the walk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunCursor {
    pos: u64,
    end: u64,
}

impl RunCursor {
    pub(crate) fn new(pos: u64, end: u64) -> RunCursor {
        RunCursor { pos, end }
    }

    /// The next run: `resolve(offset, max_len)` says what is at the position, `end_of`
    /// where that run ends.
    pub(crate) fn next<R>(
        &mut self,
        resolve: impl FnOnce(u64, u64) -> Result<R>,
        end_of: impl FnOnce(&R) -> u64,
    ) -> Option<Result<R>> {
        if self.pos >= self.end {
            return None;
        }
        let run = resolve(self.pos, self.end - self.pos);
        self.pos = match &run {
            Ok(r) => end_of(r),
            Err(_) => self.end,
        };
        Some(run)
    }
}

/// Fills `buf` run by run from `runs`, which tile the range `buf` stands for: `read`
/// fills each run's part (`len_of` its length).
pub(crate) fn fill_by_runs<R>(
    buf: &mut [u8],
    runs: impl Iterator<Item = Result<R>>,
    len_of: impl Fn(&R) -> u64,
    mut read: impl FnMut(&R, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    for run in runs {
        let run = run?;
        let n = len_of(&run) as usize;
        read(&run, &mut buf[done..done + n])?;
        done += n;
    }
    Ok(())
}
