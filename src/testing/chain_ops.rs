//! The `ops` harness: the fuzz input is a small program — a chain to start from and a
//! list of operations on it — run on images held in memory ([`MemOpener`]) against a
//! model of what each layer shows, so that libFuzzer explores sequences of operations
//! rather than bytes of images.
//!
//! # The input
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
//!
//! # The model
//!
//! The model keeps, for each layer of the chain, the bytes the chain read from that layer
//! down shows, and for each internal snapshot its bytes and which sectors the image
//! itself decided when it was taken (from [`Image::runs`]; the rest shows the backing
//! chain of the moment it is applied). After every operation the whole guest range is
//! read through the chain and compared; after merges, reopening and new overlays every
//! layer's view is compared too, and the chain must consist of the expected images. An
//! operation that fails must be one the library refuses (`InvalidArgument`,
//! `Unsupported` or `BackingLoop`: a merge with impossible arguments, snapshots that
//! narrow refcounts cannot count, a rebase onto the image itself) and must change nothing. Whenever the chain is closed (reopening,
//! merges, new overlays, the end) every image must pass [`Image::check`] without a
//! finding and without the dirty bit; at the end every snapshot still reachable must
//! read as the model says (applied to a copy of its image).
//!
//! Costs are bounded: at most 6 images of at most 2 MiB, 4 snapshots each, 32
//! operations of at most 384 KiB.

use std::collections::HashMap;
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions};
use crate::create::{CreateOptions, create_on};
use crate::error::Error;
use crate::format::CompressionType;
use crate::layers::Format;
use crate::ops::{self, CommitOptions, MergeOptions};
use crate::qcow2::{Compat, Image, ImageOptions, Mapping, compress_cluster};
use crate::storage::{MemOpener, MemStorage};

/// At most this many operations run per input.
pub const MAX_OPS: usize = 32;
/// Snapshots an image may hold; creating more is skipped.
const MAX_SNAPSHOTS: usize = 4;
/// The deepest chain the `Overlay` operation builds.
const MAX_LAYERS: usize = 4;
/// Images the `Overlay` operation may create in all.
const MAX_IMAGES: usize = 6;
/// The longest range of one operation.
const MAX_LEN: u64 = 384 << 10;
/// Virtual sizes (multiples of 512; the first two end inside a 64 KiB cluster).
const SIZES: [u64; 4] = [(256 << 10) + 1536, 512 << 10, (1 << 20) + 7 * 512, 2 << 20];
/// Cluster sizes.
const CLUSTERS: [u64; 4] = [512, 4096, 16384, 65536];
const SECTOR: u64 = 512;

/// How one image is created: one byte of the input (bits 0-1 cluster size 512, 4k, 16k,
/// 64k; bit 2 version 2; bit 3 extended L2; bit 4 lazy refcounts; bits 5-7 refcount
/// width `1 << value` bits, 7 meaning 16). Combinations qemu-img refuses are normalized:
/// version 2 has 16-bit refcounts and neither extended L2 nor lazy refcounts; extended L2
/// needs 16 KiB clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Version 2 (compat 0.10).
    pub v2: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
}

impl LayerConfig {
    /// Decodes one byte (every byte is valid).
    pub fn decode(b: u8) -> LayerConfig {
        let cluster_size = CLUSTERS[usize::from(b & 3)];
        let v2 = b & 4 != 0;
        let order = u32::from(b >> 5);
        LayerConfig {
            cluster_size,
            v2,
            extended_l2: !v2 && b & 8 != 0 && cluster_size >= 16384,
            lazy_refcounts: !v2 && b & 16 != 0,
            refcount_bits: if v2 || order == 7 { 16 } else { 1 << order },
        }
    }

    /// The byte that decodes to this configuration.
    pub fn encode(&self) -> u8 {
        let cluster = CLUSTERS
            .iter()
            .position(|&c| c == self.cluster_size)
            .unwrap_or(0) as u8;
        let order = if self.refcount_bits == 16 {
            7
        } else {
            self.refcount_bits.trailing_zeros() as u8
        };
        cluster
            | u8::from(self.v2) << 2
            | u8::from(self.extended_l2) << 3
            | u8::from(self.lazy_refcounts) << 4
            | order << 5
    }

    fn create_options(&self, size: u64, zstd: bool, backing: Option<&str>) -> CreateOptions {
        CreateOptions {
            size: Some(size),
            cluster_size: self.cluster_size,
            refcount_bits: self.refcount_bits,
            compat: if self.v2 { Compat::V0_10 } else { Compat::V1_1 },
            extended_l2: self.extended_l2,
            lazy_refcounts: self.lazy_refcounts,
            compression_type: if zstd && !self.v2 {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            backing_file: backing.map(str::to_owned),
            backing_format: backing.map(|_| Format::Qcow2),
            open_backing: false,
            ..CreateOptions::default()
        }
    }
}

/// The chain an input starts from: its first six bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsConfig {
    /// Images in the chain, 1 to 3.
    pub depth: usize,
    /// Index into the virtual sizes (0..4).
    pub size_index: usize,
    /// The bottom layer (with depth 2 or 3) is about half as long as the others.
    pub short_bottom: bool,
    /// Images keep at most 4 L2 tables cached.
    pub small_cache: bool,
    /// Merges flush their destination every 64 KiB.
    pub small_checkpoints: bool,
    /// Version 3 images compress with zstd.
    pub zstd: bool,
    /// The images, bottom first (only the first `depth` are used).
    pub layers: [LayerConfig; 3],
    /// What the bottom and the middle layer hold (a bit per eighth of the layer).
    pub fills: [u8; 2],
}

impl OpsConfig {
    fn decode(r: &mut Reader<'_>) -> OpsConfig {
        let b = r.u8();
        let layers = [
            LayerConfig::decode(r.u8()),
            LayerConfig::decode(r.u8()),
            LayerConfig::decode(r.u8()),
        ];
        OpsConfig {
            depth: 1 + usize::from(b & 3) % 3,
            size_index: usize::from(b >> 2 & 3),
            short_bottom: b & 0x10 != 0,
            small_cache: b & 0x20 != 0,
            small_checkpoints: b & 0x40 != 0,
            zstd: b & 0x80 != 0,
            layers,
            fills: [r.u8(), r.u8()],
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(
            (self.depth as u8 - 1)
                | (self.size_index as u8) << 2
                | u8::from(self.short_bottom) << 4
                | u8::from(self.small_cache) << 5
                | u8::from(self.small_checkpoints) << 6
                | u8::from(self.zstd) << 7,
        );
        out.extend(self.layers.iter().map(LayerConfig::encode));
        out.extend(self.fills);
    }
}

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
    fn resolve(&self, size: u64, cluster: u64) -> (u64, u64) {
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

/// Reads bytes, zeros past the end.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn u24(&mut self) -> u32 {
        (0..3).fold(0, |v, _| v << 8 | u32::from(self.u8()))
    }
}

/// What a write with `pattern` puts at guest `offset..offset + len` (pattern 0: zeros).
/// Each sector is filled with a byte of its own and starts with its guest offset, so data
/// in the wrong place shows. Built with fills and copies, not byte by byte: the harness's
/// own loops are instrumented too.
fn pattern_bytes(pattern: u8, offset: u64, len: u64) -> Vec<u8> {
    if pattern == 0 {
        return vec![0; len as usize];
    }
    let first = offset / SECTOR * SECTOR;
    let end = (offset + len).div_ceil(SECTOR) * SECTOR;
    let mut out = vec![0u8; (end - first) as usize];
    let stamp = u64::from(pattern) * 0x0101_0101_0101_0101;
    for (i, sector) in out.chunks_exact_mut(SECTOR as usize).enumerate() {
        let pos = first + i as u64 * SECTOR;
        sector.fill(pattern ^ (pos >> 9) as u8);
        sector[..8].copy_from_slice(&(pos ^ stamp).to_le_bytes());
    }
    out[(offset - first) as usize..][..len as usize].to_vec()
}

/// Replaces the sectors of `view` that `own` says the image does not decide itself with
/// `below` (zeros past its end, or without it).
fn show_below(view: &mut [u8], own: &[bool], below: Option<&[u8]>) {
    let below = below.unwrap_or(&[]);
    let sector = SECTOR as usize;
    for (s, _) in own.iter().enumerate().filter(|(_, own)| !**own) {
        let start = s * sector;
        let end = (start + sector).min(view.len());
        if start >= end {
            break;
        }
        let from = below.len().clamp(start, end);
        if from > start {
            view[start..from].copy_from_slice(&below[start..from]);
        }
        view[from..end].fill(0);
    }
}

/// One image of the chain, as the model sees it.
#[derive(Debug, Clone)]
struct LayerModel {
    name: String,
    config: LayerConfig,
    /// What the chain from this layer down shows (its length is the layer's size).
    view: Vec<u8>,
}

/// One internal snapshot.
#[derive(Debug, Clone)]
struct SnapshotModel {
    name: String,
    /// What the image showed when it was taken.
    bytes: Vec<u8>,
    /// Per sector: the image decided it itself (else its backing chain does).
    own: Vec<bool>,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Making the chain.
    Setup,
    /// Running this operation.
    Op(usize),
    /// Checking everything at the end.
    End,
}

/// What an operation may do when the library refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// It must succeed.
    Succeeds,
    /// It must fail.
    Refused,
    /// It may be refused (and then changes nothing).
    MayBeRefused,
}

struct Run {
    program: OpsProgram,
    fs: Arc<MemOpener>,
    /// The open chain (writable top), `None` only while merging or reopening.
    chain: Option<Chain>,
    /// The chain's images, top first.
    layers: Vec<LayerModel>,
    /// Snapshots by image name, in table order.
    snapshots: HashMap<String, Vec<SnapshotModel>>,
    /// How every image was made, by name.
    configs: HashMap<String, LayerConfig>,
    images: usize,
    next_snapshot: usize,
    /// What is running (for messages).
    step: Step,
    /// Reused for reading views.
    buf: std::cell::RefCell<Vec<u8>>,
    /// The bytes of each image when it last checked clean.
    checked: std::cell::RefCell<HashMap<std::path::PathBuf, Vec<u8>>>,
}

/// Runs one `ops` input: see the module documentation. Panics only on a bug.
pub fn ops(data: &[u8]) {
    let program = OpsProgram::decode(data);
    let mut run = Run::new(program);
    let ops = run.program.ops.clone();
    for (i, op) in ops.iter().enumerate() {
        run.step = Step::Op(i);
        run.op(op);
    }
    run.finish();
}

impl Run {
    fn new(program: OpsProgram) -> Run {
        let mut run = Run {
            program,
            fs: Arc::new(MemOpener::new()),
            chain: None,
            layers: Vec::new(),
            snapshots: HashMap::new(),
            configs: HashMap::new(),
            images: 0,
            next_snapshot: 0,
            step: Step::Setup,
            buf: Default::default(),
            checked: Default::default(),
        };
        let c = run.program.config.clone();
        let size = SIZES[c.size_index];
        for i in 0..c.depth {
            let layer_size = if i == 0 && c.depth > 1 && c.short_bottom {
                (size / 2).div_ceil(SECTOR) * SECTOR + SECTOR
            } else {
                size
            };
            run.new_image(c.layers[i], layer_size);
            if i + 1 < c.depth {
                run.fill(i, c.fills[i]);
            }
        }
        run.check_all_views("setup");
        run
    }

    /// Creates an image (an overlay on the current top, if any) and opens the chain on
    /// it.
    fn new_image(&mut self, config: LayerConfig, size: u64) {
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
        let name = format!("img{}.qcow2", self.images);
        self.images += 1;
        let backing = self.layers.first().map(|l| l.name.clone());
        let options = config.create_options(size, self.program.config.zstd, backing.as_deref());
        let storage = self.fs.create(&name);
        create_on(&*storage, &options).unwrap_or_else(|e| {
            self.fail(format_args!(
                "creating {name} ({options:?}): {}",
                e.report()
            ))
        });
        let mut view = vec![0u8; size as usize];
        if let Some(below) = self.layers.first() {
            let n = below.view.len().min(view.len());
            view[..n].copy_from_slice(&below.view[..n]);
        }
        self.configs.insert(name.clone(), config);
        self.layers.insert(0, LayerModel { name, config, view });
        self.reopen();
    }

    /// Writes the setup pattern of layer `index` (from the bottom) while it is the top.
    fn fill(&mut self, index: usize, bits: u8) {
        let size = self.size();
        for k in 0..8u64 {
            if bits & (1 << k) == 0 {
                continue;
            }
            let off = (k * size / 8 + k * 1357 % 4096).min(size - 1);
            let len = (size / 16 + k * 977 % 8192).min(size - off);
            let pattern = 0x10 * (index as u8 + 1) + k as u8 + 1;
            let data = pattern_bytes(pattern, off, len);
            self.chain()
                .write_at(&data, off)
                .unwrap_or_else(|e| self.fail(format_args!("setup write: {}", e.report())));
            self.layers[0].view[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }

    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("the chain is open")
    }

    fn top(&self) -> &Image {
        self.chain().top().as_qcow2().expect("every image is qcow2")
    }

    fn size(&self) -> u64 {
        self.layers[0].view.len() as u64
    }

    fn fail(&self, what: std::fmt::Arguments<'_>) -> ! {
        let op = match self.step {
            Step::Setup => "setup".into(),
            Step::Op(i) => format!("step {i} {:?}", self.program.ops[i]),
            Step::End => "at the end".into(),
        };
        panic!(
            "{op}: {what}\n  config {:?}\n  chain {:?}",
            self.program.config,
            self.layers.iter().map(|l| &l.name).collect::<Vec<_>>()
        )
    }

    fn chain_options(&self, writable: bool) -> ChainOptions {
        let defaults = ChainOptions::default();
        ChainOptions {
            writable,
            opener: Some(self.fs.clone()),
            l2_cache_bytes: if self.program.config.small_cache {
                0
            } else {
                defaults.l2_cache_bytes
            },
            ..defaults
        }
    }

    /// Options of a merge whose mode byte is `mode`: bit 7 asks for a dry run, bit 6 for
    /// storage copies of plain data ([`ops::StorageCopy::Always`]; through the buffer
    /// copy of in-memory storage here).
    fn merge_options(&self, mode: u8) -> MergeOptions {
        MergeOptions {
            dry_run: mode & 0x80 != 0,
            storage_copy: if mode & 0x40 != 0 {
                ops::StorageCopy::Always
            } else {
                ops::StorageCopy::Never
            },
            chain: self.chain_options(false),
            checkpoint_bytes: if self.program.config.small_checkpoints {
                64 << 10
            } else {
                MergeOptions::default().checkpoint_bytes
            },
        }
    }

    fn close(&self, chain: Chain) {
        chain
            .close()
            .unwrap_or_else(|e| self.fail(format_args!("close: {}", e.report())));
    }

    /// Closes the chain (if open) and opens it again; every image must check clean in
    /// between, and the chain consist of the model's images.
    fn reopen(&mut self) {
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
        self.check_images();
        let top = &self.layers[0].name;
        let chain = Chain::open_with(top, &self.chain_options(true))
            .unwrap_or_else(|e| self.fail(format_args!("opening {top}: {}", e.report())));
        let names: Vec<String> = chain
            .layers()
            .iter()
            .map(|l| l.name().display().to_string())
            .collect();
        let want: Vec<&String> = self.layers.iter().map(|l| &l.name).collect();
        if names.iter().ne(want.iter().copied()) {
            self.fail(format_args!("the chain is {names:?}, the model's {want:?}"));
        }
        if !chain.warnings().is_empty() {
            self.fail(format_args!("warnings opening: {:?}", chain.warnings()));
        }
        self.chain = Some(chain);
    }

    /// What the chain from layer `depth` down shows, `len` bytes, in the reused read
    /// buffer (fresh megabytes for every read cost more than all the rest).
    fn read_view(&self, depth: usize, len: u64) -> std::cell::RefMut<'_, [u8]> {
        let chain = self.chain();
        let mut buf = self.buf.borrow_mut();
        if buf.len() < len as usize {
            // Zeroed by the allocator: no slow resize in debug builds.
            *buf = vec![0; len as usize];
        }
        let mut buf = std::cell::RefMut::map(buf, |b| &mut b[..len as usize]);
        if depth == 0 {
            chain
                .read_at(&mut buf, 0)
                .unwrap_or_else(|e| self.fail(format_args!("reading: {}", e.report())));
            return buf;
        }
        let mut pos = 0;
        while pos < len {
            let run = chain
                .resolve_from(depth, pos, len - pos)
                .unwrap_or_else(|e| {
                    self.fail(format_args!("resolving layer {depth}: {}", e.report()))
                });
            chain
                .read_run(&run, &mut buf[pos as usize..run.end() as usize])
                .unwrap_or_else(|e| {
                    self.fail(format_args!("reading layer {depth}: {}", e.report()))
                });
            pos = run.end();
        }
        buf
    }

    fn compare(&self, what: &str, got: &[u8], want: &[u8]) {
        if got == want {
            return;
        }
        if got.len() != want.len() {
            self.fail(format_args!(
                "{what}: {} bytes, the model has {}",
                got.len(),
                want.len()
            ));
        }
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        let last = got.iter().zip(want).rposition(|(a, b)| a != b).unwrap_or(0);
        self.fail(format_args!(
            "{what} differs from the model at {first:#x}..={last:#x}: reads {:#04x}, the model \
             has {:#04x}",
            got[first], want[first]
        ))
    }

    /// The guest content must be the model's.
    fn check_content(&self, what: &str) {
        let got = self.read_view(0, self.size());
        self.compare(what, &got, &self.layers[0].view);
    }

    /// Every layer's view must be the model's.
    fn check_all_views(&self, what: &str) {
        self.check_content(what);
        let top_size = self.size();
        for (i, layer) in self.layers.iter().enumerate().skip(1) {
            let what = format!("{what}: layer {i} ({})", layer.name);
            if layer.view.len() as u64 <= top_size {
                let got = self.read_view(i, layer.view.len() as u64);
                self.compare(&what, &got, &layer.view);
                continue;
            }
            // Longer than the top: the chain from this layer down reads all of it.
            let chain =
                Chain::open_with(&layer.name, &self.chain_options(false)).unwrap_or_else(|e| {
                    self.fail(format_args!("opening {}: {}", layer.name, e.report()))
                });
            let mut got = vec![0u8; chain.size() as usize];
            chain.read_at(&mut got, 0).unwrap_or_else(|e| {
                self.fail(format_args!("reading {}: {}", layer.name, e.report()))
            });
            self.compare(&what, &got, &layer.view);
        }
    }

    /// The top image's snapshots must be the model's, in order.
    fn check_snapshot_names(&self) {
        let names: Vec<String> = self.top().snapshots().into_iter().map(|s| s.name).collect();
        let want: Vec<&String> = self
            .snapshots
            .get(&self.layers[0].name)
            .map(|v| v.iter().map(|s| &s.name).collect())
            .unwrap_or_default();
        if names.iter().ne(want.iter().copied()) {
            self.fail(format_args!(
                "the top has snapshots {names:?}, the model {want:?}"
            ));
        }
    }

    /// Per sector of layer `depth`: whether that image decides it itself.
    fn own_sectors(&self, depth: usize) -> Vec<bool> {
        let layer = &self.chain().layers()[depth];
        let size = layer.size();
        let mut own = vec![false; size.div_ceil(SECTOR) as usize];
        let mut pos = 0;
        while pos < size {
            let run = layer.lookup(pos, size - pos).unwrap_or_else(|e| {
                self.fail(format_args!("lookup in layer {depth}: {}", e.report()))
            });
            if run.mapping != Mapping::Unallocated {
                own[(run.offset / SECTOR) as usize..run.end().div_ceil(SECTOR) as usize].fill(true);
            }
            pos = run.end();
        }
        own
    }

    /// What a snapshot of layer `depth` shows: its own sectors, the layers below for the
    /// rest.
    fn snapshot_view(&self, snapshot: &SnapshotModel, depth: usize) -> Vec<u8> {
        let below = self.layers.get(depth + 1).map(|l| &l.view[..]);
        let mut out = snapshot.bytes.clone();
        show_below(&mut out, &snapshot.own, below);
        out
    }

    /// Checks a result against what the model expects; returns whether it succeeded.
    fn expect(&self, result: crate::Result<()>, outcome: Outcome, what: &str) -> bool {
        match (result, outcome) {
            (Ok(()), Outcome::Refused) => {
                self.fail(format_args!("{what} succeeded; it must be refused"))
            }
            (Ok(()), _) => true,
            (Err(e), Outcome::Succeeds) => self.fail(format_args!("{what}: {}", e.report())),
            // A refusal says what is wrong with the request, not with the image.
            (Err(e), _)
                if matches!(
                    e.root(),
                    Error::InvalidArgument(_) | Error::Unsupported(_) | Error::BackingLoop { .. }
                ) =>
            {
                false
            }
            (Err(e), _) => self.fail(format_args!("{what}: not a refusal: {}", e.report())),
        }
    }

    fn op(&mut self, op: &ChainOp) {
        let size = self.size();
        let top = self.layers[0].config;
        let cluster = top.cluster_size;
        let has_backing = self.layers.len() > 1;
        match *op {
            ChainOp::Write { range, pattern } => {
                let (off, len) = range.resolve(size, cluster);
                let data = pattern_bytes(pattern, off, len);
                let r = self.chain().write_at(&data, off);
                self.expect(r, Outcome::Succeeds, "write");
                self.layers[0].view[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            ChainOp::WriteZeroes(range) => {
                let (off, len) = range.resolve(size, cluster);
                let unmap = range.flags & 8 != 0;
                let r = self.chain().write_zeroes(off, len, unmap);
                self.expect(r, Outcome::Succeeds, "write_zeroes");
                self.layers[0].view[off as usize..(off + len) as usize].fill(0);
            }
            ChainOp::Discard(range) => {
                let (off, len) = range.resolve(size, cluster);
                let r = self.chain().discard(off, len);
                self.expect(r, Outcome::Succeeds, "discard");
                // Whole clusters, and the partial last one when the range reaches the end;
                // version 2 with a backing file cannot discard at all.
                if !(top.v2 && has_backing) {
                    let end = off + len;
                    let lo = (off.div_ceil(cluster) * cluster).min(size);
                    let hi = if end == size {
                        size
                    } else {
                        end / cluster * cluster
                    };
                    if lo < hi {
                        self.layers[0].view[lo as usize..hi as usize].fill(0);
                    }
                }
            }
            ChainOp::WriteCompressed { offset, pattern } => {
                let off = u64::from(offset) % size / cluster * cluster;
                let len = cluster.min(size - off);
                let mut data = pattern_bytes(pattern, off, len);
                let kind = self.top().compression_type();
                data.resize(cluster as usize, 0);
                let compressed = compress_cluster(kind, &data)
                    .unwrap_or_else(|e| self.fail(format_args!("compressing: {}", e.report())));
                let r = match compressed {
                    Some(c) => self.chain().write_compressed(off, &c),
                    None => self.chain().write_at(&data[..len as usize], off),
                };
                self.expect(r, Outcome::Succeeds, "write_compressed");
                self.layers[0].view[off as usize..(off + len) as usize]
                    .copy_from_slice(&data[..len as usize]);
            }
            ChainOp::Flush => {
                let r = self.chain().flush();
                self.expect(r, Outcome::Succeeds, "flush");
            }
            ChainOp::SnapshotCreate => self.snapshot_create(),
            ChainOp::SnapshotApply(i) => self.snapshot_apply(i),
            ChainOp::SnapshotDelete(i) => self.snapshot_delete(i),
            // These check every layer themselves.
            ChainOp::Commit(mode) => return self.commit(mode),
            ChainOp::Pull(mode) => return self.pull(mode),
            ChainOp::Rebase(mode) => return self.rebase(mode),
            ChainOp::Reopen => {
                self.reopen();
                return self.check_all_views("reopen");
            }
            ChainOp::Overlay(config) => {
                if self.layers.len() >= MAX_LAYERS || self.images >= MAX_IMAGES {
                    return;
                }
                self.new_image(config, size);
                return self.check_all_views("new overlay");
            }
            ChainOp::Resize(arg) => {
                let arg = u64::from(arg);
                let new_size = (arg + 1) * 8192 - arg % 7 * SECTOR;
                let backing_longer = self
                    .layers
                    .get(1)
                    .is_some_and(|b| b.view.len() as u64 > size);
                let has_snapshots = self
                    .snapshots
                    .get(&self.layers[0].name)
                    .is_some_and(|s| !s.is_empty());
                let refused = top.v2 && (has_snapshots || backing_longer && new_size > size);
                let outcome = if new_size == size || !refused {
                    Outcome::Succeeds
                } else {
                    Outcome::Refused
                };
                let r = self.chain().resize(new_size, true);
                if self.expect(r, outcome, &format!("resize to {new_size}")) {
                    self.layers[0].view.resize(new_size as usize, 0);
                }
            }
        }
        self.check_content("after the operation");
    }

    /// Narrow refcounts may not count the references a snapshot adds (1 bit: none at
    /// all; up to 8 bits: a few snapshots, or a host cluster packed with compressed
    /// clusters); 16 bits and more always do here.
    fn snapshot_outcome(&self) -> Outcome {
        if self.layers[0].config.refcount_bits < 16 {
            Outcome::MayBeRefused
        } else {
            Outcome::Succeeds
        }
    }

    fn snapshot_create(&mut self) {
        let image = self.layers[0].name.clone();
        if self.snapshots.get(&image).map_or(0, Vec::len) >= MAX_SNAPSHOTS {
            return;
        }
        let name = format!("s{}", self.next_snapshot);
        self.next_snapshot += 1;
        let own = self.own_sectors(0);
        let r = self.top().snapshot_create(&name).map(drop);
        if self.expect(r, self.snapshot_outcome(), "snapshot create") {
            let bytes = self.layers[0].view.clone();
            self.snapshots
                .entry(image)
                .or_default()
                .push(SnapshotModel { name, bytes, own });
        }
        self.check_snapshot_names();
    }

    fn snapshot_apply(&mut self, index: u8) {
        let Some(list) = self.snapshots.get(&self.layers[0].name) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let snapshot = list[usize::from(index) % list.len()].clone();
        let r = self.top().snapshot_apply(&snapshot.name);
        if self.expect(r, self.snapshot_outcome(), "snapshot apply") {
            self.layers[0].view = self.snapshot_view(&snapshot, 0);
        }
        self.check_snapshot_names();
    }

    fn snapshot_delete(&mut self, index: u8) {
        let image = self.layers[0].name.clone();
        let Some(list) = self.snapshots.get(&image) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let i = usize::from(index) % list.len();
        let name = list[i].name.clone();
        let r = self.top().snapshot_delete(&name);
        if self.expect(r, Outcome::Succeeds, "snapshot delete") {
            self.snapshots.get_mut(&image).expect("listed").remove(i);
        }
        self.check_snapshot_names();
    }

    /// Closes the chain for a merge (merges open the images themselves).
    fn close_for_merge(&mut self) {
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
    }

    fn commit(&mut self, mode: u8) {
        let n = self.layers.len();
        let dry_run = mode & 0x80 != 0;
        let index = usize::from(mode >> 2 & 15) % n;
        let (top, base, keep, options) = match mode & 3 {
            0 | 1 => (0, 1, mode & 3 == 1, CommitOptions::default()),
            2 => (
                0,
                index,
                true,
                CommitOptions {
                    base: Some(self.layers[index].name.clone().into()),
                    ..CommitOptions::default()
                },
            ),
            _ => (
                index,
                index + 1,
                true,
                CommitOptions {
                    top: Some(self.layers[index].name.clone().into()),
                    ..CommitOptions::default()
                },
            ),
        };
        let options = CommitOptions {
            keep,
            merge: self.merge_options(mode),
            ..options
        };
        let mut possible = top < base && base < n;
        if possible && !dry_run {
            // The base grows to the committed range's size first: version 2 refuses with
            // snapshots, or over a longer backing file.
            let dest = &self.layers[base];
            let grows = dest.view.len() < self.layers[top].view.len();
            let has_snapshots = self
                .snapshots
                .get(&dest.name)
                .is_some_and(|s| !s.is_empty());
            let backing_longer = self
                .layers
                .get(base + 1)
                .is_some_and(|b| b.view.len() > dest.view.len());
            possible = !(dest.config.v2 && grows && (has_snapshots || backing_longer));
        }
        self.close_for_merge();
        let r = ops::commit(&self.layers[0].name, &options, &mut |_, _| true).map(drop);
        let outcome = if possible {
            Outcome::Succeeds
        } else {
            Outcome::Refused
        };
        let committed = self.expect(r, outcome, &format!("commit {options:?}")) && !dry_run;
        if committed {
            let source = self.layers[top].view.clone();
            let dest = &mut self.layers[base].view;
            if dest.len() < source.len() {
                dest.resize(source.len(), 0);
            }
            dest[..source.len()].copy_from_slice(&source);
            if top > 0 {
                // The images above saw zeros past the end of the committed range's top;
                // re-pointed at the base, they still do.
                let reach = self.layers[..top]
                    .iter()
                    .map(|l| l.view.len())
                    .max()
                    .unwrap_or(0);
                let dest = &mut self.layers[base].view;
                let end = reach.min(dest.len());
                if end > source.len() {
                    dest[source.len()..end].fill(0);
                }
                // The image above the committed range now points at the base.
                self.layers.drain(top..base);
            }
        }
        self.reopen();
        if committed && top == 0 {
            self.rebase_views(base);
        }
        self.check_all_views("commit");
    }

    /// After a commit from the top into layer `base`: the layers between show their own
    /// data over the new content of the base.
    fn rebase_views(&mut self, base: usize) {
        for i in (1..base).rev() {
            let own = self.own_sectors(i);
            let (upper, lower) = self.layers.split_at_mut(i + 1);
            show_below(&mut upper[i].view, &own, Some(&lower[0].view));
        }
    }

    fn pull(&mut self, mode: u8) {
        let n = self.layers.len();
        let dry_run = mode & 0x80 != 0;
        let choice = usize::from(mode & 0x7f) % (n + 1);
        let base = (choice < n).then_some(choice);
        let base_name = base.map(|b| self.layers[b].name.clone());
        self.close_for_merge();
        let r = ops::pull(
            &self.layers[0].name,
            base_name.as_deref().map(AsRef::as_ref),
            &self.merge_options(mode),
            &mut |_, _| true,
        )
        .map(drop);
        let outcome = if base == Some(0) {
            Outcome::Refused
        } else {
            Outcome::Succeeds
        };
        if self.expect(r, outcome, &format!("pull to {base_name:?}")) && !dry_run {
            self.layers.drain(1..base.unwrap_or(n));
        }
        self.reopen();
        self.check_all_views("pull");
    }

    fn rebase(&mut self, mode: u8) {
        let n = self.layers.len();
        let index = usize::from(mode >> 2 & 15);
        let dry_run = mode & 0x80 != 0;
        let unsafe_ = mode & 3 == 3;
        // The new backing chain, top first: its images, or `None` for foreign ones whose
        // views the model does not know.
        let (target, outcome): (Option<String>, Outcome) = match mode & 3 {
            0 => {
                let b = index % n;
                let outcome = if b == 0 {
                    Outcome::Refused
                } else {
                    Outcome::Succeeds
                };
                (Some(self.layers[b].name.clone()), outcome)
            }
            1 => (None, Outcome::Succeeds),
            2 => {
                let foreign: Vec<String> = self
                    .fs
                    .files()
                    .into_iter()
                    .map(|(p, _)| p.file_name().expect("named").to_string_lossy().into_owned())
                    .filter(|name| self.layers.iter().all(|l| &l.name != name))
                    .collect();
                if foreign.is_empty() {
                    return;
                }
                let target = foreign[index % foreign.len()].clone();
                // A chain through the top would loop.
                let outcome = if self.foreign_names(&target).contains(&self.layers[0].name) {
                    Outcome::Refused
                } else {
                    Outcome::Succeeds
                };
                (Some(target), outcome)
            }
            _ if n > 1 => (
                Some(self.layers[1 + index % (n - 1)].name.clone()),
                Outcome::Succeeds,
            ),
            _ => (None, Outcome::Succeeds),
        };
        // What the top decides itself: after an unsafe rebase the rest shows the new chain.
        let own = unsafe_.then(|| self.own_sectors(0));
        self.close_for_merge();
        let r = ops::rebase(
            &self.layers[0].name,
            target.as_deref(),
            target.as_ref().map(|_| "qcow2"),
            unsafe_,
            &self.merge_options(mode),
            &mut |_, _| true,
        )
        .map(drop);
        let what = format!("rebase onto {target:?} (unsafe: {unsafe_})");
        if self.expect(r, outcome, &what) && !dry_run {
            let below = match &target {
                None => Vec::new(),
                Some(t) => match self.layers.iter().position(|l| &l.name == t) {
                    Some(b) => self.layers.split_off(b),
                    None => self.foreign_chain(t),
                },
            };
            self.layers.truncate(1);
            self.layers.extend(below);
            if let Some(own) = own {
                let below = self.layers.get(1).map(|l| l.view.clone());
                show_below(&mut self.layers[0].view, &own, below.as_deref());
            }
        }
        self.reopen();
        self.check_all_views("rebase");
    }

    /// The images of the chain of `name`, top first.
    fn foreign_names(&self, name: &str) -> Vec<String> {
        let chain = Chain::open_with(name, &self.chain_options(false))
            .unwrap_or_else(|e| self.fail(format_args!("opening {name}: {}", e.report())));
        chain
            .layers()
            .iter()
            .map(|l| l.name().display().to_string())
            .collect()
    }

    /// The models of the image `name` (not in the chain) and its backing chain, from what
    /// the library reads: nothing else knows them.
    fn foreign_chain(&self, name: &str) -> Vec<LayerModel> {
        self.foreign_names(name)
            .into_iter()
            .map(|name| {
                let below = Chain::open_with(&name, &self.chain_options(false))
                    .unwrap_or_else(|e| self.fail(format_args!("opening {name}: {}", e.report())));
                let mut view = vec![0u8; below.size() as usize];
                below
                    .read_at(&mut view, 0)
                    .unwrap_or_else(|e| self.fail(format_args!("reading {name}: {}", e.report())));
                LayerModel {
                    config: self.configs[&name],
                    name,
                    view,
                }
            })
            .collect()
    }

    /// Closes everything; every image must check clean and every snapshot of the chain's
    /// images read as the model says.
    fn finish(mut self) {
        self.step = Step::End;
        self.check_all_views("at the end");
        if let Some(chain) = self.chain.take() {
            self.close(chain);
        }
        for depth in 0..self.layers.len() {
            let name = self.layers[depth].name.clone();
            let snapshots = self.snapshots.get(&name).cloned().unwrap_or_default();
            for snapshot in &snapshots {
                self.check_snapshot(depth, snapshot);
            }
        }
        self.check_images();
    }

    /// Every image (all closed) must check clean. Images whose bytes did not change since
    /// they last did are skipped (checking costs more than the rest in a debug build).
    fn check_images(&self) {
        for (path, storage) in self.fs.files() {
            let bytes = storage.to_bytes();
            if self.checked.borrow().get(&path) == Some(&bytes) {
                continue;
            }
            let image =
                Image::from_storage(Box::new(storage), &path, &ImageOptions::default(), None)
                    .unwrap_or_else(|e| {
                        self.fail(format_args!("opening {}: {}", path.display(), e.report()))
                    });
            let report = image.check().unwrap_or_else(|e| {
                self.fail(format_args!("checking {}: {}", path.display(), e.report()))
            });
            if !report.is_clean() {
                let shown: Vec<_> = report.findings.iter().take(8).collect();
                self.fail(format_args!(
                    "{} does not check clean ({} corruptions, {} leaks): {shown:?}",
                    path.display(),
                    report.corruptions,
                    report.leaks,
                ));
            }
            if image.is_dirty() {
                self.fail(format_args!("{} is still dirty", path.display()));
            }
            self.checked.borrow_mut().insert(path, bytes);
        }
    }

    /// Applies `snapshot` of layer `depth` to a copy of that image; the copy must show the
    /// snapshot's model.
    fn check_snapshot(&self, depth: usize, snapshot: &SnapshotModel) {
        const PROBE: &str = "probe.qcow2";
        let original = self
            .fs
            .get(&self.layers[depth].name)
            .expect("the image exists");
        self.fs
            .insert(PROBE, Arc::new(MemStorage::from_bytes(original.to_bytes())));
        let chain = Chain::open_with(PROBE, &self.chain_options(true))
            .unwrap_or_else(|e| self.fail(format_args!("opening a copy: {}", e.report())));
        let image = chain.top().as_qcow2().expect("qcow2");
        let r = image.snapshot_apply(&snapshot.name);
        let outcome = if self.layers[depth].config.refcount_bits < 16 {
            Outcome::MayBeRefused
        } else {
            Outcome::Succeeds
        };
        let what = format!("applying {} to a copy of layer {depth}", snapshot.name);
        if !self.expect(r, outcome, &what) {
            drop(chain);
            self.fs.remove(PROBE);
            return;
        }
        let mut got = vec![0u8; chain.size() as usize];
        chain
            .read_at(&mut got, 0)
            .unwrap_or_else(|e| self.fail(format_args!("reading a copy: {}", e.report())));
        drop(chain);
        self.fs.remove(PROBE);
        self.compare(
            &format!("snapshot {} of layer {depth}", snapshot.name),
            &got,
            &self.snapshot_view(snapshot, depth),
        );
    }
}
