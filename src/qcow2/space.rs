//! Space accounting of one image file: which host clusters belong to the image's own
//! structures, to the active state, to each internal snapshot, or to several of them.
//!
//! Each referenced cluster is counted once: as metadata (header, refcount structures,
//! snapshot table, bitmaps), as exclusive to one owner (the active state or one snapshot),
//! or as shared by several. So `metadata + active exclusive + every snapshot's exclusive +
//! shared` is the referenced space, and a snapshot's exclusive bytes are what deleting it
//! frees.

use crate::error::Result;

use super::image::Image;
use super::reference::{Event, Owner, Scope};

/// Space of one owner (the active state or an internal snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnerSpace {
    /// Bytes of the clusters it references (its L1 and L2 tables, data, compressed).
    pub allocated: u64,
    /// Bytes only it references: what deleting it frees.
    pub exclusive: u64,
    /// Bytes it shares with another owner (`allocated - exclusive`).
    pub shared: u64,
}

/// Space accounting of one qcow2 image file (see [`Image::space`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpace {
    /// Cluster size.
    pub cluster_size: u64,
    /// Length of the file.
    pub file_len: u64,
    /// Bytes of the clusters anything references.
    pub referenced: u64,
    /// Header, refcount table and blocks, snapshot table, bitmaps.
    pub metadata: u64,
    /// Clusters referenced by more than one owner (counted once).
    pub shared: u64,
    /// The active state.
    pub active: OwnerSpace,
    /// Each internal snapshot, in snapshot table order.
    pub snapshots: Vec<OwnerSpace>,
    /// Findings that stopped a cluster from being counted (a damaged image).
    pub problems: u64,
}

/// Per-cluster state while counting: nobody, one owner, or several.
const NOBODY: u32 = 0;
const SEVERAL: u32 = u32::MAX;

fn owner_code(owner: Owner) -> u32 {
    match owner {
        Owner::Image => 1,
        Owner::Active => 2,
        Owner::Snapshot(i) => 3 + i as u32,
    }
}

impl Image {
    /// Accounts for every referenced cluster of the image file: metadata, the active
    /// state, each internal snapshot, shared. Memory: four bytes per cluster of the file.
    pub fn space(&self) -> Result<ImageSpace> {
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let file_len = self.file_len();
        let nb_snapshots = self.snapshots().len();
        let clusters = file_len.div_ceil(cs) as usize;
        let mut state = vec![NOBODY; clusters];
        // Distinct clusters each owner references. The walk gives each owner's references
        // together, so one bitset, cleared between owners, finds repeats.
        let mut allocated = vec![0u64; nb_snapshots + 2];
        let mut seen = vec![0u64; clusters.div_ceil(64)];
        let mut touched: Vec<u64> = Vec::new();
        let mut current = NOBODY;
        let mut problems = 0;
        self.walk_references(Scope::All, &mut |event| match event {
            Event::Problem(_) => problems += 1,
            Event::Reference(r) => {
                let code = owner_code(r.owner);
                if code != current {
                    for c in touched.drain(..) {
                        seen[(c / 64) as usize] = 0;
                    }
                    current = code;
                }
                for c in r.offset >> cb..=(r.offset + r.len - 1) >> cb {
                    let (word, bit) = ((c / 64) as usize, 1u64 << (c % 64));
                    if seen[word] & bit != 0 {
                        continue;
                    }
                    seen[word] |= bit;
                    touched.push(c);
                    if code >= 2 {
                        allocated[code as usize - 2] += 1;
                    }
                    let s = &mut state[c as usize];
                    *s = if *s == NOBODY { code } else { SEVERAL };
                }
            }
        })?;
        let mut space = ImageSpace {
            cluster_size: cs,
            file_len,
            problems,
            ..ImageSpace::default()
        };
        let mut exclusive = vec![0u64; nb_snapshots + 2];
        for &s in &state {
            match s {
                NOBODY => continue,
                SEVERAL => space.shared += cs,
                1 => space.metadata += cs,
                code => exclusive[code as usize - 2] += cs,
            }
            space.referenced += cs;
        }
        let owner = |i: usize| OwnerSpace {
            allocated: allocated[i] * cs,
            exclusive: exclusive[i],
            shared: allocated[i] * cs - exclusive[i],
        };
        space.active = owner(0);
        space.snapshots = (0..nb_snapshots).map(|i| owner(i + 1)).collect();
        Ok(space)
    }
}
