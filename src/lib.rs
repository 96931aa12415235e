//! qcow2-engine reads qcow2 disk images exactly as QEMU defines them
//! (`docs/interop/qcow2.rst`), through whole backing chains.
//!
//! The main types:
//!
//! - [`Chain`]: an image with its backing files, top first. [`Chain::read_at`] reads what
//!   a guest sees; [`Chain::runs`] says, range by range, which layer decides the content
//!   and how ([`ChainRun`]).
//! - [`Image`]: one qcow2 image. [`Image::lookup`] is the one mapping API: it turns a guest
//!   range into [`Run`]s of one [`Mapping`] (unallocated, zero, data at a host offset,
//!   compressed) that reading, mapping, converting and merging all share.
//! - [`create`] with [`CreateOptions`]: new qcow2 (v2/v3) and raw images, as qemu-img
//!   create makes them.
//! - [`format`]: the on-disk structures as pure codecs, [`storage`]: where bytes live,
//!   [`ops`]: operations over chains (checksum, compare, convert, map, measure).
//! - `testing` (only with the `testing` cargo feature): the fuzz harnesses, shared by the
//!   cargo-fuzz targets in `fuzz/` and the test that replays their corpus.
//!
//! ```
//! use qcow2_engine::{Chain, Mapping};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("disk.qcow2");
//! # let qemu_img = |args: &[&str]| std::process::Command::new("qemu-img").args(args).status();
//! # assert!(qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"])?.success());
//! // Open an image with its whole backing chain.
//! let chain = Chain::open(&path)?;
//!
//! // Read what the guest sees.
//! let mut sector = [0xffu8; 512];
//! chain.read_at(&mut sector, 0)?;
//! assert_eq!(sector, [0u8; 512]);
//!
//! // Ask how each range is stored: runs of one mapping, with the layer that decides them.
//! for run in chain.runs(0, chain.size()) {
//!     let run = run?;
//!     println!("{:#x}+{:#x}: layer {} {:?}", run.offset, run.len, run.depth, run.mapping);
//!     assert_eq!(run.mapping, Mapping::Unallocated);
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod chain;
pub mod create;
mod error;
pub mod format;
pub mod layers;
pub mod names;
pub mod ops;
mod progress;
pub mod qcow2;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use chain::{BackingPolicy, Chain, ChainOptions, ChainReader, ChainRun};
pub use create::{CreateOptions, create, create_on};
pub use error::{Error, Report, Result};
pub use layers::{Format, Layer, RawImage};
pub use progress::Progress;
pub use qcow2::{
    CheckReport, Compat, Finding, Image, ImageOptions, Mapping, Preallocation, RepairMode, Run,
    Severity,
};

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctest;
