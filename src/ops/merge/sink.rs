//! Where a merge writes: the destination ([`Sink`]), and [`Out`], which writes to it,
//! counts what it wrote ([`MergeReport`]) and flushes it every checkpoint.

use crate::chain::{Chain, ChainRun};
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::qcow2::Mapping;
use crate::storage::write_zeros;

use super::options::{MergeOptions, MergeReport, StorageCopy};

/// Where writes of a merge go.
pub(super) trait Sink {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn zero(&self, offset: u64, len: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn start_writeback(&self) -> Result<()>;
    /// Writes at `offset` the `len` bytes `from` stores at `host`, copied by the storage.
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()>;
    /// Whether [`Sink::copy`] from `from` shares extents instead of moving data.
    fn shares_extents_with(&self, from: &Layer) -> bool;
    /// Lays new metadata out for a long run of writes (a qcow2 destination takes its new
    /// L2 tables in batches: `Image::batch_new_l2_tables`).
    fn prepare_for_merge(&self) {}
}

impl Sink for Chain {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        Chain::flush(self)
    }
    fn start_writeback(&self) -> Result<()> {
        Chain::start_writeback(self)
    }
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()> {
        self.copy_in(from, host, len, offset)
    }
    fn shares_extents_with(&self, from: &Layer) -> bool {
        self.top()
            .data_storage()
            .shares_extents_with(from.data_storage())
    }
    fn prepare_for_merge(&self) {
        if let Layer::Qcow2(image) = self.top() {
            image.batch_new_l2_tables();
        }
    }
}

/// A chain whose zeros must hide a backing file it does not have yet: a version 2 image
/// without one makes zeroed clusters unallocated, which the new backing file of a rebase
/// would then show through. Zeros are written as data.
pub(super) struct ZerosAsData<'a>(pub &'a Chain);

impl Sink for ZerosAsData<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        write_zeros(offset, len, |zeros, at| self.0.write_at(zeros, at))
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn start_writeback(&self) -> Result<()> {
        self.0.start_writeback()
    }
    fn copy(&self, from: &Layer, host: u64, len: u64, offset: u64) -> Result<()> {
        self.0.copy_in(from, host, len, offset)
    }
    fn shares_extents_with(&self, from: &Layer) -> bool {
        self.0.shares_extents_with(from)
    }
    fn prepare_for_merge(&self) {
        self.0.prepare_for_merge()
    }
}

/// Writeback of the destination is started every this many bytes written: the disk then
/// writes while the merge copies, instead of all at the final flush (which took half of
/// a warm merge's time), and dirty pages never pile up.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// The writing side of a merge: the sink (none in a dry run), the report, the periodic
/// flushes.
pub(super) struct Out<'a> {
    /// Where writes go; `None` in a dry run.
    pub sink: Option<&'a dyn Sink>,
    /// What went to the sink so far.
    pub report: MergeReport,
    checkpoint_bytes: u64,
    unflushed: u64,
    /// Bytes written since writeback was last started.
    unstarted: u64,
    /// Whether data may go as storage copies.
    pub storage_copy: StorageCopy,
}

impl<'a> Out<'a> {
    pub(super) fn new(sink: Option<&'a dyn Sink>, options: &MergeOptions) -> Out<'a> {
        if let Some(s) = sink {
            s.prepare_for_merge();
        }
        Out {
            storage_copy: options.storage_copy,
            sink,
            report: MergeReport::default(),
            checkpoint_bytes: options.checkpoint_bytes,
            unflushed: 0,
            unstarted: 0,
        }
    }

    pub(super) fn data(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.report.data_bytes += buf.len() as u64;
        if let Some(s) = self.sink {
            s.write(buf, offset)?;
        }
        self.wrote(buf.len() as u64)
    }

    /// Copies what `run` (a data run of `from`) holds to the same guest offset.
    pub(super) fn copy(&mut self, from: &Layer, run: &ChainRun) -> Result<()> {
        let Mapping::Data { host, .. } = run.mapping else {
            return Err(Error::InvalidArgument(
                "only data runs are copied by the storage".into(),
            ));
        };
        self.report.data_bytes += run.len;
        if let Some(s) = self.sink {
            s.copy(from, host, run.len, run.offset)?;
        }
        self.wrote(run.len)
    }

    pub(super) fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.report.zero_bytes += len;
        if let Some(s) = self.sink {
            s.zero(offset, len)?;
        }
        self.wrote(len)
    }

    /// Flushes the sink once `checkpoint_bytes` went into it since the last flush.
    fn wrote(&mut self, n: u64) -> Result<()> {
        self.unflushed += n;
        self.unstarted += n;
        if let Some(s) = self.sink {
            if self.checkpoint_bytes > 0 && self.unflushed >= self.checkpoint_bytes {
                s.flush()?;
                self.unflushed = 0;
                self.unstarted = 0;
            } else if self.unstarted >= WRITEBACK_BYTES {
                s.start_writeback()?;
                self.unstarted = 0;
            }
        }
        Ok(())
    }
}

/// A chain whose written clusters are stored compressed (qemu-img rebase's `-c`). Each
/// cluster a write touches is stored whole: what the write does not cover is read from
/// the chain, which shows what the image showed before (the merge only writes where it
/// would change what the new backing file shows). A cluster the merge already wrote (a
/// second piece in it) is written in place, as compressed clusters cannot be
/// overwritten. Requires a qcow2 top and merges that write in increasing offsets.
pub(super) struct Compressed<'a> {
    pub(super) chain: &'a Chain,
    /// The last cluster stored compressed.
    pub(super) last: std::cell::Cell<Option<u64>>,
}

impl Sink for Compressed<'_> {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let Layer::Qcow2(image) = self.chain.top() else {
            return self.chain.write_at(buf, offset);
        };
        let cs = image.cluster_size();
        let size = self.chain.size();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let cluster = at / cs;
            let start = cluster * cs;
            let stop = (start + cs).min(end);
            let piece = &buf[(at - offset) as usize..(stop - offset) as usize];
            if self.last.get() == Some(cluster) {
                self.chain.write_at(piece, at)?;
                at = stop;
                continue;
            }
            // The whole cluster (up to the end of the image, zeros after it).
            let mut whole = vec![0u8; cs as usize];
            let valid = (size - start).min(cs) as usize;
            if at > start || stop < start + valid as u64 {
                self.chain.read_at(&mut whole[..valid], start)?;
            }
            whole[(at - start) as usize..(stop - start) as usize].copy_from_slice(piece);
            match crate::qcow2::compress_cluster(image.compression_type(), &whole)? {
                Some(packed) => self.chain.write_compressed(start, &packed)?,
                None => self.chain.write_at(&whole[..valid], start)?,
            }
            self.last.set(Some(cluster));
            at = stop;
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.chain.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        self.chain.flush()
    }
    fn start_writeback(&self) -> Result<()> {
        self.chain.start_writeback()
    }
    /// Never asked: a compressing merge copies no data by the storage.
    fn copy(&self, _from: &Layer, _host: u64, _len: u64, _offset: u64) -> Result<()> {
        Err(Error::InvalidArgument(
            "a compressing merge copies no data by the storage".into(),
        ))
    }
    fn shares_extents_with(&self, _from: &Layer) -> bool {
        false
    }
}
