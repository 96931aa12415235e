//! qcow2-engine reads and writes qcow2 disk images exactly as QEMU defines them
//! (`docs/interop/qcow2.rst`), with internal snapshots and whole backing chains, and
//! merges chains: commit pushes an overlay's data down, pull brings backing data up.
//!
//! The main types, and how they fit:
//!
//! - [`Chain`]: an image with its backing files, top first: what a guest sees. Open it
//!   read-only ([`Chain::open`]) or with its top image writable ([`Chain::open_writable`],
//!   or [`ChainOptions`] for everything else). [`Chain::read_at`] and
//!   [`Chain::write_at`] read and write guest bytes (copy-on-write reads the layers
//!   below); [`Chain::runs`] says, range by range, which layer decides the content and how
//!   ([`ChainRun`]); [`Chain::snapshot_create`] and its siblings manage the top image's
//!   internal snapshots; [`ChainReader`] is a `Read + Seek` over it.
//! - [`Layer`]: one image of a chain, a qcow2 [`Image`] or a [`RawImage`]. [`Image::lookup`]
//!   is the one mapping API: it turns a guest range into [`Run`]s of one [`Mapping`]
//!   (unallocated, zero, data at a host offset, compressed) that reading, writing,
//!   mapping, converting and merging all share.
//! - [`create()`] with [`CreateOptions`]: new qcow2 (v2/v3) and raw images, as qemu-img
//!   create makes them.
//! - [`ops`]: operations over whole chains, as qemu-img's commands: commit, pull, rebase,
//!   convert, compare, checksum, map, measure, info, du.
//! - [`Error`]: one error type; [`Error::report`] prints it with its causes on one line.
//! - [`format`]: the on-disk structures as pure codecs, [`storage`]: where bytes live (host
//!   files, memory, fault injection), [`names`]: backing file names as QEMU reads them.
//! - `testing` (only with the `testing` cargo feature): the fuzz harnesses, shared by the
//!   cargo-fuzz targets in `fuzz/` and the test that replays their corpus.
//!
//! A base, an overlay, writes, a snapshot, a commit and a pull, with the crate alone:
//!
//! ```
//! use qcow2_engine::ops::{self, CommitOptions, MergeOptions};
//! use qcow2_engine::{Chain, CreateOptions, Format, Mapping, create};
//!
//! # fn main() -> Result<(), qcow2_engine::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let base = dir.path().join("base.qcow2");
//! # let top = dir.path().join("top.qcow2");
//! // A 1 GiB base image, and an overlay on it (the name resolves next to the overlay).
//! create(&base, &CreateOptions::qcow2(1 << 30))?;
//! create(&top, &CreateOptions::overlay("base.qcow2", Format::Qcow2))?;
//!
//! // Write through the overlay and take an internal snapshot of it.
//! let chain = Chain::open_writable(&top)?;
//! chain.write_at(b"hello", 0)?;
//! chain.snapshot_create("before")?;
//! chain.write_at(b"world", 1 << 20)?;
//! chain.close()?;
//!
//! // Read what the guest sees, and ask how each range is stored.
//! let chain = Chain::open(&top)?;
//! let mut word = [0u8; 5];
//! chain.read_at(&mut word, 1 << 20)?;
//! assert_eq!(&word, b"world");
//! for run in chain.runs(0, chain.size()) {
//!     let run = run?;
//!     if let Mapping::Data { host, .. } = run.mapping {
//!         println!("{:#x}+{:#x}: layer {} at {host:#x}", run.offset, run.len, run.depth);
//!     }
//! }
//! assert_eq!(chain.snapshots()[0].name, "before");
//! drop(chain);
//!
//! // Commit the overlay's data down into the base, as `qemu-img commit` (the overlay is
//! // emptied); what the overlay shows does not change.
//! let no_progress = &mut |_done, _total| true;
//! ops::commit(&top, &CommitOptions::default(), no_progress)?;
//! Chain::open(&base)?.read_at(&mut word, 0)?;
//! assert_eq!(&word, b"hello");
//!
//! // Pull the base's data up into the overlay, which then stands alone (libvirt's
//! // blockpull).
//! ops::pull(&top, None, &MergeOptions::default(), no_progress)?;
//! let chain = Chain::open(&top)?;
//! assert_eq!(chain.layers().len(), 1);
//! chain.read_at(&mut word, 1 << 20)?;
//! assert_eq!(&word, b"world");
//! # Ok(())
//! # }
//! ```
//!
//! Incremental backup with a persistent dirty bitmap (as libvirt checkpoints and
//! `qemu-img bitmap` keep them): every write through the crate marks the image's enabled
//! bitmaps, so a backup tool reads only the ranges a bitmap marks dirty, each through the
//! chain's runs so that zeros travel as zeros, then starts the next period afresh.
//!
//! ```
//! use qcow2_engine::{Chain, CreateOptions, Layer, create};
//!
//! # fn main() -> Result<(), qcow2_engine::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let disk = dir.path().join("disk.qcow2");
//! create(&disk, &CreateOptions::qcow2(1 << 30))?;
//! let chain = Chain::open_writable(&disk)?;
//! let Layer::Qcow2(image) = chain.top() else { unreachable!() };
//! // The full backup is taken now; from here on the bitmap records what changes.
//! image.add_bitmap("since-full", None, true)?;
//! chain.write_at(&[7; 4096], 10 << 20)?;
//! chain.write_zeroes(200 << 20, 1 << 20, true)?;
//! chain.close()?;
//!
//! // The incremental backup: only what the bitmap marks, read through the chain.
//! let chain = Chain::open(&disk)?;
//! let Layer::Qcow2(image) = chain.top() else { unreachable!() };
//! let dirty = image.load_bitmap("since-full")?;
//! let mut copied = Vec::new();
//! for (offset, len) in dirty.runs() {
//!     for run in chain.runs(offset, len) {
//!         let run = run?;
//!         if run.mapping.is_zero_or_unallocated() {
//!             copied.push((run.offset, run.len, "zeros"));
//!         } else {
//!             let mut data = vec![0u8; run.len as usize];
//!             chain.read_at(&mut data, run.offset)?;
//!             copied.push((run.offset, run.len, "data"));
//!         }
//!     }
//! }
//! assert_eq!(copied, [(10 << 20, 65536, "data"), (200 << 20, 1 << 20, "zeros")]);
//! drop(chain);
//!
//! // The next period starts clean (`qemu-img bitmap --clear`).
//! let chain = Chain::open_writable(&disk)?;
//! let Layer::Qcow2(image) = chain.top() else { unreachable!() };
//! image.clear_bitmap("since-full")?;
//! chain.close()?;
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
pub mod nbd;
pub mod ops;
mod progress;
pub mod qcow2;
pub mod storage;
#[cfg(feature = "testing")]
pub mod testing;

pub use chain::{BackingPolicy, Chain, ChainOptions, ChainReader, ChainRun};
pub use create::{CreateOptions, create, create_on};
pub use error::{Error, Report, Result};
pub use layers::{ForeignImage, Format, Layer, RawImage};
pub use progress::Progress;
pub use qcow2::{
    BitmapInfo, CheckReport, Compat, DirtyBitmap, DirtyRuns, Finding, Image, ImageOptions, Mapping,
    Preallocation, RepairMode, Run, Severity,
};
pub use storage::Locking;

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctest;
