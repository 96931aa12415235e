//! Cases: the external data file's name damaged, and the backing confinement options on
//! it.

use std::os::unix::fs::symlink;
use std::sync::Arc;

use crate::fixtures::{Fixture, IMG, damaged};
use crate::layout::{get, put};
use crate::runner::{Case, Expect};

/// External data file name damage.
pub(crate) fn data_file_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let l = f.layout.clone();
    let Some(&(at, _, len)) = l.exts.iter().find(|e| e.1 == 0x4441_5441) else {
        return Vec::new();
    };
    let mut cases = Vec::new();
    for (what, name) in [
        ("missing", "nothere"),
        ("/dev/zero", "/dev/zero"),
        ("the image itself", IMG),
        ("a directory", "/tmp"),
        ("a name with a newline", "a\nb"),
    ] {
        let name = name.to_string();
        cases.push(damaged(f, format!("data file is {what}"), move |b| {
            let start = (at + 8) as usize;
            b[start..start + len as usize].fill(0);
            let n = name.len().min(len as usize);
            b[start..start + n].copy_from_slice(&name.as_bytes()[..n]);
            put(b, at + 4, 4, n as u64);
        }));
    }
    cases.push(damaged(f, "data file bit cleared", |b| {
        let v = get(b, 72, 8) & !4;
        put(b, 72, 8, v);
    }));
    cases
}

/// `--confine-backing` and `--regular-backing-only` on the external data file of the
/// `ext` fixture, which names `ext.data`: a link out of the directory, a real file
/// inside, a link to a device.
pub(crate) fn data_file_policy_cases(f: &Arc<Fixture>) -> Vec<Case> {
    let mut cases = Vec::new();
    for (what, global, expect) in [
        (
            "a link out of the directory",
            &["--confine-backing", "{dir}/jail"][..],
            Expect::Fails("external data file"),
        ),
        (
            "inside the directory",
            &["--confine-backing", "{dir}/jail"],
            Expect::Success,
        ),
        (
            "a link to /dev/zero",
            &["--regular-backing-only"],
            Expect::Fails("not a regular file"),
        ),
    ] {
        let fx = f.clone();
        let case = Case::new(
            format!("confine: data file is {what}"),
            Box::new(move |dir| {
                let jail = dir.join("jail");
                std::fs::create_dir(&jail).unwrap();
                std::fs::write(jail.join(IMG), &fx.bytes).unwrap();
                let data = &fx.others[0].1;
                if what.contains("out of") {
                    std::fs::write(dir.join("ext.data"), data).unwrap();
                    symlink("../ext.data", jail.join("ext.data")).unwrap();
                } else if what.contains("zero") {
                    symlink("/dev/zero", jail.join("ext.data")).unwrap();
                } else {
                    std::fs::write(jail.join("ext.data"), data).unwrap();
                }
                format!("jail/{IMG}")
            }),
        )
        .global(global)
        .expect(expect)
        .without_qemu();
        cases.push(case);
    }
    cases
}
