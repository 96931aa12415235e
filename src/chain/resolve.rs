//! Reading a chain: ranges of the top image resolved to the layer that decides them.

use crate::error::{Error, Result};
use crate::qcow2::{Mapping, Run, RunCursor, fill_by_runs};

use super::Chain;

/// A range of the top image resolved through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRun {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of the layer that decides the content (0 = top).
    pub depth: usize,
    /// The mapping in that layer. `Unallocated` means no layer allocates the range (or it
    /// lies past the end of a shorter backing file): it reads as zeros.
    pub mapping: Mapping,
}

impl ChainRun {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Whether the range reads as zeros without reading data.
    pub fn reads_as_zero(&self) -> bool {
        self.mapping.is_zero_or_unallocated()
    }
}

impl Chain {
    /// What `offset..offset + max_len` of the top image reads, resolved through the chain:
    /// the first run, whose length is the longest stretch decided by one layer with one
    /// mapping. `offset` must be below [`Chain::size`].
    pub fn resolve(&self, offset: u64, max_len: u64) -> Result<ChainRun> {
        self.resolve_from(0, offset, max_len)
    }

    /// [`Chain::resolve`] as if the chain started at layer `first` (its backing chain
    /// seen from the layer above), but bounded by the top image's size.
    pub fn resolve_from(&self, first: usize, offset: u64, max_len: u64) -> Result<ChainRun> {
        self.resolve_in(&mut [], first, offset, max_len)
    }

    /// [`Chain::resolve_from`], reusing the runs layers gave for earlier offsets. `memo`
    /// holds one slot per layer (or none, to look up every layer afresh): a slot keeps the
    /// last run its layer gave, looked up as far as `max_len` rather than only as far as
    /// the layers above left undecided, so that the next offsets of an iteration find it
    /// again. Without it a deep chain rescans each upper layer's holes for every run below
    /// them. The resolved runs are the same either way: a layer's run ends where its
    /// mapping changes (or at `max_len`, the iteration's end), wherever it was looked up.
    pub(crate) fn resolve_in(
        &self,
        memo: &mut [Option<Run>],
        first: usize,
        offset: u64,
        max_len: u64,
    ) -> Result<ChainRun> {
        let size = self.size();
        if offset >= size || max_len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size,
            });
        }
        let mut len = max_len.min(size - offset);
        for (depth, layer) in self.layers.iter().enumerate().skip(first) {
            if offset >= layer.size() {
                // Past the end of a shorter backing file: zeros.
                return Ok(ChainRun {
                    offset,
                    len,
                    depth,
                    mapping: Mapping::Unallocated,
                });
            }
            let run = match memo.get_mut(depth) {
                None => layer.lookup(offset, len)?,
                Some(slot) => {
                    let known = slot.filter(|r| r.offset <= offset && offset < r.end());
                    let whole = match known {
                        Some(r) => Run {
                            offset,
                            len: r.end() - offset,
                            mapping: r.mapping.advanced(offset - r.offset),
                        },
                        None => {
                            let r = layer.lookup(offset, max_len.min(size - offset))?;
                            *slot = Some(r);
                            r
                        }
                    };
                    Run {
                        len: whole.len.min(len),
                        ..whole
                    }
                }
            };
            len = run.len;
            if run.mapping != Mapping::Unallocated {
                return Ok(ChainRun {
                    offset,
                    len,
                    depth,
                    mapping: run.mapping,
                });
            }
        }
        Ok(ChainRun {
            offset,
            len,
            depth: self.layers.len() - 1,
            mapping: Mapping::Unallocated,
        })
    }

    /// Iterates the resolved runs covering `offset..offset + len` (clamped to the size).
    pub fn runs(&self, offset: u64, len: u64) -> ChainRuns<'_> {
        ChainRuns {
            chain: self,
            cursor: RunCursor::new(offset, offset.saturating_add(len).min(self.size())),
            memo: vec![None; self.layers.len()],
        }
    }

    /// Fills `buf` with the first `buf.len()` bytes of a resolved run.
    pub fn read_run(&self, run: &ChainRun, buf: &mut [u8]) -> Result<()> {
        let layer_run = Run {
            offset: run.offset,
            len: run.len,
            mapping: run.mapping,
        };
        self.layers[run.depth].read_run(&layer_run, buf)
    }

    /// Reads `buf.len()` bytes of the top image at `offset`, through the chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }
            .in_file(self.top().name()));
        }
        fill_by_runs(
            buf,
            self.runs(offset, len),
            |r| r.len,
            |run, part| self.read_run(run, part),
        )
    }
}

/// Iterator over resolved runs; see [`Chain::runs`].
#[derive(Debug)]
pub struct ChainRuns<'a> {
    chain: &'a Chain,
    cursor: RunCursor,
    /// Each layer's last run (see [`Chain::resolve_in`]).
    memo: Vec<Option<Run>>,
}

impl Iterator for ChainRuns<'_> {
    type Item = Result<ChainRun>;

    fn next(&mut self) -> Option<Result<ChainRun>> {
        let (chain, memo) = (self.chain, &mut self.memo);
        self.cursor
            .next(|at, len| chain.resolve_in(memo, 0, at, len), ChainRun::end)
    }
}
