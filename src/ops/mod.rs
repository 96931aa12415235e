//! Operations over whole chains: map, checksum, compare, convert, info.

mod map;

pub use map::{MapEntries, MapEntry, map, map_range};
