//! The formats qemu-img knows by a file's first bytes, and which of them a layer can have.

use crate::error::{Error, Result};

/// Image formats: the two a layer can have (qcow2, raw) and every other format qemu-img
/// recognises when it probes a file, so that such a file is named rather than read as raw
/// bytes. Only [`Format::is_supported`] formats open; the others are refused with
/// [`Error::FormatNotSupported`].
///
/// Non-exhaustive: qemu-img may learn to probe more formats, and naming them must not break
/// callers. Match on the formats you handle and treat the rest as not supported (or ask
/// [`Format::is_supported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw disk image: guest offset = file offset.
    Raw,
    /// QEMU's first copy-on-write format (qcow version 1).
    Qcow,
    /// VMware's format: sparse extents (`KDMV`, and the older `COWD`) and text descriptors.
    Vmdk,
    /// VirtualBox's format.
    Vdi,
    /// Hyper-V's format.
    Vhdx,
    /// Virtual PC's format (VHD), dynamic or differencing (a fixed VHD has no header
    /// before its data and probes as raw, as in qemu-img).
    Vpc,
    /// QEMU Enhanced Disk.
    Qed,
    /// A LUKS (version 1) encrypted volume.
    Luks,
    /// Parallels' format.
    Parallels,
    /// An Apple disk image, known only by a name ending in `.dmg`.
    Dmg,
    /// A compressed loop image.
    Cloop,
    /// Bochs' growing image.
    Bochs,
}

impl Format {
    /// Every format, those a layer can have first.
    pub const ALL: [Format; 13] = [
        Format::Qcow2,
        Format::Raw,
        Format::Qcow,
        Format::Vmdk,
        Format::Vdi,
        Format::Vhdx,
        Format::Vpc,
        Format::Qed,
        Format::Luks,
        Format::Parallels,
        Format::Dmg,
        Format::Cloop,
        Format::Bochs,
    ];

    /// The name qemu-img uses (`-f`, `file format:`, JSON `format`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
            Format::Qcow => "qcow",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vhdx => "vhdx",
            Format::Vpc => "vpc",
            Format::Qed => "qed",
            Format::Luks => "luks",
            Format::Parallels => "parallels",
            Format::Dmg => "dmg",
            Format::Cloop => "cloop",
            Format::Bochs => "bochs",
        }
    }

    /// Parses one of qemu-img's format names (any of [`Format::ALL`]); other names are
    /// [`Error::UnsupportedFormat`].
    pub fn from_name(name: &str) -> Result<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| Error::UnsupportedFormat(name.to_owned()))
    }

    /// Whether an image of this format can be opened (as a layer, created, converted to):
    /// qcow2 and raw.
    pub fn is_supported(self) -> bool {
        matches!(self, Format::Qcow2 | Format::Raw)
    }

    /// This format when it can be opened, else [`Error::FormatNotSupported`] naming it.
    pub fn require_supported(self) -> Result<Format> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(self.not_supported())
        }
    }

    /// The error refusing an image of this format.
    pub(crate) fn not_supported(self) -> Error {
        Error::FormatNotSupported {
            format: self.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_and_others_are_unknown() {
        for format in Format::ALL {
            assert_eq!(Format::from_name(format.name()).unwrap(), format);
        }
        assert!(matches!(
            Format::from_name("vmdk4"),
            Err(Error::UnsupportedFormat(_))
        ));
        assert!(matches!(
            Format::from_name("QCOW2"),
            Err(Error::UnsupportedFormat(_))
        ));
    }

    #[test]
    fn only_qcow2_and_raw_are_supported() {
        let supported: Vec<Format> = Format::ALL
            .into_iter()
            .filter(|f| f.is_supported())
            .collect();
        assert_eq!(supported, [Format::Qcow2, Format::Raw]);
        let e = Format::Vmdk.require_supported().unwrap_err();
        assert_eq!(e.to_string(), "vmdk images are not supported");
    }
}
