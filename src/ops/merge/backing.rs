//! Backing pointers: opening the images of a merge and rewriting which
//! backing file an image names once the data it exposes is in place.

use std::path::Path;

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::qcow2::AmendOptions;

/// Opens the chain at `path` for a step of a merge (formats probed or from the backing
/// format a chain stores).
pub(super) fn open(
    options: &ChainOptions,
    path: &Path,
    writable: bool,
    no_backing: bool,
) -> Result<Chain> {
    Chain::open_with(
        path,
        &ChainOptions {
            writable,
            no_backing,
            format: None,
            ..options.clone()
        },
    )
}

/// The name `overlay` should store to reach the backing file that `above_base` (the
/// image directly above it in the chain) names `stored`: the same name when it resolves
/// the same from both directories, else an absolute path.
fn backing_name(
    chain: &Chain,
    overlay: &Path,
    above_base: &Path,
    stored: &str,
    base: &Path,
) -> String {
    let dir = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    if Path::new(stored).is_absolute() || dir(overlay) == dir(above_base) {
        return stored.to_owned();
    }
    chain
        .canonicalize(base)
        .unwrap_or_else(|_| base.to_path_buf())
        .display()
        .to_string()
}

/// The amendment that points the image at `overlay` at `base` (layer `base_index` of
/// `chain`), or at nothing.
pub(super) fn repoint_options(
    chain: &Chain,
    overlay: &Path,
    base_index: Option<usize>,
) -> Result<AmendOptions> {
    Ok(match base_index {
        Some(b) => {
            let above = &chain.layers()[b - 1];
            let (stored, _) = above
                .backing()
                .ok_or_else(|| Error::InvalidArgument("the base has no image above it".into()))?;
            let base = &chain.layers()[b];
            AmendOptions {
                backing_file: Some(Some(backing_name(
                    chain,
                    overlay,
                    above.name(),
                    &stored,
                    base.name(),
                ))),
                backing_format: Some(Some(base.format().name().to_owned())),
                ..AmendOptions::default()
            }
        }
        None => AmendOptions {
            backing_file: Some(None),
            backing_format: Some(None),
            ..AmendOptions::default()
        },
    })
}

/// Rewrites the backing pointer of the image at `overlay`. No other writable handle on it
/// may be open: closing one later would write its stale header over the new one.
pub(super) fn set_backing(
    open_options: &ChainOptions,
    overlay: &Path,
    amend: &AmendOptions,
) -> Result<()> {
    let image = open(open_options, overlay, true, true)?;
    image.amend(amend)?;
    image.close()
}
