//! Reading a chain's guest content in large chunks on a reader thread, so that a consumer
//! (hashing, writing) overlaps with the reads. Ranges that read as zeros are reported as
//! such and never read.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use crate::chain::{Chain, ChainRun};
use crate::error::{Error, Result};

/// A piece of guest content, in guest order.
pub(crate) enum Chunk<'b> {
    /// `len` bytes at `offset` read as zeros (nothing was read).
    Zero {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The bytes at `offset`.
    Data {
        /// Guest offset.
        offset: u64,
        /// The content.
        bytes: &'b [u8],
    },
}

/// A chunk as it travels from the reader thread: data owns its buffer.
enum Message {
    Zero {
        offset: u64,
        len: u64,
    },
    Data {
        offset: u64,
        buf: Vec<u8>,
        len: usize,
    },
}

/// Buffers in flight between the reader and the consumer.
const QUEUE: usize = 3;

/// Calls `consume` with the content of `chain`, start to end, in chunks of at most
/// `chunk_size` bytes of data (zero ranges are one chunk however long). `consume` returns
/// `Ok(false)` to stop early (the result is then [`Error::Cancelled`]).
pub(crate) fn for_each_chunk(
    chain: &Chain,
    chunk_size: usize,
    mut consume: impl FnMut(Chunk<'_>) -> Result<bool>,
) -> Result<()> {
    let chunk_size = chunk_size.max(512);
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<Message>>(QUEUE);
        let (pool_tx, pool_rx) = sync_channel::<Vec<u8>>(QUEUE + 2);
        scope.spawn(move || {
            if let Err(e) = produce(chain, chunk_size, &tx, &pool_rx) {
                let _ = tx.send(Err(e));
            }
        });
        for message in rx {
            let keep_going = match message? {
                Message::Zero { offset, len } => consume(Chunk::Zero { offset, len })?,
                Message::Data { offset, buf, len } => {
                    let go = consume(Chunk::Data {
                        offset,
                        bytes: &buf[..len],
                    })?;
                    let _ = pool_tx.try_send(buf);
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

/// The reader thread's loop. Returns when done or when the consumer has gone.
fn produce(
    chain: &Chain,
    chunk_size: usize,
    tx: &SyncSender<Result<Message>>,
    pool: &Receiver<Vec<u8>>,
) -> Result<()> {
    let mut runs = chain.runs(0, chain.size());
    let mut pending: Option<ChainRun> = None;
    loop {
        let run = match pending.take() {
            Some(r) => r,
            None => match runs.next() {
                Some(r) => r?,
                None => return Ok(()),
            },
        };
        let message = if run.reads_as_zero() {
            let mut len = run.len;
            for next in runs.by_ref() {
                let next = next?;
                if next.reads_as_zero() {
                    len += next.len;
                } else {
                    pending = Some(next);
                    break;
                }
            }
            Message::Zero {
                offset: run.offset,
                len,
            }
        } else {
            let mut buf = pool.try_recv().unwrap_or_else(|_| vec![0u8; chunk_size]);
            let offset = run.offset;
            let mut filled = 0usize;
            let mut current = Some(run);
            while let Some(r) = current.take() {
                if r.reads_as_zero() || filled == chunk_size {
                    pending = Some(r);
                    break;
                }
                let n = (r.len).min((chunk_size - filled) as u64);
                let part = ChainRun { len: n, ..r };
                chain.read_run(&part, &mut buf[filled..filled + n as usize])?;
                filled += n as usize;
                if n < r.len {
                    pending = Some(ChainRun {
                        offset: r.offset + n,
                        len: r.len - n,
                        mapping: r.mapping.advanced(n),
                        ..r
                    });
                    break;
                }
                current = runs.next().transpose()?;
            }
            Message::Data {
                offset,
                buf,
                len: filled,
            }
        };
        if tx.send(Ok(message)).is_err() {
            return Ok(());
        }
    }
}
