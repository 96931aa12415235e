//! A backing chain: an image and the images under it, top first.
//!
//! Opening follows each image's backing file name (relative names against the overlay's
//! directory, as QEMU does), probes formats the header does not name, and refuses loops,
//! protocol and `json:` names and chains deeper than a limit.

mod write;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::qcow2::{Image, ImageOptions, Mapping, Run};
use crate::storage::{Extent, FileInfo, Opener, Storage, canonicalize_with, stat_with};

/// Image formats a layer can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw disk image: guest offset = file offset.
    Raw,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parses a format name (`qcow2` or `raw`).
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::UnsupportedFormat(other.to_owned())),
        }
    }

    /// Guesses the format of a file from its first bytes, as qemu-img does for qcow2/raw.
    pub fn probe(storage: &dyn Storage) -> Result<Format> {
        let len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e))?;
        if len < 4 {
            return Ok(Format::Raw);
        }
        let mut magic = [0u8; 4];
        storage
            .read_at(&mut magic, 0)
            .map_err(|e| Error::io("reading magic", e))?;
        Ok(if u32::from_be_bytes(magic) == crate::format::QCOW2_MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}

/// A raw image layer.
pub struct RawImage {
    name: PathBuf,
    storage: Box<dyn Storage>,
    /// The file's length rounded up to 512 bytes.
    size: u64,
    /// The file's length.
    file_len: u64,
}

impl std::fmt::Debug for RawImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RawImage {
    /// Wraps a storage as a raw image. Its size is the storage's length rounded up to
    /// whole 512-byte sectors, as QEMU counts it; the bytes past the end read as zeros.
    pub fn from_storage(storage: Box<dyn Storage>, name: impl Into<PathBuf>) -> Result<RawImage> {
        let name = name.into();
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading file length", e).in_file(&name))?;
        Ok(RawImage {
            name,
            storage,
            size: file_len.div_ceil(512) * 512,
            file_len,
        })
    }

    /// The name given at open.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Size in bytes: the file's length rounded up to 512 bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes the file occupies on disk, when known.
    pub fn allocated_size(&self) -> Option<u64> {
        self.storage.allocated_size()
    }

    /// Whether `offset..offset + max_len` starts with data or a hole in the file, and for
    /// how many bytes (see [`Storage::extent`]). `offset` must be below the size.
    pub fn extent(&self, offset: u64, max_len: u64) -> Result<Extent> {
        self.storage.extent(offset, max_len).map_err(|e| {
            Error::io(format!("querying extent at {offset:#x}"), e).in_file(&self.name)
        })
    }
}

/// One layer of a chain.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a chain holds few layers; boxing buys nothing
pub enum Layer {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw image (only ever the bottom layer).
    Raw(RawImage),
}

impl Layer {
    /// Opens the file at `path` as `format`, or probes the format when `None`.
    pub fn open(
        path: impl AsRef<Path>,
        format: Option<Format>,
        options: &ImageOptions,
    ) -> Result<Layer> {
        let path = path.as_ref();
        let storage = options
            .open_storage(path, options.writable)
            .map_err(|e| Error::io("opening", e).in_file(path))?;
        let format = match format {
            Some(f) => f,
            None => Format::probe(&*storage).map_err(|e| e.in_file(path))?,
        };
        Ok(match format {
            Format::Qcow2 => {
                drop(storage);
                Layer::Qcow2(Image::open_with(path, options)?)
            }
            Format::Raw => Layer::Raw(RawImage::from_storage(storage, path)?),
        })
    }

    /// The layer's format.
    pub fn format(&self) -> Format {
        match self {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }

    /// The name given at open.
    pub fn name(&self) -> &Path {
        match self {
            Layer::Qcow2(i) => i.name(),
            Layer::Raw(r) => r.name(),
        }
    }

    /// Where the layer's guest data lives: host offsets of its data runs point here.
    pub(crate) fn data_storage(&self) -> &dyn crate::storage::Storage {
        match self {
            Layer::Qcow2(i) => i.data_storage(),
            Layer::Raw(r) => &*r.storage,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.size(),
            Layer::Raw(r) => r.size,
        }
    }

    /// The file holding the layer's guest data: its external data file (named relative to
    /// the image's directory) or the layer's own file.
    pub fn data_path(&self) -> PathBuf {
        match self {
            Layer::Qcow2(i) => match i.data_file_name() {
                Some(name) => resolve_relative(i.name(), &name),
                None => i.name().to_path_buf(),
            },
            Layer::Raw(r) => r.name.clone(),
        }
    }

    /// The qcow2 image, if this layer is one.
    pub fn as_qcow2(&self) -> Option<&Image> {
        match self {
            Layer::Qcow2(i) => Some(i),
            Layer::Raw(_) => None,
        }
    }

    /// The layer's backing file name and format, as stored.
    pub fn backing(&self) -> Option<(String, Option<String>)> {
        match self {
            Layer::Qcow2(i) => i.backing_file().map(|b| (b, i.backing_format())),
            Layer::Raw(_) => None,
        }
    }

    /// What `offset..offset + max_len` is in this layer alone (see [`Image::lookup`]).
    pub fn lookup(&self, offset: u64, max_len: u64) -> Result<Run> {
        match self {
            Layer::Qcow2(i) => i.lookup(offset, max_len),
            Layer::Raw(r) => {
                if offset >= r.size || max_len == 0 {
                    return Err(Error::OutOfRange {
                        offset,
                        len: max_len,
                        size: r.size,
                    }
                    .in_file(&r.name));
                }
                let end = offset.saturating_add(max_len).min(r.size);
                Ok(if offset < r.file_len {
                    Run {
                        offset,
                        len: end.min(r.file_len) - offset,
                        mapping: Mapping::Data {
                            host: offset,
                            copied: false,
                        },
                    }
                } else {
                    // The partial sector past the end of the file reads as zeros.
                    Run {
                        offset,
                        len: end - offset,
                        mapping: Mapping::Zero { host: Some(offset) },
                    }
                })
            }
        }
    }

    /// Fills `buf` with the first `buf.len()` bytes of `run` (unallocated reads as zeros).
    /// A buffer longer than the run is refused.
    pub fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        match self {
            Layer::Qcow2(i) => i.read_run(run, buf),
            Layer::Raw(r) => match run.mapping {
                _ if buf.len() as u64 > run.len => {
                    crate::qcow2::check_run_buffer(run, buf.len()).map_err(|e| e.in_file(&r.name))
                }
                Mapping::Data { host, .. } => r
                    .storage
                    .read_at(buf, host)
                    .map_err(|e| Error::io(format!("reading at {host:#x}"), e).in_file(&r.name)),
                _ => {
                    buf.fill(0);
                    Ok(())
                }
            },
        }
    }
}

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// The top image's format; probed when `None`.
    pub format: Option<Format>,
    /// Deepest chain accepted, counting the top image (default 1024).
    pub max_depth: usize,
    /// Options for each qcow2 layer.
    pub image: ImageOptions,
    /// Open only the top image, ignoring its backing file.
    pub no_backing: bool,
    /// Open the top image for writing (backing files stay read-only). An image marked
    /// corrupt opens read-only instead, with a warning in [`Chain::warnings`].
    pub writable: bool,
    /// Which backing files and external data files an image may name (by default: any,
    /// as qemu-img).
    pub backing_policy: BackingPolicy,
}

/// Limits on the files that images name — backing files and external data files — for
/// images that are not trusted (loops and the depth limit apply always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Every backing file and external data file must lie inside this directory once
    /// symbolic links and `..` are resolved.
    pub confine_to: Option<PathBuf>,
    /// Refuse backing files and external data files that are not regular files (block
    /// and character devices, FIFOs, sockets).
    pub regular_files_only: bool,
}

impl BackingPolicy {
    /// Why the policy refuses the file at `path` (already known to exist, as `info`), if
    /// it does, resolving names through `opener` (the host file system without one).
    fn refusal(
        &self,
        path: &Path,
        info: &FileInfo,
        opener: Option<&dyn Opener>,
    ) -> Result<Option<&'static str>> {
        if self.regular_files_only && !info.regular {
            return Ok(Some("not a regular file"));
        }
        if let Some(dir) = &self.confine_to {
            let real = canonicalize_with(opener, path)
                .map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
            let dir = canonicalize_with(opener, dir)
                .map_err(|e| Error::io(format!("resolving {}", dir.display()), e))?;
            if !real.starts_with(&dir) {
                return Ok(Some("outside the directory backing files are confined to"));
            }
        }
        Ok(None)
    }

    /// Checks a backing file (already known to exist, as `info`) against the policy.
    fn check(&self, path: &Path, info: &FileInfo, opener: Option<&dyn Opener>) -> Result<()> {
        match self.refusal(path, info, opener)? {
            Some(reason) => Err(Error::BackingRefused {
                path: path.to_path_buf(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Checks the external data file of `layer`, if it has one (it is open, but nothing
    /// has been read from it yet).
    fn check_data_file(&self, layer: &Layer, opener: Option<&dyn Opener>) -> Result<()> {
        if *self == BackingPolicy::default()
            || !layer.as_qcow2().is_some_and(Image::has_external_data_file)
        {
            return Ok(());
        }
        let path = layer.data_path();
        let info = stat_with(opener, &path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match self.refusal(&path, &info, opener)? {
            Some(reason) => Err(Error::DataFileRefused { path, reason }),
            None => Ok(()),
        }
    }
}

impl Default for ChainOptions {
    fn default() -> ChainOptions {
        ChainOptions {
            format: None,
            max_depth: 1024,
            image: ImageOptions {
                l2_cache_bytes: 4 << 20,
                ..ImageOptions::default()
            },
            no_backing: false,
            writable: false,
            backing_policy: BackingPolicy::default(),
        }
    }
}

/// A range of the top image resolved through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRun {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Index of the layer that decides the content (0 = top).
    pub depth: usize,
    /// The mapping in that layer. `Unallocated` means no layer allocates the range (or it
    /// lies past the end of a shorter backing file): it reads as zeros.
    pub mapping: Mapping,
}

impl ChainRun {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Whether the range reads as zeros without reading data.
    pub fn reads_as_zero(&self) -> bool {
        self.mapping.is_zero_or_unallocated()
    }
}

/// An image with its backing chain, top first.
pub struct Chain {
    layers: Vec<Layer>,
    warnings: Vec<String>,
    /// What the chain was opened through ([`ImageOptions::opener`]): names are looked up
    /// through it ([`Chain::stat`]).
    opener: Option<Arc<dyn Opener>>,
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

/// Joins a relative `name` stored in `overlay` to the overlay's directory, as QEMU does.
pub fn resolve_relative(overlay: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

/// Protocols QEMU would hand a `proto:...` backing name to.
const PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+unix",
    "nbd+tcp",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "iser",
    "rbd",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "gluster+rdma",
    "nfs",
    "vvfat",
    "blkdebug",
    "blkverify",
    "null-co",
    "null-aio",
    "host_device",
    "host_cdrom",
    "quorum",
    "throttle",
];

/// Checks a backing file name and strips a `file:` prefix.
fn backing_path_name(name: &str) -> Result<&str> {
    let refuse = |reason| Error::UnsupportedBackingName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    if name.starts_with("json:") {
        return Err(refuse("json: pseudo-protocol names are not supported"));
    }
    if let Some(rest) = name.strip_prefix("file:") {
        return Ok(rest);
    }
    if let Some((prefix, _)) = name.split_once(':') {
        if !prefix.contains('/') && PROTOCOLS.contains(&prefix) {
            return Err(refuse(
                "network and protocol backing files are not supported",
            ));
        }
    }
    Ok(name)
}

impl Chain {
    /// Opens the image at `path` and its whole backing chain.
    pub fn open(path: impl AsRef<Path>) -> Result<Chain> {
        Chain::open_with(path, &ChainOptions::default())
    }

    /// Opens the image at `path` and its backing chain with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: &ChainOptions) -> Result<Chain> {
        let path = path.as_ref();
        let opener = options.image.opener.as_deref();
        let mut seen = HashSet::new();
        let mut warnings = Vec::new();
        let mut layers: Vec<Layer> = Vec::new();
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
            let image_options = ImageOptions {
                writable: options.writable && layers.is_empty(),
                ..options.image.clone()
            };
            let layer = match Layer::open(&layer_path, format, &image_options) {
                Err(e) if image_options.writable && is_marked_corrupt(&e) => {
                    warnings.push(format!(
                        "{}: image is marked corrupt: opened read-only",
                        layer_path.display()
                    ));
                    let read_only = ImageOptions {
                        writable: false,
                        ..image_options
                    };
                    Layer::open(&layer_path, format, &read_only)?
                }
                other => other?,
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
        Ok(Chain {
            layers,
            warnings,
            opener: options.image.opener.clone(),
        })
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

    /// What `offset..offset + max_len` of the top image reads, resolved through the chain:
    /// the first run, whose length is the longest stretch decided by one layer with one
    /// mapping. `offset` must be below [`Chain::size`].
    pub fn resolve(&self, offset: u64, max_len: u64) -> Result<ChainRun> {
        self.resolve_from(0, offset, max_len)
    }

    /// [`Chain::resolve`] as if the chain started at layer `first` (its backing chain
    /// seen from the layer above), but bounded by the top image's size.
    pub fn resolve_from(&self, first: usize, offset: u64, max_len: u64) -> Result<ChainRun> {
        let size = self.size();
        if offset >= size || max_len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size,
            });
        }
        let mut len = max_len.min(size - offset);
        for (depth, layer) in self.layers.iter().enumerate().skip(first) {
            if offset >= layer.size() {
                // Past the end of a shorter backing file: zeros.
                return Ok(ChainRun {
                    offset,
                    len,
                    depth,
                    mapping: Mapping::Unallocated,
                });
            }
            let run = layer.lookup(offset, len)?;
            len = run.len;
            if run.mapping != Mapping::Unallocated {
                return Ok(ChainRun {
                    offset,
                    len,
                    depth,
                    mapping: run.mapping,
                });
            }
        }
        Ok(ChainRun {
            offset,
            len,
            depth: self.layers.len() - 1,
            mapping: Mapping::Unallocated,
        })
    }

    /// Iterates the resolved runs covering `offset..offset + len` (clamped to the size).
    pub fn runs(&self, offset: u64, len: u64) -> ChainRuns<'_> {
        ChainRuns {
            chain: self,
            pos: offset,
            end: offset.saturating_add(len).min(self.size()),
        }
    }

    /// Fills `buf` with the first `buf.len()` bytes of a resolved run.
    pub fn read_run(&self, run: &ChainRun, buf: &mut [u8]) -> Result<()> {
        let layer_run = Run {
            offset: run.offset,
            len: run.len,
            mapping: run.mapping,
        };
        self.layers[run.depth].read_run(&layer_run, buf)
    }

    /// Reads `buf.len()` bytes of the top image at `offset`, through the chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(Error::OutOfRange {
                offset,
                len,
                size: self.size(),
            }
            .in_file(self.top().name()));
        }
        let mut done = 0usize;
        for run in self.runs(offset, len) {
            let run = run?;
            let n = run.len as usize;
            self.read_run(&run, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

fn is_marked_corrupt(e: &Error) -> bool {
    matches!(e.root(), Error::MarkedCorrupt)
}

/// Iterator over resolved runs; see [`Chain::runs`].
#[derive(Debug)]
pub struct ChainRuns<'a> {
    chain: &'a Chain,
    pos: u64,
    end: u64,
}

impl Iterator for ChainRuns<'_> {
    type Item = Result<ChainRun>;

    fn next(&mut self) -> Option<Result<ChainRun>> {
        if self.pos >= self.end {
            return None;
        }
        let run = self.chain.resolve(self.pos, self.end - self.pos);
        match &run {
            Ok(r) => self.pos = r.end(),
            Err(_) => self.pos = self.end,
        }
        Some(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names_resolve_against_the_overlay_directory() {
        assert_eq!(
            resolve_relative(Path::new("/vm/disks/top.qcow2"), "base.qcow2"),
            PathBuf::from("/vm/disks/base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "base.qcow2"),
            PathBuf::from("base.qcow2")
        );
        assert_eq!(
            resolve_relative(Path::new("/vm/top.qcow2"), "/abs/base.raw"),
            PathBuf::from("/abs/base.raw")
        );
    }

    #[test]
    fn protocol_and_json_names_are_refused() {
        assert!(backing_path_name("json:{\"driver\":\"raw\"}").is_err());
        assert!(backing_path_name("nbd://host/export").is_err());
        assert!(backing_path_name("").is_err());
        assert_eq!(backing_path_name("file:base.img").unwrap(), "base.img");
        assert_eq!(
            backing_path_name("dir:with/colon").unwrap(),
            "dir:with/colon"
        );
    }
}
