//! The `ops` harness: the fuzz input is a small program — a chain to start from and a list
//! of operations on it — run on images held in memory
//! ([`MemOpener`](crate::storage::MemOpener)) against a model of what each layer shows, so
//! that libFuzzer explores sequences of operations rather than bytes of images.
//!
//! One concept per file:
//! - `config`: the limits, and how the chain and each image are configured;
//! - `program`: the program and its byte encoding ([`OpsProgram`], [`ChainOp`]), read
//!   from the input's bytes by `reader`;
//! - `model`: what the model keeps, and the bytes the operations write;
//! - `run`: the harness entry point [`ops`] and the state of one run;
//! - `operations`: each operation, applied to the chain and the model (writes, resizes
//!   and snapshots here);
//! - `merges`: commit, pull and rebase;
//! - `checks`: the comparisons of the chain, its images and snapshots with the model.

mod checks;
mod config;
mod merges;
mod model;
mod operations;
mod program;
mod reader;
mod run;

pub use config::{LayerConfig, MAX_OPS, OpsConfig};
pub use program::{ChainOp, OpsProgram, RawRange};
pub use run::ops;
