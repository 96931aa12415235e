//! Cases: backing chains that loop, run deep or end in odd files, the backing confinement
//! options, and damaged backing file names.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::{HeaderField, Scratch};
use crate::fixtures::{Fixture, damaged};
use crate::layout::{Layout, get, put, put_field};
use crate::runner::{Case, Expect};

/// Writes a small qcow2 image made from `template` (an overlay qemu-img made with the
/// 11-byte backing name `l0000.qcow2`) with its backing name replaced by `backing` of the
/// same length, or with no backing file.
fn layer_from(template: &[u8], backing: Option<&str>) -> Vec<u8> {
    let mut b = template.to_vec();
    let offset = get(&b, 8, 8) as usize;
    match backing {
        Some(name) => {
            assert_eq!(name.len(), 11, "{name}");
            b[offset..offset + 11].copy_from_slice(name.as_bytes());
        }
        None => {
            put_field(&mut b, HeaderField::BackingFileOffset, 0);
            put_field(&mut b, HeaderField::BackingFileSize, 0);
        }
    }
    b
}

/// Overlays whose backing file names loop, run deep, or name odd files; and the
/// `--confine-backing`/`--regular-backing-only` options.
pub(crate) fn chain_cases(s: &Scratch) -> Vec<Case> {
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-o",
        "cluster_size=512",
        "-b",
        "l0000.qcow2",
        "-F",
        "qcow2",
        "layer.qcow2",
        "1M",
    ]);
    let template = Arc::new(std::fs::read(s.path("layer.qcow2")).unwrap());
    let mut cases = Vec::new();
    // Loops.
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: image is its own backing file",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0000.qcow2")))
                    .unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: two images back each other",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0001.qcow2")))
                    .unwrap();
                std::fs::write(dir.join("l0001.qcow2"), layer_from(&t, Some("l0000.qcow2")))
                    .unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    let t = template.clone();
    cases.push(
        Case::new(
            "chain: loop through a symbolic link",
            Box::new(move |dir| {
                std::fs::write(dir.join("l0000.qcow2"), layer_from(&t, Some("l0001.qcow2")))
                    .unwrap();
                symlink("l0000.qcow2", dir.join("l0001.qcow2")).unwrap();
                "l0000.qcow2".into()
            }),
        )
        .expect(Expect::ChainFails("loops"))
        .without_qemu(),
    );
    // Deep chains: 1000 layers open; past the limit of 1024 they are refused.
    for (depth, expect) in [
        (1000usize, Expect::Success),
        (1030, Expect::ChainFails("deeper than 1024")),
    ] {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: {depth} layers"),
                Box::new(move |dir| {
                    for i in 0..depth {
                        let below = format!("l{:04}.qcow2", i + 1);
                        let backing = (i + 1 < depth).then_some(below.as_str());
                        std::fs::write(dir.join(format!("l{i:04}.qcow2")), layer_from(&t, backing))
                            .unwrap();
                    }
                    "l0000.qcow2".into()
                }),
            )
            .expect(expect)
            // qemu-img reads a 1000-deep chain slowly; the depth is ours to check.
            .without_qemu(),
        );
    }
    // Backing names that are not images.
    type Make = Box<dyn Fn(&Path) + Send + Sync>;
    let odd: Vec<(&str, &str, Expect, Make)> = vec![
        (
            "a directory",
            "ldir.qcow2",
            Expect::ChainFails("directory"),
            Box::new(|dir| std::fs::create_dir(dir.join("ldir.qcow2")).unwrap()),
        ),
        (
            "a missing file",
            "lnone.qcow2",
            Expect::ChainFails("lnone.qcow2"),
            Box::new(|_| {}),
        ),
        (
            "a FIFO",
            "lfifo.qcow2",
            Expect::ChainFails("FIFO"),
            Box::new(|dir| {
                let made = Command::new("mkfifo").arg(dir.join("lfifo.qcow2")).status();
                assert!(made.unwrap().success());
            }),
        ),
        (
            "a symlink loop",
            "lloop.qcow2",
            Expect::ChainFails("lloop.qcow2"),
            Box::new(|dir| symlink("lloop.qcow2", dir.join("lloop.qcow2")).unwrap()),
        ),
        ("/dev/zero", "/dev/zero", Expect::Any, Box::new(|_| {})),
        ("/dev/null", "/dev/null", Expect::Any, Box::new(|_| {})),
        ("/", "/", Expect::ChainFails("directory"), Box::new(|_| {})),
    ];
    for (what, name, expect, make) in odd {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: backing file is {what}"),
                Box::new(move |dir| {
                    make(dir);
                    std::fs::write(dir.join("top.qcow2"), with_backing_name(&t, name)).unwrap();
                    "top.qcow2".into()
                }),
            )
            .expect(expect)
            .without_qemu(),
        );
    }
    // The backing format extension naming a format we do not read, and a device read
    // as qcow2 because the extension says so.
    for (what, format, backing) in [
        ("vmdk", "vmdk", "l0001.qcow2"),
        ("qcow2 for /dev/zero", "qcow2", "/dev/zero"),
        ("empty", "", "l0001.qcow2"),
    ] {
        let t = template.clone();
        cases.push(
            Case::new(
                format!("chain: backing format {what}"),
                Box::new(move |dir| {
                    let b = with_backing_format(&with_backing_name(&t, backing), format);
                    std::fs::write(dir.join("l0001.qcow2"), layer_from(&t, None)).unwrap();
                    std::fs::write(dir.join("top.qcow2"), b).unwrap();
                    "top.qcow2".into()
                }),
            )
            .without_qemu(),
        );
    }
    // Confinement: a backing file outside the directory, reached by `..` and by a link;
    // one inside; and a device with and without --regular-backing-only.
    for (what, name, refused) in [
        ("outside, by ..", "../base.qcow2", true),
        ("outside, by a link", "l0001.qcow2", true),
        ("inside", "l0002.qcow2", false),
    ] {
        let t = template.clone();
        let case = Case::new(
            format!("confine: backing file {what}"),
            Box::new(move |dir| {
                let jail = dir.join("jail");
                std::fs::create_dir(&jail).unwrap();
                std::fs::write(dir.join("base.qcow2"), layer_from(&t, None)).unwrap();
                std::fs::write(jail.join("l0002.qcow2"), layer_from(&t, None)).unwrap();
                symlink("../base.qcow2", jail.join("l0001.qcow2")).unwrap();
                std::fs::write(jail.join("top.qcow2"), with_backing_name(&t, name)).unwrap();
                "jail/top.qcow2".into()
            }),
        )
        .global(&["--confine-backing", "{dir}/jail"])
        .without_qemu();
        cases.push(if refused {
            case.expect(Expect::ChainFails("outside the directory"))
        } else {
            case.expect(Expect::Success)
        });
    }
    for (flag, expect) in [
        (true, Expect::ChainFails("not a regular file")),
        (false, Expect::Success),
    ] {
        let t = template.clone();
        let mut case = Case::new(
            format!("confine: /dev/zero backing, --regular-backing-only {flag}"),
            Box::new(move |dir| {
                let b = with_backing_format(&with_backing_name(&t, "/dev/zero"), "raw");
                std::fs::write(dir.join("top.qcow2"), b).unwrap();
                "top.qcow2".into()
            }),
        )
        .expect(expect)
        .without_qemu();
        if flag {
            case = case.global(&["--regular-backing-only"]);
        }
        cases.push(case);
    }
    cases
}

/// `template` with backing name `name` (any length that fits before the cluster end).
pub(crate) fn with_backing_name(template: &[u8], name: &str) -> Vec<u8> {
    let mut b = template.to_vec();
    let offset = get(&b, 8, 8) as usize;
    if b.len() < offset + name.len() {
        b.resize(offset + name.len(), 0);
    }
    b[offset..offset + 11].fill(0);
    b[offset..offset + name.len()].copy_from_slice(name.as_bytes());
    put_field(&mut b, HeaderField::BackingFileSize, name.len() as u64);
    b
}

/// `image` (whose backing format extension says `qcow2`) with the backing format `format`
/// (at most 5 bytes, so the extension keeps its padded size).
fn with_backing_format(image: &[u8], format: &str) -> Vec<u8> {
    let mut b = image.to_vec();
    let l = Layout::parse(image);
    let (at, _, _) = *l.exts.iter().find(|e| e.1 == 0xe279_2aca).unwrap();
    put(&mut b, at + 4, 4, format.len() as u64);
    let data = (at + 8) as usize;
    b[data..data + 8].fill(0);
    b[data..data + format.len()].copy_from_slice(format.as_bytes());
    b
}

/// Backing-name damage on the chain fixture: names that are empty, too long, hold a NUL,
/// use a protocol or `json:`.
pub(crate) fn backing_name_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let off = get(&f.bytes, 8, 8);
    let size = get(&f.bytes, 16, 4);
    let mut cases = Vec::new();
    for (what, name) in [
        ("json:", "json:{\"driver\":\"raw\"}".to_string()),
        ("nbd:", "nbd://localhost/x".to_string()),
        ("file:", "file:base.qcow2".to_string()),
        ("1023 bytes", "a".repeat(1023)),
        ("absolute missing", "/nonexistent/base.qcow2".to_string()),
        ("dot-dot", "../base.qcow2".to_string()),
        ("NUL inside", "base\0.qcow2".to_string()),
        ("invalid UTF-8", "base\u{fffd}.qcow2".to_string()),
        ("with a newline", "no\nsuch\r\nbase.qcow2".to_string()),
        ("with an escape sequence", "\u{1b}[2Jbase.qcow2".to_string()),
    ] {
        let bytes = if what == "invalid UTF-8" {
            b"base\xff.qcow2".to_vec()
        } else {
            name.into_bytes()
        };
        cases.push(damaged(f, format!("backing name {what}"), move |b| {
            let o = off as usize;
            b[o..o + size as usize].fill(0);
            if b.len() < o + bytes.len() {
                b.resize(o + bytes.len(), 0);
            }
            b[o..o + bytes.len()].copy_from_slice(&bytes);
            put_field(b, HeaderField::BackingFileSize, bytes.len() as u64);
        }));
    }
    cases.push(damaged(f, "backing name empty", move |b| {
        put_field(b, HeaderField::BackingFileSize, 0)
    }));
    cases
}
