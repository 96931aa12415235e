//! The copying pass of every merge: the plan's steps, their data read ahead, written to
//! the destination in guest order where it does not hold them already.

use std::ops::Range;

use crate::chain::{Chain, ChainRun};
use crate::error::Result;
use crate::ops::read_ahead::{Shape, read_ahead};
use crate::progress::Tracker;

use super::options::StorageCopy;
use super::plan::{Merging, Plan, Step};
use super::resume::{Buffers, Dest, in_place, read_parts};
use super::sink::Out;

/// Steps planned ahead of the one being written: enough to keep the disk busy while the
/// writer works (cold) and the reading on another core (warm), within a few MiB.
const READ_AHEAD: usize = 8;

/// Threads reading ahead. Each read is synchronous, so this is the number of reads in
/// flight; past 4 the disk here gives nothing more.
const READERS: usize = 4;

/// Copies into `out` every range of `chain`, seen from layer `first`, that one of the
/// layers `copy` decides (see [`super::plan::work`]) and that `dest` does not hold
/// already. Where the destination is a layer of the chain, the ranges it decides itself
/// are checked for what an interrupted run left there.
///
/// The data is read ahead on other threads ([`read_ahead`]) while this one writes, in
/// guest order. Planning runs ahead of the writing: in a pull the destination is the
/// chain's top, and a write that fills the rest of a cluster from below can turn a
/// range planned as data into one the top holds. Writing it again writes what is there.
pub(super) fn copy_decided(
    chain: &Chain,
    first: usize,
    copy: Range<usize>,
    bottom_zeros_needed: bool,
    dest: &Dest<'_>,
    out: &mut Out<'_>,
    progress: &mut Tracker<'_, '_>,
) -> Result<()> {
    let shares_extents = chain
        .layers()
        .iter()
        .map(|layer| match (out.sink, out.storage_copy) {
            (None, _) | (_, StorageCopy::Never) => false,
            (Some(_), StorageCopy::Always) => true,
            (Some(s), StorageCopy::Auto) => s.shares_extents_with(layer),
        })
        .collect();
    let plan = Plan::new(Merging {
        chain,
        first,
        copy: copy.clone(),
        bottom_zeros_needed,
        in_chain: dest.in_chain,
        shares_extents,
        reading: out.sink.is_some(),
    });
    let shape = Shape {
        readers: READERS,
        depth: READ_AHEAD,
    };
    let mut bufs = Buffers::default();
    read_ahead(&[chain], shape, plan, |piece, [data, _]| {
        let (step, examined) = piece.step;
        let (offset, len, runs) = (piece.offset, piece.len, &piece.runs[0]);
        match step {
            Step::Data { by_copy: true }
                if !dest.probing() || !dest.present.any(offset, len)? =>
            {
                // Nothing to compare with (nothing there, or no longer looking for what
                // an interrupted run left): the storage copies.
                for run in runs {
                    out.copy(&chain.layers()[run.depth], run)?;
                }
            }
            Step::Data { .. } => write_piece(chain, runs, data, dest, out, &mut bufs)?,
            Step::Zeros => {
                bufs.todo.clear();
                if dest.probing() {
                    let same = dest.present.compare_probed(
                        None,
                        offset,
                        len,
                        &mut bufs.scratch,
                        &mut bufs.todo,
                    )?;
                    if dest.present.any(offset, len)? {
                        dest.probed(same > 0);
                    }
                    out.report.already_done_bytes += same;
                } else {
                    bufs.todo.push((offset, len));
                }
                for &(o, l) in &bufs.todo {
                    out.zero(o, l)?;
                }
            }
            Step::InPlace(run) => {
                out.report.already_done_bytes +=
                    in_place(chain, &run, &copy, bottom_zeros_needed, dest, &mut bufs)?;
            }
        }
        out.report.examined_bytes = examined;
        progress.report(examined)?;
        Ok(true)
    })?;
    out.report.examined_bytes = chain.size();
    Ok(())
}

/// Writes the data runs `runs` (contiguous, at most [`super::plan::PIECE`] in all) where the
/// destination does not hold them already. `read` is their data when read ahead; `None`
/// to read them here (a dry run reads only what it compares).
fn write_piece(
    chain: &Chain,
    runs: &[ChainRun],
    read: Option<&[u8]>,
    dest: &Dest<'_>,
    out: &mut Out<'_>,
    bufs: &mut Buffers,
) -> Result<()> {
    let Some(at) = runs.first().map(|r| r.offset) else {
        return Ok(());
    };
    let len: u64 = runs.iter().map(|r| r.len).sum();
    let present = dest.present.any(at, len)?;
    if out.sink.is_none() && !present {
        // A dry run need not read what it would only count.
        out.report.data_bytes += len;
        return Ok(());
    }
    let data = match read {
        Some(data) => data,
        None => read_parts(chain, runs, &mut bufs.data)?,
    };
    bufs.todo.clear();
    if present && dest.probing() {
        let same =
            dest.present
                .compare_probed(Some(data), at, len, &mut bufs.scratch, &mut bufs.todo)?;
        dest.probed(same > 0);
        out.report.already_done_bytes += same;
    } else {
        bufs.todo.push((at, len));
    }
    for &(o, l) in &bufs.todo {
        out.data(&data[(o - at) as usize..][..l as usize], o)?;
    }
    Ok(())
}
