//! [`convert`]: creates the destination and fills it, raw or qcow2.

use std::path::Path;

use crate::chain::Chain;
use crate::create::{CreateOptions, create};
use crate::error::{Error, Result};
use crate::layers::Format;
use crate::progress::Progress;
use crate::storage::{FileStorage, LockMode, Storage};

use super::bitmaps::{bitmaps_to_copy, copy_bitmaps};
use super::options::{ConvertOptions, refuse_overwriting_a_source};
use super::qcow2::convert_to_qcow2;
use super::raw::convert_to_raw;

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
            let out =
                FileStorage::open(dst, true).map_err(|e| Error::io("opening", e).in_file(dst))?;
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
