//! Processes that hold images open (QEMU's tools, qimg) for tests of QEMU's image locks,
//! and the lock bytes the kernel shows for a file.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Scratch;

/// The lock bytes some process holds on the file at `path` (from `/proc/locks`).
pub fn locked_bytes(path: &Path) -> Vec<u64> {
    let ino = std::fs::metadata(path).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut bytes: Vec<u64> = locks
        .lines()
        .filter(|l| l.contains(&format!(":{ino} ")))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let start: u64 = f[f.len() - 2].parse().ok()?;
            let end: u64 = f[f.len() - 1].parse().ok()?;
            Some(start..=end)
        })
        .flatten()
        .collect();
    bytes.sort_unstable();
    bytes.dedup();
    bytes
}

/// A process holding images open until dropped (then killed and reaped).
pub struct Holder {
    child: Child,
    label: String,
}

impl Holder {
    /// Starts `program args...` in `s` and waits (at most 20 s) until `file` has lock byte
    /// `byte` (101: someone holds write; 100: someone reads).
    pub fn start(
        s: &Scratch,
        program: impl AsRef<Path>,
        args: &[&str],
        file: &str,
        byte: u64,
    ) -> Holder {
        let program = program.as_ref();
        let label = format!("{} {}", program.display(), args.join(" "));
        let child = Command::new(program)
            .args(args)
            .current_dir(s.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let mut holder = Holder { child, label };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !locked_bytes(&s.path(file)).contains(&byte) {
            if let Some(status) = holder.child.try_wait().unwrap() {
                let mut stderr = String::new();
                use std::io::Read;
                let _ = holder
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr);
                panic!(
                    "{} exited ({status}) before locking: {stderr}",
                    holder.label
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not lock byte {byte} of {file} in 20 s",
                holder.label
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        holder
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
