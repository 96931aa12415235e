//! Merges killed with SIGKILL at many moments: every image still passes `qemu-img check`
//! without corruption (leaks allowed), the active image shows exactly what it showed
//! before, and running the same command again finishes the merge.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Scratch, merge_chain, qimg_path};

const IMAGES: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

/// `qemu-img check` finds no corruption (exit 0 clean, 3 leaks only).
fn assert_no_corruption(s: &Scratch, path: &str, label: &str) {
    let out = s.output("qemu-img", &["check", path]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{label}: qemu-img check {path} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_killed_merge_loses_nothing_and_running_it_again_finishes_it() {
    let s = Scratch::new();
    merge_chain(&s, "cluster_size=4k", 70);
    let shown = s.reference("top.qcow2", "qcow2");
    let operations: [&[&str]; 3] = [
        &["commit", "-b", "base.qcow2", "top.qcow2"],
        &["commit", "top.qcow2"],
        &["pull", "top.qcow2"],
    ];
    let mut killed_midway = 0;
    for args in operations {
        for delay_us in [
            0, 300, 700, 1000, 1500, 2000, 3000, 4000, 5000, 7000, 10_000, 15_000,
        ] {
            let label = format!("qimg {} killed after {delay_us} µs", args.join(" "));
            std::fs::create_dir_all(s.path("k")).unwrap();
            for f in IMAGES {
                s.copy(f, &format!("k/{f}"));
            }
            let mut child = Command::new(qimg_path())
                .args(args)
                .current_dir(s.path("k"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting qimg");
            std::thread::sleep(Duration::from_micros(delay_us));
            let finished = child.try_wait().unwrap().is_some();
            child.kill().ok(); // SIGKILL
            child.wait().unwrap();
            if !finished {
                killed_midway += 1;
            }
            for f in IMAGES {
                assert_no_corruption(&s, &format!("k/{f}"), &label);
            }
            assert!(
                s.reference("k/top.qcow2", "qcow2") == shown,
                "{label}: the active image changed"
            );
            // The same command again completes the merge.
            let out = Command::new(qimg_path())
                .args(args)
                .current_dir(s.path("k"))
                .output()
                .expect("running qimg again");
            assert!(
                out.status.success(),
                "{label}: rerun: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for f in IMAGES {
                assert_no_corruption(&s, &format!("k/{f}"), &label);
            }
            assert!(
                s.reference("k/top.qcow2", "qcow2") == shown,
                "{label}: the active image changed after the rerun"
            );
            if args[1] == "-b" {
                assert!(
                    s.reference("k/base.qcow2", "qcow2") == shown,
                    "{label}: the base does not show the committed content"
                );
            }
        }
    }
    eprintln!("{killed_midway} of 36 kills interrupted a running merge");
    // Most kills must land while the merge runs, or the test proves little.
    assert!(
        killed_midway >= 6,
        "only {killed_midway} kills interrupted a merge"
    );
}
