//! The fixtures: valid images made once by qemu-img (and the files they need), with their
//! layout read independently; and a case made by damaging one.

use std::sync::Arc;

use crate::common::{Rng, Scratch};
use crate::layout::Layout;
use crate::runner::Case;

/// A valid image (and the files it needs), made once by qemu-img.
pub(crate) struct Fixture {
    pub(crate) name: &'static str,
    /// The image's bytes.
    pub(crate) bytes: Vec<u8>,
    /// Other files the image needs (a backing file, a data file), by name.
    pub(crate) others: Vec<(String, Vec<u8>)>,
    pub(crate) layout: Layout,
}

impl Fixture {
    fn load(s: &Scratch, name: &'static str, file: &str, others: &[&str]) -> Arc<Fixture> {
        let bytes = std::fs::read(s.path(file)).unwrap();
        let layout = Layout::parse(&bytes);
        Arc::new(Fixture {
            name,
            bytes,
            others: others
                .iter()
                .map(|o| (o.to_string(), std::fs::read(s.path(o)).unwrap()))
                .collect(),
            layout,
        })
    }
}

/// The image name every fixture case writes.
pub(crate) const IMG: &str = "img.qcow2";

/// A case: `fixture` with `damage` applied to the image's bytes.
pub(crate) fn damaged(
    fixture: &Arc<Fixture>,
    what: impl Into<String>,
    damage: impl Fn(&mut Vec<u8>) + Send + Sync + 'static,
) -> Case {
    let f = fixture.clone();
    Case::new(
        format!("{}: {}", fixture.name, what.into()),
        Box::new(move |dir| {
            for (name, bytes) in &f.others {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            let mut bytes = f.bytes.clone();
            damage(&mut bytes);
            std::fs::write(dir.join(IMG), bytes).unwrap();
            IMG.to_string()
        }),
    )
}

/// Makes every fixture with qemu-img and qemu-io.
pub(crate) fn make_fixtures(s: &Scratch) -> Vec<Arc<Fixture>> {
    let io = |name: &str, cmds: &[&str]| {
        s.qemu_io(
            name,
            "qcow2",
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    let data = [
        "write -P 0x11 0 64k",
        "write -P 0x22 192k 100k",
        "write -z 512k 64k",
        "write -P 0x33 1m 4k",
        "write -P 0x44 3m 512k",
        "discard 3m 64k",
    ];
    s.create("c64k.qcow2", "cluster_size=64k", 4 << 20);
    io("c64k.qcow2", &data);
    s.create("c512.qcow2", "cluster_size=512", 4 << 20);
    io("c512.qcow2", &data);
    s.create("c2m.qcow2", "cluster_size=2M", 8 << 20);
    io(
        "c2m.qcow2",
        &["write -P 0x55 1m 64k", "write -P 0x66 6m 2m"],
    );
    s.create("v2.qcow2", "compat=0.10,cluster_size=64k", 4 << 20);
    io("v2.qcow2", &data);
    s.create("extl2.qcow2", "extended_l2=on,cluster_size=64k", 4 << 20);
    io(
        "extl2.qcow2",
        &[
            "write -P 0x11 0 4k",
            "write -P 0x22 70k 10k",
            "write -z 130k 6k",
            "write -P 0x33 1m 128k",
        ],
    );
    s.create("snap.qcow2", "cluster_size=64k", 4 << 20);
    io("snap.qcow2", &["write -P 0x11 0 128k"]);
    s.qemu_img(&["snapshot", "-c", "first", "snap.qcow2"]);
    io("snap.qcow2", &["write -P 0x22 64k 128k"]);
    s.qemu_img(&["snapshot", "-c", "a-second-snapshot", "snap.qcow2"]);
    io("snap.qcow2", &["write -P 0x33 1m 64k"]);
    // Compressed clusters from a raw file of compressible, varied data.
    let mut raw = vec![0u8; 2 << 20];
    let mut rng = Rng::new(6);
    for (i, chunk) in raw.chunks_mut(4096).enumerate() {
        if i % 5 != 4 {
            let b = rng.next_u64() as u8;
            chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = b ^ (j / 64) as u8);
        }
    }
    s.write_file("src.raw", &raw);
    for (name, opts) in [
        ("comp.qcow2", "cluster_size=64k"),
        ("zstd.qcow2", "cluster_size=64k,compression_type=zstd"),
        ("comp4k.qcow2", "cluster_size=4k"),
    ] {
        s.qemu_img(&[
            "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "src.raw", name,
        ]);
    }
    s.create("base.qcow2", "cluster_size=64k", 4 << 20);
    io("base.qcow2", &["write -P 0x71 0 1m", "write -P 0x72 2m 1m"]);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    io("top.qcow2", &["write -P 0x73 512k 1m", "write -z 2m 64k"]);
    s.qemu_img(&["create", "-q", "-f", "raw", "rawbase.raw", "2M"]);
    s.qemu_io("rawbase.raw", "raw", &["write -P 0x74 0 1m".to_string()]);
    s.create_overlay(
        "rawtop.qcow2",
        "rawbase.raw",
        "raw",
        "cluster_size=64k",
        None,
    );
    io("rawtop.qcow2", &["write -P 0x75 64k 64k"]);
    s.create("ext.qcow2", "cluster_size=64k,data_file=ext.data", 4 << 20);
    io("ext.qcow2", &["write -P 0x76 0 256k"]);
    vec![
        Fixture::load(s, "c64k", "c64k.qcow2", &[]),
        Fixture::load(s, "c512", "c512.qcow2", &[]),
        Fixture::load(s, "c2m", "c2m.qcow2", &[]),
        Fixture::load(s, "v2", "v2.qcow2", &[]),
        Fixture::load(s, "extl2", "extl2.qcow2", &[]),
        Fixture::load(s, "snap", "snap.qcow2", &[]),
        Fixture::load(s, "comp", "comp.qcow2", &[]),
        Fixture::load(s, "zstd", "zstd.qcow2", &[]),
        Fixture::load(s, "comp4k", "comp4k.qcow2", &[]),
        Fixture::load(s, "top", "top.qcow2", &["base.qcow2"]),
        Fixture::load(s, "rawtop", "rawtop.qcow2", &["rawbase.raw"]),
        Fixture::load(s, "ext", "ext.qcow2", &["ext.data"]),
        bitmaps_fixture(s),
    ]
}

/// The fixture with persistent bitmaps (names of one length, so one can take another's):
/// b0 enabled at 4 KiB, b1 disabled at 64 KiB after recording writes, b2 disabled and
/// clean at 512 B.
pub(crate) fn bitmaps_fixture(s: &Scratch) -> Arc<Fixture> {
    let io = |name: &str, cmds: &[&str]| {
        s.qemu_io(
            name,
            "qcow2",
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    s.create("bitmaps.qcow2", "cluster_size=64k", 4 << 20);
    io(
        "bitmaps.qcow2",
        &["write -P 0x11 0 64k", "write -P 0x22 1m 128k"],
    );
    s.qemu_img(&["bitmap", "--add", "-g", "4k", "bitmaps.qcow2", "b0"]);
    s.qemu_img(&["bitmap", "--add", "-g", "64k", "bitmaps.qcow2", "b1"]);
    io(
        "bitmaps.qcow2",
        &[
            "write -P 0x33 512k 64k",
            "write -z 2m 64k",
            "write -P 0x44 3m 4k",
        ],
    );
    s.qemu_img(&["bitmap", "--disable", "bitmaps.qcow2", "b1"]);
    s.qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "512",
        "--disable",
        "bitmaps.qcow2",
        "b2",
    ]);
    Fixture::load(s, "bitmaps", "bitmaps.qcow2", &[])
}

pub(crate) fn fixture<'a>(all: &'a [Arc<Fixture>], name: &str) -> &'a Arc<Fixture> {
    all.iter().find(|f| f.name == name).unwrap()
}

/// A seed that differs between fixtures.
pub(crate) fn name_seed(name: &str) -> u64 {
    name.bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}
