//! The bytes of a fuzz input, read as the program's encoding reads them.

/// Reads bytes, zeros past the end.
pub(super) struct Reader<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    pub(super) fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub(super) fn u24(&mut self) -> u32 {
        (0..3).fold(0, |v, _| v << 8 | u32::from(self.u8()))
    }
}
