//! The `bitmaps` harness: persistent bitmaps (spec: "Bitmaps") from both ends — the
//! directory codec on arbitrary bytes, and whole images whose bitmaps are loaded, changed,
//! stored and loaded again.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::chain::Chain;
use crate::format::{
    Header, HeaderExtensions, QCOW2_MAGIC, decode_bitmap_directory, encode_bitmap_directory,
};
use crate::layers::Layer;
use crate::qcow2::{CheckReport, Image, ImageOptions};
use crate::storage::MemStorage;

/// Bytes of bitmap data in memory an image input may need at most (each bitmap it claims,
/// and the ones the harness adds, at the finest granularity): inputs over it are skipped,
/// so one input stays far below the fuzz run's `-rss_limit_mb=2048` and takes milliseconds.
/// (The library allows QEMU's 512 MiB per bitmap.)
pub const BITMAP_MEMORY_LIMIT: u64 = 4 << 20;

/// Bitmaps the harness may add to an image.
const ADDED: u64 = 2;

/// Runs one input: a bitmap directory, or an image when it starts with the qcow2 magic.
///
/// A directory: byte 0-1 are the bitmaps extension's `nb_bitmaps` (big-endian), byte 2
/// the cluster bits (9 + the byte modulo 13), the rest the directory. A decoded directory
/// holds `nb_bitmaps` entries and, when no name needed replacing (invalid UTF-8),
/// encodes back to the same bytes.
///
/// An image: opened for writing from memory; when that succeeds, written through a
/// [`Chain`], its bitmaps changed (added, cleared, merged, enabled, disabled, removed:
/// the last byte of the input turns operations off) and closed. After a successful close
/// the image must open again read-only, list its bitmaps, load every bitmap the session
/// had loaded (an added, enabled one records the last write) and check without new
/// corruption (nor leaks, when the input was clean and no operation failed).
pub fn bitmaps(data: &[u8]) {
    if data.starts_with(&QCOW2_MAGIC.to_be_bytes()) {
        image(data);
    } else {
        directory(data);
    }
}

fn directory(data: &[u8]) {
    let [n0, n1, bits, ref dir @ ..] = *data else {
        return;
    };
    let nb_bitmaps = u32::from(u16::from_be_bytes([n0, n1]));
    let cluster_size = 1u64 << (9 + bits % 13);
    let offset = 4 * cluster_size;
    let Ok(entries) = decode_bitmap_directory(dir, offset, nb_bitmaps, cluster_size) else {
        return;
    };
    assert_eq!(entries.len() as u64, u64::from(nb_bitmaps), "entry count");
    let names: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    if entries.iter().all(|e| !e.name.contains('\u{fffd}')) {
        assert_eq!(names.len(), entries.len(), "duplicate names decoded");
        assert!(
            encode_bitmap_directory(&entries) == dir,
            "directory does not re-encode to its bytes"
        );
    }
    // Whatever the names, what is encoded decodes to the same entries, as long as the
    // (replaced) names stay within the limits and distinct.
    if names.len() == entries.len() && entries.iter().all(|e| e.name.len() <= 1023) {
        let again = encode_bitmap_directory(&entries);
        let decoded = decode_bitmap_directory(&again, offset, nb_bitmaps, cluster_size)
            .unwrap_or_else(|e| panic!("a re-encoded directory fails to decode: {e}"));
        assert_eq!(
            decoded, entries,
            "directory does not survive encode + decode"
        );
    }
}

/// The bitmap memory an image could need, from its header and bitmaps extension alone:
/// `None` when the header does not decode (opening fails without loading anything).
fn bitmap_memory_bound(data: &[u8]) -> Option<u64> {
    let header = Header::decode(data).ok()?;
    let mut nb_bitmaps = 0;
    if header.version >= 3 {
        let end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            header.cluster_size()
        };
        let end = usize::try_from(end).unwrap_or(usize::MAX).min(data.len());
        let start = header.header_length as usize;
        if let Some(area) = data.get(start..end) {
            if let Some(ext) = HeaderExtensions::decode(area, start as u64)
                .ok()
                .and_then(|e| e.bitmaps())
            {
                nb_bitmaps = u64::from(ext.nb_bitmaps);
            }
        }
    }
    // At 512 bytes a bit; a bitmap never holds more than QEMU's 512 MiB.
    let per_bitmap = header.size.div_ceil(512 * 8).min(512 << 20);
    Some((nb_bitmaps + ADDED).saturating_mul(per_bitmap.max(8)))
}

fn open(bytes: Arc<MemStorage>, writable: bool) -> crate::Result<Image> {
    let options = ImageOptions {
        writable,
        ..ImageOptions::default()
    };
    Image::from_storage(Box::new(bytes), "fuzz-input", &options, None)
}

fn is_clean(report: &CheckReport) -> bool {
    report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0
}

/// What the writable session did, to check after reopening.
#[derive(Default)]
struct Session {
    /// Bitmaps whose contents the session held (loaded or added) and did not remove:
    /// stored on close, they must load again.
    held: BTreeSet<String>,
    /// An added, enabled bitmap and a guest offset written after it was added.
    recorded: Option<(String, u64)>,
    /// Some write or bitmap operation failed where it was expected to succeed.
    failed: bool,
}

fn image(data: &[u8]) {
    match bitmap_memory_bound(data) {
        Some(bytes) if bytes <= BITMAP_MEMORY_LIMIT => {}
        _ => return,
    }
    // Refcounts past the end of the file are not checked, but a write over them leaks
    // them (in QEMU too): such an image does not count as clean.
    let clean_before = open(Arc::new(MemStorage::from_bytes(data.to_vec())), false)
        .ok()
        .filter(|i| i.has_refcounts_past_end(1 << 12).is_ok_and(|past| !past))
        .and_then(|i| i.check().ok())
        .is_some_and(|r| is_clean(&r));
    let storage = Arc::new(MemStorage::from_bytes(data.to_vec()));
    let Ok(image) = open(storage.clone(), true) else {
        return;
    };
    let ops = !data.last().copied().unwrap_or(0);
    let mut session = Session::default();
    let closed = write_and_change(image, ops, &mut session);
    if !closed {
        return;
    }
    let bytes = storage.to_bytes();
    let image = open(Arc::new(MemStorage::from_bytes(bytes)), false)
        .unwrap_or_else(|e| panic!("the image does not open after a close: {}", e.report()));
    let listed = image
        .bitmaps()
        .unwrap_or_else(|e| panic!("bitmaps not listed after a close: {}", e.report()));
    for info in &listed {
        let loaded = image.load_bitmap(&info.name);
        if session.held.contains(&info.name) {
            assert!(!info.in_use, "bitmap {:?} stored in use", info.name);
            let bitmap = loaded.unwrap_or_else(|e| {
                panic!(
                    "bitmap {:?} does not load after a close: {}",
                    info.name,
                    e.report()
                )
            });
            if let Some((name, offset)) = &session.recorded {
                if name == &info.name {
                    assert!(
                        bitmap.is_dirty(*offset),
                        "{name} missed a write at {offset}"
                    );
                }
            }
        }
    }
    for name in &session.held {
        assert!(
            listed.iter().any(|i| &i.name == name),
            "bitmap {name:?} lost on close"
        );
    }
    let report = image.check();
    if clean_before && !session.failed {
        let report = report.expect("checking a clean image after bitmap operations");
        assert!(
            is_clean(&report),
            "bitmap operations left a clean image unclean: {:?}",
            report.findings
        );
    }
}

/// The writable session: writes and bitmap operations, then close. Returns whether the
/// close succeeded.
fn write_and_change(image: Image, ops: u8, s: &mut Session) -> bool {
    let size = image.size();
    let Ok(listed) = image.bitmaps() else {
        panic!("a writable image lists its bitmaps from memory");
    };
    for info in &listed {
        if info.enabled && !info.in_use {
            s.held.insert(info.name.clone());
        }
    }
    let Ok(chain) = Chain::from_layers(vec![Layer::Qcow2(image)]) else {
        return false;
    };
    let len = size.min(4096);
    let mut ok = |r: crate::Result<()>| {
        if r.is_err() {
            s.failed = true;
        }
    };
    if len > 0 {
        ok(chain.write_at(&vec![0x5a; len as usize], 0));
        ok(chain.write_zeroes(size / 2 / 512 * 512, len, false));
    }
    let Some(image) = chain.top().as_qcow2() else {
        unreachable!("the chain holds a qcow2 image");
    };
    let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
    let usable = |name: &str| listed.iter().any(|i| i.name == name && !i.in_use);
    // Operations on names that do not exist fail, and change nothing.
    assert!(image.remove_bitmap("fuzz no such bitmap").is_err());
    assert!(image.clear_bitmap("fuzz no such bitmap").is_err());
    if ops & 1 != 0 {
        let name = "fuzz-added";
        let r = image.add_bitmap(name, Some(512), true);
        if !names.contains(&name) && image.header().version >= 3 {
            if r.is_ok() {
                s.held.insert(name.into());
                s.recorded = Some((name.into(), 0));
            } else {
                s.failed = true;
            }
        }
    }
    if ops & 2 != 0 {
        let name = "fuzz-disabled";
        if image.add_bitmap(name, None, false).is_ok() {
            s.held.insert(name.into());
            // A second add of a name is refused. (After a failed first add a second
            // may succeed: the first can fail on an earlier change's corrupt refcount
            // before it changed anything.)
            assert!(image.add_bitmap(name, None, false).is_err());
        }
    }
    if let Some(&first) = names.first() {
        if ops & 4 != 0 && image.clear_bitmap(first).is_ok() {
            s.held.insert(first.into());
        }
        if ops & 8 != 0 {
            if let Ok(source) = image.load_bitmap(names.last().copied().unwrap_or(first)) {
                if image.merge_bitmap(first, &source).is_ok() {
                    s.held.insert(first.into());
                }
            }
        }
        if ops & 16 != 0 {
            let r = image
                .disable_bitmap(first)
                .and_then(|()| image.enable_bitmap(first));
            if r.is_ok() {
                s.held.insert(first.into());
            } else if usable(first) && s.held.contains(first) {
                s.failed = true;
            }
        }
        if ops & 32 != 0 {
            let victim = names.get(1).copied().unwrap_or(first);
            if image.remove_bitmap(victim).is_ok() {
                s.held.remove(victim);
            }
        }
    }
    if ops & 64 != 0 && names.len() > 1 {
        let last = names[names.len() - 1];
        if image.disable_bitmap(last).is_ok() {
            s.held.insert(last.into());
        }
    }
    // A write after the operations: enabled bitmaps record it.
    if len > 0 {
        let at = (size - len) / 512 * 512;
        match chain.write_at(&vec![0xa5; len as usize], at) {
            Ok(()) => {
                if let Some((_, offset)) = &mut s.recorded {
                    *offset = at;
                }
            }
            Err(_) => {
                s.failed = true;
                s.recorded = None;
            }
        }
    } else {
        s.recorded = None;
    }
    if ops & 128 != 0 {
        let _ = chain.flush();
    }
    chain.close().is_ok()
}
