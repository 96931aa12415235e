//! Images of formats this crate recognises but does not open: what can be said of them
//! (for `qemu-img info`) from their first sector alone, without their driver.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{be16, be32, be64};
use crate::storage::Storage;

use super::Format;
use super::probe::{PROBE_BYTES, le32, le64};

/// An image of a format that is not [`Format::is_supported`]: its name, its format and the
/// sizes that need no driver. Nothing of it is read but the first sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignImage {
    /// The name given at open.
    pub name: PathBuf,
    /// Its format (never qcow2 or raw).
    pub format: Format,
    /// The guest-visible size, where the first sector states it plainly (see
    /// [`header_virtual_size`]); `None` for the formats that keep it elsewhere.
    pub virtual_size: Option<u64>,
    /// The file's length in bytes.
    pub file_len: u64,
    /// Bytes the file occupies on disk, when known (only this file's: qemu-img adds the
    /// extent files of a vmdk descriptor to it).
    pub allocated_size: Option<u64>,
}

impl ForeignImage {
    /// Describes the file `name`, held by `storage`, whose format is `format`.
    pub(crate) fn from_storage(
        storage: &dyn Storage,
        name: &Path,
        format: Format,
    ) -> Result<ForeignImage> {
        let in_file = |e: Error| e.in_file(name);
        let file_len = storage
            .len()
            .map_err(|e| in_file(Error::io("reading file length", e)))?;
        let mut first = [0u8; PROBE_BYTES];
        let have = file_len.min(PROBE_BYTES as u64) as usize;
        storage
            .read_at(&mut first[..have], 0)
            .map_err(|e| in_file(Error::io("reading the header", e)))?;
        Ok(ForeignImage {
            name: name.to_path_buf(),
            format,
            virtual_size: header_virtual_size(format, &first, file_len),
            file_len,
            allocated_size: storage.allocated_size(),
        })
    }
}

/// The guest-visible size the first sector of a `format` file of `file_len` bytes states,
/// computed as the format's QEMU driver computes it at open:
///
/// - qcow: `size` (big-endian u64 at 24) in whole sectors (`qcow_open`);
/// - vmdk: a sparse extent's capacity in sectors, little-endian at 12 (u64 for `KDMV`,
///   `vmdk_open_vmdk4`; u32 for `COWD`, `vmdk_open_vmfs_sparse`). A text descriptor's size
///   is the sum of its extents' lines, which need not lie in the first sector: `None`;
/// - vdi: `disk_size` (little-endian u64 at 0x170) rounded up to whole sectors
///   (`vdi_open`);
/// - vpc: from the footer copy at the start (`vpc_open`): cylinders × heads × sectors of
///   its geometry, unless its creator application is one that uses the size field (Hyper-V
///   `win `, QEMU's `qem2`, Disk2vhd `d2v `, XenServer `tap\0`, XenConverter `CTXS`) or the
///   geometry is the largest there is: then `current_size` (big-endian u64 at 48) in whole
///   sectors;
/// - qed: `image_size` (little-endian u64 at 48) in whole sectors (`bdrv_qed_open`);
/// - luks: the file's length less the payload offset (big-endian u32 at 104, in 512-byte
///   sectors), rounded up to whole sectors (`block_crypto_co_getlength`).
///
/// vhdx keeps its size in a metadata region found through its region table (at 192 KiB),
/// parallels in a field whose width depends on which of its two magics the file has, and
/// dmg, cloop and bochs past their headers or at the file's end: `None` for them.
pub fn header_virtual_size(
    format: Format,
    first: &[u8; PROBE_BYTES],
    file_len: u64,
) -> Option<u64> {
    let sectors = |bytes: u64| bytes / 512 * 512;
    match format {
        Format::Qcow => Some(sectors(be64(first, 24))),
        Format::Vmdk if first.starts_with(b"KDMV") => le64(first, 12).checked_mul(512),
        Format::Vmdk if first.starts_with(b"COWD") => Some(u64::from(le32(first, 12)) * 512),
        Format::Vdi => le64(first, 0x170).checked_next_multiple_of(512),
        Format::Vpc => Some(vpc_size(first)),
        Format::Qed => Some(sectors(le64(first, 48))),
        Format::Luks => file_len
            .checked_sub(u64::from(be32(first, 104)) * 512)
            .and_then(|len| len.checked_next_multiple_of(512)),
        _ => None,
    }
}

/// `vpc_open`'s choice between the footer's geometry and its size field (see
/// [`header_virtual_size`]).
fn vpc_size(footer: &[u8; PROBE_BYTES]) -> u64 {
    /// The largest CHS geometry a footer can hold: 65535 cylinders, 16 heads, 255 sectors.
    const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
    let creator = &footer[28..32];
    let uses_size_field = [b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS"]
        .iter()
        .any(|app| creator == *app);
    let geometry_sectors =
        u64::from(be16(footer, 56)) * u64::from(footer[58]) * u64::from(footer[59]);
    if uses_size_field || geometry_sectors == MAX_GEOMETRY_SECTORS {
        be64(footer, 48) / 512 * 512
    } else {
        geometry_sectors * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(parts: &[(usize, &[u8])]) -> [u8; PROBE_BYTES] {
        let mut s = [0u8; PROBE_BYTES];
        for (at, bytes) in parts {
            s[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        s
    }

    #[test]
    fn qcow_size_in_whole_sectors() {
        let s = sector(&[
            (0, b"QFI\xfb\0\0\0\x01"),
            (24, &(1_048_577u64).to_be_bytes()),
        ]);
        assert_eq!(header_virtual_size(Format::Qcow, &s, 560), Some(1 << 20));
    }

    #[test]
    fn vmdk_sparse_capacities_and_descriptors() {
        let kdmv = sector(&[(0, b"KDMV"), (12, &[0, 8, 0, 0, 0, 0, 0, 0])]);
        assert_eq!(
            header_virtual_size(Format::Vmdk, &kdmv, 65536),
            Some(1 << 20)
        );
        let cowd = sector(&[(0, b"COWD"), (12, &[0, 8, 0, 0])]);
        assert_eq!(
            header_virtual_size(Format::Vmdk, &cowd, 65536),
            Some(1 << 20)
        );
        let huge = sector(&[(0, b"KDMV"), (12, &[0xff; 8])]);
        assert_eq!(header_virtual_size(Format::Vmdk, &huge, 65536), None);
        let text = sector(&[(0, b"# Disk DescriptorFile\nversion=1\n")]);
        assert_eq!(header_virtual_size(Format::Vmdk, &text, 337), None);
    }

    #[test]
    fn vdi_rounds_odd_sizes_up() {
        let s = sector(&[(0x170, &[1, 2, 0, 0, 0, 0, 0, 0])]);
        assert_eq!(header_virtual_size(Format::Vdi, &s, 1024), Some(1024));
        let s = sector(&[(0x170, &[0xff; 8])]);
        assert_eq!(header_virtual_size(Format::Vdi, &s, 1024), None);
    }

    /// A vpc footer with `creator`, a geometry and a size field.
    fn footer(creator: &[u8; 4], chs: (u16, u8, u8), size: u64) -> [u8; PROBE_BYTES] {
        let (c, h, s) = chs;
        sector(&[
            (0, b"conectix"),
            (28, creator),
            (48, &size.to_be_bytes()),
            (56, &c.to_be_bytes()),
            (58, &[h, s]),
        ])
    }

    #[test]
    fn vpc_geometry_or_size_field_by_creator() {
        // What qemu-img create writes: creator "qemu" with a geometry that rounds down.
        let qemu = footer(b"qemu", (31, 4, 17), 1_079_296);
        assert_eq!(
            header_virtual_size(Format::Vpc, &qemu, 2560),
            Some(1_079_296)
        );
        let rounded = footer(b"vpc ", (31, 4, 17), 1 << 20);
        assert_eq!(
            header_virtual_size(Format::Vpc, &rounded, 2560),
            Some(1_079_296)
        );
        for creator in [b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS"] {
            let f = footer(creator, (31, 4, 17), (1 << 20) + 100);
            assert_eq!(header_virtual_size(Format::Vpc, &f, 2560), Some(1 << 20));
        }
        let largest = footer(b"qemu", (65535, 16, 255), 1 << 40);
        assert_eq!(
            header_virtual_size(Format::Vpc, &largest, 2560),
            Some(1 << 40)
        );
    }

    #[test]
    fn qed_size_field() {
        let s = sector(&[(0, b"QED\0"), (48, &[0, 0, 0x10, 0, 0, 0, 0, 0])]);
        assert_eq!(header_virtual_size(Format::Qed, &s, 327_680), Some(1 << 20));
    }

    #[test]
    fn luks_payload_after_the_header() {
        let s = sector(&[(0, b"LUKS\xba\xbe\0\x01"), (104, &4040u32.to_be_bytes())]);
        assert_eq!(
            header_virtual_size(Format::Luks, &s, 3_117_056),
            Some(1 << 20)
        );
        // A payload past the end of the file leaves nothing.
        assert_eq!(header_virtual_size(Format::Luks, &s, 1000), None);
    }

    #[test]
    fn formats_keeping_their_size_elsewhere_have_none() {
        let s = sector(&[(0, b"vhdxfile")]);
        for format in [
            Format::Vhdx,
            Format::Parallels,
            Format::Dmg,
            Format::Cloop,
            Format::Bochs,
        ] {
            assert_eq!(header_virtual_size(format, &s, 1 << 20), None, "{format:?}");
        }
    }
}
