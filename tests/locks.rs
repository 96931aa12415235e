//! QEMU's image locks, checked both ways against real processes: qemu-io, qemu-nbd and
//! qemu-storage-daemon holding an image while qimg and the library try every writing
//! operation (refused in one line, the image unchanged), and qimg or the library holding
//! one while qemu-io and qemu-img try.

mod common;

use common::holder::{Holder, locked_bytes};
use common::{Scratch, assert_one_line_failure, qimg_path};
use qcow2_engine::ops::{self, CommitOptions};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Error, Image, ImageOptions, Locking};

/// base.qcow2 <- top.qcow2, both with data.
fn images(s: &Scratch) {
    s.create("base.qcow2", "", 4 << 20);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 1M".into()]);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 2 512k 1M".into()]);
    s.create("other.qcow2", "", 1 << 20);
}

fn bytes(s: &Scratch) -> Vec<Vec<u8>> {
    ["base.qcow2", "top.qcow2"]
        .map(|f| std::fs::read(s.path(f)).unwrap())
        .to_vec()
}

/// Runs `qimg args` and checks it was refused in one line naming `file` and the lock.
fn refused(s: &Scratch, args: &[&str], file: &str, lock: &str) {
    let out = s.qimg_output(args);
    let label = format!("qimg {}", args.join(" "));
    assert_one_line_failure(&out, &label);
    assert_eq!(out.status.code(), Some(1), "{label}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected =
        format!("{file}: Failed to get {lock} lock: is another process using the image?");
    assert!(
        stderr.starts_with("qimg: ") && stderr.trim_end().ends_with(&expected),
        "{label}: {stderr:?} does not end with {expected:?}"
    );
}

fn lock_of(error: &Error) -> (&'static str, bool) {
    match error.root() {
        Error::Locked { permission, shared } => (permission, *shared),
        other => panic!("not a lock conflict: {other:?} ({})", error.report()),
    }
}

/// What every writing qimg command and the library get while another process writes
/// the base (`holder` writes it) — and that reading with `-U` still works.
fn all_writers_are_refused(s: &Scratch) {
    let before = bytes(s);
    let w = "\"write\"";
    let sw = "shared \"write\"";
    let base = "base.qcow2";
    for (args, file, lock) in [
        (&["io", "-c", "write 0 512", "base.qcow2"][..], base, w),
        (&["snapshot", "-c", "s1", "base.qcow2"], base, w),
        (&["resize", "base.qcow2", "+1M"], base, w),
        (&["amend", "-o", "lazy_refcounts=on", "base.qcow2"], base, w),
        (&["create", "-f", "qcow2", "base.qcow2", "1M"], base, w),
        (
            &["convert", "-O", "qcow2", "other.qcow2", "base.qcow2"],
            base,
            w,
        ),
        // Readers of the base refuse to share write: the holder writes it.
        (&["commit", "top.qcow2"], base, sw),
        (&["pull", "top.qcow2"], base, sw),
        (&["remove", "--keep", "base.qcow2"], base, sw),
        (&["info", "base.qcow2"], base, sw),
        (&["check", "base.qcow2"], base, sw),
        (&["map", "top.qcow2"], base, sw),
        (&["io", "-c", "write 0 512", "top.qcow2"], base, sw),
    ] {
        refused(s, args, file, lock);
    }
    assert!(bytes(s) == before, "a refused command changed an image");
    assert!(
        !s.path(".base.qcow2.qimg-remove").exists(),
        "a refused remove left its journal"
    );
    // -U shares everything: reading works while the holder writes.
    s.qimg(&["info", "-U", "top.qcow2"]);
    s.qimg(&["map", "-U", "top.qcow2"]);
    s.qimg(&["check", "-U", "base.qcow2"]);

    // The library: typed errors naming the permission, nothing changed.
    let writable = Chain::open_writable(s.path("base.qcow2")).unwrap_err();
    assert_eq!(lock_of(&writable), ("write", false));
    assert_eq!(writable.file(), Some(s.path("base.qcow2").as_path()));
    let read = Image::open(s.path("base.qcow2")).unwrap_err();
    assert_eq!(lock_of(&read), ("write", true));
    let chain = Chain::open(s.path("top.qcow2")).unwrap_err();
    assert_eq!(lock_of(&chain), ("write", true));
    let created =
        qcow2_engine::create(s.path("base.qcow2"), &CreateOptions::qcow2(1 << 20)).unwrap_err();
    assert_eq!(lock_of(&created), ("write", false));
    let commit = ops::commit(
        s.path("top.qcow2"),
        &CommitOptions::default(),
        &mut |_, _| true,
    )
    .unwrap_err();
    assert_eq!(lock_of(&commit), ("write", true));
    let shared = ChainOptions {
        locking: Locking::ForceShare,
        ..ChainOptions::default()
    };
    let chain = Chain::open_with(s.path("top.qcow2"), &shared).unwrap();
    assert_eq!(chain.layers().len(), 2);
    let force_write = Chain::open_with(s.path("top.qcow2"), &shared.clone().writable(true));
    assert!(matches!(
        force_write.unwrap_err().root(),
        Error::InvalidArgument(_)
    ));
    drop(chain);
    assert!(bytes(s) == before, "a refused call changed an image");
}

#[test]
fn while_qemu_io_writes_an_image_nothing_else_writes_or_reads_it() {
    let s = Scratch::new();
    images(&s);
    let holder = Holder::start(
        &s,
        "qemu-io",
        &["-c", "sleep 20000", "base.qcow2"],
        "base.qcow2",
        101,
    );
    all_writers_are_refused(&s);
    drop(holder);
    // Released with the process: everything works again.
    s.qimg(&["io", "-c", "write -P 7 0 512", "base.qcow2"]);
    s.qimg(&["info", "top.qcow2"]);
}

#[test]
fn while_qemu_nbd_or_qemu_storage_daemon_serves_an_image_nothing_else_writes_it() {
    let s = Scratch::new();
    images(&s);
    let socket = s.path("nbd.sock").display().to_string();
    let holder = Holder::start(
        &s,
        "qemu-nbd",
        &["-k", &socket, "-f", "qcow2", "base.qcow2"],
        "base.qcow2",
        101,
    );
    all_writers_are_refused(&s);
    drop(holder);

    let holder = Holder::start(
        &s,
        "qemu-storage-daemon",
        &[
            "--blockdev",
            "driver=file,node-name=file0,filename=base.qcow2",
            "--blockdev",
            "driver=qcow2,node-name=disk0,file=file0",
        ],
        "base.qcow2",
        101,
    );
    all_writers_are_refused(&s);
    drop(holder);

    // A read-only export shares reading, not writing.
    let holder = Holder::start(
        &s,
        "qemu-nbd",
        &["-r", "-k", &socket, "-f", "qcow2", "base.qcow2"],
        "base.qcow2",
        100,
    );
    s.qimg(&["info", "base.qcow2"]);
    s.qimg(&["io", "-r", "-c", "read -P 1 0 512", "base.qcow2"]);
    Chain::open(s.path("top.qcow2")).unwrap();
    refused(
        &s,
        &["io", "-c", "write 0 512", "base.qcow2"],
        "base.qcow2",
        "\"write\"",
    );
    drop(holder);
}

/// Runs `program args` in `s` and returns (success, stderr).
fn try_tool(s: &Scratch, program: &str, args: &[&str]) -> (bool, String) {
    let out = s.output(program, args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What QEMU's tools get while something of ours writes `base.qcow2`.
fn qemu_is_refused_writing(s: &Scratch) {
    let before = bytes(s);
    for (program, args, message) in [
        (
            "qemu-io",
            &["-c", "write 0 512", "base.qcow2"][..],
            "Failed to get \"write\" lock",
        ),
        (
            "qemu-img",
            &["snapshot", "-c", "s1", "base.qcow2"],
            "Failed to get \"write\" lock",
        ),
        (
            "qemu-img",
            &["create", "-f", "qcow2", "base.qcow2", "1M"],
            "Failed to get \"write\" lock",
        ),
        (
            "qemu-img",
            &["info", "base.qcow2"],
            "Failed to get shared \"write\" lock",
        ),
        (
            "qemu-img",
            &["commit", "top.qcow2"],
            "Failed to get shared \"write\" lock",
        ),
    ] {
        let (ok, stderr) = try_tool(s, program, args);
        assert!(
            !ok && stderr.contains(message),
            "{program} {args:?}: {ok} {stderr:?}"
        );
    }
    let (ok, stderr) = try_tool(s, "qemu-img", &["info", "-U", "base.qcow2"]);
    assert!(ok, "qemu-img info -U: {stderr}");
    assert!(bytes(s) == before, "QEMU changed an image it was refused");
}

#[test]
fn while_qimg_holds_an_image_qemu_neither_writes_nor_reads_it() {
    let s = Scratch::new();
    images(&s);
    let holder = Holder::start(
        &s,
        qimg_path(),
        &["io", "-c", "sleep 20000", "base.qcow2"],
        "base.qcow2",
        101,
    );
    qemu_is_refused_writing(&s);
    // Another qimg too.
    refused(
        &s,
        &["io", "-c", "write 0 512", "base.qcow2"],
        "base.qcow2",
        "\"write\"",
    );
    drop(holder);

    // Read-only, qimg shares reading: QEMU reads, but does not write.
    let holder = Holder::start(
        &s,
        qimg_path(),
        &["io", "-r", "-c", "sleep 20000", "base.qcow2"],
        "base.qcow2",
        100,
    );
    let (ok, stderr) = try_tool(&s, "qemu-img", &["info", "base.qcow2"]);
    assert!(ok, "qemu-img info beside a reader: {stderr}");
    let (ok, stderr) = try_tool(&s, "qemu-io", &["-c", "write 0 512", "base.qcow2"]);
    assert!(
        !ok && stderr.contains("Failed to get \"write\" lock"),
        "{stderr}"
    );
    drop(holder);
}

#[test]
fn the_library_holds_its_locks_while_a_handle_lives_and_drops_them_on_close() {
    let s = Scratch::new();
    images(&s);
    let chain = Chain::open_writable(s.path("base.qcow2")).unwrap();
    qemu_is_refused_writing(&s);
    drop(chain);
    let (ok, stderr) = try_tool(&s, "qemu-io", &["-c", "write -P 9 0 512", "base.qcow2"]);
    assert!(ok, "qemu-io after the chain was dropped: {stderr}");

    // Without locks (Locking::Off) QEMU sees nothing.
    let options = ImageOptions {
        writable: true,
        locking: Locking::Off,
        ..ImageOptions::default()
    };
    let image = Image::open_with(s.path("base.qcow2"), &options).unwrap();
    assert!(locked_bytes(&s.path("base.qcow2")).is_empty());
    drop(image);
}

#[test]
fn a_merge_in_progress_holds_its_images_against_qemu() {
    let s = Scratch::new();
    images(&s);
    let mut probed = false;
    let report = ops::commit(
        s.path("top.qcow2"),
        &CommitOptions::default(),
        &mut |_, _| {
            if !probed {
                probed = true;
                for file in ["base.qcow2", "top.qcow2"] {
                    let (ok, stderr) = try_tool(&s, "qemu-io", &["-c", "write 0 512", file]);
                    assert!(
                        !ok && stderr.contains("Failed to get \"write\" lock"),
                        "qemu-io wrote {file} during a commit: {stderr}"
                    );
                }
            }
            true
        },
    )
    .unwrap();
    assert!(probed && report.data_bytes > 0, "{report:?}");
    assert!(locked_bytes(&s.path("base.qcow2")).is_empty());
    assert!(locked_bytes(&s.path("top.qcow2")).is_empty());
    s.assert_clean("base.qcow2", "after the commit");
}
