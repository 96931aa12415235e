//! The qcow2 output of a conversion, opened alone and with flushes skipped.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chain::Chain;
use crate::create::{CreateOptions, data_file_path};
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::qcow2::{Image, ImageOptions};
use crate::storage::{Extent, FileCache, FileStorage, LockMode, Storage};

/// Opens the fresh output for writing, alone: every write covers whole clusters (or ends
/// at the image's end), or, for zeros written as data into clusters larger than a piece
/// of zeros, is completed by the next one; so copy-on-write never needs the backing file.
/// Its files (image, data file) are returned too, for the final flush.
///
/// The image sees storage whose flushes do nothing, as qemu-img convert's default cache
/// mode (`unsafe`) makes them: the write path's checkpoints flush between metadata steps
/// to stay crash-consistent, which buys nothing for an output that is useless until the
/// conversion has finished, and each flush would write back everything written so far.
pub(super) fn open_output(
    dst: &Path,
    options: &CreateOptions,
    cache: FileCache,
) -> Result<(Chain, Vec<OutputFile>)> {
    let open = |path: &Path| {
        let file = FileStorage::open_cached(path, true, cache)
            .map_err(|e| Error::io("opening", e).in_file(path))?;
        file.lock(LockMode::WRITE).map_err(|e| e.in_file(path))?;
        Ok::<_, Error>(Arc::new(file))
    };
    let mut files = vec![(dst.to_path_buf(), open(dst)?)];
    let data = match data_file_path(dst, options) {
        Some(path) => {
            let file = open(&path)?;
            files.push((path, file.clone()));
            Some(Box::new(Unsynced(file)) as Box<dyn Storage>)
        }
        None => None,
    };
    let image = Image::from_storage(
        Box::new(Unsynced(files[0].1.clone())),
        dst,
        &ImageOptions {
            l2_cache_bytes: 16 << 20,
            writable: true,
            ..ImageOptions::default()
        },
        data,
    )?;
    Ok((Chain::from_layers(vec![Layer::Qcow2(image)])?, files))
}

/// A file of the output (image or data file) and its path.
pub(super) type OutputFile = (PathBuf, Arc<FileStorage>);

/// A file whose flushes are skipped (see [`open_output`]).
struct Unsynced<S: ?Sized = FileStorage>(Arc<S>);

impl<S: Storage + ?Sized> Storage for Unsynced<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }
    /// The one method not forwarded: see [`open_output`].
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn copy_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.0.copy_from(src, src_offset, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.write_zeroes(offset, len)
    }
    fn as_file(&self) -> Option<&std::fs::File> {
        self.0.as_file()
    }
    fn lock(&self, mode: LockMode) -> Result<()> {
        self.0.lock(mode)
    }
    fn shares_extents_with(&self, src: &dyn Storage) -> bool {
        self.0.shares_extents_with(src)
    }
    fn start_writeback(&self, range: std::ops::Range<u64>) -> io::Result<()> {
        self.0.start_writeback(range)
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn is_empty(&self) -> io::Result<bool> {
        self.0.is_empty()
    }
    fn allocated_size(&self) -> Option<u64> {
        self.0.allocated_size()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        self.0.extent(offset, max_len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Unsynced;
    use crate::storage::recording::{Recording, call_every_method};

    #[test]
    fn unsynced_output_forwards_every_method_but_flush() {
        let file = Arc::new(Recording::from_bytes(vec![1; 16]));
        let methods = call_every_method(&Unsynced(Arc::clone(&file)));
        let calls = file.all_calls();
        assert_eq!(calls.get("flush"), None, "{calls:?}");
        assert_eq!(calls.len(), methods - 1, "{calls:?}");
    }
}
