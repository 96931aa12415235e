//! Overlap checks before writes: an image whose metadata is inconsistent never gets data
//! or tables written over its header, L1 table or refcount structures; the write fails,
//! the image is marked corrupt, and `check -r all` brings it back.

mod common;

use common::{HeaderField, Scratch, read_header_field};
use qcow2_engine::{Chain, ChainOptions, Image, RepairMode};

fn open_rw(s: &Scratch, name: &str) -> Chain {
    Chain::open_with(
        s.path(name),
        &ChainOptions {
            writable: true,
            ..ChainOptions::default()
        },
    )
    .unwrap()
}

fn cluster_bytes(s: &Scratch, name: &str, offset: u64) -> Vec<u8> {
    let bytes = std::fs::read(s.path(name)).unwrap();
    bytes[offset as usize..offset as usize + 65536].to_vec()
}

fn corrupt_bit(s: &Scratch, name: &str) -> bool {
    read_header_field(&s.path(name), HeaderField::IncompatibleFeatures) & 2 != 0
}

/// A 64 KiB-cluster image with data at guest 0..128k.
fn image(s: &Scratch, name: &str) {
    s.create(name, "cluster_size=65536", 4 << 20);
    s.qemu_io(name, "qcow2", &["write -P 1 0 128k".to_string()]);
}

fn refcount_block(s: &Scratch, name: &str) -> u64 {
    let table = read_header_field(&s.path(name), HeaderField::RefcountTableOffset);
    s.read_u64(name, table)
}

#[test]
fn data_is_not_written_over_metadata_an_l2_entry_points_at() {
    let s = Scratch::new();
    // (An entry pointing at offset 0, the header, reads as unallocated, as in QEMU.)
    for (target, label) in [
        ("refcount block", 0),
        ("L1 table", 1),
        ("refcount table", 2),
        // Beyond QEMU, which guards only the directory: a table overwritten loses the
        // bitmap.
        ("bitmap table", 3),
    ] {
        let name = format!("img{label}.qcow2");
        image(&s, &name);
        let at = match label {
            0 => refcount_block(&s, &name),
            1 => read_header_field(&s.path(&name), HeaderField::L1TableOffset),
            2 => read_header_field(&s.path(&name), HeaderField::RefcountTableOffset),
            _ => {
                s.qemu_img(&["bitmap", "--add", "--disable", &name, "b0"]);
                let image = Image::open(s.path(&name)).unwrap();
                image.bitmap_directory().unwrap()[0].table_offset
            }
        };
        let before = cluster_bytes(&s, &name, at);
        // Guest cluster 1 (COPIED: an in-place overwrite) now points at the metadata.
        let entry = s.l2_entry_location(&name, 65536).unwrap();
        s.write_u64(&name, entry, (1 << 63) | at);
        let chain = open_rw(&s, &name);
        let err = match chain.write_at(&[0xee; 4096], 65536) {
            Ok(()) => panic!("{target}: the write went through"),
            Err(e) => e.report().to_string(),
        };
        assert!(err.contains("prevented a write"), "{target}: {err}");
        assert!(
            err.contains(&name),
            "{target}: the error names the file: {err}"
        );
        // Every later write is refused.
        assert!(chain.write_at(&[0xee; 512], 0).is_err(), "{target}");
        drop(chain);
        assert!(
            before == cluster_bytes(&s, &name, at),
            "{target} overwritten"
        );
        assert!(corrupt_bit(&s, &name), "{target}: not marked corrupt");
        // qemu-img agrees the image is corrupt, and our repair makes it usable again.
        let info = s.qemu_img(&["info", "--output=json", &name]);
        assert!(info.contains("\"corrupt\": true"), "{target}: {info}");
        let report = Image::open_for_repair(s.path(&name))
            .unwrap()
            .repair(RepairMode::All)
            .unwrap();
        assert!(report.is_clean(), "{target}: {:?}", report.findings);
        assert!(!corrupt_bit(&s, &name), "{target}: still marked corrupt");
        s.assert_clean(&name, target);
        let chain = open_rw(&s, &name);
        chain.write_at(&[0xee; 4096], 65536).unwrap();
        chain.close().unwrap();
        drop(chain);
        // (A rebuilt refcount structure lives elsewhere; the old one is free space.)
        if target == "L1 table" {
            assert!(
                before == cluster_bytes(&s, &name, at),
                "{target} after repair"
            );
        }
        s.assert_clean(&name, target);
    }
}

#[test]
fn allocation_never_hands_out_metadata_whose_refcount_is_zero() {
    let s = Scratch::new();
    image(&s, "a.qcow2");
    let l1 = read_header_field(&s.path("a.qcow2"), HeaderField::L1TableOffset);
    let before = cluster_bytes(&s, "a.qcow2", l1);
    // The L1 table's refcount (16 bits) is 0: the allocator sees a free cluster.
    let block = refcount_block(&s, "a.qcow2");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.path("a.qcow2"))
            .unwrap();
        f.write_all_at(&[0, 0], block + 2 * (l1 / 65536)).unwrap();
    }
    let chain = open_rw(&s, "a.qcow2");
    // Far from existing data: needs a new L2 table and a data cluster. The allocator
    // skips clusters the overlap map knows hold metadata, so the write goes elsewhere
    // and succeeds (QEMU's allocator would hand out the L1 table's cluster and its
    // overlap check then stops the write and marks the image corrupt).
    chain.write_at(&[0xee; 4096], 3 << 20).unwrap();
    chain.close().unwrap();
    drop(chain);
    assert!(
        before == cluster_bytes(&s, "a.qcow2", l1),
        "L1 table overwritten"
    );
    assert!(!corrupt_bit(&s, "a.qcow2"));
    // The damaged refcount is still there for check to find and repair to fix.
    let found = Image::open(s.path("a.qcow2")).unwrap().check().unwrap();
    assert!(
        !found.is_clean(),
        "the L1 table's refcount of 0 goes unnoticed"
    );
    let report = Image::open_for_repair(s.path("a.qcow2"))
        .unwrap()
        .repair(RepairMode::All)
        .unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    s.assert_clean("a.qcow2", "repaired");
}
