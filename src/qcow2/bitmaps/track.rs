//! Keeping bitmaps valid through writes, as QEMU does: an image opened for writing loads
//! its enabled bitmaps, marks them in use on disk before the first write can happen,
//! records every guest change in memory, and stores them on close.
//!
//! The order is what keeps them honest after a crash: `in_use` is on disk (in a switched
//! directory, `directory.rs`) before any guest write, and is cleared only by the same
//! directory switch that publishes the stored contents. A crash in between leaves the
//! bitmaps in use — inconsistent, as QEMU leaves them — never a clean-looking bitmap that
//! misses a change. Disabled bitmaps stay on disk as they are until something changes them.

use std::sync::PoisonError;

use crate::error::Result;
use crate::format::{BitmapFlags, bitmap_table_size};

use crate::qcow2::image::Image;
use crate::qcow2::write::Writer;

use super::state::{BitmapSet, Tracked};

/// The most bitmap memory an image loads (QEMU's limit for one bitmap is 512 MiB): a
/// directory of many large bitmaps is refused, not loaded.
const MAX_LOADED_BYTES: u64 = 1 << 30;

/// Refuses loading `entry` when the loaded bitmaps would take more than
/// [`MAX_LOADED_BYTES`].
pub(super) fn check_memory(
    set: &BitmapSet,
    entry: &crate::format::BitmapDirectoryEntry,
    disk_size: u64,
) -> Result<()> {
    let loaded: u64 = set
        .bitmaps
        .iter()
        .filter_map(|t| t.data.as_ref())
        .map(|d| d.data_len())
        .sum();
    let needed = disk_size.div_ceil(entry.granularity()).div_ceil(8);
    if loaded + needed > MAX_LOADED_BYTES {
        return Err(crate::error::Error::Bitmap {
            name: entry.name.clone(),
            reason: format!(
                "loading it would take {} bytes of memory beside {loaded} already loaded \
                 (at most {MAX_LOADED_BYTES})",
                needed
            ),
        });
    }
    Ok(())
}

impl Image {
    pub(crate) fn bitmap_set(&self) -> std::sync::RwLockReadGuard<'_, BitmapSet> {
        self.bitmaps.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn bitmap_set_mut(&self) -> std::sync::RwLockWriteGuard<'_, BitmapSet> {
        self.bitmaps.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the directory of an image being opened for writing, and its enabled,
    /// consistent bitmaps; marks those in use on disk.
    pub(crate) fn start_bitmaps(&self) -> Result<()> {
        let entries = self.read_bitmap_directory()?;
        if entries.is_empty() {
            return Ok(());
        }
        self.meta_mut().bitmap_tables = super::directory::table_ranges(&entries);
        let mut set = self.bitmap_set_mut();
        for entry in entries {
            let inconsistent = entry.flags.contains(BitmapFlags::IN_USE);
            let enabled = entry.flags.contains(BitmapFlags::AUTO);
            let data = if enabled && !inconsistent {
                check_memory(&set, &entry, self.size())?;
                Some(self.load_bitmap_data(&entry)?)
            } else {
                None
            };
            set.bitmaps.push(Tracked {
                entry,
                inconsistent,
                enabled,
                data,
            });
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        // The tables join the overlap map before any write.
        self.refresh_overlap_map(&w);
        if set.tracks_writes() {
            self.arm_bitmaps(&mut w, &mut set)?;
        }
        Ok(())
    }

    /// Marks every loaded bitmap in use on disk (one directory switch), so that what the
    /// caller changes next may be lost in a crash only as an inconsistent bitmap.
    pub(super) fn arm_bitmaps(&self, w: &mut Writer, set: &mut BitmapSet) -> Result<()> {
        if set.armed {
            return Ok(());
        }
        let unmarked = set
            .bitmaps
            .iter()
            .any(|t| t.data.is_some() && !t.entry.flags.contains(BitmapFlags::IN_USE));
        if unmarked {
            let entries: Vec<_> = set
                .bitmaps
                .iter()
                .map(|t| {
                    let mut e = t.entry.clone();
                    if t.data.is_some() {
                        e.flags |= BitmapFlags::IN_USE;
                    }
                    e
                })
                .collect();
            self.switch_bitmap_directory(w, &entries, &[], || {
                for (t, e) in set.bitmaps.iter_mut().zip(&entries) {
                    t.entry = e.clone();
                }
            })?;
        }
        set.armed = true;
        Ok(())
    }

    /// Records a guest change of `offset..offset + len` in every enabled bitmap; called
    /// before the change is made. After a close stored the bitmaps, the first change marks
    /// them in use again.
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) -> Result<()> {
        {
            let set = self.bitmap_set();
            if set.bitmaps.is_empty() {
                return Ok(());
            }
            if set.armed || !set.tracks_writes() {
                mark(&set, offset, len);
                return Ok(());
            }
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer()?;
        let mut set = self.bitmap_set_mut();
        self.arm_bitmaps(&mut w, &mut set)?;
        mark(&set, offset, len);
        Ok(())
    }

    /// Loads every consistent bitmap and marks them in use, before an operation that
    /// changes them all (a resize).
    pub(crate) fn load_all_bitmaps(&self, w: &mut Writer) -> Result<()> {
        let mut set = self.bitmap_set_mut();
        let mut loaded = false;
        for i in 0..set.bitmaps.len() {
            let t = &set.bitmaps[i];
            if t.inconsistent || t.data.is_some() {
                continue;
            }
            check_memory(&set, &t.entry, self.size())?;
            let data = self.load_bitmap_data(&set.bitmaps[i].entry)?;
            set.bitmaps[i].data = Some(data);
            loaded = true;
        }
        if loaded {
            set.armed = false;
        }
        if set.bitmaps.iter().any(|t| t.data.is_some()) {
            self.arm_bitmaps(w, &mut set)?;
        }
        Ok(())
    }

    /// Changes the disk size of every loaded bitmap (all of them, after
    /// [`Image::load_all_bitmaps`]).
    pub(crate) fn resize_bitmaps(&self, size: u64) {
        let mut set = self.bitmap_set_mut();
        for t in &mut set.bitmaps {
            if let Some(data) = &mut t.data {
                data.resize(size);
            }
        }
    }

    /// Stores every loaded bitmap that changed into new clusters and clears `in_use`, in
    /// one directory switch; the clusters their old contents used are freed afterwards.
    pub(crate) fn store_bitmaps(&self, w: &mut Writer) -> Result<()> {
        let mut set = self.bitmap_set_mut();
        if !set.armed {
            return Ok(());
        }
        let cs = self.cluster_size();
        let mut entries = Vec::with_capacity(set.bitmaps.len());
        let mut frees = Vec::new();
        for t in &set.bitmaps {
            let mut e = t.entry.clone();
            if let Some(data) = &t.data {
                let needed = bitmap_table_size(data.size(), data.granularity_bits(), cs);
                if data.changed() || u64::from(e.table_size) != needed {
                    frees.extend(self.bitmap_clusters(&e)?);
                    let stored = self.store_bitmap_data(w, data)?;
                    e.table_offset = stored.table_offset;
                    e.table_size = stored.table_size;
                }
                e.flags = if t.enabled {
                    BitmapFlags::AUTO
                } else {
                    BitmapFlags::empty()
                };
            }
            entries.push(e);
        }
        self.switch_bitmap_directory(w, &entries, &frees, || {
            for (t, e) in set.bitmaps.iter_mut().zip(&entries) {
                t.entry = e.clone();
                if let Some(data) = &t.data {
                    data.set_unchanged();
                }
            }
            set.armed = false;
        })
    }
}

fn mark(set: &BitmapSet, offset: u64, len: u64) {
    for t in set.bitmaps.iter().filter(|t| t.enabled) {
        if let Some(data) = &t.data {
            data.mark(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BitmapDirectoryEntry;

    fn entry(granularity_bits: u8) -> BitmapDirectoryEntry {
        BitmapDirectoryEntry {
            table_offset: 0x10000,
            table_size: 1,
            flags: BitmapFlags::AUTO,
            granularity_bits,
            name: "b".into(),
        }
    }

    #[test]
    fn loading_stops_at_a_gibibyte_of_bitmaps() {
        let set = BitmapSet::default();
        // 4 TiB at 512 bytes per bit: 1 GiB of bits, the whole budget.
        assert!(check_memory(&set, &entry(9), 4 << 40).is_ok());
        assert!(check_memory(&set, &entry(9), (4 << 40) + (1 << 20)).is_err());
        assert!(check_memory(&set, &entry(16), 4 << 40).is_ok());
    }
}
