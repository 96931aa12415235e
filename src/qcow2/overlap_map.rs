//! The map of metadata clusters the overlap checks (`overlap.rs`) consult: which clusters
//! hold the header, L1 tables, active L2 tables, refcount table and blocks, snapshot table,
//! bitmap directory and bitmap tables.

use std::collections::BTreeMap;

use super::reference::ReferenceKind;

/// Metadata clusters: cluster index -> a bit per [`ReferenceKind`] it holds (more than
/// one in a corrupt image).
#[derive(Debug, Default)]
pub(crate) struct MetadataMap {
    clusters: BTreeMap<u64, u16>,
}

impl MetadataMap {
    pub(super) fn add(&mut self, first: u64, end: u64, kind: ReferenceKind) {
        for c in first..end {
            *self.clusters.entry(c).or_default() |= kind.bit();
        }
    }

    /// The first cluster of `first..end` holding metadata other than `allowed`, and one
    /// such kind.
    pub(super) fn overlap(
        &self,
        first: u64,
        end: u64,
        allowed: Option<ReferenceKind>,
    ) -> Option<(u64, ReferenceKind)> {
        let allowed = allowed.map_or(0, ReferenceKind::bit);
        let (&cluster, &kinds) = self
            .clusters
            .range(first..end)
            .find(|(_, kinds)| **kinds & !allowed != 0)?;
        let kinds = kinds & !allowed;
        let kind = ReferenceKind::ALL
            .into_iter()
            .find(|k| kinds & k.bit() != 0)
            .expect("a bit is set");
        Some((cluster, kind))
    }
}
