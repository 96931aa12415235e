//! A dirty bitmap in memory: one bit per granule of guest data, set when the granule
//! changes. Bits are atomics, so writers on several threads mark without a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One bit per `granularity` bytes of a guest disk of `size` bytes; a set bit means the
/// granule changed (spec: "Dirty tracking bitmaps").
#[derive(Debug)]
pub struct DirtyBitmap {
    size: u64,
    granularity_bits: u8,
    /// Bit `i % 64` of word `i / 64` stands for granule `i`; bits past the last granule are
    /// zero.
    words: Vec<AtomicU64>,
    /// Set by every change: an unchanged bitmap need not be stored again.
    changed: AtomicBool,
}

impl Clone for DirtyBitmap {
    fn clone(&self) -> DirtyBitmap {
        DirtyBitmap {
            size: self.size,
            granularity_bits: self.granularity_bits,
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Relaxed)))
                .collect(),
            changed: AtomicBool::new(self.changed.load(Ordering::Relaxed)),
        }
    }
}

impl PartialEq for DirtyBitmap {
    fn eq(&self, other: &DirtyBitmap) -> bool {
        self.size == other.size
            && self.granularity_bits == other.granularity_bits
            && self
                .words
                .iter()
                .zip(&other.words)
                .all(|(a, b)| a.load(Ordering::Relaxed) == b.load(Ordering::Relaxed))
    }
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes with granules of `1 << granularity_bits` bytes.
    pub fn new(size: u64, granularity_bits: u8) -> DirtyBitmap {
        let granules = size.div_ceil(1 << granularity_bits);
        DirtyBitmap {
            size,
            granularity_bits,
            words: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            changed: AtomicBool::new(false),
        }
    }

    /// Bytes of guest data one bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of [`DirtyBitmap::granularity`].
    pub fn granularity_bits(&self) -> u8 {
        self.granularity_bits
    }

    /// Bytes of guest disk the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits (granules).
    pub fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Bytes the bitmap takes on disk, before rounding up to clusters.
    pub fn data_len(&self) -> u64 {
        self.granules().div_ceil(8)
    }

    /// Marks every granule that `offset..offset + len` touches as dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
        if !self.changed.load(Ordering::Relaxed) {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Sets granules `first..end`.
    fn set_bits(&self, first: u64, end: u64) {
        let (mut bit, end) = (first, end);
        while bit < end {
            let word = bit / 64;
            let lo = bit % 64;
            let hi = (end - word * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[word as usize].fetch_or(mask, Ordering::Relaxed);
            bit = word * 64 + hi;
        }
    }

    /// Whether the granule holding guest byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let bit = offset >> self.granularity_bits;
        self.words[(bit / 64) as usize].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
    }

    /// Number of dirty granules.
    pub fn dirty_granules(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Whether no granule is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    /// Makes every granule clean.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Marks dirty everything `other` marks dirty (any granularity: a granule of this
    /// bitmap is dirty when any dirty byte of `other` lies in it).
    pub fn merge(&self, other: &DirtyBitmap) {
        if other.granularity_bits == self.granularity_bits {
            for (a, b) in self.words.iter().zip(&other.words) {
                let bits = b.load(Ordering::Relaxed);
                if bits != 0 {
                    a.fetch_or(bits, Ordering::Relaxed);
                }
            }
            self.trim_tail();
            self.changed.store(true, Ordering::Relaxed);
        } else {
            for (offset, len) in other.runs() {
                self.mark(offset, len);
            }
        }
    }

    /// The dirty ranges as `(offset, len)` in guest bytes, in order, each as long as it
    /// can be (adjacent dirty granules make one range), the last cut at the disk's end.
    pub fn runs(&self) -> DirtyRuns<'_> {
        DirtyRuns {
            bitmap: self,
            next: 0,
        }
    }

    /// [`DirtyBitmap::runs`] from the granule holding guest `offset` on (the first range
    /// may start before `offset`, at its granule's start).
    pub fn runs_from(&self, offset: u64) -> DirtyRuns<'_> {
        DirtyRuns {
            bitmap: self,
            next: offset >> self.granularity_bits,
        }
    }

    /// Changes the disk size: granules past a smaller size go, new ones are clean.
    pub fn resize(&mut self, size: u64) {
        self.size = size;
        let words = self.granules().div_ceil(64) as usize;
        self.words.resize_with(words, || AtomicU64::new(0));
        self.trim_tail();
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Clears bits past the last granule.
    fn trim_tail(&self) {
        let granules = self.granules();
        if granules % 64 != 0 {
            if let Some(last) = self.words.last() {
                let keep = (1u64 << (granules % 64)) - 1;
                last.fetch_and(keep, Ordering::Relaxed);
            }
        }
    }

    /// Whether the bitmap changed since it was made or loaded.
    pub(crate) fn changed(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    /// Copies the on-disk bytes `at..at + out.len()` of the bitmap data into `out` (bit
    /// `i % 8` of byte `i / 8` is granule `i`, as the spec's "Bitmap data"); bytes past
    /// the data read as zeros.
    pub(crate) fn read_bytes(&self, at: u64, out: &mut [u8]) {
        for (i, byte) in out.iter_mut().enumerate() {
            let j = at + i as u64;
            *byte = match self.words.get((j / 8) as usize) {
                Some(w) => (w.load(Ordering::Relaxed) >> ((j % 8) * 8)) as u8,
                None => 0,
            };
        }
    }

    /// Sets the granules that the on-disk bytes `bytes`, found at `at` in the bitmap
    /// data, mark; bits past the last granule are ignored (the spec requires them zero).
    pub(crate) fn load_bytes(&mut self, at: u64, bytes: &[u8]) {
        for (i, &byte) in bytes.iter().enumerate() {
            let j = at + i as u64;
            if byte == 0 {
                continue;
            }
            if let Some(w) = self.words.get((j / 8) as usize) {
                w.fetch_or(u64::from(byte) << ((j % 8) * 8), Ordering::Relaxed);
            }
        }
        self.trim_tail();
    }

    /// Forgets that the bitmap changed (it was just stored or loaded).
    pub(crate) fn set_unchanged(&self) {
        self.changed.store(false, Ordering::Relaxed);
    }
}

/// The dirty ranges of a [`DirtyBitmap`] (see [`DirtyBitmap::runs`]).
#[derive(Debug)]
pub struct DirtyRuns<'a> {
    bitmap: &'a DirtyBitmap,
    /// The next granule to look at.
    next: u64,
}

impl DirtyRuns<'_> {
    /// The first granule at or after `from` whose bit is `dirty`, or the end.
    fn first_from(&self, from: u64, dirty: bool) -> u64 {
        let granules = self.bitmap.granules();
        let mut bit = from;
        while bit < granules {
            let word = self.bitmap.words[(bit / 64) as usize].load(Ordering::Relaxed);
            let word = if dirty { word } else { !word };
            let rest = word >> (bit % 64);
            if rest != 0 {
                return (bit + u64::from(rest.trailing_zeros())).min(granules);
            }
            bit = (bit / 64 + 1) * 64;
        }
        granules
    }
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.first_from(self.next, true);
        if start >= self.bitmap.granules() {
            self.next = start;
            return None;
        }
        let end = self.first_from(start, false);
        self.next = end;
        let g = self.bitmap.granularity_bits;
        let offset = start << g;
        let stop = (end << g).min(self.bitmap.size);
        Some((offset, stop - offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_granule_a_range_touches_and_reports_runs() {
        let b = DirtyBitmap::new(1 << 20, 12);
        assert!(b.is_clean());
        b.mark(4095, 2);
        b.mark(64 << 12, 64 << 12);
        b.mark((1 << 20) - 1, 100);
        let runs: Vec<_> = b.runs().collect();
        assert_eq!(
            runs,
            vec![(0, 8192), (64 << 12, 64 << 12), ((1 << 20) - 4096, 4096)]
        );
        assert_eq!(b.dirty_granules(), 2 + 64 + 1);
        assert!(b.is_dirty(4096) && !b.is_dirty(8192));
    }

    #[test]
    fn the_last_run_stops_at_the_disk_end() {
        let b = DirtyBitmap::new(10_000, 12);
        b.mark(0, 10_000);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 10_000)]);
        assert_eq!(b.data_len(), 1);
    }

    #[test]
    fn bytes_round_trip_lsb_first() {
        let b = DirtyBitmap::new(1 << 20, 9);
        b.mark(0, 512);
        b.mark(9 * 512, 512);
        let mut bytes = [0u8; 3];
        b.read_bytes(0, &mut bytes);
        assert_eq!(bytes, [0b0000_0001, 0b0000_0010, 0]);
        let mut c = DirtyBitmap::new(1 << 20, 9);
        c.load_bytes(0, &bytes);
        assert_eq!(b, c);
    }

    #[test]
    fn merge_across_granularities_is_conservative() {
        let fine = DirtyBitmap::new(1 << 20, 9);
        fine.mark(70_000, 1);
        let coarse = DirtyBitmap::new(1 << 20, 16);
        coarse.merge(&fine);
        assert_eq!(coarse.runs().collect::<Vec<_>>(), vec![(65536, 65536)]);
        let back = DirtyBitmap::new(1 << 20, 9);
        back.merge(&coarse);
        assert_eq!(back.runs().collect::<Vec<_>>(), vec![(65536, 65536)]);
    }

    #[test]
    fn resizing_drops_and_adds_clean_granules() {
        let mut b = DirtyBitmap::new(1 << 20, 12);
        b.mark(0, 1 << 20);
        b.resize(10 * 4096 + 1);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 10 * 4096 + 1)]);
        b.resize(1 << 20);
        assert_eq!(b.runs().collect::<Vec<_>>(), vec![(0, 11 * 4096)]);
    }
}
