//! Format probing as qemu-img probes (CLI.md, "Formats"): every format qemu-img recognises
//! is named, by `Format::probe` and `qimg info` alike, as `qemu-img info` names it; every
//! other command refuses such an image in one line and changes nothing; `-f raw` reads its
//! bytes; and a write that would make a probed raw image look like another format is
//! refused, as QEMU's raw driver refuses it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

mod common;

use common::Scratch;
use qcow2_engine::storage::FileStorage;
use qcow2_engine::{Chain, CreateOptions, Error, Format, create};
use serde_json::Value;

/// An image of every kind `qemu-img create` makes of the formats it probes, with the
/// format qemu-img must say it is: (file, format, `qemu-img create` arguments before the
/// file).
const MADE_BY_QEMU_IMG: &[(&str, &str, &[&str])] = &[
    ("disk.qcow", "qcow", &["-f", "qcow"]),
    ("sparse.vmdk", "vmdk", &["-f", "vmdk"]),
    (
        "flat.vmdk",
        "vmdk",
        &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
    ),
    (
        "stream.vmdk",
        "vmdk",
        &["-f", "vmdk", "-o", "subformat=streamOptimized"],
    ),
    ("disk.vdi", "vdi", &["-f", "vdi"]),
    ("disk.vhdx", "vhdx", &["-f", "vhdx"]),
    ("dynamic.vpc", "vpc", &["-f", "vpc"]),
    ("sized.vpc", "vpc", &["-f", "vpc", "-o", "force_size=on"]),
    // A fixed VHD has its only footer at its end: qemu-img probes it as raw.
    ("fixed.vpc", "raw", &["-f", "vpc", "-o", "subformat=fixed"]),
    ("disk.qed", "qed", &["-f", "qed"]),
    (
        "disk.luks",
        "luks",
        &[
            "--object",
            "secret,id=sec0,data=abc",
            "-f",
            "luks",
            "-o",
            "key-secret=sec0",
        ],
    ),
    ("disk.parallels", "parallels", &["-f", "parallels"]),
    ("disk.qcow2", "qcow2", &["-f", "qcow2"]),
    ("disk.raw", "raw", &["-f", "raw"]),
];

/// The shell script a cloop (version 2.0) image starts with (block/cloop.c).
const CLOOP_PREAMBLE: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// Makes every image of [`MADE_BY_QEMU_IMG`] (1 MiB) and the formats qemu-img cannot
/// create, by hand from their headers as QEMU's drivers read them: a bochs growing redolog
/// (block/bochs.c: magic, type and subtype C strings, version 2.0, header size, catalog of
/// 2 entries, bitmap and extent sizes, disk size), a cloop image (block/cloop.c: the
/// preamble, big-endian block size and count at 128, then the block offsets) and a file
/// named `.dmg` (block/dmg.c probes by name only).
fn make_images(s: &Scratch) {
    for (name, _, args) in MADE_BY_QEMU_IMG {
        let mut all = vec!["create", "-q"];
        all.extend_from_slice(args);
        all.extend([*name, "1M"]);
        s.qemu_img(&all);
    }
    let mut bochs = vec![0u8; 512];
    put(&mut bochs, 0, b"Bochs Virtual HD Image");
    put(&mut bochs, 32, b"Redolog");
    put(&mut bochs, 48, b"Growing");
    put(&mut bochs, 64, &[0, 0, 2, 0]); // version 0x00020000
    put(&mut bochs, 68, &[0, 2, 0, 0]); // header size 512
    put(&mut bochs, 72, &[2, 0, 0, 0]); // catalog entries
    put(&mut bochs, 76, &[1, 0, 0, 0]); // bitmap blocks
    put(&mut bochs, 80, &[0, 0x10, 0, 0]); // extent size 4096
    put(&mut bochs, 88, &[0, 0x20, 0, 0, 0, 0, 0, 0]); // disk size 8192
    bochs.extend([0xff; 8]); // both catalog entries unallocated
    s.write_file("disk.bochs", &bochs);
    let mut cloop = CLOOP_PREAMBLE.to_vec();
    cloop.resize(128, 0);
    cloop.extend(512u32.to_be_bytes()); // block size
    cloop.extend(1u32.to_be_bytes()); // blocks
    let offsets = cloop.len() as u64 + 16;
    cloop.extend(offsets.to_be_bytes());
    cloop.extend(offsets.to_be_bytes());
    s.write_file("disk.cloop", &cloop);
    s.write_file("disk.dmg", &[0x5a; 4096]);
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Every image [`make_images`] makes with the format qemu-img gives it.
fn all_images() -> Vec<(&'static str, &'static str)> {
    let mut all: Vec<_> = MADE_BY_QEMU_IMG.iter().map(|(n, f, _)| (*n, *f)).collect();
    all.extend([
        ("disk.bochs", "bochs"),
        ("disk.cloop", "cloop"),
        ("disk.dmg", "dmg"),
    ]);
    all
}

/// The images of formats this crate does not open.
fn foreign_images() -> Vec<(&'static str, &'static str)> {
    all_images()
        .into_iter()
        .filter(|(_, f)| !matches!(*f, "qcow2" | "raw"))
        .collect()
}

/// `qemu-img info --output=json` of `name`, or its error line when it cannot open it.
fn qemu_img_info(s: &Scratch, name: &str) -> Result<Value, String> {
    let out = s.output("qemu-img", &["info", "--output=json", name]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("qemu-img info JSON"))
}

/// The format `Format::probe` gives the file `name`.
fn probe(s: &Scratch, name: &str) -> Format {
    let path = s.path(name);
    let storage = FileStorage::open(&path, false).unwrap();
    Format::probe(&storage, Path::new(name)).unwrap()
}

/// Every file of the directory and its bytes.
fn files(s: &Scratch) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(s.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_format_probes_as_qemu_img_says() {
    let s = Scratch::new();
    make_images(&s);
    for (name, expected) in all_images() {
        let found = probe(&s, name);
        assert_eq!(found.name(), expected, "{name}: Format::probe");
        match qemu_img_info(&s, name) {
            Ok(info) => assert_eq!(info["format"], expected, "{name}: qemu-img info"),
            // The dmg driver, chosen by the name alone, cannot open a file without the
            // trailer a dmg image ends with; its error names it.
            Err(e) => assert!(name.ends_with(".dmg") && e.contains("dmg"), "{name}: {e}"),
        }
    }
    // A monolithicFlat descriptor's extent is raw data.
    assert_eq!(probe(&s, "flat-flat.vmdk"), Format::Raw);
    assert_eq!(
        qemu_img_info(&s, "flat-flat.vmdk").unwrap()["format"],
        "raw"
    );
}

#[test]
fn qimg_info_names_each_format_and_the_sizes_it_can_read() {
    let s = Scratch::new();
    make_images(&s);
    // Formats whose size is not in their first sector (or not only there): no size.
    let no_size = [
        "flat.vmdk",
        "disk.vhdx",
        "disk.parallels",
        "disk.bochs",
        "disk.cloop",
    ];
    for (name, format) in foreign_images() {
        let json: Value = serde_json::from_str(&s.qimg(&["info", "--output=json", name]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(json["format"], format, "{name}");
        let human = s.qimg(&["info", name]);
        assert!(
            human.contains(&format!("\nfile format: {format}\n")),
            "{name}:\n{human}"
        );
        let reference = qemu_img_info(&s, name);
        if let Ok(reference) = &reference {
            assert_eq!(json["format"], reference["format"], "{name}");
        }
        if no_size.contains(&name) || name.ends_with(".dmg") {
            assert!(json.get("virtual-size").is_none(), "{name}: {json}");
            assert!(!human.contains("virtual size:"), "{name}:\n{human}");
        } else {
            let reference = reference.unwrap();
            assert_eq!(json["virtual-size"], reference["virtual-size"], "{name}");
        }
        let len = std::fs::metadata(s.path(name)).unwrap().len();
        assert_eq!(
            json["children"][0]["info"]["virtual-size"],
            len.div_ceil(512) * 512,
            "{name}"
        );
        assert!(json["actual-size"].is_u64(), "{name}: {json}");
    }
}

#[test]
fn every_other_command_refuses_it_in_one_line_and_changes_nothing() {
    let s = Scratch::new();
    make_images(&s);
    for (name, format) in foreign_images() {
        let commands: &[&[&str]] = &[
            &["map", name],
            &["convert", "-O", "qcow2", name, "out.qcow2"],
            &["convert", "-O", "raw", name, "out.raw"],
            &["check", name],
            &["compare", name, name],
            &["io", "-r", "-c", "read 0 512", name],
            &["io", "-c", "write 0 512", name],
            &["commit", name],
            &["snapshot", "-l", name],
            &["checksum", name],
            &["map", "-f", format, name],
        ];
        let before = files(&s);
        for args in commands {
            let out = s.qimg_output(args);
            let label = format!("qimg {}", args.join(" "));
            // compare keeps exit code 1 for "different", as qemu-img.
            let code = if args[0] == "compare" { 2 } else { 1 };
            assert_eq!(out.status.code(), Some(code), "{label}: {}", stderr(&out));
            assert_eq!(
                stderr(&out),
                format!("qimg: {name}: {format} images are not supported\n"),
                "{label}"
            );
            assert!(out.stdout.is_empty(), "{label}: stdout");
        }
        assert_eq!(files(&s), before, "{name}: files changed");
    }
}

#[test]
fn f_raw_reads_the_bytes_as_raw() {
    let s = Scratch::new();
    make_images(&s);
    for (name, _) in foreign_images() {
        let bytes = std::fs::read(s.path(name)).unwrap();
        let info: Value =
            serde_json::from_str(&s.qimg(&["info", "-f", "raw", "--output=json", name])).unwrap();
        assert_eq!(info["format"], "raw", "{name}");
        s.qimg(&["convert", "-f", "raw", "-O", "raw", name, "out.raw"]);
        let mut expected = bytes.clone();
        expected.resize(bytes.len().div_ceil(512) * 512, 0);
        assert_eq!(
            std::fs::read(s.path("out.raw")).unwrap(),
            expected,
            "{name}"
        );
        let read = s.qimg(&["io", "-f", "raw", "-r", "-c", "read 0 512", name]);
        assert!(
            read.starts_with("read 512/512 bytes at offset 0\n"),
            "{name}: {read}"
        );
        std::fs::remove_file(s.path("out.raw")).unwrap();
    }
}

#[test]
fn a_vmdk_backing_file_is_refused_by_name() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "vmdk", "base.vmdk", "1M"]);
    // Named with its backing format.
    s.create_overlay("named.qcow2", "base.vmdk", "vmdk", "", None);
    // Without one: the backing file is probed (qemu-img create insists on -F; the library
    // writes what it is told).
    create(
        s.path("probed.qcow2"),
        &CreateOptions {
            size: Some(1 << 20),
            backing_file: Some("base.vmdk".into()),
            open_backing: false,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    for overlay in ["named.qcow2", "probed.qcow2"] {
        let e = Chain::open(s.path(overlay)).unwrap_err();
        assert!(
            matches!(e.root(), Error::FormatNotSupported { format: "vmdk" }),
            "{overlay}: {e:?}"
        );
        assert_eq!(e.file(), Some(s.path("base.vmdk").as_path()), "{overlay}");
        for args in [
            &["map", overlay][..],
            &["io", "-r", "-c", "read 0 512", overlay],
        ] {
            let out = s.qimg_output(args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            assert_eq!(
                stderr(&out),
                "qimg: base.vmdk: vmdk images are not supported\n",
                "{args:?}"
            );
        }
        // info names the backing file's format, as qemu-img info --backing-chain.
        let chain: Value =
            serde_json::from_str(&s.qimg(&["info", "--backing-chain", "--output=json", overlay]))
                .unwrap();
        assert_eq!(chain[0]["format"], "qcow2");
        assert_eq!(chain[1]["format"], "vmdk");
        assert_eq!(chain[1]["virtual-size"], 1 << 20);
    }
    // Named as raw, its bytes are the guest's.
    s.create_overlay("as-raw.qcow2", "base.vmdk", "raw", "", None);
    s.qimg(&["io", "-r", "-c", "read -P 0x4b 0 1", "as-raw.qcow2"]);
}

/// The first sector of a qcow2 image.
fn qcow2_header(s: &Scratch) -> Vec<u8> {
    s.create("header.qcow2", "", 1 << 20);
    std::fs::read(s.path("header.qcow2")).unwrap()[..512].to_vec()
}

#[test]
fn a_write_making_a_probed_raw_image_look_like_qcow2_is_refused_as_qemu_io_does() {
    let s = Scratch::new();
    s.write_file("header.bin", &qcow2_header(&s));
    s.qemu_img(&["create", "-q", "-f", "raw", "disk.img", "1M"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "qemu.img", "1M"]);
    let before = std::fs::read(s.path("disk.img")).unwrap();

    let out = s.qimg_output(&["io", "-c", "write -s header.bin 0 512", "disk.img"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "qimg: disk.img: a write would make this probed raw image look like a qcow2 image; \
         open it with -f raw to allow it\n"
    );
    assert_eq!(std::fs::read(s.path("disk.img")).unwrap(), before);

    // qemu-io refuses the same write on the same file, probed raw ("write failed:
    // Operation not permitted": raw_co_pwritev returns -EPERM), exit 1, file unchanged.
    let out = s.output("qemu-io", &["-c", "write -s header.bin 0 512", "qemu.img"]);
    assert_eq!(out.status.code(), Some(1));
    let said = [out.stdout, out.stderr].concat();
    assert!(
        String::from_utf8_lossy(&said).contains("write failed: Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&said)
    );
    assert_eq!(std::fs::read(s.path("qemu.img")).unwrap(), before);

    // A write that completes a header the sector already half holds is refused too (QEMU
    // checks the whole sector: a probed raw image is written in whole sectors).
    s.write_file("magic.bin", b"QFI\xfb");
    s.write_file("version.bin", &[0, 0, 0, 3]);
    s.qimg(&["io", "-c", "write -s magic.bin 0 4", "disk.img"]);
    let out = s.qimg_output(&["io", "-c", "write -s version.bin 4 4", "disk.img"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = s.output("qemu-io", &["-c", "write -s magic.bin 0 4", "qemu.img"]);
    assert!(out.status.success());
    let out = s.output("qemu-io", &["-c", "write -s version.bin 4 4", "qemu.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::read(s.path("disk.img")).unwrap(),
        std::fs::read(s.path("qemu.img")).unwrap()
    );

    // -f raw lifts the check, in both.
    s.qimg(&[
        "io",
        "-f",
        "raw",
        "-c",
        "write -s header.bin 0 512",
        "disk.img",
    ]);
    s.run(
        "qemu-io",
        &["-f", "raw", "-c", "write -s header.bin 0 512", "qemu.img"],
    );
    let written = std::fs::read(s.path("disk.img")).unwrap();
    assert_eq!(written[..512], std::fs::read(s.path("header.bin")).unwrap());
    assert_eq!(written, std::fs::read(s.path("qemu.img")).unwrap());
    assert_eq!(probe(&s, "disk.img"), Format::Qcow2);
}

#[test]
fn ties_resolve_as_qemu_img_resolves_them() {
    let s = Scratch::new();
    make_images(&s);
    let vdi_signature = [0x7f, 0x10, 0xda, 0xbe];
    let patched = |from: &str, to: &str, at: usize, bytes: &[u8]| {
        let mut image = std::fs::read(s.path(from)).unwrap();
        put(&mut image, at, bytes);
        s.write_file(to, &image);
    };
    // vdi's signature at 0x40 where another format's header leaves room for it.
    patched("disk.vhdx", "vhdx-vdi", 0x40, &vdi_signature);
    patched("disk.parallels", "parallels-vdi", 0x40, &vdi_signature);
    patched("disk.qed", "qed-vdi", 0x40, &vdi_signature);
    // Headers recognised by their first bytes in a vdi image's free text.
    let qcow = std::fs::read(s.path("disk.qcow")).unwrap();
    patched("disk.vdi", "vdi-qcow", 0, &qcow[..48]);
    let qcow2 = std::fs::read(s.path("disk.qcow2")).unwrap();
    patched("disk.vdi", "vdi-qcow2", 0, &qcow2[..8]);
    let luks = std::fs::read(s.path("disk.luks")).unwrap();
    patched("disk.vdi", "vdi-luks", 0, &luks[..8]);
    // A vmdk descriptor whose first comment line holds the signature.
    let mut descriptor = b"# ".to_vec();
    descriptor.resize(0x50, b'x');
    put(&mut descriptor, 0x40, &vdi_signature);
    descriptor.push(b'\n');
    descriptor.extend(std::fs::read(s.path("flat.vmdk")).unwrap());
    s.write_file("vmdk-vdi.vmdk", &descriptor);
    for (name, expected) in [
        ("vhdx-vdi", "vhdx"),
        ("parallels-vdi", "parallels"),
        ("qed-vdi", "qed"),
        ("vdi-qcow", "vdi"),
        ("vdi-qcow2", "vdi"),
        ("vdi-luks", "vdi"),
        ("vmdk-vdi.vmdk", "vmdk"),
    ] {
        let reference = qemu_img_info(&s, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(reference["format"], expected, "{name}: qemu-img");
        assert_eq!(probe(&s, name).name(), expected, "{name}: Format::probe");
    }
}

#[test]
fn vmdk_descriptor_variants_and_short_files_probe_as_in_qemu_img() {
    let s = Scratch::new();
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        "flat.vmdk",
        "1M",
    ]);
    let descriptor = std::fs::read(s.path("flat.vmdk")).unwrap();
    let crlf: Vec<u8> = String::from_utf8(descriptor.clone())
        .unwrap()
        .replace('\n', "\r\n")
        .into_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "blank-lines.vmdk",
            [b"   \n \r\n".as_slice(), &descriptor].concat(),
        ),
        ("crlf.vmdk", crlf),
        // An empty line before the version line: not a descriptor to the probe.
        ("empty-line.vmdk", [b"\n".as_slice(), &descriptor].concat()),
        // Short files read zeros past their end.
        ("qcow2-magic-only", b"QFI\xfb".to_vec()),
        ("qcow2-8-bytes", b"QFI\xfb\0\0\0\x02".to_vec()),
        ("vdi-ends-early", {
            let mut v = vec![0u8; 0x43];
            put(&mut v, 0x40, &[0x7f, 0x10, 0xda]);
            v
        }),
        ("version-only", b"version=1\n".to_vec()),
        ("empty.dmg", Vec::new()),
        ("one-byte.dmg", vec![0]),
    ];
    for (name, bytes) in &cases {
        s.write_file(name, bytes);
        let expected = match qemu_img_info(&s, name) {
            Ok(info) => info["format"].as_str().unwrap().to_owned(),
            // The chosen driver could not open the file: its error says which it was.
            Err(e) if e.contains("VMDK") => "vmdk".into(),
            Err(e) if e.contains("dmg") => "dmg".into(),
            Err(e) if e.contains("cluster size") => "qcow2".into(),
            Err(e) => panic!("{name}: {e}"),
        };
        assert_eq!(probe(&s, name).name(), expected, "{name}");
    }
}

#[test]
fn committing_a_header_into_a_raw_base_is_refused_only_when_the_base_was_probed() {
    let s = Scratch::new();
    s.write_file("header.bin", &qcow2_header(&s));
    let header = std::fs::read(s.path("header.bin")).unwrap();
    for (tool, probed) in [
        ("qimg", false),
        ("qimg", true),
        ("qemu-img", false),
        ("qemu-img", true),
    ] {
        let base = format!("{tool}-{probed}.raw");
        let overlay = format!("{tool}-{probed}.qcow2");
        s.qemu_img(&["create", "-q", "-f", "raw", &base, "1M"]);
        if probed {
            // No backing format: the base is probed when the chain opens.
            create(
                s.path(&overlay),
                &CreateOptions {
                    size: Some(1 << 20),
                    backing_file: Some(base.clone()),
                    open_backing: false,
                    ..CreateOptions::default()
                },
            )
            .unwrap();
        } else {
            s.create_overlay(&overlay, &base, "raw", "", None);
        }
        s.qemu_io(&overlay, "qcow2", &["write -s header.bin 0 512".into()]);
        let out = if tool == "qimg" {
            s.qimg_output(&["commit", &overlay])
        } else {
            s.output("qemu-img", &["commit", &overlay])
        };
        let first = std::fs::read(s.path(&base)).unwrap()[..512].to_vec();
        if probed {
            // qemu-img: "Block job failed: Operation not permitted".
            assert_eq!(out.status.code(), Some(1), "{tool}: {}", stderr(&out));
            assert_eq!(first, [0; 512], "{tool}: the base changed");
            if tool == "qimg" {
                assert_eq!(
                    stderr(&out),
                    format!(
                        "qimg: {base}: a write would make this probed raw image look like a \
                         qcow2 image; open it with -f raw to allow it\n"
                    )
                );
            }
        } else {
            assert!(out.status.success(), "{tool}: {}", stderr(&out));
            assert_eq!(first, header, "{tool}");
        }
    }
}
