//! [`convert`]: creates the destination and fills it, raw or qcow2.

use std::path::Path;

use crate::chain::Chain;
use crate::create::{CreateOptions, create};
use crate::error::{Error, Result};
use crate::layers::{Format, Layer};
use crate::progress::Progress;
use crate::storage::{FileStorage, LockMode, Storage};

use super::bitmaps::{bitmaps_to_copy, copy_bitmaps};
use super::concat::concatenate;
use super::options::{ConvertOptions, refuse_overwriting_a_source};
use super::qcow2::{convert_to_qcow2, fill_existing_qcow2};
use super::raw::{convert_to_raw, fill_raw};

/// Creates `dst` as `create` says (format, qcow2 options, backing file; the size is always
/// the source's) and copies `chain`'s guest content into it: see [`convert_to_raw`] and
/// [`convert_to_qcow2`]. `progress(done, total)` is called as bytes are handled;
/// returning `false` cancels with [`Error::Cancelled`].
pub fn convert(
    chain: &Chain,
    dst: impl AsRef<Path>,
    create_options: &CreateOptions,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let dst = dst.as_ref();
    if options.bitmaps && create_options.format != Format::Qcow2 {
        return Err(Error::Unsupported("persistent bitmaps in a raw image").in_file(dst));
    }
    match create_options.format {
        Format::Qcow2 => {
            // In-use bitmaps are refused before anything is written.
            let bitmaps = if options.bitmaps {
                bitmaps_to_copy(chain, options.skip_broken_bitmaps)?
            } else {
                Vec::new()
            };
            convert_to_qcow2(chain, dst, create_options, options, progress)?;
            copy_bitmaps(chain, &bitmaps, dst)
        }
        Format::Raw => {
            if options.compress {
                return Err(Error::Unsupported("compressed clusters in a raw image").in_file(dst));
            }
            let raw = CreateOptions {
                size: Some(chain.size()),
                ..create_options.clone()
            };
            raw.validate().map_err(|e| e.in_file(dst))?;
            refuse_overwriting_a_source(chain, dst)?;
            create(dst, &raw)?;
            let out = FileStorage::open_cached(dst, true, options.cache)
                .map_err(|e| Error::io("opening", e).in_file(dst))?;
            out.lock(LockMode::WRITE).map_err(|e| e.in_file(dst))?;
            convert_to_raw(chain, &out, options, progress).map_err(|e| e.in_file(dst))?;
            if options.sync {
                out.flush()
                    .map_err(|e| Error::io("flushing", e).in_file(dst))?;
            }
            Ok(())
        }
        other => Err(other.not_supported().in_file(dst)),
    }
}

/// [`convert`] with several sources, their guest contents one after the other in the
/// order given (`qemu-img convert a b c DST`), as [`concatenate`] joins them. No source
/// may be `dst`.
pub fn convert_concatenated(
    chains: Vec<Chain>,
    dst: impl AsRef<Path>,
    create_options: &CreateOptions,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let dst = dst.as_ref();
    for chain in &chains {
        refuse_overwriting_a_source(chain, dst)?;
    }
    if options.bitmaps && chains.len() > 1 {
        return Err(Error::InvalidArgument(
            "Copying bitmaps only possible with single source".into(),
        ));
    }
    match chains.len() {
        1 => convert(&chains[0], dst, create_options, options, progress),
        _ => convert(
            &concatenate(chains)?,
            dst,
            create_options,
            options,
            progress,
        ),
    }
}

/// Writes `chain`'s guest content into the existing image `out` (open for writing, its
/// top image the output), as `qemu-img convert -n`: `out` must be at least as large as
/// `chain` (what lies past `chain`'s size is left alone), and every byte of `chain`'s
/// range is written, zeros included, unless [`ConvertOptions::target_is_zero`]. Zeros go
/// in as zero clusters or freed clusters into a qcow2 image (see
/// [`crate::Chain::write_zeroes`]) and as holes punched into a raw file
/// ([`crate::storage::Storage::write_zeroes`]); with [`ConvertOptions::min_sparse`] 0
/// they are written as data. `base` (qcow2 only: `-n` with `-B`) is the chain the output
/// is taken to sit on: clusters that read there as in `chain` are left as they are.
/// Nothing is flushed unless [`ConvertOptions::sync`]; `out` is not closed.
pub fn convert_into(
    chain: &Chain,
    out: &Chain,
    base: Option<&Chain>,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<()> {
    let name = out.top().name().to_path_buf();
    out.ensure_writable()?;
    if out.size() < chain.size() {
        return Err(
            Error::InvalidArgument("output file is smaller than input file".into()).in_file(&name),
        );
    }
    if options.bitmaps {
        return Err(Error::Unsupported("copying bitmaps into an existing image").in_file(&name));
    }
    match out.top() {
        Layer::Qcow2(_) => fill_existing_qcow2(chain, out, base, options, progress)
            .map_err(|e| e.in_file(&name))?,
        Layer::Raw(raw) => {
            if base.is_some() {
                return Err(Error::Unsupported("a backing file for a raw image").in_file(&name));
            }
            let storage = raw.storage();
            let zero = |offset: u64, len: u64| {
                storage
                    .write_zeroes(offset, len)
                    .map_err(|e| Error::io(format!("zeroing output at {offset:#x}"), e))
            };
            let zero: Option<&dyn Fn(u64, u64) -> Result<()>> = match options.target_is_zero {
                true => None,
                false => Some(&zero),
            };
            fill_raw(chain, storage, zero, options, progress).map_err(|e| e.in_file(&name))?;
        }
    }
    if options.sync {
        out.flush()?;
    }
    Ok(())
}
