//! One-layer chains held in memory, for the planners' and converters' tests.

use std::sync::Arc;

use crate::chain::{Chain, ChainOptions};
use crate::create::{CreateOptions, create_on};
use crate::storage::MemOpener;

/// A fresh qcow2 image of `size` bytes (64 KiB clusters) in memory, as a writable chain,
/// with `writes` (guest offset, bytes) done.
pub(crate) fn memory_chain(size: u64, writes: &[(u64, &[u8])]) -> Chain {
    let opener = Arc::new(MemOpener::new());
    let path = std::path::Path::new("/img.qcow2");
    create_on(&*opener.create(path), &CreateOptions::qcow2(size)).unwrap();
    let chain = Chain::open_with(
        path,
        &ChainOptions {
            writable: true,
            opener: Some(opener),
            ..ChainOptions::default()
        },
    )
    .unwrap();
    for (offset, bytes) in writes {
        chain.write_at(bytes, *offset).unwrap();
    }
    chain
}

/// The guest bytes of `chain` at `offset..offset + len`.
pub(crate) fn content(chain: &Chain, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    chain.read_at(&mut buf, offset).unwrap();
    buf
}
