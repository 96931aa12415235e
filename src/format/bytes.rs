//! Integers as qcow2 stores them: big-endian, whatever the host (spec: "all numbers in
//! qcow2 are stored in Big Endian byte order").

/// Big-endian u16 at `at`; the caller has checked the length.
pub(crate) fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(field(buf, at))
}
/// Big-endian u32 at `at`; the caller has checked the length.
pub(crate) fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(field(buf, at))
}
/// Big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(field(buf, at))
}

/// Writes `value` big-endian at `at`.
pub(crate) fn put_be16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}
/// Writes `value` big-endian at `at`.
pub(crate) fn put_be32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}
/// Writes `value` big-endian at `at`.
pub(crate) fn put_be64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

fn field<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    buf[at..at + N].try_into().expect("a slice of N bytes")
}

/// Decodes a table of big-endian u64 entries (L1, L2, refcount table).
pub fn decode_u64_table(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| be64(c, 0)).collect()
}

/// Encodes a table of u64 entries as big-endian bytes.
pub fn encode_u64_table(entries: &[u64], out: &mut [u8]) {
    for (chunk, e) in out.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_be_bytes());
    }
}

/// Whether `bytes` are all zeros (written so the compiler can vectorise it).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
