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
