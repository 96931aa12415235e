//! Making an image writable, and what every write checks first.

use std::sync::{MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::format::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};

use crate::qcow2::image::Image;

use super::state::Writer;

impl Image {
    /// Sets up the write side: loads refcounts, clears unknown autoclear bits.
    pub(crate) fn make_writable(&mut self) -> Result<()> {
        if self.storage.is_read_only() {
            return Err(Error::ReadOnly {
                reason: "the file was opened read-only",
            });
        }
        let header = self.header();
        if header
            .incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
        {
            return Err(Error::MarkedCorrupt);
        }
        let refcounts = self.load_refcounts()?;
        let lazy = header
            .compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS);
        let mut writer = Writer::new(refcounts);
        writer.set_lazy(lazy);
        self.writer = Some(std::sync::Mutex::new(writer));
        self.refresh_overlap_map(&*self.writer()?);
        if header
            .incompatible_features
            .contains(IncompatibleFeatures::DIRTY)
        {
            self.recover_dirty()?;
        }
        // Autoclear bits this crate does not maintain must be cleared before writing;
        // bitmaps it maintains (when QEMU would read them).
        let mut keep = AutoclearFeatures::DATA_FILE_RAW;
        if self.live_bitmaps_extension().is_some() {
            keep |= AutoclearFeatures::BITMAPS;
        }
        if header.autoclear_features.bits() & !keep.bits() != 0 {
            let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
            let mut w = self.writer()?;
            self.meta_mut().header.autoclear_features &= keep;
            w.header_dirty = true;
            self.checkpoint(&mut w)?;
        }
        self.start_bitmaps()
    }

    pub(crate) fn ensure_writable(&self) -> Result<()> {
        if self.writer.is_some() && self.is_corrupt() {
            return Err(Error::MarkedCorrupt);
        }
        match self.writer {
            Some(_) => Ok(()),
            None => Err(Error::ReadOnly {
                reason: "the image was opened read-only",
            }),
        }
    }

    pub(crate) fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        match &self.writer {
            Some(w) => Ok(w.lock().unwrap_or_else(PoisonError::into_inner)),
            None => Err(Error::ReadOnly {
                reason: "the image was opened read-only",
            }),
        }
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    pub(crate) fn io_error(&self, what: &str, at: u64, e: std::io::Error) -> Error {
        Error::io(format!("{what} at {at:#x}"), e)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort: a caller that wants errors calls close() first.
        if self.writer.is_some() {
            let _ = self.close();
        }
    }
}
