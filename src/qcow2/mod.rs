//! The engine for one qcow2 image ([`Image`]): open it, look up what a guest range is
//! ([`Image::lookup`], the one mapping API), read and write it (allocation, copy-on-write,
//! zeroes, discard, crash-safe checkpoints), resize and amend it, take and apply internal
//! snapshots, check and repair it, and lay out a fresh one. It knows nothing of backing
//! chains: copy-on-write asks its caller for what lies below (see [`crate::Chain`]).
//! ARCHITECTURE.md names the file of each part.

mod amend;
mod bitmaps;
mod check;
mod compress;
mod image;
mod l2cache;
mod layout;
mod lookup;
mod mapping;
mod open;
mod overlap;
mod overlap_map;
mod prealloc;
mod read;
mod rebuild;
mod refcount;
mod reference;
mod references;
mod resize;
mod snapshot;
mod space;
mod stored_refcounts;
mod write;

pub use amend::AmendOptions;
pub use bitmaps::{BitmapInfo, DirtyBitmap, DirtyRuns};
pub use check::{CheckReport, Finding, RepairMode, Severity};
pub use compress::compress_cluster;
pub use image::{Image, ImageOptions};
pub use layout::{Compat, MAX_VIRTUAL_SIZE, Preallocation};
pub(crate) use layout::{Layout, LayoutOptions};
pub use lookup::Runs;
pub use mapping::{Mapping, Run};
pub(crate) use mapping::{RunCursor, fill_by_runs};
pub(crate) use open::Headers;
pub(crate) use read::check_run_buffer;
pub use reference::{Owner, ReferenceKind};
pub use space::{ImageSpace, OwnerSpace};
