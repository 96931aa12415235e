//! L1 and L2 table entries (spec: "Cluster mapping", "Extended L2 Entries").

use super::Geometry;

/// Bits 9-55: a cluster-aligned host offset in L1 and standard L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (only meaningful in the active tables).
const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: reads as zeros (not with extended L2).
const ZERO: u64 = 1;

fn with_copied(raw: u64, copied: bool) -> u64 {
    if copied { raw | COPIED } else { raw & !COPIED }
}

/// A raw L1 table entry.
///
/// ```text
/// bits  0- 8  reserved (0)
/// bits  9-55  offset of the L2 table (cluster aligned); 0 = unallocated
/// bits 56-62  reserved (0)
/// bit     63  COPIED: the L2 table's refcount is exactly one
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at an L2 table at `offset`.
    pub fn new(l2_offset: u64, copied: bool) -> L1Entry {
        L1Entry((l2_offset & OFFSET_MASK) | if copied { COPIED } else { 0 })
    }
    /// The L2 table's offset, 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// The entry with the COPIED flag set or cleared, the rest as it was.
    pub fn with_copied(self, copied: bool) -> L1Entry {
        L1Entry(with_copied(self.0, copied))
    }
    /// Bits that must be zero but are not.
    pub fn reserved_bits(self) -> u64 {
        self.0 & !(OFFSET_MASK | COPIED)
    }
}

/// Where a compressed cluster's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host offset of the first compressed byte (not aligned).
    pub host_offset: u64,
    /// Bytes from `host_offset` to the end of the last 512-byte sector the data uses.
    pub len: u64,
}

/// What a (sub)cluster's L2 entry says, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterDescriptor {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
    },
    /// Data at a cluster-aligned host offset.
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// The COPIED flag (refcount exactly one).
        copied: bool,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// A raw L2 table entry (the first 64 bits of an extended entry).
///
/// ```text
/// bits  0-61  cluster descriptor
///             standard:   bit 0 zero flag (not with extended L2), bits 1-8 reserved,
///                         bits 9-55 host offset, bits 56-61 reserved
///             compressed: bits 0..x-1 host offset, bits x-61 additional 512-byte
///                         sectors, x = 62 - (cluster_bits - 8)
/// bit     62  compressed
/// bit     63  COPIED (refcount exactly one; never set on compressed clusters)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// The unallocated entry.
    pub const UNALLOCATED: L2Entry = L2Entry(0);

    /// A standard entry mapping `host`.
    pub fn data(host: u64, copied: bool) -> L2Entry {
        L2Entry((host & OFFSET_MASK) | if copied { COPIED } else { 0 })
    }
    /// A zero entry (v3 zero flag), optionally keeping a preallocated cluster.
    pub fn zero(host: Option<u64>, copied: bool) -> L2Entry {
        match host {
            Some(h) => L2Entry((h & OFFSET_MASK) | ZERO | if copied { COPIED } else { 0 }),
            None => L2Entry(ZERO),
        }
    }
    /// A compressed entry.
    pub fn compressed(geometry: Geometry, d: CompressedDescriptor) -> L2Entry {
        let shift = geometry.compressed_size_shift();
        let first_sector = d.host_offset & !511;
        let end = d.host_offset + d.len;
        let sectors = (end - first_sector).div_ceil(512);
        L2Entry(COMPRESSED | (sectors.saturating_sub(1) << shift) | d.host_offset)
    }
    /// The COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }
    /// The entry with the COPIED flag set or cleared, the rest as it was.
    pub fn with_copied(self, copied: bool) -> L2Entry {
        L2Entry(with_copied(self.0, copied))
    }
    /// The zero flag of a standard (not compressed) entry: bit 0, which only version 3
    /// images without extended L2 entries give that meaning.
    pub fn zero_flag(self) -> bool {
        !self.is_compressed() && self.0 & ZERO != 0
    }
    /// True for a compressed-cluster entry.
    pub fn is_compressed(self) -> bool {
        self.0 & COMPRESSED != 0
    }
    /// The host offset field of a standard entry.
    pub fn host_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Decodes the entry. `Err` carries a reason the entry is corrupt.
    pub fn decode(self, geometry: Geometry) -> Result<ClusterDescriptor, &'static str> {
        if self.is_compressed() {
            if geometry.extended_l2() && self.0 & COPIED != 0 {
                return Err("compressed cluster with the COPIED flag");
            }
            let shift = geometry.compressed_size_shift();
            let host_offset = self.0 & ((1u64 << shift) - 1);
            let sectors = ((self.0 & !(COPIED | COMPRESSED)) >> shift) + 1;
            let len = sectors * 512 - (host_offset & 511);
            // Bounds: the data lies past the header cluster and below the 56-bit limit of
            // host offsets (the offset field alone is wider for small clusters).
            if host_offset < geometry.cluster_size() {
                return Err("compressed cluster data inside the header cluster");
            }
            if host_offset + len > 1 << 56 {
                return Err("compressed cluster runs past the 56-bit host offset limit");
            }
            return Ok(ClusterDescriptor::Compressed(CompressedDescriptor {
                host_offset,
                len,
            }));
        }
        if self.0 & 0x3f00_0000_0000_01fe != 0 {
            return Err("reserved bits set in L2 entry");
        }
        let host = self.host_offset();
        if host & (geometry.cluster_size() - 1) != 0 {
            return Err("host offset not aligned to a cluster");
        }
        if self.0 & ZERO != 0 && !geometry.extended_l2() {
            return Ok(ClusterDescriptor::Zero {
                host: (host != 0).then_some(host),
            });
        }
        if host == 0 && !self.copied() {
            return Ok(ClusterDescriptor::Unallocated);
        }
        Ok(ClusterDescriptor::Data {
            host,
            copied: self.copied(),
        })
    }
}

/// The second 64 bits of an extended L2 entry: per-subcluster allocation and zero bits.
///
/// ```text
/// bits  0-31  subcluster x is allocated (reads data at host + x * subcluster_size)
/// bits 32-63  subcluster x - 32 reads as zeros
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Every subcluster allocated.
    pub const ALL_ALLOCATED: SubclusterBitmap = SubclusterBitmap(0xffff_ffff);
    /// Every subcluster reads as zeros.
    pub const ALL_ZERO: SubclusterBitmap = SubclusterBitmap(0xffff_ffff << 32);

    /// Whether subcluster `i` is allocated.
    pub fn allocated(self, i: u64) -> bool {
        self.0 >> i & 1 != 0
    }
    /// Whether subcluster `i` reads as zeros.
    pub fn zero(self, i: u64) -> bool {
        self.0 >> (32 + i) & 1 != 0
    }
    /// Whether any subcluster is allocated.
    pub fn any_allocated(self) -> bool {
        self.0 as u32 != 0
    }
    /// Subclusters marked both allocated and zero (a corruption), as a 32-bit mask.
    pub fn conflicting(self) -> u32 {
        (self.0 as u32) & ((self.0 >> 32) as u32)
    }
    /// Sets subcluster `i` to allocated / zero / unallocated.
    pub fn with(self, i: u64, allocated: bool, zero: bool) -> SubclusterBitmap {
        let cleared = self.0 & !(1 << i) & !(1 << (32 + i));
        SubclusterBitmap(cleared | (allocated as u64) << i | (zero as u64) << (32 + i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trips_through_an_entry() {
        let g = Geometry::new(16, false);
        let d = CompressedDescriptor {
            host_offset: 0x12_3456,
            len: 1024 - 0x56 + 2048,
        };
        let e = L2Entry::compressed(g, d);
        assert_eq!(e.decode(g), Ok(ClusterDescriptor::Compressed(d)));
    }

    #[test]
    fn unaligned_data_offset_is_corrupt() {
        let g = Geometry::new(16, false);
        assert!(L2Entry(0x8000_0000_0005_0200).decode(g).is_err());
    }

    #[test]
    fn zero_flag_is_ignored_with_extended_l2_only_as_reserved_zero() {
        let g = Geometry::new(16, false);
        assert_eq!(
            L2Entry(1).decode(g),
            Ok(ClusterDescriptor::Zero { host: None })
        );
    }

    #[test]
    fn copied_and_zero_flags_are_bits_63_and_0() {
        let e = L2Entry::data(0x50000, false);
        assert!(e.with_copied(true).copied() && e.with_copied(true).0 == 0x8000_0000_0005_0000);
        assert_eq!(e.with_copied(true).with_copied(false), e);
        assert_eq!(
            L1Entry::new(0x30000, true).with_copied(false),
            L1Entry(0x30000)
        );
        assert!(L2Entry::zero(None, false).zero_flag() && !e.zero_flag());
        // Bit 0 of a compressed entry is part of its host offset.
        let g = Geometry::new(16, false);
        let c = L2Entry::compressed(
            g,
            CompressedDescriptor {
                host_offset: 0x10001,
                len: 511,
            },
        );
        assert!(!c.zero_flag());
    }

    #[test]
    fn subcluster_bitmap_bits() {
        let b = SubclusterBitmap(0)
            .with(3, true, false)
            .with(4, false, true);
        assert!(b.allocated(3) && !b.zero(3));
        assert!(b.zero(4) && !b.allocated(4));
        assert_eq!(b.conflicting(), 0);
        assert_eq!(SubclusterBitmap(1 | 1 << 32).conflicting(), 1);
    }

    #[test]
    fn compressed_descriptor_must_lie_past_the_header_and_below_2_pow_56() {
        let g = Geometry::new(9, false);
        let d = |host_offset: u64, len: u64| {
            L2Entry::compressed(g, CompressedDescriptor { host_offset, len }).decode(g)
        };
        assert!(d(512, 512).is_ok());
        assert_eq!(
            d(100, 412),
            Err("compressed cluster data inside the header cluster")
        );
        assert_eq!(
            d((1 << 56) - 512, 1024),
            Err("compressed cluster runs past the 56-bit host offset limit")
        );
        assert!(d((1 << 56) - 512, 512).is_ok());
    }
}
