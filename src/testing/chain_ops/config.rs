//! The limits of the harness, and how the chain an input starts from (its first six
//! bytes) and each image in it are configured.
//!
//! Costs are bounded: at most 6 images of at most 2 MiB, 4 snapshots each, 32
//! operations of at most 384 KiB.

use crate::create::CreateOptions;
use crate::format::CompressionType;
use crate::layers::Format;
use crate::qcow2::Compat;

use super::reader::Reader;

/// At most this many operations run per input.
pub const MAX_OPS: usize = 32;
/// Snapshots an image may hold; creating more is skipped.
pub(super) const MAX_SNAPSHOTS: usize = 4;
/// The deepest chain the `Overlay` operation builds.
pub(super) const MAX_LAYERS: usize = 4;
/// Images the `Overlay` operation may create in all.
pub(super) const MAX_IMAGES: usize = 6;
/// The longest range of one operation.
pub(super) const MAX_LEN: u64 = 384 << 10;
/// Virtual sizes (multiples of 512; the first two end inside a 64 KiB cluster).
pub(super) const SIZES: [u64; 4] = [(256 << 10) + 1536, 512 << 10, (1 << 20) + 7 * 512, 2 << 20];
/// Cluster sizes.
const CLUSTERS: [u64; 4] = [512, 4096, 16384, 65536];
pub(super) const SECTOR: u64 = 512;

/// How one image is created: one byte of the input (bits 0-1 cluster size 512, 4k, 16k,
/// 64k; bit 2 version 2; bit 3 extended L2; bit 4 lazy refcounts; bits 5-7 refcount
/// width `1 << value` bits, 7 meaning 16). Combinations qemu-img refuses are normalized:
/// version 2 has 16-bit refcounts and neither extended L2 nor lazy refcounts; extended L2
/// needs 16 KiB clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Version 2 (compat 0.10).
    pub v2: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
}

impl LayerConfig {
    /// Decodes one byte (every byte is valid).
    pub fn decode(b: u8) -> LayerConfig {
        let cluster_size = CLUSTERS[usize::from(b & 3)];
        let v2 = b & 4 != 0;
        let order = u32::from(b >> 5);
        LayerConfig {
            cluster_size,
            v2,
            extended_l2: !v2 && b & 8 != 0 && cluster_size >= 16384,
            lazy_refcounts: !v2 && b & 16 != 0,
            refcount_bits: if v2 || order == 7 { 16 } else { 1 << order },
        }
    }

    /// The byte that decodes to this configuration.
    pub fn encode(&self) -> u8 {
        let cluster = CLUSTERS
            .iter()
            .position(|&c| c == self.cluster_size)
            .unwrap_or(0) as u8;
        let order = if self.refcount_bits == 16 {
            7
        } else {
            self.refcount_bits.trailing_zeros() as u8
        };
        cluster
            | u8::from(self.v2) << 2
            | u8::from(self.extended_l2) << 3
            | u8::from(self.lazy_refcounts) << 4
            | order << 5
    }

    pub(super) fn create_options(
        &self,
        size: u64,
        zstd: bool,
        backing: Option<&str>,
    ) -> CreateOptions {
        CreateOptions {
            size: Some(size),
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            compat: if self.v2 { Compat::V0_10 } else { Compat::V1_1 },
            extended_l2: self.extended_l2,
            lazy_refcounts: self.lazy_refcounts,
            compression_type: if zstd && !self.v2 {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            backing_file: backing.map(str::to_owned),
            backing_format: backing.map(|_| Format::Qcow2),
            open_backing: false,
            ..CreateOptions::default()
        }
    }
}

/// The chain an input starts from: its first six bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    /// Images in the chain, 1 to 3.
    pub depth: usize,
    /// Index into the virtual sizes (0..4).
    pub size_index: usize,
    /// The bottom layer (with depth 2 or 3) is about half as long as the others.
    pub short_bottom: bool,
    /// Images keep at most 4 L2 tables cached.
    pub small_cache: bool,
    /// Merges flush their destination every 64 KiB.
    pub small_checkpoints: bool,
    /// Version 3 images compress with zstd.
    pub zstd: bool,
    /// The images, bottom first (only the first `depth` are used).
    pub layers: [LayerConfig; 3],
    /// What the bottom and the middle layer hold (a bit per eighth of the layer).
    pub fills: [u8; 2],
}

impl OpsConfig {
    pub(super) fn decode(r: &mut Reader<'_>) -> OpsConfig {
        let b = r.u8();
        let layers = [
            LayerConfig::decode(r.u8()),
            LayerConfig::decode(r.u8()),
            LayerConfig::decode(r.u8()),
        ];
        OpsConfig {
            depth: 1 + usize::from(b & 3) % 3,
            size_index: usize::from(b >> 2 & 3),
            short_bottom: b & 0x10 != 0,
            small_cache: b & 0x20 != 0,
            small_checkpoints: b & 0x40 != 0,
            zstd: b & 0x80 != 0,
            layers,
            fills: [r.u8(), r.u8()],
        }
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(
            (self.depth as u8 - 1)
                | (self.size_index as u8) << 2
                | u8::from(self.short_bottom) << 4
                | u8::from(self.small_cache) << 5
                | u8::from(self.small_checkpoints) << 6
                | u8::from(self.zstd) << 7,
        );
        out.extend(self.layers.iter().map(LayerConfig::encode));
        out.extend(self.fills);
    }
}
