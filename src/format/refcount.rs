//! Refcount block entries of 1 to 64 bits (spec: "Host cluster management").
//!
//! Entries are packed big-endian; for sub-byte widths bit 0 of an entry is the least
//! significant bit, and entries fill each byte from its least significant bits.

/// The largest refcount a `1 << order`-bit entry holds.
pub fn max_refcount(order: u32) -> u64 {
    let bits = 1u32 << order;
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Refcount entries in one refcount block (a cluster of `cluster_bits` bits) of
/// `1 << order`-bit entries.
pub fn refcounts_per_block(cluster_bits: u32, order: u32) -> u64 {
    (8u64 << cluster_bits) >> order
}

/// Reads entry `index` of a refcount block. The caller has checked that `index` is below
/// `block.len() * 8 >> order`.
pub fn get_refcount(block: &[u8], index: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block[index / per_byte];
        let shift = (index % per_byte) * bits;
        u64::from(byte >> shift) & ((1 << bits) - 1)
    } else {
        let width = bits / 8;
        let start = index * width;
        block[start..start + width]
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
    }
}

/// Writes entry `index` of a refcount block. `value` must fit the width.
pub fn set_refcount(block: &mut [u8], index: usize, order: u32, value: u64) {
    debug_assert!(value <= max_refcount(order));
    let bits = 1usize << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let shift = (index % per_byte) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        let byte = &mut block[index / per_byte];
        *byte = (*byte & !mask) | ((value as u8) << shift & mask);
    } else {
        let width = bits / 8;
        let start = index * width;
        for (i, b) in block[start..start + width].iter_mut().enumerate() {
            *b = (value >> (8 * (width - 1 - i))) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut block = vec![0u8; 8];
        set_refcount(&mut block, 1, 4, 0x0102);
        assert_eq!(block, [0, 0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(get_refcount(&block, 1, 4), 0x0102);
    }

    #[test]
    fn one_bit_entries_fill_from_the_least_significant_bit() {
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 0, 1);
        set_refcount(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
        set_refcount(&mut block, 0, 0, 0);
        assert_eq!(get_refcount(&block, 3, 0), 1);
        assert_eq!(get_refcount(&block, 0, 0), 0);
    }
}
