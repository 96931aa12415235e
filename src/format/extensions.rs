//! Header extensions (spec: "Header extensions"): what lies between the header and the
//! backing file name, and how the first cluster holds them.

use super::{
    AutoclearFeatures, FeatureKind, FeatureName, Header, MAX_BACKING_FORMAT_NAME,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAPS, MAX_DATA_FILE_NAME, MAX_HEADER_EXTENSIONS, be32, be64,
    put_be32, put_be64,
};
use crate::error::{Error, Result};

/// Extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Extension type: full disk encryption header pointer.
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// Extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Lays out the first cluster of an image: the header, its extensions, then the backing
/// file name (where QEMU puts it), setting `header.backing_file_offset`/`_size`. `None`
/// when they do not fit in `cluster_size` bytes.
pub fn encode_header_cluster(
    header: &mut Header,
    extensions: &HeaderExtensions,
    backing_file: Option<&str>,
    cluster_size: u64,
) -> Option<Vec<u8>> {
    let ext_bytes = extensions.encode();
    let ext_start = header.header_length as usize;
    let name = backing_file.unwrap_or("").as_bytes();
    let name_start = ext_start + ext_bytes.len();
    if (name_start + name.len()) as u64 > cluster_size {
        return None;
    }
    (header.backing_file_offset, header.backing_file_size) = if name.is_empty() {
        (0, 0)
    } else {
        (name_start as u64, name.len() as u32)
    };
    let mut cluster = vec![0u8; cluster_size as usize];
    header.encode(&mut cluster);
    cluster[ext_start..name_start].copy_from_slice(&ext_bytes);
    cluster[name_start..name_start + name.len()].copy_from_slice(name);
    Some(cluster)
}
/// The bitmaps extension (recognised and preserved; bitmaps are not interpreted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// One header extension, decoded where the crate knows its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Backing file format name.
    BackingFormat(String),
    /// Feature name table.
    FeatureNames(Vec<FeatureName>),
    /// Bitmaps.
    Bitmaps(BitmapsExtension),
    /// Full disk encryption header pointer: offset and length.
    Encryption {
        /// Offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// External data file name.
    DataFile(String),
    /// An extension of a type this crate does not know, kept as bytes.
    Unknown {
        /// The type code.
        kind: u32,
        /// Its data.
        data: Vec<u8>,
    },
}

/// All header extensions of an image, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderExtensions {
    /// The extensions, in the order they appear.
    pub list: Vec<HeaderExtension>,
}

fn ext_string(kind: &'static str, data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec())
        .map_err(|_| Error::invalid(kind, data.len() as u64, "name is not valid UTF-8"))
}

impl HeaderExtensions {
    /// Decodes the extension area `area`, which starts at file offset `start`
    /// (the header length) and ends where the backing file name or the first cluster does.
    ///
    /// The list ends at an end marker or at the end of the area (as QEMU reads it); an
    /// extension whose 8-byte header or data runs past the area is refused, and so is a
    /// list of more than [`MAX_HEADER_EXTENSIONS`].
    pub fn decode(area: &[u8], start: u64) -> Result<HeaderExtensions> {
        let mut list = Vec::new();
        let mut pos = 0usize;
        let mut seen = Vec::new();
        while pos < area.len() {
            let Some(head) = area.get(pos..pos + 8) else {
                // Fewer than 8 bytes left: zeros are a cut-off end marker (the area ends
                // where the file does), anything else an extension header cut in two.
                if area[pos..].iter().all(|&b| b == 0) {
                    break;
                }
                return Err(Error::invalid(
                    "header extension",
                    start + pos as u64,
                    "extension header runs past the end of the extension area",
                ));
            };
            let kind = be32(head, 0);
            let len = be32(head, 4) as usize;
            if kind == EXT_END {
                break;
            }
            if list.len() >= MAX_HEADER_EXTENSIONS {
                return Err(Error::invalid(
                    "header extension count",
                    list.len() as u64 + 1,
                    "more than 1024 header extensions",
                ));
            }
            let data_start = pos + 8;
            let data = area.get(data_start..data_start.saturating_add(len)).ok_or(
                Error::InvalidField {
                    field: "header extension length",
                    value: len as u64,
                    reason: "extension runs past the end of the extension area",
                },
            )?;
            if kind != EXT_FEATURE_TABLE && seen.contains(&kind) {
                return Err(Error::invalid(
                    "header extension type",
                    kind.into(),
                    "extension appears twice",
                ));
            }
            seen.push(kind);
            list.push(Self::decode_one(kind, data, start + data_start as u64)?);
            pos = data_start + len.div_ceil(8) * 8;
        }
        Ok(HeaderExtensions { list })
    }

    /// Checks the extensions against the header they belong to, with QEMU's limits: the
    /// bitmaps extension (which QEMU reads only while the autoclear bitmaps bit is set)
    /// must name 1 to 65535 bitmaps and a cluster-aligned directory of at most 64 MiB.
    pub fn validate(&self, header: &Header) -> Result<()> {
        let bitmaps_in_use = header
            .autoclear_features
            .contains(AutoclearFeatures::BITMAPS);
        for ext in &self.list {
            if let HeaderExtension::Bitmaps(b) = ext {
                if !bitmaps_in_use {
                    continue;
                }
                if b.nb_bitmaps == 0 || b.nb_bitmaps > MAX_BITMAPS {
                    return Err(Error::invalid(
                        "bitmaps extension nb_bitmaps",
                        b.nb_bitmaps.into(),
                        "must be 1 to 65535",
                    ));
                }
                if b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
                    return Err(Error::invalid(
                        "bitmap_directory_size",
                        b.directory_size,
                        "bitmap directory larger than QEMU's 64 MiB limit",
                    ));
                }
                if b.directory_offset % header.cluster_size() != 0 || b.directory_offset >= 1 << 56
                {
                    return Err(Error::invalid(
                        "bitmap_directory_offset",
                        b.directory_offset,
                        "not a cluster-aligned host offset",
                    ));
                }
            }
        }
        Ok(())
    }

    fn decode_one(kind: u32, data: &[u8], _at: u64) -> Result<HeaderExtension> {
        Ok(match kind {
            EXT_BACKING_FORMAT if data.len() > MAX_BACKING_FORMAT_NAME => {
                return Err(Error::invalid(
                    "backing format extension length",
                    data.len() as u64,
                    "backing format name longer than 15 bytes",
                ));
            }
            EXT_BACKING_FORMAT => {
                HeaderExtension::BackingFormat(ext_string("backing format", data)?)
            }
            EXT_DATA_FILE if data.len() > MAX_DATA_FILE_NAME || data.contains(&0) => {
                return Err(Error::invalid(
                    "data file name length",
                    data.len() as u64,
                    "data file name longer than 4096 bytes or holding a NUL byte",
                ));
            }
            EXT_DATA_FILE => HeaderExtension::DataFile(ext_string("data file name", data)?),
            EXT_FEATURE_TABLE => {
                let mut names = Vec::new();
                for entry in data.chunks_exact(48) {
                    let kind = match entry[0] {
                        0 => FeatureKind::Incompatible,
                        1 => FeatureKind::Compatible,
                        2 => FeatureKind::Autoclear,
                        _ => continue,
                    };
                    let raw = &entry[2..48];
                    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    names.push(FeatureName {
                        kind,
                        bit: entry[1],
                        name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                    });
                }
                HeaderExtension::FeatureNames(names)
            }
            EXT_BITMAPS if data.len() == 24 => HeaderExtension::Bitmaps(BitmapsExtension {
                nb_bitmaps: be32(data, 0),
                directory_size: be64(data, 8),
                directory_offset: be64(data, 16),
            }),
            EXT_ENCRYPTION if data.len() == 16 => HeaderExtension::Encryption {
                offset: be64(data, 0),
                length: be64(data, 8),
            },
            EXT_BITMAPS | EXT_ENCRYPTION => {
                return Err(Error::invalid(
                    "header extension length",
                    data.len() as u64,
                    "bitmaps extension must be 24 bytes, encryption extension 16",
                ));
            }
            other => HeaderExtension::Unknown {
                kind: other,
                data: data.to_vec(),
            },
        })
    }

    /// Encodes the extensions followed by the end marker.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ext in &self.list {
            let (kind, data): (u32, Vec<u8>) = match ext {
                HeaderExtension::BackingFormat(s) => (EXT_BACKING_FORMAT, s.as_bytes().to_vec()),
                HeaderExtension::DataFile(s) => (EXT_DATA_FILE, s.as_bytes().to_vec()),
                HeaderExtension::FeatureNames(names) => {
                    let mut d = vec![0u8; names.len() * 48];
                    for (entry, n) in d.chunks_exact_mut(48).zip(names) {
                        entry[0] = match n.kind {
                            FeatureKind::Incompatible => 0,
                            FeatureKind::Compatible => 1,
                            FeatureKind::Autoclear => 2,
                        };
                        entry[1] = n.bit;
                        let name = n.name.as_bytes();
                        let l = name.len().min(46);
                        entry[2..2 + l].copy_from_slice(&name[..l]);
                    }
                    (EXT_FEATURE_TABLE, d)
                }
                HeaderExtension::Bitmaps(b) => {
                    let mut d = vec![0u8; 24];
                    put_be32(&mut d, 0, b.nb_bitmaps);
                    put_be64(&mut d, 8, b.directory_size);
                    put_be64(&mut d, 16, b.directory_offset);
                    (EXT_BITMAPS, d)
                }
                HeaderExtension::Encryption { offset, length } => {
                    let mut d = vec![0u8; 16];
                    put_be64(&mut d, 0, *offset);
                    put_be64(&mut d, 8, *length);
                    (EXT_ENCRYPTION, d)
                }
                HeaderExtension::Unknown { kind, data } => (*kind, data.clone()),
            };
            let mut head = [0u8; 8];
            put_be32(&mut head, 0, kind);
            put_be32(&mut head, 4, data.len() as u32);
            out.extend_from_slice(&head);
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        out
    }

    /// The backing format name, if the extension is present.
    pub fn backing_format(&self) -> Option<&str> {
        self.list.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The external data file name, if the extension is present.
    pub fn data_file(&self) -> Option<&str> {
        self.list.iter().find_map(|e| match e {
            HeaderExtension::DataFile(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// The name the image gives a feature bit, if its feature table has one.
    pub fn feature_name(&self, kind: FeatureKind, bit: u32) -> Option<&str> {
        self.list.iter().find_map(|e| match e {
            HeaderExtension::FeatureNames(names) => names
                .iter()
                .find(|n| n.kind == kind && u32::from(n.bit) == bit)
                .map(|n| n.name.as_str()),
            _ => None,
        })
    }

    /// Whether the bitmaps extension is present.
    pub fn has_bitmaps(&self) -> bool {
        self.bitmaps().is_some()
    }

    /// The bitmaps extension, if present.
    pub fn bitmaps(&self) -> Option<BitmapsExtension> {
        self.list.iter().find_map(|e| match e {
            HeaderExtension::Bitmaps(b) => Some(*b),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header for checking extensions against: 64 KiB clusters, no autoclear bits.
    fn sample() -> Header {
        Header::new_v3(16, 1 << 30)
    }

    #[test]
    fn extensions_round_trip_and_unknown_ones_are_kept() {
        let exts = HeaderExtensions {
            list: vec![
                HeaderExtension::BackingFormat("qcow2".into()),
                HeaderExtension::Unknown {
                    kind: 0x1234,
                    data: vec![1, 2, 3],
                },
                HeaderExtension::FeatureNames(vec![FeatureName {
                    kind: FeatureKind::Incompatible,
                    bit: 0,
                    name: "dirty bit".into(),
                }]),
            ],
        };
        let bytes = exts.encode();
        assert_eq!(HeaderExtensions::decode(&bytes, 112).unwrap(), exts);
    }

    #[test]
    fn extension_running_past_its_area_is_refused() {
        let mut bytes = HeaderExtensions {
            list: vec![HeaderExtension::BackingFormat("raw".into())],
        }
        .encode();
        put_be32(&mut bytes, 4, 1000);
        assert!(HeaderExtensions::decode(&bytes, 112).is_err());
    }

    fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 8];
        put_be32(&mut out, 0, kind);
        put_be32(&mut out, 4, data.len() as u32);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(8) * 8, 0);
        out
    }

    #[test]
    fn extension_list_may_end_with_its_area_but_not_inside_an_extension_header() {
        // No end marker: the area ends right after the last extension (QEMU reads this).
        let area = ext(0x1234, b"abc");
        assert_eq!(HeaderExtensions::decode(&area, 112).unwrap().list.len(), 1);
        // A cut-off end marker (zeros) is an end too.
        let mut area = ext(0x1234, b"abc");
        area.extend_from_slice(&[0; 4]);
        assert!(HeaderExtensions::decode(&area, 112).is_ok());
        // Half an extension header is not.
        let mut area = ext(0x1234, b"abc");
        area.extend_from_slice(&[0x12, 0x34, 0, 0]);
        assert!(matches!(
            HeaderExtensions::decode(&area, 112),
            Err(Error::InvalidField {
                field: "header extension",
                ..
            })
        ));
    }

    #[test]
    fn more_than_1024_extensions_are_refused() {
        let many =
            |n: usize| -> Vec<u8> { (0..n as u32).flat_map(|k| ext(0x1000 + k, &[])).collect() };
        assert_eq!(
            HeaderExtensions::decode(&many(MAX_HEADER_EXTENSIONS), 112)
                .unwrap()
                .list
                .len(),
            MAX_HEADER_EXTENSIONS
        );
        assert!(matches!(
            HeaderExtensions::decode(&many(MAX_HEADER_EXTENSIONS + 1), 112),
            Err(Error::InvalidField {
                field: "header extension count",
                ..
            })
        ));
    }

    #[test]
    fn backing_format_longer_than_15_bytes_is_refused() {
        assert!(HeaderExtensions::decode(&ext(EXT_BACKING_FORMAT, &[b'q'; 15]), 112).is_ok());
        assert!(matches!(
            HeaderExtensions::decode(&ext(EXT_BACKING_FORMAT, &[b'q'; 16]), 112),
            Err(Error::InvalidField {
                field: "backing format extension length",
                ..
            })
        ));
    }

    #[test]
    fn data_file_names_over_4096_bytes_or_with_a_nul_are_refused() {
        assert!(HeaderExtensions::decode(&ext(EXT_DATA_FILE, &[b'd'; 4096]), 112).is_ok());
        for bad in [&[b'd'; 4097][..], b"data\0file"] {
            assert!(matches!(
                HeaderExtensions::decode(&ext(EXT_DATA_FILE, bad), 112),
                Err(Error::InvalidField {
                    field: "data file name length",
                    ..
                })
            ));
        }
    }

    #[test]
    fn an_extension_type_appearing_twice_is_refused() {
        let mut area = ext(EXT_BACKING_FORMAT, b"raw");
        area.extend(ext(EXT_BACKING_FORMAT, b"qcow2"));
        assert!(HeaderExtensions::decode(&area, 112).is_err());
    }

    #[test]
    fn bitmaps_extension_is_checked_against_qemu_limits_when_in_use() {
        let bitmaps = |nb: u32, size: u64, offset: u64| {
            let mut d = [0u8; 24];
            put_be32(&mut d, 0, nb);
            put_be64(&mut d, 8, size);
            put_be64(&mut d, 16, offset);
            HeaderExtensions::decode(&ext(EXT_BITMAPS, &d), 112).unwrap()
        };
        let mut in_use = sample();
        in_use.autoclear_features = AutoclearFeatures::BITMAPS;
        assert!(bitmaps(1, 4096, 0x50000).validate(&in_use).is_ok());
        for (nb, size, offset, field) in [
            (0, 4096, 0x50000, "bitmaps extension nb_bitmaps"),
            (65536, 4096, 0x50000, "bitmaps extension nb_bitmaps"),
            (
                1,
                MAX_BITMAP_DIRECTORY_BYTES + 1,
                0x50000,
                "bitmap_directory_size",
            ),
            (1, 4096, 0x50200, "bitmap_directory_offset"),
        ] {
            match bitmaps(nb, size, offset).validate(&in_use) {
                Err(Error::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
            // Without the autoclear bit QEMU ignores the extension.
            assert!(bitmaps(nb, size, offset).validate(&sample()).is_ok());
        }
        // Not 24 bytes long.
        assert!(HeaderExtensions::decode(&ext(EXT_BITMAPS, &[0; 32]), 112).is_err());
    }
}
