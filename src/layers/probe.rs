//! Telling formats apart by a file's first sector, by the rules of QEMU's drivers.
//!
//! qemu-img opens a file whose format it is not told by asking every driver to score the
//! file's first bytes (`find_image_format` and `bdrv_probe_all` in QEMU's block.c): the
//! highest score wins, among equal scores the driver that comes first in QEMU's driver
//! list, and raw scores 1 (`raw_probe`, block/raw-format.c) so that it is the fallback. Each
//! rule below is one driver's `probe` function, named in its doc. The rules are pure
//! (bytes in, a format out, never a failure); [`Format::probe`] reads what they look at:
//! at most a file's first 512 bytes.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{QCOW2_MAGIC, be16, be32};
use crate::storage::{FileStorage, Storage};

use super::Format;

/// How many bytes probing looks at: QEMU's `BLOCK_PROBE_BUF_SIZE` (512, in
/// include/block/block_int-common.h; older QEMUs read 2048). `find_image_format` reads that
/// many bytes and hands every driver the whole buffer: past the end of a shorter file the
/// read returns zeros, so a short file probes as if padded with zeros.
pub(crate) const PROBE_BYTES: usize = 512;

/// The probe buffer: a file's first sector, padded with zeros.
type Sector = [u8; PROBE_BYTES];

/// One driver's rule: a score for the first sector and the file's name (`None` when QEMU
/// probes a buffer that is no file's, as the raw driver's write check does).
type Rule = fn(&Sector, Option<&[u8]>) -> u32;

impl Format {
    /// Guesses the format of the file `name` (held by `storage`) as qemu-img does: from at
    /// most its first 512 bytes and, for dmg, its name (see [`Format::probe_bytes`]). A file
    /// of no format qemu-img knows is raw.
    pub fn probe(storage: &dyn Storage, name: &Path) -> Result<Format> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e))?;
        let mut first = [0u8; PROBE_BYTES];
        let have = len.min(PROBE_BYTES as u64) as usize;
        storage
            .read_at(&mut first[..have], 0)
            .map_err(|e| Error::io("reading the first sector to probe its format", e))?;
        Ok(Format::probe_bytes(&first[..have], Some(name)))
    }

    /// The format qemu-img gives a file that starts with `first` (its first 512 bytes, or
    /// all of it when shorter) and is called `name`: the highest score of the rules of
    /// QEMU's drivers (see `layers/probe.rs`), raw when none matches. An empty file is raw.
    pub fn probe_bytes(first: &[u8], name: Option<&Path>) -> Format {
        // QEMU's find_image_format calls an empty file raw before any driver looks at it.
        if first.is_empty() {
            return Format::Raw;
        }
        probe_sector(first, name.map(|n| n.as_os_str().as_bytes()))
    }

    /// The format `path` opens as: `given`, or probed when `None`. A format this crate does
    /// not open is refused ([`Error::FormatNotSupported`]); errors name the file.
    pub fn for_file(path: &Path, given: Option<Format>) -> Result<Format> {
        let format = match given {
            Some(format) => format,
            None => {
                let storage = FileStorage::open(path, false)
                    .map_err(|e| Error::io("opening", e).in_file(path))?;
                Format::probe(&storage, path).map_err(|e| e.in_file(path))?
            }
        };
        format.require_supported().map_err(|e| e.in_file(path))
    }
}

/// The drivers in the order of QEMU's driver list, which breaks ties (`bdrv_register`
/// inserts at the head: the last registered comes first). Only two kinds of tie can
/// happen: vdi's signature lies at byte 0x40, where the header of a format recognised by
/// its first bytes may hold the same four bytes, and dmg (by name) and cloop both score 2.
/// qemu-img 10.0 resolves them so (checked with files that match two rules, tests/probe.rs):
/// parallels, vhdx, vmdk and qed come before vdi; vdi before qcow, luks and qcow2; dmg
/// before cloop. Formats that cannot tie keep their place in the same list.
const RULES: [(Format, Rule); 13] = [
    (Format::Parallels, parallels),
    (Format::Vhdx, vhdx),
    (Format::Vpc, vpc),
    (Format::Vmdk, vmdk),
    (Format::Qed, qed),
    (Format::Dmg, dmg),
    (Format::Bochs, bochs),
    (Format::Cloop, cloop),
    (Format::Vdi, vdi),
    (Format::Qcow, qcow),
    (Format::Luks, luks),
    (Format::Qcow2, qcow2),
    (Format::Raw, raw),
];

/// The format of a file that starts with `first` (at least one byte; only the first 512
/// count) and is called `name`, as `bdrv_probe_all` decides it.
fn probe_sector(first: &[u8], name: Option<&[u8]>) -> Format {
    let mut sector = [0u8; PROBE_BYTES];
    let have = first.len().min(PROBE_BYTES);
    sector[..have].copy_from_slice(&first[..have]);
    let mut best = (Format::Raw, 0);
    for (format, rule) in RULES {
        let score = rule(&sector, name);
        // Strictly greater: among equal scores the first in the list stays.
        if score > best.1 {
            best = (format, score);
        }
    }
    best.0
}

/// What a rule returns for a match: every driver but dmg, cloop and raw scores 100.
const CERTAIN: u32 = 100;

fn score(matched: bool, score: u32) -> u32 {
    if matched { score } else { 0 }
}

/// Little-endian u32 at `at` of the sector. Every format probed here but qcow, qcow2, vpc
/// and luks stores little-endian integers; Cargo.toml denies the conversion elsewhere,
/// where a little-endian read of a qcow2 field would be a bug.
#[expect(
    clippy::little_endian_bytes,
    reason = "vdi, qed, parallels and bochs fields"
)]
pub(super) fn le32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("four bytes"))
}

/// Little-endian u64 at `at` (see [`le32`]).
#[expect(clippy::little_endian_bytes, reason = "vmdk, vdi and qed fields")]
pub(super) fn le64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("eight bytes"))
}

/// Whether the C string at `at` is exactly `text` (what `strcmp(field, text) == 0` asks of
/// a field longer than `text`: the text, then a NUL).
fn c_string_is(sector: &Sector, at: usize, text: &[u8]) -> bool {
    sector[at..].starts_with(text) && sector[at + text.len()] == 0
}

/// raw, `raw_probe` (block/raw-format.c): 1 for anything, the smallest score that still
/// wins when no other driver matches.
fn raw(_: &Sector, _: Option<&[u8]>) -> u32 {
    1
}

/// qcow2, `qcow2_probe` (block/qcow2.c): the magic `QFI\xfb` and a version of 2 or more
/// (an unknown later version is qcow2 still, refused when opened).
fn qcow2(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(
        be32(sector, 0) == QCOW2_MAGIC && be32(sector, 4) >= 2,
        CERTAIN,
    )
}

/// qcow, `qcow_probe` (block/qcow.c): the same magic as qcow2, version 1.
fn qcow(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(
        be32(sector, 0) == QCOW2_MAGIC && be32(sector, 4) == 1,
        CERTAIN,
    )
}

/// vmdk, `vmdk_probe` (block/vmdk.c): a sparse extent's magic (`KDMV`, or `COWD` for
/// VMware's older format), or a text descriptor: comment lines (`#`) and lines of spaces
/// (ending `\n` or `\r\n`) and then the line `version=1`, `2` or `3` (ending `\n` or
/// `\r\n`). Anything else first, an empty line included, is no descriptor.
fn vmdk(sector: &Sector, _: Option<&[u8]>) -> u32 {
    if sector.starts_with(b"KDMV") || sector.starts_with(b"COWD") {
        return CERTAIN;
    }
    let end = sector.len();
    let mut at = 0;
    while at < end {
        match sector[at] {
            b'#' => {
                while at < end && sector[at] != b'\n' {
                    at += 1;
                }
                at += 1;
            }
            b' ' => {
                while at < end && sector[at] == b' ' {
                    at += 1;
                }
                if at < end && sector[at] == b'\r' {
                    at += 1;
                }
                if at == end || sector[at] != b'\n' {
                    return 0;
                }
                at += 1;
            }
            _ => return score(is_version_line(&sector[at..]), CERTAIN),
        }
    }
    0
}

/// Whether `line` starts with `version=1`, `2` or `3` and a line end.
fn is_version_line(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b"version=") else {
        return false;
    };
    matches!(rest.first(), Some(b'1'..=b'3'))
        && (rest[1..].starts_with(b"\n") || rest[1..].starts_with(b"\r\n"))
}

/// vdi, `vdi_probe` (block/vdi.c): the signature 0xbeda107f (little-endian) at 0x40, after
/// the free text that starts the header.
fn vdi(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(le32(sector, 0x40) == 0xbeda_107f, CERTAIN)
}

/// vhdx, `vhdx_probe` (block/vhdx.c): the file identifier's signature `vhdxfile`.
fn vhdx(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(sector.starts_with(b"vhdxfile"), CERTAIN)
}

/// vpc, `vpc_probe` (block/vpc.c): the cookie `conectix` of a footer copy at the start of
/// the file, which dynamic and differencing images have (a fixed image's only footer is
/// at its end, so it probes as raw).
fn vpc(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(sector.starts_with(b"conectix"), CERTAIN)
}

/// qed, `bdrv_qed_probe` (block/qed.c): the magic `QED\0` (0x00444551 little-endian).
fn qed(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(sector.starts_with(b"QED\0"), CERTAIN)
}

/// luks, `block_crypto_probe_luks` (block/crypto.c) through
/// `qcrypto_block_luks_has_format` (crypto/block-luks.c): the magic `LUKS\xba\xbe` and
/// version 1 (big-endian u16).
fn luks(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(
        sector.starts_with(b"LUKS\xba\xbe") && be16(sector, 6) == 1,
        CERTAIN,
    )
}

/// parallels, `parallels_probe` (block/parallels.c): the magic `WithoutFreeSpace` or
/// `WithouFreSpacExt` and version 2 (little-endian u32 at 16).
fn parallels(sector: &Sector, _: Option<&[u8]>) -> u32 {
    let magic = sector.starts_with(b"WithoutFreeSpace") || sector.starts_with(b"WithouFreSpacExt");
    score(magic && le32(sector, 16) == 2, CERTAIN)
}

/// dmg, `dmg_probe` (block/dmg.c): only the name, longer than 4 bytes and ending `.dmg`
/// (case matters), scoring 2: a dmg image's header is at its end.
fn dmg(_: &Sector, name: Option<&[u8]>) -> u32 {
    score(name.is_some_and(|n| n.len() > 4 && n.ends_with(b".dmg")), 2)
}

/// cloop, `cloop_probe` (block/cloop.c): the shell script version 2.0 images start with,
/// scoring 2.
fn cloop(sector: &Sector, _: Option<&[u8]>) -> u32 {
    const PREAMBLE: &[u8] = b"#!/bin/sh\n#V2.0 Format\n\
        modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    score(sector.starts_with(PREAMBLE), 2)
}

/// bochs, `bochs_probe` (block/bochs.c): the C strings `Bochs Virtual HD Image` (at 0, in
/// 32 bytes), `Redolog` (at 32) and `Growing` (at 48), and version 2.0 or 1.0
/// (0x00020000 or 0x00010000, little-endian u32 at 64).
fn bochs(sector: &Sector, _: Option<&[u8]>) -> u32 {
    score(
        c_string_is(sector, 0, b"Bochs Virtual HD Image")
            && c_string_is(sector, 32, b"Redolog")
            && c_string_is(sector, 48, b"Growing")
            && matches!(le32(sector, 64), 0x0002_0000 | 0x0001_0000),
        CERTAIN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(bytes: &[u8]) -> Format {
        probe_sector(bytes, None)
    }

    fn probe_named(bytes: &[u8], name: &str) -> Format {
        probe_sector(bytes, Some(name.as_bytes()))
    }

    /// `bytes` at `at` of a zeroed sector.
    fn sector_with(parts: &[(usize, &[u8])]) -> Vec<u8> {
        let mut sector = vec![0u8; PROBE_BYTES];
        for (at, bytes) in parts {
            sector[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        sector
    }

    const VDI_SIGNATURE: (usize, &[u8]) = (0x40, &[0x7f, 0x10, 0xda, 0xbe]);

    #[test]
    fn qcow_and_qcow2_share_a_magic_and_differ_by_version() {
        let magic = b"QFI\xfb";
        assert_eq!(probe(&[magic, &[0, 0, 0, 3][..]].concat()), Format::Qcow2);
        assert_eq!(probe(&[magic, &[0, 0, 0, 2][..]].concat()), Format::Qcow2);
        assert_eq!(probe(&[magic, &[0, 0, 1, 0][..]].concat()), Format::Qcow2);
        assert_eq!(probe(&[magic, &[0, 0, 0, 1][..]].concat()), Format::Qcow);
        // Version 0 matches neither rule.
        assert_eq!(probe(&[magic, &[0, 0, 0, 0][..]].concat()), Format::Raw);
        // Four bytes are enough: the rest of the sector reads as zeros (version 0).
        assert_eq!(probe(magic), Format::Raw);
        assert_eq!(probe(b"QFI\xfa\0\0\0\x03"), Format::Raw);
    }

    #[test]
    fn vmdk_sparse_magics() {
        assert_eq!(probe(b"KDMV"), Format::Vmdk);
        assert_eq!(probe(b"COWD"), Format::Vmdk);
        assert_eq!(probe(b"VMDK"), Format::Raw);
        assert_eq!(probe(b"KDM"), Format::Raw);
    }

    #[test]
    fn vmdk_descriptors_start_with_comments_blank_lines_and_a_version() {
        for text in [
            "version=1\n",
            "version=2\r\n",
            "version=3\nCID=1\n",
            "# Disk DescriptorFile\nversion=1\n",
            "#\n#\n   \n \r\nversion=1\n",
            // A comment running to the end of the buffer's line, then the version.
            "#version=9\nversion=2\n",
        ] {
            assert_eq!(probe(text.as_bytes()), Format::Vmdk, "{text:?}");
        }
        for text in [
            "version=4\n",
            "version=1",
            "version=1\r",
            "version=1 \n",
            " version=1\n",
            // An empty line is not accepted before the version line.
            "\nversion=1\n",
            "# only comments\n",
            "   ",
            "  \t\nversion=1\n",
            "Version=1\n",
        ] {
            assert_eq!(probe(text.as_bytes()), Format::Raw, "{text:?}");
        }
    }

    #[test]
    fn vmdk_descriptor_version_must_lie_in_the_first_sector() {
        let mut text = vec![b'#'; PROBE_BYTES - 5];
        text.push(b'\n');
        text.extend_from_slice(b"version=1\n");
        assert_eq!(probe(&text), Format::Raw);
        let mut text = vec![b'#'; PROBE_BYTES - 11];
        text.push(b'\n');
        text.extend_from_slice(b"version=1\n");
        assert_eq!(text.len(), PROBE_BYTES);
        assert_eq!(probe(&text), Format::Vmdk);
        // One byte short: the line end falls outside the sector.
        text.insert(0, b'#');
        assert_eq!(probe(&text), Format::Raw);
    }

    #[test]
    fn vdi_signature_at_0x40() {
        assert_eq!(probe(&sector_with(&[VDI_SIGNATURE])), Format::Vdi);
        assert_eq!(
            probe(&sector_with(&[(0x40, &[0xbe, 0xda, 0x10, 0x7f])])),
            Format::Raw
        );
        // A file ending inside the signature reads zeros for the rest.
        assert_eq!(probe(&sector_with(&[VDI_SIGNATURE])[..0x43]), Format::Raw);
        assert_eq!(probe(&sector_with(&[VDI_SIGNATURE])[..0x44]), Format::Vdi);
    }

    #[test]
    fn magics_at_the_start() {
        assert_eq!(probe(b"vhdxfile"), Format::Vhdx);
        assert_eq!(probe(b"vhdxfil"), Format::Raw);
        assert_eq!(probe(b"conectix"), Format::Vpc);
        assert_eq!(probe(b"conectiX"), Format::Raw);
        assert_eq!(probe(b"QED\0"), Format::Qed);
        assert_eq!(probe(b"QED"), Format::Qed);
        assert_eq!(probe(b"QED\x01"), Format::Raw);
    }

    #[test]
    fn luks_version_1_only() {
        assert_eq!(probe(b"LUKS\xba\xbe\0\x01"), Format::Luks);
        assert_eq!(probe(b"LUKS\xba\xbe\0\x02"), Format::Raw);
        assert_eq!(probe(b"LUKS\xba\xbe\x01\x01"), Format::Raw);
        assert_eq!(probe(b"LUKS\xba\xbe"), Format::Raw);
    }

    #[test]
    fn parallels_both_magics_and_version_2() {
        for magic in [b"WithoutFreeSpace", b"WithouFreSpacExt"] {
            assert_eq!(
                probe(&sector_with(&[(0, magic), (16, &[2, 0, 0, 0])])),
                Format::Parallels
            );
            assert_eq!(
                probe(&sector_with(&[(0, magic), (16, &[1, 0, 0, 0])])),
                Format::Raw
            );
        }
        assert_eq!(probe(b"WithoutFreeSpace"), Format::Raw);
    }

    #[test]
    fn dmg_by_name_only_longer_than_the_suffix_and_case_sensitive() {
        assert_eq!(probe_named(b"\0", "disk.dmg"), Format::Dmg);
        assert_eq!(probe_named(b"\0", "a.dmg"), Format::Dmg);
        assert_eq!(probe_named(b"\0", ".dmg"), Format::Raw);
        assert_eq!(probe_named(b"\0", "disk.DMG"), Format::Raw);
        assert_eq!(probe_named(b"\0", "disk.dmg.bak"), Format::Raw);
        // No name (the raw driver's write check): never dmg.
        assert_eq!(probe(b"\0"), Format::Raw);
        // A format that scores 100 wins over the name.
        assert_eq!(probe_named(b"QFI\xfb\0\0\0\x03", "disk.dmg"), Format::Qcow2);
    }

    const CLOOP: &[u8] =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

    #[test]
    fn cloop_preamble() {
        assert_eq!(probe(CLOOP), Format::Cloop);
        assert_eq!(probe(&CLOOP[..CLOOP.len() - 1]), Format::Raw);
        let mut changed = CLOOP.to_vec();
        changed[14] = b'3';
        assert_eq!(probe(&changed), Format::Raw);
    }

    /// A bochs header; `version` as stored (little-endian).
    fn bochs_header(magic: &[u8], kind: &[u8], subtype: &[u8], version: [u8; 4]) -> Vec<u8> {
        sector_with(&[(0, magic), (32, kind), (48, subtype), (64, &version)])
    }

    const BOCHS_V2: [u8; 4] = [0, 0, 2, 0];
    const BOCHS_V1: [u8; 4] = [0, 0, 1, 0];

    #[test]
    fn bochs_growing_redologs_of_version_1_or_2() {
        let magic = b"Bochs Virtual HD Image";
        assert_eq!(
            probe(&bochs_header(magic, b"Redolog", b"Growing", BOCHS_V2)),
            Format::Bochs
        );
        assert_eq!(
            probe(&bochs_header(magic, b"Redolog", b"Growing", BOCHS_V1)),
            Format::Bochs
        );
        for header in [
            bochs_header(magic, b"Redolog", b"Growing", [0, 0, 3, 0]),
            bochs_header(magic, b"Redolog", b"Undoable", BOCHS_V2),
            bochs_header(magic, b"Redologs", b"Growing", BOCHS_V2),
            // strcmp: the magic must end where the text does.
            bochs_header(b"Bochs Virtual HD Images", b"Redolog", b"Growing", BOCHS_V2),
        ] {
            assert_eq!(probe(&header), Format::Raw);
        }
    }

    #[test]
    fn nothing_known_is_raw() {
        assert_eq!(probe(&[0u8; PROBE_BYTES]), Format::Raw);
        assert_eq!(probe(&[0xffu8; PROBE_BYTES]), Format::Raw);
        assert_eq!(probe(b"x"), Format::Raw);
    }

    #[test]
    fn bytes_past_the_first_sector_do_not_count() {
        let mut bytes = vec![0u8; 2048];
        bytes[PROBE_BYTES..PROBE_BYTES + 8].copy_from_slice(b"vhdxfile");
        assert_eq!(probe(&bytes), Format::Raw);
        bytes[..8].copy_from_slice(b"vhdxfile");
        assert_eq!(probe(&bytes), Format::Vhdx);
    }

    #[test]
    fn ties_go_to_the_driver_first_in_qemus_list() {
        // vdi's signature at 0x40 under headers recognised by their first bytes.
        let under = |parts: &[(usize, &[u8])]| {
            let mut all = parts.to_vec();
            all.push(VDI_SIGNATURE);
            probe(&sector_with(&all))
        };
        assert_eq!(
            under(&[(0, b"WithoutFreeSpace"), (16, &[2])]),
            Format::Parallels
        );
        assert_eq!(under(&[(0, b"vhdxfile")]), Format::Vhdx);
        assert_eq!(under(&[(0, b"KDMV")]), Format::Vmdk);
        assert_eq!(under(&[(0, b"# comment\nversion=1\n")]), Format::Vmdk);
        assert_eq!(under(&[(0, b"QED\0")]), Format::Qed);
        assert_eq!(under(&[(0, b"conectix")]), Format::Vpc);
        assert_eq!(under(&[(0, b"QFI\xfb\0\0\0\x01")]), Format::Vdi);
        assert_eq!(under(&[(0, b"QFI\xfb\0\0\0\x03")]), Format::Vdi);
        assert_eq!(under(&[(0, b"LUKS\xba\xbe\0\x01")]), Format::Vdi);
        // The two rules that score 2.
        assert_eq!(probe_named(CLOOP, "image.dmg"), Format::Dmg);
        assert_eq!(probe_named(CLOOP, "image.cloop"), Format::Cloop);
    }

    #[test]
    fn an_empty_file_is_raw_whatever_its_name() {
        assert_eq!(
            Format::probe_bytes(&[], Some(Path::new("disk.dmg"))),
            Format::Raw
        );
        assert_eq!(
            Format::probe_bytes(&[0], Some(Path::new("disk.dmg"))),
            Format::Dmg
        );
    }
}
