//! The image header (spec: "Header").

use super::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Geometry, IncompatibleFeatures,
    MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS, be32, be64, put_be32, put_be64,
};
use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Length of a version 2 header.
const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// Version 3 header with the compression type field and its padding, as QEMU writes it.
const V3_HEADER_LEN: u32 = 112;
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
        let geometry = Geometry::new(self.cluster_bits, self.extended_l2());
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
        if self.nb_snapshots > MAX_SNAPSHOTS {
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
}
