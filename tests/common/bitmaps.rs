//! Reading persistent bitmaps with QEMU's own tools, the oracle for the bitmap tests: the
//! list `qemu-img info` shows, and a bitmap's dirty ranges as qemu-nbd exports them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Scratch;

/// `format-specific.data.bitmaps` of `qemu-img info --output=json` (`Null` without
/// bitmaps).
pub fn bitmap_list(s: &Scratch, image: &str) -> serde_json::Value {
    let out = s.qemu_img(&["info", "--output=json", "-U", image]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// The dirty ranges `(offset, len)` of bitmap `name` in `image`, as QEMU reads them:
/// `qemu-nbd -r -B NAME` on a Unix socket, then `qemu-img map` of the
/// `qemu:dirty-bitmap:NAME` context (where `"data": false` means dirty).
pub fn dirty_ranges(s: &Scratch, image: &str, name: &str) -> Vec<(u64, u64)> {
    let socket = s.path(&format!("nbd-{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-k"])
        .arg(&socket)
        .args(["-B", name, image])
        .current_dir(s.dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-nbd");
    let started = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = server.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut err).unwrap();
            panic!("qemu-nbd -B {name} {image} exited ({status}): {err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        socket.display()
    );
    let out = s.output(
        "qemu-img",
        &["map", "--output=json", "--image-opts", opts.as_str()],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "qemu-img map over nbd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in map.iter().filter(|e| e["data"] == false) {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => ranges.push((start, len)),
        }
    }
    ranges
}

/// `qemu-img check` finds `image` clean and says nothing on stderr (no warning about
/// bitmaps modified by a program without bitmap support).
pub fn assert_check_silent(s: &Scratch, image: &str, label: &str) {
    let out = s.output("qemu-img", &["check", image]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.is_empty(),
        "{label}: qemu-img check {image} ({}):\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
    );
}
