//! Operations over whole chains: map, checksum, compare, convert, info, measure, du, and the
//! merges (commit, pull, rebase), and trees of images (who uses whom as backing file).

mod bench;
mod checksum;
mod compare;
mod compress_pool;
mod convert;
mod du;
mod info;
mod map;
mod measure;
mod merge;
mod read_ahead;
mod tree;

pub use crate::progress::Progress;
pub use bench::{BenchOptions, BenchReport, bench};
pub use checksum::checksum;
pub use compare::{Comparison, compare};
pub use convert::{
    ConvertOptions, concatenate, convert, convert_concatenated, convert_into, convert_to_qcow2,
    convert_to_raw,
};
pub use du::{LayerSpace, SnapshotSpace, SpaceReport, du};
pub use info::{ImageInfo, Qcow2Info, SnapshotInfo, chain_info, foreign_info, info, open_info};
pub use map::{MapEntries, MapEntry, MapHints, map, map_range, map_range_with};
pub use measure::{Measurement, measure_chain, measure_size};
pub use merge::{
    CommitOptions, MergeOptions, MergeReport, RemoveMethod, RemoveOptions, RemoveReport,
    StorageCopy, commit, pull, rebase, remove,
};
pub use tree::{Forest, TreeImage, TreeOptions};
