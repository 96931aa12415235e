//! The one read-ahead pipeline of the operations: a planner cuts the guest range into
//! pieces in guest order and says what to read for each (runs of one or two chains; none
//! for ranges that read as zeros), a bounded pool of reader threads reads them into pooled
//! buffers, and the calling thread takes the results in guest order.
//!
//! The planner runs on the calling thread, at most `depth` pieces ahead of the consumer,
//! and each piece goes to the readers as soon as it is planned: reads overlap with the
//! consumer's work (hashing, writing) and with each other. Errors, whether the planner's
//! or a read's, reach the consumer in guest order, after every piece before them: each is
//! returned once, as the layer that failed reported it (naming its file); a later piece's
//! error is dropped unseen. Memory is bounded by `depth` pieces (as long as the planner
//! makes them) per chain, plus as many spare buffers.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};

use crate::chain::{Chain, ChainRun};
use crate::error::{Error, Result};

/// A piece of the guest range, in guest order: what the planner says about it and what to
/// read for it.
#[derive(Debug)]
pub(crate) struct Piece<S> {
    /// What the planner says about the piece, for the consumer.
    pub step: S,
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes. Planners keep pieces that are read short (a few MiB at most):
    /// each takes a buffer of its length per chain.
    pub len: u64,
    /// Per chain of the pipeline: the runs to read, in order and inside the piece; the
    /// buffer holds zeros between them. No runs: nothing is read and there is no buffer.
    pub runs: [Vec<ChainRun>; 2],
    /// Whether the readers read the runs (else the consumer gets no buffers and reads,
    /// or copies, what it needs itself).
    pub read: bool,
}

impl<S> Piece<S> {
    /// A piece with nothing to read.
    pub fn unread(step: S, offset: u64, len: u64) -> Piece<S> {
        Piece {
            step,
            offset,
            len,
            runs: [Vec::new(), Vec::new()],
            read: false,
        }
    }

    /// Whether the readers have anything to read for it.
    fn reads(&self) -> bool {
        self.read && self.runs.iter().any(|r| !r.is_empty())
    }
}

/// Says what to read, piece by piece, in guest order.
pub(crate) trait Plan {
    /// What the planner tells the consumer about a piece.
    type Step: Send;

    /// The next piece; `None` at the end.
    fn next(&mut self) -> Result<Option<Piece<Self::Step>>>;
}

/// How many readers, and how far ahead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Reader threads. Each read is synchronous, so this is the number of reads in flight.
    pub readers: usize,
    /// Pieces planned ahead of the one the consumer works on.
    pub depth: usize,
}

/// The content of a piece, per chain: `None` where nothing was read.
pub(crate) type Content<'b> = [Option<&'b [u8]>; 2];

/// A buffer per chain.
type Buffers = [Option<Vec<u8>>; 2];

/// A piece on its way to the readers and back, with its buffers.
struct Job<S> {
    piece: Piece<S>,
    buffers: Buffers,
}

/// A job read (or failed to read).
type Done<S> = (Job<S>, Result<()>);

/// Pieces one reader reads in one go, in guest order. Small pieces (a 4 KiB cluster each
/// in a metadata-heavy merge) travel in batches: a thread handoff per piece cost more
/// than the read itself.
type Batch<S> = Vec<Job<S>>;

/// A batch to read, with where to send it back.
type Request<S> = (Batch<S>, SyncSender<Vec<Done<S>>>);

/// The readers' queue.
type Queue<S> = Mutex<Receiver<Request<S>>>;

/// A batch is sent to the readers once it holds this many bytes...
const BATCH_BYTES: u64 = 256 << 10;
/// ...or this many pieces.
const BATCH_PIECES: usize = 64;

/// A planned piece waiting for the consumer.
enum Pending<S> {
    /// Nothing to read.
    Ready(Piece<S>),
    /// Being read: it is the next one of the oldest batch not yet consumed.
    Batched,
    /// The planner failed here.
    Failed(Error),
}

/// The batches between the planner and the consumer, oldest first.
struct Batches<S> {
    /// Being gathered by the planner.
    open: Batch<S>,
    open_bytes: u64,
    /// Sent to the readers, oldest first.
    sent: VecDeque<Receiver<Vec<Done<S>>>>,
    /// The oldest batch, back from the readers, being consumed.
    received: VecDeque<Done<S>>,
}

impl<S: Send> Batches<S> {
    /// Batches holding buffers: sent, being consumed, or being gathered.
    fn held(&self) -> usize {
        self.sent.len()
            + usize::from(!self.received.is_empty())
            + usize::from(!self.open.is_empty())
    }

    /// Sends the open batch to the readers, if it holds anything.
    fn send(&mut self, jobs: &SyncSender<Request<S>>) {
        if self.open.is_empty() {
            return;
        }
        let (done, result) = sync_channel(1);
        // The readers live until `jobs` is dropped, so this cannot fail unless one
        // panicked, which the scope reports.
        let _ = jobs.send((std::mem::take(&mut self.open), done));
        self.open_bytes = 0;
        self.sent.push_back(result);
    }
}

/// Runs `plan` to its end over `chains` (one or two: the runs of `Piece::runs[i]` are
/// read from `chains[i]`), calling `consume` with each piece and its content in guest
/// order. `consume` returns `Ok(false)` to stop early (the result is then
/// [`Error::Cancelled`]).
///
/// At most `shape.depth` batches hold buffers at once, each of at most [`BATCH_BYTES`]
/// plus one piece; the planner runs at most `depth * BATCH_PIECES * 2` pieces ahead.
pub(crate) fn read_ahead<P: Plan>(
    chains: &[&Chain],
    shape: Shape,
    mut plan: P,
    mut consume: impl FnMut(Piece<P::Step>, Content<'_>) -> Result<bool>,
) -> Result<()> {
    let depth = shape.depth.max(1);
    // Pieces with nothing to read cost no buffer, but the planner stops somewhere.
    let max_window = depth * BATCH_PIECES * 2;
    std::thread::scope(|scope| {
        let (jobs, queue) = sync_channel::<Request<P::Step>>(depth);
        let queue = Arc::new(Mutex::new(queue));
        let mut readers_started = false;
        let mut window: VecDeque<Pending<P::Step>> = VecDeque::new();
        let mut batches = Batches {
            open: Vec::new(),
            open_bytes: 0,
            sent: VecDeque::new(),
            received: VecDeque::new(),
        };
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut planned = false;
        loop {
            while !planned && window.len() < max_window {
                if batches.open.is_empty() && batches.held() >= depth {
                    break; // No room for another batch's buffers.
                }
                let piece = match plan.next() {
                    Ok(Some(piece)) => piece,
                    Ok(None) => {
                        planned = true;
                        break;
                    }
                    Err(e) => {
                        window.push_back(Pending::Failed(e));
                        planned = true;
                        break;
                    }
                };
                if !piece.reads() {
                    window.push_back(Pending::Ready(piece));
                    continue;
                }
                if !readers_started {
                    readers_started = true;
                    for _ in 0..shape.readers.max(1) {
                        let queue = Arc::clone(&queue);
                        scope.spawn(move || read_jobs(chains, &queue));
                    }
                }
                let len = piece.len as usize;
                let buffers =
                    [0, 1].map(|i| (!piece.runs[i].is_empty()).then(|| buffer(&mut spare, len)));
                batches.open_bytes += piece.len;
                batches.open.push(Job { piece, buffers });
                window.push_back(Pending::Batched);
                if batches.open.len() >= BATCH_PIECES || batches.open_bytes >= BATCH_BYTES {
                    batches.send(&jobs);
                }
            }
            // Planning paused: what it gathered starts reading now if nothing else will
            // make it go (the end, a full window, or the consumer about to wait for it).
            if planned || window.len() >= max_window || batches.sent.is_empty() {
                batches.send(&jobs);
            }
            let Some(pending) = window.pop_front() else {
                return Ok(());
            };
            let (piece, buffers) = match pending {
                Pending::Ready(piece) => (piece, [None, None]),
                Pending::Batched => {
                    if batches.received.is_empty() {
                        let result = batches.sent.pop_front().expect("a batched piece was sent");
                        let done = result.recv().map_err(|_| {
                            Error::io("reading", std::io::Error::other("a reader thread failed"))
                        })?;
                        batches.received = done.into();
                    }
                    let (job, read) = batches.received.pop_front().expect("a batch is not empty");
                    read?;
                    (job.piece, job.buffers)
                }
                Pending::Failed(e) => return Err(e),
            };
            let len = piece.len as usize;
            let content = [0, 1].map(|i| buffers[i].as_deref().map(|b| &b[..len]));
            let keep_going = consume(piece, content)?;
            spare.extend(buffers.into_iter().flatten());
            if !keep_going {
                // Returning drops `jobs`: the readers stop after their current batch.
                return Err(Error::Cancelled);
            }
        }
    })
}

/// A buffer of at least `len` bytes: a spare one, grown if short, or a new one. Sized to
/// the piece, not to the longest one: small pieces then touch little fresh memory, which
/// costs more than the copy on these machines (a merge of small pieces measured 50%
/// slower with 1 MiB buffers).
fn buffer(spare: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    match spare.pop() {
        Some(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            buf
        }
        None => vec![0u8; len],
    }
}

/// A reader thread's loop: reads batches until the queue closes. A failed read ends its
/// batch: the consumer stops at the first error, so the pieces after it are never used.
fn read_jobs<S>(chains: &[&Chain], queue: &Queue<S>) {
    loop {
        // The lock is held while waiting only: reads overlap.
        let batch = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((batch, done)) = batch else {
            return; // The consumer finished or failed.
        };
        let mut failed = false;
        let results = batch
            .into_iter()
            .map(|mut job| {
                let result = if failed {
                    Err(Error::io(
                        "reading",
                        std::io::Error::other("an earlier read of its batch failed"),
                    ))
                } else {
                    read_job(chains, &mut job)
                };
                failed |= result.is_err();
                (job, result)
            })
            .collect();
        let _ = done.send(results);
    }
}

/// Reads one piece's runs into its buffers.
fn read_job<S>(chains: &[&Chain], job: &mut Job<S>) -> Result<()> {
    let piece = &job.piece;
    for (i, buffer) in job.buffers.iter_mut().enumerate() {
        if let Some(buffer) = buffer {
            let buf = &mut buffer[..piece.len as usize];
            read_runs(chains[i], &piece.runs[i], piece.offset, buf)?;
        }
    }
    Ok(())
}

/// Fills `buf` (guest `offset..`) from the runs of `chain` (in order, inside it), zeros
/// elsewhere.
pub(crate) fn read_runs(
    chain: &Chain,
    runs: &[ChainRun],
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    let mut filled = 0usize;
    for run in runs {
        let at = (run.offset - offset) as usize;
        debug_assert!(at >= filled && at + run.len as usize <= buf.len());
        buf[filled..at].fill(0);
        filled = at + run.len as usize;
        chain.read_run(run, &mut buf[at..filled])?;
    }
    buf[filled..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_chain::{content, memory_chain};
    use super::*;
    use crate::qcow2::Mapping;

    /// A chain of `size` bytes whose guest byte at `i` is `(i / 512) as u8`.
    fn patterned(size: u64) -> Chain {
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        memory_chain(size, &[(0, &data)])
    }

    /// Plans the whole chain in pieces of `len` bytes, each read unless its index is in
    /// `unread`; fails at piece `fail_at`.
    struct Fixed<'c> {
        chain: &'c Chain,
        len: u64,
        next: u64,
        unread: Vec<u64>,
        fail_at: Option<u64>,
    }

    impl Plan for Fixed<'_> {
        type Step = u64;
        fn next(&mut self) -> Result<Option<Piece<u64>>> {
            let index = self.next;
            let offset = index * self.len;
            if offset >= self.chain.size() {
                return Ok(None);
            }
            if self.fail_at == Some(index) {
                return Err(Error::InvalidArgument("planned to fail".into()));
            }
            self.next += 1;
            if self.unread.contains(&index) {
                return Ok(Some(Piece::unread(index, offset, self.len)));
            }
            let runs = self
                .chain
                .runs(offset, self.len)
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Piece {
                step: index,
                offset,
                len: self.len,
                runs: [runs, Vec::new()],
                read: true,
            }))
        }
    }

    fn fixed(chain: &Chain, unread: Vec<u64>, fail_at: Option<u64>) -> Fixed<'_> {
        Fixed {
            chain,
            len: 64 << 10,
            next: 0,
            unread,
            fail_at,
        }
    }

    const SHAPE: Shape = Shape {
        readers: 3,
        depth: 5,
    };

    #[test]
    fn pieces_arrive_in_guest_order_with_their_content() {
        let chain = patterned(4 << 20);
        let mut seen = Vec::new();
        read_ahead(
            &[&chain],
            SHAPE,
            fixed(&chain, vec![3, 7], None),
            |piece, [bytes, none]| {
                match bytes {
                    Some(bytes) => {
                        let want = content(&chain, piece.offset, piece.len);
                        assert_eq!(bytes, want, "piece {}", piece.step);
                    }
                    None => assert!([3, 7].contains(&piece.step), "piece {}", piece.step),
                }
                assert!(none.is_none());
                seen.push(piece.step);
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn a_planning_error_comes_after_every_piece_before_it() {
        let chain = patterned(1 << 20);
        let mut seen = Vec::new();
        let result = read_ahead(
            &[&chain],
            SHAPE,
            fixed(&chain, vec![], Some(9)),
            |piece, _| {
                seen.push(piece.step);
                Ok(true)
            },
        );
        assert!(
            matches!(result, Err(Error::InvalidArgument(_))),
            "{result:?}"
        );
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn a_read_error_is_returned_once_in_guest_order() {
        let chain = patterned(1 << 20);
        // Runs that point past the end of the file fail to read.
        struct Broken<'c>(Fixed<'c>);
        impl Plan for Broken<'_> {
            type Step = u64;
            fn next(&mut self) -> Result<Option<Piece<u64>>> {
                let mut piece = self.0.next()?;
                if let Some(p) = piece.as_mut().filter(|p| p.step >= 4) {
                    for run in &mut p.runs[0] {
                        run.mapping = Mapping::Data {
                            host: 1 << 40,
                            copied: true,
                        };
                    }
                }
                Ok(piece)
            }
        }
        let mut seen = Vec::new();
        let result = read_ahead(
            &[&chain],
            SHAPE,
            Broken(fixed(&chain, vec![], None)),
            |p, _| {
                seen.push(p.step);
                Ok(true)
            },
        );
        let error = result.unwrap_err();
        assert_eq!(error.file(), Some(std::path::Path::new("/img.qcow2")));
        assert_eq!(seen, [0, 1, 2, 3]);
    }

    #[test]
    fn a_consumer_that_says_stop_cancels() {
        let chain = patterned(1 << 20);
        let mut seen = 0;
        let result = read_ahead(&[&chain], SHAPE, fixed(&chain, vec![], None), |_, _| {
            seen += 1;
            Ok(seen < 3)
        });
        assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
        assert_eq!(seen, 3);
    }

    #[test]
    fn buffers_are_reused_and_bounded() {
        let chain = patterned(4 << 20);
        let mut addresses = std::collections::HashSet::new();
        read_ahead(
            &[&chain],
            SHAPE,
            fixed(&chain, vec![], None),
            |_, content| {
                addresses.insert(content[0].unwrap().as_ptr() as usize);
                Ok(true)
            },
        )
        .unwrap();
        // At most `depth` batches hold buffers (one of them the piece consumed), each
        // filled up to BATCH_BYTES by 64 KiB pieces.
        let per_batch = (BATCH_BYTES / (64 << 10)) as usize;
        assert!(
            addresses.len() <= SHAPE.depth * per_batch,
            "{}",
            addresses.len()
        );
    }
}
