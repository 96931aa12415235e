//! The limits on what an image may hold, in one place: QEMU's wherever they are tighter
//! than the spec's (an image QEMU refuses is refused here too). Decoders check every field
//! against them and name the field they refuse.

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
/// QEMU's limit on the entries of one bitmap table.
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 0x800_0000;
/// QEMU's limit on the data clusters of one bitmap (its table's entries times the cluster
/// size): 512 MiB, the memory QEMU lets a bitmap take.
pub const MAX_BITMAP_DATA_BYTES: u64 = 512 << 20;
/// The granularities QEMU supports: 512 bytes to 2 GiB per bit (the spec allows 0 to 63).
pub const BITMAP_GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// The longest bitmap name QEMU supports.
pub const MAX_BITMAP_NAME: usize = 1023;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on a snapshot entry's extra data.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// QEMU's limit on the snapshot table: 1 KiB per snapshot on average, 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// The longest snapshot name QEMU keeps (in a 256-byte buffer; it cuts longer ones).
pub(crate) const MAX_SNAPSHOT_NAME: usize = 255;
