//! The check, as `qemu-img check`: every reference the metadata makes is counted (the one
//! walker, `references.rs`) and compared with the stored refcounts: a stored refcount
//! above the count is a leak (wasted space), below it a corruption (a later write could
//! overwrite live data). The COPIED flags of the active tables are checked against the
//! refcounts (`copied.rs`), and what the walk could not follow (unaligned offsets,
//! references past the end of the file, undecodable entries) is reported.

use std::sync::PoisonError;

use crate::error::Result;
use crate::format::max_refcount;

use crate::qcow2::image::Image;
use crate::qcow2::reference::{Event, Owner, ReferenceKind, Scope};
use crate::qcow2::stored_refcounts::StoredRefcounts;

use super::report::{CheckReport, Severity};

/// What one pass over the image learned, beyond the report.
pub(super) struct Examination {
    pub(super) report: CheckReport,
    /// The refcount structures are broken: only a rebuild fixes them.
    pub(super) rebuild: bool,
    /// Clusters whose stored refcount differs from their references: (cluster, count).
    pub(super) mismatches: Vec<(u64, u64)>,
    /// References per host cluster.
    pub(super) counts: Vec<u32>,
    /// Clusters of the refcount table and blocks (left out of a rebuilt structure).
    pub(super) refcount_clusters: Vec<u64>,
    /// Corruptions found before the COPIED flags were looked at (qemu-img's refcount
    /// phase, which its repair counts apart from the flags).
    pub(super) refcount_corruptions: u64,
    /// Where the COPIED findings start in `report.findings`.
    pub(super) copied_from: usize,
    /// Snapshot table entries without the extra data a version 3 image needs (they
    /// come first in `report.findings`); a repair rewrites the table.
    pub(super) incomplete_snapshots: usize,
}

impl Image {
    /// Checks the image as `qemu-img check` does, changing nothing.
    pub fn check(&self) -> Result<CheckReport> {
        let _io = self.io_lock.read().unwrap_or_else(PoisonError::into_inner);
        Ok(self.examine()?.report)
    }

    /// One read-only pass: references counted, compared with the stored refcounts, COPIED
    /// flags checked.
    pub(super) fn examine(&self) -> Result<Examination> {
        let cs = self.cluster_size();
        let cb = self.geometry.cluster_bits();
        let header = self.header();
        let nb_clusters = self.file_len().div_ceil(cs);
        let mut report = CheckReport {
            total_clusters: header.size.div_ceil(cs),
            ..CheckReport::default()
        };
        // As qemu-img, first: version 3 entries need the 64-bit VM state size and the
        // disk size in their extra data.
        let mut incomplete_snapshots = 0;
        if header.version >= 3 {
            for (i, s) in self.snapshots().iter().enumerate() {
                if s.extra.len() < 16 {
                    incomplete_snapshots += 1;
                    report.note(
                        Severity::Corruption,
                        format!("snapshot table entry {i} is incomplete"),
                    );
                }
            }
        }
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
        // A snapshot table past the end of the file (a check reads zeros there): QEMU's
        // in-memory refcounts grow to cover it, so its last cluster counts as in use.
        let table_len = crate::format::snapshot_table_len(&self.snapshots());
        if header.nb_snapshots > 0 && header.snapshots_offset + table_len > nb_clusters * cs {
            let last = (header.snapshots_offset + table_len - 1) >> cb;
            highest = highest.max(Some(last));
        }
        report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);
        let refcount_corruptions = report.corruptions - incomplete_snapshots as u64;
        let copied_from = report.findings.len();
        self.copied_flags(false, &mut report)?;
        Ok(Examination {
            report,
            rebuild,
            mismatches,
            counts,
            refcount_clusters,
            refcount_corruptions,
            copied_from,
            incomplete_snapshots,
        })
    }
}
