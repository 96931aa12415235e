//! Managing persistent bitmaps, as `qemu-img bitmap` does: add, remove, clear, enable,
//! disable, merge; and reading one for a backup tool.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{
    BITMAP_GRANULARITY_BITS, BitmapDirectoryEntry, BitmapFlags, MAX_BITMAP_DATA_BYTES,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_NAME, MAX_BITMAPS, bitmap_table_size,
};

use crate::qcow2::image::Image;
use crate::qcow2::write::Writer;

use super::dirty::DirtyBitmap;
use super::state::{BitmapSet, Tracked};

/// A persistent bitmap as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name, unique in the image.
    pub name: String,
    /// Bytes of guest data one bit stands for.
    pub granularity: u64,
    /// Enabled: it records every write (the `auto` flag).
    pub enabled: bool,
    /// Marked in use: it was not stored properly (or a program has the image open) and
    /// cannot be trusted; it can only be removed.
    pub in_use: bool,
}

fn not_found(name: &str) -> Error {
    Error::Bitmap {
        name: name.to_owned(),
        reason: "not found".into(),
    }
}

fn inconsistent(name: &str) -> Error {
    Error::Bitmap {
        name: name.to_owned(),
        reason: "is inconsistent (in use) and cannot be used; remove it".into(),
    }
}

/// QEMU's default granularity: the cluster size, from 4 KiB to 64 KiB.
fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Image {
    /// The persistent bitmaps, in directory order. For an image opened read-only, the
    /// flags are those on disk (`in_use` may mean another program has it open).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        if self.is_writable() {
            let set = self.bitmap_set();
            return Ok(set
                .bitmaps
                .iter()
                .map(|t| BitmapInfo {
                    name: t.entry.name.clone(),
                    granularity: t.entry.granularity(),
                    enabled: t.enabled,
                    in_use: t.inconsistent,
                })
                .collect());
        }
        let entries = self
            .read_bitmap_directory()
            .map_err(|e| self.name_error(e))?;
        Ok(entries
            .into_iter()
            .map(|e| BitmapInfo {
                granularity: e.granularity(),
                enabled: e.flags.contains(BitmapFlags::AUTO),
                in_use: e.flags.contains(BitmapFlags::IN_USE),
                name: e.name,
            })
            .collect())
    }

    /// The directory entries as on disk (for `check`, `measure`, `convert --bitmaps`).
    pub fn bitmap_directory(&self) -> Result<Vec<BitmapDirectoryEntry>> {
        self.read_bitmap_directory().map_err(|e| self.name_error(e))
    }

    /// The contents of bitmap `name`: its dirty granules, for a backup tool to read only
    /// what changed ([`DirtyBitmap::runs`]). Refused for a bitmap in use (it may miss
    /// changes). On an image opened for writing, an enabled bitmap includes the writes
    /// made so far.
    pub fn load_bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        self.load_bitmap_inner(name).map_err(|e| self.name_error(e))
    }

    fn load_bitmap_inner(&self, name: &str) -> Result<DirtyBitmap> {
        if self.is_writable() {
            let set = self.bitmap_set();
            let t = &set.bitmaps[set.find(name).ok_or_else(|| not_found(name))?];
            if t.inconsistent {
                return Err(inconsistent(name));
            }
            if let Some(data) = &t.data {
                return Ok(data.clone());
            }
            return self.load_bitmap_data(&t.entry);
        }
        let entries = self.read_bitmap_directory()?;
        let entry = entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| not_found(name))?;
        if entry.flags.contains(BitmapFlags::IN_USE) {
            return Err(inconsistent(name));
        }
        self.load_bitmap_data(entry)
    }

    /// Adds a clean bitmap, as `qemu-img bitmap --add [-g GRANULARITY] [--disable]`:
    /// `granularity` defaults to the cluster size (4 KiB to 64 KiB); a disabled bitmap
    /// records nothing until enabled.
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.bitmap_op(|w, set| {
            let cs = self.cluster_size();
            let granularity = granularity.unwrap_or_else(|| default_granularity(cs));
            let refuse = |reason: String| Error::Bitmap {
                name: name.to_owned(),
                reason,
            };
            if !granularity.is_power_of_two()
                || !BITMAP_GRANULARITY_BITS.contains(&(granularity.trailing_zeros() as u8))
            {
                return Err(refuse(
                    "granularity must be a power of 2 from 512 B to 2 GiB".into(),
                ));
            }
            if self.header().version < 3 {
                return Err(refuse(
                    "cannot store dirty bitmaps in version 2 (compat=0.10) images".into(),
                ));
            }
            if name.is_empty() || name.len() > MAX_BITMAP_NAME {
                return Err(refuse("the name must be 1 to 1023 bytes".into()));
            }
            if set.find(name).is_some() {
                return Err(refuse("already exists".into()));
            }
            if set.bitmaps.len() as u64 >= u64::from(MAX_BITMAPS) {
                return Err(refuse(
                    "the image has QEMU's maximum of 65535 bitmaps".into(),
                ));
            }
            let granularity_bits = granularity.trailing_zeros() as u8;
            let table_size = bitmap_table_size(self.size(), granularity_bits, cs);
            if table_size * cs > MAX_BITMAP_DATA_BYTES {
                return Err(refuse(format!(
                    "a bitmap of granularity {granularity} over this disk would exceed QEMU's \
                     512 MiB"
                )));
            }
            let mut entry = BitmapDirectoryEntry {
                table_offset: 0,
                table_size: table_size as u32,
                flags: BitmapFlags::empty(),
                granularity_bits,
                name: name.to_owned(),
            };
            let dir_len: usize = set
                .bitmaps
                .iter()
                .map(|t| t.entry.encoded_len())
                .sum::<usize>()
                + entry.encoded_len();
            if dir_len as u64 > MAX_BITMAP_DIRECTORY_BYTES {
                return Err(refuse(
                    "the bitmap directory would exceed QEMU's 64 MiB".into(),
                ));
            }
            if enabled {
                super::track::check_memory(set, &entry, self.size())?;
            }
            let data = DirtyBitmap::new(self.size(), granularity_bits);
            let stored = self.store_bitmap_data(w, &data)?;
            entry.table_offset = stored.table_offset;
            if enabled {
                entry.flags = BitmapFlags::AUTO;
            }
            let mut entries: Vec<_> = set.bitmaps.iter().map(|t| t.entry.clone()).collect();
            entries.push(entry.clone());
            // An enabled bitmap starts recording at once: loaded (clean) and marked in
            // use with the others.
            self.switch_bitmap_directory(w, &entries, &[], || {
                set.bitmaps.push(Tracked {
                    entry,
                    inconsistent: false,
                    enabled,
                    data: enabled.then_some(data),
                });
            })?;
            if enabled {
                set.armed = false;
                self.arm_bitmaps(w, set)?;
            }
            Ok(())
        })
    }

    /// Removes bitmap `name` (an inconsistent one too) and frees its clusters.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.bitmap_op(|w, set| {
            let i = set.find(name).ok_or_else(|| not_found(name))?;
            let frees = self.bitmap_clusters(&set.bitmaps[i].entry)?;
            let entries: Vec<_> = set
                .bitmaps
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, t)| t.entry.clone())
                .collect();
            self.switch_bitmap_directory(w, &entries, &frees, || {
                set.bitmaps.remove(i);
            })
        })
    }

    /// Makes every granule of bitmap `name` clean.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |t| {
            t.data.as_ref().expect("loaded").clear();
        })
    }

    /// Enables bitmap `name`: it records writes from now on.
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |t| t.enabled = true)
    }

    /// Disables bitmap `name`: it keeps what it holds and records nothing more.
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(name, |t| t.enabled = false)
    }

    /// Marks dirty in bitmap `name` everything `source` marks dirty (`qemu-img bitmap
    /// --merge`; `source` from [`Image::load_bitmap`] of this or another image).
    pub fn merge_bitmap(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.change_bitmap(name, |t| t.data.as_ref().expect("loaded").merge(source))
    }

    /// Loads bitmap `name` (refused when inconsistent), marks it in use on disk, then
    /// lets `change` change it in memory; it is stored on close.
    fn change_bitmap(&self, name: &str, change: impl FnOnce(&mut Tracked)) -> Result<()> {
        self.bitmap_op(|w, set| {
            let i = set.find(name).ok_or_else(|| not_found(name))?;
            if set.bitmaps[i].inconsistent {
                return Err(inconsistent(name));
            }
            if set.bitmaps[i].data.is_none() {
                super::track::check_memory(set, &set.bitmaps[i].entry, self.size())?;
                let data = self.load_bitmap_data(&set.bitmaps[i].entry)?;
                set.bitmaps[i].data = Some(data);
                set.armed = false;
            }
            self.arm_bitmaps(w, set)?;
            change(&mut set.bitmaps[i]);
            Ok(())
        })
    }

    /// Removes every bitmap and frees its clusters: a downgrade to version 2, which cannot
    /// hold them. (QEMU's downgrade loses them too, leaving their clusters leaked.)
    pub(crate) fn drop_all_bitmaps(&self, w: &mut Writer) -> Result<()> {
        let mut set = self.bitmap_set_mut();
        if set.bitmaps.is_empty() && self.live_bitmaps_extension().is_none() {
            return Ok(());
        }
        let mut frees = Vec::new();
        for t in &set.bitmaps {
            frees.extend(self.bitmap_clusters(&t.entry)?);
        }
        self.switch_bitmap_directory(w, &[], &frees, || {
            set.bitmaps.clear();
            set.armed = false;
        })
    }

    /// Runs a bitmap operation with the image to itself.
    fn bitmap_op(&self, op: impl FnOnce(&mut Writer, &mut BitmapSet) -> Result<()>) -> Result<()> {
        let result = (|| {
            self.ensure_writable()?;
            let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
            let mut w = self.writer()?;
            self.checkpoint(&mut w)?;
            let mut set = self.bitmap_set_mut();
            op(&mut w, &mut set)
        })();
        result.map_err(|e| self.name_error(e))
    }
}
