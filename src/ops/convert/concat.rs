//! Several sources converted as one (`qemu-img convert a b c DST`): their guest contents
//! one after the other, each its own size (a raw file's rounded up to whole 512-byte
//! sectors, as QEMU counts it), read as one raw image.

use std::io;
use std::path::PathBuf;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::layers::{Layer, RawImage};
use crate::storage::Storage;

/// The guest contents of `chains` one after the other, as one read-only raw layer (named
/// after the sources, `a + b`). The chains stay open inside it. Its content is read as
/// data throughout: zeros in it are found by their bytes ([`super::ConvertOptions::min_sparse`]).
pub fn concatenate(chains: Vec<Chain>) -> Result<Chain> {
    if chains.is_empty() {
        return Err(Error::InvalidArgument("no source to concatenate".into()));
    }
    let name: PathBuf = chains
        .iter()
        .map(|c| c.top().name().display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
        .into();
    let mut starts = Vec::with_capacity(chains.len());
    let mut end = 0u64;
    for chain in &chains {
        starts.push(end);
        end = end
            .checked_add(chain.size())
            .ok_or_else(|| Error::InvalidArgument("the sources are too large together".into()))?;
    }
    let storage = Concatenation {
        chains,
        starts,
        len: end,
    };
    let raw = RawImage::from_storage(Box::new(storage), name)?;
    Chain::from_layers(vec![Layer::Raw(raw)])
}

/// Chains read one after the other.
struct Concatenation {
    chains: Vec<Chain>,
    /// Where each chain starts.
    starts: Vec<u64>,
    len: u64,
}

impl Storage for Concatenation {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "reading past the end of the concatenated sources",
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            // The last chain starting at or before `at` (empty chains are passed over).
            let i = self.starts.partition_point(|&s| s <= at) - 1;
            let (chain, start) = (&self.chains[i], self.starts[i]);
            let n = ((chain.size() - (at - start)) as usize).min(buf.len() - done);
            chain
                .read_at(&mut buf[done..done + n], at - start)
                .map_err(io::Error::other)?;
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the concatenated sources are read-only",
        ))
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.write_at(&[], 0)
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn raw(bytes: Vec<u8>, name: &str) -> Chain {
        let raw = RawImage::from_storage(Box::new(MemStorage::from_bytes(bytes)), name).unwrap();
        Chain::from_layers(vec![Layer::Raw(raw)]).unwrap()
    }

    #[test]
    fn sources_follow_each_other_each_rounded_to_sectors() {
        let a: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let b = vec![7u8; 2048];
        let chain = concatenate(vec![
            raw(a.clone(), "a"),
            raw(Vec::new(), "empty"),
            raw(b.clone(), "b"),
        ])
        .unwrap();
        assert_eq!(chain.size(), 1024 + 2048);
        assert_eq!(chain.top().name(), std::path::Path::new("a + empty + b"));
        let mut all = vec![1u8; 3072];
        chain.read_at(&mut all, 0).unwrap();
        assert_eq!(&all[..1000], &a[..]);
        assert!(all[1000..1024].iter().all(|&x| x == 0));
        assert_eq!(&all[1024..], &b[..]);
        // A read across the boundary.
        let mut across = vec![0u8; 100];
        chain.read_at(&mut across, 1000).unwrap();
        assert!(across[..24].iter().all(|&x| x == 0) && across[24..].iter().all(|&x| x == 7));
        assert!(concatenate(Vec::new()).is_err());
    }
}
