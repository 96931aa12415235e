//! How a chain is opened.

use std::sync::Arc;

use crate::layers::Format;
use crate::qcow2::ImageOptions;
use crate::storage::{Locking, Opener};

use super::BackingPolicy;

/// How to open a chain. The defaults open every layer read-only, probe the top image's
/// format (a file of no format qemu-img knows opens as raw, as in qemu-img; see
/// [`Format::probe`]) and accept every backing file the images name;
/// [`ChainOptions::qcow2`] refuses anything but qcow2 at the top.
#[derive(Clone)]
pub struct ChainOptions {
    /// The top image's format; probed when `None`.
    pub format: Option<Format>,
    /// Open the top image for writing (backing files are always read-only). An image
    /// marked corrupt opens read-only instead, with a warning in
    /// [`super::Chain::warnings`] ([`super::Chain::ensure_writable`] refuses it).
    pub writable: bool,
    /// Open only the top image, ignoring its backing file.
    pub no_backing: bool,
    /// Deepest chain accepted, counting the top image (default 1024).
    pub max_depth: usize,
    /// Bytes of decoded L2 tables each qcow2 layer keeps cached (default 4 MiB).
    pub l2_cache_bytes: u64,
    /// Opens every layer's file and external data file (default `None`: host files).
    pub opener: Option<Arc<dyn Opener>>,
    /// Which backing files and external data files an image may name (by default: any,
    /// as qemu-img).
    pub backing_policy: BackingPolicy,
    /// QEMU's image locks on every file the chain opens (default [`Locking::On`]: the top
    /// as it is opened, backing files for reading; [`Locking::ForceShare`] is qemu-img's
    /// `-U`).
    pub locking: Locking,
}

impl Default for ChainOptions {
    fn default() -> ChainOptions {
        ChainOptions {
            format: None,
            writable: false,
            no_backing: false,
            max_depth: 1024,
            l2_cache_bytes: 4 << 20,
            opener: None,
            backing_policy: BackingPolicy::default(),
            locking: Locking::On,
        }
    }
}

impl ChainOptions {
    /// The defaults, but the top image must be qcow2: a file that is not fails to open
    /// ([`crate::Error::BadMagic`]) instead of opening as raw.
    pub fn qcow2() -> ChainOptions {
        ChainOptions {
            format: Some(Format::Qcow2),
            ..ChainOptions::default()
        }
    }

    /// These options with the top image opened for writing (or not).
    pub fn writable(self, writable: bool) -> ChainOptions {
        ChainOptions { writable, ..self }
    }

    /// How each layer is opened: its L2 cache, opener and locks; writable only for the top
    /// (`top`) when the chain is.
    pub(crate) fn image_options(&self, top: bool) -> ImageOptions {
        ImageOptions {
            l2_cache_bytes: self.l2_cache_bytes,
            writable: self.writable && top,
            opener: self.opener.clone(),
            locking: self.locking,
        }
    }
}

impl std::fmt::Debug for ChainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainOptions")
            .field("format", &self.format)
            .field("writable", &self.writable)
            .field("no_backing", &self.no_backing)
            .field("max_depth", &self.max_depth)
            .field("l2_cache_bytes", &self.l2_cache_bytes)
            .field("opener", &self.opener.as_ref().map(|_| "custom"))
            .field("backing_policy", &self.backing_policy)
            .field("locking", &self.locking)
            .finish()
    }
}
