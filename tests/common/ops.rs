//! Guest operations for write tests, and a model disk that says what each should leave.

use qcow2_engine::Chain;

use super::Rng;

/// One guest operation on a writable chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `Chain::write_at(data, offset)`.
    Write { offset: u64, data: Vec<u8> },
    /// `Chain::write_zeroes(offset, len, unmap)`.
    Zero { offset: u64, len: u64, unmap: bool },
    /// `Chain::discard(offset, len)`.
    Discard { offset: u64, len: u64 },
    /// `Chain::flush()`.
    Flush,
}

impl Op {
    /// Runs the operation on `chain`.
    pub fn run(&self, chain: &Chain) -> qcow2_engine::Result<()> {
        match self {
            Op::Write { offset, data } => chain.write_at(data, *offset),
            Op::Zero { offset, len, unmap } => chain.write_zeroes(*offset, *len, *unmap),
            Op::Discard { offset, len } => chain.discard(*offset, *len),
            Op::Flush => chain.flush(),
        }
    }

    /// A short description (no data bytes).
    pub fn describe(&self) -> String {
        match self {
            Op::Write { offset, data } => format!("write {offset:#x}+{:#x}", data.len()),
            Op::Zero { offset, len, unmap } => {
                format!(
                    "zero {offset:#x}+{len:#x}{}",
                    if *unmap { " unmap" } else { "" }
                )
            }
            Op::Discard { offset, len } => format!("discard {offset:#x}+{len:#x}"),
            Op::Flush => "flush".into(),
        }
    }
}

/// What a guest should read: the disk's bytes, and the rules that change them.
#[derive(Debug, Clone)]
pub struct Model {
    /// The guest's bytes.
    pub bytes: Vec<u8>,
    /// Cluster size of the top image (discard works on whole clusters).
    pub cluster: u64,
    /// Discards change nothing: version 2 with a backing file, where QEMU can neither mark
    /// zeros nor unallocate (that would expose the backing file), and leaves the clusters
    /// alone. Otherwise a discarded cluster reads as zeros.
    pub discard_ignored: bool,
}

impl Model {
    /// A model of an image that reads `initial`.
    pub fn new(initial: Vec<u8>, cluster: u64, discard_ignored: bool) -> Model {
        Model {
            bytes: initial,
            cluster,
            discard_ignored,
        }
    }

    /// The range a discard of `offset..offset + len` really discards: whole clusters, and
    /// the partial last cluster when the range reaches the end of the image.
    pub fn discarded(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let size = self.bytes.len() as u64;
        let end = offset + len;
        let lo = offset.div_ceil(self.cluster) * self.cluster;
        let hi = if end == size {
            size
        } else {
            end / self.cluster * self.cluster
        };
        lo..hi.max(lo)
    }

    /// Applies `op`.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data } => {
                let o = *offset as usize;
                self.bytes[o..o + data.len()].copy_from_slice(data);
            }
            Op::Zero { offset, len, .. } => {
                self.bytes[*offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard { offset, len } => {
                if !self.discard_ignored {
                    let r = self.discarded(*offset, *len);
                    self.bytes[r.start as usize..r.end as usize].fill(0);
                }
            }
            Op::Flush => {}
        }
    }

    /// What `op` makes byte `at` read, if it changes that byte at all.
    pub fn value_at(&self, op: &Op, at: u64) -> Option<u8> {
        match op {
            Op::Write { offset, data } => (*offset..offset + data.len() as u64)
                .contains(&at)
                .then(|| data[(at - offset) as usize]),
            Op::Zero { offset, len, .. } => (*offset..offset + len).contains(&at).then_some(0),
            Op::Discard { offset, len } => {
                (!self.discard_ignored && self.discarded(*offset, *len).contains(&at)).then_some(0)
            }
            Op::Flush => None,
        }
    }
}

/// A random range of an image of `size` bytes with `cluster`-byte clusters: unaligned,
/// cluster aligned, or straddling a cluster boundary; at most `max_len` bytes.
pub fn random_range(rng: &mut Rng, size: u64, cluster: u64, max_len: u64) -> (u64, u64) {
    let max_len = max_len.clamp(1, size);
    match rng.below(3) {
        0 => {
            let off = rng.below(size);
            (off, 1 + rng.below(max_len.min(size - off)))
        }
        1 => {
            let clusters = size.div_ceil(cluster);
            let off = rng.below(clusters) * cluster;
            let n = 1 + rng.below((max_len / cluster).max(1));
            (off, (n * cluster).min(size - off))
        }
        _ => {
            let boundary = cluster * (1 + rng.below((size / cluster).max(1)));
            let boundary = boundary.min(size - 1).max(1);
            let before = 1 + rng.below(cluster.min(boundary).min(max_len));
            let off = boundary - before;
            (
                off,
                (before + rng.below(cluster))
                    .min(size - off)
                    .min(max_len)
                    .max(1),
            )
        }
    }
}

/// A random operation: mostly writes of random bytes, then zero writes (with and
/// without unmap), discards and flushes, in proportions `flush_weight` out of 20 for
/// flushes.
pub fn random_op(rng: &mut Rng, size: u64, cluster: u64, max_len: u64, flush_weight: u64) -> Op {
    let roll = rng.below(20);
    if roll < flush_weight {
        return Op::Flush;
    }
    let (offset, len) = random_range(rng, size, cluster, max_len);
    match roll % 8 {
        0..=3 => Op::Write {
            offset,
            data: rng.bytes(len as usize),
        },
        4 => Op::Zero {
            offset,
            len,
            unmap: false,
        },
        5 => Op::Zero {
            offset,
            len,
            unmap: true,
        },
        6 => Op::Discard { offset, len },
        _ => Op::Write {
            offset,
            data: vec![(rng.below(255) + 1) as u8; len as usize],
        },
    }
}
