//! The write path of one image: allocation, copy-on-write, zeroing, discarding, compressed
//! clusters, and the checkpoints that bring metadata to disk in a crash-safe order
//! (`checkpoint.rs`).

mod allocate;
mod checkpoint;
mod compressed;
mod data;
mod l2;
mod source;
mod state;
mod writable;
mod zeroes;

pub(crate) use state::{BackingRead, Writer};
