//! The allocation map of a chain, extent by extent, as `qemu-img map --output=json` shows it.
//!
//! Every extent says which layer decides the range (`depth`), whether that layer allocates
//! it (`present`), whether it reads as zeros (`zero`), whether it has stored data (`data`,
//! also true for a data cluster whose host range is a hole in the file), whether it is
//! compressed, and where the bytes live (`offset`, in the layer's data file). Adjacent
//! extents with the same attributes merge; data extents only when their offsets continue.
//!
//! QEMU's rules, matched here:
//! - A range no layer allocates is reported at the bottom layer: `present: false,
//!   zero: true`. Past the end of a shorter backing file, the overlay above it reports
//!   the zeros.
//! - Holes in the file under a data cluster are `zero: true, data: true`, but only in an
//!   image that looks metadata-preallocated ([`crate::Image::looks_metadata_preallocated`]):
//!   elsewhere QEMU does not ask the file system. Holes in a raw layer are `zero: true, data: false, present: true`.
//! - Compressed clusters have no `offset`.
//! - With extended L2 entries, an unallocated subcluster of an allocated cluster shows its
//!   cluster's host offset.

use std::collections::VecDeque;

use crate::chain::{Chain, ChainRun, ChainRuns};
use crate::error::Result;
use crate::layers::Layer;
use crate::qcow2::Mapping;
use crate::storage::Extent;

/// One extent of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that decides the content (0 = top).
    pub depth: usize,
    /// Whether that layer allocates the range (as data or zeros).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the layer stores data for the range.
    pub data: bool,
    /// Whether the range is a compressed cluster.
    pub compressed: bool,
    /// Offset of the first byte in the layer's data file, when known.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// Guest offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }

    /// Whether `next`, which starts where this ends, can be folded into this entry.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.end() == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// The merged map of `chain` over its whole virtual size.
pub fn map(chain: &Chain) -> MapEntries<'_> {
    map_range(chain, 0, chain.size())
}

/// The merged map of `offset..offset + len` of `chain` (clamped to its size).
pub fn map_range(chain: &Chain, offset: u64, len: u64) -> MapEntries<'_> {
    map_range_with(chain, offset, len, MapHints::unknown(chain))
}

/// What [`map_range`] learns about each layer once (whether it looks up holes under data
/// clusters: a scan of the refcounts), kept by callers that map many small ranges, as
/// QEMU keeps it per open image.
#[derive(Debug, Clone)]
pub struct MapHints(Vec<Option<bool>>);

impl MapHints {
    /// Nothing known yet: learnt as the map needs it.
    pub fn unknown(chain: &Chain) -> MapHints {
        MapHints(vec![None; chain.layers().len()])
    }

    /// Everything learnt now, for every layer.
    pub fn learn(chain: &Chain) -> MapHints {
        MapHints(
            chain
                .layers()
                .iter()
                .map(|l| Some(holes_visible(l)))
                .collect(),
        )
    }
}

/// [`map_range`] with what is already known about the layers.
pub fn map_range_with(chain: &Chain, offset: u64, len: u64, hints: MapHints) -> MapEntries<'_> {
    MapEntries {
        chain,
        runs: chain.runs(offset, len),
        pieces: VecDeque::new(),
        preallocated: hints.0,
        current: None,
        failed: false,
    }
}

/// Whether holes in the file under a layer's data clusters count as zeros.
fn holes_visible(layer: &Layer) -> bool {
    match layer {
        // As QEMU: a refcount structure that cannot be read only means the image
        // does not look preallocated; mapping does not need it.
        Layer::Qcow2(image) => image.looks_metadata_preallocated().unwrap_or(false),
        Layer::Raw(_) => true,
    }
}

/// Iterator over merged map entries; see [`map`]. Stops after the first error.
#[derive(Debug)]
pub struct MapEntries<'a> {
    chain: &'a Chain,
    runs: ChainRuns<'a>,
    pieces: VecDeque<MapEntry>,
    /// Per layer, once known: whether holes under its data clusters are looked up.
    preallocated: Vec<Option<bool>>,
    current: Option<MapEntry>,
    failed: bool,
}

impl Iterator for MapEntries<'_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Result<MapEntry>> {
        if self.failed {
            return None;
        }
        loop {
            let piece = match self.pieces.pop_front() {
                Some(p) => p,
                None => match self.runs.next() {
                    None => return self.current.take().map(Ok),
                    Some(Ok(run)) => {
                        if let Err(e) = self.expand(&run) {
                            self.failed = true;
                            return Some(Err(e));
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                },
            };
            match &mut self.current {
                Some(cur) if cur.mergeable(&piece) => cur.length += piece.length,
                Some(cur) => return Some(Ok(std::mem::replace(cur, piece))),
                None => self.current = Some(piece),
            }
        }
    }
}

impl MapEntries<'_> {
    /// Whether holes under the data clusters of layer `depth` count as zeros.
    fn holes_visible(&mut self, depth: usize) -> Result<bool> {
        if let Some(known) = self.preallocated[depth] {
            return Ok(known);
        }
        let known = holes_visible(&self.chain.layers()[depth]);
        self.preallocated[depth] = Some(known);
        Ok(known)
    }

    /// Turns one resolved run into map pieces (several when the file's holes or subcluster
    /// host offsets split it).
    fn expand(&mut self, run: &ChainRun) -> Result<()> {
        let layers = self.chain.layers();
        let out = &mut self.pieces;
        let piece = |start, length, depth| MapEntry {
            start,
            length,
            depth,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        match run.mapping {
            Mapping::Unallocated => {
                let mut depth = run.depth;
                if depth > 0 && run.offset >= layers[depth].size() {
                    // Past the end of a shorter backing file: the overlay reports the zeros.
                    depth -= 1;
                }
                let unallocated = |start, length, offset| MapEntry {
                    present: false,
                    zero: true,
                    offset,
                    ..piece(start, length, depth)
                };
                match &layers[depth] {
                    Layer::Qcow2(image) if image.geometry().extended_l2() => {
                        let mut pos = run.offset;
                        while pos < run.end() {
                            let (host, len) = image.cluster_host(pos)?;
                            let len = len.min(run.end() - pos);
                            out.push_back(unallocated(pos, len, host));
                            pos += len;
                        }
                    }
                    _ => out.push_back(unallocated(run.offset, run.len, None)),
                }
            }
            Mapping::Zero { host } => out.push_back(MapEntry {
                zero: true,
                offset: host,
                ..piece(run.offset, run.len, run.depth)
            }),
            Mapping::Compressed(_) => out.push_back(MapEntry {
                data: true,
                compressed: true,
                ..piece(run.offset, run.len, run.depth)
            }),
            Mapping::Data { host, .. } => {
                if !self.holes_visible(run.depth)? {
                    self.pieces.push_back(MapEntry {
                        data: true,
                        offset: Some(host),
                        ..piece(run.offset, run.len, run.depth)
                    });
                    return Ok(());
                }
                let layer = &self.chain.layers()[run.depth];
                let mut done = 0;
                while done < run.len {
                    let want = run.len - done;
                    let extent = match layer {
                        Layer::Qcow2(image) => image.host_extent(host + done, want)?,
                        Layer::Raw(raw) => raw.extent(host + done, want)?,
                    };
                    let len = match extent.len() {
                        0 => want,
                        n => n.min(want),
                    };
                    let hole = matches!(extent, Extent::Hole(_));
                    self.pieces.push_back(MapEntry {
                        zero: hole,
                        // A hole in a raw file is plain zeros; under a qcow2 data cluster it
                        // stays data that happens to read as zeros.
                        data: !(hole && matches!(layer, Layer::Raw(_))),
                        offset: Some(host + done),
                        ..piece(run.offset + done, len, run.depth)
                    });
                    done += len;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn data_entries_merge_only_when_offsets_continue() {
        let a = entry(0, 4096, Some(65536));
        assert!(a.mergeable(&entry(4096, 4096, Some(69632))));
        assert!(!a.mergeable(&entry(4096, 4096, Some(131072))));
        assert!(!a.mergeable(&entry(4096, 4096, None)));
    }

    #[test]
    fn entries_of_different_depth_do_not_merge() {
        let a = entry(0, 4096, None);
        let b = MapEntry {
            depth: 1,
            ..entry(4096, 4096, None)
        };
        assert!(!a.mergeable(&b));
        assert!(a.mergeable(&entry(4096, 4096, None)));
    }
}
