//! [`std::io::Read`] + [`std::io::Seek`] over a chain, so callers can treat an image like a
//! file, with the runs beside the cursor so that they can skip what reads as zeros.

use std::borrow::Borrow;
use std::io::{self, Read, Seek, SeekFrom};

use crate::error::Result;

use super::{Chain, ChainRun, ChainRuns};

/// A cursor over a chain's guest content. Reading at the end returns 0 bytes.
///
/// `C` is how the reader holds its chain: `&Chain` borrows it, `Chain` owns it (the reader
/// can then go to another thread or live in a struct), `Arc<Chain>` shares it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// use std::io::{Read, Seek, SeekFrom};
/// use qcow2_engine::{Chain, ChainReader, CreateOptions, create};
///
/// create(&path, &CreateOptions::qcow2(1 << 20))?;
/// let mut reader = ChainReader::new(Chain::open(&path)?);
/// let mut copied = 0;
/// while let Some(run) = reader.current_run()? {
///     if run.reads_as_zero() {
///         // A hole: skip it instead of reading zeros.
///         reader.seek(SeekFrom::Start(run.end()))?;
///         continue;
///     }
///     let mut buf = vec![0; run.len as usize];
///     reader.read_exact(&mut buf)?;
///     copied += buf.len();
/// }
/// assert_eq!(copied, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ChainReader<C: Borrow<Chain> = Chain> {
    chain: C,
    pos: u64,
}

impl<C: Borrow<Chain>> ChainReader<C> {
    /// A reader positioned at offset 0.
    pub fn new(chain: C) -> ChainReader<C> {
        ChainReader { chain, pos: 0 }
    }

    /// The chain read (named as `std::io::BufReader::get_ref`: `chain` is
    /// [`Read::chain`]).
    pub fn get_ref(&self) -> &Chain {
        self.chain.borrow()
    }

    /// The chain, given back.
    pub fn into_inner(self) -> C {
        self.chain
    }

    /// The guest offset the next read starts at.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// What the content is from the position on: the resolved run there (data, zeros, or
    /// unallocated through the whole chain, with the layer that decides it), or `None` at
    /// or past the end.
    pub fn current_run(&self) -> Result<Option<ChainRun>> {
        let chain = self.get_ref();
        if self.pos >= chain.size() {
            return Ok(None);
        }
        chain.resolve(self.pos, chain.size() - self.pos).map(Some)
    }

    /// The runs from the position to the end of the image.
    pub fn runs(&self) -> ChainRuns<'_> {
        self.get_ref().runs(self.pos, u64::MAX)
    }
}

impl<C: Borrow<Chain>> Read for ChainReader<C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let chain = self.chain.borrow();
        let size = chain.size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(size - self.pos) as usize;
        chain
            .read_at(&mut buf[..n], self.pos)
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<C: Borrow<Chain>> Seek for ChainReader<C> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.get_ref().size().checked_add_signed(d),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ChainOptions;
    use crate::create::{CreateOptions, create_on};
    use crate::storage::MemOpener;

    #[test]
    fn an_owning_reader_goes_to_another_thread_and_skips_holes_by_its_runs() {
        let fs = Arc::new(MemOpener::new());
        create_on(&*fs.create("a.qcow2"), &CreateOptions::qcow2(1 << 20)).unwrap();
        let options = ChainOptions {
            opener: Some(fs.clone()),
            ..ChainOptions::default()
        };
        let chain = Chain::open_with("a.qcow2", &options.clone().writable(true)).unwrap();
        chain.write_at(&[7; 4096], 65536).unwrap();
        chain.close().unwrap();
        drop(chain);
        let reader = ChainReader::new(Chain::open_with("a.qcow2", &options).unwrap());
        let data = std::thread::spawn(move || {
            let mut reader = reader;
            let mut data = Vec::new();
            while let Some(run) = reader.current_run().unwrap() {
                if run.reads_as_zero() {
                    reader.seek(SeekFrom::Start(run.end())).unwrap();
                } else {
                    let mut buf = vec![0; run.len as usize];
                    reader.read_exact(&mut buf).unwrap();
                    data.push((run.offset, buf));
                }
            }
            assert_eq!(reader.runs().count(), 0);
            data
        })
        .join()
        .unwrap();
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].0, 65536);
        assert!(data[0].1.len() >= 4096 && data[0].1[..4096].iter().all(|&b| b == 7));
    }
}
