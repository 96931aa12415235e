//! `du`: space accounting adds up to the file's allocated clusters, a snapshot's exclusive
//! bytes are what deleting it frees, and guest data is split into visible and shadowed.

mod common;

use common::{HeaderField, Scratch, read_header_field};
use qcow2_engine::ops::{self, SpaceReport};
use qcow2_engine::{Chain, ChainOptions};
use serde_json::Value;

fn du(s: &Scratch, name: &str) -> SpaceReport {
    let chain = Chain::open_with(s.path(name), &ChainOptions::default()).unwrap();
    ops::du(&chain).unwrap()
}

/// Bytes of the clusters whose refcount is non-zero, read from the file (16-bit refcounts,
/// one refcount block is enough for these images).
fn clusters_in_use(s: &Scratch, name: &str) -> u64 {
    let path = s.path(name);
    let cluster_bits = read_header_field(&path, HeaderField::ClusterBits);
    assert_eq!(read_header_field(&path, HeaderField::RefcountOrder), 4);
    let table = read_header_field(&path, HeaderField::RefcountTableOffset);
    let block = s.read_u64(name, table);
    let bytes = std::fs::read(&path).unwrap();
    let cs = 1usize << cluster_bits;
    let refcounts = &bytes[block as usize..block as usize + cs];
    let used = refcounts
        .chunks(2)
        .filter(|r| u16::from_be_bytes([r[0], r[1]]) != 0)
        .count();
    used as u64 * cs as u64
}

fn snapshotted(s: &Scratch, name: &str, options: &str) {
    s.create(name, options, 4 << 20);
    let io = |commands: &[&str]| {
        let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        s.qemu_io(name, "qcow2", &commands);
    };
    io(&["write -P 1 0 1M", "write -c -P 7 2M 128k"]);
    s.qemu_img(&["snapshot", "-c", "s1", name]);
    io(&["write -P 2 0 256k", "write -z 768k 64k"]);
    s.qemu_img(&["snapshot", "-c", "s2", name]);
    io(&["write -P 3 512k 128k", "discard 2M 64k"]);
    s.qemu_img(&["snapshot", "-c", "s3", name]);
    s.qemu_img(&["snapshot", "-d", "s2", name]);
    io(&["write -P 4 3M 64k"]);
}

#[test]
fn totals_add_up_and_exclusive_bytes_are_what_a_delete_frees() {
    let s = Scratch::new();
    for (i, options) in ["cluster_size=65536", "cluster_size=4096", "extended_l2=on"]
        .iter()
        .enumerate()
    {
        let name = format!("snap{i}.qcow2");
        snapshotted(&s, &name, options);
        let report = du(&s, &name);
        let layer = &report.layers[0];
        let c = layer.clusters.as_ref().unwrap();
        let exclusive: u64 = c.active.exclusive
            + layer
                .snapshots
                .iter()
                .map(|s| s.space.exclusive)
                .sum::<u64>();
        assert_eq!(
            c.metadata + exclusive + c.shared,
            c.referenced,
            "{options}: parts add up"
        );
        assert_eq!(
            c.referenced,
            clusters_in_use(&s, &name),
            "{options}: in use"
        );
        for owner in std::iter::once(&c.active).chain(layer.snapshots.iter().map(|s| &s.space)) {
            assert_eq!(owner.allocated, owner.exclusive + owner.shared, "{options}");
        }
        assert_eq!(layer.snapshots.len(), 2);
        for snap in &layer.snapshots {
            let copy = format!("del{i}-{}.qcow2", snap.name);
            s.copy(&name, &copy);
            s.qemu_img(&["snapshot", "-d", &snap.name, &copy]);
            s.assert_clean(&copy, options);
            let after = du(&s, &copy);
            let a = after.layers[0].clusters.as_ref().unwrap();
            assert_eq!(
                (c.referenced - c.metadata) - (a.referenced - a.metadata),
                snap.space.exclusive,
                "{options}: deleting {} frees its exclusive bytes",
                snap.name
            );
            assert!(
                snap.space.exclusive > 0,
                "{options}: {} owns something",
                snap.name
            );
        }
    }
}

#[test]
fn guest_data_splits_into_visible_and_shadowed_through_a_chain() {
    let s = Scratch::new();
    s.create("base.qcow2", "", 4 << 20);
    s.qemu_io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 1 0 1M".to_string(),
            "write -P 2 2M 256k".to_string(),
        ],
    );
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "", None);
    s.qemu_io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 3 0 128k".to_string(),
            "write -z 2M 64k".to_string(),
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 4 64k 128k".to_string()]);
    let report = du(&s, "top.qcow2");
    let figures: Vec<(u64, u64, u64)> = report
        .layers
        .iter()
        .map(|l| (l.guest_data, l.visible_data, l.shadowed_data))
        .collect();
    let k = 1024;
    assert_eq!(
        figures,
        vec![
            (128 * k, 128 * k, 0),
            (128 * k, 64 * k, 64 * k),
            (1280 * k, 1280 * k - 192 * k - 64 * k, 256 * k),
        ]
    );
    for layer in &report.layers {
        let c = layer.clusters.as_ref().unwrap();
        assert_eq!(c.metadata + c.active.exclusive + c.shared, c.referenced);
    }
    assert_eq!(
        report.total_referenced(),
        ["top.qcow2", "mid.qcow2", "base.qcow2"]
            .iter()
            .map(|n| clusters_in_use(&s, n))
            .sum::<u64>()
    );

    let out = s.qimg(&["du", "--output=json", "top.qcow2"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[1]["shadowed-data"], 64 * k);
    assert_eq!(v["total-allocated"], report.total_referenced());
    let human = s.qimg(&["du", "base.qcow2"]);
    assert!(human.contains("(active)"), "{human}");
}
