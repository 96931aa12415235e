//! The formats a layer can have, and telling them apart by a file's first bytes.

use crate::error::{Error, Result};
use crate::storage::Storage;

/// Image formats a layer can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw disk image: guest offset = file offset.
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a format name (`qcow2` or `raw`).
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::UnsupportedFormat(other.to_owned())),
        }
    }

    /// Guesses the format of a file from its first bytes, as qemu-img does for qcow2/raw.
    pub fn probe(storage: &dyn Storage) -> Result<Format> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e))?;
        if len < 4 {
            return Ok(Format::Raw);
        }
        let mut magic = [0u8; 4];
        storage
            .read_at(&mut magic, 0)
            .map_err(|e| Error::io("reading magic", e))?;
        Ok(if u32::from_be_bytes(magic) == crate::format::QCOW2_MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}
