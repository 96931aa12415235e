//! `qimg io` writing commands against qemu-io on the same images: each reads what the
//! other wrote, in both orders; zero writes and discards leave what qemu-io's leave (content
//! and allocation); `map` and the per-command lines print as qemu-io prints them; errors are
//! one line and leave the image clean. `qemu-img check` runs after every step.

mod common;

use common::{Rng, SOURCE, Scratch, assert_one_line_failure, random_ops, source_file};

/// Image layouts: cluster sizes 512/64k/2M, compat 0.10/1.1, extended L2, refcount widths.
const LAYOUTS: &[&str] = &[
    "cluster_size=512",
    "cluster_size=64k",
    "cluster_size=2M",
    "cluster_size=512,compat=0.10",
    "cluster_size=64k,compat=0.10",
    "cluster_size=2M,compat=0.10",
    "cluster_size=64k,extended_l2=on",
    "cluster_size=2M,extended_l2=on",
    "cluster_size=512,refcount_bits=1",
    "cluster_size=64k,refcount_bits=64",
    "cluster_size=2M,refcount_bits=1",
];

/// 8 MiB, or 8 clusters when clusters are larger than 1 MiB.
fn image_size(cs: u64) -> u64 {
    (8 << 20u64).max(8 * cs)
}

fn cluster_size(options: &str) -> u64 {
    if options.contains("cluster_size=512") {
        512
    } else if options.contains("cluster_size=2M") {
        2 << 20
    } else {
        64 << 10
    }
}

/// Makes `top.qcow2` with `options`: alone, or over `base.qcow2` (same options) whose first
/// half holds 0x0b, so that partial-cluster writes copy from the backing file.
fn make_image(s: &Scratch, options: &str, backing: bool, model: &mut [u8]) {
    let size = model.len() as u64;
    if backing {
        s.create("base.qcow2", options, size);
        s.qemu_io(
            "base.qcow2",
            "qcow2",
            &[format!("write -q -P 0x0b 0 {}", size / 2)],
        );
        model[..(size / 2) as usize].fill(0x0b);
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
    } else {
        s.create("top.qcow2", options, size);
    }
}

/// Runs `qimg io -f qcow2 -c ... name`, which must succeed.
fn qimg_io(s: &Scratch, name: &str, commands: &[String]) -> String {
    let mut args = vec!["io", "-f", "qcow2"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(name);
    s.qimg(&args)
}

fn assert_model(s: &Scratch, name: &str, model: &[u8], label: &str) {
    let got = s.reference(name, "qcow2");
    assert_eq!(got.len(), model.len(), "{label}: size");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != model[i]) {
        panic!(
            "{label}: qemu reads {:#x} at {i:#x}, expected {:#x}",
            got[i], model[i]
        );
    }
}

fn fill(model: &mut [u8], offset: u64, len: u64, byte: u8) {
    model[offset as usize..(offset + len) as usize].fill(byte);
}

#[test]
fn qemu_io_reads_what_qimg_wrote_and_qimg_reads_what_qemu_io_wrote() {
    for &options in LAYOUTS {
        for backing in [false, true] {
            let label = format!("[{options}] backing={backing}");
            let s = Scratch::new();
            let cs = cluster_size(options);
            let size = image_size(cs);
            let mut model = vec![0u8; size as usize];
            make_image(&s, options, backing, &mut model);

            // qimg first: unaligned across a cluster boundary, the default pattern, a
            // whole cluster; qemu-io verifies each and the whole image must match.
            let ours = [
                (cs - 100, cs + 300, Some(0x21u8)),
                (3 * cs + 7, 1000, None),
                (6 * cs, cs, Some(0x23)),
            ];
            let mut commands = Vec::new();
            let mut verify = Vec::new();
            for (off, len, pattern) in ours {
                let byte = pattern.unwrap_or(0xcd);
                commands.push(match pattern {
                    Some(p) => format!("write -P {p:#x} {off} {len}"),
                    None => format!("write {off} {len}"),
                });
                verify.push(format!("read -q -P {byte:#x} {off} {len}"));
                fill(&mut model, off, len, byte);
            }
            let out = qimg_io(&s, "top.qcow2", &commands);
            assert_eq!(
                out.lines().filter(|l| l.starts_with("wrote ")).count(),
                3,
                "{label}: {out}"
            );
            s.assert_clean("top.qcow2", &format!("{label} after qimg writes"));
            s.qemu_io("top.qcow2", "qcow2", &verify);
            assert_model(&s, "top.qcow2", &model, &format!("{label} after qimg"));

            // Then qemu-io over and next to it; qimg verifies with read -P.
            let theirs = [(cs / 2, cs, 0x31u8), (3 * cs + 500, cs + 1, 0x32)];
            let mut commands = Vec::new();
            let mut verify = Vec::new();
            for (off, len, byte) in theirs {
                commands.push(format!("write -q -P {byte:#x} {off} {len}"));
                verify.push(format!("read -P {byte:#x} {off} {len}"));
                fill(&mut model, off, len, byte);
            }
            s.qemu_io("top.qcow2", "qcow2", &commands);
            s.assert_clean("top.qcow2", &format!("{label} after qemu-io writes"));
            // Also what the earlier qimg writes left unchanged.
            verify.push(format!("read -P 0x21 {} {}", 3 * cs / 2, cs / 2 + 200));
            verify.push(format!("read -P 0xcd {} 493", 3 * cs + 7));
            qimg_io(&s, "top.qcow2", &verify);

            // And qimg again on top of qemu's clusters (in place and copy-on-write).
            qimg_io(
                &s,
                "top.qcow2",
                &[format!("write -P 0x41 {} 3000", cs / 2 + 10)],
            );
            fill(&mut model, cs / 2 + 10, 3000, 0x41);
            s.assert_clean("top.qcow2", &format!("{label} after the last write"));
            assert_model(&s, "top.qcow2", &model, &format!("{label} at the end"));
        }
    }
}

/// The allocation `qemu-img map` shows, without host offsets (which differ between two
/// writers): (start, length, depth, present, data), adjacent equal ranges merged. A present
/// range without data is a zero cluster; absent ranges show the backing file.
fn allocation(s: &Scratch, name: &str) -> Vec<(u64, u64, usize, bool, bool)> {
    let mut out: Vec<(u64, u64, usize, bool, bool)> = Vec::new();
    for e in s.map(name, "qcow2") {
        let key = (e.depth, e.present, e.data);
        match out.last_mut() {
            Some(last) if (last.2, last.3, last.4) == key => last.1 += e.length,
            _ => out.push((e.start, e.length, e.depth, e.present, e.data)),
        }
    }
    out
}

/// Cluster-aligned zero writes and discards: QEMU takes the whole-cluster path for each,
/// so the allocation must match exactly.
fn aligned_ops(cs: u64, size: u64) -> Vec<String> {
    vec![
        format!("write -z {} {}", 0, cs),
        format!("write -z -u {} {}", cs, 2 * cs),
        format!("discard {} {}", 4 * cs, cs),
        format!("write -z {} {}", 5 * cs, cs),
        format!("discard {} {}", 5 * cs, 2 * cs),
        format!("write -z -u {} {}", 8 * cs, cs),
        // Over ranges nothing allocated.
        format!("discard {} {}", size - cs, cs),
        format!("write -z -u {} {}", size - 2 * cs, cs),
    ]
}

#[test]
fn zero_writes_and_discards_leave_what_qemu_io_leaves() {
    for (i, &options) in LAYOUTS.iter().enumerate() {
        for backing in [false, true] {
            let label = format!("[{options}] backing={backing}");
            let s = Scratch::new();
            let cs = cluster_size(options);
            let size = image_size(cs);
            let mut model = vec![0u8; size as usize];
            make_image(&s, options, backing, &mut model);
            // Data in every cluster the aligned ops touch, then two copies.
            s.qemu_io(
                "top.qcow2",
                "qcow2",
                &[format!("write -q -P 0x5e 0 {}", (10 * cs).min(size))],
            );
            s.copy("top.qcow2", "ours.qcow2");
            s.copy("top.qcow2", "theirs.qcow2");

            // Whole clusters: content and allocation equal.
            let ops: Vec<String> = aligned_ops(cs, size)
                .into_iter()
                .filter(|op| {
                    let mut w = op.split_whitespace().rev();
                    let len: u64 = w.next().unwrap().parse().unwrap();
                    let off: u64 = w.next().unwrap().parse().unwrap();
                    off + len <= size
                })
                .collect();
            for (step, op) in ops.iter().enumerate() {
                let step_label = format!("{label} step {step} `{op}`");
                qimg_io(&s, "ours.qcow2", std::slice::from_ref(op));
                s.qemu_io("theirs.qcow2", "qcow2", std::slice::from_ref(op));
                s.assert_clean("ours.qcow2", &step_label);
                s.assert_same_content("ours.qcow2", "theirs.qcow2", &step_label);
            }
            assert_eq!(
                allocation(&s, "ours.qcow2"),
                allocation(&s, "theirs.qcow2"),
                "{label}: allocation after aligned zero writes and discards"
            );

            // Random unaligned writes, zero writes and discards: content equal after each
            // batch, the image clean.
            source_file(&s, 100 + i as u64, (3 * cs) as usize);
            let mut rng = Rng::new(1000 + i as u64 + u64::from(backing));
            let ops = random_ops(&mut rng, size, cs, 3 * cs, 0x60, 24);
            for (batch, chunk) in ops.chunks(6).enumerate() {
                let batch_label = format!("{label} random batch {batch}: {chunk:?}");
                qimg_io(&s, "ours.qcow2", chunk);
                s.qemu_io("theirs.qcow2", "qcow2", chunk);
                s.assert_clean("ours.qcow2", &batch_label);
                s.assert_same_content("ours.qcow2", "theirs.qcow2", &batch_label);
            }
            assert!(s.path(SOURCE).exists());
        }
    }
}

/// qimg's `map` prints qemu-io's text, and each command's first line is qemu-io's.
#[test]
fn map_and_command_lines_print_as_qemu_io() {
    let s = Scratch::new();
    let mut model = vec![0u8; 8 << 20];
    make_image(&s, "cluster_size=64k", true, &mut model);
    let ops: Vec<String> = [
        "write -P 0x11 0 64k",
        "write 100000 5000",
        "write -z 1M 64k",
        "write -z -u 2M 128k",
        "discard 64k 64k",
        "discard 0 64k",
        "flush",
        "write -q 3M 512",
        "discard -q 3M 64k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    s.copy("top.qcow2", "theirs.qcow2");
    let ours = qimg_io(&s, "top.qcow2", &ops);
    let mut args = vec!["-f", "qcow2"];
    for c in &ops {
        args.extend(["-c", c.as_str()]);
    }
    args.push("theirs.qcow2");
    let theirs = s.run("qemu-io", &args);
    // Timing lines differ; the lines scripts parse must not.
    let parsed = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(parsed(&ours), parsed(&theirs));
    assert_eq!(
        ours.lines().filter(|l| l.contains(" ops; ")).count(),
        theirs.lines().filter(|l| l.contains(" ops; ")).count(),
        "one timing line per printed command"
    );
    s.assert_clean("top.qcow2", "map");
    for name in ["top.qcow2", "theirs.qcow2", "base.qcow2"] {
        let ours = s.qimg(&["io", "-c", "map", name]);
        let theirs = s.run("qemu-io", &["-r", "-f", "qcow2", "-c", "map", name]);
        assert_eq!(ours, theirs, "map of {name}");
    }
}

/// Errors: one line on stderr, exit 1, and the image as it was (or as far as the commands
/// before the failing one took it), passing check.
#[test]
fn failing_commands_print_one_line_and_leave_the_image_clean() {
    let s = Scratch::new();
    let mut model = vec![0u8; 8 << 20];
    make_image(&s, "cluster_size=64k", false, &mut model);
    s.qemu_io("top.qcow2", "qcow2", &["write -q -P 0x33 0 1M".into()]);
    s.copy("top.qcow2", "before.qcow2");
    let size: u64 = 8 << 20;
    let end = size.to_string();
    let past = "write 8388000 1024".to_string();
    let cases: Vec<Vec<String>> = vec![
        vec![format!("write {end} 512")],
        vec![past.clone()],
        vec![format!("write -z {end} 1")],
        vec![format!("discard {} 2M", size - (1 << 20))],
        vec!["write -P 300 0 512".into()],
        vec!["write -u 0 512".into()],
        vec!["write -z -P 1 0 512".into()],
        vec!["write -s missing.bin 0 512".into()],
        vec!["write 0".into()],
        vec!["write -c 0 64k".into()],
        vec!["write abc 512".into()],
        vec!["bogus 0 512".into()],
        vec!["read -P 0x33 0 512".into(), "flush 1".into()],
        // A typo anywhere stops everything before the image is touched.
        vec!["write -P 0x44 0 512".into(), "write -P 0x44".into()],
    ];
    for commands in &cases {
        let mut args = vec!["io"];
        for c in commands {
            args.extend(["-c", c.as_str()]);
        }
        args.push("top.qcow2");
        let out = s.qimg_output(&args);
        assert_one_line_failure(&out, &format!("{commands:?}"));
        assert_eq!(out.status.code(), Some(1), "{commands:?}");
        s.assert_clean("top.qcow2", &format!("{commands:?}"));
        s.assert_same_content("top.qcow2", "before.qcow2", &format!("{commands:?}"));
    }

    // Commands before the failing one take effect; the image is closed cleanly.
    let out = s.qimg_output(&[
        "io",
        "-c",
        "write -P 0x44 0 512",
        "-c",
        &past,
        "-c",
        "write -P 0x45 512 512",
        "top.qcow2",
    ]);
    assert_one_line_failure(&out, "write then a write past the end");
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 512/512 bytes at offset 0"));
    s.assert_clean("top.qcow2", "after a partial run");
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "read -q -P 0x44 0 512".into(),
            "read -q -P 0x33 512 512".into(),
        ],
    );

    // A pattern mismatch is not an error: qemu-io's message on stdout, exit 1.
    let out = s.qimg_output(&["io", "-c", "read -P 0x99 4096 512", "top.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("Pattern verification failed at offset 4096, 512 bytes")
    );
}

/// `-r` opens the image read-only, as qemu-io's: a dirty image (lazy refcounts) that a
/// writable open would repair stays byte for byte as it was, and a writing command is
/// refused; without `-r` (qemu-io's default) the open repairs it.
#[test]
fn io_r_opens_read_only_and_the_default_opens_for_writing() {
    use common::{HeaderField, read_header_field, write_header_field};
    let s = Scratch::new();
    s.create("lazy.qcow2", "lazy_refcounts=on", 1 << 20);
    s.qemu_io("lazy.qcow2", "qcow2", &["write -q -P 7 0 4k".into()]);
    let path = s.path("lazy.qcow2");
    let features = read_header_field(&path, HeaderField::IncompatibleFeatures);
    write_header_field(&path, HeaderField::IncompatibleFeatures, features | 1);
    let before = std::fs::read(&path).unwrap();
    s.qimg(&[
        "io",
        "-r",
        "-c",
        "read -P 7 0 4k",
        "-c",
        "map",
        "lazy.qcow2",
    ]);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a read changed the file"
    );
    let out = s.qimg_output(&["io", "-r", "-c", "write -P 8 4k 4k", "lazy.qcow2"]);
    assert_one_line_failure(&out, "io -r with a write");
    assert_eq!(std::fs::read(&path).unwrap(), before, "io -r wrote");
    // qemu-io -r takes a flush (there is nothing to make durable), and so does qimg.
    s.qimg(&["io", "-r", "-c", "read 0 4k", "-c", "flush", "lazy.qcow2"]);
    assert_eq!(std::fs::read(&path).unwrap(), before, "io -r flush wrote");
    s.qimg(&["io", "-c", "write -P 8 4k 4k", "lazy.qcow2"]);
    assert_eq!(
        read_header_field(&path, HeaderField::IncompatibleFeatures) & 1,
        0,
        "closed dirty"
    );
    s.assert_clean("lazy.qcow2", "after a write");
    s.qemu_io(
        "lazy.qcow2",
        "qcow2",
        &["read -q -P 7 0 4k".into(), "read -q -P 8 4k 4k".into()],
    );
}
