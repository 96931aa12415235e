//! The plan of a merge: the chain's runs turned into steps in guest order (data pieces,
//! zero ranges, ranges the destination decides itself), cut for the read-ahead pipeline
//! ([`crate::ops::read_ahead`]), which reads the data pieces.

use std::ops::Range;

use crate::chain::{Chain, ChainRun};
use crate::error::Result;
use crate::ops::read_ahead::{self, Piece};
use crate::qcow2::{Mapping, Run};

/// The largest piece of data read and written at once (1 MiB stays in the CPU caches
/// between the read and the write; 4 MiB measured twice the CPU time).
pub(super) const PIECE: usize = 1 << 20;

/// What a range decided by a merged layer asks of the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Work {
    /// Nothing: nothing in the whole chain allocates it and no zeros are needed.
    None,
    /// To read as zeros.
    Zeros,
    /// To hold the layer's data.
    Data,
}

/// What `run` (decided by a merged layer) asks of the destination. Ranges that read as
/// zeros need zeros there, except ranges nothing in the whole chain allocates when
/// `bottom_zeros_needed` is false (the destination will have no backing file); past the
/// end of a shorter layer they always do.
pub(super) fn work(chain: &Chain, run: &ChainRun, bottom_zeros_needed: bool) -> Work {
    match run.mapping {
        Mapping::Zero { .. } => Work::Zeros,
        Mapping::Unallocated => {
            let last = chain.layers().len() - 1;
            let nothing_below = run.depth == last && run.offset < chain.layers()[run.depth].size();
            if nothing_below && !bottom_zeros_needed {
                Work::None
            } else {
                Work::Zeros
            }
        }
        _ => Work::Data,
    }
}

/// One step of a merge, in guest order (see [`super::copy::copy_decided`]); the piece it
/// comes in says which guest range.
pub(super) enum Step {
    /// Contiguous data runs (the piece's), at most [`PIECE`] in all, that the destination
    /// needs; read ahead unless `by_copy` or in a dry run.
    Data {
        /// Every run is plain data the destination can take by shared extents
        /// ([`super::sink::Sink::copy`]): nothing is read ahead.
        by_copy: bool,
    },
    /// To read as zeros.
    Zeros,
    /// A run the destination (a layer of the chain) decides itself.
    InPlace(ChainRun),
}

/// A step and how far the guest range is planned with it.
pub(super) type Planned = (Step, u64);

/// What a merge pass copies, and how: the ranges of `chain`, seen from layer `first`,
/// that one of the layers `copy` decides (see [`work`]), and those the destination
/// (layer `in_chain`, if it is one) decides itself.
pub(super) struct Merging<'c> {
    /// The chain read.
    pub chain: &'c Chain,
    /// The layer the chain is seen from.
    pub first: usize,
    /// The layers merged.
    pub copy: Range<usize>,
    /// Whether ranges nothing in the chain allocates need zeros (see [`work`]).
    pub bottom_zeros_needed: bool,
    /// Destination layer in the chain, if any (see [`super::resume::Dest::in_chain`]).
    pub in_chain: Option<usize>,
    /// Per layer: whether the destination takes its data by shared extents.
    pub shares_extents: Vec<bool>,
    /// Whether data pieces are read ahead (not in a dry run).
    pub reading: bool,
}

/// Turns the chain's runs into [`Step`]s, in guest order.
pub(super) struct Plan<'c> {
    merging: Merging<'c>,
    /// Where planning goes on.
    pos: u64,
    /// The data run being cut into pieces, and how much of it was cut.
    data: Option<(ChainRun, u64)>,
    /// The piece being gathered.
    piece: Vec<ChainRun>,
    piece_len: u64,
    /// A step found while a piece was gathered: it comes after the piece.
    pending_step: Option<Piece<Planned>>,
    /// Each layer's last run, for [`Chain::resolve_in`]. Runs of the image being written
    /// into may be older than writes the merge made past `pos` (copy-on-write filling
    /// the rest of a cluster): those writes put there what the run says the chain
    /// shows, so the plan still copies the same content.
    memo: Vec<Option<Run>>,
}

impl<'c> Plan<'c> {
    /// Plans `merging` from the start of the guest range.
    pub(super) fn new(merging: Merging<'c>) -> Plan<'c> {
        let layers = merging.chain.layers().len();
        Plan {
            merging,
            pos: 0,
            data: None,
            piece: Vec::new(),
            piece_len: 0,
            pending_step: None,
            memo: vec![None; layers],
        }
    }

    /// The gathered piece as a step, planned to its end.
    fn take_piece(&mut self) -> Piece<Planned> {
        self.piece_len = 0;
        let end = self.piece.last().map_or(self.pos, ChainRun::end);
        let by_copy = self.piece.iter().all(|r| {
            matches!(r.mapping, Mapping::Data { .. }) && self.merging.shares_extents[r.depth]
        });
        let runs = std::mem::take(&mut self.piece);
        let offset = runs.first().map_or(self.pos, |r| r.offset);
        Piece {
            step: (Step::Data { by_copy }, end),
            offset,
            len: end - offset,
            runs: [runs, Vec::new()],
            read: self.merging.reading && !by_copy,
        }
    }
}

impl read_ahead::Plan for Plan<'_> {
    type Step = Planned;

    fn next(&mut self) -> Result<Option<Piece<Planned>>> {
        let Merging {
            chain,
            first,
            bottom_zeros_needed,
            in_chain,
            ..
        } = self.merging;
        let size = chain.size();
        if let Some(step) = self.pending_step.take() {
            return Ok(Some(step));
        }
        loop {
            if let Some((run, done)) = self.data.take() {
                let contiguous = self
                    .piece
                    .last()
                    .is_none_or(|r| r.end() == run.offset + done);
                if self.piece_len == PIECE as u64 || !contiguous {
                    self.data = Some((run, done));
                    return Ok(Some(self.take_piece()));
                }
                let n = (run.len - done).min(PIECE as u64 - self.piece_len);
                self.piece.push(ChainRun {
                    offset: run.offset + done,
                    len: n,
                    mapping: run.mapping.advanced(done),
                    depth: run.depth,
                });
                self.piece_len += n;
                if done + n < run.len {
                    self.data = Some((run, done + n));
                }
                continue;
            }
            if self.pos >= size {
                return Ok(if self.piece.is_empty() {
                    None
                } else {
                    Some(self.take_piece())
                });
            }
            let run = chain.resolve_in(&mut self.memo, first, self.pos, size - self.pos)?;
            self.pos = run.end();
            let step = if in_chain == Some(run.depth) && run.mapping != Mapping::Unallocated {
                Step::InPlace(run)
            } else if self.merging.copy.contains(&run.depth) {
                match work(chain, &run, bottom_zeros_needed) {
                    Work::None => continue,
                    Work::Zeros => Step::Zeros,
                    Work::Data => {
                        self.data = Some((run, 0));
                        continue;
                    }
                }
            } else {
                continue;
            };
            let step = Piece::unread((step, self.pos), run.offset, run.len);
            // A step that is not data ends the piece before it.
            if self.piece.is_empty() {
                return Ok(Some(step));
            }
            self.pending_step = Some(step);
            return Ok(Some(self.take_piece()));
        }
    }
}
