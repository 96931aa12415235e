//! One layer of a chain: a qcow2 image or a raw file, behind one lookup and read API.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::names::resolve_relative;
use crate::qcow2::{Image, ImageOptions, Run};

use super::{ForeignImage, Format, RawImage};

/// One layer of a chain.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // a chain holds few layers; boxing buys nothing
pub enum Layer {
    /// A qcow2 image.
    Qcow2(Image),
    /// A raw image (only ever the bottom layer).
    Raw(RawImage),
}

/// What opening a file found: a layer, or an image of a format this crate does not open.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived: turned into a layer or an error at once
pub(crate) enum Opened {
    /// A qcow2 or raw layer.
    Layer(Layer),
    /// A file of another format qemu-img knows.
    Foreign(ForeignImage),
}

impl Layer {
    /// Opens the file at `path` as `format`, or probes the format when `None` (as
    /// qemu-img: see [`Format::probe`]). A format this crate does not open, given or
    /// probed, is refused ([`crate::Error::FormatNotSupported`], naming the file).
    pub fn open(
        path: impl AsRef<Path>,
        format: Option<Format>,
        options: &ImageOptions,
    ) -> Result<Layer> {
        let path = path.as_ref();
        match Layer::open_or_describe(path, format, options)? {
            Opened::Layer(layer) => Ok(layer),
            Opened::Foreign(image) => Err(image.format.not_supported().in_file(path)),
        }
    }

    /// As [`Layer::open`], but a file of a format this crate does not open is described
    /// ([`ForeignImage`]) instead of refused. A raw image whose format was probed keeps
    /// QEMU's guard on its first sector ([`RawImage::is_probed`]).
    pub(crate) fn open_or_describe(
        path: &Path,
        format: Option<Format>,
        options: &ImageOptions,
    ) -> Result<Opened> {
        let storage = options.open_storage(path, options.writable)?;
        let (format, probed) = match format {
            Some(format) => (format, false),
            None => (
                Format::probe(&*storage, path).map_err(|e| e.in_file(path))?,
                true,
            ),
        };
        Ok(match format {
            Format::Qcow2 => {
                drop(storage);
                Opened::Layer(Layer::Qcow2(Image::open_with(path, options)?))
            }
            Format::Raw => {
                let raw = RawImage::from_storage(storage, path)?;
                Opened::Layer(Layer::Raw(if probed { raw.mark_probed() } else { raw }))
            }
            other => Opened::Foreign(ForeignImage::from_storage(&*storage, path, other)?),
        })
    }

    /// The format to reopen this layer's file as, so that it opens as it did: its format,
    /// or `None` for a raw image whose format was probed (probing it again keeps its
    /// guard, [`RawImage::is_probed`]).
    pub fn reopen_format(&self) -> Option<Format> {
        match self {
            Layer::Raw(r) if r.is_probed() => None,
            other => Some(other.format()),
        }
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
            Layer::Raw(r) => r.storage(),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Qcow2(i) => i.size(),
            Layer::Raw(r) => r.size(),
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
            Layer::Raw(r) => r.name().to_path_buf(),
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
            Layer::Raw(r) => r.lookup(offset, max_len),
        }
    }

    /// Fills `buf` with the first `buf.len()` bytes of `run` (unallocated reads as zeros).
    /// A buffer longer than the run is refused.
    pub fn read_run(&self, run: &Run, buf: &mut [u8]) -> Result<()> {
        match self {
            Layer::Qcow2(i) => i.read_run(run, buf),
            Layer::Raw(r) => r.read_run(run, buf),
        }
    }
}
