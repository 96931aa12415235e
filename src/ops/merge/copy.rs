//! The copying pass of every merge: the plan's steps, their data read ahead, written to
//! the destination in guest order where it does not hold them already.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use crate::chain::{Chain, ChainRun};
use crate::error::{Error, Result};
use crate::progress::Tracker;

use super::options::StorageCopy;
use super::plan::{Plan, Step};
use super::resume::{Buffers, Dest, in_place, read_parts};
use super::sink::Out;

/// Data pieces read ahead of the one being written: enough to keep the disk busy while
/// the writer works (cold) and the reading on another core (warm), within a few MiB.
const READ_AHEAD: usize = 8;

/// Threads reading ahead. Each read is synchronous, so this is the number of reads in
/// flight; past 4 the disk here gives nothing more.
const READERS: usize = 4;

/// Runs to read, the buffer to read them into, where the data goes.
type ReadJob = (Vec<ChainRun>, Vec<u8>, SyncSender<Result<Vec<u8>>>);

/// Reads data pieces on [`READERS`] threads, each into its own buffer; results come back
/// through one channel per piece, so the writer takes them in order.
struct ReadAhead {
    jobs: SyncSender<ReadJob>,
    /// Buffers of written pieces, for the next reads.
    spare: Vec<Vec<u8>>,
}

impl ReadAhead {
    fn start<'s>(scope: &'s std::thread::Scope<'s, '_>, chain: &'s Chain) -> ReadAhead {
        let (jobs, queue) = sync_channel::<ReadJob>(READ_AHEAD);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..READERS {
            let queue = Arc::clone(&queue);
            scope.spawn(move || {
                loop {
                    // The lock is held while waiting only: reads overlap.
                    let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok((runs, mut buf, done)) = job else {
                        return; // The writer finished or failed.
                    };
                    let result = read_parts(chain, &runs, &mut buf).map(|_| buf);
                    let _ = done.send(result);
                }
            });
        }
        ReadAhead {
            jobs,
            spare: Vec::new(),
        }
    }

    /// Queues the reading of `runs`; the data comes through the receiver.
    fn read(&mut self, runs: &[ChainRun]) -> Receiver<Result<Vec<u8>>> {
        let (done, result) = sync_channel(1);
        let buf = self.spare.pop().unwrap_or_default();
        // The readers live until `self.jobs` is dropped, so this cannot fail unless one
        // panicked, which the scope reports.
        let _ = self.jobs.send((runs.to_vec(), buf, done));
        result
    }
}

/// Copies into `out` every range of `chain`, seen from layer `first`, that one of the
/// layers `copy` decides (see [`super::plan::work`]) and that `dest` does not hold already. Where the
/// destination is a layer of the chain, the ranges it decides itself are checked for
/// what an interrupted run left there.
///
/// The data is read ahead on other threads ([`ReadAhead`]) while this one writes, in
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
    let size = chain.size();
    let shares_extents = chain
        .layers()
        .iter()
        .map(|layer| match (out.sink, out.storage_copy) {
            (None, _) | (_, StorageCopy::Never) => false,
            (Some(_), StorageCopy::Always) => true,
            (Some(s), StorageCopy::Auto) => s.shares_extents_with(layer),
        })
        .collect();
    let mut plan = Plan::new(
        chain,
        first,
        copy.clone(),
        bottom_zeros_needed,
        dest.in_chain,
        shares_extents,
    );
    let reading = out.sink.is_some();
    std::thread::scope(|scope| {
        let mut ahead = reading.then(|| ReadAhead::start(scope, chain));
        let mut window: VecDeque<(Step, u64)> = VecDeque::new();
        let mut bufs = Buffers::default();
        let mut planned = false;
        loop {
            while !planned && window.len() < READ_AHEAD {
                match plan.next()? {
                    None => planned = true,
                    Some((mut step, examined)) => {
                        if let (
                            Step::Data {
                                runs,
                                read,
                                by_copy: false,
                            },
                            Some(ahead),
                        ) = (&mut step, &mut ahead)
                        {
                            *read = Some(ahead.read(runs));
                        }
                        window.push_back((step, examined));
                    }
                }
            }
            let Some((step, examined)) = window.pop_front() else {
                break;
            };
            match step {
                Step::Data {
                    runs,
                    by_copy: true,
                    ..
                } if !dest.probing()
                    || !dest
                        .present
                        .any(runs[0].offset, runs.iter().map(|r| r.len).sum())? =>
                {
                    // Nothing to compare with (nothing there, or no longer looking for
                    // what an interrupted run left): the storage copies.
                    for run in &runs {
                        out.copy(&chain.layers()[run.depth], run)?;
                    }
                }
                Step::Data { runs, read, .. } => {
                    let data = match read {
                        Some(result) => Some(result.recv().map_err(|_| {
                            Error::io("reading", std::io::Error::other("a reader thread failed"))
                        })??),
                        None => None,
                    };
                    let len: u64 = runs.iter().map(|r| r.len).sum();
                    write_piece(
                        chain,
                        &runs,
                        data.as_deref().map(|d| &d[..len as usize]),
                        dest,
                        out,
                        &mut bufs,
                    )?;
                    if let (Some(buf), Some(ahead)) = (data, &mut ahead) {
                        ahead.spare.push(buf);
                    }
                }
                Step::Zeros { offset, len } => {
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
        }
        out.report.examined_bytes = size;
        Ok(())
    })
}

/// Writes the data runs `runs` (contiguous, at most [`super::plan::PIECE`] in all) where the
/// destination does not hold them already. `read` is their data when read ahead (see
/// [`ReadAhead`]); `None` to read them here (a dry run reads only what it compares).
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
        None => {
            read_parts(chain, runs, &mut bufs.data)?;
            &bufs.data[..len as usize]
        }
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
