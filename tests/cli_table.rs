//! One representative command line for every command of CLI.md that qemu-img has
//! (convert has its own table in `cli_convert.rs`), run with qemu-img in `qemu/` and with
//! qimg in `ours/`, each on a fresh copy of the same images. Compared: exit codes, the
//! JSON (parsed), the text scripts parse, and afterwards every image (`qemu-img compare`,
//! `qemu-img check`, backing pointers). Paths in the output are compared with the
//! directory names swapped.

mod common;

use common::{Scratch, backing_of};
use serde_json::Value;

/// What of stdout is compared.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    /// Parsed as JSON.
    Json,
    /// Every line.
    Text,
    /// The first line (the rest holds timings).
    FirstLine,
}

struct Row {
    args: &'static [&'static str],
    out: Out,
    /// Images compared afterwards (besides those of the fixture).
    created: &'static [&'static str],
}

const FIXTURE: [&str; 5] = [
    "base.qcow2",
    "top.qcow2",
    "img.qcow2",
    "base2.qcow2",
    "disk.raw",
];

const ROWS: &[Row] = &[
    Row {
        args: &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "{}/new.qcow2",
            "8M",
        ],
        out: Out::Text,
        created: &["new.qcow2"],
    },
    Row {
        args: &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "img.qcow2",
            "-F",
            "qcow2",
            "{}/over.qcow2",
        ],
        out: Out::Text,
        created: &["over.qcow2"],
    },
    Row {
        args: &["create", "-f", "raw", "{}/new.raw", "1M"],
        out: Out::Text,
        created: &["new.raw"],
    },
    Row {
        args: &["info", "--output=json", "{}/img.qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &[
            "info",
            "--output=json",
            "--backing-chain",
            "-U",
            "{}/top.qcow2",
        ],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &["check", "--output=json", "{}/img.qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &["check", "-q", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["map", "--output=json", "{}/top.qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &[
            "map",
            "--output=json",
            "--start-offset=1M",
            "--max-length=2M",
            "{}/top.qcow2",
        ],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &["map", "--output=json", "--start-offset=1G", "{}/top.qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &[
            "map",
            "--start-offset=3k",
            "--max-length=70k",
            "{}/img.qcow2",
        ],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["compare", "{}/img.qcow2", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["compare", "-s", "{}/base.qcow2", "{}/base.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["commit", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["commit", "-d", "-t", "none", "-f", "qcow2", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["rebase", "-b", "base2.qcow2", "-F", "qcow2", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["rebase", "-u", "-b", "", "{}/top.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["snapshot", "-c", "s1", "{}/img.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["snapshot", "-d", "nope", "{}/img.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["resize", "{}/img.qcow2", "+1M"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["resize", "-f", "raw", "{}/disk.raw", "3M"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["measure", "--output=json", "-O", "qcow2", "{}/top.qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &["measure", "--output=json", "--size", "10G", "-O", "qcow2"],
        out: Out::Json,
        created: &[],
    },
    Row {
        args: &[
            "amend",
            "--force",
            "-o",
            "lazy_refcounts=on",
            "{}/img.qcow2",
        ],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["amend", "-o", "compat=0.10", "{}/img.qcow2"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &["bitmap", "--add", "-g", "128k", "{}/img.qcow2", "b1"],
        out: Out::Text,
        created: &[],
    },
    Row {
        args: &[
            "bench",
            "-w",
            "-c",
            "64",
            "-s",
            "8k",
            "-S",
            "24k",
            "{}/img.qcow2",
        ],
        out: Out::FirstLine,
        created: &[],
    },
    Row {
        args: &["bench", "-c", "64", "-d", "4", "{}/top.qcow2"],
        out: Out::FirstLine,
        created: &[],
    },
    Row {
        args: &[
            "dd",
            "-O",
            "raw",
            "bs=64k",
            "count=20",
            "skip=2",
            "if={}/top.qcow2",
            "of={}/dd.raw",
        ],
        out: Out::Text,
        created: &["dd.raw"],
    },
];

fn fixture(s: &Scratch) {
    std::fs::create_dir_all(s.path("fixture")).unwrap();
    let io = |name: &str, cmds: &[&str]| {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        s.qemu_io(&format!("fixture/{name}"), "qcow2", &cmds);
    };
    s.create("fixture/base.qcow2", "cluster_size=65536", 4 << 20);
    io("base.qcow2", &["write -P 1 0 1M", "write -P 2 3M 64k"]);
    s.create_overlay("fixture/top.qcow2", "base.qcow2", "qcow2", "", None);
    io("top.qcow2", &["write -P 3 512k 128k", "write -z 3M 64k"]);
    s.create("fixture/img.qcow2", "cluster_size=65536", 4 << 20);
    io("img.qcow2", &["write -P 4 0 2M"]);
    s.create("fixture/base2.qcow2", "cluster_size=65536", 4 << 20);
    io("base2.qcow2", &["write -P 5 1M 1M"]);
    s.write_file("fixture/disk.raw", &vec![6u8; 2 << 20]);
}

fn run(s: &Scratch, program: &str, row: &Row, dir: &str) -> std::process::Output {
    let _ = std::fs::remove_dir_all(s.path(dir));
    std::fs::create_dir_all(s.path(dir)).unwrap();
    for f in FIXTURE {
        s.copy(&format!("fixture/{f}"), &format!("{dir}/{f}"));
    }
    let args: Vec<String> = row.args.iter().map(|a| a.replace("{}", dir)).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if program == "qimg" {
        s.qimg_output(&args)
    } else {
        s.output(program, &args)
    }
}

#[test]
fn every_command_as_qemu_img() {
    let s = Scratch::new();
    fixture(&s);
    for row in ROWS {
        let what = row.args.join(" ");
        let theirs = run(&s, "qemu-img", row, "qemu");
        let ours = run(&s, "qimg", row, "ours");
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{what}: exit codes; ours: {}",
            String::from_utf8_lossy(&ours.stderr)
        );
        let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
        let (o, t) = (text(&ours), text(&theirs).replace("qemu/", "ours/"));
        match row.out {
            Out::Json if theirs.status.success() => {
                let o: Value = serde_json::from_str(&o).unwrap_or_else(|e| panic!("{what}: {e}"));
                let t: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(o, t, "{what}: JSON");
            }
            Out::Json => {}
            Out::Text => assert_eq!(o, t, "{what}: stdout"),
            Out::FirstLine => assert_eq!(o.lines().next(), t.lines().next(), "{what}"),
        }
        // An error (not a verdict such as compare's 1): one line from qimg.
        if !theirs.status.success() && !theirs.stderr.is_empty() {
            common::assert_one_line_failure(&ours, &what);
        }
        // The images afterwards: same content, clean, same backing file.
        for f in FIXTURE.iter().chain(row.created) {
            let (q, ours_f) = (format!("qemu/{f}"), format!("ours/{f}"));
            assert_eq!(
                s.path(&q).exists(),
                s.path(&ours_f).exists(),
                "{what}: {f} exists in one directory only"
            );
            if !s.path(&q).exists() {
                continue;
            }
            let raw = f.ends_with(".raw");
            let fmt = if raw { "raw" } else { "qcow2" };
            let out = s.output("qemu-img", &["compare", "-f", fmt, "-F", fmt, &q, &ours_f]);
            assert!(
                out.status.success(),
                "{what}: {f} differs: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            if raw {
                assert_eq!(
                    std::fs::metadata(s.path(&q)).unwrap().len(),
                    std::fs::metadata(s.path(&ours_f)).unwrap().len(),
                    "{what}: {f} sizes"
                );
                continue;
            }
            s.assert_clean(&ours_f, &what);
            assert_eq!(backing_of(&s, &ours_f), backing_of(&s, &q), "{what}: {f}");
            // What qemu-img info says of the image (snapshots' dates and sizes on disk
            // aside).
            let info = |p: &str| {
                let mut v: Value =
                    serde_json::from_str(&s.qemu_img(&["info", "--output=json", "-U", p])).unwrap();
                let obj = v.as_object_mut().unwrap();
                obj.remove("actual-size");
                obj.remove("children");
                obj.remove("filename");
                obj.remove("backing-filename-format");
                obj.remove("full-backing-filename");
                if let Some(snaps) = obj.get_mut("snapshots").and_then(Value::as_array_mut) {
                    for sn in snaps {
                        let sn = sn.as_object_mut().unwrap();
                        sn.remove("date-sec");
                        sn.remove("date-nsec");
                    }
                }
                v
            };
            assert_eq!(info(&ours_f), info(&q), "{what}: info of {f}");
        }
    }
}
