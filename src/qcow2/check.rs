//! Consistency check and repair, as `qemu-img check [-r leaks|all]`.
//!
//! The check counts every reference the metadata makes (see `references.rs`) and compares
//! the counts with the stored refcounts: a stored refcount above the count is a leak
//! (wasted space), below it a corruption (a later write could overwrite live data). It
//! also checks the COPIED flags of the active tables against the refcounts, and reports
//! what the walk could not follow (unaligned offsets, references past the end of the file,
//! undecodable entries).
//!
//! Repair order, each step flushed before the next so that a crash leaves at worst what
//! the next check repairs: refcounts first (in place, or a fresh refcount structure when
//! the old one is broken, switched in by one header write), then COPIED flags, which are
//! only set where the refcount on disk is already exactly one, then the header bits.

use std::collections::HashMap;
use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{
    self, IncompatibleFeatures, L2Entry, SubclusterBitmap, get_refcount, max_refcount, set_refcount,
};

use super::image::Image;
use super::refcount::Refcounts;
use super::reference::{EntryAt, Event, Owner, ReferenceKind, Scope};

/// Findings kept in a report; the counters stay exact beyond it.
const MAX_FINDINGS: usize = 1000;

/// What `repair` may fix (qemu-img's `-r leaks` and `-r all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (refcounts above the number of references).
    Leaks,
    /// Leaks and corruptions: refcounts too low or broken refcount structures (rebuilt),
    /// and wrong COPIED flags.
    All,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Data may be corrupted, or further writes may corrupt it.
    Corruption,
    /// Space is wasted, no harm to data.
    Leak,
    /// The check itself could not look at something.
    CheckError,
    /// Something that was found and fixed by the repair.
    Repaired,
}

/// One thing a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// What is wrong, naming the cluster or table.
    pub message: String,
}

/// The result of [`Image::check`] or [`Image::repair`], with `qemu-img check`'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems the check could not look into (I/O errors, a rebuild `-r leaks` may not do).
    pub check_errors: u64,
    /// Corruptions remaining.
    pub corruptions: u64,
    /// Leaked clusters remaining.
    pub leaks: u64,
    /// Corruptions the repair fixed.
    pub corruptions_fixed: u64,
    /// Leaked clusters the repair fixed.
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a refcount).
    pub image_end_offset: u64,
    /// Guest clusters (virtual size in clusters).
    pub total_clusters: u64,
    /// Guest clusters the active image allocates (data, preallocated zero, compressed).
    pub allocated_clusters: u64,
    /// Allocated clusters not placed right after the previous one of their L2 table.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// What was found, at most 1000 entries (the counters are exact).
    pub findings: Vec<Finding>,
    /// Findings left out of `findings`.
    pub findings_omitted: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 the check could not complete, 2
    /// corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// No corruption, leak or check error remains.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    fn note(&mut self, severity: Severity, message: String) {
        match severity {
            Severity::Corruption => self.corruptions += 1,
            Severity::Leak => self.leaks += 1,
            Severity::CheckError => self.check_errors += 1,
            Severity::Repaired => {}
        }
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(Finding { severity, message });
        } else {
            self.findings_omitted += 1;
        }
    }
}

/// What one pass over the image learned, beyond the report.
struct Examination {
    report: CheckReport,
    /// The refcount structures are broken: only a rebuild fixes them.
    rebuild: bool,
    /// Clusters whose stored refcount differs from their references: (cluster, count).
    mismatches: Vec<(u64, u64)>,
    /// References per host cluster.
    counts: Vec<u32>,
    /// Clusters of the refcount table and blocks (left out of a rebuilt structure).
    refcount_clusters: Vec<u64>,
}

/// What each cluster of the file holds: a bit per [`ReferenceKind`]. A repair only
/// rewrites a table whose clusters hold nothing else, so a corrupt image that places an L2
/// table over its header, a refcount block or guest data never gets them overwritten.
struct Occupancy {
    kinds: Vec<u16>,
    cluster_bits: u32,
}

impl Occupancy {
    fn of(image: &Image) -> Result<Occupancy> {
        let cb = image.geometry.cluster_bits();
        let mut kinds = vec![0u16; image.file_len().div_ceil(image.cluster_size()) as usize];
        image.walk_references(Scope::All, &mut |event| {
            if let Event::Reference(r) = event {
                for c in r.offset >> cb..=(r.offset + r.len - 1) >> cb {
                    kinds[c as usize] |= 1 << r.kind as u16;
                }
            }
        })?;
        Ok(Occupancy {
            kinds,
            cluster_bits: cb,
        })
    }

    /// Every cluster of `offset..offset + len` holds only `kind` (and is not the header).
    fn holds_only(&self, offset: u64, len: u64, kind: ReferenceKind) -> bool {
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        first > 0
            && (first..=last).all(|c| {
                self.kinds
                    .get(c as usize)
                    .is_some_and(|&k| k == 1 << kind as u16)
            })
    }
}

/// Stored refcounts, read straight from the refcount table and blocks, tolerating damage:
/// a refcount the structures cannot give (no block, a block offset that is unaligned or
/// past the end of the file) reads as 0.
struct StoredRefcounts<'a> {
    image: &'a Image,
    table: Vec<u64>,
    order: u32,
    per_block: u64,
    blocks: HashMap<usize, Block>,
}

impl<'a> StoredRefcounts<'a> {
    fn new(image: &'a Image) -> StoredRefcounts<'a> {
        let header = image.header();
        StoredRefcounts {
            image,
            table: image.read_refcount_table().unwrap_or_default(),
            order: header.refcount_order,
            per_block: (image.cluster_size() * 8) >> header.refcount_order,
            blocks: HashMap::new(),
        }
    }

    /// The stored refcount of `cluster`; `None` when the refcount table entry covering it
    /// is unusable (unaligned, or past the end of the file).
    fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
        let index = (cluster / self.per_block) as usize;
        if !self.blocks.contains_key(&index) {
            if self.blocks.len() >= 64 {
                self.blocks.clear();
            }
            let cs = self.image.cluster_size();
            let block = match self.table.get(index) {
                None | Some(0) => Block::Missing,
                Some(&offset) if offset % cs != 0 => Block::Unusable,
                Some(&offset) => match self.image.read_metadata("refcount block", offset, cs) {
                    Ok(bytes) => Block::Read(bytes),
                    Err(Error::Truncated { .. }) => Block::Unusable,
                    Err(e) => return Err(e),
                },
            };
            self.blocks.insert(index, block);
        }
        Ok(match &self.blocks[&index] {
            Block::Read(bytes) => Some(get_refcount(
                bytes,
                (cluster % self.per_block) as usize,
                self.order,
            )),
            Block::Missing => Some(0),
            Block::Unusable => None,
        })
    }
}

/// A refcount block as [`StoredRefcounts`] found it.
enum Block {
    Read(Vec<u8>),
    /// No block: every refcount it would hold is 0.
    Missing,
    /// The table entry cannot be followed.
    Unusable,
}

impl Image {
    /// Checks the image as `qemu-img check` does, changing nothing.
    pub fn check(&self) -> Result<CheckReport> {
        let _io = self.io_lock.read().unwrap_or_else(PoisonError::into_inner);
        Ok(self.examine()?.report)
    }

    /// Checks the image and repairs what `mode` allows, as `qemu-img check -r`. The image
    /// file must be writable (see [`Image::open_for_repair`]). The report counts what was
    /// fixed and what remains.
    pub fn repair(&self, mode: RepairMode) -> Result<CheckReport> {
        if self.storage.is_read_only() {
            return Err(Error::ReadOnly {
                reason: "repairing needs the image opened for writing",
            });
        }
        let _io = self.io_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut writer = match &self.writer {
            Some(w) => {
                let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
                self.checkpoint(&mut w)?;
                Some(w)
            }
            None => None,
        };
        let report = self.repair_locked(mode)?;
        if let Some(w) = writer.as_deref_mut() {
            let header = self.header();
            w.refcounts = Refcounts::load(
                &*self.storage,
                header.cluster_bits,
                header.refcount_order,
                header.refcount_table_offset,
                header.refcount_table_clusters,
                self.file_len(),
            )?;
            self.refresh_overlap_map(w);
        }
        Ok(report)
    }

    /// [`Image::repair`] with exclusive access held and nothing pending in memory.
    pub(crate) fn repair_locked(&self, mode: RepairMode) -> Result<CheckReport> {
        let mut before = self.examine()?;
        let flags = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
        if before.report.is_clean() && !self.header().incompatible_features.intersects(flags) {
            return Ok(before.report);
        }
        let (leaks_before, corruptions_before) = (before.report.leaks, before.report.corruptions);
        let mut fixes = CheckReport::default();
        // Dangling pointers first: once anything is allocated at the end of the file they
        // would point into it.
        if mode == RepairMode::All && self.clear_dangling_entries(&mut fixes)? {
            self.sync()?;
            self.l2_cache.clear();
            before = self.examine()?;
        }
        if before.rebuild && mode == RepairMode::Leaks {
            let mut report = before.report;
            report.note(
                Severity::CheckError,
                "the refcount structures must be rebuilt, which only `-r all` does".into(),
            );
            return Ok(report);
        }
        let Examination {
            rebuild,
            mismatches,
            mut counts,
            refcount_clusters,
            ..
        } = before;
        if rebuild {
            for c in refcount_clusters {
                counts[c as usize] -= 1;
            }
            fixes.note(
                Severity::Repaired,
                "the refcount structures: rebuilt from the references".into(),
            );
            self.install_refcounts(&counts, self.header().refcount_order)?;
        } else {
            self.fix_refcounts_in_place(mode, &mismatches, &mut fixes)?;
        }
        drop(counts);
        if mode == RepairMode::All {
            self.copied_flags(true, &mut fixes)?;
        }
        self.sync()?;
        self.l2_cache.clear();

        let mut after = self.examine()?.report;
        if after.corruptions == 0
            && after.check_errors == 0
            && self.header().incompatible_features.intersects(flags)
        {
            self.meta_mut().header.incompatible_features -= flags;
            self.write_header()?;
            self.sync()?;
        }
        after.leaks_fixed = leaks_before.saturating_sub(after.leaks);
        after.corruptions_fixed = corruptions_before.saturating_sub(after.corruptions);
        let mut findings = fixes.findings;
        findings.append(&mut after.findings);
        findings.truncate(MAX_FINDINGS);
        after.findings = findings;
        Ok(after)
    }

    /// One read-only pass: references counted, compared with the stored refcounts, COPIED
    /// flags checked.
    fn examine(&self) -> Result<Examination> {
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let header = self.header();
        let nb_clusters = self.file_len().div_ceil(cs);
        let mut report = CheckReport {
            total_clusters: header.size.div_ceil(cs),
            ..CheckReport::default()
        };
        let mut counts = vec![0u32; nb_clusters as usize];
        let mut rebuild = false;
        let mut refcount_clusters = Vec::new();
        let mut next_contiguous: Option<u64> = None;
        self.walk_references(Scope::All, &mut |event| match event {
            Event::Problem(p) => {
                rebuild |= p.refcount_structure;
                report.note(Severity::Corruption, p.message);
            }
            Event::Reference(r) => {
                let first = r.offset >> cb;
                let last = (r.offset + r.len - 1) >> cb;
                for c in first..=last {
                    let n = &mut counts[c as usize];
                    *n = n.saturating_add(1);
                }
                if matches!(
                    r.kind,
                    ReferenceKind::RefcountTable | ReferenceKind::RefcountBlock
                ) {
                    refcount_clusters.extend(first..=last);
                }
                if r.owner == Owner::Active {
                    match r.kind {
                        ReferenceKind::L2Table => next_contiguous = None,
                        ReferenceKind::Data => {
                            report.allocated_clusters += 1;
                            if next_contiguous.is_some_and(|n| n != r.offset) {
                                report.fragmented_clusters += 1;
                            }
                            next_contiguous = Some(r.offset + cs);
                        }
                        ReferenceKind::Compressed => {
                            report.allocated_clusters += 1;
                            report.compressed_clusters += 1;
                            report.fragmented_clusters += 1;
                        }
                        _ => {}
                    }
                }
            }
        })?;

        let max = max_refcount(header.refcount_order);
        let mut stored = StoredRefcounts::new(self);
        let mut mismatches = Vec::new();
        let mut highest = None;
        for c in 0..nb_clusters {
            let want = u64::from(counts[c as usize]);
            let Some(have) = stored.get(c)? else {
                // As qemu-img: a refcount that cannot be read is a check error; the
                // rebuild (the table entry was reported) repairs it.
                report.note(
                    Severity::CheckError,
                    format!(
                        "cannot read the refcount of cluster {c}: its refcount block is unusable"
                    ),
                );
                if want > 0 {
                    highest = Some(c);
                    mismatches.push((c, want));
                }
                rebuild = true;
                continue;
            };
            if have > 0 || want > 0 {
                highest = Some(c);
            }
            if want > max {
                report.note(
                    Severity::Corruption,
                    format!(
                        "cluster {c} has {want} references, more than {}-bit refcounts hold",
                        1u32 << header.refcount_order
                    ),
                );
                continue;
            }
            if have == want {
                continue;
            }
            if have < want {
                rebuild |= have == 0;
                report.note(
                    Severity::Corruption,
                    format!("cluster {c} refcount={have} reference={want}"),
                );
            } else {
                report.note(
                    Severity::Leak,
                    format!("cluster {c} refcount={have} reference={want}"),
                );
            }
            mismatches.push((c, want));
        }
        for &c in &refcount_clusters {
            if counts[c as usize] != 1 {
                rebuild = true;
            }
        }
        report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);
        self.copied_flags(false, &mut report)?;
        Ok(Examination {
            report,
            rebuild,
            mismatches,
            counts,
            refcount_clusters,
        })
    }

    /// Entries pointing past the end of the file (L2 tables, data, compressed clusters) are
    /// rewritten to read as they read now, zeros: a data or compressed entry becomes a zero
    /// cluster (unallocated in version 2), an L1 entry unallocated. Each is one 8-byte (or
    /// 16-byte) write, safe at any moment. Returns whether anything was rewritten.
    fn clear_dangling_entries(&self, fixes: &mut CheckReport) -> Result<bool> {
        let mut dangling = Vec::new();
        self.walk_references(Scope::All, &mut |event| {
            if let Event::Problem(p) = event {
                if let Some((kind, at)) = p.unfollowed {
                    dangling.push((kind, at));
                }
            }
        })?;
        let v3 = self.header().version >= 3;
        let extended = self.geometry.extended_l2();
        let l1_offset = self.header().l1_table_offset;
        let occupancy = Occupancy::of(self)?;
        let mut changed = false;
        for &(kind, at) in &dangling {
            let table_kind = if kind == ReferenceKind::L2Table {
                ReferenceKind::L1Table
            } else {
                ReferenceKind::L2Table
            };
            if !occupancy.holds_only(at.table + at.index as u64 * 8, 16, table_kind) {
                fixes.note(
                    Severity::CheckError,
                    format!(
                        "entry {} of the table at {:#x} points past the end of the file, but \
                         the table overlaps other structures: left as it is",
                        at.index, at.table
                    ),
                );
                continue;
            }
            changed = true;
            let mut bytes = Vec::with_capacity(16);
            let what = match kind {
                ReferenceKind::L2Table => {
                    bytes.extend_from_slice(&0u64.to_be_bytes());
                    "L2 table"
                }
                _ if extended => {
                    // All subclusters read as zeros.
                    bytes.extend_from_slice(&0u64.to_be_bytes());
                    bytes.extend_from_slice(&SubclusterBitmap::ALL_ZERO.0.to_be_bytes());
                    "cluster"
                }
                _ => {
                    let entry = if v3 { L2Entry::zero(None, false).0 } else { 0 };
                    bytes.extend_from_slice(&entry.to_be_bytes());
                    "cluster"
                }
            };
            self.storage
                .write_at(&bytes, at.table + at.index as u64 * 8)
                .map_err(|e| Error::io("clearing an entry that points past the end", e))?;
            if kind == ReferenceKind::L2Table && at.table == l1_offset {
                if let Some(e) = self.meta_mut().l1.get_mut(at.index) {
                    *e = 0;
                }
            }
            fixes.note(
                Severity::Repaired,
                format!(
                    "entry {} of the table at {:#x} pointed at a {what} past the end of the \
                     file ({:#x}); it now reads as zeros",
                    at.index, at.table, at.raw
                ),
            );
        }
        Ok(changed)
    }

    /// Sets stored refcounts to the reference counts, block by block, where `mode` allows.
    fn fix_refcounts_in_place(
        &self,
        mode: RepairMode,
        mismatches: &[(u64, u64)],
        fixes: &mut CheckReport,
    ) -> Result<()> {
        let header = self.header();
        let cs = self.cluster_size();
        let order = header.refcount_order;
        let per_block = (cs * 8) >> order;
        let table = self.read_refcount_table()?;
        let mut block: Option<(u64, Vec<u8>)> = None;
        let write = |block: &Option<(u64, Vec<u8>)>| -> Result<()> {
            if let Some((offset, bytes)) = block {
                self.storage
                    .write_at(bytes, *offset)
                    .map_err(|e| Error::io("writing a repaired refcount block", e))?;
            }
            Ok(())
        };
        for &(cluster, want) in mismatches {
            let offset = table[(cluster / per_block) as usize];
            if block.as_ref().is_none_or(|(o, _)| *o != offset) {
                write(&block)?;
                block = Some((offset, self.read_metadata("refcount block", offset, cs)?));
            }
            let bytes = &mut block.as_mut().expect("loaded above").1;
            let index = (cluster % per_block) as usize;
            let have = get_refcount(bytes, index, order);
            let leak = have > want;
            if !leak && mode == RepairMode::Leaks {
                continue;
            }
            set_refcount(bytes, index, order, want);
            fixes.note(
                Severity::Repaired,
                format!("cluster {cluster} refcount={have} reference={want}"),
            );
        }
        write(&block)
    }

    /// Checks the COPIED flag of every active L1 and L2 entry against the stored refcount
    /// (set exactly when it is one); with `fix`, rewrites the tables whose flags are wrong.
    fn copied_flags(&self, fix: bool, report: &mut CheckReport) -> Result<()> {
        let mut stored = StoredRefcounts::new(self);
        let cb = self.geometry.cluster_bits();
        let l1_offset = self.header().l1_table_offset;
        // The L2 table being repaired: offset and its (corrected) entries.
        let mut table: Option<(u64, Vec<u64>)> = None;
        let mut l1_changed = false;
        let mut wrong: Vec<(EntryAt, u64, ReferenceKind)> = Vec::new();
        let mut failure = None;
        self.walk_references(Scope::Active, &mut |event| {
            let (kind, at, refcount) = match event {
                Event::Reference(r) => match r.entry {
                    Some(at) => (r.kind, at, stored.get(r.offset >> cb)),
                    None => return,
                },
                // Nothing past the end of the file has a refcount.
                Event::Problem(p) => match p.unfollowed {
                    Some((kind, at)) => (kind, at, Ok(Some(0))),
                    None => return,
                },
            };
            if !matches!(kind, ReferenceKind::L2Table | ReferenceKind::Data) {
                return;
            }
            match refcount {
                Ok(None) => {}
                Ok(Some(refcount)) => {
                    if (refcount == 1) != at.copied(kind) {
                        wrong.push((at, refcount, kind));
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let write_table = |table: &Option<(u64, Vec<u64>)>| -> Result<()> {
            if let Some((offset, entries)) = table {
                let mut bytes = vec![0u8; entries.len() * 8];
                format::encode_u64_table(entries, &mut bytes);
                self.storage
                    .write_at(&bytes, *offset)
                    .map_err(|e| Error::io("writing a repaired L2 table", e))?;
            }
            Ok(())
        };
        let occupancy = if fix {
            Some(Occupancy::of(self)?)
        } else {
            None
        };
        let l1_len = self.meta().l1.len() as u64 * 8;
        for (at, refcount, kind) in wrong {
            let what = if kind == ReferenceKind::L2Table {
                "L2 cluster"
            } else {
                "data cluster"
            };
            let fixed = at.with_copied(kind, refcount == 1);
            if !fix {
                report.note(
                    Severity::Corruption,
                    format!(
                        "OFLAG_COPIED {what}: entry {:#x} (table {:#x}, index {}) refcount={refcount}",
                        at.raw, at.table, at.index
                    ),
                );
                continue;
            }
            let active_l1 = at.table == l1_offset && kind == ReferenceKind::L2Table;
            let (table_len, table_kind) = if active_l1 {
                (l1_len, ReferenceKind::L1Table)
            } else {
                (self.cluster_size(), ReferenceKind::L2Table)
            };
            if !occupancy
                .as_ref()
                .is_some_and(|o| o.holds_only(at.table, table_len, table_kind))
            {
                report.note(
                    Severity::Corruption,
                    format!(
                        "OFLAG_COPIED {what}: entry {:#x} refcount={refcount} not repaired: its \
                         table at {:#x} overlaps other structures",
                        at.raw, at.table
                    ),
                );
                continue;
            }
            if active_l1 {
                self.meta_mut().l1[at.index] = fixed;
                l1_changed = true;
            } else {
                if table.as_ref().is_none_or(|(o, _)| *o != at.table) {
                    write_table(&table)?;
                    let entries = (*self.l2_table(at.table)?).clone();
                    table = Some((at.table, entries));
                }
                table.as_mut().expect("loaded above").1[at.index] = fixed;
            }
            report.note(
                Severity::Repaired,
                format!(
                    "OFLAG_COPIED {what}: entry {:#x} refcount={refcount}",
                    at.raw
                ),
            );
        }
        write_table(&table)?;
        if l1_changed {
            let l1 = self.meta().l1.clone();
            let mut bytes = vec![0u8; l1.len() * 8];
            format::encode_u64_table(&l1, &mut bytes);
            self.storage
                .write_at(&bytes, l1_offset)
                .map_err(|e| Error::io("writing the repaired L1 table", e))?;
        }
        Ok(())
    }
}
