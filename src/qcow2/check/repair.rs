//! Repair, as `qemu-img check -r leaks|all`. Each step is flushed before the next, so that
//! a crash leaves at worst what the next check repairs: entries pointing past the end of
//! the file first, then refcounts (in place, or a fresh refcount structure when the old
//! one is broken, switched in by one header write), then COPIED flags, which are only set
//! where the refcount on disk is already exactly one, then the header bits. A final
//! read-only pass makes the report, so "fixed" is what the check no longer finds.

use std::sync::PoisonError;

use crate::error::{Error, Result};
use crate::format::{
    IncompatibleFeatures, L2Entry, SubclusterBitmap, get_refcount, refcounts_per_block,
    set_refcount,
};

use crate::qcow2::image::Image;
use crate::qcow2::reference::{Event, ReferenceKind, Scope};
use crate::qcow2::write::Writer;

use super::examine::Examination;
use super::occupancy::Occupancy;
use super::report::{CheckReport, Finding, MAX_FINDINGS, RepairMode, Severity};

impl Image {
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
            w.refcounts = self.load_refcounts()?;
            self.refresh_overlap_map(w);
        }
        Ok(report)
    }

    /// [`Image::repair`] with exclusive access held and nothing pending in memory.
    ///
    /// The log and the counters follow qemu-img: the first pass's findings, then each
    /// repair ("Repairing ...") or what may not be repaired, then the COPIED flags; a
    /// repaired leak or corruption counts as fixed once, flags vanishing with a refcount
    /// fix do not count; a rebuild fixes what the refcount phase found.
    pub(crate) fn repair_locked(&self, mode: RepairMode) -> Result<CheckReport> {
        let mut before = self.examine()?;
        let flags = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
        if before.report.is_clean() && !self.header().incompatible_features.intersects(flags) {
            return Ok(before.report);
        }
        // The log starts with what the first pass found, COPIED flags aside: those are
        // looked at once more after the refcounts are repaired.
        let mut fixes = CheckReport {
            findings: before.report.findings
                [..before.copied_from.min(before.report.findings.len())]
                .to_vec(),
            ..CheckReport::default()
        };
        let incomplete_snapshots = before.incomplete_snapshots;
        if mode == RepairMode::All {
            for f in fixes.findings.iter_mut().take(incomplete_snapshots) {
                f.severity = Severity::Repaired;
            }
        }
        let (leaks_before, refcount_corruptions_before) =
            (before.report.leaks, before.refcount_corruptions);
        // Dangling pointers first: once anything is allocated at the end of the file they
        // would point into it.
        if mode == RepairMode::All && self.clear_dangling_entries(&mut fixes)? {
            self.sync()?;
            self.l2_cache.clear();
            before = self.examine()?;
        }
        if before.rebuild && mode == RepairMode::Leaks {
            let mut report = before.report;
            report.repair_log = std::mem::take(&mut fixes.findings);
            report.repair_log.push(Finding {
                severity: Severity::CheckError,
                message: "need to rebuild refcount structures".into(),
            });
            report.check_errors += 1;
            return Ok(report);
        }
        let Examination {
            rebuild,
            mismatches,
            mut counts,
            refcount_clusters,
            refcount_corruptions,
            report: examined,
            ..
        } = before;
        if rebuild {
            for c in refcount_clusters {
                counts[c as usize] -= 1;
            }
            fixes.note(Severity::Repaired, "refcount structure: rebuilt".into());
            self.install_refcounts(&counts, self.header().refcount_order)?;
        } else {
            self.fix_refcounts_in_place(mode, &mismatches, &mut fixes)?;
        }
        drop(counts);
        self.sync()?;
        self.l2_cache.clear();
        // As qemu-img, -r leaks repairs the flags only when the refcounts are now right.
        let refcounts_right =
            examined.check_errors == 0 && (mode == RepairMode::All || refcount_corruptions == 0);
        self.copied_flags(refcounts_right, &mut fixes)?;
        self.sync()?;
        self.l2_cache.clear();
        if mode == RepairMode::All && incomplete_snapshots > 0 {
            self.rewrite_snapshot_table()?;
            fixes.corruptions_fixed += incomplete_snapshots as u64;
        }

        let last = self.examine()?;
        let mut after = last.report;
        if after.corruptions == 0
            && after.check_errors == 0
            && self.header().incompatible_features.intersects(flags)
        {
            self.meta_mut().header.incompatible_features -= flags;
            self.write_header()?;
            self.sync()?;
        }
        after.leaks_fixed = fixes.leaks_fixed;
        after.corruptions_fixed = fixes.corruptions_fixed;
        if rebuild {
            after.leaks_fixed += leaks_before;
            after.corruptions_fixed +=
                refcount_corruptions_before.saturating_sub(last.refcount_corruptions);
        }
        fixes.findings.truncate(MAX_FINDINGS);
        after.repair_log = fixes.findings;
        Ok(after)
    }

    /// Writes the snapshot table anew as QEMU writes one, at a fresh place (the old one
    /// is freed): every entry with the 64-bit VM state size, the disk size (the image's,
    /// where an incomplete entry lacks it) and the instruction count (-1: none).
    fn rewrite_snapshot_table(&self) -> Result<()> {
        let size = self.header().size;
        let snapshots = self
            .snapshots()
            .iter()
            .map(|s| {
                let mut s = s.clone();
                s.extra.vm_state_size_large = Some(s.vm_state_size());
                s.extra.disk_size.get_or_insert(size);
                s.extra.icount.get_or_insert(u64::MAX);
                s
            })
            .collect();
        let mut w = Writer::new(self.load_refcounts()?);
        self.refresh_overlap_map(&w);
        self.switch_snapshot_table(&mut w, snapshots)
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
            fixes.corruptions_fixed += 1;
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
        let per_block = refcounts_per_block(header.cluster_bits, order);
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
        let mut freed = Vec::new();
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
            let message = format!("cluster {cluster} refcount={have} reference={want}");
            if !leak && mode == RepairMode::Leaks {
                // qemu-img's second pass names it again, unrepaired.
                fixes.note(Severity::Corruption, message);
                continue;
            }
            set_refcount(bytes, index, order, want);
            if want == 0 {
                freed.push(cluster);
            }
            if leak {
                fixes.leaks_fixed += 1;
            } else {
                fixes.corruptions_fixed += 1;
            }
            fixes.note(Severity::Repaired, message);
        }
        write(&block)?;
        // As QEMU, which discards what a repair frees: the space goes back to the host
        // and the clusters read as zeros.
        for cluster in freed {
            self.storage
                .write_zeroes(cluster * cs, cs)
                .map_err(|e| Error::io("discarding a freed cluster", e))?;
        }
        Ok(())
    }
}
