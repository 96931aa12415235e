//! Where bytes live: a small positional-I/O trait and its backends, plus
//! [`FaultStorage`], which simulates crashes, full disks and read-only media for tests,
//! and the [`Opener`] that decides which storage a file name reaches ([`MemOpener`]: a
//! file system in memory). Host files take QEMU's image locks ([`Locking`]).
//!
//! Every method takes `&self`: backends use positional I/O (no shared cursor) or interior
//! locking, so several threads can read one image at once.

mod backend;
mod fault;
mod file;
mod lock;
mod memory;
mod opener;
#[cfg(test)]
pub(crate) mod recording;
mod zeros;

pub(crate) use backend::copy_through_buffer;
pub use backend::{Extent, Storage};
pub use fault::{FaultStorage, Unflushed};
pub use file::{DIRECT_ALIGN, FileCache, FileStorage};
pub(crate) use lock::FileLock;
pub use lock::{LockMode, Locking, Permissions};
pub use memory::{MemOpener, MemStorage};
pub use opener::{CacheOpener, FileInfo, Opener};
pub(crate) use opener::{canonicalize_with, open_with, read_dir_with, remove_file_with, stat_with};
pub(crate) use zeros::write_zeros;
