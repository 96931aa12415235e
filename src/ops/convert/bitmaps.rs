//! `convert --bitmaps`: the source image's persistent bitmaps carried into the new image,
//! as qemu-img copies them (names, granularities, enabled state and contents).

use std::path::Path;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::qcow2::{BitmapInfo, Image};

/// The source's bitmaps to copy: all of them, or (`skip_broken`) all but those in use.
/// An in-use bitmap without `skip_broken` is refused before anything is written, as
/// qemu-img refuses it.
pub(super) fn bitmaps_to_copy(chain: &Chain, skip_broken: bool) -> Result<Vec<BitmapInfo>> {
    let Layer::Qcow2(image) = chain.top() else {
        return Ok(Vec::new());
    };
    let mut copy = Vec::new();
    for bitmap in image.bitmaps()? {
        if bitmap.in_use && !skip_broken {
            return Err(Error::Bitmap {
                name: bitmap.name,
                reason: "is inconsistent and cannot be copied (skip it with \
                         --skip-broken-bitmaps, or remove it)"
                    .into(),
            }
            .in_file(image.name()));
        }
        if !bitmap.in_use {
            copy.push(bitmap);
        }
    }
    Ok(copy)
}

/// Adds each of `bitmaps` of `chain`'s top image to the qcow2 image `dst` with the same
/// name, granularity, enabled state and contents.
pub(super) fn copy_bitmaps(chain: &Chain, bitmaps: &[BitmapInfo], dst: &Path) -> Result<()> {
    let Layer::Qcow2(source) = chain.top() else {
        return Ok(());
    };
    if bitmaps.is_empty() {
        return Ok(());
    }
    let out = Image::open_writable(dst)?;
    for bitmap in bitmaps {
        let contents = source.load_bitmap(&bitmap.name)?;
        out.add_bitmap(&bitmap.name, Some(bitmap.granularity), bitmap.enabled)?;
        out.merge_bitmap(&bitmap.name, &contents)?;
    }
    out.close()
}
