//! An NBD server for a [`crate::Chain`], as qemu-nbd serves an image: fixed newstyle
//! negotiation, structured replies, block status for `base:allocation`,
//! `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`.
//!
//! `codec/` is the protocol's messages, pure (no I/O, fuzzable alone); `server/` runs
//! connections over any byte stream and listens on Unix and TCP sockets.

pub mod codec;
pub mod server;

pub use server::{ExportOptions, Listener, NbdServer};
