//! The engine for one qcow2 image: open, map guest ranges, read.

mod amend;
mod check;
mod compress;
mod image;
mod l2cache;
mod layout;
mod mapping;
mod overlap;
mod prealloc;
mod rebuild;
mod refcount;
mod references;
mod resize;
mod snapshot;
mod space;
mod write;

pub use amend::AmendOptions;
pub use check::{CheckReport, Finding, RepairMode, Severity};
pub use compress::compress_cluster;
pub(crate) use image::check_run_buffer;
pub use image::{Image, ImageOptions};
pub use layout::{Compat, MAX_VIRTUAL_SIZE, Preallocation};
pub(crate) use layout::{Layout, LayoutOptions};
pub use mapping::{Mapping, Run, Runs};
pub use references::{Owner, ReferenceKind};
pub use space::{ImageSpace, OwnerSpace};
