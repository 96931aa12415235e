//! The machine: one in-memory `FaultStorage` disk per image, all behind one power switch
//! that cuts every disk after the machine's k-th write, and the opener that puts a case's
//! files on those disks.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qcow2_engine::ChainOptions;
use qcow2_engine::ops::MergeOptions;
use qcow2_engine::storage::{FaultStorage, Opener, Storage};

use crate::common::power::{Switch, SwitchedDisk};

/// The disks of one machine, one per image, and one power switch: the `crash_at`-th write
/// to any of them is the last before the power goes.
pub(crate) struct Machine {
    pub(crate) disks: Vec<(PathBuf, Arc<FaultStorage>)>,
    power: Mutex<Power>,
}

#[derive(Default)]
struct Power {
    writes: u64,
    crash_at: Option<u64>,
}

impl Machine {
    pub(crate) fn new(paths: &[PathBuf], bytes: &[Vec<u8>], crash_at: Option<u64>) -> Arc<Machine> {
        let disks = paths
            .iter()
            .zip(bytes)
            .map(|(p, b)| (p.clone(), Arc::new(FaultStorage::from_bytes(b.clone()))))
            .collect();
        Arc::new(Machine {
            disks,
            power: Mutex::new(Power {
                writes: 0,
                crash_at,
            }),
        })
    }

    pub(crate) fn writes(&self) -> u64 {
        self.power.lock().unwrap().writes
    }

    pub(crate) fn crashed(&self) -> bool {
        self.disks.iter().any(|(_, d)| d.is_crashed())
    }

    /// Merge options that open every image on this machine's disks.
    pub(crate) fn options(self: &Arc<Machine>, base: &MergeOptions) -> MergeOptions {
        MergeOptions {
            chain: ChainOptions {
                opener: Some(Arc::new(MachineOpener(self.clone()))),
                ..ChainOptions::default()
            },
            ..base.clone()
        }
    }
}

impl Switch for Machine {
    /// Counts one write; at the crash point every disk loses power.
    fn wrote(&self) {
        let mut p = self.power.lock().unwrap();
        p.writes += 1;
        if p.crash_at == Some(p.writes) {
            for (_, d) in &self.disks {
                d.crash_after(d.writes());
            }
        }
    }
}

/// Opens the files of a case on the machine's disks (by canonical path).
struct MachineOpener(Arc<Machine>);

impl Opener for MachineOpener {
    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn Storage>> {
        let want = std::fs::canonicalize(path)?;
        let (_, fault) = self
            .0
            .disks
            .iter()
            .find(|(p, _)| *p == want)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} is not on the machine", path.display()),
                )
            })?;
        Ok(Box::new(SwitchedDisk {
            fault: fault.clone(),
            switch: self.0.clone(),
        }))
    }
}
