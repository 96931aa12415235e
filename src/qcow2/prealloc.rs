//! Recognising images created with `preallocation=metadata`, as QEMU does.
//!
//! Such an image maps data clusters whose host ranges are holes in the file; QEMU only
//! looks at the file's holes under data clusters (to report them as zeros) when the image
//! looks preallocated this way, because asking the file system costs a system call per
//! extent. Its test: the clusters in use (non-zero refcount) reach the clusters the file
//! really occupies plus a margin of 10% (at least two clusters).

use crate::error::{Error, Result};

use super::image::Image;
use super::stored_refcounts::StoredRefcounts;

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
        let cluster_size = self.cluster_size();
        let real_clusters = allocated / cluster_size;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len().div_ceil(cluster_size);
        let mut stored = StoredRefcounts::new(self);
        let end = end_cluster.min(stored.covered());
        let mut in_use = 0u64;
        let mut cluster = 0u64;
        while cluster < end && in_use < threshold {
            let refcount = stored.get(cluster)?.ok_or_else(|| {
                Error::corrupt(
                    "refcount table",
                    self.header().refcount_table_offset,
                    format!("the refcount block of cluster {cluster} cannot be read"),
                )
            })?;
            in_use += u64::from(refcount != 0);
            cluster += 1;
        }
        Ok(in_use >= threshold)
    }
}
