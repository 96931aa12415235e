//! Several threads writing one chain at once. First each thread owns a region and reads
//! back exactly what it wrote while the others write theirs; then all threads write the
//! same clusters (whole clusters, a pattern per thread) and every cluster must end up as
//! one of the patterns written to it. Afterwards `qemu-img check` finds nothing and QEMU
//! reads what we read.

mod common;

use std::collections::BTreeSet;

use common::{Rng, Scratch};
use qcow2_engine::{Chain, ChainOptions};

const THREADS: u64 = 4;

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

/// Phase 1: thread `t` writes, zeroes and reads back in its own quarter of the image.
/// Returns the quarter's final content.
fn own_region(chain: &Chain, t: u64, region: u64, cluster: u64, below: &[u8]) -> Vec<u8> {
    let start = t * region;
    let mut model = below[start as usize..(start + region) as usize].to_vec();
    let mut rng = Rng::new(100 + t);
    for i in 0..80 {
        let len = 1 + rng.below(3 * cluster);
        let off = rng.below(region - len);
        match rng.below(10) {
            0..=5 => {
                let data = rng.bytes(len as usize);
                chain.write_at(&data, start + off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 | 7 => {
                chain
                    .write_zeroes(start + off, len, rng.below(2) == 0)
                    .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => chain.flush().unwrap(),
            _ => {}
        }
        // Read back a random stretch of the region, and the one just written.
        let len = 1 + rng.below(4 * cluster).min(region - 1);
        let off = rng.below(region - len);
        let mut buf = vec![0u8; len as usize];
        chain.read_at(&mut buf, start + off).unwrap();
        assert!(
            buf == model[off as usize..(off + len) as usize],
            "thread {t}, step {i}: read at {:#x}+{len:#x} differs",
            start + off
        );
    }
    model
}

/// Phase 2: thread `t` writes whole clusters of the shared area with its pattern (or
/// zeroes/discards them); returns, per cluster, the values it wrote there.
fn shared_area(chain: &Chain, t: u64, area: u64, cluster: u64) -> Vec<(u64, u8)> {
    let pattern = 0xa0 + t as u8;
    let clusters = area / cluster;
    let mut rng = Rng::new(200 + t);
    let mut wrote = Vec::new();
    for _ in 0..60 {
        let first = rng.below(clusters);
        let n = 1 + rng.below(3.min(clusters - first));
        let (off, len) = (first * cluster, n * cluster);
        let value = match rng.below(8) {
            0 => {
                chain.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                0
            }
            1 => {
                chain.discard(off, len).unwrap();
                0
            }
            2 => {
                chain.flush().unwrap();
                continue;
            }
            _ => {
                chain.write_at(&vec![pattern; len as usize], off).unwrap();
                pattern
            }
        };
        wrote.extend((first..first + n).map(|c| (c, value)));
        // Whatever the others do, each byte reads as some value written there.
        let mut buf = vec![0u8; len as usize];
        chain.read_at(&mut buf, off).unwrap();
        assert!(
            buf.iter()
                .all(|&b| b == 0x01 || b == 0 || (0xa0..0xa0 + THREADS as u8).contains(&b)),
            "thread {t}: read garbage at {off:#x}"
        );
    }
    wrote
}

fn threads(options: &str, backing: bool, cluster: u64) {
    let label = format!("[{options}] backing={backing}");
    let s = Scratch::new();
    let size = 8 << 20;
    let mut below = vec![0u8; size as usize];
    if backing {
        s.create("base.qcow2", "", size);
        s.qemu_io("base.qcow2", "qcow2", &["write -P 0x11 0 5M".into()]);
        below = s.reference("base.qcow2", "qcow2");
        s.create_overlay("top.qcow2", "base.qcow2", "qcow2", options, None);
    } else {
        s.create("top.qcow2", options, size);
    }
    let chain = open_rw(&s, "top.qcow2");
    let region = size / THREADS;
    let regions: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (chain, below) = (&chain, &below);
                scope.spawn(move || own_region(chain, t, region, cluster, below))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let expected = regions.concat();
    let mut got = vec![0u8; size as usize];
    chain.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "{label}: phase 1 content differs");

    // Phase 2 over the first 2 MiB, which starts uniform.
    let area = 2 << 20;
    chain.write_at(&vec![0x01; area as usize], 0).unwrap();
    let writes: Vec<Vec<(u64, u8)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let chain = &chain;
                scope.spawn(move || shared_area(chain, t, area, cluster))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut allowed = vec![BTreeSet::from([0x01u8]); (area / cluster) as usize];
    for (c, v) in writes.iter().flatten() {
        allowed[*c as usize].insert(*v);
    }
    chain.close().unwrap();
    drop(chain);

    let report = s.qemu_img(&["check", "top.qcow2"]);
    assert!(report.contains("No errors were found"), "{label}: {report}");
    let qemu = s.reference("top.qcow2", "qcow2");
    let mut ours = vec![0u8; size as usize];
    s.open("top.qcow2").read_at(&mut ours, 0).unwrap();
    assert!(qemu == ours, "{label}: QEMU and we read different bytes");
    assert!(
        ours[area as usize..] == expected[area as usize..],
        "{label}: phase 2 changed bytes outside its area"
    );
    for (c, bytes) in ours[..area as usize].chunks(cluster as usize).enumerate() {
        let v = bytes[0];
        assert!(
            bytes.iter().all(|&b| b == v) && allowed[c].contains(&v),
            "{label}: cluster {c} is not one written pattern (first byte {v:#04x}, allowed {:?})",
            allowed[c]
        );
    }
}

#[test]
fn four_threads_write_one_image_with_64k_clusters_over_a_backing_file() {
    threads("cluster_size=65536", true, 65536);
}

#[test]
fn four_threads_write_one_image_with_4k_clusters() {
    threads("cluster_size=4096", false, 4096);
}

#[test]
fn four_threads_write_one_image_with_extended_l2() {
    threads("cluster_size=32768,extended_l2=on", true, 32768);
}
