//! The server: an [`NbdServer`] exports one chain to clients on a Unix or TCP socket.

mod connection;
mod export;
mod negotiate;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::chain::Chain;
use crate::error::Result;

pub use export::{ExportOptions, MAX_EXTENTS, MAX_PAYLOAD};

use connection::serve_connection;
use export::Export;

/// How often the accept loop looks at the stop flag and at finished clients.
const POLL: Duration = Duration::from_millis(20);

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (`qemu-nbd -k`).
    Unix(UnixListener),
    /// A TCP socket (`qemu-nbd -b -p`).
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Replies are written whole: do not hold them back.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }
}

/// A client's socket.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An NBD server exporting one chain, as qemu-nbd: fixed newstyle negotiation
/// (`NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`), structured replies, block status for
/// `base:allocation`, `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`, and read,
/// write (FUA), flush, trim, write zeroes (`NO_HOLE`, `FAST_ZERO`) and cache, several
/// requests at once per connection and several connections (`CAN_MULTI_CONN`: they
/// share one chain, so a flush covers them all).
pub struct NbdServer {
    export: Export,
}

impl NbdServer {
    /// A server for `chain` (opened writable unless `options.read_only`). Fails when a
    /// bitmap is missing, in use, or enabled on a writable export (as QEMU).
    pub fn new(chain: Arc<Chain>, options: ExportOptions) -> Result<NbdServer> {
        Ok(NbdServer {
            export: Export::new(chain, options)?,
        })
    }

    /// The chain served (to close it once serving is over).
    pub fn chain(&self) -> &Chain {
        &self.export.chain
    }

    /// Accepts and serves clients until `stop` is set or, unless the export is
    /// persistent, the last client has left (after one came). Clients beyond
    /// [`ExportOptions::max_connections`] are closed at once. On return every client
    /// thread has ended (their sockets shut down when stopped); the chain is not closed.
    pub fn serve(&self, listener: &Listener, stop: &AtomicBool) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let options = &self.export.options;
        std::thread::scope(|scope| {
            let mut clients = Vec::new();
            let mut served = false;
            let result = loop {
                if stop.load(Ordering::Relaxed) {
                    break Ok(());
                }
                clients.retain(
                    |(handle, _): &(std::thread::ScopedJoinHandle<'_, ()>, Stream)| {
                        !handle.is_finished()
                    },
                );
                if served && clients.is_empty() && !options.persistent {
                    break Ok(());
                }
                let stream = match listener.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if matches!(e.raw_os_error(), Some(23) | Some(24)) => {
                        // Out of file descriptors: wait for clients to leave.
                        std::thread::sleep(POLL);
                        continue;
                    }
                    Err(e) => break Err(e),
                };
                if options.max_connections > 0 && clients.len() >= options.max_connections {
                    stream.shutdown();
                    continue;
                }
                let (Ok(()), Ok(reader), Ok(writer), Ok(handle)) = (
                    stream.set_nonblocking(false),
                    stream.try_clone(),
                    stream.try_clone(),
                    stream.try_clone(),
                ) else {
                    stream.shutdown();
                    continue;
                };
                served = true;
                let export = &self.export;
                let thread = scope.spawn(move || {
                    // A client's failure ends its connection only.
                    let _ = serve_connection(export, reader, writer, export.options.workers);
                    stream.shutdown();
                });
                clients.push((thread, handle));
            };
            for (_, stream) in &clients {
                stream.shutdown();
            }
            result
        })
    }

    /// Serves one client whose whole conversation is `input`, in this thread (requests
    /// in order); returns what the server sent. For tests and fuzzing.
    pub fn serve_bytes(&self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = serve_connection(&self.export, input, &mut out, 0);
        out
    }
}
