//! The one read-ahead pipeline ([`pipeline`]) and the planners that cut a chain's content
//! for it: chunks (checksum, raw convert) and aligned windows over one or two chains
//! (qcow2 convert). Merges plan their own pieces (`merge/plan.rs`).

mod chunks;
mod pipeline;
#[cfg(test)]
pub(crate) mod test_chain;
mod windows;

pub(crate) use chunks::{Chunk, for_each_chunk};
pub(crate) use pipeline::{Piece, Plan, Shape, read_ahead, read_runs};
pub(crate) use windows::{Window, Windows, for_each_window};
