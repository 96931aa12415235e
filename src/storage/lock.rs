//! QEMU's image locks: the byte-range locks of QEMU's file driver, so that QEMU,
//! qemu-img, qemu-nbd, qemu-storage-daemon and every process using this crate see each
//! other's use of an image file.
//!
//! The protocol, as QEMU's `block/file-posix.c` keeps it: a process holds a shared open
//! file description lock (`F_OFD_SETLK`, `F_RDLCK`) on byte `100 + i` while it holds
//! permission `i` ([`Permissions`]), and on byte `200 + i` while it does not let others
//! have it. Then it tests, with an exclusive lock it does not take (`F_OFD_GETLK`), byte
//! `200 + i` of each permission it wants (someone refuses to share it: `Failed to get
//! "write" lock`) and byte `100 + i` of each it refuses to share (someone holds it:
//! `Failed to get shared "write" lock`). Locking before testing means two processes
//! opening at once cannot both pass.
//!
//! Open file description locks conflict between two descriptions even in one process,
//! and a merge opens an image read-only and its base for writing at once. So within a
//! process all handles of one file share one set of locks on one description: the union
//! of the permissions they hold and of those they refuse to share. Locks guard against
//! other processes, as QEMU's do.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bitflags::bitflags;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use crate::error::{Error, Result};

bitflags! {
    /// QEMU's block permissions (`BLK_PERM_*`): what a user of an image file does, or
    /// lets others do. Bit `i` is lock byte `100 + i` (held) and `200 + i` (not shared).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Permissions: u8 {
        /// Reads that see a consistent image.
        const CONSISTENT_READ = 1 << 0;
        /// Writes that change what the image shows (metadata writes included).
        const WRITE = 1 << 1;
        /// Writes that leave what the image shows as it is.
        const WRITE_UNCHANGED = 1 << 2;
        /// Changing the file's size.
        const RESIZE = 1 << 3;
    }
}

/// Where the lock bytes of held permissions start (`RAW_LOCK_PERM_BASE`).
const HELD_BASE: i64 = 100;
/// Where the lock bytes of permissions not shared start (`RAW_LOCK_SHARED_BASE`).
const UNSHARED_BASE: i64 = 200;

impl Permissions {
    /// The permissions one at a time, lowest bit first, with the names QEMU's messages
    /// use.
    fn each() -> impl Iterator<Item = (i64, Permissions, &'static str)> {
        [
            (Permissions::CONSISTENT_READ, "consistent read"),
            (Permissions::WRITE, "write"),
            (Permissions::WRITE_UNCHANGED, "write unchanged"),
            (Permissions::RESIZE, "resize"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (bit, name))| (i as i64, bit, name))
    }
}

/// What a handle locks: the permissions it uses, and those it lets other processes have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    /// The permissions the handle uses.
    pub held: Permissions,
    /// The permissions others may hold meanwhile.
    pub shared: Permissions,
}

impl LockMode {
    /// Reading, as qemu-img reads without `-U` and as QEMU opens every backing file:
    /// nobody else may change the file or its size meanwhile. (QEMU's format drivers never
    /// share those on the file below them: their metadata must not change underneath.)
    pub const READ: LockMode = LockMode {
        held: Permissions::CONSISTENT_READ,
        shared: Permissions::CONSISTENT_READ.union(Permissions::WRITE_UNCHANGED),
    };

    /// Writing, as QEMU opens an image read-write: [`LockMode::READ`], holding write and
    /// resize besides.
    pub const WRITE: LockMode = LockMode {
        held: Permissions::CONSISTENT_READ
            .union(Permissions::WRITE)
            .union(Permissions::RESIZE),
        shared: LockMode::READ.shared,
    };

    /// Reading while sharing everything, as qemu-img's `-U` (`force-share`): the image
    /// may change underneath, so what is read may be inconsistent.
    pub const SHARE_ALL: LockMode = LockMode {
        held: Permissions::CONSISTENT_READ,
        shared: Permissions::all(),
    };

    fn unshared(self) -> Permissions {
        self.shared.complement()
    }

    /// What two handles of one file hold together: every permission either holds, and
    /// only what both share.
    fn union(self, other: LockMode) -> LockMode {
        LockMode {
            held: self.held | other.held,
            shared: self.shared & other.shared,
        }
    }
}

/// How an image's files are locked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Locking {
    /// QEMU's locks ([`LockMode::READ`] for a read-only handle, [`LockMode::WRITE`] for a
    /// writable one): an image another process writes cannot be opened, nor one another
    /// process reads opened for writing.
    #[default]
    On,
    /// Read-only, sharing everything ([`LockMode::SHARE_ALL`], qemu-img's `-U`): opens
    /// images that a running VM writes, whose content may change while it is read.
    /// Refused for writing.
    ForceShare,
    /// No locks at all (QEMU's `locking=off`), for files nothing else can be using.
    Off,
}

impl Locking {
    /// The locks a handle opened for writing (or not) takes, if any.
    pub fn mode(self, writable: bool) -> Result<Option<LockMode>> {
        match (self, writable) {
            (Locking::On, false) => Ok(Some(LockMode::READ)),
            (Locking::On, true) => Ok(Some(LockMode::WRITE)),
            (Locking::ForceShare, false) => Ok(Some(LockMode::SHARE_ALL)),
            (Locking::ForceShare, true) => Err(Error::InvalidArgument(
                "force-share (-U) can only be used to open images read-only".into(),
            )),
            (Locking::Off, _) => Ok(None),
        }
    }
}

/// One file's locks in this process: the description they are on and the modes of the
/// handles sharing them.
struct Locked {
    /// A duplicate of the first handle's descriptor, so the locks outlive that handle.
    file: File,
    modes: Vec<(u64, LockMode)>,
}

impl Locked {
    fn combined(&self) -> Option<LockMode> {
        self.modes.iter().map(|&(_, m)| m).reduce(LockMode::union)
    }
}

/// Every locked file of the process, by device and inode.
static LOCKED: Mutex<BTreeMap<(u64, u64), Locked>> = Mutex::new(BTreeMap::new());
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

fn registry() -> MutexGuard<'static, BTreeMap<(u64, u64), Locked>> {
    LOCKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A handle's share of its file's locks; released when dropped.
#[derive(Debug)]
pub(crate) struct FileLock {
    id: (u64, u64),
    token: u64,
}

impl FileLock {
    /// Takes `mode`'s locks on `file` and checks that no other process conflicts. `None`
    /// where the file system has no open file description locks (QEMU then goes without
    /// too).
    pub(crate) fn acquire(file: &File, mode: LockMode) -> Result<Option<FileLock>> {
        let meta = file.metadata().map_err(|e| Error::io("locking", e))?;
        let id = (meta.dev(), meta.ino());
        let mut locked = registry();
        let entry = match locked.entry(id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(Locked {
                file: file.try_clone().map_err(|e| Error::io("locking", e))?,
                modes: Vec::new(),
            }),
        };
        let before = entry.combined();
        let after = before.map_or(mode, |b| b.union(mode));
        let result =
            apply(&entry.file, before, Some(after)).and_then(|()| check(&entry.file, mode));
        match result {
            Ok(()) => {
                let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
                entry.modes.push((token, mode));
                Ok(Some(FileLock { id, token }))
            }
            Err(failure) => {
                // Back to what the other handles hold; nothing of this one stays.
                let _ = apply(&entry.file, Some(after), before);
                if entry.modes.is_empty() {
                    locked.remove(&id);
                }
                match failure {
                    Failure::Unsupported => Ok(None),
                    Failure::Error(e) => Err(e),
                }
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let mut locked = registry();
        let Some(entry) = locked.get_mut(&self.id) else {
            return;
        };
        let before = entry.combined();
        entry.modes.retain(|&(token, _)| token != self.token);
        let after = entry.combined();
        // Unlocked explicitly: the duplicate's description is also the first handle's,
        // which may still be open.
        let _ = apply(&entry.file, before, after);
        if entry.modes.is_empty() {
            locked.remove(&self.id);
        }
    }
}

/// Why locking did not succeed.
enum Failure {
    /// The file system has no open file description locks.
    Unsupported,
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Error(e)
    }
}

/// Moves the lock bytes on `file` from what `from` holds to what `to` holds.
fn apply(
    file: &File,
    from: Option<LockMode>,
    to: Option<LockMode>,
) -> std::result::Result<(), Failure> {
    let bytes = |mode: Option<LockMode>, base: i64, bits: fn(LockMode) -> Permissions| {
        Permissions::each()
            .filter(move |&(_, bit, _)| mode.is_some_and(|m| bits(m).contains(bit)))
            .map(move |(i, _, name)| (base + i, name))
    };
    let held = |m: LockMode| m.held;
    let unshared = |m: LockMode| m.unshared();
    for (base, bits) in [
        (HELD_BASE, held as fn(LockMode) -> Permissions),
        (UNSHARED_BASE, unshared),
    ] {
        let had: Vec<_> = bytes(from, base, bits).collect();
        let wanted: Vec<_> = bytes(to, base, bits).collect();
        for &(byte, name) in &wanted {
            if !had.iter().any(|&(b, _)| b == byte) {
                set_lock(file, byte, libc::F_RDLCK, name)?;
            }
        }
        for &(byte, name) in &had {
            if !wanted.iter().any(|&(b, _)| b == byte) {
                set_lock(file, byte, libc::F_UNLCK, name)?;
            }
        }
    }
    Ok(())
}

/// Checks that no other process refuses to share what `mode` holds, or holds what it
/// refuses to share.
fn check(file: &File, mode: LockMode) -> std::result::Result<(), Failure> {
    for (i, bit, name) in Permissions::each() {
        if mode.held.contains(bit) && is_locked(file, UNSHARED_BASE + i)? {
            return Err(conflict(name, false));
        }
    }
    for (i, bit, name) in Permissions::each() {
        if mode.unshared().contains(bit) && is_locked(file, HELD_BASE + i)? {
            return Err(conflict(name, true));
        }
    }
    Ok(())
}

fn conflict(permission: &'static str, shared: bool) -> Failure {
    Failure::Error(Error::Locked { permission, shared })
}

fn one_byte(byte: i64, kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn set_lock(
    file: &File,
    byte: i64,
    kind: libc::c_int,
    name: &'static str,
) -> std::result::Result<(), Failure> {
    match fcntl(file, FcntlArg::F_OFD_SETLK(&one_byte(byte, kind))) {
        Ok(_) => Ok(()),
        // Someone holds the byte exclusively (QEMU never does, but a test of ours might).
        Err(Errno::EAGAIN | Errno::EACCES) => Err(conflict(name, byte >= UNSHARED_BASE)),
        Err(e) => Err(os_error(e)),
    }
}

/// Whether another description holds a lock on `byte` that an exclusive lock would
/// conflict with.
fn is_locked(file: &File, byte: i64) -> std::result::Result<bool, Failure> {
    let mut probe = one_byte(byte, libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(os_error)?;
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

fn os_error(errno: Errno) -> Failure {
    match errno {
        // No open file description locks here (old kernels, some network file systems).
        Errno::EINVAL | Errno::ENOLCK | Errno::EOPNOTSUPP => Failure::Unsupported,
        e => Failure::Error(Error::io("locking", io::Error::from(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `path` locked by anyone, one by one (`/proc/locks` merges neighbours).
    fn locks_on(path: &std::path::Path) -> Vec<String> {
        let meta = std::fs::metadata(path).unwrap();
        // /proc/locks names a file as MAJOR:MINOR:INODE (device numbers in hex): the
        // inode alone may match a file of another file system.
        let dev = meta.dev();
        let (major, minor) = ((dev >> 8) & 0xfff, (dev & 0xff) | ((dev >> 12) & 0xfff00));
        let id = format!(" {major:02x}:{minor:02x}:{} ", meta.ino());
        // /proc/locks is read a page at a time: locks other tests take and drop
        // meanwhile can shift entries past the reader. Two equal reads in a row are
        // taken as the truth.
        let mut last = None;
        for _ in 0..20 {
            let now = locks_of(&std::fs::read_to_string("/proc/locks").unwrap(), &id);
            if last.as_ref() == Some(&now) {
                break;
            }
            last = Some(now);
        }
        last.unwrap()
    }

    /// The locked bytes of the file `id` (` MAJOR:MINOR:INODE `) in `/proc/locks` text.
    fn locks_of(locks: &str, id: &str) -> Vec<String> {
        let mut out: Vec<String> = locks
            .lines()
            .filter(|l| l.contains(id))
            .flat_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let start: u64 = f[f.len() - 2].parse().unwrap();
                let end: u64 = f[f.len() - 1].parse().unwrap();
                let kind = f[3].to_owned();
                (start..=end).map(move |b| format!("{kind} {b}"))
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_bytes_locked_are_qemus_and_handles_of_one_file_share_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = File::open(&path).unwrap();
        let read = FileLock::acquire(&a, LockMode::READ).unwrap().unwrap();
        // As `qemu-io -r` holds them: consistent read held, write and resize unshared.
        assert_eq!(locks_on(&path), ["READ 100", "READ 201", "READ 203"]);
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let write = FileLock::acquire(&b, LockMode::WRITE).unwrap().unwrap();
        assert_eq!(
            locks_on(&path),
            ["READ 100", "READ 101", "READ 103", "READ 201", "READ 203"]
        );
        drop(a);
        drop(write);
        assert_eq!(locks_on(&path), ["READ 100", "READ 201", "READ 203"]);
        drop(read);
        assert!(locks_on(&path).is_empty(), "{:?}", locks_on(&path));
    }

    #[test]
    fn a_conflict_names_the_permission_and_leaves_nothing_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 512]).unwrap();
        // Another process's reader, as QEMU would lock: byte 201 (write not shared).
        let other = File::open(&path).unwrap();
        set_lock(&other, UNSHARED_BASE + 1, libc::F_RDLCK, "write")
            .ok()
            .unwrap();
        let ours = File::open(&path).unwrap();
        let err = FileLock::acquire(&ours, LockMode::WRITE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to get \"write\" lock: is another process using the image?"
        );
        assert_eq!(locks_on(&path), ["READ 201"]);
        // Reading shares nothing the other refuses, and holds nothing it refuses.
        let read = FileLock::acquire(&ours, LockMode::READ).unwrap();
        assert!(read.is_some());
        // Another process's writer holds byte 101: a reader refusing to share write fails.
        set_lock(&other, HELD_BASE + 1, libc::F_RDLCK, "write")
            .ok()
            .unwrap();
        let third = File::open(&path).unwrap();
        drop(read);
        let err = FileLock::acquire(&third, LockMode::READ).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to get shared \"write\" lock: is another process using the image?"
        );
        assert!(
            FileLock::acquire(&third, LockMode::SHARE_ALL)
                .unwrap()
                .is_some()
        );
    }
}
