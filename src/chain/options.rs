//! How a chain is opened.

use crate::layers::Format;
use crate::qcow2::ImageOptions;

use super::BackingPolicy;

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// The top image's format; probed when `None`.
    pub format: Option<Format>,
    /// Deepest chain accepted, counting the top image (default 1024).
    pub max_depth: usize,
    /// Options for each qcow2 layer.
    pub image: ImageOptions,
    /// Open only the top image, ignoring its backing file.
    pub no_backing: bool,
    /// Open the top image for writing (backing files stay read-only). An image marked
    /// corrupt opens read-only instead, with a warning in [`Chain::warnings`].
    pub writable: bool,
    /// Which backing files and external data files an image may name (by default: any,
    /// as qemu-img).
    pub backing_policy: BackingPolicy,
}

impl Default for ChainOptions {
    fn default() -> ChainOptions {
        ChainOptions {
            format: None,
            max_depth: 1024,
            image: ImageOptions {
                l2_cache_bytes: 4 << 20,
                ..ImageOptions::default()
            },
            no_backing: false,
            writable: false,
            backing_policy: BackingPolicy::default(),
        }
    }
}
