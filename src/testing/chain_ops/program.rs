//! The program an input decodes to, and its byte encoding.
//!
//! Every byte string is a program (missing bytes read as zeros):
//!
//! ```text
//! byte 0       chain: bits 0-1 depth (1 + value % 3), bits 2-3 virtual size (256 KiB +
//!              1536, 512 KiB, 1 MiB + 3584, 2 MiB), bit 4 the bottom layer is about half
//!              as long, bit 5 small L2 caches (4 tables), bit 6 merges flush every 64 KiB,
//!              bit 7 zstd compression (version 3 images)
//! bytes 1-3    one image each, bottom first (only `depth` of them are used): see
//!              `LayerConfig`
//! bytes 4-5    what the bottom and middle layer hold before the overlays above are made:
//!              bit k writes a pattern over roughly the k-th eighth of the layer
//! then         at most MAX_OPS operations, one opcode byte (value % 12; a rebase from
//!              0xe0, a resize from 0xf0) and its arguments each (see `ChainOp`)
//! ```
//!
//! Ranges are a flags byte, a 24-bit offset (modulo the size) and a 24-bit length (1 +
//! value modulo 384 KiB); flag bit 0 aligns both to 512 bytes, bit 1 to the top image's
//! clusters, bit 4 makes the range run to the end of the image.

use super::config::{LayerConfig, MAX_LEN, MAX_OPS, OpsConfig, SECTOR};
use super::reader::Reader;

/// A guest range as the input gives it; resolved against the image when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRange {
    /// Bit 0: align to 512 bytes; bit 1: align to the top image's clusters; bit 3: unmap
    /// (zero writes); bit 4: run to the end of the image.
    pub flags: u8,
    /// Offset, modulo the virtual size (24 bits).
    pub offset: u32,
    /// Length minus one, modulo 384 KiB (24 bits).
    pub len: u32,
}

impl RawRange {
    fn decode(r: &mut Reader<'_>) -> RawRange {
        RawRange {
            flags: r.u8(),
            offset: r.u24(),
            len: r.u24(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.flags);
        out.extend(&self.offset.to_be_bytes()[1..]);
        out.extend(&self.len.to_be_bytes()[1..]);
    }

    /// `(offset, len)` in an image of `size` bytes with `cluster`-byte clusters: never
    /// empty, never past the end.
    pub(super) fn resolve(&self, size: u64, cluster: u64) -> (u64, u64) {
        let mut off = u64::from(self.offset) % size;
        let mut len = 1 + u64::from(self.len) % MAX_LEN;
        for (bit, unit) in [(1, SECTOR), (2, cluster)] {
            if self.flags & bit != 0 {
                off = off / unit * unit;
                len = len.div_ceil(unit) * unit;
            }
        }
        if self.flags & 0x10 != 0 {
            len = size - off;
        }
        (off, len.min(size - off).max(1))
    }
}

/// One operation of the program (the opcode is the first byte modulo 12, except that
/// bytes from 0xe0 are `Rebase` and from 0xf0 `Resize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainOp {
    /// 0: `Chain::write_at` of bytes made from `pattern` and the guest offset (all zeros
    /// for pattern 0).
    Write {
        /// Where.
        range: RawRange,
        /// Which bytes.
        pattern: u8,
    },
    /// 1: `Chain::write_zeroes`, unmapping with range flag bit 3.
    WriteZeroes(RawRange),
    /// 2: `Chain::discard`.
    Discard(RawRange),
    /// 3: `Chain::write_compressed` of the cluster holding `offset` (offset modulo the
    /// size), written uncompressed when it does not compress.
    WriteCompressed {
        /// A guest offset in the cluster (24 bits).
        offset: u32,
        /// Which bytes.
        pattern: u8,
    },
    /// 4: `Chain::flush`.
    Flush,
    /// 5: `Image::snapshot_create` on the top image (skipped past 4 snapshots).
    SnapshotCreate,
    /// 6: `Image::snapshot_apply` of the top image's snapshot at this index (modulo how
    /// many it has; skipped without one).
    SnapshotApply(u8),
    /// 7: `Image::snapshot_delete`, as apply.
    SnapshotDelete(u8),
    /// 8: `ops::commit` from the top image. Bits 0-1: into the backing file, emptying
    /// the top (0), keeping it (1), with `base` = layer (bits 2-5 modulo the depth) (2),
    /// with `top` = layer (bits 2-5 modulo the depth; the layer above is re-pointed)
    /// (3); bit 6: data copied by the storage; bit 7: dry run. Impossible combinations
    /// must be refused.
    Commit(u8),
    /// 9: `ops::pull` into the top image. Bits 0-6 modulo (depth + 1): the base layer,
    /// the depth meaning none (pull everything), 0 (the top itself) refused; bit 6 also:
    /// data copied by the storage; bit 7: dry run.
    Pull(u8),
    /// 10: close the chain and open it again.
    Reopen,
    /// 11: a new qcow2 overlay on the top image becomes the top (an external snapshot;
    /// skipped at 4 layers or 6 images).
    Overlay(LayerConfig),
    /// Opcode bytes 0xf0-0xff (whatever their value modulo 12): `Chain::resize` of the
    /// top image to `(value + 1) * 8 KiB - (value % 7) * 512` bytes (8 KiB to 2 MiB),
    /// shrinking allowed. The new area reads as zeros; version 2 refuses with snapshots,
    /// or to grow over a longer backing file.
    Resize(u8),
    /// Opcode bytes 0xe0-0xef: `ops::rebase` of the top image. Bits 0-1: safe, onto layer
    /// (bits 2-5 modulo the depth; the image itself is refused) (0), onto nothing (1),
    /// onto an image no longer in the chain (bits 2-5 modulo how many; skipped without
    /// one) (2); unsafe onto a layer below (bits 2-5), or onto nothing without one (3):
    /// the top then shows the new backing chain where it allocates nothing. Bit 6: data
    /// copied by the storage; bit 7: dry run (safe only).
    Rebase(u8),
}

impl ChainOp {
    fn decode(r: &mut Reader<'_>) -> ChainOp {
        let opcode = r.u8();
        if opcode >= 0xf0 {
            return ChainOp::Resize(r.u8());
        }
        if opcode >= 0xe0 {
            return ChainOp::Rebase(r.u8());
        }
        match opcode % 12 {
            0 => ChainOp::Write {
                range: RawRange::decode(r),
                pattern: r.u8(),
            },
            1 => ChainOp::WriteZeroes(RawRange::decode(r)),
            2 => ChainOp::Discard(RawRange::decode(r)),
            3 => ChainOp::WriteCompressed {
                offset: r.u24(),
                pattern: r.u8(),
            },
            4 => ChainOp::Flush,
            5 => ChainOp::SnapshotCreate,
            6 => ChainOp::SnapshotApply(r.u8()),
            7 => ChainOp::SnapshotDelete(r.u8()),
            8 => ChainOp::Commit(r.u8()),
            9 => ChainOp::Pull(r.u8()),
            10 => ChainOp::Reopen,
            _ => ChainOp::Overlay(LayerConfig::decode(r.u8())),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ChainOp::Write { range, pattern } => {
                out.push(0);
                range.encode(out);
                out.push(pattern);
            }
            ChainOp::WriteZeroes(range) => {
                out.push(1);
                range.encode(out);
            }
            ChainOp::Discard(range) => {
                out.push(2);
                range.encode(out);
            }
            ChainOp::WriteCompressed { offset, pattern } => {
                out.push(3);
                out.extend(&offset.to_be_bytes()[1..]);
                out.push(pattern);
            }
            ChainOp::Flush => out.push(4),
            ChainOp::SnapshotCreate => out.push(5),
            ChainOp::SnapshotApply(i) => out.extend([6, i]),
            ChainOp::SnapshotDelete(i) => out.extend([7, i]),
            ChainOp::Commit(m) => out.extend([8, m]),
            ChainOp::Pull(m) => out.extend([9, m]),
            ChainOp::Reopen => out.push(10),
            ChainOp::Overlay(c) => out.extend([11, c.encode()]),
            ChainOp::Resize(s) => out.extend([0xf0, s]),
            ChainOp::Rebase(m) => out.extend([0xe0, m]),
        }
    }
}

/// A decoded input: the chain and the operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsProgram {
    /// The chain to start from.
    pub config: OpsConfig,
    /// The operations, at most [`MAX_OPS`].
    pub ops: Vec<ChainOp>,
}

impl OpsProgram {
    /// Decodes an input (every byte string is a program).
    pub fn decode(data: &[u8]) -> OpsProgram {
        let mut r = Reader { data, pos: 0 };
        let config = OpsConfig::decode(&mut r);
        let mut ops = Vec::new();
        while r.pos < data.len() && ops.len() < MAX_OPS {
            ops.push(ChainOp::decode(&mut r));
        }
        OpsProgram { config, ops }
    }

    /// The bytes that decode to this program.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.config.encode(&mut out);
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}
