//! Looking at bytes.

/// Whether `bytes` are all zeros (written so the compiler can vectorise it).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
