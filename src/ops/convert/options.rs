//! How to convert ([`ConvertOptions`]), and the checks both outputs make before they
//! create anything.

use std::path::Path;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::storage::FileCache;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Blocks of this many bytes (at guest offsets that are multiples of it) that hold
    /// only zeros are not written, leaving holes (qemu-img's `-S`, default 4 KiB). 0 writes
    /// every byte, zeros included: a fully allocated output.
    pub min_sparse: u64,
    /// Bytes of data read at a time (default 1 MiB). Each chunk is read into a buffer and
    /// written from it: a buffer that still sits in the CPU's caches when it is written
    /// halves the CPU time of a conversion compared with 4 MiB chunks (measured).
    pub chunk_size: usize,
    /// Store clusters compressed (qcow2 output only; qemu-img's `-c`).
    pub compress: bool,
    /// Threads compressing clusters; 0 (the default) uses every core.
    pub threads: usize,
    /// Flush the output to stable storage when done. Off by default, as qemu-img
    /// convert's default cache mode (`unsafe`) leaves it: the data is in the page cache
    /// and reaches the disk as the kernel writes it back.
    pub sync: bool,
    /// Carry the source image's persistent bitmaps over (qcow2 output; qemu-img's
    /// `--bitmaps`). A bitmap in use is refused unless `skip_broken_bitmaps`.
    pub bitmaps: bool,
    /// With `bitmaps`, leave out the bitmaps in use instead of refusing
    /// (`--skip-broken-bitmaps`).
    pub skip_broken_bitmaps: bool,
    /// Into an existing output ([`super::convert_into`]): the caller vouches that it
    /// reads as zeros, so zeros are not written (qemu-img's `--target-is-zero`).
    pub target_is_zero: bool,
    /// How the output file uses the page cache (qemu-img's `-t`): `direct` writes its
    /// aligned requests with `O_DIRECT`. Default: through the page cache.
    pub cache: FileCache,
    /// Copy offloading (qemu-img's `-C`): data ranges go to the output as storage copies
    /// (`copy_file_range` between host files: shared extents on XFS and Btrfs, a copy
    /// inside the kernel elsewhere), whole and unread, so zeros inside them are written
    /// as data, as qemu-img's copy range writes them. Not with `compress`; over a backing
    /// file (`-B`) the conversion reads and compares as without it.
    pub copy_offload: bool,
}

impl Default for ConvertOptions {
    fn default() -> ConvertOptions {
        ConvertOptions {
            min_sparse: 4096,
            chunk_size: 1 << 20,
            compress: false,
            threads: 0,
            sync: false,
            bitmaps: false,
            skip_broken_bitmaps: false,
            target_is_zero: false,
            cache: FileCache::default(),
            copy_offload: false,
        }
    }
}

impl ConvertOptions {
    /// Refuses a sparse size that is not a whole number of sectors, and copy offloading
    /// with compression (qemu-img's message).
    pub(super) fn check(&self) -> Result<()> {
        if self.copy_offload && self.compress {
            return Err(Error::InvalidArgument(
                "Cannot enable copy offloading when -c is used".into(),
            ));
        }
        if self.min_sparse % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "sparse size {} is not a multiple of 512",
                self.min_sparse
            )));
        }
        Ok(())
    }
}

/// Refuses a destination that is one of the source chain's files: creating it would
/// destroy the data being copied.
pub(super) fn refuse_overwriting_a_source(chain: &Chain, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(dst) else {
        return Ok(());
    };
    for layer in chain.layers() {
        let same = std::fs::metadata(layer.name())
            .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino());
        if same {
            return Err(Error::InvalidArgument(format!(
                "the destination is the source image {}",
                layer.name().display()
            ))
            .in_file(dst));
        }
    }
    Ok(())
}
