//! Pull: the data of the layers below an image comes up into it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::progress::{Progress, Tracker};

use super::backing::{open, repoint_options, set_backing};
use super::copy::copy_decided;
use super::options::{MergeOptions, MergeReport};
use super::resume::Dest;
use super::sink::{Out, Sink};

/// Pulls as libvirt blockpull: everything the image at `path` shows from layers above
/// `base` (all layers when `None`) is copied into it, then its backing file becomes
/// `base` (none). What it shows does not change. `base` is named as qemu-img names a
/// base ([`Chain::find`](crate::Chain::find)): the backing name an image of the chain
/// stores, or a path.
pub fn pull(
    path: impl AsRef<Path>,
    base: Option<&Path>,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    let path = path.as_ref();
    let chain = open(&options.chain, path, !options.dry_run, false)?;
    let n = chain.layers().len();
    let b = match base {
        Some(name) => {
            let b = chain.find(name)?;
            if b == 0 {
                return Err(Error::InvalidArgument(format!(
                    "the base '{}' is the image itself; it must be below it",
                    name.display()
                ))
                .in_file(path));
            }
            Some(b)
        }
        None => None,
    };
    let stop = b.unwrap_or(n);
    let sink: Option<&dyn Sink> = if options.dry_run { None } else { Some(&chain) };
    let dest = Dest::new(chain.top(), Some(0));
    let mut out = Out::new(sink, options);
    let mut tracker = Tracker::new(progress, chain.size());
    copy_decided(
        &chain,
        0,
        1..stop,
        b.is_some(),
        &dest,
        &mut out,
        &mut tracker,
    )?;
    let report = out.report;
    if options.dry_run {
        tracker.finish()?;
        return Ok(report);
    }
    // Close the pulled image before its pointer is rewritten through another handle:
    // with lazy refcounts a merely flushed image is still dirty, and closing it
    // afterwards would write its refcounts and its old header (old backing name offset and
    // length, old refcount table) over the amended image.
    let amend = repoint_options(&chain, path, b)?;
    chain.close()?;
    drop(chain);
    set_backing(&options.chain, path, &amend)?;
    tracker.finish()?;
    Ok(report)
}
