//! Every long operation reports progress that never goes back and ends at `(total,
//! total)`, even when its work ends early in the guest range (a commit whose last data
//! lies in the first half of the image).

mod common;

use common::Scratch;
use qcow2_engine::ops::{self, CommitOptions, ConvertOptions, MergeOptions};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Format, create};

const SIZE: u64 = 1 << 30;

/// Records the calls of a progress callback.
#[derive(Default)]
struct Calls(Vec<(u64, u64)>);

impl Calls {
    fn callback(&mut self) -> impl FnMut(u64, u64) -> bool + '_ {
        |done, total| {
            self.0.push((done, total));
            true
        }
    }

    fn assert_complete(&self, total: u64, what: &str) {
        let calls = &self.0;
        assert!(!calls.is_empty(), "{what}: no progress reported");
        assert!(
            calls.windows(2).all(|w| w[0].0 <= w[1].0),
            "{what}: progress went back: {calls:?}"
        );
        assert!(
            calls.iter().all(|&(d, t)| t == total && d <= t),
            "{what}: {calls:?}"
        );
        assert_eq!(calls.last(), Some(&(total, total)), "{what}: {calls:?}");
    }
}

/// base (data at 0 and 256 MiB) <- top (data at 64 KiB only): every layer's data lies in
/// the first half of the 1 GiB image.
fn chain(s: &Scratch) {
    create(s.path("base.qcow2"), &CreateOptions::qcow2(SIZE)).unwrap();
    create(
        s.path("top.qcow2"),
        &CreateOptions::overlay("base.qcow2", Format::Qcow2),
    )
    .unwrap();
    let writable = ChainOptions {
        writable: true,
        no_backing: true,
        ..ChainOptions::default()
    };
    let base = Chain::open_with(s.path("base.qcow2"), &writable).unwrap();
    base.write_at(&[1; 65536], 0).unwrap();
    base.write_at(&[2; 65536], 256 << 20).unwrap();
    base.close().unwrap();
    let top = Chain::open_with(s.path("top.qcow2"), &writable).unwrap();
    top.write_at(&[3; 4096], 65536).unwrap();
    top.close().unwrap();
}

#[test]
fn merges_end_their_progress_at_the_total() {
    for dry_run in [true, false] {
        let s = Scratch::new();
        chain(&s);
        let merge = MergeOptions {
            dry_run,
            ..MergeOptions::default()
        };
        let mut calls = Calls::default();
        let options = CommitOptions {
            merge: merge.clone(),
            ..CommitOptions::default()
        };
        ops::commit(s.path("top.qcow2"), &options, &mut calls.callback()).unwrap();
        calls.assert_complete(SIZE, &format!("commit (dry run: {dry_run})"));

        let s = Scratch::new();
        chain(&s);
        let mut calls = Calls::default();
        ops::pull(s.path("top.qcow2"), None, &merge, &mut calls.callback()).unwrap();
        calls.assert_complete(SIZE, &format!("pull (dry run: {dry_run})"));

        for unsafe_ in [false, true] {
            let s = Scratch::new();
            chain(&s);
            let mut calls = Calls::default();
            ops::rebase(
                s.path("top.qcow2"),
                None,
                None,
                unsafe_,
                &merge,
                &mut calls.callback(),
            )
            .unwrap();
            calls.assert_complete(
                SIZE,
                &format!("rebase (unsafe: {unsafe_}, dry run: {dry_run})"),
            );
        }
    }
}

#[test]
fn reading_operations_end_their_progress_at_the_total() {
    let s = Scratch::new();
    chain(&s);
    let top = Chain::open(s.path("top.qcow2")).unwrap();
    let base = Chain::open(s.path("base.qcow2")).unwrap();

    let mut calls = Calls::default();
    ops::checksum(&top, &mut calls.callback()).unwrap();
    calls.assert_complete(SIZE, "checksum");

    let mut calls = Calls::default();
    let different = ops::compare(&top, &base, false, &mut calls.callback()).unwrap();
    assert!(!different.is_identical());
    calls.assert_complete(SIZE, "compare (different)");

    let mut calls = Calls::default();
    assert!(
        ops::compare(&top, &top, false, &mut calls.callback())
            .unwrap()
            .is_identical()
    );
    calls.assert_complete(SIZE, "compare (identical)");

    for format in [Format::Raw, Format::Qcow2] {
        let mut calls = Calls::default();
        let out = CreateOptions {
            format,
            ..CreateOptions::default()
        };
        ops::convert(
            &top,
            s.path(&format!("out.{}", format.name())),
            &out,
            &ConvertOptions::default(),
            &mut calls.callback(),
        )
        .unwrap();
        calls.assert_complete(SIZE, &format!("convert to {}", format.name()));
    }
}
