//! What a chain is made of: layers, each a qcow2 image or a raw file; the formats that
//! tell them apart, probed as qemu-img probes them; and the images of formats qemu-img
//! knows that this crate recognises but does not open.

mod foreign;
mod format;
mod layer;
mod probe;
mod raw;

pub use foreign::{ForeignImage, header_virtual_size};
pub use format::Format;
pub use layer::Layer;
pub(crate) use layer::Opened;
pub(crate) use probe::PROBE_BYTES;
pub use raw::RawImage;
