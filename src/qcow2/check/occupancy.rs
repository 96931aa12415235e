//! What each cluster of the file holds, so that a repair never rewrites a table that
//! shares its clusters with anything else.

use crate::error::Result;

use crate::qcow2::image::Image;
use crate::qcow2::reference::{Event, ReferenceKind, Scope};

/// What each cluster of the file holds: a bit per [`ReferenceKind`]. A repair only
/// rewrites a table whose clusters hold nothing else, so a corrupt image that places an L2
/// table over its header, a refcount block or guest data never gets them overwritten.
pub(super) struct Occupancy {
    kinds: Vec<u16>,
    cluster_bits: u32,
}

impl Occupancy {
    pub(super) fn of(image: &Image) -> Result<Occupancy> {
        let cb = image.geometry.cluster_bits();
        let mut kinds = vec![0u16; image.file_len().div_ceil(image.cluster_size()) as usize];
        image.walk_references(Scope::All, &mut |event| {
            if let Event::Reference(r) = event {
                for c in r.offset >> cb..=(r.offset + r.len - 1) >> cb {
                    kinds[c as usize] |= r.kind.bit();
                }
            }
        })?;
        Ok(Occupancy {
            kinds,
            cluster_bits: cb,
        })
    }

    /// Every cluster of `offset..offset + len` holds only `kind` (and is not the header).
    pub(super) fn holds_only(&self, offset: u64, len: u64, kind: ReferenceKind) -> bool {
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        first > 0
            && (first..=last).all(|c| self.kinds.get(c as usize).is_some_and(|&k| k == kind.bit()))
    }
}
