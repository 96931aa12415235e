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
//! Source ranges that read as zeros by their mapping are never read; data is read ahead in
//! large windows aligned to the output's clusters, written in large requests, and with
//! compression the clusters are compressed on every core and stored in guest order.

use std::path::Path;

use crate::chain::{Chain, ChainOptions};
use crate::create::{CreateOptions, create};
use crate::error::{Error, Result};
use crate::format::CompressionType;
use crate::layers::Format;
use crate::layers::Layer;
use crate::names::resolve_relative;
use crate::ops::compress_pool::{CompressPool, Compressed};
use crate::ops::read_ahead::{Window, Windows, for_each_window};
use crate::progress::{Progress, Tracker};
use crate::qcow2::Compat;
use crate::storage::Storage;

use super::clusters::{Action, Clusters};
use super::offload::{Part, for_each_part};
use super::options::{ConvertOptions, refuse_overwriting_a_source};
use super::output::open_output;

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
    options.check()?;
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
    let (out, files) = open_output(dst, &create_options, options.cache)?;
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
    let clusters = Clusters {
        out: &out,
        has_base: base.is_some(),
        min_sparse: options.min_sparse,
        version3: create_options.compat == Compat::V1_1,
        cluster_size: create_options.cluster_size,
        zero_init: true,
    };
    fill(
        chain,
        base.as_ref(),
        &clusters,
        create_options.compression_type,
        options,
        progress,
    )?;
    out.close()?;
    if options.sync {
        for (path, file) in &files {
            file.flush()
                .map_err(|e| Error::io("flushing", e).in_file(path))?;
        }
    }
    Ok(())
}

/// Writes `chain`'s guest content into the qcow2 image `out` (open for writing, at least
/// as large as `chain`, its backing chain open below it), as `qemu-img convert -n` does:
/// every guest byte of `chain`'s range is written, zeros included (as zero clusters or
/// freed clusters where whole clusters allow), unless
/// [`ConvertOptions::target_is_zero`] says `out` reads as zeros already. With `base`
/// (`-B` given with `-n`), clusters that read in `base` as in `chain` are left as `out`
/// has them. The caller flushes and closes `out`.
pub(super) fn fill_existing_qcow2(
    chain: &Chain,
    out: &Chain,
    base: Option<&Chain>,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    options.check()?;
    let Layer::Qcow2(image) = out.top() else {
        return Err(Error::InvalidArgument(
            "the output is not a qcow2 image".into(),
        ));
    };
    if options.compress && image.has_external_data_file() {
        return Err(Error::Unsupported(
            "compressed clusters in an image with an external data file",
        ));
    }
    let clusters = Clusters {
        out,
        has_base: base.is_some(),
        min_sparse: options.min_sparse,
        version3: image.header().version >= 3,
        cluster_size: image.cluster_size(),
        zero_init: options.target_is_zero,
    };
    fill(
        chain,
        base,
        &clusters,
        image.compression_type(),
        options,
        progress,
    )
}

/// Copies `chain`'s content through `clusters` into its output, `base` being the
/// output's backing chain if it has one.
fn fill(
    chain: &Chain,
    base: Option<&Chain>,
    clusters: &Clusters<'_>,
    compression_type: CompressionType,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let out = clusters.out;
    let cs = clusters.cluster_size;
    // The unit of the "is this block all zeros" decision: whole clusters, or -S blocks
    // rounded up to whole clusters. Over a backing file, clusters are compared one by one.
    let unit = if clusters.has_base || options.min_sparse <= cs {
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
    let base = base.filter(|_| clusters.has_base);
    if options.copy_offload && base.is_none() {
        return fill_offloaded(chain, clusters, unit, options, tracker);
    }
    std::thread::scope(|scope| -> Result<()> {
        let mut pool = options
            .compress
            .then(|| CompressPool::start(scope, threads, compression_type, cs as usize));
        let mut store = |c: Compressed<'_>| -> Result<()> {
            match c.compressed {
                Some(bytes) => out.write_compressed(c.offset, &bytes),
                None => out.write_at(c.data, c.offset),
            }
        };
        let mut done = 0u64;
        for_each_window(chain, base, cut, |piece| {
            match piece {
                Window::Zero { offset, len } => {
                    // Zeros in both: nothing to write over a backing file or into an
                    // output that reads as zeros, unless -S 0 asks for allocation.
                    let action = match (clusters.has_base, clusters.min_sparse, clusters.zero_init)
                    {
                        (true, _, _) => Action::Skip,
                        (false, 0, _) => Action::Data,
                        (false, _, true) => Action::Skip,
                        (false, _, false) => Action::Zero,
                    };
                    clusters.write(action, offset, None, offset + len, &mut pool, &mut store)?;
                    done += len;
                }
                Window::Data {
                    offset,
                    len,
                    src,
                    base,
                } => {
                    clusters.piece(offset, len, unit, src, base, &mut pool, &mut store)?;
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
    tracker.finish()
}

/// [`fill`] with copy offloading ([`ConvertOptions::copy_offload`]), without a backing
/// file: data ranges go in as storage copies, whole; the rest as [`fill`] handles it.
fn fill_offloaded(
    chain: &Chain,
    clusters: &Clusters<'_>,
    unit: u64,
    options: &ConvertOptions,
    mut tracker: Tracker<'_, '_>,
) -> Result<()> {
    // Nothing is compressed (refused with offloading), so nothing is ever stored here.
    let mut store = |_: Compressed<'_>| -> Result<()> {
        Err(Error::Unsupported("compression with copy offloading"))
    };
    let mut done = 0u64;
    for_each_part(chain, options.chunk_size, |part| {
        match part {
            Part::Zero { offset, len } => {
                let action = match (clusters.min_sparse, clusters.zero_init) {
                    (0, _) => Action::Data,
                    (_, true) => Action::Skip,
                    (_, false) => Action::Zero,
                };
                clusters.write(action, offset, None, offset + len, &mut None, &mut store)?;
                done += len;
            }
            Part::Data { offset, bytes } => {
                let len = bytes.len() as u64;
                clusters.piece(offset, len, unit, Some(bytes), None, &mut None, &mut store)?;
                done += len;
            }
            Part::Copy {
                offset,
                len,
                from,
                host,
            } => {
                clusters.out.copy_in(from, host, len, offset)?;
                done += len;
            }
        }
        tracker.report(done)
    })?;
    tracker.finish()
}
