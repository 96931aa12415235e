//! The layout of a fresh qcow2 image, as QEMU's `qemu-img create` lays it out:
//!
//! ```text
//! cluster 0              header, header extensions, backing file name
//! next                   refcount table (one cluster unless preallocation needs more)
//! next                   refcount blocks covering every cluster the image will use
//! next                   L1 table (the exact number of entries the virtual size needs)
//! then, if preallocated  per L1 entry: its L2 table, then the data clusters it maps
//! ```
//!
//! Every cluster written has refcount one and nothing else is counted, so `qemu-img check`
//! finds no leak. The header extensions are QEMU's: backing format, external data file
//! name, and the feature-name table (QEMU writes it only with clusters of 8 KiB or more).
//! Planning is pure; [`Layout::write`] writes the plan into one storage. Choosing the
//! options, opening a backing file and creating files is the work of
//! [`crate::create`](mod@crate::create).

use crate::error::{Error, Result};
use crate::format::{
    AutoclearFeatures, CompatibleFeatures, CompressionType, Geometry, Header, HeaderExtension,
    HeaderExtensions, IncompatibleFeatures, L1Entry, L2Entry, MAX_REFCOUNT_TABLE_BYTES,
    MIN_CLUSTER_FOR_FEATURE_TABLE, encode_u64_table, qemu_feature_names, refcounts_per_block,
    set_refcount,
};
use crate::storage::{Storage, write_zeros};

/// The largest virtual size QEMU accepts: `i64::MAX` rounded down to 1 GiB.
pub const MAX_VIRTUAL_SIZE: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// The qcow2 compatibility level (`compat=` in qemu-img).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// `0.10`: version 2 images, readable by very old QEMU; no v3 features.
    V0_10,
    /// `1.1`: version 3 images (the default).
    #[default]
    V1_1,
}

impl Compat {
    /// Parses qemu-img's names: `0.10`/`v2` and `1.1`/`v3`.
    pub fn from_name(name: &str) -> Result<Compat> {
        match name {
            "0.10" | "v2" => Ok(Compat::V0_10),
            "1.1" | "v3" => Ok(Compat::V1_1),
            other => Err(Error::InvalidArgument(format!(
                "compat {other:?} is not one of 0.10, 1.1, v2, v3"
            ))),
        }
    }
    /// The name qemu-img info shows (`0.10` or `1.1`).
    pub fn name(self) -> &'static str {
        match self {
            Compat::V0_10 => "0.10",
            Compat::V1_1 => "1.1",
        }
    }
    /// The header version.
    pub fn version(self) -> u32 {
        match self {
            Compat::V0_10 => 2,
            Compat::V1_1 => 3,
        }
    }
}

/// How much of the image to allocate up front (`preallocation=` in qemu-img).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1 table.
    #[default]
    Off,
    /// qcow2 only: every L2 table and data cluster is allocated and mapped, but the data
    /// clusters are left as holes in the file (its length covers them).
    Metadata,
    /// As `Metadata`, and the file system reserves the data clusters (`fallocate`). On a
    /// storage that cannot reserve space, zeros are written as with `Full`.
    Falloc,
    /// As `Metadata`, and zeros are written to every data cluster.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names: `off`, `metadata`, `falloc`, `full`.
    pub fn from_name(name: &str) -> Result<Preallocation> {
        Ok(match name {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "preallocation {other:?} is not one of off, metadata, falloc, full"
                )));
            }
        })
    }
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// The qcow2 choices of a new image, validated and settled (size, backing format) by the
/// caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayoutOptions<'a> {
    /// Virtual size in bytes, a multiple of 512.
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub compat: Compat,
    pub extended_l2: bool,
    pub lazy_refcounts: bool,
    pub compression_type: CompressionType,
    /// The external data file's name, as stored.
    pub data_file: Option<&'a str>,
    pub data_file_raw: bool,
    pub preallocation: Preallocation,
    /// The backing file's name, as stored, and its format's name.
    pub backing_file: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Where everything of a fresh qcow2 image goes, in clusters counted from the start.
#[derive(Debug)]
pub(crate) struct Layout {
    geometry: Geometry,
    header_cluster: Vec<u8>,
    refcount_order: u32,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
    l1_entries: u64,
    l1_clusters: u64,
    /// Whether L2 tables (and data clusters unless external) are allocated.
    preallocated: bool,
    pub(crate) external_data: bool,
    size: u64,
    /// Clusters with refcount one: all of them, from cluster 0.
    total_clusters: u64,
}

impl Layout {
    pub(crate) fn plan(options: &LayoutOptions<'_>) -> Result<Layout> {
        let cs = options.cluster_size;
        let geometry = Geometry::new(cs.trailing_zeros(), options.extended_l2);
        let size = options.size;
        let refcount_order = options.refcount_bits.trailing_zeros();
        let l1_entries = geometry.l1_entries_for(size).unwrap_or(u64::MAX);
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let preallocated = options.preallocation != Preallocation::Off;
        let external_data = options.data_file.is_some();
        let data_clusters = if preallocated && !external_data {
            geometry.clusters_for(size)
        } else {
            0
        };
        let l2_tables = if preallocated { l1_entries } else { 0 };
        let fixed = 1 + l1_clusters + l2_tables + data_clusters;
        let per_block = refcounts_per_block(geometry.cluster_bits(), refcount_order);
        let (mut table, mut blocks) = (1u64, 1u64);
        loop {
            let new_blocks = (fixed + table + blocks).div_ceil(per_block);
            let new_table = (new_blocks * 8).div_ceil(cs);
            if (new_blocks, new_table) == (blocks, table) {
                break;
            }
            (blocks, table) = (new_blocks, new_table);
        }
        if table * cs > MAX_REFCOUNT_TABLE_BYTES {
            return Err(invalid(format!(
                "preallocating {size} bytes needs a refcount table larger than QEMU's 8 MiB \
                 limit; use larger clusters or wider refcounts"
            )));
        }
        let mut layout = Layout {
            geometry,
            header_cluster: Vec::new(),
            refcount_order,
            refcount_table_clusters: table,
            refcount_blocks: blocks,
            l1_entries,
            l1_clusters,
            preallocated,
            external_data,
            size,
            total_clusters: fixed + table + blocks,
        };
        layout.header_cluster = layout.encode_header_cluster(options)?;
        Ok(layout)
    }

    fn cs(&self) -> u64 {
        self.geometry.cluster_size()
    }
    fn refcount_table_offset(&self) -> u64 {
        self.cs()
    }
    fn refcount_block_offset(&self, i: u64) -> u64 {
        (1 + self.refcount_table_clusters + i) * self.cs()
    }
    fn l1_offset(&self) -> u64 {
        if self.l1_entries == 0 {
            0
        } else {
            self.refcount_block_offset(self.refcount_blocks)
        }
    }
    /// The first cluster after the L1 table: where preallocated L2 tables start.
    fn after_l1(&self) -> u64 {
        (1 + self.refcount_table_clusters + self.refcount_blocks + self.l1_clusters) * self.cs()
    }
    pub(crate) fn first_data_cluster_offset(&self) -> u64 {
        self.after_l1() + self.cs()
    }
    /// The file's length: the end of the L1 table (or of the refcount blocks) without
    /// preallocation, as QEMU leaves it; every counted cluster with it.
    pub(crate) fn file_end(&self) -> u64 {
        if self.preallocated {
            self.total_clusters * self.cs()
        } else if self.l1_entries == 0 {
            self.refcount_block_offset(self.refcount_blocks)
        } else {
            self.l1_offset() + self.l1_entries * 8
        }
    }

    fn encode_header_cluster(&self, options: &LayoutOptions<'_>) -> Result<Vec<u8>> {
        let cs = self.cs();
        let mut header = Header::new_v3(self.geometry.cluster_bits(), self.size);
        header.l1_size = self.l1_entries as u32;
        header.l1_table_offset = self.l1_offset();
        header.refcount_table_offset = self.refcount_table_offset();
        header.refcount_table_clusters = self.refcount_table_clusters as u32;
        header.refcount_order = self.refcount_order;
        let mut extensions = Vec::new();
        if let (Some(_), Some(format)) = (options.backing_file, options.backing_format) {
            extensions.push(HeaderExtension::BackingFormat(format.to_owned()));
        }
        if options.compat == Compat::V0_10 {
            header.version = 2;
            header.header_length = 72;
            header.unknown_tail.clear();
        } else {
            let mut incompatible = IncompatibleFeatures::empty();
            if let Some(name) = options.data_file {
                incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
                extensions.push(HeaderExtension::DataFile(name.to_owned()));
            }
            if options.compression_type != CompressionType::Zlib {
                incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
            }
            if options.extended_l2 {
                incompatible |= IncompatibleFeatures::EXTENDED_L2;
            }
            header.incompatible_features = incompatible;
            header.compression_type = options.compression_type;
            if options.lazy_refcounts {
                header.compatible_features = CompatibleFeatures::LAZY_REFCOUNTS;
            }
            if options.data_file_raw {
                header.autoclear_features = AutoclearFeatures::DATA_FILE_RAW;
            }
        }
        let backing = options.backing_file;
        let encode = |header: &mut Header, exts: &[HeaderExtension]| {
            let list = HeaderExtensions {
                list: exts.to_vec(),
            };
            crate::format::encode_header_cluster(header, &list, backing, cs)
        };
        if options.compat == Compat::V1_1 && cs >= MIN_CLUSTER_FOR_FEATURE_TABLE {
            let mut with_table = extensions.clone();
            with_table.push(HeaderExtension::FeatureNames(qemu_feature_names()));
            if let Some(cluster) = encode(&mut header, &with_table) {
                return Ok(cluster);
            }
        }
        let cluster = encode(&mut header, &extensions).ok_or_else(|| {
            invalid(format!(
                "the header, its extensions and the backing file name do not fit in one \
                 {cs}-byte cluster; use larger clusters or shorter names"
            ))
        })?;
        Ok(cluster)
    }

    /// Writes the whole image into `storage`, which is truncated first. For
    /// `Falloc`, `falloc_done_by_caller` says whether the caller reserves the data
    /// clusters afterwards; otherwise zeros are written as for `Full`.
    pub(crate) fn write(
        &self,
        storage: &dyn Storage,
        mode: Preallocation,
        falloc_done_by_caller: bool,
    ) -> Result<()> {
        let cs = self.cs();
        let io = |what: &'static str, at: u64| {
            move |e| Error::io(format!("writing the {what} at {at:#x}"), e)
        };
        storage.set_len(0).map_err(|e| Error::io("truncating", e))?;
        storage
            .write_at(&self.header_cluster, 0)
            .map_err(io("header", 0))?;

        // Refcount table and blocks: clusters 0..total_clusters have refcount one.
        let table: Vec<u64> = (0..self.refcount_blocks)
            .map(|i| self.refcount_block_offset(i))
            .collect();
        let mut table_bytes = vec![0u8; (self.refcount_table_clusters * cs) as usize];
        encode_u64_table(&table, &mut table_bytes);
        let at = self.refcount_table_offset();
        storage
            .write_at(&table_bytes, at)
            .map_err(io("refcount table", at))?;
        let per_block = refcounts_per_block(self.geometry.cluster_bits(), self.refcount_order);
        let mut block = vec![0u8; cs as usize];
        for i in 0..self.refcount_blocks {
            block.fill(0);
            let first = i * per_block;
            let used = self.total_clusters.saturating_sub(first).min(per_block);
            for index in 0..used {
                set_refcount(&mut block, index as usize, self.refcount_order, 1);
            }
            let at = self.refcount_block_offset(i);
            storage
                .write_at(&block, at)
                .map_err(io("refcount block", at))?;
        }

        // L2 tables (each followed by the data clusters it maps) and the L1 table.
        let zero_data = mode == Preallocation::Full
            || (mode == Preallocation::Falloc && !falloc_done_by_caller);
        let mut l1 = vec![0u64; self.l1_entries as usize];
        if self.preallocated {
            let entries = self.geometry.l2_entries();
            let entry_bytes = self.geometry.l2_entry_bytes() as usize;
            let total_data = self.geometry.clusters_for(self.size);
            let mut cursor = self.after_l1();
            let mut l2 = vec![0u8; cs as usize];
            for (i, l1_entry) in l1.iter_mut().enumerate() {
                let l2_offset = cursor;
                cursor += cs;
                *l1_entry = L1Entry::new(l2_offset, true).0;
                l2.fill(0);
                let first_guest_cluster = i as u64 * entries;
                let count = (total_data - first_guest_cluster).min(entries);
                for j in 0..count {
                    let host = if self.external_data {
                        (first_guest_cluster + j) * cs
                    } else {
                        cursor + j * cs
                    };
                    let at = j as usize * entry_bytes;
                    l2[at..at + 8].copy_from_slice(&L2Entry::data(host, true).0.to_be_bytes());
                }
                storage
                    .write_at(&l2, l2_offset)
                    .map_err(io("L2 table", l2_offset))?;
                if !self.external_data {
                    if zero_data {
                        write_zeros(cursor, count * cs, |zeros, at| {
                            storage.write_at(zeros, at).map_err(io("zeros", at))
                        })?;
                    }
                    cursor += count * cs;
                }
            }
        }
        if self.l1_entries > 0 {
            let mut l1_bytes = vec![0u8; (self.l1_entries * 8) as usize];
            encode_u64_table(&l1, &mut l1_bytes);
            let at = self.l1_offset();
            storage
                .write_at(&l1_bytes, at)
                .map_err(io("L1 table", at))?;
        }
        storage
            .set_len(self.file_end())
            .map_err(|e| Error::io("setting the file length", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_structures_cover_themselves() {
        // 512-byte clusters with 64-bit refcounts: 64 clusters per block, so a 1 GiB image
        // (512 L1 clusters) needs several blocks.
        let options = LayoutOptions {
            size: 1 << 30,
            cluster_size: 512,
            refcount_bits: 64,
            compat: Compat::V1_1,
            extended_l2: false,
            lazy_refcounts: false,
            compression_type: CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
        };
        let layout = Layout::plan(&options).unwrap();
        let per_block = 512 * 8 / 64;
        assert!(layout.refcount_blocks * per_block >= layout.total_clusters);
        assert_eq!(
            layout.total_clusters,
            1 + layout.refcount_table_clusters + layout.refcount_blocks + layout.l1_clusters
        );
    }
}
