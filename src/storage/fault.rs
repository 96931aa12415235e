//! A storage that fails on purpose: power loss after a chosen write, a full disk, a
//! read-only medium. For crash-consistency and error-path tests.
//!
//! [`FaultStorage`] wraps another storage (the *live* bytes, which reads see) and keeps
//! beside it the *durable* bytes — what survived the last [`Storage::flush`] — and the log
//! of writes issued since. A disk that loses power may have written any of those unflushed
//! writes, in any combination; [`FaultStorage::crash_image`] builds one such disk.

use std::io;
use std::sync::{Mutex, PoisonError};

use super::{Extent, MemStorage, Storage};

/// Which of the writes issued since the last flush reach the disk in a
/// [`FaultStorage::crash_image`]. Every write is kept or lost whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unflushed {
    /// All of them are lost: the disk holds exactly what the last flush made durable.
    Lost,
    /// All of them are kept: the disk holds what was written before the crash.
    Kept,
    /// Each is kept or lost at random, the choice drawn from this seed (the same seed
    /// gives the same subset).
    Seeded(u64),
    /// Bit `i` keeps the `i`-th unflushed write (oldest first); writes past the 64th are
    /// lost. Enumerating masks tries every subset of a short log.
    Mask(u64),
}

/// A change to the bytes, logged until the next flush makes it durable.
#[derive(Debug, Clone)]
enum Change {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

impl Change {
    fn apply(&self, disk: &mut Vec<u8>) {
        match self {
            Change::Write { offset, bytes } => {
                let start = *offset as usize;
                let end = start + bytes.len();
                if disk.len() < end {
                    disk.resize(end, 0);
                }
                disk[start..end].copy_from_slice(bytes);
            }
            Change::SetLen(len) => disk.resize(*len as usize, 0),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    durable: Vec<u8>,
    log: Vec<Change>,
    writes: u64,
    flushes: u64,
    crash_after: Option<u64>,
    crashed: bool,
    max_len: Option<u64>,
    read_only: bool,
}

/// A storage wrapper that injects faults, for tests of what a crash or an I/O error leaves
/// behind. It counts *writes* — calls of [`Storage::write_at`] and [`Storage::set_len`]
/// that it accepts — and can:
///
/// - **crash** once the k-th write has been issued ([`FaultStorage::crash_after`]): that
///   write reaches the live bytes, and every later call (read, write, flush, length) fails
///   with an I/O error, as a machine that lost power answers nothing;
///   [`FaultStorage::crash_image`] then gives the bytes a disk could hold after the crash;
/// - act as a **full disk** ([`FaultStorage::limit_len`]): a write or resize that would
///   make the storage longer than the limit fails with `StorageFull` (ENOSPC) and
///   changes nothing;
/// - be **read-only** ([`FaultStorage::set_read_only`]): [`Storage::is_read_only`] says
///   so and writes fail with `PermissionDenied`.
///
/// All methods take `&self`; share it with an image through an `Arc` and keep a handle:
///
/// ```
/// use std::sync::Arc;
/// use qcow2_engine::storage::{FaultStorage, Storage, Unflushed};
///
/// let disk = Arc::new(FaultStorage::from_bytes(vec![0; 8]));
/// disk.write_at(&[1], 0)?;
/// disk.flush()?;
/// disk.crash_after(disk.writes() + 1);
/// disk.write_at(&[2], 1)?; // the last write before the power goes
/// assert!(disk.write_at(&[3], 2).is_err());
/// assert_eq!(disk.crash_image(Unflushed::Lost), [1, 0, 0, 0, 0, 0, 0, 0]);
/// assert_eq!(disk.crash_image(Unflushed::Kept), [1, 2, 0, 0, 0, 0, 0, 0]);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct FaultStorage {
    inner: Box<dyn Storage>,
    state: Mutex<State>,
}

impl std::fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("FaultStorage")
            .field("writes", &s.writes)
            .field("flushes", &s.flushes)
            .field("unflushed", &s.log.len())
            .field("crash_after", &s.crash_after)
            .field("crashed", &s.crashed)
            .field("max_len", &s.max_len)
            .field("read_only", &s.read_only)
            .finish_non_exhaustive()
    }
}

/// The error every call returns after the crash.
fn crashed() -> io::Error {
    io::Error::other("simulated crash: the storage is gone")
}

impl FaultStorage {
    /// Wraps `inner`; its current bytes are taken as durable.
    pub fn new(inner: Box<dyn Storage>) -> io::Result<FaultStorage> {
        let len = usize::try_from(inner.len()?).map_err(|_| io::Error::other("too large"))?;
        let mut durable = vec![0u8; len];
        inner.read_at(&mut durable, 0)?;
        Ok(FaultStorage {
            inner,
            state: Mutex::new(State {
                durable,
                ..State::default()
            }),
        })
    }

    /// A [`MemStorage`] holding `bytes`, all durable.
    pub fn from_bytes(bytes: Vec<u8>) -> FaultStorage {
        FaultStorage {
            inner: Box::new(MemStorage::from_bytes(bytes.clone())),
            state: Mutex::new(State {
                durable: bytes,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Crashes once `writes` writes in all (counted since the storage was made, see
    /// [`FaultStorage::writes`]) have been issued: the one that reaches the count still
    /// goes through; every call after it fails. A count already reached crashes at the
    /// next call. `writes` = 0 crashes before the first call.
    pub fn crash_after(&self, writes: u64) {
        let mut s = self.state();
        s.crash_after = Some(writes);
        if s.writes >= writes {
            s.crashed = true;
        }
    }

    /// Refuses writes and resizes that would make the storage longer than `max_len` bytes
    /// (a full disk); `None` lifts the limit.
    pub fn limit_len(&self, max_len: Option<u64>) {
        self.state().max_len = max_len;
    }

    /// Makes the storage refuse (or accept again) every write.
    pub fn set_read_only(&self, read_only: bool) {
        self.state().read_only = read_only;
    }

    /// Writes (and resizes) accepted so far.
    pub fn writes(&self) -> u64 {
        self.state().writes
    }

    /// Successful flushes so far.
    pub fn flushes(&self) -> u64 {
        self.state().flushes
    }

    /// Writes (and resizes) issued since the last successful flush.
    pub fn unflushed(&self) -> usize {
        self.state().log.len()
    }

    /// Whether the simulated crash has happened.
    pub fn is_crashed(&self) -> bool {
        self.state().crashed
    }

    /// The live bytes: what reads see (before the crash), every write applied.
    pub fn live_bytes(&self) -> Vec<u8> {
        let s = self.state();
        let mut disk = s.durable.clone();
        for change in &s.log {
            change.apply(&mut disk);
        }
        disk
    }

    /// The bytes a disk could hold after a crash now: the durable bytes with `unflushed`'s
    /// choice of the writes issued since the last flush applied over them, in order.
    pub fn crash_image(&self, unflushed: Unflushed) -> Vec<u8> {
        let s = self.state();
        let mut disk = s.durable.clone();
        let mut rng = match unflushed {
            Unflushed::Seeded(seed) => seed ^ 0x6a09_e667_f3bc_c908,
            _ => 0,
        };
        for (i, change) in s.log.iter().enumerate() {
            let keep = match unflushed {
                Unflushed::Lost => false,
                Unflushed::Kept => true,
                Unflushed::Seeded(_) => splitmix64(&mut rng) & 1 == 1,
                Unflushed::Mask(mask) => i < 64 && mask >> i & 1 == 1,
            };
            if keep {
                change.apply(&mut disk);
            }
        }
        disk
    }

    /// Checks that a write that makes the storage `new_len` bytes long (0 when it does not
    /// grow it) may happen.
    fn admit(s: &State, new_len: u64) -> io::Result<()> {
        if s.crashed {
            return Err(crashed());
        }
        if s.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only storage",
            ));
        }
        if let Some(max) = s.max_len {
            if new_len > max {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "no space left on device (storage limited to {max} bytes, \
                         a write would reach {new_len})"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Records an accepted write; crashes when it is the last one allowed.
    fn record(s: &mut State, change: Change) {
        s.log.push(change);
        s.writes += 1;
        if s.crash_after.is_some_and(|k| s.writes >= k) {
            s.crashed = true;
        }
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state();
        if s.crashed {
            return Err(crashed());
        }
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state();
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::other("offset too large"))?;
        if s.crashed {
            return Err(crashed());
        }
        let grows_to = if end > self.inner.len()? { end } else { 0 };
        FaultStorage::admit(&s, grows_to)?;
        self.inner.write_at(buf, offset)?;
        FaultStorage::record(
            &mut s,
            Change::Write {
                offset,
                bytes: buf.to_vec(),
            },
        );
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.state();
        if s.crashed {
            return Err(crashed());
        }
        self.inner.flush()?;
        let log = std::mem::take(&mut s.log);
        for change in &log {
            change.apply(&mut s.durable);
        }
        s.flushes += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        if self.state().crashed {
            return Err(crashed());
        }
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state();
        if s.crashed {
            return Err(crashed());
        }
        let grows_to = if len > self.inner.len()? { len } else { 0 };
        FaultStorage::admit(&s, grows_to)?;
        self.inner.set_len(len)?;
        FaultStorage::record(&mut s, Change::SetLen(len));
        Ok(())
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }

    fn lock(&self, mode: super::LockMode) -> crate::error::Result<()> {
        self.inner.lock(mode)
    }

    fn is_read_only(&self) -> bool {
        self.state().read_only || self.inner.is_read_only()
    }

    fn extent(&self, offset: u64, max_len: u64) -> io::Result<Extent> {
        if self.state().crashed {
            return Err(crashed());
        }
        self.inner.extent(offset, max_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(len: usize) -> FaultStorage {
        FaultStorage::from_bytes(vec![0; len])
    }

    #[test]
    fn flushed_writes_are_durable_and_unflushed_ones_are_not() {
        let d = disk(4);
        d.write_at(&[1], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2], 1).unwrap();
        assert_eq!(d.unflushed(), 1);
        assert_eq!(d.crash_image(Unflushed::Lost), [1, 0, 0, 0]);
        assert_eq!(d.crash_image(Unflushed::Kept), [1, 2, 0, 0]);
        assert_eq!(d.live_bytes(), [1, 2, 0, 0]);
        assert_eq!((d.writes(), d.flushes()), (2, 1));
    }

    #[test]
    fn every_call_fails_after_the_crash_write() {
        let d = disk(4);
        d.crash_after(2);
        d.write_at(&[1], 0).unwrap();
        d.write_at(&[2], 1).unwrap();
        assert!(d.is_crashed());
        let mut buf = [0u8; 1];
        assert!(d.read_at(&mut buf, 0).is_err());
        assert!(d.write_at(&[3], 2).is_err());
        assert!(d.flush().is_err());
        assert!(d.len().is_err());
        assert!(d.set_len(1).is_err());
        // The refused calls are neither counted nor logged.
        assert_eq!(d.writes(), 2);
        assert_eq!(d.crash_image(Unflushed::Kept), [1, 2, 0, 0]);
    }

    #[test]
    fn crashing_after_zero_writes_refuses_everything() {
        let d = disk(2);
        d.crash_after(0);
        assert!(d.write_at(&[1], 0).is_err());
        assert_eq!(d.crash_image(Unflushed::Kept), [0, 0]);
    }

    #[test]
    fn seeded_subsets_keep_or_lose_whole_writes_in_order() {
        let d = disk(0);
        d.crash_after(64);
        for i in 0..64u8 {
            d.write_at(&[i + 1; 3], u64::from(i) * 2).unwrap();
        }
        let mut kinds = std::collections::HashSet::new();
        for seed in 0..8 {
            let image = d.crash_image(Unflushed::Seeded(seed));
            assert_eq!(
                image,
                d.crash_image(Unflushed::Seeded(seed)),
                "reproducible"
            );
            // Every byte is zero (never written) or from a write covering it.
            for (at, &b) in image.iter().enumerate() {
                if b != 0 {
                    let i = u64::from(b - 1);
                    assert!(
                        i * 2 <= at as u64 && (at as u64) < i * 2 + 3,
                        "byte {at}: {b}"
                    );
                }
            }
            kinds.insert(image);
        }
        assert!(kinds.len() > 1, "different seeds choose different subsets");
    }

    #[test]
    fn a_mask_keeps_the_writes_it_names() {
        let d = disk(3);
        for i in 0..3u8 {
            d.write_at(&[i + 1], u64::from(i)).unwrap();
        }
        assert_eq!(d.crash_image(Unflushed::Mask(0b101)), [1, 0, 3]);
        assert_eq!(d.crash_image(Unflushed::Mask(0b010)), [0, 2, 0]);
    }

    #[test]
    fn resizes_are_logged_like_writes() {
        let d = disk(4);
        d.set_len(2).unwrap();
        d.write_at(&[9], 5).unwrap();
        assert_eq!(d.crash_image(Unflushed::Kept), [0, 0, 0, 0, 0, 9]);
        assert_eq!(d.crash_image(Unflushed::Lost), [0, 0, 0, 0]);
        d.flush().unwrap();
        assert_eq!(d.crash_image(Unflushed::Lost), [0, 0, 0, 0, 0, 9]);
    }

    #[test]
    fn a_full_disk_refuses_growth_but_not_overwrites() {
        let d = disk(4);
        d.limit_len(Some(6));
        d.write_at(&[1; 2], 4).unwrap();
        let e = d.write_at(&[1], 6).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(e.to_string().contains("no space left"), "{e}");
        assert!(d.set_len(7).is_err());
        d.write_at(&[2; 6], 0).unwrap();
        assert_eq!(d.live_bytes(), [2; 6]);
        d.limit_len(None);
        d.write_at(&[3], 9).unwrap();
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes() {
        let d = disk(2);
        d.set_read_only(true);
        assert!(d.is_read_only());
        let e = d.write_at(&[1], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let mut buf = [7u8; 2];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0, 0]);
        d.set_read_only(false);
        d.write_at(&[1], 0).unwrap();
    }

    #[test]
    fn wrapping_a_storage_takes_its_bytes_as_durable() {
        let d = FaultStorage::new(Box::new(MemStorage::from_bytes(vec![5, 6]))).unwrap();
        d.write_at(&[7], 0).unwrap();
        assert_eq!(d.crash_image(Unflushed::Lost), [5, 6]);
        let mut buf = [0u8; 2];
        d.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7, 6]);
    }
}
