//! Converting a chain's guest content to a new image: [`convert`] creates the destination
//! and fills it, as a sparse raw file ([`convert_to_raw`]) or a qcow2 image
//! ([`convert_to_qcow2`]); [`convert_concatenated`] joins several sources
//! ([`concatenate`]) and [`convert_into`] writes into an existing image (`-n`).

mod bitmaps;
mod clusters;
mod concat;
mod dispatch;
mod offload;
mod options;
mod output;
mod qcow2;
mod raw;

pub use concat::concatenate;
pub use dispatch::{convert, convert_concatenated, convert_into};
pub use options::ConvertOptions;
pub use qcow2::convert_to_qcow2;
pub use raw::convert_to_raw;
