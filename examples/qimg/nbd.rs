//! `qimg nbd`: serves an image and its chain over NBD with qemu-nbd's options.
//!
//! The chain is opened (and locked, as qemu-nbd locks it: writable unless `-r` or `-l`)
//! before the socket listens. Without `-t` the server exits when the last client
//! leaves; SIGTERM and SIGINT set a flag the accept loop polls, the clients' sockets are
//! shut down, and the image is closed cleanly (flushed, dirty bit cleared, locks
//! released). `--fork` daemonises once the socket listens: the parent exits 0.

use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use qcow2_engine::nbd::{ExportOptions, Listener, NbdServer};
use qcow2_engine::{Chain, ChainOptions, Format};

use crate::common::parse_format;

/// Arguments of `qimg nbd` (qemu-nbd's names).
#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// The export's name (default: empty).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    name: String,
    /// The export's description.
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    /// Listen on this Unix socket.
    #[arg(short = 'k', long = "socket", conflicts_with_all = ["bind", "port"])]
    socket: Option<PathBuf>,
    /// TCP address to listen on (default 0.0.0.0).
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// Keep serving after the last client leaves.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Most clients at once (default 1; 0: no limit).
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Offer the `qemu:allocation-depth` metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Offer persistent bitmap BITMAP as `qemu:dirty-bitmap:BITMAP` (repeatable).
    #[arg(short = 'B', long = "bitmap", value_name = "BITMAP")]
    bitmaps: Vec<String>,
    /// Export an internal snapshot (read-only): `snapshot.id=ID`, `snapshot.name=NAME`,
    /// or an ID or name.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// What trims do: `ignore` (qemu-nbd's default) or `unmap`.
    #[arg(long = "discard", default_value = "ignore", value_parser = ["ignore", "off", "unmap", "on"])]
    discard: String,
    /// Daemonise once the socket listens.
    #[arg(long = "fork")]
    fork: bool,
    /// Write the serving process's id into FILE.
    #[arg(long = "pid-file", value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Requests of one client carried out at once.
    #[arg(long = "workers", default_value_t = 4, hide = true)]
    workers: usize,
    /// The image.
    file: PathBuf,
}

/// Set by SIGTERM and SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: Args) -> Result<u8> {
    let read_only = args.read_only || args.snapshot.is_some();
    let options = ChainOptions {
        format: args.format,
        writable: !read_only,
        ..crate::common::chain_defaults()
    };
    let chain = Chain::open_with(&args.file, &options)?;
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    if let Some(snapshot) = &args.snapshot {
        load_snapshot(&chain, &args.file, snapshot)?;
    }
    let export = ExportOptions {
        name: args.name.clone(),
        description: args.description.clone(),
        read_only,
        allocation_depth: args.allocation_depth,
        bitmaps: args.bitmaps.clone(),
        discard: matches!(args.discard.as_str(), "unmap" | "on"),
        max_connections: args.shared,
        persistent: args.persistent,
        workers: args.workers,
    };
    let server = NbdServer::new(Arc::new(chain), export)?;
    let listener = listen(&args)?;
    let ready = if args.fork { Some(daemonise()?) } else { None };
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("{}: cannot write the pid file", pid_file.display()))?;
    }
    if let Some(ready) = ready {
        // The parent exits 0 on this byte (1 if the pipe closes without it).
        use std::io::Write;
        let _ = (&ready).write_all(b"1");
        // As qemu-nbd: once the parent is gone, the daemon's output goes nowhere (and
        // whoever waits for the parent's output is not held by the daemon).
        detach_output();
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        // A client that vanishes must not kill the server with SIGPIPE.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let served = server.serve(&listener, &STOP);
    let closed = server.chain().close();
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(pid_file) = &args.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    served.map_err(|e| anyhow!("{}: serving: {e}", args.file.display()))?;
    closed?;
    Ok(0)
}

/// Binds the socket the options name: `-k`, or TCP on `-b` (0.0.0.0) and `-p` (10809).
fn listen(args: &Args) -> Result<Listener> {
    if let Some(path) = &args.socket {
        // As QEMU: a socket left by an earlier server is replaced.
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path)
            .with_context(|| format!("Failed to bind socket to {}", path.display()))?;
        return Ok(Listener::Unix(l));
    }
    let host = args.bind.as_deref().unwrap_or("0.0.0.0");
    let port = args.port.unwrap_or(10809);
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("address resolution failed for {host}:{port}"))?
        .collect();
    let l = TcpListener::bind(&addrs[..])
        .with_context(|| format!("Failed to bind socket to {host}:{port}"))?;
    Ok(Listener::Tcp(l))
}

/// `-l`: makes the top image show an internal snapshot.
fn load_snapshot(chain: &Chain, file: &Path, text: &str) -> Result<()> {
    let Some(image) = chain.top().as_qcow2() else {
        bail!(
            "{}: -l: internal snapshots need a qcow2 image",
            file.display()
        );
    };
    let (mut id, mut name) = (None, None);
    if text.starts_with("snapshot.") {
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                _ => bail!("Failed in parsing snapshot param '{text}'"),
            }
        }
        image.load_snapshot_read_only(id, name)?;
    } else {
        image
            .load_snapshot_read_only(Some(text), None)
            .or_else(|_| image.load_snapshot_read_only(None, Some(text)))?;
    }
    Ok(())
}

/// Points stdin, stdout and stderr at /dev/null.
fn detach_output() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which stay open.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// `--fork`: the child leaves the terminal's session and goes on; the parent waits
/// until the child says it is ready (socket listening, pid file written: the byte the
/// child writes into the returned pipe) and exits 0, or 1 if the child failed first.
fn daemonise() -> Result<std::fs::File> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let _ = std::io::stdout().flush();
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() returns.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: each descriptor was just returned by pipe() and is owned by one File.
    let (mut read_end, write_end) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: no other thread runs yet (the server's threads start after this).
    match unsafe { libc::fork() } {
        -1 => Err(anyhow!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: a plain system call in the child.
            unsafe {
                libc::setsid();
            }
            Ok(write_end)
        }
        _ => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let code = match read_end.read(&mut byte) {
                Ok(1) => 0,
                _ => 1,
            };
            std::process::exit(code)
        }
    }
}
