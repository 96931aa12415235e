//! A case: the chain to build, the merge to run on it, and which images must keep
//! showing what they showed.

use std::path::Path;

use qcow2_engine::ops::{self, CommitOptions, MergeOptions, MergeReport};

use crate::common::Scratch;

/// The merge a case runs, with image names relative to the directory it runs in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// `commit` from the active image with these options.
    Commit {
        base: Option<&'static str>,
        top: Option<&'static str>,
        keep: bool,
    },
    /// `pull` into the active image.
    Pull { base: Option<&'static str> },
    /// Safe `rebase` of the active image onto this file.
    Rebase { backing: &'static str },
}

impl Op {
    pub(crate) fn run(
        self,
        dir: &Path,
        active: &str,
        options: &MergeOptions,
    ) -> qcow2_engine::Result<MergeReport> {
        let p = |n: &str| dir.join(n);
        let mut progress = |_: u64, _: u64| true;
        match self {
            Op::Commit { base, top, keep } => ops::commit(
                p(active),
                &CommitOptions {
                    base: base.map(p),
                    top: top.map(p),
                    keep,
                    merge: options.clone(),
                    ..CommitOptions::default()
                },
                &mut progress,
            ),
            Op::Pull { base } => {
                ops::pull(p(active), base.map(p).as_deref(), options, &mut progress)
            }
            Op::Rebase { backing } => ops::rebase(
                p(active),
                Some(backing),
                None,
                false,
                options,
                &mut progress,
            ),
        }
    }

    /// Whether a rerun after the merge completed is refused (a commit of a middle range:
    /// its top is no longer in the chain).
    pub(crate) fn refuses_rerun_when_complete(self) -> bool {
        matches!(self, Op::Commit { top: Some(_), .. })
    }
}

/// One chain and one merge.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    /// Makes the images in the scratch directory.
    pub(crate) build: fn(&Scratch),
    /// Every file the merge may open (the chain and any new backing file).
    pub(crate) images: &'static [&'static str],
    /// The image the command starts from.
    pub(crate) active: &'static str,
    /// The image the merge writes its data into.
    pub(crate) dest: &'static str,
    /// The images that must keep showing what they showed, at every moment (the active
    /// one always; images between it and the destination may change, as with qemu-img).
    pub(crate) unchanged: &'static [&'static str],
    /// An internal snapshot of the destination, whose content must never change.
    pub(crate) snapshot: Option<&'static str>,
    pub(crate) op: Op,
}
