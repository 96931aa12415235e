//! Opening a chain: each image's backing file in turn, refusing loops, names QEMU would
//! hand to a protocol driver and chains deeper than a limit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::layers::{ForeignImage, Format, Layer, Opened};
use crate::names::{backing_path_name, resolve_relative};
use crate::qcow2::ImageOptions;
use crate::storage::{FileInfo, Opener, canonicalize_with, stat_with};

use super::ChainOptions;

/// An image with its backing chain, top first.
pub struct Chain {
    pub(super) layers: Vec<Layer>,
    pub(super) warnings: Vec<String>,
    /// What the chain was opened through ([`ChainOptions::opener`]): names are looked up
    /// through it ([`Chain::stat`]).
    pub(super) opener: Option<Arc<dyn Opener>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("layers", &self.layers)
            .field("warnings", &self.warnings)
            .field("opener", &self.opener.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl Chain {
    /// Opens the image at `path` and its whole backing chain, read-only. The top image's
    /// format is probed as qemu-img probes it ([`Format::probe`]): a file of no format
    /// qemu-img knows opens as raw (use [`ChainOptions::qcow2`] to refuse that), one of a
    /// format other than qcow2 and raw is refused.
    pub fn open(path: impl AsRef<Path>) -> Result<Chain> {
        Chain::open_with(path, &ChainOptions::default())
    }

    /// Opens the image at `path` for writing, with its backing chain read-only; fails if
    /// the image cannot be written (a read-only file, an image marked corrupt).
    pub fn open_writable(path: impl AsRef<Path>) -> Result<Chain> {
        let chain = Chain::open_with(path, &ChainOptions::default().writable(true))?;
        chain.ensure_writable()?;
        Ok(chain)
    }

    /// Opens the image at `path` and its backing chain with `options`. An image of a
    /// format this crate does not open, the top image or a backing file, given or probed,
    /// is refused by name ([`Error::FormatNotSupported`]).
    pub fn open_with(path: impl AsRef<Path>, options: &ChainOptions) -> Result<Chain> {
        let (chain, _) = open_layers(path.as_ref(), options, ForeignImages::Refuse)?;
        Ok(chain.expect("a chain without foreign images has a layer"))
    }

    /// As [`Chain::open_with`], but a file of a format this crate does not open ends the
    /// chain, described, instead of failing: what `qemu-img info` shows. The chain is
    /// `None` when the image itself is of such a format.
    pub(crate) fn open_until_foreign(
        path: &Path,
        options: &ChainOptions,
    ) -> Result<(Option<Chain>, Option<ForeignImage>)> {
        open_layers(path, options, ForeignImages::EndTheChain)
    }

    /// A chain of already open layers, top first. Fails when `layers` is empty.
    pub fn from_layers(layers: Vec<Layer>) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::InvalidArgument(
                "a chain needs at least one layer".into(),
            ));
        }
        Ok(Chain {
            layers,
            warnings: Vec::new(),
            opener: None,
        })
    }

    /// Looks up the file at `path` through the opener the chain was opened with (the host
    /// file system for chains opened without one, or made by [`Chain::from_layers`]).
    pub fn stat(&self, path: impl AsRef<Path>) -> std::io::Result<FileInfo> {
        stat_with(self.opener.as_deref(), path.as_ref())
    }

    /// The canonical name of `path` through the chain's opener (see [`Chain::stat`]).
    pub fn canonicalize(&self, path: impl AsRef<Path>) -> std::io::Result<PathBuf> {
        canonicalize_with(self.opener.as_deref(), path.as_ref())
    }

    /// Things the caller should tell the user about (e.g. a corrupt image opened
    /// read-only).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The top layer.
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The top image's virtual size.
    pub fn size(&self) -> u64 {
        self.top().size()
    }
}

/// What opening a chain does with a file of a format this crate does not open.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ForeignImages {
    /// Fail, naming the file.
    Refuse,
    /// Stop there and describe it.
    EndTheChain,
}

/// Opens the chain at `path` (see [`Chain::open_with`]); `foreign` says what a file of a
/// format this crate does not open does. `None` for the chain only when the top image is
/// such a file.
fn open_layers(
    path: &Path,
    options: &ChainOptions,
    foreign: ForeignImages,
) -> Result<(Option<Chain>, Option<ForeignImage>)> {
    let opener = options.opener.as_deref();
    let mut seen = HashSet::new();
    let mut warnings = Vec::new();
    let mut layers: Vec<Layer> = Vec::new();
    let mut foreign_image = None;
    let mut next = Some((path.to_path_buf(), options.format));
    while let Some((layer_path, format)) = next.take() {
        if layers.len() >= options.max_depth.max(1) {
            return Err(Error::ChainTooDeep {
                limit: options.max_depth,
            }
            .in_file(path));
        }
        let info = stat_with(opener, &layer_path).map_err(|e| match layers.last() {
            // Name the image that refers to the missing backing file, as qemu-img does.
            Some(overlay) => Error::BackingFile {
                path: layer_path.clone(),
                source: e,
            }
            .in_file(overlay.name()),
            None => Error::io("opening", e).in_file(&layer_path),
        })?;
        if !seen.insert(info.id) {
            return Err(Error::BackingLoop { path: layer_path }.in_file(path));
        }
        if let Some(overlay) = layers.last() {
            options
                .backing_policy
                .check(&layer_path, &info, opener)
                .map_err(|e| e.in_file(overlay.name()))?;
        }
        let image_options = options.image_options(layers.is_empty());
        let opened = match Layer::open_or_describe(&layer_path, format, &image_options) {
            Err(e) if image_options.writable && is_marked_corrupt(&e) => {
                warnings.push(format!(
                    "{}: image is marked corrupt: opened read-only",
                    layer_path.display()
                ));
                let read_only = ImageOptions {
                    writable: false,
                    ..image_options
                };
                Layer::open_or_describe(&layer_path, format, &read_only)?
            }
            other => other?,
        };
        let layer = match opened {
            Opened::Layer(layer) => layer,
            Opened::Foreign(image) if foreign == ForeignImages::EndTheChain => {
                foreign_image = Some(image);
                break;
            }
            Opened::Foreign(image) => {
                return Err(image.format.not_supported().in_file(&layer_path));
            }
        };
        options
            .backing_policy
            .check_data_file(&layer, opener)
            .map_err(|e| e.in_file(layer.name()))?;
        if !options.no_backing {
            if let Some((name, fmt)) = layer.backing() {
                let overlay = layer.name();
                let name = backing_path_name(&name).map_err(|e| e.in_file(overlay))?;
                let fmt = fmt
                    .map(|f| Format::from_name(&f))
                    .transpose()
                    .map_err(|e| e.in_file(overlay))?;
                next = Some((resolve_relative(overlay, name), fmt));
            }
        }
        layers.push(layer);
    }
    share_backing_l2_caches(&layers, options.l2_cache_bytes);
    let chain = (!layers.is_empty()).then(|| Chain {
        layers,
        warnings,
        opener: options.opener.clone(),
    });
    Ok((chain, foreign_image))
}

/// What the L2 caches of a chain's backing layers may hold together, when each one's own
/// budget would add up to more: a walk in guest order needs a table or two per layer, and
/// the 500 layers of a deep chain each keeping what they had read held 64 MiB.
const BACKING_L2_CACHE_BYTES: u64 = 16 << 20;

/// Shares [`BACKING_L2_CACHE_BYTES`] among the backing layers (read-only: the top keeps
/// its own cache) when their budgets of `per_layer` bytes each add up to more.
fn share_backing_l2_caches(layers: &[Layer], per_layer: u64) {
    let backing = layers.len().saturating_sub(1) as u64;
    if backing == 0 || backing.saturating_mul(per_layer) <= BACKING_L2_CACHE_BYTES {
        return;
    }
    for layer in &layers[1..] {
        if let Layer::Qcow2(image) = layer {
            image.limit_l2_cache(BACKING_L2_CACHE_BYTES / backing);
        }
    }
}

fn is_marked_corrupt(e: &Error) -> bool {
    matches!(e.root(), Error::MarkedCorrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, create_on};
    use crate::storage::MemOpener;

    /// A chain of `depth` empty 1 GiB images (64 KiB clusters) in memory, opened with
    /// `l2_cache_bytes` per layer.
    fn chain(depth: usize, l2_cache_bytes: u64) -> Chain {
        let opener = Arc::new(MemOpener::new());
        for i in 0..depth {
            let mut options = CreateOptions::qcow2(1 << 30);
            if i > 0 {
                options.backing_file = Some(format!("/l{}.qcow2", i - 1));
                options.backing_format = Some(Format::Qcow2);
                options.open_backing = false;
            }
            create_on(&*opener.create(format!("/l{i}.qcow2")), &options).unwrap();
        }
        Chain::open_with(
            Path::new(&format!("/l{}.qcow2", depth - 1)),
            &ChainOptions {
                opener: Some(opener),
                l2_cache_bytes,
                ..ChainOptions::default()
            },
        )
        .unwrap()
    }

    fn capacities(chain: &Chain) -> Vec<usize> {
        chain
            .layers()
            .iter()
            .map(|l| match l {
                Layer::Qcow2(image) => image.l2_cache.capacity(),
                Layer::Raw(_) => 0,
            })
            .collect()
    }

    #[test]
    fn deep_chains_share_one_budget_among_their_backing_layers() {
        // Four backing layers of 4 MiB each fit the budget: untouched.
        assert_eq!(capacities(&chain(5, 4 << 20)), [64; 5]);
        // Nine share 16 MiB: 28 tables of 64 KiB each; the top keeps its own 64.
        let mut want = vec![28; 10];
        want[0] = 64;
        assert_eq!(capacities(&chain(10, 4 << 20)), want);
        // However deep, a layer keeps one table.
        assert!(
            capacities(&chain(300, 4 << 20))[1..]
                .iter()
                .all(|&c| c == 1)
        );
    }
}
