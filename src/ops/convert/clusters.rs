//! Deciding, per output cluster of a qcow2 conversion, what the output holds: nothing
//! (it reads right already), a zero cluster, or the source's bytes, compressed or not.

use crate::chain::Chain;
use crate::error::Result;
use crate::format::is_zero;
use crate::ops::compress_pool::{CompressPool, Compressed};
use crate::storage::write_zeros;

/// What to do with a range of output clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Leave unallocated: it already reads right.
    Skip,
    /// Make it read as zeros: over a backing file that does not, or over what an
    /// existing output held.
    Zero,
    /// Write the source's bytes.
    Data,
}

/// The conversion's fixed parameters and the output.
pub(super) struct Clusters<'a> {
    /// The output.
    pub out: &'a Chain,
    /// Whether the output has a backing file.
    pub has_base: bool,
    /// [`super::ConvertOptions::min_sparse`].
    pub min_sparse: u64,
    /// Whether the output has zero clusters (version 3).
    pub version3: bool,
    /// The output's cluster size.
    pub cluster_size: u64,
    /// The output reads as zeros where nothing is written (a fresh image, or
    /// `--target-is-zero`): zeros need no writing. Otherwise (`-n` into an image that may
    /// hold anything) they are written as zeros.
    pub zero_init: bool,
}

/// Stores a compressed cluster in the output.
type Store<'s> = dyn FnMut(Compressed<'_>) -> Result<()> + 's;

impl Clusters<'_> {
    /// What to do with a block whose source bytes are `src` and backing bytes `base`
    /// (`None`: zeros).
    fn classify(&self, src: Option<&[u8]>, base: Option<&[u8]>) -> Action {
        let src_zero = src.is_none_or(is_zero);
        if !self.has_base {
            return match (src_zero && self.min_sparse != 0, self.zero_init) {
                (true, true) => Action::Skip,
                (true, false) => Action::Zero,
                (false, _) => Action::Data,
            };
        }
        let equal = match (src, base) {
            (Some(s), Some(b)) => s == b,
            (_, None) => src_zero,
            (None, Some(b)) => is_zero(b),
        };
        if equal {
            Action::Skip
        } else if src_zero && self.min_sparse != 0 && self.version3 {
            Action::Zero
        } else {
            Action::Data
        }
    }

    /// Handles a data piece: classifies its blocks of `unit` bytes and acts on runs of
    /// blocks with the same action.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn piece(
        &self,
        offset: u64,
        len: u64,
        unit: u64,
        src: Option<&[u8]>,
        base: Option<&[u8]>,
        pool: &mut Option<CompressPool>,
        store: &mut Store<'_>,
    ) -> Result<()> {
        let end = offset + len;
        let mut run: Option<(Action, u64)> = None;
        let mut pos = offset;
        while pos < end {
            let next = (pos / unit * unit + unit).min(end);
            let range = (pos - offset) as usize..(next - offset) as usize;
            let action = self.classify(
                src.map(|b| &b[range.clone()]),
                base.map(|b| &b[range.clone()]),
            );
            match run {
                Some((a, _)) if a == action => {}
                Some((a, start)) => {
                    self.write(
                        a,
                        start,
                        src.map(|b| &b[(start - offset) as usize..]),
                        pos,
                        pool,
                        store,
                    )?;
                    run = Some((action, pos));
                }
                None => run = Some((action, pos)),
            }
            pos = next;
        }
        if let Some((a, start)) = run {
            self.write(
                a,
                start,
                src.map(|b| &b[(start - offset) as usize..]),
                end,
                pool,
                store,
            )?;
        }
        Ok(())
    }

    /// Acts on guest `start..end`; `src` holds the source's bytes from `start` (`None`:
    /// zeros).
    pub(super) fn write(
        &self,
        action: Action,
        start: u64,
        src: Option<&[u8]>,
        end: u64,
        pool: &mut Option<CompressPool>,
        store: &mut Store<'_>,
    ) -> Result<()> {
        match action {
            Action::Skip => Ok(()),
            // Without a backing file, freed clusters read as zeros: let them go, as
            // qemu-img's zero writes may.
            Action::Zero => self.out.write_zeroes(start, end - start, !self.has_base),
            Action::Data => match pool {
                // Whole clusters at a time: each is compressed alone.
                Some(pool) => {
                    let mut pos = start;
                    while pos < end {
                        let next = (pos + self.cluster_size - pos % self.cluster_size).min(end);
                        let n = (next - pos) as usize;
                        match src {
                            Some(b) => {
                                pool.submit(pos, &b[(pos - start) as usize..][..n], store)?
                            }
                            None => pool.submit_zeros(pos, n, store)?,
                        }
                        pos = next;
                    }
                    Ok(())
                }
                None => match src {
                    Some(b) => self.out.write_at(&b[..(end - start) as usize], start),
                    // Pieces of whole clusters, except in clusters larger than a piece
                    // (2 MiB), whose pieces complete each other: copy-on-write of the
                    // first finds nothing below (the output is open alone).
                    None => {
                        write_zeros(start, end - start, |zeros, at| self.out.write_at(zeros, at))
                    }
                },
            },
        }
    }
}
