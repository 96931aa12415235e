use std::io;
use std::sync::RwLock;

use super::Storage;

/// Bytes held in memory: for tests, benches and fuzzing.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// A storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the bytes held.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("offset too large"))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        let src = bytes
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let (start, end) = range(offset, buf.len())?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        self.bytes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len, 0);
        Ok(())
    }
    fn allocated_size(&self) -> Option<u64> {
        self.len().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_past_the_end_is_an_error() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut buf = [0u8; 2];
        assert!(s.read_at(&mut buf, 2).is_err());
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3]);
    }

    #[test]
    fn writing_past_the_end_grows_with_zeros() {
        let s = MemStorage::new();
        s.write_at(&[7], 3).unwrap();
        assert_eq!(s.to_bytes(), vec![0, 0, 0, 7]);
    }
}
