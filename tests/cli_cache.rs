//! Cache modes (`-t`/`-T`): `none` and `directsync` open the files with `O_DIRECT` and
//! send aligned requests through it; results equal the default mode's and qemu-img's on
//! twin images; the storage stays coherent between its two descriptors.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::Scratch;
use qcow2_engine::storage::{DIRECT_ALIGN, FileCache, FileStorage, Storage};

/// O_DIRECT in the `flags:` line of /proc/self/fdinfo (octal, x86-64 and arm64 differ).
fn o_direct() -> u32 {
    if cfg!(target_arch = "aarch64") {
        0o200000
    } else {
        0o40000
    }
}

fn fd_flags(file: &std::fs::File) -> u32 {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    u32::from_str_radix(flags, 8).unwrap()
}

#[test]
fn direct_storage_is_coherent_with_its_buffered_descriptor() {
    let s = Scratch::new();
    let path = s.path("f.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let cache = FileCache {
        direct: true,
        ..FileCache::default()
    };
    let storage = FileStorage::open_cached(&path, true, cache).unwrap();
    let direct = storage.direct_file().expect("a direct descriptor");
    assert_ne!(fd_flags(direct) & o_direct(), 0, "opened without O_DIRECT");
    assert_eq!(fd_flags(storage.file()) & o_direct(), 0);

    // An aligned write from an unaligned buffer (bounced), an 8-byte metadata-like write
    // inside it (buffered), then reads both ways.
    let mut block = vec![7u8; DIRECT_ALIGN * 4 + 1];
    let unaligned = &mut block[1..];
    storage.write_at(unaligned, 8192).unwrap();
    storage.write_at(&[9u8; 8], 8192 + 100).unwrap();
    let mut want = vec![7u8; DIRECT_ALIGN * 4];
    want[100..108].fill(9);
    let mut got = vec![0u8; DIRECT_ALIGN * 4];
    storage.read_at(&mut got, 8192).unwrap();
    assert!(got == want, "direct read after a buffered write");
    let mut plain = vec![0u8; DIRECT_ALIGN * 4];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut plain, 8192)
        .unwrap();
    assert!(plain == want, "another reader sees what was written");
    // A direct write over pages the buffered descriptor has cached replaces them.
    storage.write_at(&[3u8; 16], 8192 + 200).unwrap();
    storage.write_at(&vec![5u8; DIRECT_ALIGN], 8192).unwrap();
    let mut small = [0u8; 16];
    storage.read_at(&mut small, 8192 + 200).unwrap();
    assert_eq!(small, [5u8; 16], "buffered read after a direct write");
    // A direct read past the end of the file answers as a buffered one.
    let mut past = vec![0u8; DIRECT_ALIGN];
    assert!(storage.read_at(&mut past, 1 << 20).is_err());
    storage.flush().unwrap();

    // `unsafe`: flushes do nothing; `writethrough`: O_DSYNC on the buffered descriptor.
    let through = FileStorage::open_cached(
        &path,
        true,
        FileCache {
            write_through: true,
            ..FileCache::default()
        },
    )
    .unwrap();
    assert_ne!(fd_flags(through.file()) & 0o10000, 0, "O_DSYNC");
    assert!(through.direct_file().is_none());
}

/// Whether `program args` opened `file` with O_DIRECT, as strace sees it; `None` without
/// strace.
fn opened_direct(s: &Scratch, program: &str, args: &[&str], file: &str) -> Option<bool> {
    let log = s.path("strace.log");
    let status = Command::new("strace")
        .args(["-f", "-e", "trace=openat", "-o"])
        .arg(&log)
        .arg(program)
        .args(args)
        .current_dir(s.dir())
        .output()
        .ok()?;
    assert!(status.status.success(), "{program} {args:?}: {status:?}");
    let log = std::fs::read_to_string(&log).unwrap();
    Some(
        log.lines()
            .any(|l| l.contains(&format!("\"{file}\"")) && l.contains("O_DIRECT")),
    )
}

#[test]
fn t_none_opens_o_direct_and_changes_no_result() {
    let s = Scratch::new();
    let qimg = common::qimg_path().to_str().unwrap().to_owned();
    s.create("src.qcow2", "cluster_size=65536", 32 << 20);
    s.qemu_io(
        "src.qcow2",
        "qcow2",
        &[
            "write -P 1 0 3M".to_string(),
            "write -P 2 5M 12k".to_string(),
            "write -z 9M 1M".to_string(),
            "write -P 3 31M 1M".to_string(),
        ],
    );

    // convert: qcow2 output byte for byte as qemu-img's, raw output equal, in every mode.
    let qemu_out = s.qemu_img(&["convert", "-O", "qcow2", "src.qcow2", "qemu.qcow2"]);
    let _ = qemu_out;
    for mode in ["none", "directsync", "writethrough", "unsafe", "writeback"] {
        for (fmt, name) in [("qcow2", "o.qcow2"), ("raw", "o.raw")] {
            let args = [
                "convert",
                "-t",
                mode,
                "-T",
                mode,
                "-O",
                fmt,
                "src.qcow2",
                name,
            ];
            let direct = opened_direct(&s, &qimg, &args, name);
            if direct.is_none() {
                s.qimg(&args);
            }
            if let Some(direct) = direct {
                assert_eq!(
                    direct,
                    mode == "none" || mode == "directsync",
                    "convert -t {mode}: O_DIRECT"
                );
            }
            s.assert_same_content("src.qcow2", name, mode);
            if fmt == "qcow2" {
                assert!(
                    std::fs::read(s.path(name)).unwrap()
                        == std::fs::read(s.path("qemu.qcow2")).unwrap(),
                    "convert -t {mode}: differs from qemu-img's"
                );
            }
        }
    }
    // convert -n into an existing image with -t none.
    s.qemu_img(&["create", "-q", "-f", "qcow2", "n.qcow2", "32M"]);
    s.qimg(&[
        "convert",
        "-n",
        "-t",
        "none",
        "-O",
        "qcow2",
        "src.qcow2",
        "n.qcow2",
    ]);
    s.assert_same_content("src.qcow2", "n.qcow2", "-n");
    s.assert_clean("n.qcow2", "-n");

    // commit and rebase with -t none against qemu-img with -t none on twins.
    s.create_overlay("top.qcow2", "src.qcow2", "qcow2", "", None);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 4 1M 64k".to_string(),
            "write -P 5 20M 8k".to_string(),
        ],
    );
    for dir in ["ours", "qemu"] {
        std::fs::create_dir_all(s.path(dir)).unwrap();
        s.copy("src.qcow2", &format!("{dir}/src.qcow2"));
        s.copy("top.qcow2", &format!("{dir}/top.qcow2"));
    }
    s.qemu_img(&["convert", "-O", "raw", "top.qcow2", "view.raw"]);
    let commit = opened_direct(
        &s,
        &qimg,
        &["commit", "-t", "none", "ours/top.qcow2"],
        "ours/src.qcow2",
    );
    if commit.is_none() {
        s.qimg(&["commit", "-t", "none", "ours/top.qcow2"]);
    }
    assert_ne!(
        commit,
        Some(false),
        "commit -t none: the base not opened O_DIRECT"
    );
    s.qemu_img(&["commit", "-t", "none", "qemu/top.qcow2"]);
    s.assert_same_content("ours/src.qcow2", "qemu/src.qcow2", "commit");
    s.assert_same_content("ours/src.qcow2", "view.raw", "commit");
    s.assert_clean("ours/src.qcow2", "commit");
    s.assert_clean("ours/top.qcow2", "commit");

    s.qemu_img(&["create", "-q", "-f", "qcow2", "empty.qcow2", "32M"]);
    for dir in ["ours", "qemu"] {
        s.copy("top.qcow2", &format!("{dir}/top.qcow2"));
        s.copy("src.qcow2", &format!("{dir}/src.qcow2"));
        s.copy("empty.qcow2", &format!("{dir}/empty.qcow2"));
    }
    let rebase = [
        "rebase",
        "-t",
        "none",
        "-T",
        "none",
        "-b",
        "empty.qcow2",
        "-F",
        "qcow2",
    ];
    s.qimg(&[&rebase[..], &["ours/top.qcow2"]].concat());
    s.qemu_img(&[&rebase[..], &["qemu/top.qcow2"]].concat());
    s.assert_same_content("ours/top.qcow2", "qemu/top.qcow2", "rebase");
    s.assert_same_content("ours/top.qcow2", "view.raw", "rebase");
    s.assert_clean("ours/top.qcow2", "rebase");
    assert_eq!(
        common::backing_of(&s, "ours/top.qcow2").as_deref(),
        Some("empty.qcow2")
    );

    // bench -w -t none writes what qemu-img bench writes, through O_DIRECT.
    for name in ["b1.qcow2", "b2.qcow2"] {
        s.qemu_img(&["create", "-q", "-f", "qcow2", name, "16M"]);
    }
    let bench = [
        "bench", "-w", "-t", "none", "-c", "300", "-s", "4k", "-S", "12k",
    ];
    let direct = opened_direct(&s, &qimg, &[&bench[..], &["b1.qcow2"]].concat(), "b1.qcow2");
    if direct.is_none() {
        s.qimg(&[&bench[..], &["b1.qcow2"]].concat());
    }
    assert_ne!(direct, Some(false), "bench -t none: not opened O_DIRECT");
    s.qemu_img(&[&bench[..], &["b2.qcow2"]].concat());
    s.assert_same_content("b1.qcow2", "b2.qcow2", "bench");
    s.assert_clean("b1.qcow2", "bench");
}

/// Runs the same command line with qemu-img and qimg; both must fail with the same exit
/// code, and qimg with one line naming `file` and saying what qemu-img says.
fn assert_refused_as_qemu_img(s: &Scratch, args: &[&str], file: &str) {
    let theirs = s.output("qemu-img", args);
    let ours = s.qimg_output(args);
    let label = args.join(" ");
    let (q, m) = (
        String::from_utf8_lossy(&theirs.stderr).to_string(),
        String::from_utf8_lossy(&ours.stderr).to_string(),
    );
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{label}: {q} / {m}"
    );
    assert!(!ours.status.success(), "{label}: succeeded");
    const REFUSED: &str = "filesystem does not support O_DIRECT";
    assert!(q.contains(REFUSED), "{label}: qemu-img said {q}");
    common::assert_one_line_failure(&ours, &label);
    assert!(
        m.starts_with(&format!("qimg: {file}: ")) && m.contains(REFUSED),
        "{label}: {m}"
    );
}

/// A file system that refuses O_DIRECT (procfs here: the kernel refuses it on files
/// without direct I/O with EINVAL, as on ramfs, or tmpfs before Linux 6.6) fails every
/// `-t none`/`-T none` open, in one line naming the file, with qemu-img's words and exit
/// code. (The library side: `FileStorage::open_cached`.)
#[test]
fn o_direct_refused_by_the_file_system_fails_in_one_line_as_qemu_img() {
    let s = Scratch::new();
    let proc_file = "/proc/version";
    let direct = FileCache {
        direct: true,
        ..FileCache::default()
    };
    let Err(err) = FileStorage::open_cached(proc_file, false, direct) else {
        panic!("procfs accepted O_DIRECT");
    };
    assert_eq!(err.to_string(), "filesystem does not support O_DIRECT");
    for args in [
        &[
            "convert", "-f", "raw", "-T", "none", "-O", "raw", proc_file, "o.raw",
        ][..],
        &[
            "convert",
            "-f",
            "raw",
            "-T",
            "directsync",
            proc_file,
            "o.raw",
        ],
        &["check", "-f", "qcow2", "-T", "none", proc_file],
        &[
            "compare", "-f", "raw", "-F", "raw", "-T", "none", proc_file, proc_file,
        ],
    ] {
        assert_refused_as_qemu_img(&s, args, proc_file);
    }
}

/// Writing commands refused O_DIRECT on a ramfs mount (mounted when the tests run as
/// root; said and skipped otherwise): convert's output, commit, rebase, amend, bench,
/// check -r, as qemu-img, and the files are left as they were.
#[test]
fn o_direct_refused_for_writes_on_ramfs_as_qemu_img() {
    struct Mount(std::path::PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let s = Scratch::new();
    let dir = s.path("ramfs");
    std::fs::create_dir(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a ramfs here (not root?)");
        return;
    }
    let _mount = Mount(dir.clone());
    s.qemu_img(&["create", "-q", "-f", "raw", "src.raw", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "ramfs/base.qcow2", "1M"]);
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ramfs/top.qcow2",
    ]);
    s.qemu_io("ramfs/top.qcow2", "qcow2", &["write -P 1 0 64k".into()]);
    let before = std::fs::read(s.path("ramfs/top.qcow2")).unwrap();
    let top = "ramfs/top.qcow2";
    for args in [
        &[
            "convert",
            "-t",
            "none",
            "-O",
            "raw",
            "src.raw",
            "ramfs/o.raw",
        ][..],
        &[
            "convert",
            "-t",
            "none",
            "-O",
            "qcow2",
            "src.raw",
            "ramfs/o.qcow2",
        ],
        &["commit", "-t", "none", top],
        &["rebase", "-t", "none", "-u", "-b", "", top],
        &["amend", "-t", "directsync", "-o", "lazy_refcounts=on", top],
        &["bench", "-w", "-t", "none", "-c", "1", top],
        &["check", "-r", "all", "-T", "none", top],
    ] {
        let file = match args[1..] {
            [.., last] if last.starts_with("ramfs/o.") => last,
            _ => top,
        };
        assert_refused_as_qemu_img(&s, args, file);
        assert!(std::fs::read(s.path(top)).unwrap() == before, "{args:?}");
    }
}
