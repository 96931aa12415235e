//! [`std::io::Read`] + [`std::io::Seek`] over a chain, so callers can treat an image like a
//! file.

use std::io::{self, Read, Seek, SeekFrom};

use super::Chain;

/// A cursor over a chain's guest content. Reading at the end returns 0 bytes.
#[derive(Debug)]
pub struct ChainReader<'a> {
    chain: &'a Chain,
    pos: u64,
}

impl<'a> ChainReader<'a> {
    /// A reader positioned at offset 0.
    pub fn new(chain: &'a Chain) -> ChainReader<'a> {
        ChainReader { chain, pos: 0 }
    }
}

impl Read for ChainReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.chain.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        self.chain
            .read_at(&mut buf[..n], self.pos)
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ChainReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.chain.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the image",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}
