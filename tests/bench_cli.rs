//! `qimg bench` against `qemu-img bench`: the same command lines give the same report
//! lines (but the time), the same exit codes and refusals, and write requests leave the
//! same image content.

mod common;

use common::{Scratch, assert_one_line_failure};

/// The report with the time taken out.
fn shape(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) => {
                let secs = rest.strip_suffix(" seconds.").expect("seconds");
                let (whole, frac) = secs.split_once('.').expect("a decimal point");
                assert!(whole.parse::<u64>().is_ok() && frac.len() == 3, "{l}");
                "Run completed in S seconds.".to_string()
            }
            None => l.to_string(),
        })
        .collect()
}

#[test]
fn bench_reports_and_writes_as_qemu_img() {
    let s = Scratch::new();
    s.create("twin.qcow2", "cluster_size=65536", 16 << 20);
    s.copy("twin.qcow2", "ours.qcow2");
    for args in [
        &["-c", "1000"][..],
        &["-c", "500", "-d", "1", "-s", "64k"],
        &["-c", "300", "-d", "8", "-o", "1M", "-S", "1052672"],
        &[
            "-w",
            "-c",
            "400",
            "-d",
            "4",
            "--pattern=90",
            "-s",
            "4k",
            "-S",
            "12k",
        ],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "16",
            "--flush-interval=50",
            "-s",
            "8k",
        ],
        &[
            "-w",
            "-c",
            "200",
            "-d",
            "16",
            "--flush-interval=20",
            "--no-drain",
            "-o",
            "8M",
        ],
        &["-q", "-c", "10"],
    ] {
        let q = s.output("qemu-img", &[&["bench"], args, &["twin.qcow2"]].concat());
        let o = s.qimg_output(&[&["bench"], args, &["ours.qcow2"]].concat());
        assert!(q.status.success() && o.status.success(), "{args:?}: {o:?}");
        assert_eq!(shape(&o.stdout), shape(&q.stdout), "{args:?}");
        s.assert_same_content("twin.qcow2", "ours.qcow2", &format!("{args:?}"));
        s.assert_clean("ours.qcow2", &format!("{args:?}"));
    }
}

#[test]
fn bench_refuses_what_qemu_img_refuses() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    for args in [
        &["-c", "10", "--flush-interval=50"][..],
        &["-w", "-c", "10", "-d", "64", "--flush-interval=10"],
        &["-c", "10", "-o", "1040k", "-s", "8k"],
        &["-c", "10", "-d", "0"],
    ] {
        let q = s.output("qemu-img", &[&["bench"], args, &["a.qcow2"]].concat());
        let o = s.qimg_output(&[&["bench"], args, &["a.qcow2"]].concat());
        assert_eq!(q.status.code(), Some(1), "qemu-img {args:?}");
        assert_eq!(o.status.code(), Some(1), "qimg {args:?}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
    let o = s.qimg_output(&["bench", "-c", "10", "-o", "1040k", "-s", "8k", "a.qcow2"]);
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("qimg: Failed request: "));
    assert_one_line_failure(&o, "past the end");
}

#[test]
fn random_offsets_stay_inside_the_image() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=4096", 4 << 20);
    s.qimg(&[
        "bench",
        "-w",
        "--random=9",
        "-c",
        "2000",
        "-d",
        "4",
        "--pattern=1",
        "a.qcow2",
    ]);
    s.assert_clean("a.qcow2", "random");
    let map = s.map("a.qcow2", "qcow2");
    let data: u64 = map.iter().filter(|e| e.data).map(|e| e.length).sum();
    // 2000 random 4 KiB blocks of 1024: most of the disk written, none past its end.
    assert!(data > 2 << 20 && data <= 4 << 20, "{data}");
}
