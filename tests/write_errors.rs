//! The write path when things go wrong: a full disk, read-only files and images, writes
//! past the end, an image marked corrupt. Errors must be clear, and the image must stay
//! consistent for `qemu-img check` (leaks allowed, corruption never).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::ops::{Model, Op, random_op};
use common::{HeaderField, Rng, Scratch, write_header_field};
use qcow2_engine::storage::{FaultStorage, MemStorage, Unflushed};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Error, Image, ImageOptions, Layer};

fn writable() -> ChainOptions {
    ChainOptions {
        writable: true,
        ..ChainOptions::default()
    }
}

fn template(size: u64, cluster: u64, refcount_bits: u32) -> Vec<u8> {
    let mem = MemStorage::new();
    let mut opts = CreateOptions::qcow2(size);
    opts.cluster_size = cluster;
    opts.refcount_bits = refcount_bits;
    qcow2_engine::create_on(&mem, &opts).unwrap();
    mem.to_bytes()
}

fn open_on(disk: Arc<FaultStorage>) -> qcow2_engine::Result<Chain> {
    let options = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let image = Image::from_storage(Box::new(disk), "disk.qcow2", &options, None)?;
    Chain::from_layers(vec![Layer::Qcow2(image)])
}

/// `qemu-img check` on `bytes`: exit 0 or 3 (leaks), never corruption. Returns stdout.
fn check_no_corruption(s: &Scratch, bytes: &[u8], label: &str) -> String {
    s.write_file("checked.qcow2", bytes);
    let out = s.output("qemu-img", &["check", "checked.qcow2"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{label}: qemu-img check exits {:?}:\n{text}",
        out.status.code()
    );
    text
}

/// Reads the image in `bytes` with the library and requires `model`, except where an
/// operation in `uncertain` (one that failed) may or may not have changed the bytes.
fn assert_content(s: &Scratch, bytes: &[u8], model: &Model, uncertain: &[Op], label: &str) {
    s.write_file("read.qcow2", bytes);
    let chain = Chain::open(s.path("read.qcow2"))
        .unwrap_or_else(|e| panic!("{label}: opening after the error: {e}"));
    let mut got = vec![0u8; model.bytes.len()];
    chain.read_at(&mut got, 0).unwrap();
    for (at, (&g, &m)) in got.iter().zip(&model.bytes).enumerate() {
        if g != m
            && !uncertain
                .iter()
                .any(|op| model.value_at(op, at as u64).is_some())
        {
            panic!("{label}: byte {at:#x} reads {g:#04x}, expected {m:#04x}");
        }
    }
}

/// An image of `size` bytes made by qemu-img with `options`, QEMU's data written over
/// its first half and an internal snapshot taken, so that writes copy on write; returns
/// its bytes and what it reads.
fn snapshotted_template(s: &Scratch, options: &str, size: u64) -> (Vec<u8>, Vec<u8>) {
    s.create("snap.qcow2", options, size);
    s.qemu_io(
        "snap.qcow2",
        "qcow2",
        &[format!("write -P 0x33 0 {}", size / 2)],
    );
    s.qemu_img(&["snapshot", "-c", "before", "snap.qcow2"]);
    let content = s.reference("snap.qcow2", "qcow2");
    (std::fs::read(s.path("snap.qcow2")).unwrap(), content)
}

/// Runs random operations on an image whose disk fills up `extra` bytes past its start;
/// the failures must be `StorageFull` errors, and afterwards the image — flushed after
/// more space appears, or just dropped — must pass `qemu-img check` and read back.
fn full_disk(cluster: u64, refcount_bits: u32, extra: u64, seed: u64) -> usize {
    let s = Scratch::new();
    let size = 4 << 20;
    let bytes = template(size, cluster, refcount_bits);
    let label = format!(
        "full disk: {cluster}-byte clusters, refcount_bits={refcount_bits}, {extra} bytes free"
    );
    full_disk_on(
        &s,
        &bytes,
        vec![0; size as usize],
        cluster,
        extra,
        seed,
        &label,
    )
}

fn full_disk_on(
    s: &Scratch,
    bytes: &[u8],
    initial: Vec<u8>,
    cluster: u64,
    extra: u64,
    seed: u64,
    label: &str,
) -> usize {
    let size = initial.len() as u64;
    let mut failures = 0;
    for lift_limit in [true, false] {
        let disk = Arc::new(FaultStorage::from_bytes(bytes.to_vec()));
        disk.limit_len(Some(bytes.len() as u64 + extra));
        let chain = open_on(disk.clone()).unwrap();
        let mut model = Model::new(initial.clone(), cluster, false);
        let mut uncertain = Vec::new();
        let mut rng = Rng::new(seed);
        for _ in 0..40 {
            let op = random_op(&mut rng, size, cluster, 24 * cluster, 3);
            match op.run(&chain) {
                Ok(()) => model.apply(&op),
                Err(e) => {
                    failures += 1;
                    let io = match e.root() {
                        Error::Io { source, .. } => source.kind(),
                        other => panic!("{label}: {} failed with {other}", op.describe()),
                    };
                    assert_eq!(io, std::io::ErrorKind::StorageFull, "{label}: {e}");
                    assert!(
                        e.report().to_string().contains("disk.qcow2"),
                        "{label}: {e}"
                    );
                    if op != Op::Flush {
                        uncertain.push(op);
                    }
                }
            }
        }
        if lift_limit {
            // Space comes back: the next flush must make everything durable.
            disk.limit_len(None);
            chain
                .flush()
                .unwrap_or_else(|e| panic!("{label}: flush after space came back: {e}"));
            drop(chain);
            let durable = disk.crash_image(Unflushed::Lost);
            check_no_corruption(s, &durable, label);
            assert_content(s, &durable, &model, &uncertain, label);
        } else {
            let _ = chain.flush();
            drop(chain);
            let live = disk.crash_image(Unflushed::Kept);
            check_no_corruption(s, &live, &format!("{label}, dropped"));
            Chain::open({
                s.write_file("dropped.qcow2", &live);
                s.path("dropped.qcow2")
            })
            .unwrap_or_else(|e| panic!("{label}: opening the dropped image: {e}"));
        }
    }
    failures
}

#[test]
fn a_full_disk_fails_writes_cleanly_and_leaves_a_consistent_image() {
    let mut failures = 0;
    for (i, extra) in [0u64, 512, 4096, 20_000, 65536, 100_000, 300_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        failures += full_disk(65536, 16, extra, i as u64);
        failures += full_disk(4096, 1, extra, 10 + i as u64);
    }
    assert!(failures > 0, "the disk never filled up");
}

#[test]
fn a_full_disk_while_the_refcount_table_grows_leaves_a_consistent_image() {
    // 512-byte clusters, 64-bit refcounts: the table moves every 2 MiB of file.
    let mut failures = 0;
    for (i, extra) in (0..12u64).map(|i| i * 190_000).enumerate() {
        failures += full_disk(512, 64, extra, 100 + i as u64);
    }
    assert!(failures > 0, "the disk never filled up");
}

/// A flush that fails writing a new L2 table must not lose it: neither may a later
/// checkpoint publish the L1 entry without the table, nor may the table be forgotten.
#[test]
fn a_failed_l2_table_write_is_retried_and_never_published_unwritten() {
    let s = Scratch::new();
    let bytes = template(4 << 20, 65536, 16);
    for lift_limit in [false, true] {
        let disk = Arc::new(FaultStorage::from_bytes(bytes.clone()));
        disk.limit_len(Some(bytes.len() as u64));
        let chain = open_on(disk.clone()).unwrap();
        // Needs a new L2 table (past the end of the file) and nothing else.
        chain.write_zeroes(0, 65536, false).unwrap();
        let e = chain.flush().unwrap_err();
        assert!(e.report().to_string().contains("no space left"), "{e}");
        if lift_limit {
            disk.limit_len(None);
            chain.flush().unwrap();
        }
        drop(chain); // a second checkpoint (close), failing again without space
        let image = disk.crash_image(Unflushed::Kept);
        let label = format!("lift_limit={lift_limit}");
        let report = check_no_corruption(&s, &image, &label);
        assert!(!report.contains("ERROR"), "{label}: {report}");
        if lift_limit {
            s.write_file("z.qcow2", &image);
            let map = s.qemu_img(&["map", "--output=json", "z.qcow2"]);
            assert!(map.contains("\"zero\": true, \"data\": false"), "{map}");
        }
    }
}

#[test]
fn a_full_disk_while_copying_on_write_from_a_snapshot_leaves_a_consistent_image() {
    let mut failures = 0;
    for (i, extra) in [0u64, 4096, 30_000, 70_000, 200_000]
        .into_iter()
        .enumerate()
    {
        let s = Scratch::new();
        let (bytes, content) = snapshotted_template(&s, "cluster_size=4096", 2 << 20);
        let label = format!("full disk, snapshot: {extra} bytes free");
        failures += full_disk_on(&s, &bytes, content, 4096, extra, 200 + i as u64, &label);
    }
    assert!(failures > 0, "the disk never filled up");
}

#[test]
fn opening_a_read_only_file_for_writing_fails_naming_the_file() {
    let s = Scratch::new();
    s.create("ro.qcow2", "", 1 << 20);
    let path = s.path("ro.qcow2");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let can_write_anyway = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    if can_write_anyway {
        // Running as root: permissions do not stop us, so only the storage case below
        // applies.
        eprintln!("note: file permissions are not enforced for this user");
    } else {
        let e = Chain::open_with(&path, &writable()).unwrap_err();
        let msg = e.report().to_string();
        assert!(msg.contains("ro.qcow2"), "{msg}");
        assert!(msg.to_lowercase().contains("permission denied"), "{msg}");
    }
    // A read-only storage under an image opened for writing.
    let disk = FaultStorage::from_bytes(std::fs::read(&path).unwrap());
    disk.set_read_only(true);
    let options = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let e = Image::from_storage(Box::new(disk), "ro.qcow2", &options, None).unwrap_err();
    let msg = e.report().to_string();
    assert!(matches!(e.root(), Error::ReadOnly { .. }), "{msg}");
    assert!(
        msg.contains("ro.qcow2") && msg.contains("read-only"),
        "{msg}"
    );
}

#[test]
fn writing_to_a_chain_opened_read_only_fails_naming_the_file() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    let chain = s.open("a.qcow2");
    let errors = [
        chain.write_at(&[1; 10], 0).unwrap_err(),
        chain.write_zeroes(0, 4096, false).unwrap_err(),
        chain.discard(0, 65536).unwrap_err(),
        chain.flush().unwrap_err(),
    ];
    for e in errors {
        let msg = e.report().to_string();
        assert!(matches!(e.root(), Error::ReadOnly { .. }), "{msg}");
        assert!(
            msg.contains("a.qcow2") && msg.contains("read-only"),
            "{msg}"
        );
    }
    // Closing a read-only chain is fine, and nothing changed.
    chain.close().unwrap();
    drop(chain);
    let out = s.qemu_img(&["check", "a.qcow2"]);
    assert!(out.contains("No errors"), "{out}");
}

#[test]
fn writing_past_the_virtual_size_fails_naming_offset_and_size() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    let chain = Chain::open_with(s.path("a.qcow2"), &writable()).unwrap();
    let size = chain.size();
    let errors = [
        chain.write_at(&[1; 20], size - 10).unwrap_err(),
        chain.write_at(&[1; 1], size).unwrap_err(),
        chain.write_at(&[1; 1], u64::MAX).unwrap_err(),
        chain.write_zeroes(size - 10, 20, true).unwrap_err(),
        chain.discard(size, 1).unwrap_err(),
    ];
    for e in errors {
        let msg = e.report().to_string();
        assert!(
            matches!(e.root(), Error::OutOfRange { size: s, .. } if *s == size),
            "{msg}"
        );
        assert!(msg.contains("a.qcow2"), "{msg}");
        assert!(msg.contains(&size.to_string()), "names the size: {msg}");
    }
    let msg = chain
        .write_at(&[1; 20], size - 10)
        .unwrap_err()
        .report()
        .to_string();
    assert!(
        msg.contains(&format!("{:#x}", size - 10)),
        "names the offset: {msg}"
    );
    // Nothing was written, nothing leaked.
    chain.close().unwrap();
    drop(chain);
    let out = s.qemu_img(&["check", "a.qcow2"]);
    assert!(out.contains("No errors"), "{out}");
    let mut buf = vec![0xffu8; 20];
    s.open("a.qcow2").read_at(&mut buf, size - 20).unwrap();
    assert_eq!(buf, [0; 20]);
}

#[test]
fn an_image_marked_corrupt_opens_read_only_with_a_warning() {
    let s = Scratch::new();
    s.create("bad.qcow2", "", 1 << 20);
    s.qemu_io("bad.qcow2", "qcow2", &["write -P 0x42 0 64k".into()]);
    // Incompatible feature bit 1: corrupt.
    write_header_field(
        &s.path("bad.qcow2"),
        HeaderField::IncompatibleFeatures,
        1 << 1,
    );
    let before = std::fs::read(s.path("bad.qcow2")).unwrap();
    let chain = Chain::open_with(s.path("bad.qcow2"), &writable()).unwrap();
    assert!(
        chain
            .warnings()
            .iter()
            .any(|w| w.contains("bad.qcow2") && w.contains("corrupt") && w.contains("read-only")),
        "warnings: {:?}",
        chain.warnings()
    );
    let mut buf = vec![0u8; 65536];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    let e = chain.write_at(&[1], 0).unwrap_err();
    assert!(matches!(e.root(), Error::ReadOnly { .. }), "{e}");
    assert!(e.report().to_string().contains("bad.qcow2"), "{e}");
    chain.close().unwrap();
    drop(chain);
    assert_eq!(
        std::fs::read(s.path("bad.qcow2")).unwrap(),
        before,
        "file unchanged"
    );
    // Without the chain's fallback, opening the image itself for writing says why.
    let options = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let e = Image::open_with(s.path("bad.qcow2"), &options).unwrap_err();
    let msg = e.report().to_string();
    assert!(
        msg.contains("bad.qcow2") && msg.contains("corrupt"),
        "{msg}"
    );
}

/// Moving the refcount table writes new blocks and a new table past the end of the file;
/// when that fails, the refcounts in memory must not go on as if the table had moved.
#[test]
fn a_full_disk_while_moving_the_refcount_table_leaves_a_consistent_image() {
    let s = Scratch::new();
    // 512-byte clusters, 64-bit refcounts: the first table covers 2 MiB of file.
    s.create("near.qcow2", "cluster_size=512,refcount_bits=64", 4 << 20);
    s.qemu_io("near.qcow2", "qcow2", &["write -P 0x5a 0 1950k".into()]);
    let content = s.reference("near.qcow2", "qcow2");
    let bytes = std::fs::read(s.path("near.qcow2")).unwrap();
    for free in [0u64, 512, 4096, 40_000, 60_000, 100_000] {
        let label = format!("{free} bytes free");
        let disk = Arc::new(FaultStorage::from_bytes(bytes.clone()));
        disk.limit_len(Some(bytes.len() as u64 + free));
        let chain = open_on(disk.clone()).unwrap();
        let mut model = Model::new(content.clone(), 512, false);
        let mut uncertain = Vec::new();
        let mut failed = false;
        for i in 0..6u64 {
            let op = Op::Write {
                offset: (2 << 20) + i * (128 << 10),
                data: vec![i as u8 + 1; 128 << 10],
            };
            match op.run(&chain) {
                Ok(()) => model.apply(&op),
                Err(_) => {
                    failed = true;
                    uncertain.push(op);
                }
            }
        }
        assert!(failed, "{label}: the disk never filled up");
        disk.limit_len(None);
        for i in 0..6u64 {
            let op = Op::Write {
                offset: (3 << 20) + i * (64 << 10),
                data: vec![i as u8 + 0x80; 64 << 10],
            };
            op.run(&chain)
                .unwrap_or_else(|e| panic!("{label}: {} with space: {e}", op.describe()));
            model.apply(&op);
        }
        chain.close().unwrap();
        drop(chain);
        let image = disk.crash_image(Unflushed::Lost);
        check_no_corruption(&s, &image, &label);
        assert_content(&s, &image, &model, &uncertain, &label);
    }
}

/// A refcount table whose first entry is zero leaves the header's range without a block,
/// which reads as free: a write must never put a refcount block (or data) over the
/// header (found by the `bitmaps` fuzz target; QEMU refuses a block at offset 0).
#[test]
fn a_write_never_allocates_over_the_header() {
    let s = common::Scratch::new();
    s.create("a.qcow2", "cluster_size=512", 1 << 20);
    let path = s.path("a.qcow2");
    let table = common::read_header_field(&path, common::HeaderField::RefcountTableOffset);
    s.write_u64("a.qcow2", table, 0);
    let out = s.qimg_output(&["io", "-c", "write -P 1 0 4k", "a.qcow2"]);
    let magic = std::fs::read(&path).unwrap()[..4].to_vec();
    assert_eq!(magic, b"QFI\xfb", "the header was overwritten: {out:?}");
    // Whatever the outcome, QEMU still opens the image.
    s.qemu_img(&["info", "a.qcow2"]);
}
