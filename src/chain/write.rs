//! Writing to the active (top) image of a chain: copy-on-write reads the layers below.

use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::qcow2::AmendOptions;

use super::Chain;

impl Chain {
    /// Fills `buf` with what the layers below the top show at `offset` (zeros past their
    /// end): the source of copy-on-write.
    pub(crate) fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let run = self.resolve_from(1, at, (buf.len() - done) as u64)?;
            let n = run.len as usize;
            self.read_run(&run, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Fails unless the top image is open for writing: in particular when it is marked
    /// corrupt, which a chain opened for writing opens read-only (with a warning) so
    /// that it can still be read. Call it after opening when writes must follow.
    pub fn ensure_writable(&self) -> Result<()> {
        let top = self.top();
        if top
            .as_qcow2()
            .is_some_and(|i| i.is_corrupt() && !i.is_writable())
        {
            return Err(Error::MarkedCorrupt.in_file(top.name()));
        }
        self.writable_top().map(drop)
    }

    pub(super) fn writable_top(&self) -> Result<&Layer> {
        let top = self.top();
        let writable = match top {
            Layer::Qcow2(i) => i.is_writable(),
            Layer::Raw(r) => r.is_writable(),
        };
        if !writable {
            return Err(Error::ReadOnly {
                reason: "the image was opened read-only",
            }
            .in_file(top.name()));
        }
        Ok(top)
    }

    /// Writes `buf` at guest `offset` of the top image. Partial clusters are completed
    /// from the top image or, where it has nothing, from its backing chain.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.writable_top()? {
            Layer::Qcow2(image) => image.write_at_with(buf, offset, &|b, o| self.read_below(b, o)),
            Layer::Raw(raw) => raw.write_at(buf, offset),
        }
    }

    /// Writes at guest `offset` the `len` bytes that `from` (a layer of this or another
    /// chain) stores from `host` of its data file, letting the storage copy them
    /// ([`crate::storage::Storage::copy_from`]: shared extents on XFS and Btrfs).
    pub(crate) fn copy_in(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()> {
        let src = from.data_storage();
        match self.writable_top()? {
            Layer::Qcow2(image) => {
                image.copy_in_with(src, from.name(), host, len, offset, &|b, o| {
                    self.read_below(b, o)
                })
            }
            Layer::Raw(raw) => raw.copy_from(src, from.name(), host, len, offset),
        }
    }

    /// Makes `offset..offset + len` read as zeros, with zero flags where whole clusters
    /// allow; `unmap` lets freed host clusters go (qemu-io's `write -z -u`).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        match self.writable_top()? {
            Layer::Qcow2(image) => {
                image.write_zeroes_with(offset, len, unmap, &|b, o| self.read_below(b, o))
            }
            Layer::Raw(raw) => raw.write_zeroes(offset, len),
        }
    }

    /// Discards `offset..offset + len` as QEMU does: whole clusters lose their data; with
    /// a backing file (version 3) they then read as zeros, otherwise as unallocated.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let has_backing = self.layers().len() > 1;
        match self.writable_top()? {
            Layer::Qcow2(image) => image.discard_with(offset, len, has_backing),
            Layer::Raw(_) => Ok(()), // advisory: a raw file keeps its bytes
        }
    }

    /// Stores one pre-compressed cluster (see [`crate::qcow2::compress_cluster`]) for the
    /// cluster-aligned guest `offset` of the top image.
    pub fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        match self.writable_top()? {
            Layer::Qcow2(image) => image.write_compressed(offset, compressed),
            Layer::Raw(raw) => {
                Err(Error::Unsupported("compressed clusters in a raw image").in_file(raw.name()))
            }
        }
    }

    /// Changes the top image's virtual size to `new_size` (a multiple of 512), as
    /// qemu-img resize: growing makes the new area read as zeros (even over a longer
    /// backing file); shrinking needs `allow_shrink` and frees what lies past the end.
    pub fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        // Only a backing file longer than the image would show through the new area.
        let backing_longer = self.layers().get(1).is_some_and(|b| b.size() > self.size());
        match self.writable_top()? {
            Layer::Qcow2(image) => {
                image.resize_with(new_size, allow_shrink, backing_longer, &|b, o| {
                    self.read_below(b, o)
                })
            }
            Layer::Raw(raw) => raw.resize(new_size, allow_shrink),
        }
    }

    /// [`Chain::resize`] with qemu-img resize's `--preallocation`: the area a raw image
    /// grows by is reserved (`Falloc`) or written with zeros (`Full`); `Metadata` is
    /// refused for a raw image, as QEMU's raw driver refuses it. A qcow2 image maps the
    /// new area to new host clusters, as QEMU does. Modes other
    /// than `Off` only grow (as qemu-img: "Preallocation can only be used for growing
    /// images").
    pub fn resize_preallocated(
        &self,
        new_size: u64,
        allow_shrink: bool,
        mode: crate::qcow2::Preallocation,
    ) -> Result<()> {
        if mode == crate::qcow2::Preallocation::Off {
            return self.resize(new_size, allow_shrink);
        }
        let top = self.writable_top()?;
        // Not even the same size, as qemu-img.
        if new_size <= top.size() {
            return Err(Error::InvalidArgument(
                "Preallocation can only be used for growing images".into(),
            )
            .in_file(top.name()));
        }
        let backing_longer = self.layers().get(1).is_some_and(|b| b.size() > self.size());
        match top {
            Layer::Qcow2(image) => {
                image.grow_preallocated_with(new_size, mode, backing_longer, &|b, o| {
                    self.read_below(b, o)
                })
            }
            Layer::Raw(raw) => raw.grow_preallocated(raw.file_len(), new_size, mode),
        }
    }

    /// Changes the top image's options as qemu-img amend (see [`AmendOptions`]); a new
    /// `size` is applied as a resize that may shrink.
    pub fn amend(&self, options: &AmendOptions) -> Result<()> {
        options
            .validate()
            .map_err(|e| e.in_file(self.top().name()))?;
        let Layer::Qcow2(image) = self.writable_top()? else {
            return Err(Error::Unsupported("amending a raw image").in_file(self.top().name()));
        };
        image.amend(options, self.layers().len() > 1)?;
        if let Some(size) = options.size {
            self.resize(size, true)?;
        }
        Ok(())
    }

    /// Makes every completed write to the top image durable.
    pub fn flush(&self) -> Result<()> {
        match self.writable_top()? {
            Layer::Qcow2(image) => image.flush(),
            Layer::Raw(raw) => raw.flush(),
        }
    }

    /// Starts writing the top image's writes back without waiting (see
    /// [`crate::Image::start_writeback`]).
    pub fn start_writeback(&self) -> Result<()> {
        match self.writable_top()? {
            Layer::Qcow2(image) => image.start_writeback(),
            Layer::Raw(raw) => raw.start_writeback(),
        }
    }

    /// Flushes and leaves the top image clean on disk (see [`crate::Image::close`]).
    pub fn close(&self) -> Result<()> {
        match self.top() {
            Layer::Qcow2(image) => image.close(),
            Layer::Raw(raw) if raw.is_writable() => raw.flush(),
            Layer::Raw(_) => Ok(()),
        }
    }
}
