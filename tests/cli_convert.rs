//! `qimg convert` and `qimg dd` against qemu-img on twin files: each row runs the same
//! command line with qemu-img (outputs under `q/`) and with qimg (outputs under `m/`),
//! on the same inputs and on identical copies of any existing target. Then the exit codes
//! must agree; on success the outputs must hold the same content (raw outputs the same
//! bytes, length included; qcow2 outputs `qemu-img compare` equal, clean under
//! `qemu-img check`, of the same virtual size); on failure qimg prints one line holding
//! qemu-img's message.

mod common;

use common::{Scratch, assert_one_line_failure};
use serde_json::Value;

/// The inputs every row may use:
/// - `base.qcow2` (8 MiB) and `top.qcow2` on it, with snapshot `snap1` (ID 1) taken
///   before more writes, zero writes and a discard;
/// - `src.raw` (4 MiB of data and zeros), `odd.raw` (1000 bytes: a partial sector);
/// - `junk12.raw` (12 MiB of non-zero bytes) and `data10.qcow2` (10 MiB, all data) and `empty10.qcow2`, to be
///   copied as existing targets; `zero8.raw` (8 MiB of zeros); `small.raw` (1 MiB).
fn fixture() -> Scratch {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M".into(), "write -P 2 3M 512k".into()],
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
        "top.qcow2",
    ]);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 3 512k 1M".into()]);
    s.qemu_img(&["snapshot", "-c", "snap1", "top.qcow2"]);
    s.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 4 0 2M".into(),
            "write -z 3M 64k".into(),
            "write -P 5 7M 4k".into(),
            "discard 5M 1M".into(),
        ],
    );
    let mut raw = vec![0u8; 4 << 20];
    raw[..1 << 20].fill(7);
    raw[(2 << 20) + 100..(2 << 20) + 5000].fill(8);
    s.write_file("src.raw", &raw);
    s.write_file(
        "odd.raw",
        &(0..1000u32)
            .map(|i| (i % 251) as u8 + 1)
            .collect::<Vec<_>>(),
    );
    s.write_file("junk12.raw", &vec![0xa5; 12 << 20]);
    s.write_file("zero8.raw", &vec![0; 8 << 20]);
    s.write_file("small.raw", &vec![0x5a; 1 << 20]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "data10.qcow2", "10M"]);
    s.qemu_io("data10.qcow2", "qcow2", &["write -P 9 0 10M".into()]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "empty10.qcow2", "10M"]);
    s.qemu_img(&["create", "-q", "-f", "qcow2", "empty10.qcow2", "10M"]);
    std::fs::create_dir(s.path("q")).unwrap();
    std::fs::create_dir(s.path("m")).unwrap();
    s
}

/// One row: a command line with `{}` for the output directory, an existing target to
/// lay in both directories first (`(name, copy of)`), and what to compare afterwards
/// (`(output, format)`), or on failure the message qemu-img prints.
struct Row {
    label: &'static str,
    args: &'static [&'static str],
    target: Option<(&'static str, &'static str)>,
    check: Expect,
}

enum Expect {
    /// Both succeed; compare this output, of this format.
    Output(&'static str, &'static str),
    /// Both fail with exit code 1; qemu-img's message (without `qemu-img: `) is in
    /// qimg's one line.
    Fails(&'static str),
}

fn in_dir(args: &[&str], dir: &str) -> Vec<String> {
    args.iter().map(|a| a.replace("{}", dir)).collect()
}

fn info(s: &Scratch, path: &str) -> Value {
    serde_json::from_str(&s.qemu_img(&["info", "--output=json", path])).unwrap()
}

fn run_rows(s: &Scratch, rows: &[Row]) {
    for row in rows {
        let label = row.label;
        if let Some((name, from)) = row.target {
            for dir in ["q", "m"] {
                std::fs::copy(s.path(from), s.path(&format!("{dir}/{name}"))).unwrap();
            }
        }
        let theirs = in_dir(row.args, "q");
        let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
        let qemu = s.output("qemu-img", &theirs);
        let ours = in_dir(row.args, "m");
        let ours: Vec<&str> = ours.iter().map(String::as_str).collect();
        let qimg = s.qimg_output(&ours);
        let qemu_err = String::from_utf8_lossy(&qemu.stderr).to_string();
        let qimg_err = String::from_utf8_lossy(&qimg.stderr).to_string();
        assert_eq!(
            qimg.status.code(),
            qemu.status.code(),
            "{label}: exit codes differ; qemu-img: {qemu_err} qimg: {qimg_err}"
        );
        match row.check {
            Expect::Output(name, format) => {
                assert!(qimg.status.success(), "{label}: {qimg_err}");
                let (q, m) = (format!("q/{name}"), format!("m/{name}"));
                if format == "raw" {
                    let (a, b) = (
                        std::fs::read(s.path(&q)).unwrap(),
                        std::fs::read(s.path(&m)).unwrap(),
                    );
                    assert_eq!(a.len(), b.len(), "{label}: raw output lengths");
                    assert!(a == b, "{label}: raw outputs differ");
                } else {
                    s.assert_clean(&m, label);
                    s.qemu_img(&["compare", "-f", format, "-F", format, &q, &m]);
                    assert_eq!(
                        info(s, &m)["virtual-size"],
                        info(s, &q)["virtual-size"],
                        "{label}: virtual sizes"
                    );
                }
            }
            Expect::Fails(message) => {
                assert_eq!(qimg.status.code(), Some(1), "{label}");
                assert!(
                    qemu_err.contains(message),
                    "{label}: qemu-img said {qemu_err}"
                );
                assert_one_line_failure(&qimg, label);
                assert!(qimg_err.contains(message), "{label}: qimg said {qimg_err}");
            }
        }
    }
}

#[test]
fn convert_options_match_qemu_img_on_twin_files() {
    let s = fixture();
    use Expect::{Fails, Output};
    let rows = [
        Row {
            label: "OpenStack's image import",
            args: &[
                "convert",
                "-t",
                "none",
                "-O",
                "qcow2",
                "-f",
                "raw",
                "src.raw",
                "{}/os.qcow2",
            ],
            target: None,
            check: Output("os.qcow2", "qcow2"),
        },
        Row {
            label: "Proxmox's disk move into a larger device full of data",
            args: &[
                "convert",
                "-p",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                "-t",
                "none",
                "-T",
                "none",
                "src.raw",
                "{}/pve.raw",
            ],
            target: Some(("pve.raw", "junk12.raw")),
            check: Output("pve.raw", "raw"),
        },
        Row {
            label: "-n from a chain into raw",
            args: &["convert", "-n", "-O", "raw", "top.qcow2", "{}/n.raw"],
            target: Some(("n.raw", "junk12.raw")),
            check: Output("n.raw", "raw"),
        },
        Row {
            label: "-n -S 0 writes the zeros as data",
            args: &[
                "convert",
                "-n",
                "-S",
                "0",
                "-O",
                "raw",
                "top.qcow2",
                "{}/n0.raw",
            ],
            target: Some(("n0.raw", "junk12.raw")),
            check: Output("n0.raw", "raw"),
        },
        Row {
            label: "-n into a qcow2 image full of data",
            args: &["convert", "-n", "-O", "qcow2", "top.qcow2", "{}/n.qcow2"],
            target: Some(("n.qcow2", "data10.qcow2")),
            check: Output("n.qcow2", "qcow2"),
        },
        Row {
            // (qemu-img fails writing compressed clusters over allocated ones; qimg
            // replaces them.)
            label: "-n -c into an empty qcow2 image",
            args: &[
                "convert",
                "-n",
                "-c",
                "-O",
                "qcow2",
                "src.raw",
                "{}/nc.qcow2",
            ],
            target: Some(("nc.qcow2", "empty10.qcow2")),
            check: Output("nc.qcow2", "qcow2"),
        },
        Row {
            label: "--target-is-zero into zeros",
            args: &[
                "convert",
                "-n",
                "--target-is-zero",
                "-O",
                "raw",
                "top.qcow2",
                "{}/z.raw",
            ],
            target: Some(("z.raw", "zero8.raw")),
            check: Output("z.raw", "raw"),
        },
        Row {
            label: "several sources into raw",
            args: &[
                "convert",
                "-O",
                "raw",
                "top.qcow2",
                "odd.raw",
                "base.qcow2",
                "{}/cat.raw",
            ],
            target: None,
            check: Output("cat.raw", "raw"),
        },
        Row {
            label: "several sources into compressed qcow2, unaligned",
            args: &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "odd.raw",
                "top.qcow2",
                "{}/cat.qcow2",
            ],
            target: None,
            check: Output("cat.qcow2", "qcow2"),
        },
        Row {
            label: "several sources with -n",
            args: &[
                "convert",
                "-n",
                "-O",
                "raw",
                "odd.raw",
                "src.raw",
                "{}/ncat.raw",
            ],
            target: Some(("ncat.raw", "junk12.raw")),
            check: Output("ncat.raw", "raw"),
        },
        Row {
            label: "-l NAME",
            args: &[
                "convert",
                "-O",
                "qcow2",
                "-l",
                "snap1",
                "top.qcow2",
                "{}/l.qcow2",
            ],
            target: None,
            check: Output("l.qcow2", "qcow2"),
        },
        Row {
            label: "-l ID",
            args: &["convert", "-O", "raw", "-l", "1", "top.qcow2", "{}/l1.raw"],
            target: None,
            check: Output("l1.raw", "raw"),
        },
        Row {
            label: "-l snapshot.id and snapshot.name",
            args: &[
                "convert",
                "-O",
                "raw",
                "-l",
                "snapshot.id=1,snapshot.name=snap1",
                "top.qcow2",
                "{}/l2.raw",
            ],
            target: None,
            check: Output("l2.raw", "raw"),
        },
        Row {
            label: "-q -W -m -r -T -t together",
            args: &[
                "convert",
                "-q",
                "-W",
                "-m",
                "4",
                "-r",
                "1G",
                "-T",
                "writeback",
                "-t",
                "writethrough",
                "-O",
                "qcow2",
                "top.qcow2",
                "{}/r.qcow2",
            ],
            target: None,
            check: Output("r.qcow2", "qcow2"),
        },
        Row {
            label: "-C",
            args: &["convert", "-C", "-O", "raw", "top.qcow2", "{}/c.raw"],
            target: None,
            check: Output("c.raw", "raw"),
        },
        Row {
            label: "-n into a smaller file",
            args: &["convert", "-n", "-O", "raw", "top.qcow2", "{}/small.raw"],
            target: Some(("small.raw", "small.raw")),
            check: Fails("output file is smaller than input file"),
        },
        Row {
            label: "--target-is-zero without -n",
            args: &["convert", "--target-is-zero", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("--target-is-zero requires use of -n flag"),
        },
        Row {
            label: "-o with -n",
            args: &[
                "convert",
                "-n",
                "-o",
                "cluster_size=4k",
                "top.qcow2",
                "{}/x.raw",
            ],
            target: None,
            check: Fails("-o has no effect when skipping image creation"),
        },
        Row {
            label: "-c with -C",
            args: &[
                "convert",
                "-c",
                "-C",
                "-O",
                "qcow2",
                "top.qcow2",
                "{}/x.qcow2",
            ],
            target: None,
            check: Fails("Cannot enable copy offloading when -c is used"),
        },
        Row {
            label: "-S with -C",
            args: &["convert", "-S", "4k", "-C", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("Cannot enable copy offloading when -S is used"),
        },
        Row {
            label: "-m 0",
            args: &["convert", "-m", "0", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("Invalid number of coroutines specified. Must be between 1 and 16."),
        },
        Row {
            label: "-S 1000",
            args: &["convert", "-S", "1000", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("Invalid buffer size for sparse output specified."),
        },
        Row {
            label: "--skip-broken-bitmaps without --bitmaps",
            args: &["convert", "--skip-broken-bitmaps", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("Use of --skip-broken-bitmaps requires --bitmaps"),
        },
        Row {
            label: "-l of a snapshot that is not there",
            args: &["convert", "-l", "nope", "top.qcow2", "{}/x.raw"],
            target: None,
            check: Fails("Failed to load snapshot: Can't find snapshot"),
        },
        Row {
            label: "-l with several sources",
            args: &["convert", "-l", "snap1", "top.qcow2", "odd.raw", "{}/x.raw"],
            target: None,
            check: Fails("No support for concatenating multiple snapshot"),
        },
        Row {
            label: "--bitmaps with several sources",
            args: &[
                "convert",
                "--bitmaps",
                "-O",
                "qcow2",
                "top.qcow2",
                "odd.raw",
                "{}/x.qcow2",
            ],
            target: None,
            check: Fails("Copying bitmaps only possible with single source"),
        },
        Row {
            label: "-B with several sources",
            args: &[
                "convert",
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "odd.raw",
                "{}/x.qcow2",
            ],
            target: None,
            check: Fails("makes no sense when concatenating multiple input images"),
        },
        Row {
            label: "no destination",
            args: &["convert", "-O", "raw", "top.qcow2"],
            target: None,
            check: Fails("Must specify image file name"),
        },
    ];
    run_rows(&s, &rows);
    // Nothing was created by the refused command lines.
    for dir in ["q", "m"] {
        assert!(!s.path(&format!("{dir}/x.raw")).exists());
        assert!(!s.path(&format!("{dir}/x.qcow2")).exists());
    }
    // -n leaves what lies past the source alone, and punches the zeros out.
    let n = std::fs::read(s.path("m/n.raw")).unwrap();
    assert!(n[8 << 20..].iter().all(|&b| b == 0xa5));
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(s.path("m/pve.raw")).unwrap().blocks() * 512;
    assert!(
        allocated < 10 << 20,
        "zeros were not punched out: {allocated}"
    );
}

#[test]
fn convert_and_create_o_help_list_the_create_options_as_qemu_img() {
    let s = fixture();
    for (command, format, file) in [
        ("convert", "qcow2", false),
        ("convert", "qcow2", true),
        ("convert", "raw", false),
        ("convert", "raw", true),
        ("create", "qcow2", false),
        ("create", "qcow2", true),
        ("create", "raw", false),
        ("create", "raw", true),
    ] {
        let flag = if command == "convert" { "-O" } else { "-f" };
        let mut args = vec![command, flag, format, "-o", "help"];
        if file && command == "convert" {
            args.extend(["top.qcow2", "x.img"]);
        } else if file {
            args.extend(["x.img", "1M"]);
        }
        let theirs = s.qemu_img(&args);
        let ours = s.qimg(&args);
        let theirs: Vec<&str> = theirs.lines().collect();
        let label = format!("{command} {format} with file: {file}");
        assert_eq!(ours.lines().next(), theirs.first().copied(), "{label}");
        // Every line qimg prints is qemu-img's, in qemu-img's order; qimg leaves out only
        // the options it does not honour (encryption, nocow, extent_size_hint).
        let mut at = 0;
        for line in ours.lines() {
            let found = theirs[at..].iter().position(|l| *l == line);
            let found = found.unwrap_or_else(|| panic!("{label}: {line:?} is not qemu-img's"));
            at += found + 1;
        }
        for key in ["cluster_size", "compat", "size=", "preallocation"] {
            let theirs_has = theirs.iter().any(|l| l.trim_start().starts_with(key));
            if theirs_has && !(format == "raw" && !file && key == "preallocation") {
                assert!(ours.contains(key), "{label}: {key} missing");
            }
        }
    }
    assert!(!s.path("x.img").exists());
}

#[test]
fn dd_matches_qemu_img_on_twin_files() {
    let s = fixture();
    s.write_file(
        "r4k.raw",
        &(0..4096u32)
            .map(|i| (i * 7 % 253) as u8)
            .collect::<Vec<_>>(),
    );
    use Expect::{Fails, Output};
    let rows = [
        Row {
            label: "the whole image, 512-byte blocks",
            args: &["dd", "if=top.qcow2", "of={}/all.raw"],
            target: None,
            check: Output("all.raw", "raw"),
        },
        Row {
            label: "count counts from the start of the input, skipped blocks included",
            args: &[
                "dd",
                "bs=1000",
                "count=3",
                "skip=1",
                "if=r4k.raw",
                "of={}/q.raw",
            ],
            target: None,
            check: Output("q.raw", "raw"),
        },
        Row {
            label: "a partial sector at the end",
            args: &["dd", "bs=300", "if=odd.raw", "of={}/odd.raw"],
            target: None,
            check: Output("odd.raw", "raw"),
        },
        Row {
            label: "qcow2 output, options after the operands, hex bs",
            args: &[
                "dd",
                "bs=0x10000",
                "count=020",
                "skip=3",
                "if=top.qcow2",
                "of={}/o.qcow2",
                "-O",
                "qcow2",
            ],
            target: None,
            check: Output("o.qcow2", "qcow2"),
        },
        Row {
            label: "a raw input named as raw, a fractional bs",
            args: &[
                "dd",
                "-f",
                "raw",
                "bs=1.5k",
                "count=100",
                "if=src.raw",
                "of={}/f.raw",
            ],
            target: None,
            check: Output("f.raw", "raw"),
        },
        Row {
            label: "an existing output is replaced",
            args: &["dd", "bs=1M", "count=2", "if=top.qcow2", "of={}/junk.raw"],
            target: Some(("junk.raw", "junk12.raw")),
            check: Output("junk.raw", "raw"),
        },
        Row {
            label: "skip past the end: an empty output and a warning",
            args: &["dd", "bs=1M", "skip=20", "if=top.qcow2", "of={}/empty.raw"],
            target: None,
            check: Output("empty.raw", "raw"),
        },
        Row {
            label: "bs=0",
            args: &["dd", "bs=0", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid bs specified. Must be between 1 and 2147483647."),
        },
        Row {
            label: "bs too large",
            args: &["dd", "bs=3G", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid bs specified. Must be between 1 and 2147483647."),
        },
        Row {
            label: "bs not a size",
            args: &["dd", "bs=x", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid bs specified: 'x'."),
        },
        Row {
            label: "count with a suffix",
            args: &["dd", "count=1k", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid count specified: '1k'."),
        },
        Row {
            label: "a negative count",
            args: &["dd", "count=-1", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid count specified. Must be between 0 and 9223372036854775807."),
        },
        Row {
            label: "skip not a number",
            args: &["dd", "skip=2.0", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Invalid skip specified: '2.0'."),
        },
        Row {
            label: "an unknown operand",
            args: &["dd", "foo=1", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("unrecognized operand foo"),
        },
        Row {
            label: "an operand without =",
            args: &["dd", "foo", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("unrecognized operand foo"),
        },
        Row {
            label: "no output",
            args: &["dd", "if=top.qcow2"],
            target: None,
            check: Fails("Must specify both input and output files"),
        },
        Row {
            label: "an unknown output format",
            args: &["dd", "-O", "foo", "if=top.qcow2", "of={}/x.raw"],
            target: None,
            check: Fails("Unknown file format"),
        },
    ];
    run_rows(&s, &rows);
    for dir in ["q", "m"] {
        assert!(!s.path(&format!("{dir}/x.raw")).exists());
    }
    // The warning of a skip past the end, on one line, the command succeeding.
    let out = s.qimg_output(&["dd", "bs=1M", "skip=20", "if=top.qcow2", "of=m/e2.raw"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "qimg: top.qcow2: cannot skip to specified offset\n"
    );
}

/// `convert -C` against `qemu-img convert -C`: the outputs are the same bytes, whatever
/// the source (qcow2, raw with holes, a chain on a raw base, 4 KiB clusters) and output
/// format; data clusters holding zeros are copied as data (as qemu-img's copy range
/// copies them, unread), which plain convert leaves out. A compressed source is read as
/// without -C, where qemu-img gives up offloading at a point its coroutines decide: only
/// the content is compared there. (That the copies go through the storage's copy path
/// is checked in the library: `ops::convert::offload`'s tests.)
#[test]
fn copy_offloading_writes_the_bytes_qemu_img_c_writes() {
    let s = Scratch::new();
    s.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    s.qemu_io(
        "src.qcow2",
        "qcow2",
        &[
            "write -P 1 0 64k".into(),
            "write -P 0 64k 64k".into(),
            "write -P 2 192k 4k".into(),
            "write -z 1M 128k".into(),
            "write -P 3 2M 1M".into(),
        ],
    );
    s.qemu_img(&["convert", "-O", "raw", "src.qcow2", "src.raw"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    s.qemu_io(
        "base.raw",
        "raw",
        &["write -P 9 3M 64k".into(), "write -P 0 3200k 64k".into()],
    );
    s.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "chain.qcow2",
    ]);
    s.qemu_io(
        "chain.qcow2",
        "qcow2",
        &["write -P 5 0 128k".into(), "write -P 0 512k 64k".into()],
    );
    s.create("small.qcow2", "cluster_size=4096", 4 << 20);
    s.qemu_io(
        "small.qcow2",
        "qcow2",
        &[
            "write -P 5 4k 8k".into(),
            "write -P 0 64k 4k".into(),
            "write -P 7 70k 2k".into(),
        ],
    );
    s.qemu_img(&["convert", "-c", "-O", "qcow2", "src.qcow2", "comp.qcow2"]);
    for source in [
        "src.qcow2",
        "src.raw",
        "chain.qcow2",
        "small.qcow2",
        "base.raw",
        "comp.qcow2",
    ] {
        for format in ["raw", "qcow2"] {
            let label = format!("{source} -> {format}");
            let (q, m) = (
                format!("q-{source}.{format}"),
                format!("m-{source}.{format}"),
            );
            s.qemu_img(&["convert", "-C", "-O", format, source, &q]);
            s.qimg(&["convert", "-C", "-O", format, source, &m]);
            if format == "qcow2" {
                s.assert_clean(&m, &label);
            }
            if source == "comp.qcow2" {
                s.qemu_img(&["compare", "-f", format, "-F", format, &q, &m]);
                continue;
            }
            let (a, b) = (
                std::fs::read(s.path(&q)).unwrap(),
                std::fs::read(s.path(&m)).unwrap(),
            );
            assert_eq!(a.len(), b.len(), "{label}: output lengths");
            assert!(a == b, "{label}: outputs differ");
        }
    }
    // The zero-filled data cluster at 64 KiB is data with -C, a hole without.
    s.qimg(&["convert", "-O", "qcow2", "src.qcow2", "plain.qcow2"]);
    let zero_cluster_is_data = |image: &str| {
        s.map(image, "qcow2")
            .iter()
            .any(|e| e.start <= 65536 && 65536 < e.start + e.length && e.data)
    };
    assert!(zero_cluster_is_data("m-src.qcow2.qcow2"));
    assert!(!zero_cluster_is_data("plain.qcow2"));
}
