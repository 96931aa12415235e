//! `qimg commit`, `qimg pull` and `qimg rebase` against their qemu-img equivalents, run
//! on identical copies of the same chains (`ours/` and `qemu/`): the same visible content
//! (`qemu-img compare`), clean checks on every image touched, the same backing pointers,
//! qemu-img's messages and exit codes, and one-line errors that change nothing.

mod common;

use std::path::Path;

use common::{
    Scratch, assert_check_clean as check, assert_same_content as same_content, backing_of,
    merge_chain,
};

const IMAGES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

/// `args` with every `{}` replaced by `dir`.
fn in_dir(args: &[&str], dir: &str) -> Vec<String> {
    args.iter().map(|a| a.replace("{}", dir)).collect()
}

/// Runs `qimg OURS` with `{}` = `ours` and `qemu-img QEMU` with `{}` = `qemu`; both must
/// succeed. Returns qimg's stdout.
fn run_both(s: &Scratch, ours: &[&str], qemu: &[&[&str]]) -> String {
    let args = in_dir(ours, "ours");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = s.qimg_output(&args);
    assert!(
        out.status.success(),
        "qimg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for command in qemu {
        let args = in_dir(command, "qemu");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s.qemu_img(&args);
    }
    String::from_utf8(out.stdout).unwrap()
}

/// Every image in `ours/` is clean, shows what its copy in `qemu/` shows and names the
/// same backing file, which for `images[i]` is `backings[i]`.
fn assert_same_chains(s: &Scratch, images: &[&str], backings: &[Option<&str>]) {
    for (image, backing) in images.iter().zip(backings) {
        let (ours, qemu) = (format!("ours/{image}"), format!("qemu/{image}"));
        check(s, &ours);
        same_content(s, &ours, &qemu);
        assert_eq!(
            backing_of(s, &ours).as_deref(),
            *backing,
            "backing of {ours}"
        );
        assert_eq!(
            backing_of(s, &qemu).as_deref(),
            *backing,
            "backing of {qemu}"
        );
    }
}

#[test]
fn commit_empties_the_top_like_qemu_img_commit() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 101);
    let stdout = run_both(
        &s,
        &["commit", "{}/top.qcow2"],
        &[&["commit", "-q", "{}/top.qcow2"]],
    );
    assert_eq!(without_already_done(&stdout), "Image committed.\n");
    assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
    same_content(&s, "ours/top.qcow2", "top.qcow2");
    let map = s.map("ours/top.qcow2", "qcow2");
    assert!(map.iter().all(|e| e.depth > 0), "top still allocates");
}

#[test]
fn commit_d_keeps_the_top_untouched() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=4k", 102);
    let stdout = run_both(
        &s,
        &["commit", "-d", "-p", "{}/top.qcow2"],
        &[&["commit", "-q", "-d", "{}/top.qcow2"]],
    );
    // Into a pipe, -p prints qemu-img's progress lines; they end before the message.
    assert_eq!(
        without_already_done(after_progress(&stdout)),
        "\nImage committed.\n"
    );
    assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
    let top = |p: &str| std::fs::read(s.path(p)).unwrap();
    assert!(top("ours/top.qcow2") == top("top.qcow2"), "top changed");
    // mid now shows what top shows.
    same_content(&s, "ours/mid.qcow2", "top.qcow2");
}

#[test]
fn commit_b_goes_through_mid_into_base_like_qemu_img() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k,extended_l2=on", 103);
    // The base named as the chain stores it, as qemu-img accepts it.
    let stdout = run_both(
        &s,
        &["commit", "-q", "-b", "base.qcow2", "{}/top.qcow2"],
        &[&["commit", "-q", "-b", "base.qcow2", "{}/top.qcow2"]],
    );
    assert_eq!(stdout, "");
    assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
    same_content(&s, "ours/top.qcow2", "top.qcow2");
    same_content(&s, "ours/base.qcow2", "top.qcow2");
}

#[test]
fn commit_top_mid_commits_a_middle_range_and_repoints_the_top() {
    for (seed, extra) in [(104, None), (105, Some("base.qcow2"))] {
        let s = Scratch::new();
        merge_chain(&s, "cluster_size=64k", seed);
        let mut ours = vec!["commit", "--top", "mid.qcow2"];
        if let Some(base) = extra {
            ours.extend(["-b", base]);
        }
        ours.push("{}/top.qcow2");
        // qemu-img's equivalent: commit mid into base, then point top at base.
        let stdout = run_both(
            &s,
            &ours,
            &[
                &["commit", "-q", "{}/mid.qcow2"],
                &[
                    "rebase",
                    "-u",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    "{}/top.qcow2",
                ],
            ],
        );
        assert_eq!(without_already_done(&stdout), "Image committed.\n");
        assert_same_chains(
            &s,
            &["base.qcow2", "top.qcow2"],
            &[None, Some("base.qcow2")],
        );
        same_content(&s, "ours/top.qcow2", "top.qcow2");
    }
}

#[test]
fn commit_top_and_b_merge_two_layers_below_the_active_image() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 106);
    s.create_overlay("top2.qcow2", "top.qcow2", "qcow2", "cluster_size=64k", None);
    s.qemu_io(
        "top2.qcow2",
        "qcow2",
        &["write -P 0xe1 1M 512k".into(), "write -z 6M 256k".into()],
    );
    for dir in ["ours", "qemu"] {
        std::fs::copy(s.path("top2.qcow2"), s.path(dir).join("top2.qcow2")).unwrap();
    }
    run_both(
        &s,
        &[
            "commit",
            "--top",
            "top.qcow2",
            "-b",
            "base.qcow2",
            "{}/top2.qcow2",
        ],
        &[
            &["commit", "-q", "-b", "base.qcow2", "{}/top.qcow2"],
            &[
                "rebase",
                "-u",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "{}/top2.qcow2",
            ],
        ],
    );
    assert_same_chains(
        &s,
        &["base.qcow2", "top2.qcow2"],
        &[None, Some("base.qcow2")],
    );
    same_content(&s, "ours/top2.qcow2", "top2.qcow2");
    same_content(&s, "ours/base.qcow2", "top.qcow2");
}

#[test]
fn commit_takes_qemu_img_cache_modes_and_format() {
    let cases: [(u64, &[&str]); 5] = [
        (109, &["-t", "none", "-f", "qcow2"]),
        (110, &["--cache", "writeback", "--format", "qcow2"]),
        (111, &["-t", "writethrough"]),
        (112, &["--cache=directsync"]),
        // No checkpoint flushes: what reaches the disk at the end is the same.
        (113, &["-t", "unsafe", "-f", "qcow2"]),
    ];
    for (seed, options) in cases {
        let s = Scratch::new();
        merge_chain(&s, "cluster_size=64k", seed);
        let with = |quiet: &[&'static str]| {
            let mut args = vec!["commit"];
            args.extend(quiet);
            args.extend(options);
            args.push("{}/top.qcow2");
            args
        };
        let stdout = run_both(&s, &with(&[]), &[&with(&["-q"])]);
        assert_eq!(
            without_already_done(&stdout),
            "Image committed.\n",
            "{options:?}"
        );
        assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
        same_content(&s, "ours/mid.qcow2", "top.qcow2");
    }
}

#[test]
fn commit_f_opens_the_file_as_that_format_like_qemu_img() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 114);
    for dir in ["ours", "qemu"] {
        s.write_file(&format!("{dir}/plain.raw"), &vec![0x5a; 1 << 20]);
    }
    let cases: &[(&[&str], &str)] = &[
        // As raw, a qcow2 file has no backing file.
        (
            &["commit", "-f", "raw", "{}/top.qcow2"],
            "does not have a backing file",
        ),
        (
            &["commit", "-f", "qcow2", "{}/plain.raw"],
            "not a qcow2 image",
        ),
        (&["commit", "{}/plain.raw"], "does not have a backing file"),
        (&["commit", "-f", "vmdk", "{}/top.qcow2"], "vmdk"),
    ];
    for (args, needle) in cases {
        let ours = in_dir(args, "ours");
        fails(
            &s,
            &ours.iter().map(String::as_str).collect::<Vec<_>>(),
            needle,
        );
        let theirs = in_dir(args, "qemu");
        qemu_fails(&s, &theirs.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[test]
fn commit_r_holds_the_commit_to_the_rate() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 115);
    let started = std::time::Instant::now();
    // 8 MiB of guest range at 4 MiB/s.
    let out = s.qimg_output(&["commit", "-q", "-r", "4M", "ours/top.qcow2"]);
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= std::time::Duration::from_millis(1900),
        "took {took:?}"
    );
    s.qemu_img(&["commit", "-q", "-r", "4M", "qemu/top.qcow2"]);
    assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
    // 0 is no limit, as in qemu-img.
    let out = s.qimg_output(&[
        "commit",
        "-q",
        "-r",
        "0",
        "-b",
        "base.qcow2",
        "ours/top.qcow2",
    ]);
    assert!(out.status.success());
    s.qemu_img(&[
        "commit",
        "-q",
        "-r",
        "0",
        "-b",
        "base.qcow2",
        "qemu/top.qcow2",
    ]);
    same_content(&s, "ours/base.qcow2", "qemu/base.qcow2");
}

#[test]
fn pull_matches_qemu_img_rebase_onto_nothing_and_onto_the_base() {
    for (seed, base) in [(107, None), (108, Some("base.qcow2"))] {
        let s = Scratch::new();
        merge_chain(&s, "cluster_size=64k,compat=0.10", seed);
        let mut ours = vec!["pull", "-p"];
        let mut qemu = vec!["rebase", "-q", "-b", base.unwrap_or("")];
        if let Some(b) = base {
            ours.extend(["-b", b]);
            qemu.extend(["-F", "qcow2"]);
        }
        ours.push("{}/top.qcow2");
        qemu.push("{}/top.qcow2");
        let stdout = run_both(&s, &ours, &[&qemu]);
        assert_eq!(
            without_already_done(after_progress(&stdout)),
            "\n",
            "pull prints nothing but its progress"
        );
        assert_same_chains(&s, &["top.qcow2"], &[base]);
        same_content(&s, "ours/top.qcow2", "top.qcow2");
    }
}

#[test]
fn rebase_matches_qemu_img_rebase_safe_and_unsafe() {
    let cases: &[(&[&str], Option<&str>)] = &[
        (&["-b", ""], None),
        (&["-b", "base.qcow2", "-F", "qcow2"], Some("base.qcow2")),
        (&["-b", "other.qcow2", "-F", "qcow2"], Some("other.qcow2")),
        (
            &["-u", "-b", "other.qcow2", "-F", "qcow2"],
            Some("other.qcow2"),
        ),
        (
            &["-u", "-b", "base.qcow2", "-F", "qcow2"],
            Some("base.qcow2"),
        ),
        // qemu-img's -f, cache modes (hints; unsafe skips checkpoint flushes) and long
        // names.
        (
            &[
                "-f",
                "qcow2",
                "-t",
                "unsafe",
                "-T",
                "none",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
            ],
            Some("base.qcow2"),
        ),
        (
            &[
                "--format",
                "qcow2",
                "--cache",
                "writethrough",
                "--backing-cache",
                "directsync",
                "--backing",
                "",
            ],
            None,
        ),
        (
            &[
                "-t",
                "none",
                "--backing-unsafe",
                "-b",
                "other.qcow2",
                "--backing-format",
                "qcow2",
            ],
            Some("other.qcow2"),
        ),
    ];
    for (i, (options, backing)) in cases.iter().enumerate() {
        let s = Scratch::new();
        merge_chain(&s, "cluster_size=64k", 110 + i as u64);
        s.create("other.qcow2", "cluster_size=64k", common::MERGE_SIZE);
        s.qemu_io(
            "other.qcow2",
            "qcow2",
            &["write -P 0x77 1M 2M".into(), "write -z 5M 1M".into()],
        );
        for dir in ["ours", "qemu"] {
            std::fs::copy(s.path("other.qcow2"), s.path(dir).join("other.qcow2")).unwrap();
        }
        let mut args = vec!["rebase"];
        args.extend_from_slice(options);
        args.push("{}/top.qcow2");
        let stdout = run_both(&s, &args, &[&args]);
        assert_eq!(
            without_already_done(&stdout),
            "",
            "rebase {options:?} prints nothing"
        );
        assert_same_chains(&s, &["top.qcow2"], &[*backing]);
        if !options.contains(&"-u") && !options.contains(&"--backing-unsafe") {
            same_content(&s, "ours/top.qcow2", "top.qcow2");
        }
    }
}

/// The bytes of every file in `dir`, by name.
fn snapshot_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.display().to_string(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// `stdout` without its `Already in place: N bytes (...), skipped` line (merges of these
/// chains often find zeros already in place), checking that line's form.
/// What follows the progress lines (`    (P/100%)` each ended by `\r`, from 0.00 to
/// 100.00) that open `stdout`.
fn after_progress(stdout: &str) -> &str {
    let (lines, rest) = stdout.rsplit_once('\r').expect("progress lines");
    assert!(lines.starts_with("    (0.00/100%)"), "{stdout:?}");
    assert!(lines.ends_with("    (100.00/100%)"), "{stdout:?}");
    rest
}

fn without_already_done(stdout: &str) -> String {
    let mut rest = String::new();
    for line in stdout.lines() {
        match line.strip_prefix("Already in place: ") {
            Some(tail) => {
                let (n, tail) = tail
                    .split_once(" bytes (")
                    .unwrap_or_else(|| panic!("{line}"));
                assert!(n.parse::<u64>().unwrap() > 0, "{line}");
                assert!(tail.ends_with("), skipped"), "{line}");
            }
            None => {
                rest.push_str(line);
                rest.push('\n');
            }
        }
    }
    rest
}

/// The `data bytes:` and `zero bytes:` numbers of a dry run's output.
fn dry_run_numbers(stdout: &str) -> (u64, u64) {
    let number = |key: &str| -> u64 {
        let line = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in {stdout:?}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    (number("data bytes:"), number("zero bytes:"))
}

#[test]
fn dry_runs_change_nothing_and_count_what_the_map_shows() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 120);
    // Data bytes that the layers at depths in `range` decide, seen from `image`, per
    // qemu-img map (a middle-range commit also copies what the top shadows).
    let data_in = |image: &str, range: std::ops::Range<usize>| -> u64 {
        s.map(&format!("ours/{image}"), "qcow2")
            .iter()
            .filter(|e| e.data && range.contains(&e.depth))
            .map(|e| e.length)
            .sum()
    };
    let cases: &[(&[&str], u64)] = &[
        (&["commit"], data_in("top.qcow2", 0..1)),
        (&["commit", "-b", "base.qcow2"], data_in("top.qcow2", 0..2)),
        (
            &["commit", "--top", "mid.qcow2"],
            data_in("mid.qcow2", 0..1),
        ),
        (&["pull"], data_in("top.qcow2", 1..3)),
        (&["pull", "-b", "base.qcow2"], data_in("top.qcow2", 1..2)),
        (&["rebase", "-b", ""], data_in("top.qcow2", 1..3)),
        (&["rebase", "-b", "base.qcow2"], data_in("top.qcow2", 1..2)),
        (&["rebase", "-u", "-b", ""], 0),
    ];
    let before = snapshot_files(&s.path("ours"));
    for (args, expected) in cases {
        let mut args = args.to_vec();
        args.extend(["--dry-run", "ours/top.qcow2"]);
        let out = s.qimg_output(&args);
        assert!(out.status.success(), "qimg {args:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let (data, _zero) = dry_run_numbers(&stdout);
        assert_eq!(data, *expected, "qimg {args:?}: {stdout}");
        assert!(
            snapshot_files(&s.path("ours")) == before,
            "qimg {args:?} changed a file"
        );
    }
}

/// `qimg ARGS` fails with exit code 1 and one line `qimg: ...` on stderr containing
/// `needle`, and changes no file.
fn fails(s: &Scratch, args: &[&str], needle: &str) {
    let before = snapshot_files(&s.path("ours"));
    let out = s.qimg_output(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "qimg {args:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "qimg {args:?}: one line: {stderr}"
    );
    assert!(stderr.starts_with("qimg: "), "qimg {args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "qimg {args:?}: {stderr:?} does not say {needle:?}"
    );
    assert!(out.stdout.is_empty(), "qimg {args:?} printed on stdout");
    assert!(
        snapshot_files(&s.path("ours")) == before,
        "qimg {args:?} changed a file"
    );
}

/// qemu-img also refuses `ARGS` (exit code 1).
fn qemu_fails(s: &Scratch, args: &[&str]) {
    let out = s.output("qemu-img", args);
    assert_eq!(out.status.code(), Some(1), "qemu-img {args:?} did not fail");
}

#[test]
fn errors_are_one_line_exit_1_and_change_nothing() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 130);
    let q = |args: &[&str]| in_dir(args, "qemu");
    let cases: &[(&[&str], &str, bool)] = &[
        // (arguments, what the message says, whether qemu-img has the same command)
        (
            &["commit", "{}/base.qcow2"],
            "does not have a backing file",
            true,
        ),
        (
            &["commit", "-b", "nope.qcow2", "{}/top.qcow2"],
            "'nope.qcow2' is not in",
            true,
        ),
        (
            &["commit", "-b", "top.qcow2", "{}/top.qcow2"],
            "must lie below",
            true,
        ),
        (
            &["commit", "--top", "nope.qcow2", "{}/top.qcow2"],
            "'nope.qcow2' is not in",
            false,
        ),
        (
            &["commit", "--top", "base.qcow2", "{}/top.qcow2"],
            "does not have a backing file",
            false,
        ),
        (
            &[
                "commit",
                "--top",
                "mid.qcow2",
                "-b",
                "top.qcow2",
                "{}/top.qcow2",
            ],
            "must lie below",
            false,
        ),
        (&["commit", "{}/missing.qcow2"], "No such file", true),
        (
            &["pull", "-b", "top.qcow2", "{}/top.qcow2"],
            "the image itself",
            false,
        ),
        (
            &["pull", "-b", "nope.qcow2", "{}/top.qcow2"],
            "'nope.qcow2' is not in",
            false,
        ),
        (&["pull", "{}/missing.qcow2"], "No such file", false),
        (&["rebase", "{}/top.qcow2"], "-b", true),
        (
            &["rebase", "-b", "nope.qcow2", "-F", "qcow2", "{}/top.qcow2"],
            "nope.qcow2",
            true,
        ),
        (
            &["rebase", "-b", "nope.qcow2", "{}/top.qcow2"],
            "No such file",
            true,
        ),
        (
            &["rebase", "-f", "raw", "-u", "-b", "", "{}/top.qcow2"],
            "Operation not supported",
            true,
        ),
        (
            &["rebase", "-f", "vmdk", "-b", "", "{}/top.qcow2"],
            "vmdk",
            true,
        ),
        (
            &["rebase", "-t", "fast", "-b", "", "{}/top.qcow2"],
            "Invalid cache option: fast",
            true,
        ),
        (
            &["rebase", "-T", "fast", "-b", "", "{}/top.qcow2"],
            "Invalid source cache option: fast",
            true,
        ),
    ];
    for (args, needle, qemu_too) in cases {
        let ours = in_dir(args, "ours");
        fails(
            &s,
            &ours.iter().map(String::as_str).collect::<Vec<_>>(),
            needle,
        );
        if *qemu_too {
            let theirs = q(args);
            qemu_fails(&s, &theirs.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    // Usage errors too, as qemu-img's.
    for args in [&["commit"][..], &["commit", "-t", "fast", "{}/top.qcow2"]] {
        let ours = in_dir(args, "ours");
        fails(
            &s,
            &ours.iter().map(String::as_str).collect::<Vec<_>>(),
            if args.len() == 1 { "FILE" } else { "fast" },
        );
        qemu_fails(&s, &q(args).iter().map(String::as_str).collect::<Vec<_>>());
    }
}

/// Runs `program args` in `dir` as an unprivileged user when we are root (so that file
/// permissions apply), else as ourselves.
fn unprivileged(dir: &Path, program: &str, args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let mut command = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
        c
    } else {
        std::process::Command::new(program)
    };
    command.args(args).current_dir(dir).output().unwrap()
}

#[test]
fn a_read_only_destination_is_a_one_line_error() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 140);
    let qimg = common::qimg_path().to_str().unwrap().to_owned();
    std::fs::set_permissions(s.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in ["ours", "qemu"] {
        std::fs::set_permissions(s.path(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
        for f in IMAGES {
            // top is ours to write; mid (the destination of a commit) is not.
            let mode = if f == "top.qcow2" { 0o666 } else { 0o444 };
            std::fs::set_permissions(s.path(dir).join(f), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
    }
    let before = snapshot_files(&s.path("ours"));
    let out = unprivileged(s.dir(), &qimg, &["commit", "ours/top.qcow2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("qimg: ") && stderr.contains("mid.qcow2"),
        "{stderr}"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(snapshot_files(&s.path("ours")) == before, "a file changed");
    let out = unprivileged(s.dir(), "qemu-img", &["commit", "qemu/top.qcow2"]);
    assert_eq!(out.status.code(), Some(1), "qemu-img commit succeeded");
}

/// The benchmark chain generator (a fixed copy of the shared one).
fn mkchain() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mkchain.sh")
}

fn copy_chain(s: &Scratch, from: &str, to: &str) {
    std::fs::create_dir_all(s.path(to)).unwrap();
    for f in IMAGES {
        let (a, b) = (format!("{from}/{f}"), format!("{to}/{f}"));
        s.run("cp", &["--sparse=always", &a, &b]);
    }
}

#[test]
fn the_benchmark_chain_commits_and_pulls_like_qemu_img() {
    let mkchain = mkchain();
    let s = Scratch::new();
    s.run(mkchain.to_str().unwrap(), &["chain", "1"]);
    copy_chain(&s, "chain", "ours");
    copy_chain(&s, "chain", "qemu");
    run_both(
        &s,
        &["commit", "-q", "{}/top.qcow2"],
        &[&["commit", "-q", "{}/top.qcow2"]],
    );
    assert_same_chains(&s, &IMAGES, &[None, Some("base.qcow2"), Some("mid.qcow2")]);
    // Pull the untouched chain: ours in place, qemu-img's on a copy.
    std::fs::remove_dir_all(s.path("ours")).unwrap();
    std::fs::remove_dir_all(s.path("qemu")).unwrap();
    std::fs::rename(s.path("chain"), s.path("ours")).unwrap();
    copy_chain(&s, "ours", "qemu");
    run_both(
        &s,
        &["pull", "{}/top.qcow2"],
        &[&["rebase", "-q", "-b", "", "{}/top.qcow2"]],
    );
    assert_same_chains(&s, &["top.qcow2"], &[None]);
}

#[test]
fn a_merge_run_again_after_a_cancel_says_how_much_was_in_place() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=64k", 140);
    let dry = s.qimg(&["commit", "-b", "base.qcow2", "--dry-run", "ours/top.qcow2"]);
    let fresh: u64 = dry
        .lines()
        .find_map(|l| l.trim().strip_prefix("already in place: "))
        .map_or(0, |t| t.split_whitespace().next().unwrap().parse().unwrap());
    // Interrupt the commit halfway (through the library: a cancelling progress callback).
    let commit = qcow2_engine::ops::CommitOptions {
        base: Some(s.path("ours/base.qcow2")),
        ..Default::default()
    };
    let mut halfway = |done: u64, total: u64| done < total / 2;
    qcow2_engine::ops::commit(s.path("ours/top.qcow2"), &commit, &mut halfway).unwrap_err();
    let dry = s.qimg(&["commit", "-b", "base.qcow2", "--dry-run", "ours/top.qcow2"]);
    let line = dry
        .lines()
        .find_map(|l| l.trim().strip_prefix("already in place: "))
        .unwrap_or_else(|| panic!("no 'already in place' in the dry run:\n{dry}"));
    let in_place: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
    assert!(in_place > fresh, "{in_place} <= {fresh}:\n{dry}");
    let stdout = s.qimg(&["commit", "-b", "base.qcow2", "ours/top.qcow2"]);
    assert!(
        stdout.starts_with(&format!("Already in place: {in_place} bytes (")),
        "{stdout}"
    );
    assert_eq!(without_already_done(&stdout), "Image committed.\n");
    same_content(&s, "ours/base.qcow2", "ours/top.qcow2");
}

#[test]
fn commit_releases_the_emptied_tops_file_space_as_qemu_img() {
    let s = Scratch::new();
    for tool in ["qemu-img", "qimg"] {
        let (base, top) = (format!("{tool}-base.qcow2"), format!("{tool}-top.qcow2"));
        s.create(&base, "", 64 << 20);
        s.create_overlay(&top, &base, "qcow2", "", None);
        s.run(
            "qemu-io",
            &["-c", "write -P 3 0 1M", "-c", "write -P 4 30M 64k", &top],
        );
        if tool == "qimg" {
            s.qimg(&["commit", &top]);
        } else {
            s.qemu_img(&["commit", &top]);
        }
        s.assert_clean(&top, tool);
    }
    let len = |name: &str| std::fs::metadata(s.path(name)).unwrap().len();
    assert!(
        len("qimg-top.qcow2") <= len("qemu-img-top.qcow2"),
        "qimg leaves {} bytes, qemu-img {}",
        len("qimg-top.qcow2"),
        len("qemu-img-top.qcow2")
    );
    s.assert_same_content("qimg-top.qcow2", "qemu-img-top.qcow2", "emptied tops");
}

/// A base smaller than the top grows first, as qemu-img commit grows it: the same base
/// file afterwards (raw: byte for byte), the top emptied and showing what it showed, and
/// `--dry-run` announcing exactly the bytes the run then changes in the base.
#[test]
fn commit_into_a_smaller_base_grows_it_first_like_qemu_img() {
    let s = Scratch::new();
    for (base, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let label = format!("{fmt} base");
        std::fs::create_dir_all(s.path("build")).unwrap();
        let b = format!("build/{base}");
        s.qemu_img(&["create", "-q", "-f", fmt, &b, "8M"]);
        s.output("qemu-io", &["-f", fmt, "-c", "write -P 1 0 1M", &b]);
        s.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base,
            "-F",
            fmt,
            "build/top.qcow2",
            "16M",
        ]);
        s.qemu_io(
            "build/top.qcow2",
            "qcow2",
            &[
                "write -P 2 15M 1M".to_string(),
                "write -P 3 4M 64k".to_string(),
                "write -z 512k 64k".to_string(),
            ],
        );
        s.output(
            "qemu-img",
            &["convert", "-O", "raw", "build/top.qcow2", "view.raw"],
        );
        for dir in ["ours", "qemu"] {
            let _ = std::fs::remove_dir_all(s.path(dir));
            std::fs::create_dir_all(s.path(dir)).unwrap();
            s.copy(&b, &format!("{dir}/{base}"));
            s.copy("build/top.qcow2", &format!("{dir}/top.qcow2"));
        }
        let dry = s.qimg(&["commit", "--dry-run", "ours/top.qcow2"]);
        let (data, zeros) = dry_run_numbers(&dry);
        s.qimg_output(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            &format!("ours/{base}"),
            "old.raw",
        ]);
        run_both(
            &s,
            &["commit", "{}/top.qcow2"],
            &[&["commit", "qemu/top.qcow2"]],
        );
        // The base grew to the top's size; what the run changed in it is what the dry
        // run said (old base read with zeros past its end).
        s.qimg_output(&[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            &format!("ours/{base}"),
            "new.raw",
        ]);
        let old = std::fs::read(s.path("old.raw")).unwrap();
        let new = std::fs::read(s.path("new.raw")).unwrap();
        assert_eq!(new.len(), 16 << 20, "{label}");
        let changed = (0..new.len())
            .filter(|&i| old.get(i).copied().unwrap_or(0) != new[i])
            .count() as u64;
        let zeroed_data = 64 << 10; // the zero write over the base's data
        assert_eq!(changed, data + zeroed_data, "{label}: dry run said {dry}");
        assert_eq!(zeros, zeroed_data, "{label}: dry run said {dry}");
        assert_eq!(new, std::fs::read(s.path("view.raw")).unwrap(), "{label}");
        if fmt == "raw" {
            assert!(
                std::fs::read(s.path("ours/base.raw")).unwrap()
                    == std::fs::read(s.path("qemu/base.raw")).unwrap(),
                "{label}: the raw bases differ"
            );
        } else {
            same_content(&s, "ours/base.qcow2", "qemu/base.qcow2");
            check(&s, "ours/base.qcow2");
        }
        same_content(&s, "ours/top.qcow2", "qemu/top.qcow2");
        check(&s, "ours/top.qcow2");
        assert_eq!(backing_of(&s, "ours/top.qcow2").as_deref(), Some(base));
    }
}
