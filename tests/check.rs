//! `check` and its repair against `qemu-img check`: clean images of every layout agree on
//! the counters, images damaged in known ways get the same class of finding and exit code,
//! and after our repair qemu-img finds them clean.

mod common;

use common::{HeaderField, Scratch, read_header_field, write_header_field};
use qcow2_engine::{CheckReport, Image, RepairMode};
use serde_json::Value;

/// `qemu-img check --output=json NAME`: exit code and report.
fn qemu_check(s: &Scratch, name: &str) -> (i32, Value) {
    let out = s.output("qemu-img", &["check", "--output=json", name]);
    let code = out.status.code().expect("qemu-img check exited");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (code, json)
}

fn counter(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn our_check(s: &Scratch, name: &str) -> CheckReport {
    Image::open(s.path(name))
        .and_then(|i| i.check())
        .unwrap_or_else(|e| panic!("checking {name}: {e}"))
}

fn our_repair(s: &Scratch, name: &str, mode: RepairMode) -> CheckReport {
    Image::open_for_repair(s.path(name))
        .and_then(|i| i.repair(mode))
        .unwrap_or_else(|e| panic!("repairing {name}: {e}"))
}

fn file_bytes(s: &Scratch, name: &str) -> Vec<u8> {
    std::fs::read(s.path(name)).unwrap()
}

/// The geometry counters qemu-img prints for a clean image.
fn assert_counters_agree(ours: &CheckReport, qemu: &Value, label: &str) {
    for (key, value) in [
        ("image-end-offset", ours.image_end_offset),
        ("total-clusters", ours.total_clusters),
        ("allocated-clusters", ours.allocated_clusters),
        ("fragmented-clusters", ours.fragmented_clusters),
        ("compressed-clusters", ours.compressed_clusters),
    ] {
        assert_eq!(value, counter(qemu, key), "{label}: {key}");
    }
}

#[test]
fn clean_images_of_every_layout_agree_with_qemu() {
    let s = Scratch::new();
    let cases = [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=4096,refcount_bits=4",
        "cluster_size=65536",
        "cluster_size=2M,refcount_bits=64",
        "compat=0.10",
        "extended_l2=on,cluster_size=64k",
        "compression_type=zstd,refcount_bits=8",
        "lazy_refcounts=on",
    ];
    for (i, options) in cases.iter().enumerate() {
        let name = format!("clean{i}.qcow2");
        s.create(&name, options, 8 << 20);
        let zero = if options.contains("0.10") {
            "write -P 0 3M 64k"
        } else {
            "write -z 3M 64k"
        };
        let commands: Vec<String> = [
            "write -P 1 0 192k",
            // Compressed clusters packed into one host cluster need wide refcounts;
            // compressed writes cover whole clusters.
            if options.contains("refcount_bits=4") || options.contains("2M") {
                "write -P 2 1M 128k"
            } else {
                "write -c -P 2 1M 128k"
            },
            "write -P 3 5M 4k",
            zero,
            "discard 64k 64k",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        s.qemu_io(&name, "qcow2", &commands);
        // One-bit refcounts cannot count a snapshot's second reference.
        if !options.contains("refcount_bits=1") {
            s.qemu_img(&["snapshot", "-c", "one", &name]);
        }
        s.qemu_io(&name, "qcow2", &["write -P 4 0 8k".to_string()]);
        let (code, qemu) = qemu_check(&s, &name);
        assert_eq!(code, 0, "{options}: qemu-img check finds {qemu}");
        let ours = our_check(&s, &name);
        assert!(ours.is_clean(), "{options}: {:?}", ours.findings);
        assert_counters_agree(&ours, &qemu, options);
    }
    // An overlay: references stay inside its own file.
    s.create_overlay("top.qcow2", "clean2.qcow2", "qcow2", "", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 9 32k 64k".to_string()]);
    let ours = our_check(&s, "top.qcow2");
    assert!(ours.is_clean(), "overlay: {:?}", ours.findings);
    assert_counters_agree(&ours, &qemu_check(&s, "top.qcow2").1, "overlay");
}

/// An image with shared clusters (a snapshot) to damage: 64 KiB clusters, 4 MiB.
fn fixture(s: &Scratch, name: &str) {
    s.create(name, "cluster_size=65536", 4 << 20);
    s.qemu_io(name, "qcow2", &["write -P 1 0 256k".to_string()]);
    s.qemu_img(&["snapshot", "-c", "one", name]);
    s.qemu_io(
        name,
        "qcow2",
        &[
            "write -P 2 64k 64k".to_string(),
            "write -P 3 1M 64k".to_string(),
        ],
    );
}

/// Where the refcount of cluster `index` lives (16-bit refcounts, first block).
fn refcount_location(s: &Scratch, name: &str, index: u64) -> u64 {
    let table = read_header_field(&s.path(name), HeaderField::RefcountTableOffset);
    let block = s.read_u64(name, table);
    block + 2 * index
}

fn write_u16(s: &Scratch, name: &str, offset: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.path(name))
        .and_then(|f| f.write_all_at(&value.to_be_bytes(), offset))
        .unwrap();
}

struct Damage {
    name: &'static str,
    apply: fn(&Scratch, &str),
    /// Our repair leaves qemu-img check clean.
    repairable: bool,
    /// The guest content is unchanged by the damage (compare after repair).
    content_kept: bool,
}

const COPIED: u64 = 1 << 63;

fn damages() -> Vec<Damage> {
    vec![
        Damage {
            name: "leaked cluster",
            apply: |s, f| {
                let len = std::fs::metadata(s.path(f)).unwrap().len();
                s.truncate(f, len + 65536);
                let at = refcount_location(s, f, len / 65536);
                write_u16(s, f, at, 1);
            },
            repairable: true,
            content_kept: true,
        },
        Damage {
            name: "refcount too low on a shared cluster",
            apply: |s, f| {
                let entry = s.read_u64(f, s.l2_entry_location(f, 0).unwrap());
                let host = entry & 0x00ff_ffff_ffff_fe00;
                write_u16(s, f, refcount_location(s, f, host / 65536), 1);
            },
            repairable: true,
            content_kept: true,
        },
        Damage {
            name: "COPIED flag on a shared cluster",
            apply: |s, f| {
                let at = s.l2_entry_location(f, 128 << 10).unwrap();
                let entry = s.read_u64(f, at);
                s.write_u64(f, at, entry | COPIED);
            },
            repairable: true,
            content_kept: true,
        },
        Damage {
            name: "L2 entry pointing into the L1 table",
            apply: |s, f| {
                let l1 = read_header_field(&s.path(f), HeaderField::L1TableOffset);
                let at = s.l2_entry_location(f, 1 << 20).unwrap();
                s.write_u64(f, at, l1 | COPIED);
            },
            repairable: true,
            content_kept: false,
        },
        Damage {
            name: "refcount block missing",
            apply: |s, f| {
                let table = read_header_field(&s.path(f), HeaderField::RefcountTableOffset);
                s.write_u64(f, table, 0);
            },
            repairable: true,
            content_kept: true,
        },
        Damage {
            name: "refcount block unaligned",
            apply: |s, f| {
                let table = read_header_field(&s.path(f), HeaderField::RefcountTableOffset);
                let block = s.read_u64(f, table);
                s.write_u64(f, table, block + 512);
            },
            repairable: true,
            content_kept: true,
        },
        Damage {
            name: "data cluster past the end of the file",
            apply: |s, f| {
                let at = s.l2_entry_location(f, 1 << 20).unwrap();
                s.write_u64(f, at, (64 << 20) | COPIED);
            },
            // Beyond qemu-img, which leaves it: the entry becomes a zero cluster.
            repairable: true,
            content_kept: false,
        },
        Damage {
            name: "L2 table offset unaligned",
            apply: |s, f| {
                let l1 = read_header_field(&s.path(f), HeaderField::L1TableOffset);
                let entry = s.read_u64(f, l1);
                s.write_u64(f, l1, entry + 512);
            },
            repairable: false,
            content_kept: false,
        },
    ]
}

#[test]
fn damaged_images_get_qemus_class_of_finding_and_our_repair_satisfies_qemu() {
    let s = Scratch::new();
    fixture(&s, "pristine.qcow2");
    for damage in damages() {
        let label = damage.name;
        s.copy("pristine.qcow2", "damaged.qcow2");
        (damage.apply)(&s, "damaged.qcow2");
        let (qemu_code, qemu) = qemu_check(&s, "damaged.qcow2");
        let before = file_bytes(&s, "damaged.qcow2");
        let ours = our_check(&s, "damaged.qcow2");
        assert_eq!(
            before,
            file_bytes(&s, "damaged.qcow2"),
            "{label}: check changed the file"
        );
        assert_eq!(
            ours.exit_code(),
            qemu_code,
            "{label}: ours {:?} / qemu {qemu}",
            ours.findings
        );
        assert_eq!(
            ours.corruptions > 0,
            counter(&qemu, "corruptions") > 0,
            "{label}"
        );
        assert_eq!(ours.leaks > 0, counter(&qemu, "leaks") > 0, "{label}");

        let repaired = our_repair(&s, "damaged.qcow2", RepairMode::All);
        let (after_code, after) = qemu_check(&s, "damaged.qcow2");
        if damage.repairable {
            assert!(repaired.is_clean(), "{label}: {:?}", repaired.findings);
            assert!(
                repaired.corruptions_fixed + repaired.leaks_fixed > 0,
                "{label}: nothing counted as fixed"
            );
            assert_eq!(
                after_code, 0,
                "{label}: qemu-img check after repair: {after}"
            );
            if damage.content_kept {
                s.assert_same_content("pristine.qcow2", "damaged.qcow2", label);
                // The snapshot still reads what it did.
                s.copy("pristine.qcow2", "p1.qcow2");
                s.copy("damaged.qcow2", "d1.qcow2");
                s.qemu_img(&["snapshot", "-a", "one", "p1.qcow2"]);
                s.qemu_img(&["snapshot", "-a", "one", "d1.qcow2"]);
                s.assert_same_content("p1.qcow2", "d1.qcow2", label);
            }
        } else {
            assert_eq!(repaired.exit_code(), 2, "{label}: {:?}", repaired.findings);
            assert_eq!(after_code, 2, "{label}: {after}");
        }
    }
}

#[test]
fn repair_leaks_fixes_leaks_and_refuses_a_rebuild() {
    let s = Scratch::new();
    fixture(&s, "pristine.qcow2");
    let list = damages();
    s.copy("pristine.qcow2", "leak.qcow2");
    (list[0].apply)(&s, "leak.qcow2");
    let report = our_repair(&s, "leak.qcow2", RepairMode::Leaks);
    assert_eq!((report.leaks_fixed, report.leaks), (1, 0));
    assert_eq!(qemu_check(&s, "leak.qcow2").0, 0);

    // A missing refcount block needs a rebuild, which only -r all does (as qemu-img).
    s.copy("pristine.qcow2", "missing.qcow2");
    (list[4].apply)(&s, "missing.qcow2");
    let before = file_bytes(&s, "missing.qcow2");
    let report = our_repair(&s, "missing.qcow2", RepairMode::Leaks);
    assert_eq!(report.exit_code(), 1, "{:?}", report.findings);
    assert_eq!(before, file_bytes(&s, "missing.qcow2"));
}

#[test]
fn qimg_check_speaks_qemu_img_keys_and_exit_codes() {
    let s = Scratch::new();
    fixture(&s, "pristine.qcow2");
    let list = damages();
    for (damage, repair) in [(0usize, "leaks"), (2, "all"), (4, "all")] {
        s.copy("pristine.qcow2", "d.qcow2");
        (list[damage].apply)(&s, "d.qcow2");
        let (qemu_code, qemu) = qemu_check(&s, "d.qcow2");
        let out = s.qimg_output(&["check", "--output=json", "d.qcow2"]);
        let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(out.status.code(), Some(qemu_code), "{}", list[damage].name);
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&ours), keys(&qemu), "{}", list[damage].name);
        let out = s.qimg_output(&["check", "-r", repair, "--output=json", "d.qcow2"]);
        assert_eq!(out.status.code(), Some(0), "{}", list[damage].name);
        let fixed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            counter(&fixed, "leaks-fixed") + counter(&fixed, "corruptions-fixed") > 0,
            "{fixed}"
        );
        assert_eq!(qemu_check(&s, "d.qcow2").0, 0);
    }
    // The human report is qemu-img's, line for line, for an image that allocates
    // nothing (no cluster line) and for one that does.
    s.create("empty.qcow2", "cluster_size=64k", 1 << 20);
    for name in ["empty.qcow2", "pristine.qcow2"] {
        let ours = s.qimg_output(&["check", name]);
        let theirs = s.output("qemu-img", &["check", name]);
        assert_eq!(ours.status.code(), Some(0), "{name}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{name}"
        );
    }
    // Raw images have no check, as qemu-img says with exit code 63.
    s.write_file("raw.img", &[0u8; 4096]);
    let out = s.qimg_output(&["check", "raw.img"]);
    assert_eq!(out.status.code(), Some(63));
    // A file that is not there: could not check.
    let out = s.qimg_output(&["check", "missing.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn repair_clears_the_dirty_and_corrupt_bits() {
    let s = Scratch::new();
    // qemu-io's abort leaves a lazy-refcounts image dirty with refcounts lagging.
    s.create("lazy.qcow2", "lazy_refcounts=on,cluster_size=4096", 1 << 20);
    s.qemu_io(
        "lazy.qcow2",
        "qcow2",
        &[
            "write -P 5 0 64k".to_string(),
            "write -P 6 512k 8k".to_string(),
        ],
    );
    s.copy("lazy.qcow2", "reference.qcow2");
    let out = s.output(
        "qemu-io",
        &["-c", "write -P 7 256k 16k", "-c", "abort", "lazy.qcow2"],
    );
    assert!(
        !out.status.success(),
        "qemu-io abort is expected to kill itself"
    );
    let flags = read_header_field(&s.path("lazy.qcow2"), HeaderField::IncompatibleFeatures);
    assert_ne!(flags & 1, 0, "the image is dirty");
    let (qemu_code, _) = qemu_check(&s, "lazy.qcow2");
    assert_eq!(our_check(&s, "lazy.qcow2").exit_code(), qemu_code);
    let report = our_repair(&s, "lazy.qcow2", RepairMode::All);
    assert!(report.is_clean(), "{:?}", report.findings);
    let flags = read_header_field(&s.path("lazy.qcow2"), HeaderField::IncompatibleFeatures);
    assert_eq!(flags & 1, 0, "the dirty bit is cleared");
    assert_eq!(qemu_check(&s, "lazy.qcow2").0, 0);

    // The corrupt bit on a consistent image: check reports it clean, repair clears it.
    fixture(&s, "marked.qcow2");
    let flags = read_header_field(&s.path("marked.qcow2"), HeaderField::IncompatibleFeatures);
    write_header_field(
        &s.path("marked.qcow2"),
        HeaderField::IncompatibleFeatures,
        flags | 2,
    );
    assert!(our_check(&s, "marked.qcow2").is_clean());
    assert!(our_repair(&s, "marked.qcow2", RepairMode::All).is_clean());
    let flags = read_header_field(&s.path("marked.qcow2"), HeaderField::IncompatibleFeatures);
    assert_eq!(flags & 2, 0, "the corrupt bit is cleared");
}

/// `qimg check [-r leaks|all] [--output=json]` against `qemu-img check` on twins of each
/// damaged image: the same exit code, stdout (parsed for JSON), stderr lines (the
/// "Leaked/ERROR ..." findings, then "Repairing ..."), and the same repaired file.
/// An image whose snapshot table lies past the end of the file: two snapshots taken,
/// then the file cut where the table starts (QEMU reads zeros there).
fn truncated_snapshot_table(s: &Scratch, name: &str, options: &str) {
    s.create(name, options, 4 << 20);
    s.qemu_io(name, "qcow2", &["write -P 1 0 256k".to_string()]);
    s.qemu_img(&["snapshot", "-c", "one", name]);
    s.qemu_img(&["snapshot", "-c", "two", name]);
    let table = read_header_field(&s.path(name), HeaderField::SnapshotsOffset);
    s.truncate(name, table);
}

#[test]
fn qimg_check_repair_prints_and_repairs_as_qemu_img() {
    let s = Scratch::new();
    fixture(&s, "pristine.qcow2");
    let list = damages();
    // A leak, a refcount too low on a shared cluster (its COPIED flag then looks wrong
    // too), a COPIED flag on a shared cluster.
    let mut cases: Vec<(&str, String)> = Vec::new();
    for damage in [0usize, 1, 2] {
        let name = format!("damage{damage}.qcow2");
        s.copy("pristine.qcow2", &name);
        (list[damage].apply)(&s, &name);
        cases.push((list[damage].name, name));
    }
    // The snapshot table cut off: version 3 entries read as zeros are incomplete (a
    // corruption -r all repairs by writing the table anew); version 2 ones are not.
    truncated_snapshot_table(&s, "cut3.qcow2", "cluster_size=65536");
    cases.push(("snapshot table past the end, v3", "cut3.qcow2".into()));
    truncated_snapshot_table(&s, "cut2.qcow2", "cluster_size=65536,compat=0.10");
    cases.push(("snapshot table past the end, v2", "cut2.qcow2".into()));
    for (label, damaged) in &cases {
        for repair in [None, Some("leaks"), Some("all")] {
            for json in [false, true] {
                let mut args = vec!["check"];
                if let Some(mode) = repair {
                    args.extend(["-r", mode]);
                }
                if json {
                    args.push("--output=json");
                }
                let what = format!("{label}: {args:?}");
                s.copy(damaged, "q.qcow2");
                s.copy(damaged, "o.qcow2");
                let theirs = s.output("qemu-img", &[&args[..], &["q.qcow2"]].concat());
                let ours = s.qimg_output(&[&args[..], &["o.qcow2"]].concat());
                assert_eq!(ours.status.code(), theirs.status.code(), "{what}");
                let stderr = |o: &std::process::Output| {
                    String::from_utf8_lossy(&o.stderr).replace("q.qcow2", "o.qcow2")
                };
                assert_eq!(stderr(&ours), stderr(&theirs), "{what}: stderr");
                if json {
                    let mut t: Value = serde_json::from_slice(&theirs.stdout).unwrap();
                    let o: Value = serde_json::from_slice(&ours.stdout).unwrap();
                    t["filename"] = o["filename"].clone();
                    assert_eq!(o, t, "{what}: JSON");
                } else {
                    assert_eq!(
                        String::from_utf8_lossy(&ours.stdout),
                        String::from_utf8_lossy(&theirs.stdout),
                        "{what}: stdout"
                    );
                }
                assert!(
                    file_bytes(&s, "o.qcow2") == file_bytes(&s, "q.qcow2"),
                    "{what}: the files differ after the check"
                );
            }
        }
    }
    // After -r all the version 3 image opens everywhere and lists what qemu-img lists.
    s.copy("cut3.qcow2", "o.qcow2");
    assert_eq!(
        s.qimg_output(&["check", "-r", "all", "o.qcow2"])
            .status
            .code(),
        Some(0)
    );
    let ours = s.qimg(&["snapshot", "-l", "o.qcow2"]);
    let theirs = s.qemu_img(&["snapshot", "-l", "o.qcow2"]);
    assert_eq!(ours, theirs);
}

/// Opened normally (not for a check), an image whose snapshot table lies wholly or partly
/// past the end of the file reads as QEMU reads it, zeros past the end: `info` (JSON and
/// text) and `snapshot -l` list the same entries as qemu-img (cut entries with the rest
/// of their fields zero, an empty ID and name), the guest data reads, and a write leaves
/// the twin of what qemu-io leaves (same content, same `qemu-img check` findings).
#[test]
fn a_snapshot_table_past_the_end_opens_as_qemu_opens_it() {
    let s = Scratch::new();
    for (options, version) in [("cluster_size=65536", 3), ("compat=0.10", 2)] {
        let whole = format!("whole{version}.qcow2");
        s.create(&whole, options, 4 << 20);
        s.qemu_io(&whole, "qcow2", &["write -P 1 0 256k".to_string()]);
        s.qemu_img(&["snapshot", "-c", "one", &whole]);
        s.qemu_img(&["snapshot", "-c", "two", &whole]);
        let table = read_header_field(&s.path(&whole), HeaderField::SnapshotsOffset);
        // Cut where the table starts, inside the first entry's fields, inside its ID,
        // and inside the second entry.
        for cut in [0u64, 20, 50, 80, 100] {
            let name = format!("cut{version}-{cut}.qcow2");
            s.copy(&whole, &name);
            s.truncate(&name, table + cut);
            let label = format!("v{version} cut at table + {cut}");
            let json = |out: String| -> Value { serde_json::from_str(&out).unwrap() };
            assert_eq!(
                json(s.qimg(&["info", "--output=json", &name])),
                json(s.qemu_img(&["info", "--output=json", &name])),
                "{label}: info JSON"
            );
            assert_eq!(
                s.qimg(&["info", &name]),
                s.qemu_img(&["info", &name]),
                "{label}: info"
            );
            assert_eq!(
                s.qimg(&["snapshot", "-l", &name]),
                s.qemu_img(&["snapshot", "-l", &name]),
                "{label}: snapshot -l"
            );
            let read = s.qimg(&["io", "-r", "-c", "read -P 1 0 256k", &name]);
            assert!(
                read.starts_with("read 262144/262144 bytes at offset 0"),
                "{label}: {read}"
            );
            let (q, m) = (format!("q-{name}"), format!("m-{name}"));
            s.copy(&name, &q);
            s.copy(&name, &m);
            s.run("qemu-io", &["-c", "write -P 7 256k 64k", &q]);
            s.qimg(&["io", "-c", "write -P 7 256k 64k", &m]);
            s.assert_same_content(&q, &m, &label);
            let check = |file: &str| {
                let out = s.output("qemu-img", &["check", file]);
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).to_string(),
                    String::from_utf8_lossy(&out.stderr).to_string(),
                )
            };
            assert_eq!(check(&m), check(&q), "{label}: check after a write");
        }
    }
}
