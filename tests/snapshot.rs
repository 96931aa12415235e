//! Internal snapshots against qemu-img: ours are qemu's and qemu's are ours.

mod common;

use common::{Rng, Scratch, random_ops, source_file};
use qcow2_engine::{Chain, ChainOptions};

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

fn assert_clean(s: &Scratch, name: &str, label: &str) {
    let out = s.output("qemu-img", &["check", name]);
    assert!(
        out.status.success(),
        "{label}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn image(chain: &Chain) -> &qcow2_engine::Image {
    chain.top().as_qcow2().unwrap()
}

#[test]
fn snapshots_we_take_are_listed_applied_and_read_by_qemu_img() {
    for options in [
        "cluster_size=64k",
        "cluster_size=512",
        "cluster_size=64k,extended_l2=on",
        "cluster_size=64k,compat=0.10",
        "cluster_size=4k,refcount_bits=64",
    ] {
        let s = Scratch::new();
        let mut rng = Rng::new(7);
        source_file(&s, 7, 128 * 1024);
        s.create("a.qcow2", options, 4 << 20);
        let ops = random_ops(&mut rng, 4 << 20, 64 * 1024, 128 * 1024, 0x30, 30);
        s.qemu_io("a.qcow2", "qcow2", &ops);
        let first = s.reference("a.qcow2", "qcow2");
        {
            let chain = open_rw(&s, "a.qcow2");
            let e = image(&chain).snapshot_create("first").unwrap();
            assert_eq!(e.id, "1");
            chain.write_at(&[0x99; 200_000], 100_000).unwrap();
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", &format!("{options}: create"));
        let list = s.qemu_img(&["snapshot", "-l", "a.qcow2"]);
        assert!(list.contains("first"), "{options}: {list}");
        let second = s.reference("a.qcow2", "qcow2");
        // qemu takes one too, then writes more.
        s.qemu_img(&["snapshot", "-c", "second", "a.qcow2"]);
        let ops = random_ops(&mut rng, 4 << 20, 64 * 1024, 128 * 1024, 0x50, 30);
        s.qemu_io("a.qcow2", "qcow2", &ops);
        {
            // Ours applies qemu's, and our own.
            let chain = open_rw(&s, "a.qcow2");
            image(&chain).snapshot_apply("second").unwrap();
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", &format!("{options}: apply qemu's"));
        assert_eq!(
            s.reference("a.qcow2", "qcow2"),
            second,
            "{options}: apply second"
        );
        {
            let chain = open_rw(&s, "a.qcow2");
            image(&chain).snapshot_apply("1").unwrap();
            chain.close().unwrap();
        }
        assert_eq!(
            s.reference("a.qcow2", "qcow2"),
            first,
            "{options}: apply first"
        );
        assert_clean(&s, "a.qcow2", &format!("{options}: apply ours"));
        // qemu applies ours.
        s.qemu_img(&["snapshot", "-a", "second", "a.qcow2"]);
        assert_eq!(
            s.reference("a.qcow2", "qcow2"),
            second,
            "{options}: qemu applies"
        );
        // Deleting both leaves no leak, and writes after it go in place again.
        {
            let chain = open_rw(&s, "a.qcow2");
            image(&chain).snapshot_delete("first").unwrap();
            image(&chain).snapshot_delete("second").unwrap();
            assert!(image(&chain).snapshots().is_empty());
            chain.write_at(&[0x98; 70_000], 2 << 20).unwrap();
            chain.close().unwrap();
        }
        assert_clean(&s, "a.qcow2", &format!("{options}: delete"));
        let mut expect = second.clone();
        expect[2 << 20..(2 << 20) + 70_000].fill(0x98);
        assert_eq!(
            s.reference("a.qcow2", "qcow2"),
            expect,
            "{options}: after delete"
        );
        let out = s.qemu_img(&["check", "--output=json", "a.qcow2"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v.get("leaks").and_then(|l| l.as_u64()).unwrap_or(0),
            0,
            "{options}"
        );
    }
}

#[test]
fn qimg_snapshot_lists_creates_applies_and_deletes_like_qemu_img() {
    let s = Scratch::new();
    s.create("a.qcow2", "cluster_size=64k", 2 << 20);
    s.qemu_io("a.qcow2", "qcow2", &["write -P 0x10 0 1M".into()]);
    let ok = |args: &[&str]| {
        let out = common::qimg(s.dir(), args);
        assert!(
            out.status.success(),
            "qimg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["snapshot", "-c", "base-install", "a.qcow2"]);
    s.qemu_io("a.qcow2", "qcow2", &["write -P 0x20 0 512k".into()]);
    s.qemu_img(&["snapshot", "-c", "by-qemu", "a.qcow2"]);
    let ours = ok(&["snapshot", "-l", "a.qcow2"]);
    let theirs = s.qemu_img(&["snapshot", "-l", "a.qcow2"]);
    let columns = |t: &str| -> Vec<Vec<String>> {
        t.lines()
            .skip(2)
            .map(|l| l.split_whitespace().take(2).map(str::to_owned).collect())
            .collect()
    };
    assert_eq!(columns(&ours), columns(&theirs), "{ours}\n{theirs}");
    ok(&["snapshot", "-a", "1", "a.qcow2"]);
    s.qemu_io("a.qcow2", "qcow2", &["read -P 0x10 0 1M".into()]);
    ok(&["snapshot", "-d", "base-install", "a.qcow2"]);
    assert_clean(&s, "a.qcow2", "qimg snapshot");
    let out = common::qimg(s.dir(), &["snapshot", "-a", "no-such", "a.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("qimg: ") && err.contains("no-such") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn names_past_qemus_limit_are_refused_before_anything_changes() {
    let s = Scratch::new();
    s.create("a.qcow2", "", 1 << 20);
    s.qemu_io("a.qcow2", "qcow2", &["write -P 1 0 64k".to_string()]);
    let before = std::fs::read(s.path("a.qcow2")).unwrap();
    let chain = open_rw(&s, "a.qcow2");
    let long = "n".repeat(256);
    let err = image(&chain)
        .snapshot_create(&long)
        .unwrap_err()
        .report()
        .to_string();
    assert!(err.contains("255"), "{err}");
    assert!(image(&chain).snapshot_delete("missing").is_err());
    assert!(image(&chain).snapshot_apply("missing").is_err());
    chain.close().unwrap();
    drop(chain);
    assert_eq!(before, std::fs::read(s.path("a.qcow2")).unwrap());
    // 255 bytes is QEMU's longest name: taken, and qemu-img lists it whole.
    let chain = open_rw(&s, "a.qcow2");
    image(&chain).snapshot_create(&long[..255]).unwrap();
    chain.close().unwrap();
    drop(chain);
    let list = s.qemu_img(&["snapshot", "-l", "a.qcow2"]);
    assert!(list.contains(&long[..255]), "{list}");
    assert_clean(&s, "a.qcow2", "long name");
}

/// Narrow refcounts cannot count a snapshot's references (1 bit: none; 2 bits: at most
/// three users of a cluster): creating or applying such a snapshot is refused before
/// anything changes, so the image stays byte for byte what it was, and writes after the
/// refusal leave it clean (QEMU refuses too, but leaks a cluster). Found by the `ops` fuzz
/// target: the refusal came after the COPIED flags were cleared and refcounts raised.
#[test]
fn snapshots_narrow_refcounts_cannot_count_are_refused_before_anything_changes() {
    let s = Scratch::new();
    for (options, taken) in [
        ("cluster_size=4k,refcount_bits=1", 0),
        ("cluster_size=4k,refcount_bits=1,lazy_refcounts=on", 0),
        ("cluster_size=4k,refcount_bits=2", 2),
    ] {
        s.create("a.qcow2", options, 1 << 20);
        s.qemu_io("a.qcow2", "qcow2", &["write -P 1 0 64k".to_string()]);
        let chain = open_rw(&s, "a.qcow2");
        for i in 0..taken {
            image(&chain).snapshot_create(&format!("s{i}")).unwrap();
        }
        chain.close().unwrap();
        drop(chain);
        let before = std::fs::read(s.path("a.qcow2")).unwrap();
        let refuse = |chain: &Chain| {
            let err = image(chain).snapshot_create("more").unwrap_err();
            assert!(
                matches!(err.root(), qcow2_engine::Error::InvalidArgument(_)),
                "[{options}] {err}"
            );
            if taken > 0 {
                // Applying adds the snapshot's references before the old ones go.
                let err = image(chain).snapshot_apply("s0").unwrap_err();
                assert!(
                    err.report().to_string().contains("refcounts"),
                    "[{options}] {err}"
                );
            }
        };
        let chain = open_rw(&s, "a.qcow2");
        refuse(&chain);
        chain.close().unwrap();
        drop(chain);
        assert!(
            before == std::fs::read(s.path("a.qcow2")).unwrap(),
            "[{options}] a refusal changed the file"
        );
        let chain = open_rw(&s, "a.qcow2");
        refuse(&chain);
        chain.write_at(&[2; 512], 4096).unwrap();
        chain.close().unwrap();
        drop(chain);
        assert_clean(&s, "a.qcow2", options);
        let list = s.qemu_img(&["snapshot", "-l", "a.qcow2"]);
        assert!(!list.contains("more"), "[{options}] {list}");
    }
}

/// Applying a snapshot frees the compressed clusters only the active image used; a new
/// compressed cluster written where one of them was must read as itself, not as the
/// cluster decompressed from that place before. Found by the `ops` fuzz target.
#[test]
fn a_compressed_cluster_written_where_a_snapshot_freed_one_reads_back() {
    use qcow2_engine::format::CompressionType;
    use qcow2_engine::qcow2::compress_cluster;
    let s = Scratch::new();
    let cs = 4096u64;
    s.create("a.qcow2", "cluster_size=4k", 1 << 20);
    let chain = open_rw(&s, "a.qcow2");
    let cluster = |byte: u8| -> Vec<u8> { (0..cs).map(|j| byte ^ (j / 512) as u8).collect() };
    let write = |at: u64, data: &[u8]| {
        let c = compress_cluster(CompressionType::Zlib, data)
            .unwrap()
            .expect("compressible");
        chain.write_compressed(at, &c).unwrap();
    };
    let read = |at: u64| {
        let mut buf = vec![0u8; cs as usize];
        chain.read_at(&mut buf, at).unwrap();
        buf
    };
    let host = |at: u64| image(&chain).lookup(at, cs).unwrap().mapping;
    let (a, b) = (cluster(0x11), cluster(0x22));
    image(&chain).snapshot_create("empty").unwrap();
    // Moves the active L1 table away: its old place is the lowest free cluster.
    image(&chain).snapshot_apply("empty").unwrap();
    write(0, &a);
    assert!(read(0) == a);
    let was = host(0);
    // Frees the lowest cluster again: the one holding `a`, where `b` goes.
    image(&chain).snapshot_apply("empty").unwrap();
    write(8 * cs, &b);
    assert_eq!(host(8 * cs), was, "the test needs `b` where `a` was");
    assert!(
        read(8 * cs) == b,
        "the new compressed cluster reads as the old one"
    );
    chain.close().unwrap();
    drop(chain);
    assert_clean(&s, "a.qcow2", "compressed after apply");
}

/// Runs `program args` in `dir` with `TZ` set to `tz`.
fn run_tz(dir: &std::path::Path, tz: &str, program: &str, args: &[&str]) -> std::process::Output {
    let program = if program == "qimg" {
        common::qimg_path().as_os_str().to_owned()
    } else {
        program.into()
    };
    std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("TZ", tz)
        .output()
        .unwrap()
}

/// `ID TAG` of each snapshot `snapshot -l` lists.
fn ids_and_names(listing: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(listing)
        .lines()
        .skip(2)
        .map(|l| {
            let mut words = l.split_whitespace();
            let id = words.next().unwrap_or_default().to_owned();
            (id, words.next().unwrap_or_default().to_owned())
        })
        .collect()
}

/// An image whose snapshots' names are other snapshots' IDs: ID 1 is named "2" (taken
/// over pattern 0x0a), ID 2 "1" (0x0b), ID 3 and ID 4 both "x" (0x0c, 0x0d); the active
/// image holds 0x0e. Copied to `ours/a.qcow2` and `qemu/a.qcow2`.
fn tangled_names(s: &Scratch) {
    s.create("a.qcow2", "cluster_size=64k", 1 << 20);
    for (pattern, name) in [(0x0a, "2"), (0x0b, "1"), (0x0c, "x"), (0x0d, "x")] {
        s.qemu_io("a.qcow2", "qcow2", &[format!("write -P {pattern} 0 64k")]);
        s.qemu_img(&["snapshot", "-c", name, "a.qcow2"]);
    }
    s.qemu_io("a.qcow2", "qcow2", &["write -P 0x0e 0 64k".into()]);
    for twin in ["ours", "qemu"] {
        std::fs::create_dir_all(s.path(twin)).unwrap();
        std::fs::copy(s.path("a.qcow2"), s.path(twin).join("a.qcow2")).unwrap();
    }
}

#[test]
fn qimg_snapshot_resolves_names_and_ids_per_action_as_qemu_img() {
    // (arguments, whether qemu-img succeeds), each on fresh twins.
    let cases: &[(&[&str], bool)] = &[
        // -a: an ID first, then a name.
        (&["-a", "1"], true),
        (&["-a", "2"], true),
        (&["-a", "3"], true),
        (&["-a", "x"], true),
        (&["-a", "nope"], false),
        // -d: names only (the first of equal ones); an ID alone is not found.
        (&["-d", "1"], true),
        (&["-d", "2"], true),
        (&["-d", "x"], true),
        (&["-d", "3"], false),
        (&["-d", "nope"], false),
        // -c: a name may repeat, and may be another snapshot's ID.
        (&["-c", "1"], true),
        (&["-c", "x"], true),
    ];
    for (action, succeeds) in cases {
        let s = Scratch::new();
        tangled_names(&s);
        let image_in = |twin: &str| format!("{twin}/a.qcow2");
        let mut ours: Vec<String> = vec!["snapshot".into()];
        ours.extend(action.iter().map(|a| a.to_string()));
        let mut qemu = ours.clone();
        ours.push(image_in("ours"));
        qemu.push(image_in("qemu"));
        let ours: Vec<&str> = ours.iter().map(String::as_str).collect();
        let qemu: Vec<&str> = qemu.iter().map(String::as_str).collect();
        let mine = common::qimg(s.dir(), &ours);
        let theirs = s.output("qemu-img", &qemu);
        let code = if *succeeds { 0 } else { 1 };
        assert_eq!(theirs.status.code(), Some(code), "qemu-img {action:?}");
        let stderr = String::from_utf8_lossy(&mine.stderr);
        assert_eq!(mine.status.code(), Some(code), "qimg {action:?}: {stderr}");
        if !succeeds {
            assert!(
                stderr.starts_with("qimg: ") && stderr.lines().count() == 1,
                "{stderr}"
            );
        }
        // The same snapshots left and the same active content.
        let list = |twin: &str| {
            let out = common::qimg(s.dir(), &["snapshot", &image_in(twin)]);
            assert!(out.status.success());
            ids_and_names(&out.stdout)
        };
        assert_eq!(list("ours"), list("qemu"), "{action:?}");
        let same = s.output(
            "qemu-img",
            &["compare", &image_in("ours"), &image_in("qemu")],
        );
        assert!(same.status.success(), "{action:?}: content differs");
        assert_clean(&s, &image_in("ours"), &format!("{action:?}"));
    }
}

#[test]
fn qimg_snapshot_without_an_action_lists_in_local_time_as_qemu_img() {
    let s = Scratch::new();
    tangled_names(&s);
    // Zones by name (tzdata), as POSIX rules (no tzdata needed), and UTC.
    for tz in ["Asia/Tokyo", "America/New_York", "JST-9", "EST5EDT", "UTC"] {
        for args in [&["snapshot", "a.qcow2"][..], &["snapshot", "-l", "a.qcow2"]] {
            let ours = run_tz(s.dir(), tz, "qimg", args);
            let theirs = run_tz(s.dir(), tz, "qemu-img", args);
            assert!(
                ours.status.success() && theirs.status.success(),
                "{tz} {args:?}"
            );
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "TZ={tz} {args:?}"
            );
        }
        // info lists them the same way.
        let info = |program| {
            let out = run_tz(s.dir(), tz, program, &["info", "a.qcow2"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let start = text.find("Snapshot list:").expect("a snapshot list");
            let end = text
                .find("Format specific information:")
                .unwrap_or(text.len());
            text[start..end].to_owned()
        };
        assert_eq!(info("qimg"), info("qemu-img"), "TZ={tz} info");
    }
    // Tokyo is nine hours ahead of UTC all year: the dates differ.
    let tokyo = run_tz(s.dir(), "Asia/Tokyo", "qimg", &["snapshot", "a.qcow2"]);
    let utc = run_tz(s.dir(), "UTC", "qimg", &["snapshot", "a.qcow2"]);
    assert_ne!(tokyo.stdout, utc.stdout);
}

#[test]
fn qimg_snapshot_f_and_raw_images_as_qemu_img() {
    let s = Scratch::new();
    tangled_names(&s);
    s.write_file("plain.raw", &vec![0x33; 1 << 20]);
    // (arguments, qemu-img's exit code, whether stdout is empty)
    let cases: &[(&[&str], i32, bool)] = &[
        (&["snapshot", "-l", "plain.raw"], 0, true),
        (&["snapshot", "plain.raw"], 0, true),
        (&["snapshot", "-c", "s", "plain.raw"], 1, true),
        (&["snapshot", "-d", "s", "plain.raw"], 1, true),
        (&["snapshot", "-f", "raw", "-l", "a.qcow2"], 0, true),
        (&["snapshot", "-f", "raw", "-c", "s", "a.qcow2"], 1, true),
        (&["snapshot", "-f", "qcow2", "-l", "plain.raw"], 1, true),
        (&["snapshot", "-f", "qcow2", "-l", "a.qcow2"], 0, false),
        (&["snapshot", "--list", "a.qcow2"], 0, false),
        (&["snapshot", "-l", "-c", "s", "a.qcow2"], 1, true),
    ];
    let before = std::fs::read(s.path("a.qcow2")).unwrap();
    let raw_before = std::fs::read(s.path("plain.raw")).unwrap();
    for (args, code, empty) in cases {
        let mine = common::qimg(s.dir(), args);
        let theirs = s.output("qemu-img", args);
        assert_eq!(theirs.status.code(), Some(*code), "qemu-img {args:?}");
        let stderr = String::from_utf8_lossy(&mine.stderr);
        assert_eq!(mine.status.code(), Some(*code), "qimg {args:?}: {stderr}");
        assert_eq!(mine.stdout.is_empty(), *empty, "qimg {args:?}");
        assert_eq!(mine.stdout, theirs.stdout, "{args:?}");
        if *code != 0 {
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
        }
    }
    assert_eq!(std::fs::read(s.path("a.qcow2")).unwrap(), before);
    assert_eq!(std::fs::read(s.path("plain.raw")).unwrap(), raw_before);
}
