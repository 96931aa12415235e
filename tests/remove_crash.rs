//! Power loss during `remove`: every file of a small tree (and the journal remove writes)
//! sits on an in-memory `FaultStorage` disk, all behind one power switch cut after the
//! remove's k-th write (deleting a file counts as one), for every k until the remove
//! finishes. After each cut, with a choice of the unflushed writes kept (rotating through
//! none, all and a seeded subset; `REMOVE_CRASH_ALL=1` tries all three at every point):
//!
//! - `qemu-img check` finds no corruption in any image left (leaks are allowed);
//! - every user of the layer shows exactly what it showed before;
//! - running the same remove again on those files finishes it: the layer is gone, so is
//!   the journal, every user is on the layer's backing file and shows what it showed,
//!   and every image checks without corruption.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::Scratch;
use common::power::{Switch, SwitchedDisk};
use qcow2_engine::ChainOptions;
use qcow2_engine::ops::{self, MergeOptions, RemoveOptions};
use qcow2_engine::storage::{FaultStorage, Opener, Storage, Unflushed};

/// The files of one directory on disks behind one power switch.
struct Disks {
    dir: PathBuf,
    files: Mutex<BTreeMap<String, Arc<FaultStorage>>>,
    power: Mutex<(u64, Option<u64>, bool)>,
}

impl Disks {
    fn new(dir: &Path, files: &BTreeMap<String, Vec<u8>>, crash_at: Option<u64>) -> Arc<Disks> {
        Arc::new(Disks {
            dir: std::fs::canonicalize(dir).unwrap(),
            files: Mutex::new(
                files
                    .iter()
                    .map(|(n, b)| (n.clone(), Arc::new(FaultStorage::from_bytes(b.clone()))))
                    .collect(),
            ),
            power: Mutex::new((0, crash_at, false)),
        })
    }

    fn crashed(&self) -> bool {
        self.power.lock().unwrap().2
    }

    fn name(&self, path: &Path) -> io::Result<String> {
        let parent = path.parent().map(std::fs::canonicalize).transpose()?;
        if parent.as_deref() != Some(self.dir.as_path()) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("not on these disks: {parent:?} is not {:?}", self.dir),
            ));
        }
        Ok(path.file_name().unwrap().to_string_lossy().into_owned())
    }

    /// What each file could hold after the power went, with `unflushed`'s choice.
    fn after_crash(&self, unflushed: Unflushed) -> BTreeMap<String, Vec<u8>> {
        let files = self.files.lock().unwrap();
        files
            .iter()
            .enumerate()
            .map(|(i, (name, disk))| {
                let choice = match unflushed {
                    Unflushed::Seeded(s) => Unflushed::Seeded(s.wrapping_add(i as u64 * 7919)),
                    other => other,
                };
                (name.clone(), disk.crash_image(choice))
            })
            .collect()
    }
}

impl Switch for Disks {
    /// Counts one write; at the crash point every disk loses power.
    fn wrote(&self) {
        let mut power = self.power.lock().unwrap();
        power.0 += 1;
        if power.1 == Some(power.0) {
            power.2 = true;
            for disk in self.files.lock().unwrap().values() {
                disk.crash_after(disk.writes());
            }
        }
    }
}

struct DisksOpener(Arc<Disks>);

impl Opener for DisksOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn Storage>> {
        let name = self.0.name(path)?;
        let fault = self.0.files.lock().unwrap().get(&name).cloned();
        let fault = fault.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name))?;
        Ok(Box::new(SwitchedDisk {
            fault,
            switch: self.0.clone(),
        }))
    }

    fn read_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        if std::fs::canonicalize(dir)? != self.0.dir {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not on these disks",
            ));
        }
        Ok(self
            .0
            .files
            .lock()
            .unwrap()
            .keys()
            .map(|n| dir.join(n))
            .collect())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        if self.0.crashed() {
            return Err(io::Error::other("the power is off"));
        }
        let name = self.0.name(path)?;
        self.0.files.lock().unwrap().remove(&name);
        self.0.wrote();
        Ok(())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn Storage>> {
        if self.0.crashed() {
            return Err(io::Error::other("the power is off"));
        }
        let name = self.0.name(path)?;
        let fault = Arc::new(FaultStorage::from_bytes(Vec::new()));
        self.0.files.lock().unwrap().insert(name, fault.clone());
        self.0.wrote();
        Ok(Box::new(SwitchedDisk {
            fault,
            switch: self.0.clone(),
        }))
    }
}

const USERS: &[&str] = &["top.qcow2", "top2.qcow2"];

/// base <- mid <- {top, top2}, and with `sibling` base <- other: tiny images with data in
/// every layer, so that every write is a crash point.
fn build(s: &Scratch, sibling: bool) {
    let o = "cluster_size=4k";
    s.create("base.qcow2", o, 256 << 10);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 64k".into()]);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", o, None);
    let scattered: Vec<String> = [(16, 8), (40, 4), (72, 12), (128, 4), (200, 8), (240, 4)]
        .iter()
        .map(|(at, len)| format!("write -P 2 {at}k {len}k"))
        .chain(["write -z 96k 8k".to_owned()])
        .collect();
    s.qemu_io("mid.qcow2", "qcow2", &scattered);
    for (top, p) in [("top.qcow2", 3), ("top2.qcow2", 4)] {
        s.create_overlay(top, "mid.qcow2", "qcow2", o, None);
        s.qemu_io(top, "qcow2", &[format!("write -P {p} 20k 4k")]);
    }
    if sibling {
        s.create_overlay("other.qcow2", "base.qcow2", "qcow2", o, None);
    }
}

/// Writes `files` into `dir` (emptied first) as host files.
fn put(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

/// What `image` in `dir` shows, through qemu-img.
fn view(s: &Scratch, dir: &str, image: &str) -> Vec<u8> {
    let raw = format!("{dir}.{image}.raw");
    s.qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        &format!("{dir}/{image}"),
        &raw,
    ]);
    let bytes = std::fs::read(s.path(&raw)).unwrap();
    std::fs::remove_file(s.path(&raw)).unwrap();
    bytes
}

/// No corruption in any image of `dir` (leaks are allowed).
fn no_corruption(s: &Scratch, dir: &str, files: &BTreeMap<String, Vec<u8>>, label: &str) {
    for name in files.keys().filter(|n| n.ends_with(".qcow2")) {
        let out = s.output("qemu-img", &["check", "-U", &format!("{dir}/{name}")]);
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "{label}: qemu-img check {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn options(disks: &Arc<Disks>) -> RemoveOptions {
    RemoveOptions {
        merge: MergeOptions {
            chain: ChainOptions {
                opener: Some(Arc::new(DisksOpener(disks.clone()))),
                ..ChainOptions::default()
            },
            checkpoint_bytes: 8 << 10,
            ..MergeOptions::default()
        },
        ..RemoveOptions::default()
    }
}

fn crash_every_write(sibling: bool) {
    let s = Scratch::new();
    std::fs::create_dir(s.path("orig")).unwrap();
    build(&s, sibling);
    let mut originals = BTreeMap::new();
    for entry in std::fs::read_dir(s.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            originals.insert(name, std::fs::read(&path).unwrap());
        }
    }
    put(&s.path("orig"), &originals);
    let shown: Vec<Vec<u8>> = USERS.iter().map(|u| view(&s, "orig", u)).collect();
    let all_modes = std::env::var_os("REMOVE_CRASH_ALL").is_some();
    let mut points = 0;
    for k in 1.. {
        put(&s.path("run"), &originals);
        let disks = Disks::new(&s.path("run"), &originals, Some(k));
        let _ = ops::remove(s.path("run/mid.qcow2"), &options(&disks), &mut |_, _| true);
        if !disks.crashed() {
            break;
        }
        points += 1;
        let modes = [Unflushed::Lost, Unflushed::Kept, Unflushed::Seeded(k)];
        let tried: Vec<Unflushed> = if all_modes {
            modes.to_vec()
        } else {
            vec![modes[k as usize % 3]]
        };
        for mode in tried {
            let label = format!("sibling={sibling}, crash after write {k}, {mode:?}");
            let crashed = disks.after_crash(mode);
            put(&s.path("run"), &crashed);
            no_corruption(&s, "run", &crashed, &label);
            for (user, before) in USERS.iter().zip(&shown) {
                assert!(view(&s, "run", user) == *before, "{label}: {user} changed");
            }
            // The same command again finishes it; unless the cut came after the last
            // step (the journal's removal), when there is nothing left to finish.
            let done = !crashed.contains_key("mid.qcow2")
                && !crashed.keys().any(|n| n.ends_with(".qimg-remove"));
            let rerun = Disks::new(&s.path("run"), &crashed, None);
            if !done {
                ops::remove(s.path("run/mid.qcow2"), &options(&rerun), &mut |_, _| true)
                    .unwrap_or_else(|e| {
                        let journal = crashed.get(".mid.qcow2.qimg-remove");
                        panic!(
                            "{label}: rerun: {}; files {:?}; journal {:?}",
                            e.report(),
                            crashed.keys().collect::<Vec<_>>(),
                            journal.map(|j| String::from_utf8_lossy(j).into_owned())
                        )
                    });
            }
            let after = rerun.after_crash(Unflushed::Kept);
            assert!(!after.contains_key("mid.qcow2"), "{label}: mid left");
            assert!(
                !after.keys().any(|n| n.ends_with(".qimg-remove")),
                "{label}: journal left: {:?}",
                after.keys().collect::<Vec<_>>()
            );
            put(&s.path("run"), &after);
            no_corruption(&s, "run", &after, &format!("{label}, rerun"));
            for (user, before) in USERS.iter().zip(&shown) {
                assert!(
                    view(&s, "run", user) == *before,
                    "{label}: {user} changed after the rerun"
                );
                assert_eq!(
                    common::backing_of(&s, &format!("run/{user}")).as_deref(),
                    Some("base.qcow2"),
                    "{label}: {user}"
                );
            }
        }
    }
    eprintln!("sibling={sibling}: {points} crash points");
    assert!(points > 10, "only {points} crash points");
}

#[test]
fn a_remove_down_cut_at_every_write_keeps_every_view_and_finishes_when_run_again() {
    crash_every_write(false);
}

#[test]
fn a_remove_up_cut_at_every_write_keeps_every_view_and_finishes_when_run_again() {
    crash_every_write(true);
}
