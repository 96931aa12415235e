//! Reading a chain's guest content, and optionally a second chain's content at the same
//! guest offsets, in aligned windows on a reader thread.
//!
//! Converting to qcow2 decides per output cluster, so every piece of data handed to the
//! consumer starts at a multiple of the alignment (the output's cluster size) and holds
//! whole clusters (the last one may end at the image's end). Ranges where both chains read
//! as zeros by their mapping (unallocated, zero clusters, past the end of the second chain)
//! are never read and come as [`Piece::Zero`], merged however long they are.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::chain::{Chain, ChainRun};
use crate::error::{Error, Result};

/// A piece of guest content, in guest order.
pub(crate) enum Piece<'b> {
    /// `len` bytes at `offset` read as zeros in both chains (nothing was read).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The content of `offset..offset + len`.
    Data {
        /// Guest offset, a multiple of the alignment.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The source's bytes; `None` when the source reads as zeros throughout.
        src: Option<&'b [u8]>,
        /// The second chain's bytes; `None` when there is no second chain or it reads as
        /// zeros throughout.
        base: Option<&'b [u8]>,
    },
}

/// A piece as it travels from the reader thread: data owns its buffers.
enum Message {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        len: u64,
        src: Option<Vec<u8>>,
        base: Option<Vec<u8>>,
    },
}

/// Pieces in flight between the reader and the consumer.
const QUEUE: usize = 3;

/// How the content is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    /// Largest data piece, in bytes; rounded up to a multiple of `align`.
    pub window: u64,
    /// Data pieces start at multiples of this (a power of two).
    pub align: u64,
}

/// Calls `consume` with the content of `src` (and of `base` at the same offsets, zeros
/// past its end), start to end of `src`. `consume` returns `Ok(false)` to stop early (the
/// result is then [`Error::Cancelled`]).
pub(crate) fn for_each_window(
    src: &Chain,
    base: Option<&Chain>,
    cut: Windows,
    mut consume: impl FnMut(Piece<'_>) -> Result<bool>,
) -> Result<()> {
    let window = cut.window.max(cut.align).div_ceil(cut.align) * cut.align;
    let cut = Windows { window, ..cut };
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<Message>>(QUEUE);
        let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(2 * QUEUE + 4);
        scope.spawn(move || {
            if let Err(e) = produce(src, base, cut, &tx, &pool_rx) {
                let _ = tx.send(Err(e));
            }
        });
        for message in rx {
            let keep_going = match message? {
                Message::Zero { offset, len } => consume(Piece::Zero { offset, len })?,
                Message::Data {
                    offset,
                    len,
                    src,
                    base,
                } => {
                    let go = consume(Piece::Data {
                        offset,
                        len,
                        src: src.as_deref().map(|b| &b[..len as usize]),
                        base: base.as_deref().map(|b| &b[..len as usize]),
                    })?;
                    for buf in [src, base].into_iter().flatten() {
                        let _ = pool_tx.try_send(buf);
                    }
                    go
                }
            };
            if !keep_going {
                // Dropping the receiver stops the reader at its next send.
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    })
}

/// One chain's runs over a window: where its content is not zero by mapping.
struct ViewRuns {
    runs: Vec<ChainRun>,
    /// First and last non-zero byte range (start of the first, end of the last), if any.
    extent: Option<(u64, u64)>,
}

/// The runs of `chain` over `lo..hi`, clipped to its size.
fn view_runs(chain: &Chain, lo: u64, hi: u64) -> Result<ViewRuns> {
    let hi = hi.min(chain.size());
    let mut runs = Vec::new();
    let mut extent: Option<(u64, u64)> = None;
    if lo < hi {
        for run in chain.runs(lo, hi - lo) {
            let run = run?;
            if !run.reads_as_zero() {
                extent = Some(match extent {
                    Some((a, _)) => (a, run.end()),
                    None => (run.offset, run.end()),
                });
                runs.push(run);
            }
        }
    }
    Ok(ViewRuns { runs, extent })
}

/// Where the content of `chain` from `pos` on first stops reading as zeros by mapping
/// (`u64::MAX` when it never does before the chain's end).
fn zero_until(chain: &Chain, pos: u64) -> Result<u64> {
    if pos >= chain.size() {
        return Ok(u64::MAX);
    }
    let run = chain.resolve(pos, chain.size() - pos)?;
    Ok(match run.reads_as_zero() {
        true if run.end() >= chain.size() => u64::MAX,
        true => run.end(),
        false => pos,
    })
}

/// Fills `buf` (guest `lo..`) from the non-zero `runs`, zeros elsewhere.
fn fill(chain: &Chain, runs: &[ChainRun], lo: u64, buf: &mut [u8]) -> Result<()> {
    let hi = lo + buf.len() as u64;
    let mut filled = lo;
    for run in runs {
        if run.end() <= lo || run.offset >= hi {
            continue;
        }
        // Non-zero runs lie inside the aligned data range: it was widened around them.
        debug_assert!(run.offset >= lo && run.end() <= hi);
        buf[(filled - lo) as usize..(run.offset - lo) as usize].fill(0);
        let at = (run.offset - lo) as usize;
        chain.read_run(run, &mut buf[at..at + run.len as usize])?;
        filled = run.end();
    }
    buf[(filled - lo) as usize..].fill(0);
    Ok(())
}

/// The reader thread's loop. Returns when done or when the consumer has gone.
fn produce(
    src: &Chain,
    base: Option<&Chain>,
    cut: Windows,
    tx: &SyncSender<Result<Message>>,
    pool: &Receiver<Vec<u8>>,
) -> Result<()> {
    let size = src.size();
    let align_down = |x: u64| x / cut.align * cut.align;
    // Start of the zero range not yet sent; it reaches up to `pos`.
    let mut zero_start = 0u64;
    let mut pos = 0u64;
    let send = |m: Message| tx.send(Ok(m)).is_ok();
    while pos < size {
        // Skip long zero stretches without cutting them into windows.
        let mut until = zero_until(src, pos)?;
        if let Some(b) = base {
            until = until.min(zero_until(b, pos)?);
        }
        let skip_to = align_down(until.min(size)).max(pos);
        if until >= size {
            break; // zeros to the end
        }
        if skip_to > pos {
            pos = skip_to;
            continue;
        }
        let end = size.min(pos / cut.window * cut.window + cut.window);
        let s = view_runs(src, pos, end)?;
        let b = base.map(|b| view_runs(b, pos, end)).transpose()?;
        let extent = match (s.extent, b.as_ref().and_then(|b| b.extent)) {
            (Some((a, z)), Some((c, y))) => Some((a.min(c), z.max(y))),
            (e, None) | (None, e) => e,
        };
        let Some((first, last)) = extent else {
            pos = end;
            continue;
        };
        let lo = align_down(first).max(pos);
        let hi = last.div_ceil(cut.align).saturating_mul(cut.align).min(end);
        if lo > zero_start
            && !send(Message::Zero {
                offset: zero_start,
                len: lo - zero_start,
            })
        {
            return Ok(());
        }
        let len = hi - lo;
        let read = |chain: &Chain, view: &ViewRuns| -> Result<Option<Vec<u8>>> {
            if view.extent.is_none() {
                return Ok(None);
            }
            let mut buf = pool
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; cut.window as usize]);
            if buf.len() < len as usize {
                buf.resize(cut.window as usize, 0);
            }
            fill(chain, &view.runs, lo, &mut buf[..len as usize])?;
            Ok(Some(buf))
        };
        let src_buf = read(src, &s)?;
        let base_buf = match (base, &b) {
            (Some(chain), Some(view)) => read(chain, view)?,
            _ => None,
        };
        if !send(Message::Data {
            offset: lo,
            len,
            src: src_buf,
            base: base_buf,
        }) {
            return Ok(());
        }
        zero_start = hi;
        pos = end;
    }
    if size > zero_start {
        send(Message::Zero {
            offset: zero_start,
            len: size - zero_start,
        });
    }
    Ok(())
}
