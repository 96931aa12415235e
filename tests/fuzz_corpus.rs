//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`: seeds made by
//! `fuzz/make-corpus.sh` and regression inputs from crashes) through the same harness the
//! fuzz target runs, so a fixed crash stays fixed without nightly Rust or libFuzzer. Only
//! the committed `seed-*` and `regression-*` files are replayed, not what a local fuzzing
//! run added.
//!
//! Needs the `testing` feature: `cargo test --features testing --test fuzz_corpus`
//! (also run by `cargo test --all-features`).

use std::path::Path;

use qcow2_engine::testing::TARGETS;

#[test]
fn every_fuzz_corpus_input_runs_without_panicking() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, harness) in TARGETS {
        let dir = corpus.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            // Only the committed inputs: what libFuzzer adds locally is not ours to replay
            // (and changes under a running fuzzer).
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("seed-") || name.starts_with("regression-")
            })
            .collect();
        inputs.sort();
        assert!(
            !inputs.is_empty(),
            "no corpus for {target} in {}",
            dir.display()
        );
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            eprintln!("{target}: {}", input.display());
            harness(&data);
        }
    }
}

/// The seeds must reach past the header checks, or fuzzing starts from nothing.
#[test]
fn seed_images_open() {
    use qcow2_engine::storage::MemStorage;
    use qcow2_engine::{Image, ImageOptions};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_and_read");
    let mut opened = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // The external data file seed is meant to fail: its data file is not given.
        if !name.starts_with("seed-") || name.contains("datafile") {
            continue;
        }
        let storage = Box::new(MemStorage::from_bytes(std::fs::read(&path).unwrap()));
        let image = Image::from_storage(storage, &name, &ImageOptions::default(), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut buf = vec![0u8; image.size() as usize];
        image.read_at(&mut buf, 0).unwrap();
        opened += 1;
    }
    assert!(opened >= 5, "only {opened} seed images opened");
}

/// The `bitmaps` seeds must get past the harness's memory bound and open for writing with
/// their bitmaps, or the operations are never fuzzed.
#[test]
fn bitmap_seeds_open_with_their_bitmaps() {
    use qcow2_engine::storage::MemStorage;
    use qcow2_engine::testing::BITMAP_MEMORY_LIMIT;
    use qcow2_engine::{Image, ImageOptions};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/bitmaps");
    let mut opened = 0;
    let mut in_use = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("seed-") || !name.ends_with(".qcow2") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let options = ImageOptions {
            writable: true,
            ..ImageOptions::default()
        };
        let storage = Box::new(MemStorage::from_bytes(bytes));
        let image = Image::from_storage(storage, &name, &options, None)
            .unwrap_or_else(|e| panic!("{name}: {}", e.report()));
        let bitmaps = image.bitmaps().unwrap();
        assert!(!bitmaps.is_empty(), "{name} has no bitmaps");
        in_use += bitmaps.iter().filter(|b| b.in_use).count();
        let bound = (bitmaps.len() as u64 + 2) * image.size().div_ceil(4096);
        assert!(
            bound <= BITMAP_MEMORY_LIMIT,
            "{name}: {bound} bytes of bitmaps"
        );
        opened += 1;
    }
    assert!(
        opened >= 4 && in_use >= 1,
        "{opened} bitmap seeds, {in_use} bitmaps in use"
    );
}

/// The `ops` harness (operation sequences on a chain in memory, against a model) over
/// pseudo-random programs from a fixed seed, so that tests exercise it without libFuzzer:
/// 4000 programs in an optimized build, 800 on the smallest virtual size in a debug build
/// (where the library is some twenty times slower), about 20 s either way. `OPS_CASES`
/// overrides the number, `OPS_SEED` the seed and `OPS_MAX_LEN` the longest program (86
/// bytes: some ten operations), to explore further. A failing program is printed in hex,
/// to be replayed (and saved as `fuzz/corpus/ops/regression-<what>` once fixed).
#[test]
fn ops_harness_runs_pseudo_random_programs() {
    let debug = cfg!(debug_assertions);
    let cases: u64 = std::env::var("OPS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if debug { 800 } else { 4000 });
    // xorshift64*: fixed seed, the same programs on every run.
    let mut state = std::env::var("OPS_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0x0123_4567_89ab_cdef, |s| s | 1);
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let max_len: u64 = std::env::var("OPS_MAX_LEN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(86);
    for case in 0..cases {
        let len = 6 + next() % max_len.saturating_sub(6).max(1);
        let mut data: Vec<u8> = (0..len).map(|_| (next() >> 56) as u8).collect();
        if debug {
            data[0] &= !0x0c; // size 0: 256 KiB + 1536
        }
        if let Err(panic) = std::panic::catch_unwind(|| qcow2_engine::testing::ops(&data)) {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("ops program {case} failed: {hex}");
            std::panic::resume_unwind(panic);
        }
    }
}

/// The `probe` harness over the probe seeds damaged at random (a fixed seed): bytes of the
/// first sector flipped, set to the values the rules compare with (`\n`, `#`, space,
/// NUL) and files cut short, so that every rule sees near misses, without libFuzzer.
#[test]
fn probe_harness_runs_damaged_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/probe");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 12, "probe seeds: {seeds:?}");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for seed in &seeds {
        let original = std::fs::read(seed).unwrap();
        for _ in 0..500 {
            let mut data = original.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % 600) as usize;
                if at < data.len() {
                    let special = [b'\n', b'#', b' ', 0, b'\r'];
                    data[at] = match next() % 3 {
                        0 => special[(next() % 5) as usize],
                        1 => data[at] ^ (1 << (next() % 8)),
                        _ => next() as u8,
                    };
                }
            }
            if next() % 4 == 0 {
                data.truncate((next() % 600) as usize);
            }
            qcow2_engine::testing::probe(&data);
        }
    }
}

/// The hand-made seeds of the `ops` target (`fuzz/corpus/ops/seed-*`): each operation,
/// refused ones included, on the image kinds that make a difference.
fn ops_seeds() -> Vec<(&'static str, qcow2_engine::testing::OpsProgram)> {
    use qcow2_engine::testing::{ChainOp as Op, LayerConfig, OpsConfig, OpsProgram, RawRange};

    let layer =
        |cluster_size: u64, v2: bool, extended_l2: bool, lazy: bool, bits: u32| LayerConfig {
            cluster_size,
            v2,
            extended_l2,
            lazy_refcounts: lazy,
            refcount_bits: bits,
        };
    let plain = layer(65536, false, false, false, 16);
    let small = layer(4096, false, false, false, 16);
    let config = |depth: usize, layers: [LayerConfig; 3]| OpsConfig {
        depth,
        size_index: 1,
        short_bottom: false,
        small_cache: false,
        small_checkpoints: false,
        zstd: false,
        layers,
        fills: [0x55, 0xaa],
    };
    // Flags: 1 = 512-aligned, 2 = cluster-aligned, 8 = unmap, 0x10 = to the end.
    let range = |flags: u8, offset: u32, len: u32| RawRange { flags, offset, len };
    let write = |flags, offset, len, pattern| Op::Write {
        range: range(flags, offset, len),
        pattern,
    };
    let program = |config, ops| OpsProgram { config, ops };
    vec![
        (
            "seed-write-flush-reopen",
            program(
                config(1, [plain; 3]),
                vec![
                    write(0, 1000, 70_000, 0x41),
                    write(2, 131_072, 65_535, 0x42),
                    Op::Flush,
                    write(0, 65_000, 1000, 0),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-zeroes-discard",
            program(
                config(2, [small, plain, plain]),
                vec![
                    Op::WriteZeroes(range(8 | 1, 4096, 20_000)),
                    Op::WriteZeroes(range(0, 70_001, 9_000)),
                    Op::Discard(range(2, 196_608, 131_071)),
                    Op::Discard(range(0x10, 500_000, 0)),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-v2-over-a-backing-file",
            program(
                config(2, [small, layer(4096, true, false, false, 16), plain]),
                vec![
                    write(0, 3000, 10_000, 0x43),
                    Op::WriteZeroes(range(8 | 2, 0, 16_384)),
                    Op::Discard(range(2, 32_768, 65_536)),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-compressed-extended-l2",
            program(
                OpsConfig {
                    zstd: true,
                    ..config(1, [layer(16384, false, true, false, 16); 3])
                },
                vec![
                    Op::WriteCompressed {
                        offset: 40_000,
                        pattern: 0x44,
                    },
                    Op::WriteCompressed {
                        offset: 60_000,
                        pattern: 0x45,
                    },
                    Op::WriteZeroes(range(1, 34_000, 4096)),
                    write(0, 50_000, 100, 0x46),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-snapshots",
            program(
                config(1, [small; 3]),
                vec![
                    write(0, 0, 50_000, 0x47),
                    Op::SnapshotCreate,
                    write(0, 20_000, 50_000, 0x48),
                    Op::SnapshotCreate,
                    Op::SnapshotApply(0),
                    write(2, 100_000, 4096, 0x49),
                    Op::SnapshotDelete(1),
                    Op::SnapshotApply(0),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-snapshots-1-bit-refcounts",
            program(
                config(1, [layer(4096, false, false, true, 1); 3]),
                vec![
                    Op::SnapshotCreate,
                    write(0, 5000, 20_000, 0x4a),
                    Op::SnapshotCreate,
                    Op::SnapshotApply(0),
                    write(0, 9000, 100, 0x4b),
                    Op::SnapshotDelete(0),
                ],
            ),
        ),
        (
            "seed-commit",
            program(
                config(2, [plain, small, plain]),
                vec![
                    write(0, 10_000, 100_000, 0x4c),
                    Op::Commit(0),
                    write(0, 300_000, 5000, 0x4d),
                    Op::Commit(1),
                ],
            ),
        ),
        (
            "seed-commit-base-and-middle",
            program(
                config(3, [plain, small, layer(512, false, false, false, 16)]),
                vec![
                    write(0, 1000, 3000, 0x4e),
                    Op::Commit(2 | 2 << 2),
                    write(0, 2000, 3000, 0x4f),
                    Op::Commit(3 | 1 << 2),
                ],
            ),
        ),
        (
            "seed-pull",
            program(
                config(3, [small, plain, small]),
                vec![
                    write(0, 40_000, 30_000, 0x50),
                    Op::Pull(1),
                    write(0, 0, 1000, 0x51),
                    Op::Pull(2),
                ],
            ),
        ),
        (
            "seed-overlays",
            program(
                config(1, [plain; 3]),
                vec![
                    write(0, 0, 200_000, 0x52),
                    Op::Overlay(layer(4096, true, false, false, 16)),
                    write(0, 100_000, 200_000, 0x53),
                    Op::Overlay(layer(16384, false, true, true, 4)),
                    Op::SnapshotCreate,
                    write(1, 150_000, 8192, 0x54),
                    Op::Commit(0),
                    Op::SnapshotApply(0),
                    Op::Pull(3),
                ],
            ),
        ),
        (
            "seed-lazy-small-clusters",
            program(
                OpsConfig {
                    small_cache: true,
                    small_checkpoints: true,
                    short_bottom: true,
                    ..config(2, [layer(512, false, false, true, 2); 3])
                },
                vec![
                    write(0, 0, 300_000, 0x55),
                    Op::Flush,
                    Op::WriteZeroes(range(8, 1000, 200_000)),
                    Op::Commit(1),
                    Op::Reopen,
                ],
            ),
        ),
        (
            "seed-resize",
            program(
                OpsConfig {
                    short_bottom: true,
                    ..config(3, [small, layer(512, false, false, false, 16), plain])
                },
                vec![
                    write(0, 500_000, 20_000, 0x57),
                    Op::Resize(7),
                    Op::Resize(255),
                    write(0, 1_900_000, 10_000, 0x58),
                    Op::SnapshotCreate,
                    Op::Resize(20),
                    Op::SnapshotApply(0),
                    Op::Commit(3 | 1 << 2),
                    Op::Commit(0),
                ],
            ),
        ),
        (
            "seed-rebase",
            program(
                config(3, [small, layer(4096, true, false, false, 16), plain]),
                vec![
                    write(0, 100_000, 50_000, 0x59),
                    Op::Rebase(2 << 2),
                    Op::Rebase(0x80 | 1),
                    Op::Pull(1),
                    Op::Rebase(2),
                    Op::Rebase(3),
                    Op::Rebase(0),
                    Op::Rebase(1),
                ],
            ),
        ),
        (
            "seed-dry-runs-and-refusals",
            program(
                config(1, [plain; 3]),
                vec![
                    write(0, 0, 1000, 0x56),
                    Op::Commit(0),
                    Op::Pull(0),
                    Op::Overlay(small),
                    Op::Commit(0x80),
                    Op::Pull(0x80 | 2),
                    Op::Commit(2),
                ],
            ),
        ),
    ]
}

/// The committed `ops` seeds are what [`ops_seeds`] makes. To change them, edit
/// `ops_seeds` and run `cargo test --features testing --test fuzz_corpus -- --ignored
/// write_ops_seeds`.
#[test]
fn ops_seeds_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ops");
    for (name, program) in ops_seeds() {
        let committed = std::fs::read(dir.join(name)).unwrap_or_default();
        assert!(
            committed == program.encode(),
            "fuzz/corpus/ops/{name} is stale: run the ignored test write_ops_seeds"
        );
        assert_eq!(
            qcow2_engine::testing::OpsProgram::decode(&committed),
            program,
            "{name} does not decode to its program"
        );
    }
}

/// Writes `fuzz/corpus/ops/seed-*` from [`ops_seeds`] (replacing the old seeds).
#[test]
#[ignore = "writes the ops seeds into fuzz/corpus/ops"]
fn write_ops_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ops");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("seed-")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    for (name, program) in ops_seeds() {
        std::fs::write(dir.join(name), program.encode()).unwrap();
    }
}

/// The nbd target's seeds are the conversations `nbd_seeds` builds with the codec (what
/// qemu-img, qemu-io and nbdinfo send); `WRITE_NBD_SEEDS=1` rewrites them.
#[test]
fn nbd_seeds_are_committed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd");
    for (name, bytes) in qcow2_engine::testing::nbd_seeds() {
        let path = dir.join(name);
        if std::env::var_os("WRITE_NBD_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok().as_deref(),
            Some(&bytes[..]),
            "{} is stale: WRITE_NBD_SEEDS=1 cargo test --features testing --test fuzz_corpus",
            path.display()
        );
    }
}
