//! The one lookup API: what a guest range is in one image, as runs (ARCHITECTURE.md, "The
//! one lookup API"), and the L1 and L2 tables it reads.
//!
//! Read, map, convert, checksum, write, commit and pull all iterate these runs; nothing
//! else walks L2 tables for guest ranges.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{self, ClusterDescriptor, Geometry, L1Entry, L2Entry, SubclusterBitmap};

use super::image::Image;
use super::l2cache::L2Table;
use super::mapping::{Mapping, Run, RunCursor};

/// The first cluster boundary from `from` (one) on, before `end` (inside `from`'s L2
/// table), whose entry has a non-zero word; `end` if there is none.
fn skip_zero_entries(table: &[u64], g: Geometry, from: u64, end: u64) -> u64 {
    let words = if g.extended_l2() { 2 } else { 1 };
    let first = g.l2_index(from) as usize * words;
    let clusters = (end - from).div_ceil(g.cluster_size()) as usize;
    let Some(entries) = table.get(first..first + clusters * words) else {
        return from;
    };
    let zero_words = entries
        .iter()
        .position(|&w| w != 0)
        .unwrap_or(entries.len());
    (from + (zero_words / words) as u64 * g.cluster_size()).min(end)
}

impl Image {
    /// L1 entry `index` of the active table (unallocated past its end), refused when it
    /// points at an unaligned L2 table.
    pub(crate) fn l1_entry(&self, index: u64) -> Result<L1Entry> {
        let meta = self.meta();
        let raw = usize::try_from(index)
            .ok()
            .and_then(|i| meta.l1.get(i))
            .copied()
            .unwrap_or(0);
        let entry = L1Entry(raw);
        let l2 = entry.l2_offset();
        if l2 != 0 && l2 % self.cluster_size() != 0 {
            return Err(Error::corrupt(
                "L1 table",
                meta.header.l1_table_offset,
                format!("entry {index} points at unaligned L2 table {l2:#x}"),
            ));
        }
        Ok(entry)
    }

    /// The L2 table at `offset`, through the cache.
    pub(crate) fn l2_table(&self, offset: u64) -> Result<L2Table> {
        if let Some(t) = self.l2_cache.get(offset) {
            return Ok(t);
        }
        let bytes = self.read_metadata("L2 table", offset, self.cluster_size())?;
        let table: L2Table = Arc::new(format::decode_u64_table(&bytes));
        self.l2_cache.insert(offset, table.clone());
        Ok(table)
    }

    /// The mapping at `offset` and how far it extends, up to `max_len` bytes and at most to
    /// the end of one L2 table's span. `offset` must be below the virtual size and
    /// `max_len` non-zero.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Result<Run> {
        self.find(offset, max_len)
            .map(|found| found.run)
            .map_err(|e| self.name_error(e))
    }

    /// The lookup: the run at `offset` (see [`Image::lookup`]), and what the L2 entry of its
    /// first (sub)cluster says beyond the run's mapping.
    fn find(&self, offset: u64, max_len: u64) -> Result<Found> {
        let size = self.size();
        if offset >= size || max_len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: max_len,
                size,
            });
        }
        let g = self.geometry();
        let span_end = (g.l1_index(offset) + 1).saturating_mul(g.l2_span());
        let end = offset.saturating_add(max_len).min(size).min(span_end);
        let l2_offset = self.l1_entry(g.l1_index(offset))?.l2_offset();
        if l2_offset == 0 {
            return Ok(Found {
                run: Run {
                    offset,
                    len: end - offset,
                    mapping: Mapping::Unallocated,
                },
                l2_table: false,
                cluster_host: None,
            });
        }
        let table = self.l2_table(l2_offset)?;
        let unit = g.subcluster_size();
        let (first, cluster_host) = self.unit_mapping(&table, l2_offset, offset)?;
        let mut unit_end = (offset / unit + 1) * unit;
        if !matches!(first, Mapping::Compressed(_)) {
            while unit_end < end {
                if first == Mapping::Unallocated && unit_end % g.cluster_size() == 0 {
                    // Entries of all-zero words are unallocated: a sparse table's long
                    // unallocated runs are found without decoding each entry.
                    unit_end = skip_zero_entries(&table, g, unit_end, end);
                    if unit_end >= end {
                        break;
                    }
                }
                let (next, _) = self.unit_mapping(&table, l2_offset, unit_end)?;
                if !first.continued_by(next, unit_end - offset) {
                    break;
                }
                unit_end += unit;
            }
        } else {
            unit_end = g.cluster_start(offset) + g.cluster_size();
        }
        Ok(Found {
            run: Run {
                offset,
                len: unit_end.min(end) - offset,
                mapping: first,
            },
            l2_table: true,
            cluster_host,
        })
    }

    /// The mapping of the (sub)cluster holding guest `offset`, advanced to `offset`, and
    /// the host offset `offset` has in its cluster's host cluster, if the cluster has one.
    fn unit_mapping(
        &self,
        table: &[u64],
        l2_offset: u64,
        offset: u64,
    ) -> Result<(Mapping, Option<u64>)> {
        let g = self.geometry();
        let index = g.l2_index(offset) as usize;
        let words = if g.extended_l2() { 2 } else { 1 };
        let raw = L2Entry(table[index * words]);
        let corrupt = |reason: String| Error::corrupt("L2 table", l2_offset, reason);
        let descriptor = raw
            .decode(g)
            .map_err(|r| corrupt(format!("entry {index} ({:#018x}): {r}", raw.0)))?;
        let in_cluster = g.offset_in_cluster(offset);
        if let ClusterDescriptor::Compressed(d) = descriptor {
            if self.has_external_data_file() {
                return Err(corrupt(format!(
                    "entry {index}: compressed cluster in an image with an external data file"
                )));
            }
            return Ok((Mapping::Compressed(d), None));
        }
        // Host offset 0 with the COPIED flag is a real cluster only in an external data
        // file (where 0 is a valid offset). In the image file QEMU reads such an entry as
        // unallocated (the backing file shows through), so do the same rather than fail.
        let descriptor = match descriptor {
            ClusterDescriptor::Data { host: 0, .. } if !self.has_external_data_file() => {
                ClusterDescriptor::Unallocated
            }
            other => other,
        };
        let cluster_host = match descriptor {
            ClusterDescriptor::Data { host, .. } | ClusterDescriptor::Zero { host: Some(host) } => {
                Some(host + in_cluster)
            }
            _ => None,
        };
        if !g.extended_l2() {
            let mapping = match descriptor {
                ClusterDescriptor::Unallocated => Mapping::Unallocated,
                ClusterDescriptor::Zero { host } => Mapping::Zero {
                    host: host.map(|h| h + in_cluster),
                },
                ClusterDescriptor::Data { host, copied } => Mapping::Data {
                    host: host + in_cluster,
                    copied,
                },
                ClusterDescriptor::Compressed(d) => Mapping::Compressed(d),
            };
            return Ok((mapping, cluster_host));
        }
        let bitmap = SubclusterBitmap(table[index * 2 + 1]);
        let sc = in_cluster / g.subcluster_size();
        if bitmap.conflicting() != 0 {
            return Err(corrupt(format!(
                "entry {index}: subclusters both allocated and zero ({:#010x})",
                bitmap.conflicting()
            )));
        }
        let mapping = match descriptor {
            ClusterDescriptor::Data { host, copied } => {
                if bitmap.allocated(sc) {
                    Mapping::Data {
                        host: host + in_cluster,
                        copied,
                    }
                } else if bitmap.zero(sc) {
                    Mapping::Zero {
                        host: Some(host + in_cluster),
                    }
                } else {
                    Mapping::Unallocated
                }
            }
            _ => {
                if bitmap.any_allocated() {
                    return Err(corrupt(format!(
                        "entry {index}: subclusters allocated in a cluster without host offset"
                    )));
                }
                if bitmap.zero(sc) {
                    Mapping::Zero { host: None }
                } else {
                    Mapping::Unallocated
                }
            }
        };
        Ok((mapping, cluster_host))
    }

    /// The host offset that guest `offset` would have in its cluster's host allocation,
    /// and how many bytes from `offset` the answer holds for (at most to the end of the
    /// cluster; to the end of the L2 table's span when no L2 table is allocated). With
    /// extended L2 entries an unallocated subcluster of an allocated cluster keeps such a
    /// host offset (QEMU's `map` shows it); elsewhere it is the offset of data or
    /// preallocated zeros, and `None` for unallocated and compressed clusters. `offset`
    /// must be below the size. The answer comes from the lookup, as every other one.
    pub fn cluster_host(&self, offset: u64) -> Result<(Option<u64>, u64)> {
        self.cluster_host_inner(offset)
            .map_err(|e| self.name_error(e))
    }

    fn cluster_host_inner(&self, offset: u64) -> Result<(Option<u64>, u64)> {
        let g = self.geometry();
        let size = self.size();
        let cluster_end = (g.cluster_start(offset) + g.cluster_size()).min(size);
        let found = self.find(offset, cluster_end.saturating_sub(offset).max(1))?;
        if !found.l2_table {
            let span_end = (g.l1_index(offset) + 1)
                .saturating_mul(g.l2_span())
                .min(size);
            return Ok((None, span_end - offset));
        }
        Ok((found.cluster_host, found.run.len))
    }

    /// Iterates the runs covering `offset..offset + len` (clamped to the virtual size).
    pub fn runs(&self, offset: u64, len: u64) -> Runs<'_> {
        let end = offset.saturating_add(len).min(self.size());
        Runs {
            image: self,
            cursor: RunCursor::new(offset, end),
        }
    }
}

/// What [`Image::find`] found.
struct Found {
    run: Run,
    /// Whether an L2 table maps the run (else the whole rest of the span is unallocated).
    l2_table: bool,
    /// The host offset the run's first byte has in its cluster's host cluster, if the
    /// cluster has one (also where the run is unallocated or zero, with extended L2).
    cluster_host: Option<u64>,
}

/// Iterator over the runs of a guest range in one image; see [`Image::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    image: &'a Image,
    cursor: RunCursor,
}

impl Iterator for Runs<'_> {
    type Item = Result<Run>;

    fn next(&mut self) -> Option<Result<Run>> {
        let image = self.image;
        self.cursor.next(|at, len| image.lookup(at, len), Run::end)
    }
}
