//! The model a run is checked against, and the bytes the operations write.
//!
//! The model keeps, for each layer of the chain, the bytes the chain read from that layer
//! down shows, and for each internal snapshot its bytes and which sectors the image itself
//! decided when it was taken (from [`Image::runs`](crate::qcow2::Image::runs); the rest
//! shows the backing chain of the moment it is applied). After every operation the whole
//! guest range is read through the chain and compared; after merges, reopening and new
//! overlays every layer's view is compared too, and the chain must consist of the expected
//! images. An operation that fails must be one the library refuses (`InvalidArgument`,
//! `Unsupported` or `BackingLoop`: a merge with impossible arguments, snapshots that narrow
//! refcounts cannot count, a rebase onto the image itself) and must change nothing.
//! Whenever the chain is closed (reopening, merges, new overlays, the end) every image must
//! pass [`Image::check`](crate::qcow2::Image::check) without a finding and without the
//! dirty bit; at the end every snapshot still reachable must read as the model says
//! (applied to a copy of its image).

use super::config::{LayerConfig, SECTOR};

/// What a write with `pattern` puts at guest `offset..offset + len` (pattern 0: zeros).
/// Each sector is filled with a byte of its own and starts with its guest offset, so data
/// in the wrong place shows. Built with fills and copies, not byte by byte: the harness's
/// own loops are instrumented too.
pub(super) fn pattern_bytes(pattern: u8, offset: u64, len: u64) -> Vec<u8> {
    if pattern == 0 {
        return vec![0; len as usize];
    }
    let first = offset / SECTOR * SECTOR;
    let end = (offset + len).div_ceil(SECTOR) * SECTOR;
    let mut out = vec![0u8; (end - first) as usize];
    let stamp = u64::from(pattern) * 0x0101_0101_0101_0101;
    for (i, sector) in out.chunks_exact_mut(SECTOR as usize).enumerate() {
        let pos = first + i as u64 * SECTOR;
        sector.fill(pattern ^ (pos >> 9) as u8);
        sector[..8].copy_from_slice(&(pos ^ stamp).to_be_bytes());
    }
    out[(offset - first) as usize..][..len as usize].to_vec()
}

/// Replaces the sectors of `view` that `own` says the image does not decide itself with
/// `below` (zeros past its end, or without it).
pub(super) fn show_below(view: &mut [u8], own: &[bool], below: Option<&[u8]>) {
    let below = below.unwrap_or(&[]);
    let sector = SECTOR as usize;
    for (s, _) in own.iter().enumerate().filter(|(_, own)| !**own) {
        let start = s * sector;
        let end = (start + sector).min(view.len());
        if start >= end {
            break;
        }
        let from = below.len().clamp(start, end);
        if from > start {
            view[start..from].copy_from_slice(&below[start..from]);
        }
        view[from..end].fill(0);
    }
}

/// One image of the chain, as the model sees it.
#[derive(Debug, Clone)]
pub(super) struct LayerModel {
    pub(super) name: String,
    pub(super) config: LayerConfig,
    /// What the chain from this layer down shows (its length is the layer's size).
    pub(super) view: Vec<u8>,
}

/// One internal snapshot.
#[derive(Debug, Clone)]
pub(super) struct SnapshotModel {
    pub(super) name: String,
    /// What the image showed when it was taken.
    pub(super) bytes: Vec<u8>,
    /// Per sector: the image decided it itself (else its backing chain does).
    pub(super) own: Vec<bool>,
}
