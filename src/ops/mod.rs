//! Operations over whole chains: map, checksum, compare, convert, info.

mod info;
mod map;

pub use info::{ImageInfo, Qcow2Info, SnapshotInfo, chain_info, info};
pub use map::{MapEntries, MapEntry, map, map_range};
