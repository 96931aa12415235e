//! Merging chains: commit (push overlay data down), pull (bring backing data up), rebase,
//! as `qemu-img commit`, libvirt `blockcommit`/`blockpull` and `qemu-img rebase`, and
//! remove (an external snapshot out of a tree of images, by commits and pulls).
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
//!
//! # Why merges take paths, not an open [`Chain`](crate::Chain)
//!
//! A merge opens each image with the handle its step needs (the chain read-only, the
//! destination alone for writing) and closes the image whose backing pointer it rewrites
//! before rewriting it through another handle. A writable `Chain` the caller held open
//! across the merge would, when closed, write its own header (old backing name, old
//! refcount table under lazy refcounts) over the amended one. Close it first; the merge
//! reopens through [`MergeOptions::chain`], whose opener may be the caller's.

mod backing;
mod commit;
mod copy;
mod options;
mod plan;
mod pull;
mod rebase;
mod remove;
mod resume;
mod sink;

pub use commit::commit;
pub use options::{CommitOptions, MergeOptions, MergeReport, StorageCopy};
pub use pull::pull;
pub use rebase::rebase;
pub use remove::{RemoveMethod, RemoveOptions, RemoveReport, remove};
