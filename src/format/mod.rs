//! On-disk structures of qcow2 (`docs/interop/qcow2.rst` in QEMU): bytes to typed values
//! and back. Pure: no I/O, every field from an image validated at decode.

mod entries;
mod geometry;
mod header;
mod refcount;
mod snapshot;

pub use entries::{ClusterDescriptor, CompressedDescriptor, L1Entry, L2Entry, SubclusterBitmap};
pub use geometry::Geometry;
pub use header::{
    AutoclearFeatures, BitmapsExtension, CompatibleFeatures, CompressionType, EXT_BACKING_FORMAT,
    EXT_BITMAPS, EXT_DATA_FILE, EXT_ENCRYPTION, EXT_END, EXT_FEATURE_TABLE, FeatureKind,
    FeatureName, Header, HeaderExtension, HeaderExtensions, IncompatibleFeatures,
    MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME, MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAPS,
    MAX_CLUSTER_BITS, MAX_DATA_FILE_NAME, MAX_HEADER_EXTENSIONS, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, QCOW2_MAGIC, encode_header_cluster,
};
pub use refcount::{get_refcount, max_refcount, set_refcount};
pub use snapshot::{
    MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS, SnapshotEntry, SnapshotExtra,
    snapshot_table_len,
};

use byteorder::{BigEndian, ByteOrder};

/// Big-endian u16 at `at`; the caller has checked the length.
pub(crate) fn be16(buf: &[u8], at: usize) -> u16 {
    BigEndian::read_u16(&buf[at..at + 2])
}
/// Big-endian u32 at `at`; the caller has checked the length.
pub(crate) fn be32(buf: &[u8], at: usize) -> u32 {
    BigEndian::read_u32(&buf[at..at + 4])
}
/// Big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be64(buf: &[u8], at: usize) -> u64 {
    BigEndian::read_u64(&buf[at..at + 8])
}

/// Decodes a table of big-endian u64 entries (L1, L2, refcount table).
pub fn decode_u64_table(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(BigEndian::read_u64).collect()
}

/// Encodes a table of u64 entries as big-endian bytes.
pub fn encode_u64_table(entries: &[u64], out: &mut [u8]) {
    for (chunk, e) in out.chunks_exact_mut(8).zip(entries) {
        BigEndian::write_u64(chunk, *e);
    }
}
