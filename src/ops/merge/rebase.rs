//! Rebase: an image gets a new backing file; in safe mode it first takes what the old
//! and the new backing chains show differently.

use std::path::Path;

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::format::is_zero;
use crate::layers::{Format, Layer};
use crate::names::resolve_relative;
use crate::progress::{Progress, Tracker};
use crate::qcow2::{AmendOptions, Mapping};

use super::backing::open;
use super::copy::copy_decided;
use super::options::{MergeOptions, MergeReport};
use super::plan::PIECE;
use super::resume::{Dest, allocation_unit};
use super::sink::{Compressed, Out, Sink, ZerosAsData};

/// Rebases as `qemu-img rebase`: the image at `path` gets `new_backing` (stored as given,
/// resolved against the image's directory; none when `None`) as its backing file, in
/// format `new_format` (probed when `None`). Safe mode (`unsafe_` false) first copies into
/// it every range that it does not allocate and whose content differs between the old
/// and the new backing chain, so what it shows does not change, and refuses a new backing
/// file that leads back to the image (it would open no more); unsafe mode only rewrites
/// the name, whatever it names, as `qemu-img rebase -u`.
pub fn rebase(
    path: impl AsRef<Path>,
    new_backing: Option<&str>,
    new_format: Option<&str>,
    unsafe_: bool,
    options: &MergeOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    let path = path.as_ref();
    let resolved = new_backing.map(|name| resolve_relative(path, name));
    let format = match (&resolved, new_format) {
        (None, _) => None,
        (Some(_), Some(f)) => Some(Format::from_name(f)?),
        (Some(p), None) => {
            let layer = Layer::open(p, None, &options.chain.image_options(false))?;
            Some(layer.format())
        }
    };
    let set_backing = AmendOptions {
        backing_file: Some(new_backing.map(str::to_owned)),
        backing_format: Some(format.map(|f| f.name().to_owned())),
        ..AmendOptions::default()
    };
    let mut report = MergeReport::default();
    let mut tracker = Tracker::new(progress, 0);
    if !unsafe_ {
        let chain = open(&options.chain, path, !options.dry_run, false)?;
        tracker.set_total(chain.size());
        let zeros_as_data = ZerosAsData(&chain);
        let compressed = Compressed {
            chain: &chain,
            last: std::cell::Cell::new(None),
        };
        let sink: Option<&dyn Sink> = match chain.top() {
            _ if options.dry_run => None,
            Layer::Qcow2(_) if options.compress => Some(&compressed),
            Layer::Qcow2(i) if chain.layers().len() == 1 && i.header().version < 3 => {
                Some(&zeros_as_data)
            }
            _ => Some(&chain),
        };
        let loop_error = |p: &Path| Error::BackingLoop {
            path: p.to_path_buf(),
        };
        let in_chain = match &resolved {
            None => Some(chain.layers().len()),
            // The image itself: it would be its own backing file and open no more.
            Some(p) if chain.index_of(p).ok() == Some(0) => {
                return Err(loop_error(p).in_file(path));
            }
            Some(p) => chain.index_of(p).ok(),
        };
        // Compressed clusters are written from buffers, never copied by the storage.
        let no_storage_copy = MergeOptions {
            storage_copy: super::options::StorageCopy::Never,
            ..options.clone()
        };
        let mut out = Out::new(
            sink,
            if options.compress {
                &no_storage_copy
            } else {
                options
            },
        );
        match in_chain {
            // The new backing file is in the chain: copy what the layers above it decide.
            Some(b) => {
                let dest = Dest::new(chain.top(), Some(0));
                let needs_zeros = b < chain.layers().len();
                copy_decided(&chain, 0, 1..b, needs_zeros, &dest, &mut out, &mut tracker)?;
            }
            None => {
                let p = resolved.as_deref().unwrap_or(path);
                let new_chain = Chain::open_with(
                    p,
                    &ChainOptions {
                        format,
                        writable: false,
                        no_backing: false,
                        locking: options.new_backing_locking.unwrap_or(options.chain.locking),
                        ..options.chain.clone()
                    },
                )?;
                // A new backing chain through the image itself (an overlay of it) would
                // loop.
                let me = chain
                    .stat(path)
                    .map_err(|e| Error::io("opening", e).in_file(path))?;
                if new_chain
                    .layers()
                    .iter()
                    .any(|l| new_chain.stat(l.name()).is_ok_and(|i| i.id == me.id))
                {
                    return Err(loop_error(p).in_file(path));
                }
                copy_differences(&chain, &new_chain, &mut out, &mut tracker)?;
            }
        }
        report = out.report;
        if options.dry_run {
            tracker.finish()?;
            return Ok(report);
        }
        chain.close()?;
    } else if options.dry_run {
        tracker.set_total(open(&options.chain, path, false, true)?.size());
        tracker.finish()?;
        return Ok(report);
    }
    let image = open(&options.chain, path, true, true)?;
    if unsafe_ {
        tracker.set_total(image.size());
    }
    image.amend(&set_backing)?;
    image.close()?;
    tracker.finish()?;
    Ok(report)
}

/// Copies into the top of `chain` every range it does not allocate whose content differs
/// between its backing chain and `new_chain` (zeros past the end of either), in units of
/// the top's allocation ([`allocation_unit`]). Where the top allocates a range that differs, it counts as done
/// when the top holds what the old backing chain shows (an interrupted run copied it).
fn copy_differences(
    chain: &Chain,
    new_chain: &Chain,
    out: &mut Out<'_>,
    progress: &mut Tracker<'_, '_>,
) -> Result<()> {
    let size = chain.size();
    let unit = allocation_unit(chain.top());
    let piece = PIECE.max(unit as usize);
    let mut old = vec![0u8; piece];
    let mut new = vec![0u8; piece];
    let mut top = vec![0u8; piece];
    let mut pos = 0u64;
    while pos < size {
        let run = chain.resolve(pos, (size - pos).min(piece as u64))?;
        pos = run.end();
        let len = run.len as usize;
        // Where both backing chains read as zeros by their mapping they agree, and
        // nothing needs reading (most of a sparse image).
        let below = chain.layers().len() == 1 || zeros_by_mapping(chain, 1, run.offset, run.len)?;
        let new_end = run.end().min(new_chain.size());
        if below
            && (new_end <= run.offset
                || zeros_by_mapping(new_chain, 0, run.offset, new_end - run.offset)?)
        {
            out.report.examined_bytes = pos;
            progress.report(pos)?;
            continue;
        }
        // What the old backing chain shows, and the new one.
        chain.read_below(&mut old[..len], run.offset)?;
        let new_len = (new_chain.size().saturating_sub(run.offset) as usize).min(len);
        new[new_len..len].fill(0);
        if new_len > 0 {
            new_chain.read_at(&mut new[..new_len], run.offset)?;
        }
        // Without a backing file a range nothing allocates resolves to the top too, but
        // it is not the top's: it showed zeros, which the new backing file must not hide.
        let own = run.depth == 0 && run.mapping != Mapping::Unallocated;
        if own && old[..len] != new[..len] {
            chain.read_run(&run, &mut top[..len])?;
        }
        // Differing stretches to write: (offset, length, all zeros).
        let mut stretch: Option<(u64, u64, bool)> = None;
        let mut at = run.offset;
        while at < run.end() {
            let next = ((at / unit + 1) * unit).min(run.end());
            let r = (at - run.offset) as usize..(next - run.offset) as usize;
            if old[r.clone()] != new[r.clone()] {
                if own {
                    if top[r.clone()] == old[r] {
                        out.report.already_done_bytes += next - at;
                    }
                } else {
                    let zeros = is_zero(&old[r]);
                    match &mut stretch {
                        Some((o, l, z)) if *o + *l == at && *z == zeros => *l += next - at,
                        _ => {
                            if let Some(s) = stretch.take() {
                                emit(out, &old, run.offset, s)?;
                            }
                            stretch = Some((at, next - at, zeros));
                        }
                    }
                }
            }
            at = next;
        }
        if let Some(s) = stretch {
            emit(out, &old, run.offset, s)?;
        }
        out.report.examined_bytes = pos;
        progress.report(pos)?;
    }
    Ok(())
}

/// Whether `chain`, seen from layer `first`, reads as zeros over `offset..offset + len`
/// by its mapping alone (unallocated through the whole chain, or zero clusters).
fn zeros_by_mapping(chain: &Chain, first: usize, offset: u64, len: u64) -> Result<bool> {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let run = chain.resolve_from(first, pos, end - pos)?;
        if !matches!(run.mapping, Mapping::Unallocated | Mapping::Zero { .. }) {
            return Ok(false);
        }
        pos = run.end();
    }
    Ok(true)
}

/// Writes one stretch `(offset, length, zeros)` of `buf` (which starts at guest `base`).
fn emit(
    out: &mut Out<'_>,
    buf: &[u8],
    base: u64,
    (offset, len, zeros): (u64, u64, bool),
) -> Result<()> {
    if zeros {
        out.zero(offset, len)
    } else {
        out.data(&buf[(offset - base) as usize..][..len as usize], offset)
    }
}
