//! Cases: the file cut at interesting places, and seeded random flips in its metadata.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::common::Rng;
use crate::fixtures::{Fixture, damaged, name_seed};
use crate::runner::Case;

/// The file cut at interesting places.
pub(crate) fn truncation_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let len = f.bytes.len() as u64;
    let mut cuts = vec![0, 4, 71, 72, 103, 104, l.header_len, 511, l.cluster / 2];
    cuts.push(l.l1_offset);
    cuts.push(l.l1_offset + 4);
    if let Some(&t) = l.l2_tables.first() {
        cuts.push(t + l.cluster / 2);
    }
    cuts.push(len - 1);
    cuts.push(len - l.cluster.min(len) + 1);
    cuts.into_iter()
        .filter(|&c| c < len)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|cut| {
            damaged(f, format!("cut at {cut:#x}"), move |b| {
                b.truncate(cut as usize)
            })
        })
        .collect()
}

/// Seeded random damage inside the metadata clusters.
pub(crate) fn random_cases(f: &Arc<Fixture>, seeds: std::ops::Range<u64>) -> Vec<Case> {
    let regions = f.layout.metadata();
    seeds
        .map(|seed| {
            let regions = regions.clone();
            let name = f.name;
            damaged(f, format!("random flips, seed {seed}"), move |b| {
                let mut rng = Rng::new(seed ^ name_seed(name) << 16);
                for _ in 0..1 + rng.below(8) {
                    // The header is small and matters most: hit it a third of the time.
                    let (start, len) = if rng.below(3) == 0 {
                        regions[0]
                    } else {
                        regions[rng.below(regions.len() as u64) as usize]
                    };
                    let at = (start + rng.below(len)) as usize;
                    if at >= b.len() {
                        continue;
                    }
                    match rng.below(3) {
                        0 => b[at] ^= 1 << rng.below(8),
                        1 => b[at] = rng.next_u64() as u8,
                        _ => b[at] = [0, 0xff, 0x80, 0x7f][rng.below(4) as usize],
                    }
                }
            })
        })
        .collect()
}
