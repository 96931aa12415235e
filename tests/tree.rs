//! Trees of images: `qimg tree` and `ops::Forest` find who uses whom as backing file
//! from headers alone, whatever a hostile directory holds; commit refuses to change a base
//! that an image outside the chain uses, unless forced.

mod common;

use common::holder::Holder;
use common::{Scratch, assert_one_line_failure};
use qcow2_engine::ops::{self, CommitOptions, Forest, TreeOptions};
use qcow2_engine::{Error, Locking};

/// base <- mid <- top (snapshot s1 in top), base <- other, and a lone raw disk.
fn tree(s: &Scratch) {
    s.create("base.qcow2", "", 1 << 20);
    s.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 256k".into()]);
    s.create_overlay("mid.qcow2", "base.qcow2", "qcow2", "", None);
    s.qemu_io("mid.qcow2", "qcow2", &["write -P 2 64k 64k".into()]);
    s.create_overlay("top.qcow2", "mid.qcow2", "qcow2", "", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 3 128k 64k".into()]);
    s.qemu_img(&["snapshot", "-c", "s1", "top.qcow2"]);
    s.create_overlay("other.qcow2", "base.qcow2", "qcow2", "", None);
    s.write_file("disk.raw", &[0u8; 4096]);
}

fn name(forest: &Forest, index: usize) -> String {
    let path = &forest.images()[index].path;
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn names(forest: &Forest, indexes: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut out: Vec<String> = indexes.into_iter().map(|i| name(forest, i)).collect();
    out.sort();
    out
}

#[test]
fn the_forest_has_each_image_under_its_backing_file_with_its_snapshots() {
    let s = Scratch::new();
    tree(&s);
    let forest = Forest::scan(&[s.dir()], &TreeOptions::default()).unwrap();
    assert!(forest.skipped().is_empty(), "{:?}", forest.skipped());
    assert_eq!(names(&forest, forest.roots()), ["base.qcow2", "disk.raw"]);
    let base = forest.find(s.path("base.qcow2")).unwrap();
    let mid = forest.find(s.path("mid.qcow2")).unwrap();
    let top = forest.find(s.path("top.qcow2")).unwrap();
    assert_eq!(
        names(&forest, forest.children(base).iter().copied()),
        ["mid.qcow2", "other.qcow2"]
    );
    assert_eq!(
        names(&forest, forest.dependents(base)),
        ["mid.qcow2", "other.qcow2", "top.qcow2"]
    );
    assert_eq!(names(&forest, forest.dependents(mid)), ["top.qcow2"]);
    assert_eq!(forest.images()[top].snapshots, ["s1"]);
    assert_eq!(
        forest.images()[top].backing_name.as_deref(),
        Some("mid.qcow2")
    );
    assert_eq!(forest.chain_of(top).collect::<Vec<_>>(), [top, mid, base]);

    // qimg tree: the same forest, sizes as qemu-img info reports them.
    let json: serde_json::Value =
        serde_json::from_str(&s.qimg(&["tree", "--output=json", "."])).unwrap();
    let roots = json.as_array().unwrap();
    assert_eq!(roots.len(), 2);
    let base_json = &roots[0];
    assert_eq!(base_json["filename"], "./base.qcow2");
    assert_eq!(base_json["format"], "qcow2");
    let info: serde_json::Value =
        serde_json::from_str(&s.qemu_img(&["info", "--output=json", "base.qcow2"])).unwrap();
    assert_eq!(base_json["virtual-size"], info["virtual-size"]);
    assert_eq!(base_json["actual-size"], info["actual-size"]);
    let children = base_json["children"].as_array().unwrap();
    assert_eq!(children[0]["filename"], "./mid.qcow2");
    assert_eq!(children[1]["filename"], "./other.qcow2");
    let top_json = &children[0]["children"][0];
    assert_eq!(top_json["filename"], "./top.qcow2");
    assert_eq!(top_json["snapshots"], serde_json::json!(["s1"]));
    assert_eq!(top_json["children"], serde_json::json!([]));
    assert_eq!(roots[1]["format"], "raw");

    let human = s.qimg(&["tree", "."]);
    let lines: Vec<&str> = human.lines().collect();
    assert!(
        lines[0].starts_with("./base.qcow2 (qcow2, 1.00 MiB"),
        "{human}"
    );
    assert!(lines[1].starts_with("├── ./mid.qcow2"), "{human}");
    assert!(lines[2].starts_with("│   └── ./top.qcow2"), "{human}");
    assert_eq!(
        lines[3].trim(),
        "│           snapshot: s1".trim(),
        "{human}"
    );
    assert!(lines[4].starts_with("└── ./other.qcow2"), "{human}");
    assert!(lines[5].starts_with("./disk.raw (raw"), "{human}");
}

#[test]
fn backing_files_outside_the_directories_are_followed() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("vms")).unwrap();
    s.create("base.qcow2", "", 1 << 20);
    let base = s.path("base.qcow2").display().to_string();
    s.create_overlay("vms/a.qcow2", &base, "qcow2", "", None);
    s.create_overlay("vms/b.qcow2", "a.qcow2", "qcow2", "", None);
    let forest = Forest::scan(&[s.path("vms")], &TreeOptions::default()).unwrap();
    assert_eq!(names(&forest, forest.roots()), ["base.qcow2"]);
    let base = forest.find(s.path("base.qcow2")).unwrap();
    assert_eq!(
        names(&forest, forest.dependents(base)),
        ["a.qcow2", "b.qcow2"]
    );
}

#[test]
fn hostile_directories_are_read_within_bounds_and_skipped_files_are_named() {
    let s = Scratch::new();
    // A loop: a -> b -> a, made with unchecked backing names.
    s.create("a.qcow2", "", 1 << 20);
    s.create("b.qcow2", "", 1 << 20);
    s.qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", "a.qcow2"]);
    s.qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "a.qcow2", "b.qcow2"]);
    // A damaged header: qcow2 magic, version 3, a cluster size past QEMU's limit.
    let mut bad = std::fs::read(s.path("a.qcow2")).unwrap();
    bad[20..24].copy_from_slice(&40u32.to_be_bytes());
    s.write_file("bad.qcow2", &bad);
    // A snapshot table claimed far past the end of a small file: read as QEMU reads it
    // (zeros past the end: 65536 snapshots without names), in bounded memory.
    let mut huge = std::fs::read(s.path("a.qcow2")).unwrap();
    huge[60..64].copy_from_slice(&65536u32.to_be_bytes());
    huge[64..72].copy_from_slice(&(1u64 << 40).to_be_bytes());
    s.write_file("huge.qcow2", &huge);
    // A FIFO, a subdirectory, and a thousand copies of a small image.
    assert!(
        std::process::Command::new("mkfifo")
            .arg(s.path("fifo"))
            .status()
            .unwrap()
            .success()
    );
    std::fs::create_dir(s.path("subdir")).unwrap();
    s.create("one.qcow2", "", 1 << 20);
    let one = std::fs::read(s.path("one.qcow2")).unwrap();
    for i in 0..1000 {
        s.write_file(&format!("copy{i:04}.qcow2"), &one);
    }

    let forest = Forest::scan(&[s.dir()], &TreeOptions::default()).unwrap();
    // 1000 copies, one, huge, a, b: the loop is cut once, so one of a and b is a root.
    assert_eq!(forest.images().len(), 1004);
    let skipped: Vec<String> = forest
        .skipped()
        .iter()
        .map(|e| e.report().to_string())
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(
        skipped.iter().any(|e| e.contains("bad.qcow2")),
        "{skipped:?}"
    );
    assert!(
        !skipped.iter().any(|e| e.contains("huge.qcow2")),
        "{skipped:?}"
    );
    assert!(skipped.iter().any(|e| e.contains("loops")), "{skipped:?}");

    // Bounded: more images than allowed is refused, not read for hours.
    let small = TreeOptions {
        max_images: 100,
        ..TreeOptions::default()
    };
    let err = Forest::scan(&[s.dir()], &small).unwrap_err();
    assert!(err.report().to_string().contains("more than 100"), "{err}");

    // qimg tree prints what it could read and warns about the rest, exit 0.
    let out = s.qimg_output(&["tree", "--output=json", "."]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(stderr.lines().all(|l| l.starts_with("qimg: warning: ")));
}

/// Copies of the tree, one for us and one for qemu-img.
fn both(s: &Scratch) {
    for dir in ["ours", "qemu"] {
        std::fs::create_dir(s.path(dir)).unwrap();
        for f in ["base.qcow2", "mid.qcow2", "top.qcow2", "other.qcow2"] {
            s.copy(f, &format!("{dir}/{f}"));
        }
    }
}

fn bytes(s: &Scratch, dir: &str) -> Vec<Vec<u8>> {
    ["base.qcow2", "mid.qcow2", "top.qcow2", "other.qcow2"]
        .iter()
        .map(|f| std::fs::read(s.path(&format!("{dir}/{f}"))).unwrap())
        .collect()
}

#[test]
fn commit_refuses_to_change_what_an_image_outside_the_chain_shows() {
    let s = Scratch::new();
    tree(&s);
    both(&s);
    let before = bytes(&s, "ours");
    // other.qcow2 uses base: committing top (through mid) into base would change it.
    let out = s.qimg_output(&["commit", "-b", "base.qcow2", "ours/top.qcow2"]);
    assert_one_line_failure(&out, "commit into a shared base");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        "qimg: ours/base.qcow2: is the backing file of ours/other.qcow2; committing would \
         change what it shows (use qimg remove, or --force)"
    );
    // A middle range into base is refused the same way; so is committing other.
    let out = s.qimg_output(&["commit", "--top", "mid.qcow2", "ours/top.qcow2"]);
    assert_one_line_failure(&out, "commit of mid into a shared base");
    let out = s.qimg_output(&["commit", "ours/other.qcow2"]);
    assert_one_line_failure(&out, "commit of other into a shared base");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mid.qcow2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        bytes(&s, "ours") == before,
        "a refused commit changed an image"
    );

    // The library: the typed error.
    let err = ops::commit(
        s.path("ours/other.qcow2"),
        &CommitOptions::default(),
        &mut |_, _| true,
    )
    .unwrap_err();
    match err.root() {
        Error::HasDependents { dependent, direct } => {
            assert_eq!(dependent, &s.path("ours/mid.qcow2"));
            assert!(direct);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.file(), Some(s.path("ours/base.qcow2").as_path()));

    // Committing top into mid changes nothing anyone else sees: allowed, as qemu-img's.
    s.qimg(&["commit", "ours/top.qcow2"]);
    s.qemu_img(&["commit", "qemu/top.qcow2"]);
    for f in ["top.qcow2", "mid.qcow2", "other.qcow2"] {
        s.assert_same_content(&format!("ours/{f}"), &format!("qemu/{f}"), f);
    }

    // --force does what qemu-img does.
    s.qimg(&["commit", "--force", "-b", "base.qcow2", "ours/mid.qcow2"]);
    s.qemu_img(&["commit", "-b", "base.qcow2", "qemu/mid.qcow2"]);
    for f in ["base.qcow2", "mid.qcow2", "other.qcow2"] {
        s.assert_same_content(&format!("ours/{f}"), &format!("qemu/{f}"), f);
        s.assert_clean(&format!("ours/{f}"), f);
    }
}

#[test]
fn also_in_finds_dependents_in_other_directories() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("clones")).unwrap();
    s.create("base.qcow2", "", 1 << 20);
    s.create_overlay("top.qcow2", "base.qcow2", "qcow2", "", None);
    s.qemu_io("top.qcow2", "qcow2", &["write -P 5 0 64k".into()]);
    let base = s.path("base.qcow2").display().to_string();
    s.create_overlay("clones/clone.qcow2", &base, "qcow2", "", None);
    let before = std::fs::read(s.path("base.qcow2")).unwrap();
    // Not looked for outside the chain's directory unless asked.
    let out = s.qimg_output(&["commit", "--dry-run", "--also-in", "clones", "top.qcow2"]);
    assert_one_line_failure(&out, "commit with --also-in");
    assert!(String::from_utf8_lossy(&out.stderr).contains("clone.qcow2"));
    let options = CommitOptions {
        also_in: vec![s.path("clones")],
        ..CommitOptions::default()
    };
    let err = ops::commit(s.path("top.qcow2"), &options, &mut |_, _| true).unwrap_err();
    assert!(matches!(err.root(), Error::HasDependents { .. }), "{err}");
    assert_eq!(std::fs::read(s.path("base.qcow2")).unwrap(), before);
    s.qimg(&["commit", "top.qcow2"]);
}

/// An image a VM writes is skipped with QEMU's lock message, and read with `-U`; commit's
/// own look for dependents reads it anyway.
#[test]
fn images_in_use_are_read_sharing_them() {
    let s = Scratch::new();
    tree(&s);
    let vm = Holder::start(
        &s,
        "qemu-io",
        &["-c", "sleep 20000", "other.qcow2"],
        "other.qcow2",
        101,
    );
    let forest = Forest::scan(&[s.dir()], &TreeOptions::default()).unwrap();
    let skipped = forest.skipped()[0].report().to_string();
    assert!(
        skipped.contains("Failed to get shared \"write\" lock"),
        "{skipped}"
    );
    let shared = TreeOptions {
        locking: Locking::ForceShare,
        ..TreeOptions::default()
    };
    let forest = Forest::scan(&[s.dir()], &shared).unwrap();
    assert!(forest.skipped().is_empty());
    assert!(forest.find(s.path("other.qcow2")).is_some());
    let out = s.qimg_output(&["commit", "-b", "base.qcow2", "top.qcow2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the backing file of"));
    drop(vm);
}
