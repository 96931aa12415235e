//! Feature bits and their names (spec: "Header", bytes 72-95, and the feature name table
//! extension), and the compression type they gate.

use bitflags::bitflags;

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
    /// The compression_type header field's value.
    pub(crate) fn code(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }
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

/// The names QEMU puts in the feature-name table, in its order.
pub(crate) fn qemu_feature_names() -> Vec<FeatureName> {
    let names = [
        (FeatureKind::Incompatible, 0, "dirty bit"),
        (FeatureKind::Incompatible, 1, "corrupt bit"),
        (FeatureKind::Incompatible, 2, "external data file"),
        (FeatureKind::Incompatible, 3, "compression type"),
        (FeatureKind::Incompatible, 4, "extended L2 entries"),
        (FeatureKind::Compatible, 0, "lazy refcounts"),
        (FeatureKind::Autoclear, 0, "bitmaps"),
        (FeatureKind::Autoclear, 1, "raw external data"),
    ];
    names
        .iter()
        .map(|&(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_owned(),
        })
        .collect()
}

/// QEMU writes the feature-name table only into header clusters of at least 8 KiB.
pub(crate) const MIN_CLUSTER_FOR_FEATURE_TABLE: u64 = 8192;
