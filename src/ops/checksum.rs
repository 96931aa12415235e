//! CRC-32 of a chain's guest-visible content.
//!
//! Equal content gives an equal checksum whatever the layout: data is hashed as read
//! (in large chunks, read on another thread), and ranges that read as zeros are folded in
//! with CRC combination, in O(log n) steps and without touching their bytes.

use crate::chain::Chain;
use crate::error::Result;
use crate::progress::{Progress, Tracker};

use super::read_ahead::{Chunk, for_each_chunk};

/// Bytes of data read at a time.
const CHUNK: usize = 4 << 20;

/// The CRC-32 (as crc32fast computes it) of `chain`'s guest content, all of its virtual
/// size. `progress(done, total)` is called as bytes are accounted for; returning `false`
/// cancels with [`crate::Error::Cancelled`].
pub fn checksum(chain: &Chain, progress: Progress<'_>) -> Result<u32> {
    let total = chain.size();
    let mut tracker = Tracker::new(progress, total);
    let mut hasher = crc32fast::Hasher::new();
    let mut zeros = ZeroCrcs::new();
    let mut done = 0u64;
    for_each_chunk(chain, CHUNK, |chunk| {
        match chunk {
            Chunk::Zero { len, .. } => {
                hasher.combine(&zeros.hasher_for(len));
                done += len;
            }
            Chunk::Data { bytes, .. } => {
                hasher.update(bytes);
                done += bytes.len() as u64;
            }
        }
        tracker.report(done)?;
        Ok(true)
    })?;
    tracker.finish()?;
    Ok(hasher.finalize())
}

/// CRCs of runs of zero bytes, built by doubling.
struct ZeroCrcs {
    /// `powers[k]`: the CRC of 2^k zero bytes.
    powers: Vec<u32>,
}

impl ZeroCrcs {
    fn new() -> ZeroCrcs {
        let mut one = crc32fast::Hasher::new();
        one.update(&[0]);
        ZeroCrcs {
            powers: vec![one.finalize()],
        }
    }

    /// A hasher holding the CRC of `len` zero bytes.
    fn hasher_for(&mut self, len: u64) -> crc32fast::Hasher {
        let mut out = crc32fast::Hasher::new();
        for bit in 0..64 {
            if len >> bit == 0 {
                break;
            }
            while self.powers.len() <= bit {
                let k = self.powers.len() - 1;
                let half = crc32fast::Hasher::new_with_initial_len(self.powers[k], 1 << k);
                let mut double = half.clone();
                double.combine(&half);
                self.powers.push(double.finalize());
            }
            if len >> bit & 1 == 1 {
                out.combine(&crc32fast::Hasher::new_with_initial_len(
                    self.powers[bit],
                    1 << bit,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_zero_crcs_equal_hashing_the_bytes() {
        let mut zeros = ZeroCrcs::new();
        for len in [0u64, 1, 2, 3, 511, 4096, 65536 + 17, 1 << 20] {
            let mut direct = crc32fast::Hasher::new();
            direct.update(&vec![0u8; len as usize]);
            assert_eq!(zeros.hasher_for(len).finalize(), direct.finalize(), "{len}");
        }
    }

    #[test]
    fn zeros_combine_after_data() {
        let mut zeros = ZeroCrcs::new();
        let mut combined = crc32fast::Hasher::new();
        combined.update(b"qcow2");
        combined.combine(&zeros.hasher_for(1000));
        let mut direct = crc32fast::Hasher::new();
        direct.update(b"qcow2");
        direct.update(&[0u8; 1000]);
        assert_eq!(combined.finalize(), direct.finalize());
    }
}
