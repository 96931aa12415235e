//! Recognising images created with `preallocation=metadata`, as QEMU does.
//!
//! Such an image maps data clusters whose host ranges are holes in the file; QEMU only
//! looks at the file's holes under data clusters (to report them as zeros) when the image
//! looks preallocated this way, because asking the file system costs a system call per
//! extent. Its test: the clusters in use (non-zero refcount) reach the clusters the file
//! really occupies plus a margin of 10% (at least two clusters).

use crate::error::Result;
use crate::format;

use super::Image;

impl Image {
    /// Whether the image looks metadata-preallocated: the clusters with a non-zero
    /// refcount (among those the file's length covers) reach the clusters the file
    /// occupies on disk plus 10% (at least plus two), as QEMU counts. `false` when the storage
    /// cannot tell its allocated size.
    pub fn looks_metadata_preallocated(&self) -> Result<bool> {
        let Some(allocated) = self.allocated_size() else {
            return Ok(false);
        };
        self.count_in_use_above(allocated)
            .map_err(|e| self.name_error(e))
    }

    fn count_in_use_above(&self, allocated: u64) -> Result<bool> {
        let header = self.header();
        let cluster_size = self.cluster_size();
        let real_clusters = allocated / cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cluster_size);
        let order = header.refcount_order;
        let per_block = (cluster_size * 8) >> order;
        let table_entries = u64::from(header.refcount_table_clusters) * cluster_size / 8;
        let mut block: Option<(u64, Vec<u8>)> = None;
        let mut in_use = 0u64;
        let mut cluster = 0u64;
        while cluster < end_cluster && in_use < threshold {
            let table_index = cluster / per_block;
            if table_index >= table_entries {
                break;
            }
            if block.as_ref().is_none_or(|(i, _)| *i != table_index) {
                let at = header.refcount_table_offset + table_index * 8;
                let entry = format::be64(&self.read_metadata("refcount table", at, 8)?, 0);
                let offset = entry & !511;
                if offset == 0 {
                    // A missing refcount block: every cluster it would cover is free.
                    cluster = (table_index + 1) * per_block;
                    block = None;
                    continue;
                }
                let bytes = self.read_metadata("refcount block", offset, cluster_size)?;
                block = Some((table_index, bytes));
            }
            if let Some((_, bytes)) = &block {
                let index = (cluster % per_block) as usize;
                in_use += u64::from(format::get_refcount(bytes, index, order) != 0);
            }
            cluster += 1;
        }
        Ok(in_use >= threshold)
    }
}
