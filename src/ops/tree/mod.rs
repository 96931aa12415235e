//! Trees of images: which images use which as backing file, found by reading the headers
//! of the images in a set of directories (`qimg tree`, and the check that keeps a
//! commit from changing what other images show).

mod forest;
mod scan;

pub use forest::Forest;
pub use scan::{TreeImage, TreeOptions};
