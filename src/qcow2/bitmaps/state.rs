//! The bitmaps of an image, apart from the image (so that `Image` can hold them without
//! importing the code that keeps them, `track.rs`).

use crate::format::BitmapDirectoryEntry;

use super::dirty::DirtyBitmap;

/// The bitmaps of an image opened for writing (empty for a read-only image).
#[derive(Debug, Default)]
pub(crate) struct BitmapSet {
    pub(crate) bitmaps: Vec<Tracked>,
    /// Every loaded bitmap is marked in use on disk, and something is to be stored on
    /// close. Guest writes may go ahead only while this holds (or nothing is loaded).
    pub(super) armed: bool,
}

/// One bitmap of the directory.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The entry as the directory on disk has it.
    pub(super) entry: BitmapDirectoryEntry,
    /// In use already when the image was opened: its contents cannot be trusted, so it is
    /// kept as it is (QEMU's "inconsistent") until removed.
    pub(super) inconsistent: bool,
    /// Records guest changes (stored with the `auto` flag).
    pub(super) enabled: bool,
    /// The contents, once loaded (enabled bitmaps, and those an operation changed). While
    /// loaded and armed, the bitmap is in use on disk; it is stored on close.
    pub(super) data: Option<DirtyBitmap>,
}

impl BitmapSet {
    /// Whether guest writes change a loaded bitmap.
    pub(super) fn tracks_writes(&self) -> bool {
        self.bitmaps.iter().any(|t| t.enabled && t.data.is_some())
    }

    pub(super) fn find(&self, name: &str) -> Option<usize> {
        self.bitmaps.iter().position(|t| t.entry.name == name)
    }
}
