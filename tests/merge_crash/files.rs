//! The images of a case as files: writing and reading them, what they hold (backing
//! pointers, views through their chain, internal snapshots, leaked clusters), and failing
//! with them kept for a look.

use std::hash::{Hash, Hasher};
use std::path::Path;

use qcow2_engine::{Chain, Image};

use crate::common::Scratch;

pub(crate) fn fingerprint<T: Hash>(value: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

pub(crate) fn is_qcow2(bytes: &[u8]) -> bool {
    bytes.starts_with(b"QFI\xfb")
}

/// The backing file name an image stores (none for raw files).
pub(crate) fn pointer(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).unwrap();
    if !is_qcow2(&bytes) {
        return None;
    }
    Image::open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .backing_file()
}

/// What `qemu-img convert` reads from `dir/name` through its chain.
pub(crate) fn view(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    let rel = format!("{dir}/{name}");
    let bytes = std::fs::read(s.path(&rel)).unwrap();
    s.reference(&rel, if is_qcow2(&bytes) { "qcow2" } else { "raw" })
}

/// Panics with `message`, keeping the crashed images (`crash/`, and `before/` as they
/// were before the rerun) in a directory the message names.
pub(crate) fn fail(s: &Scratch, label: &str, message: &str) -> ! {
    let kept = std::env::temp_dir().join(format!("merge-crash-{:x}", fingerprint(&label)));
    for dir in ["crash", "before"] {
        let Ok(entries) = std::fs::read_dir(s.path(dir)) else {
            continue;
        };
        std::fs::create_dir_all(kept.join(dir)).unwrap();
        for entry in entries {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), kept.join(dir).join(entry.file_name())).unwrap();
        }
    }
    panic!("{label}: {message} (images kept in {})", kept.display())
}

/// What the library reads from `dir/name` through its chain (cheaper than a process; the
/// expected views all come from qemu-img).
pub(crate) fn our_view(s: &Scratch, dir: &str, name: &str) -> Vec<u8> {
    let chain = Chain::open(s.path(&format!("{dir}/{name}")))
        .unwrap_or_else(|e| panic!("opening {dir}/{name}: {e}"));
    let mut bytes = vec![0u8; chain.size() as usize];
    chain.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// What internal snapshot `snapshot` of `dir/name` holds.
pub(crate) fn snapshot_view(s: &Scratch, dir: &str, name: &str, snapshot: &str) -> Vec<u8> {
    let rel = format!("{dir}/{name}");
    let l = format!("snapshot.name={snapshot}");
    s.qemu_img(&["convert", "-l", &l, "-O", "raw", &rel, "snapshot.raw"]);
    let bytes = std::fs::read(s.path("snapshot.raw")).unwrap();
    std::fs::remove_file(s.path("snapshot.raw")).unwrap();
    bytes
}

/// `qemu-img check` of `dir/name`: fails on corruption; returns the leaked clusters.
pub(crate) fn leaks(s: &Scratch, dir: &str, name: &str, label: &str) -> u64 {
    let rel = format!("{dir}/{name}");
    let out = s.output("qemu-img", &["check", "--output=json", &rel]);
    let text = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => 0,
        Some(3) => {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["leaks"].as_u64().unwrap_or(0)
        }
        code => fail(
            s,
            label,
            &format!(
                "qemu-img check {rel} exits {code:?}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    }
}

pub(crate) fn write_all(s: &Scratch, dir: &str, names: &[&str], bytes: &[Vec<u8>]) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    for (name, b) in names.iter().zip(bytes) {
        std::fs::write(s.path(&format!("{dir}/{name}")), b).unwrap();
    }
}

pub(crate) fn read_all(s: &Scratch, dir: &str, names: &[&str]) -> Vec<Vec<u8>> {
    names
        .iter()
        .map(|n| std::fs::read(s.path(&format!("{dir}/{n}"))).unwrap())
        .collect()
}
