//! The engine for one qcow2 image: open, map guest ranges, read.

mod compress;
mod image;
mod l2cache;
mod mapping;
mod prealloc;
mod rebuild;
mod refcount;
mod write;

pub use image::{Image, ImageOptions};
pub use mapping::{Mapping, Run, Runs};
