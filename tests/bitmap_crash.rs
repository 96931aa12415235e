//! Crash consistency of persistent bitmaps: an image with an enabled and a disabled
//! bitmap is written through a `FaultStorage` that loses power after its k-th write, for
//! every k. Every disk that could be left must pass `qemu-img check` (leaks allowed), and
//! an enabled bitmap not marked in use must cover every byte whose content changed — a
//! clean-looking bitmap that misses a change is the failure this guards against. The
//! disabled bitmap never changes.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::Scratch;
use qcow2_engine::storage::{FaultStorage, MemStorage, Unflushed};
use qcow2_engine::{Chain, DirtyBitmap, Image, ImageOptions, Layer};

const SUBSETS: [Unflushed; 3] = [Unflushed::Lost, Unflushed::Kept, Unflushed::Seeded(1)];
const SIZE: u64 = 4 << 20;

fn template(s: &Scratch, options: &str) -> Vec<u8> {
    s.create("t.qcow2", options, SIZE);
    s.run("qemu-io", &["-c", "write -P 1 0 1M", "t.qcow2"]);
    s.qemu_img(&["bitmap", "--add", "-g", "4k", "t.qcow2", "on"]);
    s.qemu_img(&["bitmap", "--add", "t.qcow2", "off"]);
    s.run("qemu-io", &["-c", "write -P 2 2M 64k", "t.qcow2"]);
    s.qemu_img(&["bitmap", "--disable", "t.qcow2", "off"]);
    std::fs::read(s.path("t.qcow2")).unwrap()
}

fn open(bytes: Vec<u8>, writable: bool) -> Image {
    let options = ImageOptions {
        writable,
        ..ImageOptions::default()
    };
    Image::from_storage(
        Box::new(MemStorage::from_bytes(bytes)),
        "mem.qcow2",
        &options,
        None,
    )
    .unwrap()
}

fn content(image: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// The workload: writes, zeroes and discards with a flush in the middle, then close.
fn workload(image: Image) -> qcow2_engine::Result<()> {
    let chain = Chain::from_layers(vec![Layer::Qcow2(image)])?;
    chain.write_at(&[3; 8192], 100_000)?;
    chain.write_zeroes(512 << 10, 128 << 10, true)?;
    chain.flush()?;
    chain.write_at(&[4; 4096], 3 << 20)?;
    chain.discard(0, 256 << 10)?;
    chain.close()
}

fn crash_everywhere(options: &str) -> usize {
    let s = Scratch::new();
    let template = template(&s, options);
    let before = content(&open(template.clone(), false));
    let off_before = open(template.clone(), false).load_bitmap("off").unwrap();
    let off_info = open(template.clone(), false).bitmaps().unwrap()[1].clone();
    assert_eq!((off_info.name.as_str(), off_info.enabled), ("off", false));
    let writable = ImageOptions {
        writable: true,
        ..ImageOptions::default()
    };
    let total = {
        let disk = Arc::new(FaultStorage::from_bytes(template.clone()));
        let image = Image::from_storage(Box::new(disk.clone()), "t.qcow2", &writable, None)
            .expect("opening the template");
        workload(image).unwrap();
        disk.writes()
    };
    let mut seen = HashSet::new();
    for k in 1..=total {
        let disk = Arc::new(FaultStorage::from_bytes(template.clone()));
        disk.crash_after(k);
        if let Ok(image) = Image::from_storage(Box::new(disk.clone()), "t.qcow2", &writable, None) {
            let _ = workload(image);
        }
        assert!(disk.is_crashed(), "{options}: no crash after write {k}");
        for subset in SUBSETS {
            let bytes = disk.crash_image(subset);
            if !seen.insert(bytes.clone()) {
                continue;
            }
            let label = format!("{options}: crash after write {k}/{total} {subset:?}");
            std::fs::write(s.path("crashed.qcow2"), &bytes).unwrap();
            let out = s.output("qemu-img", &["check", "crashed.qcow2"]);
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // With lazy refcounts a dirty image may lag in its refcounts: the next
            // writer repairs it (QEMU on open, as here).
            let dirty = bytes[79] & 1 != 0;
            if out.status.code() == Some(2) {
                assert!(dirty, "{label}: corruption in a clean image:\n{report}");
                s.run("qemu-io", &["-c", "read 0 512", "crashed.qcow2"]);
                let code = s
                    .output("qemu-img", &["check", "crashed.qcow2"])
                    .status
                    .code();
                assert!(
                    matches!(code, Some(0 | 3)),
                    "{label}: after QEMU's repair: {code:?}"
                );
            } else {
                assert!(
                    matches!(out.status.code(), Some(0 | 3)),
                    "{label}: qemu-img check:\n{report}"
                );
            }
            let image = open(bytes, false);
            let after = content(&image);
            let list = image.bitmaps().unwrap();
            let on = list.iter().find(|b| b.name == "on").expect("bitmap on");
            if !on.in_use {
                let bitmap = image.load_bitmap("on").unwrap();
                assert_covers(&bitmap, &before, &after, &label);
            }
            let off = list.iter().find(|b| b.name == "off").expect("bitmap off");
            assert_eq!(off, &off_info, "{label}");
            assert_eq!(image.load_bitmap("off").unwrap(), off_before, "{label}");
        }
    }
    seen.len()
}

/// Every byte that differs between `before` and `after` lies in a dirty granule.
fn assert_covers(bitmap: &DirtyBitmap, before: &[u8], after: &[u8], label: &str) {
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b {
            assert!(
                bitmap.is_dirty(i as u64),
                "{label}: byte {i:#x} changed but bitmap 'on' is clean there and not in use"
            );
        }
    }
}

#[test]
fn bitmaps_survive_a_crash_at_every_write() {
    for options in ["cluster_size=65536", "cluster_size=4096,lazy_refcounts=on"] {
        let images = crash_everywhere(options);
        assert!(images > 10, "{options}: only {images} distinct images");
    }
}
