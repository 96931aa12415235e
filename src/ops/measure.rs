//! How large a new image would be: `qemu-img measure`.
//!
//! For qcow2 output QEMU's answer is a formula, matched here number for number:
//!
//! - **fully allocated**: the virtual size rounded up to the output cluster size, plus
//!   metadata for a fully allocated image: one header cluster, every L2 table the size
//!   needs, an L1 table rounded up to whole clusters, and the refcount blocks and table
//!   that count all of those clusters and themselves (the smallest fixed point).
//! - **required**: the same metadata, plus only the data clusters that hold data: for a
//!   size, none; for an image, every output cluster that contains a byte the chain maps
//!   as data which does not read as zeros (zero clusters, unallocated ranges and holes of
//!   metadata-preallocated images cost nothing). With a `backing_file` in the output
//!   options, QEMU cannot know what the backing file shares and counts every cluster of
//!   an image (not of a bare size). With `preallocation=falloc|full` every cluster is
//!   required; `metadata` changes nothing.
//! - **bitmaps**: only for an image measured into compat 1.1 whose top layer is a qcow2
//!   version 3 image: the persistent bitmaps it would carry over (their data and table
//!   clusters, plus the directory), 0 without bitmaps.
//!
//! For raw output both sizes are the size (rounded up to 512 bytes for a given size).

use crate::chain::Chain;
use crate::create::CreateOptions;
use crate::error::Result;
use crate::layers::{Format, Layer};
use crate::qcow2::{Compat, Image, Preallocation};

use super::map;

/// What `qemu-img measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the given content.
    pub required: u64,
    /// Bytes the new image needs when every cluster is allocated.
    pub fully_allocated: u64,
    /// Bytes persistent bitmaps would add, when QEMU reports them.
    pub bitmaps: Option<u64>,
}

/// Measures a new, empty image of `size` bytes with `options` (the output format and its
/// qcow2 options; `options.size` is ignored).
pub fn measure_size(size: u64, options: &CreateOptions) -> Result<Measurement> {
    check_options(options, size)?;
    match options.format {
        Format::Raw => {
            let size = size.div_ceil(512) * 512;
            Ok(Measurement {
                required: size,
                fully_allocated: size,
                bitmaps: None,
            })
        }
        Format::Qcow2 => {
            let virtual_size = size.div_ceil(options.cluster_size) * options.cluster_size;
            let full = fully_allocated_qcow2(virtual_size, options);
            // A backing file changes nothing here: there is no content to share.
            let required_data = if allocates_data(options) {
                virtual_size
            } else {
                0
            };
            Ok(Measurement {
                required: full - virtual_size + required_data,
                fully_allocated: full,
                bitmaps: None,
            })
        }
        other => Err(other.not_supported()),
    }
}

/// Measures a new image holding what `chain` shows, with `options` (the output format and
/// its qcow2 options; `options.size` is ignored).
pub fn measure_chain(chain: &Chain, options: &CreateOptions) -> Result<Measurement> {
    let size = chain.size();
    check_options(options, size)?;
    if options.format == Format::Raw {
        return Ok(Measurement {
            required: size,
            fully_allocated: size,
            bitmaps: None,
        });
    }
    let cs = options.cluster_size;
    let virtual_size = size.div_ceil(cs) * cs;
    let required_data = if options.backing_file.is_some() || allocates_data(options) {
        virtual_size
    } else {
        data_clusters(chain, cs)? * cs
    };
    let full = fully_allocated_qcow2(virtual_size, options);
    let bitmaps = match chain.top() {
        Layer::Qcow2(image) if options.compat == Compat::V1_1 && image.header().version >= 3 => {
            Some(bitmaps_size(image, size, cs)?)
        }
        _ => None,
    };
    Ok(Measurement {
        required: full - virtual_size + required_data,
        fully_allocated: full,
        bitmaps,
    })
}

/// The checks qemu-img measure makes of the output options: cluster size, refcount width
/// (16 bits with compat 0.10), extended L2 cluster size, and a size whose L1 table fits.
/// Options that only matter at creation (lazy refcounts, data file) are not checked.
fn check_options(options: &CreateOptions, size: u64) -> Result<()> {
    match options.format {
        Format::Raw => return Ok(()),
        Format::Qcow2 => {}
        other => return Err(other.not_supported()),
    }
    let checked = CreateOptions {
        size: Some(size),
        lazy_refcounts: false,
        compression_type: Default::default(),
        data_file: None,
        data_file_raw: false,
        preallocation: Preallocation::Off,
        backing_file: None,
        backing_format: None,
        ..options.clone()
    };
    checked.validate()
}

/// Whether the output preallocation makes every data cluster required.
fn allocates_data(options: &CreateOptions) -> bool {
    matches!(
        options.preallocation,
        Preallocation::Falloc | Preallocation::Full
    )
}

/// Output clusters (of `cs` bytes) holding at least one byte of data that does not read as
/// zeros, through the whole chain.
fn data_clusters(chain: &Chain, cs: u64) -> Result<u64> {
    let mut count = 0;
    // The first cluster not yet counted.
    let mut next = 0u64;
    for entry in map(chain) {
        let e = entry?;
        if !e.data || e.zero || e.end() <= next {
            continue;
        }
        let first = e.start.max(next) / cs;
        let end = e.end().div_ceil(cs);
        count += end - first;
        next = end * cs;
    }
    Ok(count)
}

/// QEMU's size of a fully allocated qcow2 image of `virtual_size` (a multiple of the
/// cluster size) bytes.
fn fully_allocated_qcow2(virtual_size: u64, options: &CreateOptions) -> u64 {
    let cs = options.cluster_size;
    let l2_entry = if options.extended_l2 { 16 } else { 8 };
    let entries_per_l2 = cs / l2_entry;
    // Header.
    let mut meta = cs;
    // L2 tables: one entry per cluster, in whole tables.
    let l2_entries = (virtual_size / cs).div_ceil(entries_per_l2) * entries_per_l2;
    meta += l2_entries * l2_entry;
    // L1 table: one entry per L2 table, in whole clusters.
    let l1_entries = (l2_entries / entries_per_l2).div_ceil(cs / 8) * (cs / 8);
    meta += l1_entries * 8;
    // Refcount blocks and table for everything, themselves included.
    let clusters = (meta + virtual_size) / cs;
    meta += refcount_metadata_clusters(clusters, cs, options.refcount_bits) * cs;
    meta + virtual_size
}

/// Refcount blocks plus refcount table clusters that count `clusters` other clusters and
/// themselves: the smallest fixed point, as QEMU computes it.
fn refcount_metadata_clusters(clusters: u64, cs: u64, refcount_bits: u32) -> u64 {
    let per_block = cs * 8 / u64::from(refcount_bits);
    let blocks_per_table_cluster = cs / 8;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let new_blocks = (clusters + table + blocks).div_ceil(per_block);
        let new_table = new_blocks.div_ceil(blocks_per_table_cluster);
        if new_blocks == blocks && new_table == table {
            return blocks + table;
        }
        (blocks, table) = (new_blocks, new_table);
    }
}

/// Bytes QEMU reserves for carrying the persistent bitmaps of `image` (virtual size
/// `size`) into an image with `cs`-byte clusters: each bitmap's data and table clusters,
/// and the directory in whole clusters.
fn bitmaps_size(image: &Image, size: u64, cs: u64) -> Result<u64> {
    let entries = image.bitmap_directory()?;
    let mut total = 0u64;
    let mut dir_size = 0u64;
    for entry in entries {
        let bits = size.div_ceil(entry.granularity());
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs + (clusters * 8).div_ceil(cs) * cs;
        dir_size += entry.encoded_len() as u64;
    }
    Ok(total + dir_size.div_ceil(cs) * cs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gib_with_defaults_matches_qemu() {
        let m = measure_size(1 << 30, &CreateOptions::default()).unwrap();
        assert_eq!(m.required, 393216);
        assert_eq!(m.fully_allocated, 1074135040);
    }

    #[test]
    fn raw_output_is_the_size_in_sectors() {
        let m = measure_size(1000, &CreateOptions::raw(0)).unwrap();
        assert_eq!((m.required, m.fully_allocated), (1024, 1024));
    }
}
