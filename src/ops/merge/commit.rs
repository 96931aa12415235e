//! Commit: the data of the layers above a base goes down into it.

use std::path::{Path, PathBuf};

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::layers::Layer;
use crate::progress::{Progress, Tracker};
use crate::storage::Locking;

use crate::ops::tree::{Forest, TreeOptions};

use super::backing::{open, repoint_options, set_backing};
use super::copy::copy_decided;
use super::options::{CommitOptions, MergeOptions, MergeReport};
use super::resume::{Buffers, Dest};
use super::sink::Out;

/// Commits as `qemu-img commit` / libvirt blockcommit (see [`CommitOptions`]) starting
/// from the image at `path`.
pub fn commit(
    path: impl AsRef<Path>,
    options: &CommitOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    let path = path.as_ref();
    let open_options = &options.merge.chain;
    let chain = open(open_options, path, false, false)?;
    let n = chain.layers().len();
    let top = match &options.top {
        Some(name) => chain.find(name)?,
        None => 0,
    };
    let base = match &options.base {
        Some(name) => chain.find(name)?,
        None => top + 1,
    };
    let layer_name = |i: usize| chain.layers()[i].name().display().to_string();
    if base >= n {
        return Err(Error::InvalidArgument(
            "image does not have a backing file to commit into".into(),
        )
        .in_file(chain.layers()[top].name()));
    }
    if base <= top {
        return Err(Error::InvalidArgument(format!(
            "the base ({}) must lie below the top ({}) in the backing chain",
            layer_name(base),
            layer_name(top)
        ))
        .in_file(path));
    }
    if !options.force {
        refuse_changing_what_others_show(&chain, top, base, options)?;
    }
    let keep = options.keep || options.base.is_some() || top > 0;
    // A middle range goes down as its top layer shows it: up to that layer's size,
    // whether the active image is shorter or longer.
    let from_top;
    let (data, copy) = if top > 0 {
        from_top = open(open_options, chain.layers()[top].name(), false, false)?;
        (&from_top, 0..base - top)
    } else {
        (&chain, 0..base)
    };
    let mut tracker = Tracker::new(progress, data.size());
    if options.merge.dry_run {
        let dest = Dest::new(&chain.layers()[base], None);
        let mut out = Out::new(
            None,
            &MergeOptions {
                checkpoint_bytes: 0,
                ..MergeOptions::default()
            },
        );
        copy_decided(data, 0, copy, true, &dest, &mut out, &mut tracker)?;
        hide_tail(&chain, top, &dest, &mut out)?;
        tracker.finish()?;
        return Ok(out.report);
    }
    let base_layer = &chain.layers()[base];
    let base_path = base_layer.name().to_path_buf();
    // As the chain opened it: a raw base named by its backing format is written freely,
    // a probed one keeps the guard on its first sector (QEMU's commit writes the node the
    // chain opened).
    let base_options = ChainOptions {
        writable: true,
        no_backing: false,
        format: base_layer.reopen_format(),
        ..open_options.clone()
    };
    let mut base_chain = Chain::open_with(&base_path, &base_options)?;
    // A smaller base grows first, as in qemu-img. A raw layer reads its size at open, so
    // the grown base is opened again to take writes up to the new end.
    let needed = chain.layers()[top].size();
    if base_chain.size() < needed {
        base_chain.resize(needed.div_ceil(512) * 512, false)?;
        base_chain.close()?;
        base_chain = Chain::open_with(&base_path, &base_options)?;
    }
    let dest = Dest::new(base_chain.top(), None);
    let mut out = Out::new(Some(&base_chain), &options.merge);
    copy_decided(data, 0, copy, true, &dest, &mut out, &mut tracker)?;
    hide_tail(&chain, top, &dest, &mut out)?;
    let report = out.report;
    if options.merge_bitmaps {
        merge_bitmaps(&chain.layers()[top..base], base_chain.top())?;
    }
    base_chain.close()?;
    drop(base_chain);
    if top > 0 {
        let above = chain.layers()[top - 1].name().to_path_buf();
        let amend = repoint_options(&chain, &above, Some(base))?;
        set_backing(open_options, &above, &amend)?;
    } else if !keep {
        drop(chain);
        let file = open(open_options, path, true, true)?;
        make_empty(&file)?;
        file.close()?;
    }
    tracker.finish()?;
    Ok(report)
}

/// Before a middle range (layers `top..`, `top` > 0) is committed, the images above it see
/// zeros past the end of layer `top` where they allocate nothing; re-pointed at a longer
/// base they would see its data there. So the base reads as zeros from the end of `top`
/// as far as any image above reaches (QEMU's block-commit leaves that data showing).
fn hide_tail(chain: &Chain, top: usize, dest: &Dest<'_>, out: &mut Out<'_>) -> Result<()> {
    if top == 0 {
        return Ok(());
    }
    let from = chain.layers()[top].size();
    let reach = chain.layers()[..top]
        .iter()
        .map(Layer::size)
        .max()
        .unwrap_or(0);
    let end = reach.min(dest.present.layer.size());
    if end <= from {
        return Ok(());
    }
    let mut bufs = Buffers::default();
    out.report.already_done_bytes +=
        dest.present
            .compare(None, from, end - from, &mut bufs.scratch, &mut bufs.todo)?;
    for &(o, l) in &bufs.todo {
        out.zero(o, l)?;
    }
    Ok(())
}

/// Merges the consistent bitmaps of `committed` into the bitmaps of `base` that have the
/// same name (libvirt's blockcommit; see [`CommitOptions::merge_bitmaps`]).
fn merge_bitmaps(committed: &[Layer], base: &Layer) -> Result<()> {
    let Layer::Qcow2(base) = base else {
        return Ok(());
    };
    let targets: Vec<_> = base.bitmaps()?.into_iter().filter(|b| !b.in_use).collect();
    for layer in committed {
        let Layer::Qcow2(image) = layer else {
            continue;
        };
        for bitmap in image.bitmaps()?.into_iter().filter(|b| !b.in_use) {
            if targets.iter().any(|t| t.name == bitmap.name) {
                let contents = image.load_bitmap(&bitmap.name)?;
                base.merge_bitmap(&bitmap.name, &contents)?;
            }
        }
    }
    Ok(())
}

/// Makes every cluster of the top image of `chain` unallocated (qemu-img commit empties
/// the committed image this way).
fn make_empty(chain: &Chain) -> Result<()> {
    match chain.top() {
        Layer::Qcow2(image) => image.make_empty(),
        Layer::Raw(_) => Err(Error::Unsupported("emptying a raw image")),
    }
}

/// Refuses a commit into `base` that would change what an image outside the chain shows:
/// one whose backing chain holds the base but not the merge's top (a sibling of a layer
/// being merged, or any image on the base). Images on the top see the same afterwards.
/// Looks in the directories of the chain's images and [`CommitOptions::also_in`]; an
/// opener that cannot list directories ([`crate::storage::Opener::read_dir`]) has none
/// to look in, and nothing is refused.
fn refuse_changing_what_others_show(
    chain: &Chain,
    top: usize,
    base: usize,
    options: &CommitOptions,
) -> Result<()> {
    let layers = &chain.layers()[..=base];
    let mut dirs: Vec<PathBuf> = Vec::new();
    for layer in layers {
        let dir = layer.name().parent().unwrap_or(Path::new("")).to_path_buf();
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs.extend(options.also_in.iter().cloned());
    let forest = match dependents_scan(&dirs, &options.merge) {
        Ok(forest) => forest,
        Err(e) if e.io_kind() == Some(std::io::ErrorKind::Unsupported) => return Ok(()),
        Err(e) => return Err(e),
    };
    let (Some(base_at), Some(top_at)) = (
        forest.find(layers[base].name()),
        forest.find(layers[top].name()),
    ) else {
        return Ok(());
    };
    let in_chain: Vec<usize> = layers
        .iter()
        .filter_map(|l| forest.find(l.name()))
        .collect();
    for dependent in forest.dependents(base_at) {
        if in_chain.contains(&dependent) || forest.chain_of(dependent).any(|i| i == top_at) {
            continue;
        }
        return Err(Error::HasDependents {
            dependent: forest.images()[dependent].path.clone(),
            direct: forest.parent(dependent) == Some(base_at),
        }
        .in_file(layers[base].name()));
    }
    Ok(())
}

/// The images in `dirs`, read to find which use which as backing file before a merge
/// changes one: only headers are read, sharing every image (a VM's image is read too).
pub(super) fn dependents_scan(dirs: &[PathBuf], options: &MergeOptions) -> Result<Forest> {
    let scan = TreeOptions {
        locking: Locking::ForceShare,
        opener: options.chain.opener.clone(),
        ..TreeOptions::default()
    };
    Forest::scan(dirs, &scan)
}
