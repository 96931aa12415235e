//! Every reference an image's metadata makes into its own file (spec: "Host cluster
//! management"): the header, the snapshot table, the refcount table and blocks, persistent
//! bitmaps, and the L1 tables of the active image and of each snapshot with the L2 tables
//! and data clusters they reach.
//!
//! One walk serves `check` (counting references to compare with the refcounts, and the
//! COPIED flags), its repair, the refcount rebuild of dirty images, and `du`'s space
//! accounting. The walk tolerates damage: what it cannot follow (an unaligned offset, a
//! table past the end of the file, an undecodable entry) is reported as a [`Problem`] and
//! skipped, never followed.

use crate::error::Result;
use crate::format::{self, BitmapTableEntry, ClusterDescriptor, L1Entry, L2Entry};

use super::image::Image;
use super::reference::{EntryAt, Event, Owner, Problem, Reference, ReferenceKind, Scope};

impl Image {
    /// Walks the references of `scope`, calling `visit` for each reference and problem.
    /// Errors are I/O errors; damage is reported as [`Event::Problem`].
    pub(crate) fn walk_references(&self, scope: Scope, visit: &mut dyn FnMut(Event)) -> Result<()> {
        let header = self.header();
        let cs = self.cluster_size();
        let file_len = self.file_len();
        // A reference starting a cluster or more past the end of the file is damage (QEMU
        // reads a compressed cluster's last bytes past the end as zeros, so a partial
        // overhang of data is not).
        let limit = file_len.div_ceil(cs) * cs;
        let mut refer = |visit: &mut dyn FnMut(Event),
                         owner: Owner,
                         kind: ReferenceKind,
                         offset: u64,
                         len: u64,
                         entry: Option<EntryAt>|
         -> bool {
            if len == 0 {
                return false;
            }
            // Tables are read whole, so they must lie inside the file.
            let limit = match kind {
                ReferenceKind::Data | ReferenceKind::Compressed => limit,
                _ => file_len,
            };
            let end = offset.checked_add(len);
            if end.is_none_or(|end| end > limit) {
                visit(Event::Problem(Problem {
                    message: format!(
                        "{} at {offset:#x} (size {len:#x}) lies past the end of the file \
                         ({file_len:#x} bytes)",
                        kind.name()
                    ),
                    refcount_structure: matches!(
                        kind,
                        ReferenceKind::RefcountBlock | ReferenceKind::RefcountTable
                    ),
                    unfollowed: entry.map(|e| (kind, e)),
                }));
                return false;
            }
            visit(Event::Reference(Reference {
                owner,
                kind,
                offset,
                len,
                entry,
            }));
            true
        };

        // The L1 tables to walk: (owner, offset, entries, whether it is the active table
        // in memory). Each owner's references come together, its L1 table first.
        let mut owners = match scope {
            Scope::L1Table {
                owner,
                offset,
                entries,
            } => vec![(owner, offset, entries, false)],
            _ => vec![(Owner::Active, header.l1_table_offset, header.l1_size, true)],
        };
        if scope == Scope::All {
            refer(visit, Owner::Image, ReferenceKind::Header, 0, cs, None);
            let snapshots = self.snapshots();
            if header.nb_snapshots > 0 {
                // A table past the end of the file (opened for a check, read as zeros
                // there) counts for what lies inside the file, as in QEMU, whose
                // in-memory refcounts grow to cover it.
                let table_len = format::snapshot_table_len(&snapshots)
                    .min(file_len.saturating_sub(header.snapshots_offset));
                refer(
                    visit,
                    Owner::Image,
                    ReferenceKind::SnapshotTable,
                    header.snapshots_offset,
                    table_len,
                    None,
                );
            }
            self.walk_refcount_structures(visit, &mut refer)?;
            self.walk_bitmaps(visit, &mut refer)?;
            owners.extend(
                snapshots
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (Owner::Snapshot(i), s.l1_table_offset, s.l1_size, false)),
            );
        }
        let external = self.has_external_data_file();
        let step = if self.geometry.extended_l2() { 2 } else { 1 };
        for (owner, l1_offset, l1_size, in_memory) in owners {
            let owner = &owner;
            let l1_offset = &l1_offset;
            let len = u64::from(l1_size) * 8;
            if *l1_offset % cs != 0 {
                visit(Event::Problem(Problem {
                    message: format!("L1 table offset {l1_offset:#x} is not cluster aligned"),
                    refcount_structure: false,
                    unfollowed: None,
                }));
                continue;
            }
            if !refer(visit, *owner, ReferenceKind::L1Table, *l1_offset, len, None) {
                continue;
            }
            let l1 = if in_memory {
                self.meta().l1.clone()
            } else {
                let structure = match owner {
                    Owner::Snapshot(_) => "snapshot L1 table",
                    _ => "L1 table",
                };
                format::decode_u64_table(&self.read_metadata(structure, *l1_offset, len)?)
            };
            for (l1_index, &raw) in l1.iter().enumerate() {
                let l2_offset = L1Entry(raw).l2_offset();
                if l2_offset == 0 {
                    continue;
                }
                let at = EntryAt {
                    table: *l1_offset,
                    index: l1_index,
                    raw,
                };
                if l2_offset % cs != 0 {
                    visit(Event::Problem(Problem {
                        message: format!(
                            "L1 table at {l1_offset:#x}, entry {l1_index}: L2 table offset \
                             {l2_offset:#x} is not cluster aligned"
                        ),
                        refcount_structure: false,
                        unfollowed: None,
                    }));
                    continue;
                }
                if !refer(
                    visit,
                    *owner,
                    ReferenceKind::L2Table,
                    l2_offset,
                    cs,
                    Some(at),
                ) {
                    continue;
                }
                let table = self.l2_table(l2_offset)?;
                for index in (0..table.len()).step_by(step) {
                    let raw = table[index];
                    let entry = L2Entry(raw);
                    let at = Some(EntryAt {
                        table: l2_offset,
                        index,
                        raw,
                    });
                    let problem = |message: String| {
                        Event::Problem(Problem {
                            message: format!(
                                "L2 table at {l2_offset:#x}, entry {}: {message}",
                                index / step
                            ),
                            refcount_structure: false,
                            unfollowed: None,
                        })
                    };
                    if entry.is_compressed() && entry.copied() && !self.geometry.extended_l2() {
                        visit(problem(
                            "the COPIED flag is set on a compressed cluster".into(),
                        ));
                    }
                    match entry.decode(self.geometry) {
                        Err(reason) => visit(problem(reason.into())),
                        Ok(
                            ClusterDescriptor::Data { host, .. }
                            | ClusterDescriptor::Zero { host: Some(host) },
                        ) if !external => {
                            refer(visit, *owner, ReferenceKind::Data, host, cs, at);
                        }
                        Ok(ClusterDescriptor::Compressed(c)) => {
                            refer(
                                visit,
                                *owner,
                                ReferenceKind::Compressed,
                                c.host_offset,
                                c.len,
                                at,
                            );
                        }
                        Ok(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    fn walk_refcount_structures(
        &self,
        visit: &mut dyn FnMut(Event),
        refer: &mut RefFn<'_>,
    ) -> Result<()> {
        let header = self.header();
        let cs = self.cluster_size();
        let len = u64::from(header.refcount_table_clusters) * cs;
        if !refer(
            visit,
            Owner::Image,
            ReferenceKind::RefcountTable,
            header.refcount_table_offset,
            len,
            None,
        ) {
            return Ok(());
        }
        let table = self.read_refcount_table()?;
        for (i, &offset) in table.iter().enumerate() {
            if offset == 0 {
                continue;
            }
            if offset % cs != 0 {
                visit(Event::Problem(Problem {
                    message: format!(
                        "refcount table entry {i}: refcount block offset {offset:#x} is not \
                         cluster aligned"
                    ),
                    refcount_structure: true,
                    unfollowed: None,
                }));
                continue;
            }
            refer(
                visit,
                Owner::Image,
                ReferenceKind::RefcountBlock,
                offset,
                cs,
                None,
            );
        }
        Ok(())
    }

    /// Bitmap directory, bitmap tables and their data clusters (spec: "Bitmaps"), when
    /// QEMU reads them: with the autoclear bit clear, they are stale and their clusters
    /// leaked, as `qemu-img check` counts them.
    fn walk_bitmaps(&self, visit: &mut dyn FnMut(Event), refer: &mut RefFn<'_>) -> Result<()> {
        let Some(ext) = self.live_bitmaps_extension() else {
            return Ok(());
        };
        let cs = self.cluster_size();
        let image = Owner::Image;
        let kind = ReferenceKind::Bitmap;
        if !refer(
            visit,
            image,
            kind,
            ext.directory_offset,
            ext.directory_size,
            None,
        ) {
            return Ok(());
        }
        let dir =
            self.read_metadata("bitmap directory", ext.directory_offset, ext.directory_size)?;
        let problem = |message: String| {
            Event::Problem(Problem {
                message,
                refcount_structure: false,
                unfollowed: None,
            })
        };
        let entries =
            match format::decode_bitmap_directory(&dir, ext.directory_offset, ext.nb_bitmaps, cs) {
                Ok(entries) => entries,
                Err(e) => {
                    visit(problem(e.to_string()));
                    return Ok(());
                }
            };
        for entry in entries {
            let (offset, len) = (entry.table_offset, u64::from(entry.table_size) * 8);
            if !refer(visit, image, kind, offset, len, None) {
                continue;
            }
            let table = self.read_metadata("bitmap table", offset, len)?;
            for (i, raw) in format::decode_u64_table(&table).into_iter().enumerate() {
                let entry = BitmapTableEntry(raw);
                match entry.check(cs) {
                    Err(reason) => visit(problem(format!(
                        "bitmap table at {offset:#x}, entry {i}: {reason}"
                    ))),
                    Ok(()) if entry.data_offset() != 0 => {
                        refer(visit, image, kind, entry.data_offset(), cs, None);
                    }
                    Ok(()) => {}
                }
            }
        }
        Ok(())
    }
}

type RefFn<'a> =
    dyn FnMut(&mut dyn FnMut(Event), Owner, ReferenceKind, u64, u64, Option<EntryAt>) -> bool + 'a;
