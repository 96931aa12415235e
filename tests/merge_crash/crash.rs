//! The crash at every write: a case's merge run uninterrupted, then cut after each of its
//! writes with each choice of unflushed writes kept, and every crashed image set checked
//! and re-run (what is checked: see the documentation in `main.rs`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use qcow2_engine::ops::{MergeOptions, MergeReport, StorageCopy};
use qcow2_engine::storage::Unflushed;

use crate::case::Case;
use crate::common::Scratch;
use crate::files::{
    fail, fingerprint, is_qcow2, leaks, our_view, pointer, read_all, snapshot_view, view, write_all,
};
use crate::machine::Machine;

/// Unflushed-write choices tried at each crash point (seeds vary with the point).
fn modes(k: u64) -> [Unflushed; 3] {
    [Unflushed::Lost, Unflushed::Kept, Unflushed::Seeded(k)]
}

/// The same choice for another disk (independent subsets per disk).
fn for_disk(mode: Unflushed, disk: usize) -> Unflushed {
    match mode {
        Unflushed::Seeded(s) => {
            Unflushed::Seeded(s.wrapping_mul(31).wrapping_add(disk as u64 * 1_000_003))
        }
        other => other,
    }
}

fn work(r: &MergeReport) -> u64 {
    r.data_bytes + r.zero_bytes + r.already_done_bytes
}

/// Runs `case` crashing after every write; see the docs in `main.rs` for what is checked.
pub(crate) fn crash_every_write(case: &Case) {
    crash_every_write_copying(case, StorageCopy::Never);
}

/// [`crash_every_write`] with data going to the destination as storage copies
/// (`storage_copy`): on these disks, the default copy through a buffer.
pub(crate) fn crash_every_write_copying(case: &Case, storage_copy: StorageCopy) {
    let s = Scratch::new();
    (case.build)(&s);
    let names = case.images;
    let n = names.len();
    // Originals live in orig/, untouched; the merges run there on in-memory disks.
    std::fs::create_dir_all(s.path("orig")).unwrap();
    for name in names {
        std::fs::rename(s.path(name), s.path(&format!("orig/{name}"))).unwrap();
    }
    let orig_dir = s.path("orig");
    let paths: Vec<PathBuf> = names
        .iter()
        .map(|n| std::fs::canonicalize(orig_dir.join(n)).unwrap())
        .collect();
    let originals = read_all(&s, "orig", names);
    let dest = names.iter().position(|n| *n == case.dest).unwrap();
    assert!(case.unchanged.contains(&case.active), "{}", case.name);
    let views_before: Vec<Option<Vec<u8>>> = (0..n)
        .map(|i| {
            case.unchanged
                .contains(&names[i])
                .then(|| view(&s, "orig", names[i]))
        })
        .collect();
    let pointers_before: Vec<Option<String>> =
        names.iter().map(|m| pointer(&orig_dir.join(m))).collect();
    let snapshot_before = case
        .snapshot
        .map(|snap| snapshot_view(&s, "orig", case.dest, snap));
    let snapshot_unchanged = |dir: &str, label: &str| {
        if let (Some(snap), Some(before)) = (case.snapshot, &snapshot_before) {
            if snapshot_view(&s, dir, case.dest, snap) != *before {
                fail(
                    &s,
                    label,
                    &format!("snapshot {snap} of {} changed", case.dest),
                );
            }
        }
    };
    let base_options = MergeOptions {
        checkpoint_bytes: 16 << 10,
        storage_copy,
        ..MergeOptions::default()
    };

    // The uninterrupted run, on the machine (it counts the writes) and then on files.
    let machine = Machine::new(&paths, &originals, None);
    let clean = case
        .op
        .run(&orig_dir, case.active, &machine.options(&base_options))
        .unwrap_or_else(|e| panic!("{}: uninterrupted run: {e}", case.name));
    let total = machine.writes();
    let finished: Vec<Vec<u8>> = machine.disks.iter().map(|(_, d)| d.live_bytes()).collect();
    write_all(&s, "clean", names, &finished);
    let mut pointers_after = Vec::new();
    let mut views_after = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if is_qcow2(&finished[i]) {
            assert_eq!(
                leaks(&s, "clean", name, case.name),
                0,
                "{}: {name} leaks after an uninterrupted run",
                case.name
            );
        }
        pointers_after.push(pointer(&s.path(&format!("clean/{name}"))));
        views_after.push(view(&s, "clean", name));
    }
    for i in 0..n {
        if let Some(before) = &views_before[i] {
            assert!(
                views_after[i] == *before,
                "{}: the uninterrupted merge changed what {} shows",
                case.name,
                names[i]
            );
        }
    }
    snapshot_unchanged("clean", case.name);
    // The same merge on files gives the same images.
    write_all(&s, "files", names, &originals);
    let on_files = case
        .op
        .run(&s.path("files"), case.active, &base_options)
        .unwrap();
    assert_eq!(on_files, clean, "{}: report on files", case.name);
    for (i, name) in names.iter().enumerate() {
        assert!(
            read_all(&s, "files", &[name])[0] == finished[i],
            "{}: {name} differs between the run on files and on the machine",
            case.name
        );
    }

    let mut seen = HashSet::new();
    let mut checked: HashMap<(usize, u64), u64> = HashMap::new();
    let mut finals = HashSet::new();
    let (mut crash_points, mut states, mut resumed) = (0u64, 0u64, 0u64);
    for k in 1..=total {
        let machine = Machine::new(&paths, &originals, Some(k));
        let result = case
            .op
            .run(&orig_dir, case.active, &machine.options(&base_options));
        assert!(
            machine.crashed(),
            "{}: no crash at write {k} of {total}",
            case.name
        );
        assert!(
            result.is_err(),
            "{}: the merge succeeded despite a crash at write {k}",
            case.name
        );
        crash_points += 1;
        for mode in modes(k) {
            let crashed: Vec<Vec<u8>> = machine
                .disks
                .iter()
                .enumerate()
                .map(|(i, (_, d))| d.crash_image(for_disk(mode, i)))
                .collect();
            if !seen.insert(fingerprint(&crashed)) {
                continue;
            }
            states += 1;
            let label = format!(
                "{}: crash after write {k} of {total}, unflushed {mode:?}",
                case.name
            );
            write_all(&s, "crash", names, &crashed);
            // No corruption; remember the leaks. A crash can leave refcounts raised for
            // clusters past the end of the file (raised refcounts are durable before the
            // clusters are written), which qemu-img check does not count until a rerun
            // grows the file; so the leaks are counted on a copy padded to cover every
            // cluster the interrupted run could have allocated: it is a prefix of the
            // uninterrupted run, so no further than that run's file, or the live one.
            let mut leaked = vec![0u64; n];
            for i in 0..n {
                if crashed[i] == originals[i] || !is_qcow2(&crashed[i]) {
                    continue;
                }
                let reach = machine.disks[i].1.live_bytes().len().max(finished[i].len());
                leaked[i] = *checked
                    .entry((i, fingerprint(&crashed[i])))
                    .or_insert_with(|| {
                        leaks(&s, "crash", names[i], &label);
                        let mut padded = crashed[i].clone();
                        padded.resize(padded.len().max(reach), 0);
                        // Beside the others, so that its backing file opens.
                        let name = format!("padded-{}", names[i]);
                        write_all(&s, "crash", &[&name], &[padded]);
                        let found = leaks(&s, "crash", &name, &label);
                        std::fs::remove_file(s.path(&format!("crash/{name}"))).unwrap();
                        found
                    });
            }
            // Old or new backing pointers, and the content they expose unchanged (the
            // active image's as qemu-img reads it, the others' as the library does).
            let crash_pointers: Vec<Option<String>> = names
                .iter()
                .map(|m| pointer(&s.path(&format!("crash/{m}"))))
                .collect();
            for i in 0..n {
                let p = &crash_pointers[i];
                assert!(
                    *p == pointers_before[i] || *p == pointers_after[i],
                    "{label}: {} points at {p:?}, neither {:?} nor {:?}",
                    names[i],
                    pointers_before[i],
                    pointers_after[i]
                );
                if let Some(before) = &views_before[i] {
                    let now = if names[i] == case.active {
                        view(&s, "crash", names[i])
                    } else {
                        our_view(&s, "crash", names[i])
                    };
                    assert!(
                        now == *before,
                        "{label}: {} no longer shows what it showed",
                        names[i]
                    );
                }
            }
            snapshot_unchanged("crash", &label);
            // Running the same merge again completes it.
            let complete = crash_pointers == pointers_after;
            if complete && case.op.refuses_rerun_when_complete() {
                // Re-pointed already: the merge is done; these files are its result.
            } else {
                write_all(&s, "before", names, &crashed);
                let rerun = case
                    .op
                    .run(&s.path("crash"), case.active, &base_options)
                    .unwrap_or_else(|e| panic!("{label}: rerun: {e}"));
                // Until the final step (re-pointing, emptying) began, the rerun has the
                // whole work before it, done or not.
                let only_dest_written = (0..n).all(|i| i == dest || crashed[i] == originals[i])
                    && crash_pointers == pointers_before;
                let counted = if only_dest_written {
                    work(&rerun) == work(&clean)
                } else {
                    work(&rerun) <= work(&clean)
                };
                if !counted {
                    fail(
                        &s,
                        &label,
                        &format!("rerun {rerun:?}, uninterrupted {clean:?}"),
                    );
                }
                if rerun.already_done_bytes > clean.already_done_bytes {
                    resumed += 1;
                }
            }
            // What the rerun left (sets seen before were checked then, but the leaks).
            let result = read_all(&s, "crash", names);
            let first_time = finals.insert(fingerprint(&result));
            for i in 0..n {
                let name = names[i];
                if is_qcow2(&result[i]) && result[i] != originals[i] {
                    let after = *checked
                        .entry((i, fingerprint(&result[i])))
                        .or_insert_with(|| leaks(&s, "crash", name, &format!("{label}, rerun")));
                    if after > leaked[i] {
                        let before = leaked[i];
                        fail(
                            &s,
                            &label,
                            &format!(
                                "{name} leaks {after} clusters after the rerun, {before} before"
                            ),
                        );
                    }
                }
                if !first_time {
                    continue;
                }
                assert_eq!(
                    pointer(&s.path(&format!("crash/{name}"))),
                    pointers_after[i],
                    "{label}: {name} after the rerun"
                );
                let now = if name == case.active {
                    view(&s, "crash", name)
                } else {
                    our_view(&s, "crash", name)
                };
                assert!(
                    now == views_after[i],
                    "{label}: {name} after the rerun does not show what an uninterrupted merge leaves"
                );
            }
            if first_time {
                snapshot_unchanged("crash", &format!("{label}, rerun"));
            }
        }
    }
    eprintln!(
        "{}: {total} writes; {crash_points} crash points, {states} distinct crashed sets of {n} images \
         checked and re-run ({resumed} reruns found more already done than a fresh run: {clean:?})",
        case.name
    );
}
