//! The image header and its extensions (spec: "Header", "Header extensions").

use super::{be32, be64, put_be32, put_be64};
use crate::error::{Error, Result};
use bitflags::bitflags;

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster size QEMU accepts: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Longest backing format name QEMU reads from the backing format extension (it keeps the
/// name in a 16-byte buffer with its terminating NUL).
pub const MAX_BACKING_FORMAT_NAME: usize = 15;
/// Longest external data file name accepted: Linux's PATH_MAX (QEMU sets no limit; a
/// longer name could not be opened anyway).
pub const MAX_DATA_FILE_NAME: usize = 4096;
/// Most header extensions an image may have. QEMU sets no limit (the first cluster bounds
/// them at 262144); real images have a handful, and a bound keeps decoding cheap.
pub const MAX_HEADER_EXTENSIONS: usize = 1024;
/// QEMU's limit on the number of persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory: 1 KiB per bitmap.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;

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

/// Length of a version 2 header.
const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// Version 3 header with the compression type field and its padding, as QEMU writes it.
const V3_HEADER_LEN: u32 = 112;

bitflags! {
    /// Incompatible feature bits: an image with an unknown one must not be opened.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct IncompatibleFeatures: u64 {
        /// Refcounts may be inconsistent (lazy refcounts in use).
        const DIRTY = 1 << 0;
        /// Metadata may be corrupt; do not write.
        const CORRUPT = 1 << 1;
        /// Guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// The compression_type field is not zlib.
        const COMPRESSION_TYPE = 1 << 3;
        /// L2 entries have subcluster bitmaps.
        const EXTENDED_L2 = 1 << 4;
    }

    /// Compatible feature bits: unknown ones can be ignored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CompatibleFeatures: u64 {
        /// Refcount updates may be postponed while the dirty bit is set.
        const LAZY_REFCOUNTS = 1 << 0;
    }

    /// Autoclear feature bits: a writer that does not know one clears it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct AutoclearFeatures: u64 {
        /// The bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// The external data file is a consistent raw image by itself.
        const DATA_FILE_RAW = 1 << 1;
    }
}

impl IncompatibleFeatures {
    /// The bits this crate implements.
    pub const SUPPORTED: IncompatibleFeatures = IncompatibleFeatures::all();

    /// Human names of known bits, for messages.
    pub fn known_name(bit: u32) -> Option<&'static str> {
        Some(match bit {
            0 => "dirty bit",
            1 => "corrupt bit",
            2 => "external data file",
            3 => "compression type",
            4 => "extended L2 entries",
            _ => return None,
        })
    }
}

/// Algorithm used for compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it zlib).
    #[default]
    Zlib,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
    fn code(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
}

/// The fixed part of a qcow2 header, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored; 0 without backing file.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters used by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible features (unknown bits retained).
    pub incompatible_features: IncompatibleFeatures,
    /// Compatible features (unknown bits retained).
    pub compatible_features: CompatibleFeatures,
    /// Autoclear features (unknown bits retained).
    pub autoclear_features: AutoclearFeatures,
    /// refcount_bits = 1 << refcount_order (v2: 4).
    pub refcount_order: u32,
    /// Header length in bytes (v2: 72).
    pub header_length: u32,
    /// Compression type (zlib unless the field says otherwise).
    pub compression_type: CompressionType,
    /// Header bytes past the compression type field (padding and fields this crate does
    /// not know), kept so a rewrite preserves them.
    pub unknown_tail: Vec<u8>,
}

fn invalid(field: &'static str, value: u64, reason: &'static str) -> Error {
    Error::invalid(field, value, reason)
}

impl Header {
    /// A fresh version 3 header with QEMU's defaults for the given geometry.
    pub fn new_v3(cluster_bits: u32, size: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_tail: vec![0; 7],
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries are extended.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// Decodes and validates a header from the start of an image. `buf` must hold the
    /// whole header (`header_length` bytes); the first cluster is always enough.
    pub fn decode(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::Truncated {
                structure: "header",
                offset: 0,
                len: V2_HEADER_LEN as u64,
                file_len: buf.len() as u64,
            });
        }
        let magic = be32(buf, 0);
        if magic != QCOW2_MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                cluster_bits.into(),
                "cluster size must be 512 B to 2 MiB",
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            unknown_tail: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::Truncated {
                    structure: "header",
                    offset: 0,
                    len: V3_MIN_HEADER_LEN as u64,
                    file_len: buf.len() as u64,
                });
            }
            h.incompatible_features = IncompatibleFeatures::from_bits_retain(be64(buf, 72));
            h.compatible_features = CompatibleFeatures::from_bits_retain(be64(buf, 80));
            h.autoclear_features = AutoclearFeatures::from_bits_retain(be64(buf, 88));
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length % 8 != 0 {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "must be at least 104 and a multiple of 8",
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(invalid(
                    "header_length",
                    h.header_length.into(),
                    "header is larger than a cluster",
                ));
            }
            let hl = h.header_length as usize;
            if buf.len() < hl {
                return Err(Error::Truncated {
                    structure: "header",
                    offset: 0,
                    len: hl as u64,
                    file_len: buf.len() as u64,
                });
            }
            let compression_code = if hl > 104 { buf[104] } else { 0 };
            h.compression_type = match compression_code {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                other => {
                    return Err(invalid(
                        "compression_type",
                        other.into(),
                        "unknown compression type",
                    ));
                }
            };
            let flagged = h
                .incompatible_features
                .contains(IncompatibleFeatures::COMPRESSION_TYPE);
            if flagged != (compression_code != 0) {
                return Err(invalid(
                    "compression_type",
                    compression_code.into(),
                    "does not agree with the compression type feature bit",
                ));
            }
            if hl > 105 {
                h.unknown_tail = buf[105..hl].to_vec();
            }
        }
        h.validate()?;
        Ok(h)
    }

    /// Checks every field against the spec and QEMU's limits.
    fn validate(&self) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.refcount_order > 6 {
            return Err(invalid(
                "refcount_order",
                self.refcount_order.into(),
                "refcount width must be at most 64 bits",
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(invalid(
                "cluster_bits",
                self.cluster_bits.into(),
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_size > MAX_BACKING_FILE_NAME {
                return Err(invalid(
                    "backing_file_size",
                    self.backing_file_size.into(),
                    "backing file name longer than 1023 bytes",
                ));
            }
            let end = self
                .backing_file_offset
                .checked_add(self.backing_file_size.into());
            if end.is_none_or(|end| end > cluster_size) {
                return Err(invalid(
                    "backing_file_offset",
                    self.backing_file_offset,
                    "backing file name lies outside the first cluster",
                ));
            }
            if self.backing_file_offset < u64::from(self.header_length) {
                return Err(invalid(
                    "backing_file_offset",
                    self.backing_file_offset,
                    "backing file name overlaps the header",
                ));
            }
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table larger than QEMU's 32 MiB limit",
            ));
        }
        // QEMU's block layer keeps sizes in a signed 64-bit integer; in practice the L1
        // limit below bounds the size far lower (2 PiB with 64 KiB clusters).
        if self.size > i64::MAX as u64 {
            return Err(invalid(
                "size",
                self.size,
                "virtual size larger than QEMU's 2^63 - 1 bytes",
            ));
        }
        let geometry = super::Geometry::new(self.cluster_bits, self.extended_l2());
        let needed = geometry
            .l1_entries_for(self.size)
            .ok_or_else(|| invalid("size", self.size, "virtual size too large"))?;
        if needed > u64::from(self.l1_size) {
            return Err(invalid(
                "l1_size",
                self.l1_size.into(),
                "L1 table too small for the virtual size",
            ));
        }
        if u64::from(self.refcount_table_clusters) * cluster_size > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid(
                "refcount_table_clusters",
                self.refcount_table_clusters.into(),
                "refcount table larger than QEMU's 8 MiB limit",
            ));
        }
        if self.nb_snapshots > super::MAX_SNAPSHOTS {
            return Err(invalid(
                "nb_snapshots",
                self.nb_snapshots.into(),
                "more than 65536 snapshots",
            ));
        }
        for (field, value, used) in [
            ("l1_table_offset", self.l1_table_offset, self.l1_size != 0),
            (
                "refcount_table_offset",
                self.refcount_table_offset,
                self.refcount_table_clusters != 0,
            ),
            (
                "snapshots_offset",
                self.snapshots_offset,
                self.nb_snapshots != 0,
            ),
        ] {
            if value % cluster_size != 0 {
                return Err(invalid(field, value, "not aligned to a cluster"));
            }
            if value >= 1 << 56 {
                return Err(invalid(field, value, "beyond the 56-bit host offset limit"));
            }
            // The first cluster holds the header: no table can start there.
            if used && value == 0 {
                return Err(invalid(field, value, "table overlaps the header cluster"));
            }
        }
        if self.version == 2 && self.compression_type != CompressionType::Zlib {
            return Err(invalid("compression_type", 1, "version 2 images use zlib"));
        }
        Ok(())
    }

    /// Encodes the header into the start of `out` (at least `header_length` bytes).
    pub fn encode(&self, out: &mut [u8]) {
        put_be32(out, 0, QCOW2_MAGIC);
        put_be32(out, 4, self.version);
        put_be64(out, 8, self.backing_file_offset);
        put_be32(out, 16, self.backing_file_size);
        put_be32(out, 20, self.cluster_bits);
        put_be64(out, 24, self.size);
        put_be32(out, 32, self.crypt_method);
        put_be32(out, 36, self.l1_size);
        put_be64(out, 40, self.l1_table_offset);
        put_be64(out, 48, self.refcount_table_offset);
        put_be32(out, 56, self.refcount_table_clusters);
        put_be32(out, 60, self.nb_snapshots);
        put_be64(out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_be64(out, 72, self.incompatible_features.bits());
            put_be64(out, 80, self.compatible_features.bits());
            put_be64(out, 88, self.autoclear_features.bits());
            put_be32(out, 96, self.refcount_order);
            put_be32(out, 100, self.header_length);
            if self.header_length > 104 {
                out[104] = self.compression_type.code();
                let tail_end = (105 + self.unknown_tail.len()).min(self.header_length as usize);
                out[105..tail_end].copy_from_slice(&self.unknown_tail[..tail_end - 105]);
            }
        }
    }
}

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

/// Which feature bitmap a feature-name table entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// incompatible_features.
    Incompatible,
    /// compatible_features.
    Compatible,
    /// autoclear_features.
    Autoclear,
}

/// One entry of the feature-name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap.
    pub kind: FeatureKind,
    /// Bit number 0..=63.
    pub bit: u8,
    /// The name (at most 46 bytes).
    pub name: String,
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
        .map_err(|_| invalid(kind, data.len() as u64, "name is not valid UTF-8"))
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
                return Err(invalid(
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
                return Err(invalid(
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
                return Err(invalid(
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
                    return Err(invalid(
                        "bitmaps extension nb_bitmaps",
                        b.nb_bitmaps.into(),
                        "must be 1 to 65535",
                    ));
                }
                if b.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
                    return Err(invalid(
                        "bitmap_directory_size",
                        b.directory_size,
                        "bitmap directory larger than QEMU's 64 MiB limit",
                    ));
                }
                if b.directory_offset % header.cluster_size() != 0 || b.directory_offset >= 1 << 56
                {
                    return Err(invalid(
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
                return Err(invalid(
                    "backing format extension length",
                    data.len() as u64,
                    "backing format name longer than 15 bytes",
                ));
            }
            EXT_BACKING_FORMAT => {
                HeaderExtension::BackingFormat(ext_string("backing format", data)?)
            }
            EXT_DATA_FILE if data.len() > MAX_DATA_FILE_NAME || data.contains(&0) => {
                return Err(invalid(
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
                return Err(invalid(
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
        self.list
            .iter()
            .any(|e| matches!(e, HeaderExtension::Bitmaps(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new_v3(16, 1 << 30);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn v3_header_round_trips() {
        let h = sample();
        let mut buf = vec![0u8; 512];
        h.encode(&mut buf);
        assert_eq!(Header::decode(&buf).unwrap(), h);
    }

    #[test]
    fn too_small_l1_table_is_refused() {
        let mut h = sample();
        h.l1_size = 1;
        let mut buf = vec![0u8; 512];
        h.encode(&mut buf);
        assert!(matches!(
            Header::decode(&buf),
            Err(Error::InvalidField {
                field: "l1_size",
                ..
            })
        ));
    }

    #[test]
    fn cluster_bits_outside_qemu_limits_are_refused() {
        for bits in [8, 22, 63] {
            let mut buf = vec![0u8; 512];
            sample().encode(&mut buf);
            put_be32(&mut buf, 20, bits);
            assert!(Header::decode(&buf).is_err(), "cluster_bits {bits}");
        }
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

    /// Encodes `h`, lets `patch` damage the bytes, and returns the field decoding blames.
    fn refused_field(h: &Header, patch: impl FnOnce(&mut [u8])) -> &'static str {
        let mut buf = vec![0u8; 4096];
        h.encode(&mut buf);
        patch(&mut buf);
        match Header::decode(&buf) {
            Err(Error::InvalidField { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    fn with(f: impl FnOnce(&mut Header)) -> Header {
        let mut h = sample();
        f(&mut h);
        h
    }

    #[test]
    fn header_length_must_be_at_least_104_a_multiple_of_8_and_inside_the_first_cluster() {
        for bad in [0, 72, 96, 100, 108, 113] {
            let h = with(|h| h.header_length = bad);
            assert_eq!(refused_field(&h, |_| ()), "header_length", "{bad}");
        }
        // 512-byte clusters: a 520-byte header does not fit.
        let h = with(|h| {
            h.cluster_bits = 9;
            h.l1_size = 1 << 15;
            h.l1_table_offset = 0x600;
            h.refcount_table_offset = 0x200;
            h.header_length = 520;
        });
        assert_eq!(refused_field(&h, |_| ()), "header_length");
        assert!(
            Header::decode(&{
                let mut b = vec![0u8; 4096];
                with(|h| h.header_length = 104).encode(&mut b);
                b
            })
            .is_ok()
        );
    }

    #[test]
    fn refcount_order_above_6_is_refused() {
        let h = with(|h| h.refcount_order = 7);
        assert_eq!(refused_field(&h, |_| ()), "refcount_order");
    }

    #[test]
    fn backing_file_name_limits() {
        // Longer than 1023 bytes.
        let h = with(|h| {
            h.backing_file_offset = 512;
            h.backing_file_size = 1024;
        });
        assert_eq!(refused_field(&h, |_| ()), "backing_file_size");
        // Past the first cluster.
        let h = with(|h| {
            h.backing_file_offset = 65536 - 10;
            h.backing_file_size = 11;
        });
        assert_eq!(refused_field(&h, |_| ()), "backing_file_offset");
        let h = with(|h| {
            h.backing_file_offset = u64::MAX - 2;
            h.backing_file_size = 10;
        });
        assert_eq!(refused_field(&h, |_| ()), "backing_file_offset");
        // Inside the header.
        let h = with(|h| {
            h.backing_file_offset = 64;
            h.backing_file_size = 10;
        });
        assert_eq!(refused_field(&h, |_| ()), "backing_file_offset");
        // At most 1023 bytes, right after the header: fine.
        let mut buf = vec![0u8; 4096];
        with(|h| {
            h.backing_file_offset = 112;
            h.backing_file_size = 1023;
        })
        .encode(&mut buf);
        assert!(Header::decode(&buf).is_ok());
    }

    #[test]
    fn l1_table_larger_than_32_mib_is_refused() {
        let h = with(|h| h.l1_size = (MAX_L1_BYTES / 8 + 1) as u32);
        assert_eq!(refused_field(&h, |_| ()), "l1_size");
        let mut buf = vec![0u8; 4096];
        with(|h| h.l1_size = (MAX_L1_BYTES / 8) as u32).encode(&mut buf);
        assert!(Header::decode(&buf).is_ok());
    }

    #[test]
    fn virtual_size_must_fit_the_l1_table_and_qemu_limits() {
        // The largest size a full L1 table maps with 64 KiB clusters: 2 PiB.
        let full = (MAX_L1_BYTES / 8) as u32;
        let mut buf = vec![0u8; 4096];
        let h = with(|h| {
            h.l1_size = full;
            h.size = u64::from(full) << 29;
        });
        h.encode(&mut buf);
        assert!(Header::decode(&buf).is_ok());
        // One byte more needs a 4M+1st entry.
        let h = with(|h| {
            h.l1_size = full;
            h.size = (u64::from(full) << 29) + 1;
        });
        assert_eq!(refused_field(&h, |_| ()), "l1_size");
        for size in [i64::MAX as u64 + 1, u64::MAX] {
            let h = with(|h| {
                h.l1_size = full;
                h.size = size;
            });
            assert_eq!(refused_field(&h, |_| ()), "size", "{size:#x}");
        }
    }

    #[test]
    fn refcount_table_larger_than_8_mib_is_refused() {
        let h = with(|h| h.refcount_table_clusters = 129);
        assert_eq!(refused_field(&h, |_| ()), "refcount_table_clusters");
        let mut buf = vec![0u8; 4096];
        with(|h| h.refcount_table_clusters = 128).encode(&mut buf);
        assert!(Header::decode(&buf).is_ok());
    }

    #[test]
    fn table_offsets_must_be_aligned_below_2_pow_56_and_past_the_header() {
        for (field, set) in [
            (
                "l1_table_offset",
                (|h, v| h.l1_table_offset = v) as fn(&mut Header, u64),
            ),
            ("refcount_table_offset", |h, v| h.refcount_table_offset = v),
            ("snapshots_offset", |h, v| {
                h.nb_snapshots = 1;
                h.snapshots_offset = v
            }),
        ] {
            for bad in [0x10200, 1 << 56, 0] {
                let h = with(|h| set(h, bad));
                assert_eq!(refused_field(&h, |_| ()), field, "{field} {bad:#x}");
            }
        }
        // Offset 0 is fine for a table that is not there.
        let mut buf = vec![0u8; 4096];
        with(|h| {
            h.l1_size = 0;
            h.l1_table_offset = 0;
            h.size = 0;
        })
        .encode(&mut buf);
        assert!(Header::decode(&buf).is_ok());
    }

    #[test]
    fn more_than_65536_snapshots_are_refused() {
        let h = with(|h| {
            h.nb_snapshots = 65537;
            h.snapshots_offset = 0x40000;
        });
        assert_eq!(refused_field(&h, |_| ()), "nb_snapshots");
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
        let in_use = with(|h| h.autoclear_features = AutoclearFeatures::BITMAPS);
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
