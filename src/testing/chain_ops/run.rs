//! The harness entry point, [`ops`], and the state of one run: the chain, its model, and
//! the helpers every operation and check uses (opening, closing, failing, judging a
//! result).

use std::collections::HashMap;
use std::sync::Arc;

use crate::chain::{Chain, ChainOptions};
use crate::create::create_on;
use crate::error::Error;
use crate::ops::{self, MergeOptions};
use crate::qcow2::Image;
use crate::storage::MemOpener;

use super::config::{LayerConfig, SECTOR, SIZES};
use super::model::{LayerModel, SnapshotModel, pattern_bytes};
use super::program::OpsProgram;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Making the chain.
    Setup,
    /// Running this operation.
    Op(usize),
    /// Checking everything at the end.
    End,
}

/// What an operation may do when the library refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It must succeed.
    Succeeds,
    /// It must fail.
    Refused,
    /// It may be refused (and then changes nothing).
    MayBeRefused,
}

pub(super) struct Run {
    pub(super) program: OpsProgram,
    pub(super) fs: Arc<MemOpener>,
    /// The open chain (writable top), `None` only while merging or reopening.
    pub(super) chain: Option<Chain>,
    /// The chain's images, top first.
    pub(super) layers: Vec<LayerModel>,
    /// Snapshots by image name, in table order.
    pub(super) snapshots: HashMap<String, Vec<SnapshotModel>>,
    /// How every image was made, by name.
    pub(super) configs: HashMap<String, LayerConfig>,
    pub(super) images: usize,
    pub(super) next_snapshot: usize,
    /// What is running (for messages).
    pub(super) step: Step,
    /// Reused for reading views.
    pub(super) buf: std::cell::RefCell<Vec<u8>>,
    /// The bytes of each image when it last checked clean.
    pub(super) checked: std::cell::RefCell<HashMap<std::path::PathBuf, Vec<u8>>>,
}

/// Runs one `ops` input: the program (see `program`) checked against the model (see
/// `model`). Panics only on a bug.
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
    pub(super) fn new_image(&mut self, config: LayerConfig, size: u64) {
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

    pub(super) fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("the chain is open")
    }

    pub(super) fn top(&self) -> &Image {
        self.chain().top().as_qcow2().expect("every image is qcow2")
    }

    pub(super) fn size(&self) -> u64 {
        self.layers[0].view.len() as u64
    }

    pub(super) fn fail(&self, what: std::fmt::Arguments<'_>) -> ! {
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

    pub(super) fn chain_options(&self, writable: bool) -> ChainOptions {
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
    pub(super) fn merge_options(&self, mode: u8) -> MergeOptions {
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
            new_backing_locking: None,
            compress: false,
        }
    }

    pub(super) fn close(&self, chain: Chain) {
        chain
            .close()
            .unwrap_or_else(|e| self.fail(format_args!("close: {}", e.report())));
    }

    /// Closes the chain (if open) and opens it again; every image must check clean in
    /// between, and the chain consist of the model's images.
    pub(super) fn reopen(&mut self) {
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

    /// Checks a result against what the model expects; returns whether it succeeded.
    pub(super) fn expect(&self, result: crate::Result<()>, outcome: Outcome, what: &str) -> bool {
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
}
