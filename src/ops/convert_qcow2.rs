//! Converting a chain's guest content to a new qcow2 image.
//!
//! The destination is created with [`CreateOptions`], then filled cluster by cluster in
//! guest order (see [`convert_to_qcow2`]):
//!
//! | source reads | without a backing file | with a backing file |
//! |---|---|---|
//! | what the backing file reads | — | left unallocated |
//! | zeros | left unallocated (`-S 0`: written) | zero cluster (`-S 0`: zeros written) |
//! | data | written (compressed with `-c`) | written (compressed with `-c`) |
//!
//! Source ranges that read as zeros by their mapping are never read; data is read in large
//! windows on a reader thread, written in large requests, and with compression the
//! clusters are compressed on every core and stored in guest order.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions};
use crate::create::{CreateOptions, create, data_file_path};
use crate::error::{Error, Result};
use crate::layers::{Format, Layer};
use crate::names::resolve_relative;
use crate::progress::{Progress, Tracker};
use crate::qcow2::{Compat, Image, ImageOptions};
use crate::storage::{Extent, FileStorage, Storage};

use super::compress_pool::{CompressPool, Compressed};
use super::convert::{ConvertOptions, is_zero};
use super::windows::{Piece, Windows, for_each_window};

/// What to do with a range of output clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Leave unallocated: it already reads right.
    Skip,
    /// Make it read as zeros over a backing file that does not.
    Zero,
    /// Write the source's bytes.
    Data,
}

/// Creates `dst` as a qcow2 image with `create` (its `size` is replaced by the source's
/// virtual size; `backing_file`/`backing_format` make it an overlay that holds only what
/// differs from that backing file) and copies `chain`'s guest content into it.
///
/// - Ranges that read as zeros are left unallocated; with a backing file they become zero
///   clusters where the backing file reads something else (written zeros with compat 0.10).
/// - Blocks of [`ConvertOptions::min_sparse`] bytes (rounded up to whole clusters) that
///   hold only zeros are not written; `min_sparse == 0` writes every cluster, zeros
///   included: a fully allocated image (over a backing file: every differing cluster as
///   data).
/// - With a backing file, clusters whose content equals the backing file's are left
///   unallocated: the output plus its backing file reads exactly as the source.
/// - [`ConvertOptions::compress`] stores clusters compressed with `create.compression_type`,
///   compressed on [`ConvertOptions::threads`] threads; clusters that do not shrink are
///   written uncompressed, as QEMU does.
///
/// `progress(done, total)` is called as guest bytes are handled; returning `false` cancels
/// with [`Error::Cancelled`] (the destination is left as far as it got).
pub fn convert_to_qcow2(
    chain: &Chain,
    dst: impl AsRef<Path>,
    create_options: &CreateOptions,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let dst = dst.as_ref();
    if options.min_sparse % 512 != 0 {
        return Err(Error::InvalidArgument(format!(
            "sparse size {} is not a multiple of 512",
            options.min_sparse
        )));
    }
    let mut create_options = CreateOptions {
        format: Format::Qcow2,
        size: Some(chain.size()),
        ..create_options.clone()
    };
    if options.compress && create_options.data_file.is_some() {
        return Err(Error::Unsupported(
            "compressed clusters in an image with an external data file",
        )
        .in_file(dst));
    }
    if create_options.backing_file.is_some() {
        create_options.open_backing = true;
    }
    create_options.validate().map_err(|e| e.in_file(dst))?;
    refuse_overwriting_a_source(chain, dst)?;
    create(dst, &create_options)?;
    let (out, files) = open_output(dst, &create_options)?;
    let base = match &create_options.backing_file {
        Some(name) => Some(Chain::open_with(
            resolve_relative(dst, name),
            &ChainOptions {
                format: create_options.backing_format,
                ..ChainOptions::default()
            },
        )?),
        None => None,
    };
    let copy = Copy {
        out: &out,
        has_base: base.is_some(),
        min_sparse: options.min_sparse,
        version3: create_options.compat == Compat::V1_1,
        cluster_size: create_options.cluster_size,
        zeros: vec![
            0u8;
            options
                .chunk_size
                .max(1 << 20)
                .max(create_options.cluster_size as usize)
        ],
    };
    let cs = create_options.cluster_size;
    // The unit of the "is this block all zeros" decision: whole clusters, or -S blocks
    // rounded up to whole clusters. Over a backing file, clusters are compared one by one.
    let unit = if base.is_some() || options.min_sparse <= cs {
        cs
    } else {
        options.min_sparse.div_ceil(cs) * cs
    };
    let cut = Windows {
        window: (options.chunk_size as u64).max(unit),
        align: unit,
    };
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut tracker = Tracker::new(progress, chain.size());
    std::thread::scope(|scope| -> Result<()> {
        let mut pool = options.compress.then(|| {
            CompressPool::start(scope, threads, create_options.compression_type, cs as usize)
        });
        let mut store = |c: Compressed<'_>| -> Result<()> {
            match c.compressed {
                Some(bytes) => out.write_compressed(c.offset, &bytes),
                None => out.write_at(c.data, c.offset),
            }
        };
        let mut done = 0u64;
        for_each_window(chain, base.as_ref(), cut, |piece| {
            match piece {
                Piece::Zero { offset, len } => {
                    if !copy.has_base && copy.min_sparse == 0 {
                        copy.write(
                            Action::Data,
                            offset,
                            None,
                            offset + len,
                            &mut pool,
                            &mut store,
                        )?;
                    }
                    done += len;
                }
                Piece::Data {
                    offset,
                    len,
                    src,
                    base,
                } => {
                    copy.piece(offset, len, unit, src, base, &mut pool, &mut store)?;
                    done += len;
                }
            }
            tracker.report(done)?;
            Ok(true)
        })?;
        if let Some(pool) = pool.as_mut() {
            pool.finish(&mut store)?;
        }
        Ok(())
    })?;
    tracker.finish()?;
    out.close()?;
    if options.sync {
        for (path, file) in &files {
            file.flush()
                .map_err(|e| Error::io("flushing", e).in_file(path))?;
        }
    }
    Ok(())
}

/// Opens the fresh output for writing, alone: every write covers whole clusters (or ends
/// at the image's end), so copy-on-write never needs the backing file. Its files (image,
/// data file) are returned too, for the final flush.
///
/// The image sees storage whose flushes do nothing, as qemu-img convert's default cache
/// mode (`unsafe`) makes them: the write path's checkpoints flush between metadata steps
/// to stay crash-consistent, which buys nothing for an output that is useless until the
/// conversion has finished, and each flush would write back everything written so far.
fn open_output(dst: &Path, options: &CreateOptions) -> Result<(Chain, Vec<OutputFile>)> {
    let open = |path: &Path| {
        FileStorage::open(path, true)
            .map(Arc::new)
            .map_err(|e| Error::io("opening", e).in_file(path))
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
type OutputFile = (std::path::PathBuf, Arc<FileStorage>);

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
    fn as_file(&self) -> Option<&std::fs::File> {
        self.0.as_file()
    }
    fn shares_extents_with(&self, src: &dyn Storage) -> bool {
        self.0.shares_extents_with(src)
    }
    fn start_writeback(&self) -> io::Result<()> {
        self.0.start_writeback()
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

/// The copy's fixed parameters and the output.
struct Copy<'a> {
    out: &'a Chain,
    has_base: bool,
    min_sparse: u64,
    version3: bool,
    cluster_size: u64,
    /// A buffer of zeros for writing zeros as data.
    zeros: Vec<u8>,
}

type Store<'s> = dyn FnMut(Compressed<'_>) -> Result<()> + 's;

impl Copy<'_> {
    /// What to do with a block whose source bytes are `src` and backing bytes `base`
    /// (`None`: zeros).
    fn classify(&self, src: Option<&[u8]>, base: Option<&[u8]>) -> Action {
        let src_zero = src.is_none_or(is_zero);
        if !self.has_base {
            return match src_zero && self.min_sparse != 0 {
                true => Action::Skip,
                false => Action::Data,
            };
        }
        let equal = match (src, base) {
            (Some(s), Some(b)) => s == b,
            (_, None) => src_zero,
            (None, Some(b)) => is_zero(b),
        };
        if equal {
            Action::Skip
        } else if src_zero && self.min_sparse != 0 && self.version3 {
            Action::Zero
        } else {
            Action::Data
        }
    }

    /// Handles a data piece: classifies its blocks of `unit` bytes and acts on runs of
    /// blocks with the same action.
    #[allow(clippy::too_many_arguments)]
    fn piece(
        &self,
        offset: u64,
        len: u64,
        unit: u64,
        src: Option<&[u8]>,
        base: Option<&[u8]>,
        pool: &mut Option<CompressPool>,
        store: &mut Store<'_>,
    ) -> Result<()> {
        let end = offset + len;
        let mut run: Option<(Action, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let next = (pos / unit * unit + unit).min(end);
            let range = (pos - offset) as usize..(next - offset) as usize;
            let action = self.classify(
                src.map(|b| &b[range.clone()]),
                base.map(|b| &b[range.clone()]),
            );
            match run {
                Some((a, _)) if a == action => {}
                Some((a, start)) => {
                    self.write(
                        a,
                        start,
                        src.map(|b| &b[(start - offset) as usize..]),
                        pos,
                        pool,
                        store,
                    )?;
                    run = Some((action, pos));
                }
                None => run = Some((action, pos)),
            }
            pos = next;
        }
        if let Some((a, start)) = run {
            self.write(
                a,
                start,
                src.map(|b| &b[(start - offset) as usize..]),
                end,
                pool,
                store,
            )?;
        }
        Ok(())
    }

    /// Acts on guest `start..end`; `src` holds the source's bytes from `start` (`None`:
    /// zeros).
    fn write(
        &self,
        action: Action,
        start: u64,
        src: Option<&[u8]>,
        end: u64,
        pool: &mut Option<CompressPool>,
        store: &mut Store<'_>,
    ) -> Result<()> {
        match action {
            Action::Skip => Ok(()),
            Action::Zero => self.out.write_zeroes(start, end - start, false),
            Action::Data => {
                let mut pos = start;
                while pos < end {
                    // Whole clusters at a time with compression, else as much as the zero
                    // buffer holds when writing zeros, else everything at once.
                    let step = match (&pool, src) {
                        (Some(_), _) => self.cluster_size - pos % self.cluster_size,
                        (None, None) => self.zeros.len() as u64,
                        (None, Some(_)) => end - pos,
                    };
                    let next = (pos + step).min(end);
                    let n = (next - pos) as usize;
                    let bytes = match src {
                        Some(b) => &b[(pos - start) as usize..][..n],
                        None => &self.zeros[..n],
                    };
                    match pool {
                        Some(pool) => pool.submit(pos, bytes, store)?,
                        None => self.out.write_at(bytes, pos)?,
                    }
                    pos = next;
                }
                Ok(())
            }
        }
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
