//! `qimg nbd` against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy and fio over Unix
//! sockets, compared with what qemu-nbd serves from a copy of the same images; clients
//! that misbehave; and how the server ends (last client gone, SIGTERM).
//!
//! Every server is a child process killed when its handle drops; every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{HeaderField, Scratch, assert_one_line_failure, qimg_path, read_header_field};
use qcow2_engine::nbd::codec::{
    Chunk, ChunkBody, Command as Cmd, Greeting, MetaContextRequest, OptionReply, OptionReplyBody,
    OptionRequest, Request, command_flags, errno, handshake_flags,
};

/// A server process serving on a Unix socket.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    /// Starts `program args... -k SOCKET FILE` in the scratch directory and waits (at most
    /// 20 s) for its socket.
    fn start(s: &Scratch, program: &Path, args: &[&str], socket: &str, file: &str) -> Server {
        let path = s.path(socket);
        let child = Command::new(program)
            .args(args)
            .args(["-k", path.to_str().unwrap(), file])
            .current_dir(s.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let mut server = Server {
            child,
            socket: path,
        };
        let start = Instant::now();
        while !server.socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut err = String::new();
                server
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("{} exited ({status}): {err}", program.display());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} did not listen",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // bind() and listen() are two calls: let the second happen.
        std::thread::sleep(Duration::from_millis(50));
        server
    }

    fn qimg(s: &Scratch, args: &[&str], socket: &str, file: &str) -> Server {
        let mut all = vec!["nbd"];
        all.extend(args);
        Server::start(s, qimg_path(), &all, socket, file)
    }

    fn qemu_nbd(s: &Scratch, args: &[&str], socket: &str, file: &str) -> Server {
        Server::start(s, Path::new("qemu-nbd"), args, socket, file)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Waits at most `limit` for the server to exit; its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (at most 20 s); the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        self.wait(Duration::from_secs(20))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `program args` with a time limit of 60 s; its output.
fn run(s: &Scratch, program: &str, args: &[&str]) -> std::process::Output {
    let mut child = Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .current_dir(s.dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let result = child.wait_with_output().unwrap();
    std::process::Output {
        stdout: out.into_bytes(),
        ..result
    }
}

/// Runs `program args`; panics unless it succeeds; its stdout.
fn ok(s: &Scratch, program: &str, args: &[&str]) -> String {
    let out = run(s, program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// base.qcow2 (data, zero clusters, a bitmap) <- mid.qcow2 <- top.qcow2, in `dir`
/// (relative to the scratch directory).
fn chain(s: &Scratch, dir: &str) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    let p = |f: &str| format!("{dir}/{f}");
    s.create(&p("base.qcow2"), "cluster_size=65536", 16 << 20);
    s.qemu_io(
        &p("base.qcow2"),
        "qcow2",
        &["write -P 1 0 2M".into(), "write -z 3M 1M".into()],
    );
    s.qemu_img(&["bitmap", "--add", &p("base.qcow2"), "b0"]);
    s.qemu_io(&p("base.qcow2"), "qcow2", &["write -P 3 8M 100k".into()]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &p("mid.qcow2"),
    ]);
    s.qemu_io(&p("mid.qcow2"), "qcow2", &["write -P 4 1M 1536k".into()]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    s.qemu_io(
        &p("top.qcow2"),
        "qcow2",
        &[
            "write -P 5 1536k 64k".into(),
            "write -z 12M 256k".into(),
            "write -P 6 15M 4k".into(),
        ],
    );
    s.qemu_img(&["bitmap", "--add", &p("top.qcow2"), "t0"]);
    s.qemu_io(&p("top.qcow2"), "qcow2", &["write -P 7 6M 192k".into()]);
}

#[test]
fn block_status_matches_qemu_nbd() {
    let s = Scratch::new();
    chain(&s, "a");
    chain(&s, "b");
    let args = ["-r", "-t", "-A", "-B", "t0", "-f", "qcow2"];
    let ours = Server::qimg(&s, &args, "ours.sock", "a/top.qcow2");
    let theirs = Server::qemu_nbd(&s, &args, "theirs.sock", "b/top.qcow2");
    let queries: Vec<Vec<String>> = vec![
        vec!["qemu-img".into(), "map".into(), "--output=json".into()],
        vec!["nbdinfo".into(), "--map".into()],
        vec!["nbdinfo".into(), "--map=qemu:allocation-depth".into()],
        vec!["nbdinfo".into(), "--map=qemu:dirty-bitmap:t0".into()],
        vec!["nbdinfo".into(), "--list".into(), "--json".into()],
    ];
    for q in &queries {
        let mut got = Vec::new();
        for server in [&ours, &theirs] {
            let mut args: Vec<&str> = q[1..].iter().map(String::as_str).collect();
            let uri = server.uri();
            args.push(&uri);
            let text = ok(&s, &q[0], &args);
            got.push(text.replace(&uri, "URI"));
        }
        if q.contains(&"--list".to_string()) {
            // Sizes, flags and contexts, without what differs by design (block size
            // preference, the server's URI).
            for key in ["export-size", "is_read_only", "can_multi_conn", "can_flush"] {
                let find = |t: &str| {
                    t.lines()
                        .find(|l| l.contains(&format!("\"{key}\"")))
                        .map(str::trim)
                        .map(str::to_owned)
                };
                assert_eq!(find(&got[0]), find(&got[1]), "{key}");
            }
            assert!(got[0].contains("qemu:dirty-bitmap:t0"), "{}", got[0]);
            continue;
        }
        assert_eq!(got[0], got[1], "{}", q.join(" "));
        assert!(got[0].lines().count() > 2, "{}: {}", q.join(" "), got[0]);
    }
    // The dirty bitmap's map names the range written after it was added.
    let map = ok(&s, "nbdinfo", &["--map=qemu:dirty-bitmap:t0", &ours.uri()]);
    assert!(map.contains("6291456") && map.contains("dirty"), "{map}");
}

#[test]
fn allocation_depth_past_a_short_backing_file_matches_qemu_nbd() {
    let s = Scratch::new();
    for dir in ["a", "b"] {
        std::fs::create_dir_all(s.path(dir)).unwrap();
        s.create(&format!("{dir}/base.qcow2"), "", 1 << 20);
        s.qemu_io(
            &format!("{dir}/base.qcow2"),
            "qcow2",
            &["write -P 1 0 1M".into()],
        );
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &format!("{dir}/top.qcow2"),
            "4M",
        ]);
        s.qemu_io(
            &format!("{dir}/top.qcow2"),
            "qcow2",
            &["write -P 2 3M 64k".into()],
        );
    }
    let ours = Server::qimg(&s, &["-r", "-t", "-A"], "ours.sock", "a/top.qcow2");
    let theirs = Server::qemu_nbd(&s, &["-r", "-t", "-A"], "theirs.sock", "b/top.qcow2");
    for map in ["--map", "--map=qemu:allocation-depth"] {
        let got: Vec<String> = [&ours, &theirs]
            .iter()
            .map(|server| ok(&s, "nbdinfo", &[map, &server.uri()]))
            .collect();
        assert_eq!(got[0], got[1], "{map}");
    }
}

#[test]
fn convert_compare_and_nbdcopy_read_the_chain() {
    let s = Scratch::new();
    chain(&s, "a");
    let server = Server::qimg(&s, &["-r", "-t", "-e", "2"], "s.sock", "a/top.qcow2");
    let uri = server.uri();
    ok(&s, "qemu-img", &["compare", "-U", "a/top.qcow2", &uri]);
    ok(
        &s,
        "qemu-img",
        &["convert", "-O", "qcow2", &uri, "copy.qcow2"],
    );
    s.assert_same_content("copy.qcow2", "a/top.qcow2", "convert");
    ok(&s, "nbdcopy", &[&uri, "copy.raw"]);
    ok(
        &s,
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "copy.raw",
            "a/top.qcow2",
        ],
    );
    // Several connections at once (nbdcopy's default is several).
    ok(&s, "nbdcopy", &["--connections=2", &uri, "copy2.raw"]);
    assert_eq!(
        std::fs::read(s.path("copy.raw")).unwrap(),
        std::fs::read(s.path("copy2.raw")).unwrap()
    );
}

#[test]
fn qemu_io_writes_equal_a_twin_written_directly() {
    let s = Scratch::new();
    chain(&s, "a");
    chain(&s, "b");
    let commands = [
        "write -P 0x51 0 64k",
        "write -P 0x52 100 1000",
        "write -z 1M 128k",
        "write -z 2000k 7k",
        "discard 4M 256k",
        "write -f -P 0x53 3M 4k",
        "write -P 0x54 14M 1M",
        "flush",
    ];
    let mut server = Server::qimg(&s, &["--discard=unmap", "-t"], "s.sock", "a/top.qcow2");
    let uri = server.uri();
    let mut nbd_args = vec!["-f", "raw"];
    let mut direct = vec!["-f", "qcow2"];
    for c in &commands {
        nbd_args.extend(["-c", c]);
        direct.extend(["-c", c]);
    }
    nbd_args.push(&uri);
    direct.push("b/top.qcow2");
    ok(&s, "qemu-io", &nbd_args);
    ok(&s, "qemu-io", &direct);
    // Reading back through the server sees the writes.
    ok(
        &s,
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x53 3M 4k", &uri],
    );
    assert_eq!(server.terminate(), Some(0));
    s.assert_clean("a/top.qcow2", "served image");
    s.assert_same_content("a/top.qcow2", "b/top.qcow2", "twin");
}

#[test]
fn fio_random_writes_verify() {
    let s = Scratch::new();
    s.create("disk.qcow2", "", 16 << 20);
    let mut server = Server::qimg(&s, &["-t"], "s.sock", "disk.qcow2");
    let uri = server.uri();
    let out = run(
        &s,
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--runtime=5",
            "--do_verify=1",
        ],
    );
    assert!(
        out.status.success(),
        "fio: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("verify: bad"), "{text}");
    assert_eq!(server.terminate(), Some(0));
    s.assert_clean("disk.qcow2", "after fio");
}

/// A client speaking the protocol with the crate's codec, with bounded waits.
struct Client {
    stream: UnixStream,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client { stream }
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn option_reply(&mut self) -> OptionReply {
        let mut head = self.read(OptionReply::HEADER_LEN);
        let total = OptionReply::total_len(&head).unwrap();
        head.extend(self.read(total - head.len()));
        OptionReply::decode(&head).unwrap()
    }

    /// Greeting, structured replies, `base:allocation`, then `NBD_OPT_GO`.
    fn negotiate(socket: &Path) -> Client {
        let mut c = Client::connect(socket);
        let greeting = Greeting::decode(&c.read(Greeting::LEN)).unwrap();
        assert_ne!(greeting.flags & handshake_flags::FIXED_NEWSTYLE, 0);
        let mut out = (handshake_flags::C_FIXED_NEWSTYLE | handshake_flags::C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        OptionRequest::StructuredReply.encode(&mut out);
        OptionRequest::SetMetaContext(MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into()],
        })
        .encode(&mut out);
        OptionRequest::Go {
            name: String::new(),
            requests: vec![],
        }
        .encode(&mut out);
        c.stream.write_all(&out).unwrap();
        assert_eq!(c.option_reply().body, OptionReplyBody::Ack);
        assert!(matches!(
            c.option_reply().body,
            OptionReplyBody::MetaContext { id: 1, .. }
        ));
        assert_eq!(c.option_reply().body, OptionReplyBody::Ack);
        loop {
            if c.option_reply().body == OptionReplyBody::Ack {
                return c;
            }
        }
    }

    fn send(&mut self, command: Cmd, offset: u64, length: u32, cookie: u64) {
        let mut out = Vec::new();
        Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut out);
        self.stream.write_all(&out).unwrap();
    }

    fn chunk(&mut self) -> Chunk {
        let mut head = self.read(Chunk::HEADER_LEN);
        let total = Chunk::total_len(&head).unwrap();
        head.extend(self.read(total - head.len()));
        Chunk::decode(&head).unwrap()
    }

    /// Whether the server closed the connection (end of stream within 10 s).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

#[test]
fn bad_clients_get_errors_and_the_next_client_is_served() {
    let s = Scratch::new();
    chain(&s, "a");
    let size = 16u64 << 20;
    let server = Server::qimg(&s, &["-t", "-e", "3"], "s.sock", "a/top.qcow2");
    let sock = server.socket.clone();

    // Garbage instead of client flags and options: the server hangs up.
    let mut c = Client::connect(&sock);
    c.read(Greeting::LEN);
    c.stream.write_all(&[0xff; 64]).unwrap();
    assert!(c.closed(), "garbage flags");
    let mut c = Client::connect(&sock);
    c.read(Greeting::LEN);
    c.stream.write_all(&[0, 0, 0, 3]).unwrap();
    c.stream
        .write_all(b"this is not an option request")
        .unwrap();
    assert!(c.closed(), "garbage option");

    // Errors during transmission keep the connection usable.
    let mut c = Client::negotiate(&sock);
    c.send(Cmd::Read, size - 512, 4096, 1);
    match c.chunk().body {
        ChunkBody::Error { error, .. } => assert_eq!(error, errno::EINVAL),
        other => panic!("read past the end: {other:?}"),
    }
    c.send(Cmd::Other(99), 0, 512, 2);
    match c.chunk() {
        Chunk {
            cookie: 2,
            body: ChunkBody::Error { error, .. },
            ..
        } => assert_eq!(error, errno::EINVAL),
        other => panic!("unknown command: {other:?}"),
    }
    c.send(Cmd::Read, 0, 64 << 20, 3);
    assert!(matches!(
        c.chunk().body,
        ChunkBody::Error {
            error: errno::EINVAL,
            ..
        }
    ));
    c.send(Cmd::BlockStatus, size, 512, 4);
    assert!(matches!(
        c.chunk().body,
        ChunkBody::Error {
            error: errno::EINVAL,
            ..
        }
    ));
    c.send(Cmd::Read, 1536 << 10, 4096, 5);
    match c.chunk().body {
        ChunkBody::OffsetData { offset, data } => {
            assert_eq!(offset, 1536 << 10);
            assert!(data.iter().all(|&b| b == 5));
        }
        other => panic!("read: {other:?}"),
    }
    c.send(Cmd::BlockStatus, 0, 4 << 20, 6);
    match c.chunk().body {
        ChunkBody::BlockStatus {
            context: 1,
            extents,
        } => {
            let total: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
            assert_eq!(total, 4 << 20);
        }
        other => panic!("block status: {other:?}"),
    }
    // A request with unknown flags.
    let mut out = Vec::new();
    Request {
        flags: 1 << 9,
        command: Cmd::Read,
        cookie: 7,
        offset: 0,
        length: 512,
    }
    .encode(&mut out);
    c.stream.write_all(&out).unwrap();
    assert!(matches!(
        c.chunk().body,
        ChunkBody::Error {
            error: errno::EINVAL,
            ..
        }
    ));
    // A write longer than the limit: its data is skipped, the next request read.
    let mut out = Vec::new();
    Request {
        flags: command_flags::FUA,
        command: Cmd::Write,
        cookie: 8,
        offset: 0,
        length: (32 << 20) + 1,
    }
    .encode(&mut out);
    out.extend(vec![0xee; (32 << 20) + 1]);
    c.stream.write_all(&out).unwrap();
    assert!(matches!(
        c.chunk().body,
        ChunkBody::Error {
            error: errno::EINVAL,
            ..
        }
    ));
    c.send(Cmd::Read, 0, 512, 9);
    assert!(matches!(c.chunk().body, ChunkBody::OffsetData { .. }));
    drop(c);

    // A client that vanishes in the middle of a write's data.
    let mut c = Client::negotiate(&sock);
    let mut out = Vec::new();
    Request {
        flags: 0,
        command: Cmd::Write,
        cookie: 1,
        offset: 0,
        length: 65536,
    }
    .encode(&mut out);
    out.extend([0xab; 100]);
    c.stream.write_all(&out).unwrap();
    drop(c);

    // More clients than -e allows: the extra ones are closed.
    let held: Vec<Client> = (0..3).map(|_| Client::negotiate(&sock)).collect();
    let mut extra = Client::connect(&sock);
    assert!(extra.closed(), "a client beyond -e");
    drop(held);

    // The next client is served correctly, and nothing was written.
    let start = Instant::now();
    loop {
        let out = run(
            &s,
            "qemu-img",
            &["compare", "-U", "a/top.qcow2", &server.uri()],
        );
        if out.status.success() {
            break;
        }
        // The held clients' threads may still be ending.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "compare: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_server_exits_when_the_last_client_leaves() {
    let s = Scratch::new();
    s.create("disk.qcow2", "", 1 << 20);
    let mut server = Server::qimg(&s, &[], "s.sock", "disk.qcow2");
    ok(
        &s,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 4k", &server.uri()],
    );
    assert_eq!(server.wait(Duration::from_secs(20)), Some(0));
    assert!(!server.socket.exists(), "the socket is removed");
    ok(
        &s,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 9 0 4k", "disk.qcow2"],
    );
}

#[test]
fn sigterm_leaves_the_image_clean_and_unlocked() {
    let s = Scratch::new();
    s.create("disk.qcow2", "lazy_refcounts=on", 8 << 20);
    let mut server = Server::qimg(&s, &["-t"], "s.sock", "disk.qcow2");
    // While served, the image is locked against writers.
    let out = run(
        &s,
        "qemu-io",
        &["-f", "qcow2", "-c", "read 0 512", "disk.qcow2"],
    );
    assert!(!out.status.success(), "qemu-io got the write lock");
    ok(
        &s,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 3 0 1M",
            "-c",
            "write -P 4 5M 64k",
            &server.uri(),
        ],
    );
    assert_eq!(
        read_header_field(&s.path("disk.qcow2"), HeaderField::IncompatibleFeatures) & 1,
        1,
        "lazy refcounts leave the image dirty while it is served"
    );
    assert_eq!(server.terminate(), Some(0));
    assert_eq!(
        read_header_field(&s.path("disk.qcow2"), HeaderField::IncompatibleFeatures) & 1,
        0,
        "dirty bit cleared"
    );
    s.assert_clean("disk.qcow2", "after SIGTERM");
    // The lock is gone: qemu-img info without -U opens it.
    ok(&s, "qemu-img", &["info", "disk.qcow2"]);
    ok(
        &s,
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 4 5M 64k", "disk.qcow2"],
    );
}

#[test]
fn fork_returns_once_the_socket_listens() {
    let s = Scratch::new();
    s.create("disk.qcow2", "", 1 << 20);
    let sock = s.path("s.sock");
    let out = Command::new("timeout")
        .args([
            "20",
            qimg_path().to_str().unwrap(),
            "nbd",
            "--fork",
            "--pid-file=pid",
            "-k",
        ])
        .arg(&sock)
        .arg("disk.qcow2")
        .current_dir(s.dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = std::fs::read_to_string(s.path("pid")).unwrap();
    let pid = pid.trim().to_owned();
    // Connectable at once; the daemon leaves after its one client.
    let result = run(
        &s,
        "qemu-img",
        &["info", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    let gone = (0..1000).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    if !gone {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(gone, "the daemon did not exit after its client");
}

#[test]
fn tcp_on_localhost() {
    let s = Scratch::new();
    chain(&s, "a");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(qimg_path())
        .args([
            "nbd",
            "-r",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "a/top.qcow2",
        ])
        .current_dir(s.dir())
        .spawn()
        .unwrap();
    let uri = format!("nbd://127.0.0.1:{port}");
    let start = Instant::now();
    // Ready once a connection reaches the server. While nobody listens, a connect to a
    // port in the ephemeral range can connect to itself (TCP simultaneous open), which
    // would look ready and block the server's bind: such a connection does not count.
    let listening = || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_ok_and(|stream| stream.local_addr().ok() != stream.peer_addr().ok())
    };
    while !listening() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run(&s, "qemu-img", &["compare", "-U", "a/top.qcow2", &uri]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn usage_errors_are_one_line() {
    let s = Scratch::new();
    s.create("disk.qcow2", "", 1 << 20);
    s.qemu_img(&["bitmap", "--add", "disk.qcow2", "on"]);
    for args in [
        vec!["nbd", "-k", "s.sock", "-p", "10809", "disk.qcow2"],
        vec!["nbd", "--discard=sometimes", "-k", "s.sock", "disk.qcow2"],
        vec!["nbd", "-k", "s.sock", "missing.qcow2"],
        vec!["nbd", "-k", "s.sock", "-B", "nosuch", "disk.qcow2"],
        // An enabled bitmap cannot be offered on a writable export, as in qemu-nbd.
        vec!["nbd", "-k", "s.sock", "-B", "on", "disk.qcow2"],
        vec!["nbd", "-k", "s.sock", "-l", "nosnap", "disk.qcow2"],
    ] {
        let out = s.qimg_output(&args);
        assert_one_line_failure(&out, &args.join(" "));
        assert_eq!(out.status.code(), Some(1), "{}", args.join(" "));
    }
}

#[test]
fn a_snapshot_is_served_read_only() {
    let s = Scratch::new();
    s.create("disk.qcow2", "", 1 << 20);
    s.qemu_io("disk.qcow2", "qcow2", &["write -P 1 0 64k".into()]);
    s.qemu_img(&["snapshot", "-c", "s1", "disk.qcow2"]);
    s.qemu_io("disk.qcow2", "qcow2", &["write -P 2 0 64k".into()]);
    let server = Server::qimg(&s, &["-t", "-l", "s1"], "s.sock", "disk.qcow2");
    let uri = server.uri();
    ok(
        &s,
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 1 0 64k", &uri],
    );
    let out = run(&s, "qemu-io", &["-f", "raw", "-c", "write 0 512", &uri]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"));
}
