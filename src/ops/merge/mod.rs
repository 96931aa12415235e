//! Merging chains: commit (push overlay data down), pull (bring backing data up) and
//! rebase, as `qemu-img commit`, libvirt `blockcommit`/`blockpull` and `qemu-img rebase`.
//!
//! All of them are one pass over the chain's resolved runs: each guest range is read
//! once, from the layer that decides it, however deep the chain, and written to the
//! destination in large pieces; zeros travel as zero flags, never as zero bytes.
//!
//! # Crash safety
//!
//! The destination only changes where layers above it shadow it (commit) or only gains
//! what it already showed (pull), so what the active image shows never changes. Backing
//! pointers are rewritten last, after the data they expose is flushed. The destination
//! is flushed every [`MergeOptions::checkpoint_bytes`], so an interruption keeps what was
//! copied. Running the same command again after an interruption completes the merge, and
//! skips what is in place already ([`MergeReport::already_done_bytes`]).

mod backing;
mod commit;
mod copy;
mod options;
mod plan;
mod pull;
mod rebase;
mod resume;
mod sink;

pub use backing::find_layer;
pub use commit::commit;
pub use options::{CommitOptions, MergeOptions, MergeReport, StorageCopy};
pub use pull::pull;
pub use rebase::rebase;
