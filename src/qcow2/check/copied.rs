//! COPIED flags (spec: bit 63 of L1 and L2 entries: the refcount is exactly one) checked
//! against the stored refcounts, and repaired.

use crate::error::{Error, Result};
use crate::format;

use crate::qcow2::image::Image;
use crate::qcow2::reference::{EntryAt, Event, ReferenceKind, Scope};
use crate::qcow2::stored_refcounts::StoredRefcounts;

use super::occupancy::Occupancy;
use super::report::{CheckReport, Severity};

impl Image {
    /// Checks the COPIED flag of every active L1 and L2 entry against the stored refcount
    /// (set exactly when it is one); with `fix`, rewrites the tables whose flags are wrong.
    pub(super) fn copied_flags(&self, fix: bool, report: &mut CheckReport) -> Result<()> {
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
            let fixed = at.with_copied(kind, refcount == 1);
            if !fix {
                report.note(Severity::Corruption, copied_message(kind, at, refcount));
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
                        "{} not repaired: its table at {:#x} overlaps other structures",
                        copied_message(kind, at, refcount),
                        at.table
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
            report.note(Severity::Repaired, copied_message(kind, at, refcount));
            report.corruptions_fixed += 1;
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

/// qemu-img's line for a wrong COPIED flag (after its "ERROR" or "Repairing").
fn copied_message(kind: ReferenceKind, at: EntryAt, refcount: u64) -> String {
    if kind == ReferenceKind::L2Table {
        format!(
            "OFLAG_COPIED L2 cluster: l1_index={} l1_entry={:x} refcount={refcount}",
            at.index, at.raw
        )
    } else {
        format!(
            "OFLAG_COPIED data cluster: l2_entry={:x} refcount={refcount}",
            at.raw
        )
    }
}
