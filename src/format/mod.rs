//! On-disk structures of qcow2 (`docs/interop/qcow2.rst` in QEMU): bytes to typed values
//! and back. Pure: no I/O, every field from an image validated at decode.

mod bitmap;
mod bytes;
mod entries;
mod extensions;
mod features;
mod geometry;
mod header;
mod limits;
mod refcount;
mod snapshot;

pub use bitmap::{
    BitmapDirectoryEntry, BitmapFlags, BitmapTableEntry, bitmap_table_size,
    decode_bitmap_directory, encode_bitmap_directory,
};
pub(crate) use bytes::{be16, be32, be64, is_zero, put_be16, put_be32, put_be64};
pub use bytes::{decode_u64_table, encode_u64_table};
pub use entries::{ClusterDescriptor, CompressedDescriptor, L1Entry, L2Entry, SubclusterBitmap};
pub use extensions::{
    BitmapsExtension, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_DATA_FILE, EXT_ENCRYPTION, EXT_END,
    EXT_FEATURE_TABLE, HeaderExtension, HeaderExtensions, encode_header_cluster,
};
pub use features::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, FeatureKind, FeatureName,
    IncompatibleFeatures,
};
pub(crate) use features::{MIN_CLUSTER_FOR_FEATURE_TABLE, qemu_feature_names};
pub use geometry::Geometry;
pub use header::{Header, QCOW2_MAGIC};
pub(crate) use limits::MAX_SNAPSHOT_NAME;
pub use limits::{
    BITMAP_GRANULARITY_BITS, MAX_BACKING_FILE_NAME, MAX_BACKING_FORMAT_NAME, MAX_BITMAP_DATA_BYTES,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_NAME, MAX_BITMAP_TABLE_ENTRIES, MAX_BITMAPS,
    MAX_CLUSTER_BITS, MAX_DATA_FILE_NAME, MAX_HEADER_EXTENSIONS, MAX_L1_BYTES,
    MAX_REFCOUNT_TABLE_BYTES, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES, MAX_SNAPSHOTS,
    MIN_CLUSTER_BITS,
};
pub use refcount::{get_refcount, max_refcount, refcounts_per_block, set_refcount};
pub use snapshot::{SnapshotEntry, SnapshotExtra, snapshot_table_len};
