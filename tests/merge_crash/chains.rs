//! The chains the cases build with qemu-img and qemu-io: tiny (1 MiB, a few clusters per
//! layer) so that every write of a merge is a crash point.

use crate::common::Scratch;

const MIB: u64 = 1 << 20;

fn io(s: &Scratch, name: &str, format: &str, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    s.qemu_io(name, format, &commands);
}

/// base (64 KiB clusters, one compressed) <- mid (4 KiB) <- top (512 bytes): data,
/// zero clusters over data below, discards.
pub(crate) fn mixed(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=64k", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x11 0 512k",
            "write -c -P 0x12 768k 64k",
            "write -P 0x13 896k 64k",
        ],
    );
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "cluster_size=4k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x21 60k 72k",
            "write -z 256k 64k",
            "write -P 0x22 800k 32k",
            "discard 808k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=512", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x31 4k 2k",
            "write -P 0x32 100k 3k",
            "write -z 300k 8k",
            "write -P 0x33 900k 16k",
            "write -P 0x34 500k 4k",
            "discard 502k 1k",
            "write -z -u 64k 4k",
            "write -P 0x35 140k 20k",
            "write -P 0x36 200k 12k",
            "write -P 0x37 770k 6k",
            "write -z 840k 24k",
        ],
    );
}

/// [`mixed`] and another image to rebase onto, equal to the old chain in part.
pub(crate) fn mixed_and_other(s: &Scratch) {
    mixed(s);
    s.create("other.qcow2", "cluster_size=64k", MIB);
    io(
        s,
        "other.qcow2",
        "qcow2",
        &[
            "write -P 0xd1 0 128k",
            "write -P 0x11 128k 128k",
            "write -z 600k 64k",
        ],
    );
}

/// A raw base under mid (4 KiB clusters) and top (64 KiB).
pub(crate) fn raw_base(s: &Scratch) {
    s.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    io(
        s,
        "base.raw",
        "raw",
        &["write -P 0x51 0 384k", "write -P 0x52 640k 128k"],
    );
    s.create_overlay("mid.qcow2", "base.raw", "raw", "cluster_size=4k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x61 16k 40k",
            "write -z 320k 32k",
            "write -P 0x62 700k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=64k", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x71 64k 64k",
            "write -z 640k 64k",
            "write -P 0x72 1000k 8k",
        ],
    );
}

/// base (32 KiB clusters, extended L2: 1 KiB subclusters) <- top (64 KiB, extended L2).
pub(crate) fn extended_l2(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=32k,extended_l2=on", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x81 0 200k",
            "write -P 0x82 300k 1k",
            "write -z 96k 3k",
        ],
    );
    s.create_overlay(
        "top.qcow2",
        "base.qcow2",
        "qcow2",
        "cluster_size=64k,extended_l2=on",
        None,
    );
    io(
        s,
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x91 2k 2k",
            "write -P 0x92 70k 6k",
            "write -z 128k 8k",
            "write -P 0x93 520k 64k",
            "discard 530k 4k",
        ],
    );
}

/// base (4 KiB clusters) with an internal snapshot and writes after it (so some clusters
/// are shared with the snapshot) <- mid (64 KiB) <- top (512 bytes).
pub(crate) fn snapshot_base(s: &Scratch) {
    s.create("base.qcow2", "cluster_size=4k", MIB);
    io(
        s,
        "base.qcow2",
        "qcow2",
        &["write -P 0xa1 0 256k", "write -P 0xa2 512k 64k"],
    );
    s.qemu_img(&["snapshot", "-c", "snap", "base.qcow2"]);
    io(s, "base.qcow2", "qcow2", &["write -P 0xa3 128k 16k"]);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "cluster_size=64k", None);
    io(
        s,
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0xb1 64k 128k",
            "write -z 512k 16k",
            "write -P 0xb2 900k 8k",
        ],
    );
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "cluster_size=512", None);
    io(
        s,
        "top.qcow2",
        "qcow2",
        &["write -P 0xc1 0 1k", "write -P 0xc2 200k 4k"],
    );
}
