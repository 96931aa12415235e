//! A storage that counts the calls it receives, for tests that check a call reaches the
//! storage (through wrappers such as `Box<dyn Storage>`).

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use super::{Extent, LockMode, MemStorage, Storage};

/// A [`MemStorage`] that counts each method called on it by name.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    inner: MemStorage,
    calls: Mutex<BTreeMap<&'static str, usize>>,
}

impl Recording {
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Recording {
        Recording {
            inner: MemStorage::from_bytes(bytes),
            calls: Mutex::default(),
        }
    }

    /// How often `method` was called.
    pub(crate) fn calls(&self, method: &str) -> usize {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.get(method).copied().unwrap_or(0)
    }

    /// Every method called, with its count.
    pub(crate) fn all_calls(&self) -> BTreeMap<&'static str, usize> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note(&self, method: &'static str) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        *calls.entry(method).or_default() += 1;
    }
}

impl Storage for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.note("read_at");
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.note("write_at");
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.note("flush");
        self.inner.flush()
    }
    fn copy_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.note("copy_from");
        self.inner.copy_from(src, src_offset, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.note("write_zeroes");
        self.inner.write_zeroes(offset, len)
    }
    fn as_file(&self) -> Option<&std::fs::File> {
        self.note("as_file");
        None
    }
    fn lock(&self, _mode: LockMode) -> crate::error::Result<()> {
        self.note("lock");
        Ok(())
    }
    fn shares_extents_with(&self, _src: &dyn Storage) -> bool {
        self.note("shares_extents_with");
        false
    }
    fn start_writeback(&self, _range: std::ops::Range<u64>) -> io::Result<()> {
        self.note("start_writeback");
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.note("len");
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.note("set_len");
        self.inner.set_len(len)
    }
    fn is_empty(&self) -> io::Result<bool> {
        self.note("is_empty");
        self.inner.is_empty()
    }
    fn allocated_size(&self) -> Option<u64> {
        self.note("allocated_size");
        None
    }
    fn is_read_only(&self) -> bool {
        self.note("is_read_only");
        false
    }
    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        self.note("extent");
        self.inner.extent(offset, max_len)
    }
}

/// Calls every method of [`Storage`] once on `storage` (whose bytes must be at least 16
/// long), and returns how many methods that is.
pub(crate) fn call_every_method(storage: &dyn Storage) -> usize {
    let mut buf = [0u8; 8];
    let other = MemStorage::from_bytes(vec![7; 8]);
    storage.read_at(&mut buf, 0).unwrap();
    storage.write_at(&buf, 8).unwrap();
    storage.flush().unwrap();
    storage.copy_from(&other, 0, 0, 8).unwrap();
    storage.write_zeroes(0, 8).unwrap();
    let _ = storage.as_file();
    storage.lock(LockMode::READ).unwrap();
    let _ = storage.shares_extents_with(&other);
    storage.start_writeback(0..u64::MAX).unwrap();
    storage.len().unwrap();
    storage.set_len(16).unwrap();
    storage.is_empty().unwrap();
    let _ = storage.allocated_size();
    let _ = storage.is_read_only();
    storage.extent(0, 8).unwrap();
    15
}
