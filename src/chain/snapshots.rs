//! Internal snapshots of the top image, as `qemu-img snapshot` handles them.

use crate::error::{Error, Result};
use crate::format::SnapshotEntry;
use crate::layers::Layer;
use crate::qcow2::Image;

use super::Chain;

impl Chain {
    /// The top image's internal snapshots (none for a raw image).
    pub fn snapshots(&self) -> Vec<SnapshotEntry> {
        self.top()
            .as_qcow2()
            .map(Image::snapshots)
            .unwrap_or_default()
    }

    /// Takes an internal snapshot of the top image named `name` (see
    /// [`Image::snapshot_create`]); the chain must be open for writing.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotEntry> {
        self.snapshot_image()?.snapshot_create(name)
    }

    /// Reverts the top image to the snapshot with ID or name `id_or_name` (see
    /// [`Image::snapshot_apply`]).
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_image()?.snapshot_apply(id_or_name)
    }

    /// Deletes the snapshot with ID or name `id_or_name` from the top image (see
    /// [`Image::snapshot_delete`]).
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        self.snapshot_image()?.snapshot_delete(id_or_name)
    }

    /// The top image, which must be a qcow2 image open for writing.
    fn snapshot_image(&self) -> Result<&Image> {
        match self.writable_top()? {
            Layer::Qcow2(image) => Ok(image),
            Layer::Raw(raw) => {
                Err(Error::Unsupported("internal snapshots of a raw image").in_file(raw.name()))
            }
        }
    }
}
