//! What the destination of a merge holds already: comparing, per allocation unit, what a
//! merge brings with what the destination allocates, so that a rerun after an
//! interruption skips what is in place ([`MergeReport::already_done_bytes`]).
//!
//! [`MergeReport::already_done_bytes`]: super::MergeReport::already_done_bytes

use crate::chain::{Chain, ChainRun};
use crate::error::Result;
use crate::layers::Layer;
use crate::qcow2::{Mapping, Run};

use crate::format::is_zero;
use crate::ops::read_ahead::read_runs;

use super::plan::{PIECE, Work, work};

/// Appends `offset..offset + len` to `todo`, merged with the last stretch when adjacent.
fn push(todo: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    match todo.last_mut() {
        Some(last) if last.0 + last.1 == offset => last.1 += len,
        _ => todo.push((offset, len)),
    }
}

/// Compares `a` with `b` (`None`: zeros), `len` bytes at guest `offset`, in blocks
/// aligned to `block`: unequal blocks go to `todo`; returns the bytes of the equal ones.
fn compare_blocks(
    block: u64,
    a: Option<&[u8]>,
    b: Option<&[u8]>,
    offset: u64,
    len: u64,
    todo: &mut Vec<(u64, u64)>,
) -> u64 {
    let mut equal = 0;
    let mut pos = offset;
    while pos < offset + len {
        let next = ((pos / block + 1) * block).min(offset + len);
        let r = (pos - offset) as usize..(next - offset) as usize;
        let same = match (a, b) {
            (None, None) => true,
            (Some(x), None) | (None, Some(x)) => is_zero(&x[r]),
            (Some(x), Some(y)) => x[r.clone()] == y[r],
        };
        if same {
            equal += next - pos;
        } else {
            push(todo, pos, next - pos);
        }
        pos = next;
    }
    equal
}

/// What the destination of a merge holds itself (not through its backing files), to
/// skip what is in place already.
pub(super) struct Present<'a> {
    /// The destination.
    pub layer: &'a Layer,
    /// Comparisons go by the destination's unit of allocation (see [`allocation_unit`]).
    block: u64,
}

/// What a layer allocates at once: a cluster, or a subcluster with extended L2 entries
/// (64 KiB for raw files). A merge compares and copies by these units: the layer's own
/// data and what an interrupted merge copied into it never share one, while they can
/// share a cluster of 32 subclusters.
pub(super) fn allocation_unit(layer: &Layer) -> u64 {
    match layer {
        Layer::Qcow2(i) => i.geometry().subcluster_size(),
        Layer::Raw(_) => 65536,
    }
}

impl<'a> Present<'a> {
    fn new(layer: &'a Layer) -> Present<'a> {
        Present {
            layer,
            block: allocation_unit(layer),
        }
    }

    /// Whether the destination allocates anything in `offset..offset + len`.
    pub(super) fn any(&self, offset: u64, len: u64) -> Result<bool> {
        let end = (offset + len).min(self.layer.size());
        let mut pos = offset;
        while pos < end {
            let run = self.layer.lookup(pos, end - pos)?;
            if run.mapping != Mapping::Unallocated {
                return Ok(true);
            }
            pos = run.end();
        }
        Ok(false)
    }

    /// [`Present::compare`], reading the rest only when the first block matches: where a
    /// merge has not been (what a fresh merge finds) the destination holds other data,
    /// and one block's read tells, instead of the whole piece's. A piece whose first
    /// block differs goes to `todo` whole and counts as different.
    pub(super) fn compare_probed(
        &self,
        want: Option<&[u8]>,
        offset: u64,
        len: u64,
        scratch: &mut Vec<u8>,
        todo: &mut Vec<(u64, u64)>,
    ) -> Result<u64> {
        let probe = len.min(self.block - offset % self.block);
        if probe == len {
            return self.compare(want, offset, len, scratch, todo);
        }
        let before = todo.len();
        let head = self.compare(
            want.map(|w| &w[..probe as usize]),
            offset,
            probe,
            scratch,
            todo,
        )?;
        if head < probe {
            todo.truncate(before);
            push(todo, offset, len);
            return Ok(0);
        }
        let rest = self.compare(
            want.map(|w| &w[probe as usize..]),
            offset + probe,
            len - probe,
            scratch,
            todo,
        )?;
        Ok(head + rest)
    }

    /// Compares `want`, what a merge brings to `offset..offset + len` (`None`: zeros),
    /// with what the destination allocates there: appends to `todo` the stretches it
    /// does not hold equal (or at all) and returns the bytes it does.
    pub(super) fn compare(
        &self,
        want: Option<&[u8]>,
        offset: u64,
        len: u64,
        scratch: &mut Vec<u8>,
        todo: &mut Vec<(u64, u64)>,
    ) -> Result<u64> {
        let end = offset + len;
        let held = end.min(self.layer.size()).max(offset);
        let want_at = |at: u64, n: u64| want.map(|w| &w[(at - offset) as usize..][..n as usize]);
        let mut equal = 0;
        let mut pos = offset;
        while pos < held {
            let run = self.layer.lookup(pos, held - pos)?;
            match run.mapping {
                Mapping::Unallocated => push(todo, pos, run.len),
                Mapping::Zero { .. } if want.is_none() => equal += run.len,
                Mapping::Zero { .. } => {
                    equal +=
                        compare_blocks(self.block, want_at(pos, run.len), None, pos, run.len, todo);
                }
                _ => {
                    let mut done = 0;
                    while done < run.len {
                        let n = (run.len - done).min(PIECE as u64);
                        if scratch.len() < n as usize {
                            scratch.resize(n as usize, 0);
                        }
                        let part = Run {
                            offset: pos + done,
                            len: n,
                            mapping: run.mapping.advanced(done),
                        };
                        let have = &mut scratch[..n as usize];
                        self.layer.read_run(&part, have)?;
                        equal += compare_blocks(
                            self.block,
                            want_at(pos + done, n),
                            Some(have),
                            pos + done,
                            n,
                            todo,
                        );
                        done += n;
                    }
                }
            }
            pos = run.end();
        }
        if held < end {
            push(todo, held, end - held);
        }
        Ok(equal)
    }
}

/// The destination of [`super::copy::copy_decided`].
pub(super) struct Dest<'a> {
    /// What it holds.
    pub present: Present<'a>,
    /// It is this layer of the chain read (the top, for pull and rebase); `None` when it
    /// lies below the merged layers (commit).
    pub in_chain: Option<usize>,
    /// Probes in a row that found the destination holding something else (see
    /// [`Dest::probing`]).
    misses: std::cell::Cell<u32>,
}

/// After this many pieces in a row whose first block differs, a merge stops looking for
/// what an interrupted run left: that run went through the guest range in order, so past
/// the point where it stopped nothing matches, and each probe is a read (a seek, cold).
const PROBE_MISSES: u32 = 16;

impl<'a> Dest<'a> {
    /// The destination `layer`, layer `in_chain` of the chain read, if it is one.
    pub(super) fn new(layer: &'a Layer, in_chain: Option<usize>) -> Dest<'a> {
        Dest {
            present: Present::new(layer),
            in_chain,
            misses: std::cell::Cell::new(0),
        }
    }

    /// Whether pieces the destination already allocates are still compared before being
    /// written (else they are written as a merge that never ran would write them).
    pub(super) fn probing(&self) -> bool {
        self.misses.get() < PROBE_MISSES
    }

    /// Notes what comparing one piece found.
    pub(super) fn probed(&self, found_in_place: bool) {
        self.misses.set(if found_in_place {
            0
        } else {
            self.misses.get() + 1
        });
    }
}

/// Reads the data runs `parts` (contiguous) into the start of `buf`, grown as needed, and
/// returns their bytes.
pub(super) fn read_parts<'b>(
    chain: &Chain,
    parts: &[ChainRun],
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8]> {
    let Some(first) = parts.first() else {
        return Ok(&[]);
    };
    let len = parts.iter().map(|r| r.len).sum::<u64>() as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    read_runs(chain, parts, first.offset, &mut buf[..len])?;
    Ok(&buf[..len])
}

/// Buffers of one merge pass.
#[derive(Default)]
pub(super) struct Buffers {
    /// Data read here (not read ahead).
    pub data: Vec<u8>,
    /// What the destination holds, read to compare.
    pub scratch: Vec<u8>,
    /// Stretches to write: `(offset, length)`.
    pub todo: Vec<(u64, u64)>,
}

/// How much of `run`, which the destination (layer `run.depth` of `chain`) decides
/// itself, the layers `copy` below it would bring as the destination holds it: what an
/// interrupted run of the merge copied already (or what happened to be equal). Where it
/// differs the destination's own data decides, and there is nothing to do.
pub(super) fn in_place(
    chain: &Chain,
    run: &ChainRun,
    copy: &std::ops::Range<usize>,
    bottom_zeros_needed: bool,
    dest: &Dest<'_>,
    bufs: &mut Buffers,
) -> Result<u64> {
    let present = &dest.present;
    let mut equal = 0;
    let mut pos = run.offset;
    while pos < run.end() {
        let sub = chain.resolve_from(run.depth + 1, pos, run.end() - pos)?;
        pos = sub.end();
        if !copy.contains(&sub.depth) {
            continue;
        }
        bufs.todo.clear();
        match work(chain, &sub, bottom_zeros_needed) {
            Work::None => {}
            Work::Zeros => {
                let mut done = 0;
                while done < sub.len && dest.probing() {
                    let n = (sub.len - done).min(PIECE as u64);
                    bufs.todo.clear();
                    let same = present.compare_probed(
                        None,
                        sub.offset + done,
                        n,
                        &mut bufs.scratch,
                        &mut bufs.todo,
                    )?;
                    dest.probed(same > 0);
                    equal += same;
                    done += n;
                }
            }
            Work::Data => {
                let mut done = 0;
                while done < sub.len && dest.probing() {
                    let n = (sub.len - done).min(PIECE as u64);
                    let part = ChainRun {
                        offset: sub.offset + done,
                        len: n,
                        mapping: sub.mapping.advanced(done),
                        depth: sub.depth,
                    };
                    done += n;
                    // The first block of both sides first (see `compare_probed`): most
                    // often they differ and neither piece needs reading.
                    let probe = n.min(present.block - part.offset % present.block);
                    if probe < n {
                        let head = ChainRun { len: probe, ..part };
                        let data = read_parts(chain, &[head], &mut bufs.data)?;
                        bufs.todo.clear();
                        let same = present.compare(
                            Some(data),
                            part.offset,
                            probe,
                            &mut bufs.scratch,
                            &mut bufs.todo,
                        )?;
                        if same < probe {
                            dest.probed(false);
                            continue;
                        }
                    }
                    let data = read_parts(chain, &[part], &mut bufs.data)?;
                    bufs.todo.clear();
                    let same = present.compare(
                        Some(data),
                        part.offset,
                        n,
                        &mut bufs.scratch,
                        &mut bufs.todo,
                    )?;
                    dest.probed(same > 0);
                    equal += same;
                }
            }
        }
    }
    Ok(equal)
}
