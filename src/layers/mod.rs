//! What a chain is made of: layers, each a qcow2 image or a raw file, and the formats
//! that tell them apart, probed as qemu-img probes them.

mod format;
mod layer;
mod probe;
mod raw;

pub use format::Format;
pub use layer::Layer;
pub use raw::RawImage;
