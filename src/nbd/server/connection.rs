//! One client: negotiation, then transmission. A reader (the connection's thread) reads
//! requests and hands them to a few workers; each worker writes its reply whole under
//! the connection's writer lock, so replies may complete out of order. Memory is bounded
//! per connection: requests wait while the payloads in flight exceed a budget.

use std::io::{self, BufReader, Read, Write};
use std::sync::mpsc::sync_channel;
use std::sync::{Condvar, Mutex};

use crate::nbd::codec::{Chunk, ChunkBody, Command, Request, SimpleReply, chunk, errno};

use super::export::{Export, MAX_PAYLOAD, Outcome};
use super::negotiate::{Session, negotiate};

/// Bytes of payload (write data, read buffers) one connection may hold at once.
const BUDGET: u64 = 2 * MAX_PAYLOAD as u64;

/// Requests queued for a connection's workers beyond those being carried out.
const QUEUE: usize = 16;

/// Room left before read data for the longest reply header (a structured data chunk).
const PREFIX: usize = Chunk::HEADER_LEN + 8;

/// Payload bytes in flight on one connection.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > BUDGET {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= n;
        self.freed.notify_all();
    }
}

/// A request read from the client, with its payload.
struct Job {
    request: Request,
    payload: Vec<u8>,
    /// Payload bytes counted against the budget (released once replied).
    charged: u64,
    /// A write longer than the limit: its data was skipped, the reply is `EINVAL`.
    too_long: bool,
}

/// Serves one client over `reader`/`writer` (two handles of one socket) until it
/// disconnects or fails. `workers == 0` carries out requests in this thread, in order.
pub(crate) fn serve_connection<R: Read, W: Write + Send>(
    export: &Export,
    reader: R,
    writer: W,
    workers: usize,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let writer = Mutex::new(writer);
    let session = {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        match negotiate(export, &mut reader, &mut *w)? {
            Some(s) => s,
            None => return Ok(()),
        }
    };
    let budget = Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let run = |job: Job| -> io::Result<()> {
        let outcome = if job.too_long {
            Outcome::Failed(errno::EINVAL, "write longer than 32 MiB".into())
        } else {
            export.execute(&job.request, &job.payload, &session.contexts, PREFIX)
        };
        drop(job.payload);
        let reply = encode_reply(&session, &job.request, outcome);
        let result = {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write_all(reply.bytes()).and_then(|()| w.flush())
        };
        budget.give(job.charged);
        result
    };
    if workers == 0 {
        while let Some(job) = read_job(&mut reader, &budget)? {
            run(job)?;
        }
        return Ok(());
    }
    let (tx, rx) = sync_channel::<Job>(QUEUE);
    let rx = Mutex::new(rx);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let budget = &budget;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (rx, run, failed) = (&rx, &run, &failed);
            scope.spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { break };
                    if failed.load(std::sync::atomic::Ordering::Relaxed) {
                        budget.give(job.charged);
                        continue;
                    }
                    if run(job).is_err() {
                        // The client is gone: the remaining jobs are dropped unanswered.
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        let result = loop {
            if failed.load(std::sync::atomic::Ordering::Relaxed) {
                break Ok(());
            }
            match read_job(&mut reader, budget) {
                Ok(Some(job)) => {
                    if tx.send(job).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        result
    })
}

/// Reads the next request and its payload; `None` when the client disconnects
/// (`NBD_CMD_DISC`, end of stream between requests, or a request that is not one).
fn read_job<R: Read>(reader: &mut R, budget: &Budget) -> io::Result<Option<Job>> {
    let mut header = [0u8; Request::LEN];
    match read_full(reader, &mut header)? {
        0 => return Ok(None),
        Request::LEN => {}
        _ => return Err(io::ErrorKind::UnexpectedEof.into()),
    }
    let Ok(request) = Request::decode(&header) else {
        // Bytes that are not a request: the stream cannot be resynchronised.
        return Ok(None);
    };
    if request.command == Command::Disconnect {
        return Ok(None);
    }
    let mut job = Job {
        request,
        payload: Vec::new(),
        charged: 0,
        too_long: false,
    };
    let len = u64::from(request.length);
    match request.command {
        Command::Write if request.length > MAX_PAYLOAD => {
            // Skip the data so that the next request is read where it starts.
            let skipped = io::copy(&mut reader.by_ref().take(len), &mut io::sink())?;
            if skipped != len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            job.too_long = true;
        }
        Command::Write => {
            budget.take(len);
            job.charged = len;
            // Memory grows with the data that arrives, not with what the header claims.
            job.payload = Vec::with_capacity(request.length.min(1 << 20) as usize);
            let read = reader.by_ref().take(len).read_to_end(&mut job.payload);
            if read.is_err() || job.payload.len() as u64 != len {
                budget.give(len);
                return Err(read.err().unwrap_or(io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Command::Read if request.length <= MAX_PAYLOAD => {
            budget.take(len);
            job.charged = len;
        }
        _ => {}
    }
    Ok(Some(job))
}

/// Reads until `buf` is full or the stream ends; the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A reply's bytes: either a whole buffer or a read's buffer from an offset.
pub(crate) struct ReplyBytes {
    buf: Vec<u8>,
    start: usize,
}

impl ReplyBytes {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The reply to `request`: simple or structured as negotiated.
fn encode_reply(session: &Session, request: &Request, outcome: Outcome) -> ReplyBytes {
    let cookie = request.cookie;
    let whole = |buf: Vec<u8>| ReplyBytes { buf, start: 0 };
    if !session.structured {
        let mut out = Vec::new();
        let error = match outcome {
            Outcome::Data(mut buf) => {
                SimpleReply { error: 0, cookie }.encode(&mut out);
                let start = PREFIX - out.len();
                buf[start..PREFIX].copy_from_slice(&out);
                return ReplyBytes { buf, start };
            }
            Outcome::Done => 0,
            Outcome::Failed(code, _) => code,
            // Contexts are only selected with structured replies.
            Outcome::Status(_) => errno::EINVAL,
        };
        SimpleReply { error, cookie }.encode(&mut out);
        return whole(out);
    }
    let mut out = Vec::new();
    match outcome {
        Outcome::Done => Chunk {
            flags: chunk::FLAG_DONE,
            cookie,
            body: ChunkBody::None,
        }
        .encode(&mut out),
        Outcome::Data(mut buf) if buf.len() > PREFIX => {
            Chunk::encode_data_header(
                chunk::FLAG_DONE,
                cookie,
                request.offset,
                (buf.len() - PREFIX) as u32,
                &mut out,
            );
            buf[..PREFIX].copy_from_slice(&out);
            return whole(buf);
        }
        Outcome::Data(_) => Chunk {
            flags: chunk::FLAG_DONE,
            cookie,
            body: ChunkBody::None,
        }
        .encode(&mut out),
        Outcome::Status(contexts) => {
            let last = contexts.len().saturating_sub(1);
            for (i, (context, extents)) in contexts.into_iter().enumerate() {
                Chunk {
                    flags: if i == last { chunk::FLAG_DONE } else { 0 },
                    cookie,
                    body: ChunkBody::BlockStatus { context, extents },
                }
                .encode(&mut out);
            }
        }
        Outcome::Failed(error, message) => Chunk {
            flags: chunk::FLAG_DONE,
            cookie,
            body: ChunkBody::Error { error, message },
        }
        .encode(&mut out),
    }
    whole(out)
}
