//! Creating images as `qemu-img create` makes them: a fresh qcow2 (version 2 or 3) or raw
//! file. [`CreateOptions`] holds every choice qemu-img offers; [`create`] validates all of
//! them (and opens the backing file when the size comes from it) before any file is
//! touched. The qcow2 layout itself is [`crate::qcow2`]'s.

mod files;
mod options;

pub use files::{create, create_on, data_file_path};
pub use options::CreateOptions;
