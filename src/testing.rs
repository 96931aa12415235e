//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the test that replays
//! their committed corpus (`tests/fuzz_corpus.rs`). Enabled by the `testing` feature.
//!
//! Each harness takes arbitrary bytes and must never panic, hang or allocate without bound:
//! errors are the expected answer to most inputs. Where a result is `Ok`, the harness also
//! checks a property that a correct decoder keeps (a round trip, runs that tile the range),
//! so a wrong answer fails as loudly as a crash.
//!
//! [`bitmaps`] takes either a bitmap directory or an image whose bitmaps it changes and
//! stores through a writable session ([`bitmaps`]'s documentation has the details).
//!
//! [`ops`] is different: its input is a program ([`OpsProgram`]) of operations on a chain
//! held in memory, checked against a model after every step.

use std::path::Path;

use crate::format::{Header, HeaderExtensions, SnapshotEntry};
use crate::layers::{Format, PROBE_BYTES, RawImage, header_virtual_size};
use crate::qcow2::{Image, ImageOptions, Mapping, RepairMode, Run};
use crate::storage::MemStorage;

mod bitmaps;
mod chain_ops;
mod nbd;

pub use bitmaps::{BITMAP_MEMORY_LIMIT, bitmaps};
pub use chain_ops::{ChainOp, LayerConfig, MAX_OPS, OpsConfig, OpsProgram, RawRange, ops};
pub use nbd::{NBD_IMAGE_SIZE, nbd, nbd_seeds};

/// A harness: runs one input, panics only on a bug.
pub type Harness = fn(&[u8]);

/// The harnesses by fuzz target name (the file names in `fuzz/fuzz_targets/` and the
/// directories in `fuzz/corpus/`).
pub const TARGETS: &[(&str, Harness)] = &[
    ("header_decode", header_decode),
    ("open_and_read", open_and_read),
    ("snapshot_table", snapshot_table),
    ("check", check),
    ("ops", ops),
    ("probe", probe),
    ("bitmaps", bitmaps),
    ("nbd", nbd),
];

/// How much of the guest range [`open_and_read`] reads: an image may claim exabytes.
pub const OPEN_AND_READ_LIMIT: u64 = 64 << 20;

/// [`Header::decode`] on `data`, then [`HeaderExtensions::decode`] on the extension area a
/// decoded header implies (as opening does) and on all of `data`. A decoded header must
/// encode back to the bytes it was decoded from.
pub fn header_decode(data: &[u8]) {
    // Arbitrary bytes as an extension area, whatever the header says.
    let _ = HeaderExtensions::decode(data, 0);
    let Ok(header) = Header::decode(data) else {
        return;
    };
    let len = header.header_length as usize;
    let mut encoded = vec![0u8; len];
    header.encode(&mut encoded);
    assert_eq!(
        Header::decode(&encoded).as_ref().ok(),
        Some(&header),
        "header does not survive encode + decode"
    );
    if header.version >= 3 {
        // The extensions lie between the header and the backing file name (or the end of
        // the first cluster).
        let end = if header.backing_file_offset != 0 {
            header.backing_file_offset
        } else {
            header.cluster_size()
        };
        let end = usize::try_from(end).unwrap_or(usize::MAX).min(data.len());
        if let Some(area) = data.get(len..end) {
            let _ = HeaderExtensions::decode(area, len as u64);
        }
    }
}

/// Opens `data` as a qcow2 image held in memory and reads its guest range (at most the
/// first [`OPEN_AND_READ_LIMIT`] bytes) chunk by chunk through [`Image::runs`] and
/// [`Image::read_run`]. The runs of every chunk must tile it exactly.
pub fn open_and_read(data: &[u8]) {
    let storage = Box::new(MemStorage::from_bytes(data.to_vec()));
    let Ok(image) = Image::from_storage(storage, "fuzz-input", &ImageOptions::default(), None)
    else {
        return;
    };
    const CHUNK: u64 = 1 << 20;
    let end = image.size().min(OPEN_AND_READ_LIMIT);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut chunk = 0;
    while chunk < end {
        let chunk_len = CHUNK.min(end - chunk);
        let mut pos = chunk;
        for run in image.runs(chunk, chunk_len) {
            let Ok(run) = run else {
                // The iterator stops after an error; the rest of the chunk is unreadable.
                pos = chunk + chunk_len;
                break;
            };
            assert_eq!(run.offset, pos, "runs must be contiguous");
            assert!(run.len > 0, "a run is never empty");
            pos = run.end();
            assert!(pos <= chunk + chunk_len, "run past the requested range");
            read_whole_run(&image, &run, &mut buf);
        }
        assert_eq!(
            pos,
            chunk + chunk_len,
            "runs must cover the requested range"
        );
        chunk += chunk_len;
    }
}

/// Reads `run` through `buf` (at most `buf.len()` bytes at a time). Runs that read as zeros
/// need no I/O, so only their first piece is read, to keep fuzzing fast.
fn read_whole_run(image: &Image, run: &Run, buf: &mut [u8]) {
    let mut done = 0;
    while done < run.len {
        let n = (run.len - done).min(buf.len() as u64);
        let piece = Run {
            offset: run.offset + done,
            len: run.len - done,
            mapping: run.mapping.advanced(done),
        };
        let out = &mut buf[..n as usize];
        if image.read_run(&piece, out).is_err() {
            return;
        }
        if matches!(run.mapping, Mapping::Unallocated | Mapping::Zero { .. }) {
            assert!(
                out.iter().all(|&b| b == 0),
                "a zero run read non-zero bytes"
            );
            return;
        }
        done += n;
    }
}

/// Decodes `data` as a snapshot table: entries back to back until one fails to decode.
/// Every decoded entry must survive encode + decode unchanged.
pub fn snapshot_table(data: &[u8]) {
    let mut pos = 0usize;
    while let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) {
        let Ok((entry, used)) = SnapshotEntry::decode(rest, pos as u64) else {
            return;
        };
        assert!(used > 0 && used <= rest.len(), "entry length out of range");
        // Invalid UTF-8 in a name is replaced on decode, which can make it longer; the
        // encoding only holds 16-bit lengths.
        if entry.id.len() <= usize::from(u16::MAX) && entry.name.len() <= usize::from(u16::MAX) {
            let encoded = entry.encode();
            let (again, again_used) = SnapshotEntry::decode(&encoded, 0)
                .unwrap_or_else(|e| panic!("re-encoded snapshot entry fails to decode: {e}"));
            assert_eq!(
                again, entry,
                "snapshot entry does not survive encode + decode"
            );
            assert_eq!(again_used, encoded.len());
        }
        pos += used;
    }
}

/// Opens `data` as a qcow2 image held in memory, checks it, repairs it (`-r all`) and
/// checks it again. The repaired image must still open; a repair that reports the image
/// clean must leave an image that a new check finds clean and a second repair leaves
/// alone. (Damage a repair cannot undo, such as a pointer past the end of the file from a
/// table that overlaps the header, may make each repair find something new.)
pub fn check(data: &[u8]) {
    let open = |bytes: Vec<u8>| {
        Image::from_storage(
            Box::new(MemStorage::from_bytes(bytes)),
            "fuzz-input",
            &ImageOptions::default(),
            None,
        )
    };
    let Ok(image) = open(data.to_vec()) else {
        return;
    };
    let _ = image.check();
    let storage = std::sync::Arc::new(MemStorage::from_bytes(data.to_vec()));
    let Ok(image) = Image::from_storage(
        Box::new(storage.clone()),
        "fuzz-input",
        &ImageOptions::default(),
        None,
    ) else {
        return;
    };
    let Ok(first) = image.repair(RepairMode::All) else {
        return;
    };
    drop(image);
    let repaired = storage.to_bytes();
    let image = match open(repaired.clone()) {
        Ok(image) => image,
        Err(e) => panic!("a repaired image does not open: {e:?}"),
    };
    let again = image.check().expect("checking a repaired image");
    if first.is_clean() {
        assert!(
            again.is_clean(),
            "repair said clean, a new check finds {:?}",
            again.findings
        );
    }
    let image = Image::from_storage(
        Box::new(MemStorage::from_bytes(repaired)),
        "fuzz-input",
        &ImageOptions::default(),
        None,
    )
    .expect("reopening a repaired image");
    if let Ok(second) = image.repair(RepairMode::All) {
        if first.is_clean() {
            assert_eq!(
                (second.leaks_fixed, second.corruptions_fixed),
                (0, 0),
                "a second repair of a clean image fixed more: {:?}",
                second.findings
            );
        }
    }
}

/// Probes `data` as a file's first bytes ([`Format::probe_bytes`], and [`Format::probe`]
/// over a storage holding them), reads every format's header sizes from it and writes its
/// first sector into a probed raw image. Probing never fails and looks at the first 512
/// bytes only, a short file as if padded with zeros; a name ending `.dmg` turns only what
/// scores below 2 (raw, and cloop, which ties and comes later) into dmg; and the raw
/// image's guard refuses the sector exactly when it probes as another format.
pub fn probe(data: &[u8]) {
    let found = Format::probe_bytes(data, None);
    let stored = MemStorage::from_bytes(data.to_vec());
    assert_eq!(
        Format::probe(&stored, Path::new("fuzz-input")).expect("probing a storage in memory"),
        found
    );
    if data.is_empty() {
        assert_eq!(found, Format::Raw, "an empty file is raw");
        return;
    }
    let first = &data[..data.len().min(PROBE_BYTES)];
    let mut padded = [0u8; PROBE_BYTES];
    padded[..first.len()].copy_from_slice(first);
    assert_eq!(
        Format::probe_bytes(&padded, None),
        found,
        "bytes past the first sector, or zeros past a short file's end, changed the probe"
    );
    let named = Format::probe_bytes(data, Some(Path::new("fuzz-input.dmg")));
    let expected = match found {
        Format::Raw | Format::Cloop => Format::Dmg,
        other => other,
    };
    assert_eq!(named, expected, "a .dmg name");
    for format in Format::ALL {
        let _ = header_virtual_size(format, &padded, data.len() as u64);
    }
    let raw = RawImage::from_storage(
        Box::new(MemStorage::from_bytes(vec![0; 2 * PROBE_BYTES])),
        "fuzz-input",
    )
    .expect("a raw image in memory")
    .mark_probed();
    assert_eq!(
        raw.write_at(&padded, 0).is_ok(),
        found == Format::Raw,
        "the probed raw image's guard on a sector probing as {found:?}"
    );
}
