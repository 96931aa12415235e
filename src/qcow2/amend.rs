//! Changing an image's options in place (qemu-img amend).

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{
    self, ClusterDescriptor, CompatibleFeatures, CompressionType, HeaderExtension,
    IncompatibleFeatures, L2Entry, MIN_CLUSTER_FOR_FEATURE_TABLE, SubclusterBitmap,
    qemu_feature_names,
};

use super::image::Image;
use super::layout::Compat;
use super::write::Writer;

/// What to change (each `None` leaves the option alone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Version 2 (`0.10`) or 3 (`1.1`).
    pub compat: Option<Compat>,
    /// Lazy refcounts on or off (version 3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (version 2: 16 only).
    pub refcount_bits: Option<u32>,
    /// The backing file name; `Some(None)` removes it.
    pub backing_file: Option<Option<String>>,
    /// The backing file format; `Some(None)` removes it.
    pub backing_format: Option<Option<String>>,
    /// The virtual size (see `Chain::amend`, which applies it as a resize).
    pub size: Option<u64>,
}

impl AmendOptions {
    /// Checks the options alone, as qemu-img does before changing anything: a refcount
    /// width that is a power of two from 1 to 64, a positive size in whole 512-byte
    /// sectors, and no backing format for a backing file being removed.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(Error::InvalidArgument(message));
        if let Some(bits) = self.refcount_bits {
            if !bits.is_power_of_two() || bits > 64 {
                return invalid(format!(
                    "refcount_bits must be a power of two from 1 to 64, not {bits}"
                ));
            }
        }
        if let Some(size) = self.size {
            if size == 0 || size % 512 != 0 {
                return invalid(format!(
                    "the new size {size} must be a positive multiple of 512"
                ));
            }
        }
        if self.backing_file == Some(None) && matches!(self.backing_format, Some(Some(_))) {
            return invalid("a backing format needs a backing file".into());
        }
        Ok(())
    }
}

impl Image {
    /// Applies everything in `options` but `size`. `has_backing` tells whether the image
    /// has a backing chain (downgrading turns zero clusters into data there).
    pub(crate) fn amend(&self, options: &AmendOptions, has_backing: bool) -> Result<()> {
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer().map_err(|e| self.name_error(e))?;
        self.amend_locked(&mut w, options, has_backing)
            .map_err(|e| self.name_error(e))
    }

    fn amend_locked(
        &self,
        w: &mut Writer,
        options: &AmendOptions,
        has_backing: bool,
    ) -> Result<()> {
        self.checkpoint(w)?;
        let header = self.header();
        let v3_now = header.version >= 3;
        let target_v3 = match options.compat {
            Some(Compat::V0_10) => false,
            Some(Compat::V1_1) => true,
            None => v3_now,
        };
        options.validate()?;
        let order = options
            .refcount_bits
            .map_or(header.refcount_order, u32::trailing_zeros);
        if !target_v3 {
            if order != 4 {
                return Err(Error::InvalidArgument(
                    "compat=0.10 images need 16-bit refcounts (refcount_bits=16)".into(),
                ));
            }
            if options.lazy_refcounts == Some(true) {
                return Err(Error::InvalidArgument(
                    "lazy refcounts need compat=1.1".into(),
                ));
            }
            let blockers = [
                (header.extended_l2(), "extended L2 entries"),
                (self.has_external_data_file(), "an external data file"),
                (
                    header.compression_type != CompressionType::Zlib,
                    "zstd compression",
                ),
            ];
            if let Some((_, what)) = blockers.iter().find(|(has, _)| *has) {
                return Err(Error::InvalidArgument(format!(
                    "cannot downgrade to compat=0.10: the image uses {what}"
                )));
            }
        }
        // Refcounts first: lazy refcounts off (written and clean), a new width.
        let lazy = options.lazy_refcounts.unwrap_or(self.lazy_refcounts()) && target_v3;
        if order != header.refcount_order || (self.is_dirty() && !lazy) {
            self.rebuild_refcounts_locked(w, order)?;
        }
        self.set_lazy(w, lazy)?;
        if !target_v3 && v3_now {
            self.expand_zero_clusters(w, has_backing)?;
            // Version 2 cannot hold bitmaps: gone, with their clusters freed, once
            // nothing can refuse the downgrade any more.
            self.drop_all_bitmaps(w)?;
            self.checkpoint(w)?;
        }
        // Then the header cluster: version, features, extensions, backing name.
        let mut meta = self.meta_mut();
        if target_v3 && !v3_now {
            meta.header.version = 3;
            meta.header.header_length = 112;
            meta.header.unknown_tail = vec![0; 7];
            if self.cluster_size() >= MIN_CLUSTER_FOR_FEATURE_TABLE
                && !meta
                    .extensions
                    .list
                    .iter()
                    .any(|e| matches!(e, HeaderExtension::FeatureNames(_)))
            {
                meta.extensions
                    .list
                    .push(HeaderExtension::FeatureNames(qemu_feature_names()));
            }
        } else if !target_v3 && v3_now {
            meta.header.version = 2;
            meta.header.header_length = 72;
            meta.header.unknown_tail.clear();
            meta.header.incompatible_features = IncompatibleFeatures::empty();
            meta.header.compatible_features = CompatibleFeatures::empty();
            meta.header.autoclear_features = format::AutoclearFeatures::empty();
            meta.extensions
                .list
                .retain(|e| !matches!(e, HeaderExtension::FeatureNames(_)));
        }
        if let Some(name) = &options.backing_file {
            meta.backing_file = name.clone();
        }
        let format = match &options.backing_format {
            Some(f) => f.clone(),
            None if meta.backing_file.is_none() => None,
            None => meta.extensions.backing_format().map(str::to_owned),
        };
        meta.extensions
            .list
            .retain(|e| !matches!(e, HeaderExtension::BackingFormat(_)));
        if let Some(f) = format {
            if meta.backing_file.is_none() {
                return Err(Error::InvalidArgument(
                    "a backing format needs a backing file".into(),
                ));
            }
            meta.extensions
                .list
                .insert(0, HeaderExtension::BackingFormat(f));
        }
        drop(meta);
        self.write_header_cluster()
    }

    /// Turns lazy refcounts on or off; off writes the lagging refcounts first.
    fn set_lazy(&self, w: &mut Writer, lazy: bool) -> Result<()> {
        if lazy == self.lazy_refcounts() {
            return Ok(());
        }
        if !lazy {
            self.checkpoint(w)?;
            w.refcounts.write_dirty(&*self.storage)?;
            self.sync()?;
        }
        {
            let mut meta = self.meta_mut();
            meta.header
                .compatible_features
                .set(CompatibleFeatures::LAZY_REFCOUNTS, lazy);
            meta.header
                .incompatible_features
                .remove(IncompatibleFeatures::DIRTY);
        }
        w.set_lazy(lazy);
        self.write_header()?;
        self.sync()
    }

    /// Version 2 has no zero flag: zero clusters of the active image become unallocated
    /// (no backing file) or data clusters of zeros. Snapshots' zero clusters would need
    /// their shared tables rewritten: refused.
    fn expand_zero_clusters(&self, w: &mut Writer, has_backing: bool) -> Result<()> {
        let g = self.geometry;
        let cs = g.cluster_size();
        for s in self.snapshots() {
            let bytes = self.read_metadata(
                "snapshot L1 table",
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
            )?;
            for raw in format::decode_u64_table(&bytes) {
                let l2 = format::L1Entry(raw).l2_offset();
                if l2 != 0 && self.l2_has_zero_clusters(l2)? {
                    return Err(Error::Unsupported(
                        "downgrading an image whose snapshots contain zero clusters",
                    ));
                }
            }
        }
        let l1_len = self.meta().l1.len() as u64;
        let zeros = vec![0u8; cs as usize];
        for l1_index in 0..l1_len {
            let l2 = self.l1_entry(l1_index)?.l2_offset();
            if l2 == 0 || !self.l2_has_zero_clusters(l2)? {
                continue;
            }
            let mut slot = self.l2_for_write(w, l1_index)?;
            for i in 0..g.l2_entries() {
                let guest = l1_index * g.l2_span() + i * cs;
                if guest >= self.size() {
                    break;
                }
                let (entry, _) = self.entry(&slot.table, guest);
                let ClusterDescriptor::Zero { host } = self.descriptor(entry, guest)? else {
                    continue;
                };
                let new = match host {
                    Some(h) if entry.copied() => Some(h),
                    _ if has_backing => Some(self.allocate(w, 1)?),
                    _ => None,
                };
                if let Some(h) = host.filter(|&h| Some(h) != new) {
                    // Dropped with the slot if a later cluster of this table fails.
                    slot.free_on_commit(h >> g.cluster_bits(), 1);
                }
                let e = match new {
                    Some(h) => {
                        self.data_storage()
                            .write_at(&zeros, h)
                            .map_err(|e| Error::io(format!("writing zeros at {h:#x}"), e))?;
                        L2Entry::data(h, true)
                    }
                    None => L2Entry::UNALLOCATED,
                };
                self.set_entry(&mut slot.table, guest, e, SubclusterBitmap(0));
            }
            self.commit_l2(w, l1_index, slot);
        }
        Ok(())
    }

    fn l2_has_zero_clusters(&self, l2_offset: u64) -> Result<bool> {
        let table = self.l2_table(l2_offset)?;
        Ok(table.iter().any(|&e| L2Entry(e).zero_flag()))
    }
}
