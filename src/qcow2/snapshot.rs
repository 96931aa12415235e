//! Internal snapshots (spec: "Snapshots"): create, apply (revert) and delete, as QEMU's.
//!
//! # Crash ordering
//!
//! The snapshot table only changes by one header write that switches to a complete new
//! table. Around it, references are counted before they exist and dropped after they are
//! gone, so a crash leaks at worst. COPIED flags are cleared before any refcount rises
//! above one and set only after the refcount of one is on disk: a crash never leaves a
//! COPIED flag on a shared cluster (a later write would overwrite snapshot data in place).
//!
//! A refcount and the COPIED flags of the entries pointing at its cluster live in
//! different clusters, so no write changes both: between the two, a crash leaves either a
//! COPIED flag on a shared cluster (dangerous) or a flag missing on a cluster with one
//! reference (harmless: the next write copies it once). This module only ever leaves the
//! second, which `qemu-img check` nevertheless counts as a corruption. So on version 3
//! images the operation runs with the dirty bit set: a crash leaves the image dirty, and
//! the next writer — QEMU or this crate — checks and repairs it before using it.

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::format::{
    self, ClusterDescriptor, IncompatibleFeatures, L1Entry, L2Entry, MAX_SNAPSHOT_NAME,
    SnapshotEntry, SnapshotExtra,
};

use super::image::Image;
use super::reference::{Event, Owner, ReferenceKind, Scope};
use super::write::Writer;

impl Image {
    /// Takes an internal snapshot of the active image named `name`, with the next free
    /// numeric ID, as `qemu-img snapshot -c`. Returns its table entry.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotEntry> {
        // Refuse before the operation marks the image dirty.
        self.new_snapshot_entry(name)
            .map_err(|e| self.name_error(e))?;
        self.snapshot_op(
            |w| self.check_references_fit(w, Scope::Active),
            |w| self.create_locked(w, name),
        )
    }

    /// Reverts the active image to the snapshot whose ID or name is `id_or_name`, as
    /// `qemu-img snapshot -a`.
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.find_snapshot(id_or_name)
            .map_err(|e| self.name_error(e))?;
        // The bitmaps would have to take the snapshot's whole difference; QEMU refuses
        // ("Device has active dirty bitmaps"), and so do we.
        if !self.bitmap_set().bitmaps.is_empty() {
            return Err(self.name_error(Error::Unsupported(
                "applying a snapshot to an image with persistent bitmaps (remove them first)",
            )));
        }
        self.snapshot_op(
            |w| {
                let index = self.find_snapshot(id_or_name)?;
                self.check_references_fit(w, self.snapshot_scope(index))
            },
            |w| self.apply_locked(w, id_or_name),
        )
    }

    /// Deletes the snapshot whose ID or name is `id_or_name`, as `qemu-img snapshot -d`;
    /// clusters only it used are freed.
    pub fn snapshot_delete(&self, id_or_name: &str) -> Result<()> {
        self.find_snapshot(id_or_name)
            .map_err(|e| self.name_error(e))?;
        self.snapshot_op(|_| Ok(()), |w| self.delete_locked(w, id_or_name))
    }

    /// Makes the snapshot named by `id` and/or `name` the image's content for reading,
    /// in memory only, as QEMU's `bdrv_snapshot_load_tmp` does for `qemu-img convert -l`:
    /// the snapshot's L1 table replaces the active one in this handle; nothing on disk
    /// changes and the virtual size stays the active image's. With both given, a
    /// snapshot must match both; with one, that one. Only for an image opened read-only
    /// (a write would go through the snapshot's tables).
    pub fn load_snapshot_read_only(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if self.is_writable() {
            return Err(self.name_error(Error::InvalidArgument(
                "a snapshot is loaded only into an image opened read-only".into(),
            )));
        }
        let found = self.meta().snapshots.iter().find_map(|s| {
            let matches = match (id, name) {
                (Some(id), Some(name)) => s.id == id && s.name == name,
                (Some(id), None) => s.id == id,
                (None, Some(name)) => s.name == name,
                (None, None) => false,
            };
            matches.then_some((s.l1_table_offset, s.l1_size))
        });
        let Some((offset, entries)) = found else {
            return Err(self.name_error(Error::InvalidArgument("Can't find snapshot".into())));
        };
        if offset % self.cluster_size() != 0 {
            return Err(self.name_error(Error::corrupt(
                "snapshot L1 table",
                offset,
                "not aligned to a cluster".to_owned(),
            )));
        }
        let l1 = self
            .read_l1(offset, entries)
            .map_err(|e| self.name_error(e))?;
        {
            let mut meta = self.meta_mut();
            meta.header.l1_table_offset = offset;
            meta.header.l1_size = entries;
            meta.l1 = l1;
        }
        // Cached tables stay right (keyed by their host offset), but start afresh anyway:
        // the snapshot's tables are what is read from now on.
        self.l2_cache.clear();
        Ok(())
    }

    /// Runs `op` under the exclusive lock after a checkpoint, with the dirty bit set
    /// (version 3); `check` runs first and may refuse before anything changes.
    fn snapshot_op<T>(
        &self,
        check: impl FnOnce(&mut Writer) -> Result<()>,
        op: impl FnOnce(&mut Writer) -> Result<T>,
    ) -> Result<T> {
        if self.has_external_data_file() {
            return Err(self.name_error(Error::Unsupported(
                "internal snapshots in an image with an external data file",
            )));
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut w = self.writer().map_err(|e| self.name_error(e))?;
        let result = self.checkpoint(&mut w).and_then(|()| {
            check(&mut w)?;
            let marked = self.mark_dirty_during_snapshot_op()?;
            let value = op(&mut w)?;
            if marked {
                self.meta_mut().header.incompatible_features -= IncompatibleFeatures::DIRTY;
                self.write_header()?;
                self.sync()?;
            }
            Ok(value)
        });
        // Tables changed behind the cache's back, and clusters it read may be free: start
        // the caches afresh.
        self.l2_cache.clear();
        self.forget_compressed();
        self.refresh_overlap_map(&w);
        result.map_err(|e| self.name_error(e))
    }

    /// Sets the dirty bit (version 3) for the duration of a snapshot operation, unless it
    /// is set already; returns whether it was set here. See the module docs: a crash in
    /// the middle may leave COPIED flags missing, and a dirty image is checked and repaired
    /// by the next writer, QEMU or this crate.
    fn mark_dirty_during_snapshot_op(&self) -> Result<bool> {
        let header = self.header();
        if header.version < 3
            || header
                .incompatible_features
                .contains(IncompatibleFeatures::DIRTY)
        {
            return Ok(false);
        }
        self.meta_mut().header.incompatible_features |= IncompatibleFeatures::DIRTY;
        self.write_header()?;
        self.sync()?;
        Ok(true)
    }

    /// The index of the snapshot with this ID, else the first with this name.
    fn find_snapshot(&self, id_or_name: &str) -> Result<usize> {
        let snapshots = &self.meta().snapshots;
        snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| snapshots.iter().position(|s| s.name == id_or_name))
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot {id_or_name:?}")))
    }

    /// The table entry a new snapshot `name` gets (its L1 offset still 0), refused past
    /// QEMU's limits.
    fn new_snapshot_entry(&self, name: &str) -> Result<SnapshotEntry> {
        let count = self.meta().snapshots.len();
        if count >= format::MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument(
                "the image has 65536 snapshots already".into(),
            ));
        }
        if name.len() > MAX_SNAPSHOT_NAME {
            return Err(Error::InvalidArgument(format!(
                "snapshot name of {} bytes: QEMU's limit is {MAX_SNAPSHOT_NAME}",
                name.len()
            )));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = {
            let meta = self.meta();
            let max = meta
                .snapshots
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            (max + 1).to_string()
        };
        let entry = SnapshotEntry {
            l1_table_offset: 0,
            l1_size: self.meta().l1.len() as u32,
            id,
            name: name.to_owned(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size32: 0,
            extra: SnapshotExtra {
                vm_state_size_large: Some(0),
                disk_size: Some(self.header().size),
                icount: Some(0),
                unknown: Vec::new(),
            },
        };
        let table_len: u64 = self
            .meta()
            .snapshots
            .iter()
            .map(|s| s.encoded_len() as u64)
            .sum::<u64>()
            + entry.encoded_len() as u64;
        if table_len > format::MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the snapshot table would grow to {table_len} bytes, past QEMU's limit of \
                 {}",
                format::MAX_SNAPSHOT_TABLE_BYTES
            )));
        }
        Ok(entry)
    }

    fn create_locked(&self, w: &mut Writer, name: &str) -> Result<SnapshotEntry> {
        let mut entry = self.new_snapshot_entry(name)?;
        let mut snapshots = self.meta().snapshots.clone();
        // 1. Clear COPIED in the active tables: every cluster is about to be shared.
        let l1 = self.meta().l1.clone();
        for &raw in &l1 {
            let l2 = L1Entry(raw).l2_offset();
            if l2 != 0 {
                self.rewrite_l2(l2, |_, e| L2Entry(e).with_copied(false).0)?;
            }
        }
        let cleared: Vec<u64> = l1
            .iter()
            .map(|&e| L1Entry(e).with_copied(false).0)
            .collect();
        self.write_active_l1(&cleared)?;
        self.meta_mut().l1 = cleared.clone();
        self.sync()?;
        // 2. Count the snapshot's references; write its L1 copy and the new table.
        self.add_references(w, Scope::Active, 1)?;
        let cs = self.cluster_size();
        let l1_bytes = (l1.len() as u64 * 8).max(8);
        let l1_copy_at = self.allocate(w, l1_bytes.div_ceil(cs))?;
        let mut bytes = vec![0u8; l1_bytes as usize];
        format::encode_u64_table(&cleared, &mut bytes);
        self.storage
            .write_at(&bytes, l1_copy_at)
            .map_err(|e| Error::io("writing the snapshot's L1 table", e))?;
        entry.l1_table_offset = l1_copy_at;
        snapshots.push(entry.clone());
        self.switch_snapshot_table(w, snapshots)?;
        Ok(entry)
    }

    fn delete_locked(&self, w: &mut Writer, id_or_name: &str) -> Result<()> {
        let index = self.find_snapshot(id_or_name)?;
        let mut snapshots = self.meta().snapshots.clone();
        let scope = self.snapshot_scope(index);
        let gone = snapshots.remove(index);
        // 1. The table without it; 2. its references dropped; 3. COPIED where now alone.
        self.switch_snapshot_table(w, snapshots)?;
        self.add_references(w, scope, -1)?;
        self.drop_l1_clusters(w, gone.l1_table_offset, gone.l1_size)?;
        w.refcounts.write_dirty(&*self.storage)?;
        self.sync()?;
        self.recompute_copied(w)
    }

    fn apply_locked(&self, w: &mut Writer, id_or_name: &str) -> Result<()> {
        let index = self.find_snapshot(id_or_name)?;
        let snapshot = self.meta().snapshots[index].clone();
        let target = self.read_l1(snapshot.l1_table_offset, snapshot.l1_size)?;
        let header = self.header();
        // The old active table, on disk as in memory after the checkpoint.
        let old = Scope::L1Table {
            owner: Owner::Active,
            offset: header.l1_table_offset,
            entries: header.l1_size,
        };
        let size = snapshot.extra.disk_size.unwrap_or(header.size);
        let geometry = self.geometry;
        let needed = geometry.l1_entries_for(size).unwrap_or(u64::MAX);
        let entries = (target.len() as u64).max(needed);
        if entries * 8 > format::MAX_L1_BYTES {
            return Err(Error::corrupt(
                "snapshot table",
                header.snapshots_offset,
                "snapshot L1 table too large",
            ));
        }
        // 1. The active image is about to reference the snapshot's clusters.
        self.add_references(w, self.snapshot_scope(index), 1)?;
        let cs = self.cluster_size();
        let at = self.allocate(w, (entries * 8).max(8).div_ceil(cs))?;
        let mut l1: Vec<u64> = target
            .iter()
            .map(|&e| L1Entry(e).with_copied(false).0)
            .collect();
        l1.resize(entries as usize, 0);
        let mut bytes = vec![0u8; (entries * 8) as usize];
        format::encode_u64_table(&l1, &mut bytes);
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| Error::io("writing the new active L1 table", e))?;
        w.refcounts.write_dirty(&*self.storage)?;
        self.sync()?;
        // 2. Switch the header to it in one write.
        {
            let mut meta = self.meta_mut();
            meta.header.l1_table_offset = at;
            meta.header.l1_size = entries as u32;
            meta.header.size = size;
            meta.l1 = l1;
        }
        self.write_header()?;
        self.sync()?;
        // 3. Drop the old active image's references; 4. COPIED where now alone.
        self.add_references(w, old, -1)?;
        self.drop_l1_clusters(w, header.l1_table_offset, header.l1_size)?;
        w.refcounts.write_dirty(&*self.storage)?;
        self.sync()?;
        self.recompute_copied(w)
    }

    /// The L1 table of snapshot `index`, as a scope of the reference walker.
    fn snapshot_scope(&self, index: usize) -> Scope {
        let snapshot = &self.meta().snapshots[index];
        Scope::L1Table {
            owner: Owner::Snapshot(index),
            offset: snapshot.l1_table_offset,
            entries: snapshot.l1_size,
        }
    }

    fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = self.read_metadata("snapshot L1 table", offset, u64::from(entries) * 8)?;
        Ok(format::decode_u64_table(&bytes))
    }

    fn drop_l1_clusters(&self, w: &mut Writer, offset: u64, entries: u32) -> Result<()> {
        if entries == 0 || offset == 0 {
            return Ok(());
        }
        let cb = self.geometry.cluster_bits();
        let clusters = (u64::from(entries) * 8).div_ceil(self.cluster_size());
        w.refcounts.add(&*self.storage, offset >> cb, clusters, -1)
    }

    /// Adds `delta` to the refcount of every L2 table the L1 table of `scope` points at
    /// and of every cluster those tables map (once per reference, as QEMU counts them).
    fn add_references(&self, w: &mut Writer, scope: Scope, delta: i64) -> Result<()> {
        self.for_each_reference(scope, |first, count| {
            w.refcounts.add(&*self.storage, first, count, delta)
        })
    }

    /// Refuses, before anything changes, to add the references of `scope` (see
    /// `add_references`) where a refcount cannot count them: narrow refcounts
    /// (1 bit: no cluster can be shared at all) or a host cluster packed with compressed
    /// clusters up to its width's maximum. QEMU refuses these too (EINVAL), but only
    /// after it has changed the image.
    fn check_references_fit(&self, w: &mut Writer, scope: Scope) -> Result<()> {
        let mut adds: HashMap<u64, u64> = HashMap::new();
        self.for_each_reference(scope, |first, count| {
            for c in first..first + count {
                *adds.entry(c).or_default() += 1;
            }
            Ok(())
        })?;
        let order = self.header().refcount_order;
        let max = format::max_refcount(order);
        let mut clusters: Vec<(u64, u64)> = adds.into_iter().collect();
        clusters.sort_unstable();
        for (cluster, more) in clusters {
            let now = w.refcounts.get(&*self.storage, cluster)?;
            if now.saturating_add(more) > max {
                return Err(Error::InvalidArgument(format!(
                    "{}-bit refcounts cannot count the snapshot's references: the cluster at \
                     {:#x} has {now} and would need {more} more",
                    1u32 << order,
                    cluster << self.geometry.cluster_bits()
                )));
            }
        }
        Ok(())
    }

    /// Calls `f(first cluster, count)` once per reference the L1 table of `scope` makes:
    /// each L2 table it points at, each data (or preallocated zero) cluster and the host
    /// clusters of each compressed cluster those tables map, as the one reference walker
    /// finds them. Damage the walker reports is an error here: a snapshot operation
    /// counts references exactly or not at all.
    fn for_each_reference(
        &self,
        scope: Scope,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let cb = self.geometry.cluster_bits();
        let mut failure = None;
        self.walk_references(scope, &mut |event| {
            if failure.is_some() {
                return;
            }
            let counted = match event {
                Event::Problem(p) => Err(Error::corrupt("image", 0, p.message)),
                // The L1 table itself is the caller's to count.
                Event::Reference(r) if r.kind == ReferenceKind::L1Table => Ok(()),
                // Host offset 0 with the COPIED flag is no cluster: it reads as
                // unallocated (see the lookup).
                Event::Reference(r) if r.kind == ReferenceKind::Data && r.offset == 0 => Ok(()),
                Event::Reference(r) => {
                    let first = r.offset >> cb;
                    let last = (r.offset + r.len - 1) >> cb;
                    f(first, last - first + 1)
                }
            };
            if let Err(e) = counted {
                failure = Some(e);
            }
        })?;
        failure.map_or(Ok(()), Err)
    }

    /// Sets COPIED exactly where the refcount is one, in the active L2 tables and L1.
    fn recompute_copied(&self, w: &mut Writer) -> Result<()> {
        let g = self.geometry;
        let cb = g.cluster_bits();
        let mut l1 = self.meta().l1.clone();
        for raw in l1.iter_mut() {
            let l2 = L1Entry(*raw).l2_offset();
            if l2 == 0 {
                continue;
            }
            let shared_table = w.refcounts.get(&*self.storage, l2 >> cb)? != 1;
            *raw = L1Entry::new(l2, !shared_table).0;
            if shared_table {
                continue; // entries of a shared table are not accurate; leave them
            }
            let mut error = None;
            self.rewrite_l2(l2, |_, word| {
                let e = L2Entry(word);
                let d = match e.decode(g) {
                    Ok(d) => d,
                    Err(_) => return word,
                };
                let host = match d {
                    ClusterDescriptor::Data { host, .. }
                    | ClusterDescriptor::Zero { host: Some(host) }
                        if host != 0 =>
                    {
                        host
                    }
                    _ => return e.with_copied(false).0,
                };
                match w.refcounts.get(&*self.storage, host >> cb) {
                    Ok(n) => e.with_copied(n == 1).0,
                    Err(err) => {
                        error = Some(err);
                        word
                    }
                }
            })?;
            if let Some(e) = error {
                return Err(e);
            }
        }
        self.write_active_l1(&l1)?;
        self.meta_mut().l1 = l1;
        self.sync()
    }

    /// Rewrites the L2 table at `offset` in place, entry by entry (the first word of each
    /// extended entry), with `change(index, entry)`.
    fn rewrite_l2(&self, offset: u64, mut change: impl FnMut(usize, u64) -> u64) -> Result<()> {
        let bytes = self.read_metadata("L2 table", offset, self.cluster_size())?;
        let mut table = format::decode_u64_table(&bytes);
        let step = if self.geometry.extended_l2() { 2 } else { 1 };
        let mut changed = false;
        for (i, e) in table.iter_mut().step_by(step).enumerate() {
            let new = change(i, *e);
            changed |= new != *e;
            *e = new;
        }
        if changed {
            let mut out = vec![0u8; bytes.len()];
            format::encode_u64_table(&table, &mut out);
            self.storage
                .write_at(&out, offset)
                .map_err(|e| Error::io(format!("writing L2 table at {offset:#x}"), e))?;
        }
        Ok(())
    }

    fn write_active_l1(&self, l1: &[u64]) -> Result<()> {
        let at = self.header().l1_table_offset;
        let mut bytes = vec![0u8; l1.len() * 8];
        format::encode_u64_table(l1, &mut bytes);
        self.storage
            .write_at(&bytes, at)
            .map_err(|e| Error::io("writing the L1 table", e))
    }

    /// Writes `snapshots` as a new table, switches the header to it in one write, then
    /// frees the old table.
    pub(crate) fn switch_snapshot_table(
        &self,
        w: &mut Writer,
        snapshots: Vec<SnapshotEntry>,
    ) -> Result<()> {
        let cb = self.geometry.cluster_bits();
        let cs = self.cluster_size();
        let bytes: Vec<u8> = snapshots.iter().flat_map(|s| s.encode()).collect();
        let at = if bytes.is_empty() {
            0
        } else {
            let at = self.allocate(w, (bytes.len() as u64).div_ceil(cs))?;
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| Error::io("writing the snapshot table", e))?;
            at
        };
        w.refcounts.write_dirty(&*self.storage)?;
        self.sync()?;
        let (old_at, old_len) = {
            let mut meta = self.meta_mut();
            let old_len = format::snapshot_table_len(&meta.snapshots);
            let old_at = meta.header.snapshots_offset;
            meta.header.snapshots_offset = at;
            meta.header.nb_snapshots = snapshots.len() as u32;
            meta.snapshots = snapshots;
            (old_at, old_len)
        };
        self.write_header()?;
        self.sync()?;
        if old_len > 0 && old_at != 0 {
            w.refcounts
                .add(&*self.storage, old_at >> cb, old_len.div_ceil(cs), -1)?;
        }
        w.refcounts.write_dirty(&*self.storage)?;
        self.sync()
    }
}
