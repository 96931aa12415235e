//! Merging chains: commit (push overlay data down), pull (bring backing data up) and
//! rebase, as `qemu-img commit`, libvirt `blockcommit`/`blockpull` and `qemu-img rebase`.
//!
//! All of them are one pass over the chain's resolved runs: each guest range is read
//! once, from the layer that decides it, however deep the chain, and written to the
//! destination in large pieces; zeros travel as zero flags, never as zero bytes.
//!
//! # Crash safety
//!
//! The destination only changes where layers above it shadow it (commit) or only gains
//! what it already showed (pull), so what the active image shows never changes. Backing
//! pointers are rewritten last, after the data they expose is flushed. The destination
//! is flushed every [`MergeOptions::checkpoint_bytes`], so an interruption keeps what was
//! copied. Running the same command again after an interruption completes the merge, and
//! skips what is in place already ([`MergeReport::already_done_bytes`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use crate::chain::{Chain, ChainOptions, ChainRun};
use crate::error::{Error, Result};
use crate::layers::{Format, Layer};
use crate::names::resolve_relative;
use crate::progress::{Progress, Tracker};
use crate::qcow2::{AmendOptions, Mapping, Run};
use crate::storage::write_zeros;

use super::bytes::is_zero;

/// What a merge copied (or, in a dry run, would copy).
///
/// `data_bytes + zero_bytes + already_done_bytes` is the merge's whole work: every byte
/// the destination must show is counted once, as written or as found in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Bytes of data written to the destination.
    pub data_bytes: u64,
    /// Bytes made to read as zeros in the destination (zero flags).
    pub zero_bytes: u64,
    /// Bytes the merge had to bring to the destination but found there already, equal,
    /// and so did not write: what an interrupted run of the same merge had copied (and
    /// flushed), or what the destination itself held equal before. Only what the
    /// destination allocates counts, so a fresh commit into an area its base does not
    /// allocate reports 0.
    pub already_done_bytes: u64,
    /// Bytes of the guest range examined.
    pub examined_bytes: u64,
}

/// The default of [`MergeOptions::checkpoint_bytes`]: 1 GiB. Each checkpoint waits for
/// the disk (several flushes) and stalls the copy; at 1 GiB they stay rare while an
/// interrupted long merge still keeps most of its work.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 1 << 30;

/// Options shared by the merges.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Only report what would be copied; change nothing.
    pub dry_run: bool,
    /// How images are opened: their storage ([`crate::ImageOptions::opener`]), the
    /// backing policy, the depth limit, the L2 cache. Each step of a merge sets
    /// `writable`, `no_backing` and `format` itself (formats are probed, or come from the
    /// backing format a chain stores).
    pub chain: ChainOptions,
    /// Flush the destination whenever this many bytes (data and zeros) went into it since
    /// the last flush, so that an interruption keeps them and a rerun skips them; 0
    /// flushes only at the end. Default [`DEFAULT_CHECKPOINT_BYTES`].
    pub checkpoint_bytes: u64,
    /// When data goes to the destination as a storage copy (`copy_file_range` for host
    /// files) instead of being read and written. Default [`StorageCopy::Auto`].
    pub storage_copy: StorageCopy,
}

impl Default for MergeOptions {
    fn default() -> MergeOptions {
        MergeOptions {
            dry_run: false,
            chain: ChainOptions::default(),
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            storage_copy: StorageCopy::Auto,
        }
    }
}

/// When a merge lets the storage copy data ([`crate::storage::Storage::copy_from`])
/// instead of reading it and writing it. Only uncompressed data goes this way, and not
/// where the destination's own data is still compared with it (looking for what an
/// interrupted run left, see [`MergeReport::already_done_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageCopy {
    /// Where the copy shares extents: source and destination are host files on one XFS
    /// or Btrfs file system, and the kernel's `copy_file_range` makes the destination's
    /// clusters point at the source's blocks without moving data. Elsewhere data is read
    /// ahead on several threads and written, which measured faster than the kernel's
    /// copy (ext4 copies page by page, one request at a time).
    #[default]
    Auto,
    /// For all such data (for example to a file system that copies on the server).
    Always,
    /// Never: always read and write.
    Never,
}

/// `qemu-img commit` and libvirt blockcommit.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// The image to commit into (default: the backing file of `top`).
    pub base: Option<PathBuf>,
    /// The highest image whose data is committed (default: the image the command starts
    /// from). When it is below that image, the image directly above it is re-pointed at
    /// the base afterwards (libvirt's blockcommit of a middle range).
    pub top: Option<PathBuf>,
    /// Keep the committed image's data (`-d`); implied by `base` or a `top` below the
    /// starting image, as in qemu-img.
    pub keep: bool,
    /// Shared options.
    pub merge: MergeOptions,
}

/// Which layer of `chain` is the file at `path` (the same file, as the opener the chain
/// was opened through sees it: same device and inode for host files).
pub fn find_layer(chain: &Chain, path: impl AsRef<Path>) -> Result<usize> {
    let path = path.as_ref();
    let want = chain
        .stat(path)
        .map_err(|e| Error::io("opening", e).in_file(path))?;
    for (i, layer) in chain.layers().iter().enumerate() {
        if chain.stat(layer.name()).is_ok_and(|m| m.id == want.id) {
            return Ok(i);
        }
    }
    Err(Error::InvalidArgument(format!(
        "{} is not in the backing chain of {}",
        path.display(),
        chain.top().name().display()
    )))
}

/// Where writes of a merge go.
trait Sink {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn start_writeback(&self) -> Result<()>;
    /// Writes at `offset` the `len` bytes `from` stores at `host`, copied by the storage.
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()>;
    /// Whether [`Sink::copy`] from `from` shares extents instead of moving data.
    fn shares_extents_with(&self, from: &Layer) -> bool;
}

impl Sink for Chain {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        Chain::flush(self)
    }
    fn start_writeback(&self) -> Result<()> {
        Chain::start_writeback(self)
    }
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()> {
        self.copy_in(from, host, len, offset)
    }
    fn shares_extents_with(&self, from: &Layer) -> bool {
        self.top()
            .data_storage()
            .shares_extents_with(from.data_storage())
    }
}

/// A chain whose zeros must hide a backing file it does not have yet: a version 2 image
/// without one makes zeroed clusters unallocated, which the new backing file of a rebase
/// would then show through. Zeros are written as data.
struct ZerosAsData<'a>(&'a Chain);

impl Sink for ZerosAsData<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        write_zeros(offset, len, |zeros, at| self.0.write_at(zeros, at))
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn start_writeback(&self) -> Result<()> {
        self.0.start_writeback()
    }
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()> {
        self.0.copy_in(from, host, len, offset)
    }
    fn shares_extents_with(&self, from: &Layer) -> bool {
        self.0.shares_extents_with(from)
    }
}

/// The largest piece of data read and written at once (1 MiB stays in the CPU caches
/// between the read and the write; 4 MiB measured twice the CPU time).
const PIECE: usize = 1 << 20;

/// Writeback of the destination is started every this many bytes written: the disk then
/// writes while the merge copies, instead of all at the final flush (which took half of
/// a warm merge's time), and dirty pages never pile up.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// The writing side of a merge: the sink (none in a dry run), the report, the periodic
/// flushes.
struct Out<'a> {
    sink: Option<&'a dyn Sink>,
    report: MergeReport,
    checkpoint_bytes: u64,
    unflushed: u64,
    /// Bytes written since writeback was last started.
    unstarted: u64,
    storage_copy: StorageCopy,
}

impl<'a> Out<'a> {
    fn new(sink: Option<&'a dyn Sink>, options: &MergeOptions) -> Out<'a> {
        Out {
            storage_copy: options.storage_copy,
            sink,
            report: MergeReport::default(),
            checkpoint_bytes: options.checkpoint_bytes,
            unflushed: 0,
            unstarted: 0,
        }
    }

    fn data(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.report.data_bytes += buf.len() as u64;
        if let Some(s) = self.sink {
            s.write(buf, offset)?;
        }
        self.wrote(buf.len() as u64)
    }

    /// Copies what `run` (a data run of `from`) holds to the same guest offset.
    fn copy(&mut self, from: &Layer, run: &ChainRun) -> Result<()> {
        let Mapping::Data { host, .. } = run.mapping else {
            return Err(Error::InvalidArgument(
                "only data runs are copied by the storage".into(),
            ));
        };
        self.report.data_bytes += run.len;
        if let Some(s) = self.sink {
            s.copy(from, host, run.len, run.offset)?;
        }
        self.wrote(run.len)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.report.zero_bytes += len;
        if let Some(s) = self.sink {
            s.zero(offset, len)?;
        }
        self.wrote(len)
    }

    /// Flushes the sink once `checkpoint_bytes` went into it since the last flush.
    fn wrote(&mut self, n: u64) -> Result<()> {
        self.unflushed += n;
        self.unstarted += n;
        if let Some(s) = self.sink {
            if self.checkpoint_bytes > 0 && self.unflushed >= self.checkpoint_bytes {
                s.flush()?;
                self.unflushed = 0;
                self.unstarted = 0;
            } else if self.unstarted >= WRITEBACK_BYTES {
                s.start_writeback()?;
                self.unstarted = 0;
            }
        }
        Ok(())
    }
}

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
struct Present<'a> {
    layer: &'a Layer,
    /// Comparisons go by the destination's unit of allocation (see [`allocation_unit`]).
    block: u64,
}

/// What a layer allocates at once: a cluster, or a subcluster with extended L2 entries
/// (64 KiB for raw files). A merge compares and copies by these units: the layer's own
/// data and what an interrupted merge copied into it never share one, while they can
/// share a cluster of 32 subclusters.
fn allocation_unit(layer: &Layer) -> u64 {
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
    fn any(&self, offset: u64, len: u64) -> Result<bool> {
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
    fn compare_probed(
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
    fn compare(
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

/// What a range decided by a merged layer asks of the destination.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Nothing: nothing in the whole chain allocates it and no zeros are needed.
    None,
    /// To read as zeros.
    Zeros,
    /// To hold the layer's data.
    Data,
}

/// What `run` (decided by a merged layer) asks of the destination. Ranges that read as
/// zeros need zeros there, except ranges nothing in the whole chain allocates when
/// `bottom_zeros_needed` is false (the destination will have no backing file); past the
/// end of a shorter layer they always do.
fn work(chain: &Chain, run: &ChainRun, bottom_zeros_needed: bool) -> Work {
    match run.mapping {
        Mapping::Zero { .. } => Work::Zeros,
        Mapping::Unallocated => {
            let last = chain.layers().len() - 1;
            let nothing_below = run.depth == last && run.offset < chain.layers()[run.depth].size();
            if nothing_below && !bottom_zeros_needed {
                Work::None
            } else {
                Work::Zeros
            }
        }
        _ => Work::Data,
    }
}

/// The destination of [`copy_decided`].
struct Dest<'a> {
    /// What it holds.
    present: Present<'a>,
    /// It is this layer of the chain read (the top, for pull and rebase); `None` when it
    /// lies below the merged layers (commit).
    in_chain: Option<usize>,
    /// Probes in a row that found the destination holding something else (see
    /// [`Dest::probing`]).
    misses: std::cell::Cell<u32>,
}

/// After this many pieces in a row whose first block differs, a merge stops looking for
/// what an interrupted run left: that run went through the guest range in order, so past
/// the point where it stopped nothing matches, and each probe is a read (a seek, cold).
const PROBE_MISSES: u32 = 16;

impl Dest<'_> {
    /// Whether pieces the destination already allocates are still compared before being
    /// written (else they are written as a merge that never ran would write them).
    fn probing(&self) -> bool {
        self.misses.get() < PROBE_MISSES
    }

    /// Notes what comparing one piece found.
    fn probed(&self, found_in_place: bool) {
        self.misses.set(if found_in_place {
            0
        } else {
            self.misses.get() + 1
        });
    }
}

/// Reads the data runs `parts` (contiguous) into `buf`.
fn read_parts(chain: &Chain, parts: &[ChainRun], buf: &mut Vec<u8>) -> Result<usize> {
    let len: u64 = parts.iter().map(|r| r.len).sum();
    if buf.len() < len as usize {
        buf.resize(len as usize, 0);
    }
    let mut at = 0usize;
    for part in parts {
        let n = part.len as usize;
        chain.read_run(part, &mut buf[at..at + n])?;
        at += n;
    }
    Ok(at)
}

/// Buffers of one merge pass.
#[derive(Default)]
struct Buffers {
    data: Vec<u8>,
    scratch: Vec<u8>,
    todo: Vec<(u64, u64)>,
}

/// Writes the data runs `runs` (contiguous, at most [`PIECE`] in all) where the
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

/// How much of `run`, which the destination (layer `run.depth` of `chain`) decides
/// itself, the layers `copy` below it would bring as the destination holds it: what an
/// interrupted run of the merge copied already (or what happened to be equal). Where it
/// differs the destination's own data decides, and there is nothing to do.
fn in_place(
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
                        read_parts(chain, &[head], &mut bufs.data)?;
                        bufs.todo.clear();
                        let same = present.compare(
                            Some(&bufs.data[..probe as usize]),
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
                    read_parts(chain, &[part], &mut bufs.data)?;
                    bufs.todo.clear();
                    let same = present.compare(
                        Some(&bufs.data[..n as usize]),
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

/// One step of a merge, in guest order (see [`copy_decided`]).
enum Step {
    /// Contiguous data runs, at most [`PIECE`] in all, that the destination needs, with
    /// their data once read ahead (`None` in a dry run).
    Data {
        runs: Vec<ChainRun>,
        read: Option<Receiver<Result<Vec<u8>>>>,
        /// Every run is plain data the destination can take by shared extents
        /// ([`Sink::copy`]): nothing is read ahead.
        by_copy: bool,
    },
    /// To read as zeros.
    Zeros { offset: u64, len: u64 },
    /// A run the destination (a layer of the chain) decides itself.
    InPlace(ChainRun),
}

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

/// Turns the chain's runs into [`Step`]s, in guest order.
struct Plan<'c> {
    chain: &'c Chain,
    first: usize,
    copy: std::ops::Range<usize>,
    bottom_zeros_needed: bool,
    /// Destination layer in the chain, if any (see [`Dest::in_chain`]).
    in_chain: Option<usize>,
    /// Per layer: whether the destination takes its data by shared extents.
    shares_extents: Vec<bool>,
    /// Where planning goes on.
    pos: u64,
    /// The data run being cut into pieces, and how much of it was cut.
    data: Option<(ChainRun, u64)>,
    /// The piece being gathered.
    piece: Vec<ChainRun>,
    piece_len: u64,
    /// A step found while a piece was gathered: it comes after the piece.
    pending_step: Option<(Step, u64)>,
}

impl Plan<'_> {
    /// The next step, and how far the guest range is planned with it; `None` at the end.
    fn next(&mut self) -> Result<Option<(Step, u64)>> {
        let size = self.chain.size();
        if let Some(step) = self.pending_step.take() {
            return Ok(Some(step));
        }
        loop {
            if let Some((run, done)) = self.data.take() {
                let contiguous = self
                    .piece
                    .last()
                    .is_none_or(|r| r.end() == run.offset + done);
                if self.piece_len == PIECE as u64 || !contiguous {
                    self.data = Some((run, done));
                    return Ok(Some(self.take_piece()));
                }
                let n = (run.len - done).min(PIECE as u64 - self.piece_len);
                self.piece.push(ChainRun {
                    offset: run.offset + done,
                    len: n,
                    mapping: run.mapping.advanced(done),
                    depth: run.depth,
                });
                self.piece_len += n;
                if done + n < run.len {
                    self.data = Some((run, done + n));
                }
                continue;
            }
            if self.pos >= size {
                return Ok(if self.piece.is_empty() {
                    None
                } else {
                    Some(self.take_piece())
                });
            }
            let run = self
                .chain
                .resolve_from(self.first, self.pos, size - self.pos)?;
            self.pos = run.end();
            let step = if self.in_chain == Some(run.depth) && run.mapping != Mapping::Unallocated {
                Step::InPlace(run)
            } else if self.copy.contains(&run.depth) {
                match work(self.chain, &run, self.bottom_zeros_needed) {
                    Work::None => continue,
                    Work::Zeros => Step::Zeros {
                        offset: run.offset,
                        len: run.len,
                    },
                    Work::Data => {
                        self.data = Some((run, 0));
                        continue;
                    }
                }
            } else {
                continue;
            };
            // A step that is not data ends the piece before it.
            if self.piece.is_empty() {
                return Ok(Some((step, self.pos)));
            }
            self.pending_step = Some((step, self.pos));
            return Ok(Some(self.take_piece()));
        }
    }

    /// The gathered piece as a step, planned to its end.
    fn take_piece(&mut self) -> (Step, u64) {
        self.piece_len = 0;
        let end = self.piece.last().map_or(self.pos, ChainRun::end);
        let by_copy = self
            .piece
            .iter()
            .all(|r| matches!(r.mapping, Mapping::Data { .. }) && self.shares_extents[r.depth]);
        let step = Step::Data {
            runs: std::mem::take(&mut self.piece),
            read: None,
            by_copy,
        };
        (step, end)
    }
}

/// Copies into `out` every range of `chain`, seen from layer `first`, that one of the
/// layers `copy` decides (see [`work`]) and that `dest` does not hold already. Where the
/// destination is a layer of the chain, the ranges it decides itself are checked for
/// what an interrupted run left there.
///
/// The data is read ahead on other threads ([`ReadAhead`]) while this one writes, in
/// guest order. Planning runs ahead of the writing: in a pull the destination is the
/// chain's top, and a write that fills the rest of a cluster from below can turn a
/// range planned as data into one the top holds. Writing it again writes what is there.
fn copy_decided(
    chain: &Chain,
    first: usize,
    copy: std::ops::Range<usize>,
    bottom_zeros_needed: bool,
    dest: &Dest<'_>,
    out: &mut Out<'_>,
    progress: &mut Tracker<'_, '_>,
) -> Result<()> {
    let size = chain.size();
    let mut plan = Plan {
        chain,
        first,
        copy: copy.clone(),
        bottom_zeros_needed,
        in_chain: dest.in_chain,
        shares_extents: chain
            .layers()
            .iter()
            .map(|layer| match (out.sink, out.storage_copy) {
                (None, _) | (_, StorageCopy::Never) => false,
                (Some(_), StorageCopy::Always) => true,
                (Some(s), StorageCopy::Auto) => s.shares_extents_with(layer),
            })
            .collect(),
        pos: 0,
        data: None,
        piece: Vec::new(),
        piece_len: 0,
        pending_step: None,
    };
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

fn open(options: &ChainOptions, path: &Path, writable: bool, no_backing: bool) -> Result<Chain> {
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
fn repoint_options(
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
fn set_backing(open_options: &ChainOptions, overlay: &Path, amend: &AmendOptions) -> Result<()> {
    let image = open(open_options, overlay, true, true)?;
    image.amend(amend)?;
    image.close()
}

/// Commits as `qemu-img commit` / libvirt blockcommit (see [`CommitOptions`]) starting
/// from the image at `path`.
pub fn commit(
    path: impl AsRef<Path>,
    options: &CommitOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    let path = path.as_ref();
    let open_options = &options.merge.chain;
    let chain = open(open_options, path, false, false)?;
    let n = chain.layers().len();
    let top = match &options.top {
        Some(p) => find_layer(&chain, p)?,
        None => 0,
    };
    let base = match &options.base {
        Some(p) => find_layer(&chain, p)?,
        None => top + 1,
    };
    if base >= n {
        return Err(Error::InvalidArgument(format!(
            "{} has no backing file to commit into",
            chain.layers()[top].name().display()
        )));
    }
    if base <= top {
        return Err(Error::InvalidArgument(
            "the base must lie below the top in the backing chain".into(),
        ));
    }
    let keep = options.keep || options.base.is_some() || top > 0;
    // A middle range goes down as its top layer shows it: up to that layer's size,
    // whether the active image is shorter or longer.
    let from_top;
    let (data, copy) = if top > 0 {
        from_top = open(open_options, chain.layers()[top].name(), false, false)?;
        (&from_top, 0..base - top)
    } else {
        (&chain, 0..base)
    };
    let mut tracker = Tracker::new(progress, data.size());
    if options.merge.dry_run {
        let dest = Dest {
            present: Present::new(&chain.layers()[base]),
            in_chain: None,
            misses: std::cell::Cell::new(0),
        };
        let mut out = Out::new(
            None,
            &MergeOptions {
                checkpoint_bytes: 0,
                ..MergeOptions::default()
            },
        );
        copy_decided(data, 0, copy, true, &dest, &mut out, &mut tracker)?;
        hide_tail(&chain, top, &dest, &mut out)?;
        tracker.finish()?;
        return Ok(out.report);
    }
    let base_path = chain.layers()[base].name().to_path_buf();
    let base_chain = open(open_options, &base_path, true, false)?;
    let needed = chain.layers()[top].size();
    if base_chain.size() < needed {
        base_chain.resize(needed.div_ceil(512) * 512, false)?;
    }
    let dest = Dest {
        present: Present::new(base_chain.top()),
        in_chain: None,
        misses: std::cell::Cell::new(0),
    };
    let mut out = Out::new(Some(&base_chain), &options.merge);
    copy_decided(data, 0, copy, true, &dest, &mut out, &mut tracker)?;
    hide_tail(&chain, top, &dest, &mut out)?;
    let report = out.report;
    base_chain.close()?;
    drop(base_chain);
    if top > 0 {
        let above = chain.layers()[top - 1].name().to_path_buf();
        let amend = repoint_options(&chain, &above, Some(base))?;
        set_backing(open_options, &above, &amend)?;
    } else if !keep {
        let size = chain.size();
        drop(chain);
        let file = open(open_options, path, true, true)?;
        file.make_empty(size)?;
        file.close()?;
    }
    tracker.finish()?;
    Ok(report)
}

/// Before a middle range (layers `top..`, `top` > 0) is committed, the images above it see
/// zeros past the end of layer `top` where they allocate nothing; re-pointed at a longer
/// base they would see its data there. So the base reads as zeros from the end of `top`
/// as far as any image above reaches (QEMU's block-commit leaves that data showing).
fn hide_tail(chain: &Chain, top: usize, dest: &Dest<'_>, out: &mut Out<'_>) -> Result<()> {
    if top == 0 {
        return Ok(());
    }
    let from = chain.layers()[top].size();
    let reach = chain.layers()[..top]
        .iter()
        .map(Layer::size)
        .max()
        .unwrap_or(0);
    let end = reach.min(dest.present.layer.size());
    if end <= from {
        return Ok(());
    }
    let mut bufs = Buffers::default();
    out.report.already_done_bytes +=
        dest.present
            .compare(None, from, end - from, &mut bufs.scratch, &mut bufs.todo)?;
    for &(o, l) in &bufs.todo {
        out.zero(o, l)?;
    }
    Ok(())
}

/// Pulls as libvirt blockpull: everything the image at `path` shows from layers above
/// `base` (all layers when `None`) is copied into it, then its backing file becomes
/// `base` (none). What it shows does not change.
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
        Some(p) => {
            let b = find_layer(&chain, p)?;
            if b == 0 {
                return Err(Error::InvalidArgument(
                    "the base must be below the image".into(),
                ));
            }
            Some(b)
        }
        None => None,
    };
    let stop = b.unwrap_or(n);
    let sink: Option<&dyn Sink> = if options.dry_run { None } else { Some(&chain) };
    let dest = Dest {
        present: Present::new(chain.top()),
        in_chain: Some(0),
        misses: std::cell::Cell::new(0),
    };
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
        let sink: Option<&dyn Sink> = match chain.top() {
            _ if options.dry_run => None,
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
            Some(p) if find_layer(&chain, p).ok() == Some(0) => {
                return Err(loop_error(p).in_file(path));
            }
            Some(p) => find_layer(&chain, p).ok(),
        };
        let mut out = Out::new(sink, options);
        match in_chain {
            // The new backing file is in the chain: copy what the layers above it decide.
            Some(b) => {
                let dest = Dest {
                    present: Present::new(chain.top()),
                    in_chain: Some(0),
                    misses: std::cell::Cell::new(0),
                };
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

impl Chain {
    /// Makes every cluster of the top image unallocated (qemu-img commit empties the
    /// committed image this way).
    fn make_empty(&self, size: u64) -> Result<()> {
        match self.top() {
            Layer::Qcow2(image) => image.discard_whole(0, size),
            Layer::Raw(_) => Err(Error::Unsupported("emptying a raw image")),
        }
    }
}
