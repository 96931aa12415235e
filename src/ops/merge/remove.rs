//! Remove: take an external snapshot out of every chain it is in. Each image that used the
//! layer as backing file shows exactly what it showed, and uses the layer's backing file
//! (or none) instead; the layer's data goes down into its backing file when the layer is
//! that file's only user (one copy), and up into each user otherwise.
//!
//! # Crash safety
//!
//! Each step is a merge ([`super::commit`] of the layer as a middle range, or
//! [`super::pull`] into each user) and keeps what every image shows at every moment.
//! Before the first change the plan is written to a journal beside the layer
//! (`.NAME.qimg-remove`; through an opener, when it can create files), so running the
//! same command again after an interruption goes on with the same plan, even once every
//! user has been re-pointed and only deleting the layer was left; the journal goes last.

use std::io::{self, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::storage::{Opener, open_with, remove_file_with, stat_with};

use super::backing::{open, repoint_options, set_backing};
use super::commit::{commit, dependents_scan};
use super::options::{CommitOptions, MergeOptions, MergeReport};
use super::pull::pull;

/// What [`remove`] is asked to do.
#[derive(Debug, Clone, Default)]
pub struct RemoveOptions {
    /// Keep the layer's file once no chain uses it (default: delete it).
    pub keep: bool,
    /// More directories to look for the layer's users in, besides the layer's own.
    pub also_in: Vec<PathBuf>,
    /// Shared options (a dry run only plans and counts).
    pub merge: MergeOptions,
}

/// Where a removed layer's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMethod {
    /// Down into its backing file, whose only user it was.
    CommitDown,
    /// Up into each image that used it.
    PullUp,
}

/// What [`remove`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveReport {
    /// Where the layer's data went.
    pub method: RemoveMethod,
    /// The layer's backing file: what its users use now.
    pub backing: Option<PathBuf>,
    /// The images that used the layer as backing file.
    pub dependents: Vec<PathBuf>,
    /// The bytes copied, over every step.
    pub merge: MergeReport,
    /// Whether the layer's file was deleted.
    pub deleted: bool,
}

/// The plan: the same on a rerun (from the journal) as on the first run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    method: RemoveMethod,
    backing: Option<PathBuf>,
    dependents: Vec<PathBuf>,
}

/// Removes the layer at `layer` from every chain it is in (see the module docs), looking
/// for its users in its directory and [`RemoveOptions::also_in`]. Refused for a layer no
/// image uses (deleting it would lose its data). `progress(done, total)` runs over all
/// the steps and ends at `(total, total)`.
pub fn remove(
    layer: impl AsRef<Path>,
    options: &RemoveOptions,
    progress: Progress<'_>,
) -> Result<RemoveReport> {
    let layer = layer.as_ref();
    let opener = options.merge.chain.opener.as_deref();
    let journal = journal_path(layer);
    let from_journal = match read_journal(opener, &journal)? {
        Some(plan) if journal_holds(layer, &plan, options)? => Some(plan),
        _ => None,
    };
    let plan = match from_journal {
        Some(plan) => plan,
        None => {
            let plan = plan(layer, options)?;
            if !options.merge.dry_run {
                preflight(&options.merge.chain, &plan)?;
                write_journal(opener, &journal, &plan).map_err(|e| {
                    Error::io(format!("writing the journal {}", journal.display()), e)
                        .in_file(layer)
                })?;
            }
            plan
        }
    };
    let merge = &options.merge;
    // The users still on the layer: a rerun skips those already re-pointed.
    let mut pending = Vec::new();
    for dependent in &plan.dependents {
        if uses(&merge.chain, dependent, layer)? {
            pending.push(dependent.clone());
        }
    }
    let steps = match plan.method {
        RemoveMethod::CommitDown => pending.len().min(1),
        RemoveMethod::PullUp => pending.len(),
    }
    .max(1) as u64;
    const STEP: u64 = 1 << 20;
    let step = std::cell::Cell::new(0u64);
    let mut report = MergeReport::default();
    let mut add = |r: MergeReport| {
        report.data_bytes += r.data_bytes;
        report.zero_bytes += r.zero_bytes;
        report.already_done_bytes += r.already_done_bytes;
        report.examined_bytes += r.examined_bytes;
    };
    {
        let mut scaled = |done: u64, total: u64| {
            let within = (done.min(total) * STEP).checked_div(total).unwrap_or(STEP);
            progress(step.get() * STEP + within, steps * STEP)
        };
        match plan.method {
            RemoveMethod::CommitDown => {
                if let Some((first, rest)) = pending.split_first() {
                    // The layer as a middle range of its first user's chain: its data
                    // goes into the backing file and that user is re-pointed.
                    let into = CommitOptions {
                        top: Some(layer.to_path_buf()),
                        keep: true,
                        force: true,
                        merge: merge.clone(),
                        ..CommitOptions::default()
                    };
                    add(commit(first, &into, &mut scaled)?);
                    if !merge.dry_run {
                        // The backing file shows what the layer showed: the other users
                        // only need their pointer changed.
                        for other in rest {
                            repoint(&merge.chain, other)?;
                        }
                    }
                }
            }
            RemoveMethod::PullUp => {
                for dependent in &pending {
                    add(pull(
                        dependent,
                        plan.backing.as_deref(),
                        merge,
                        &mut scaled,
                    )?);
                    step.set(step.get() + 1);
                }
            }
        }
    }
    let mut deleted = false;
    if !merge.dry_run {
        if !options.keep {
            match remove_file_with(merge.chain.opener.as_deref(), layer) {
                // Gone already: a rerun after the deletion, before the journal went.
                Ok(()) => deleted = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => deleted = true,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                Err(e) => return Err(Error::io("deleting", e).in_file(layer)),
            }
        }
        remove_journal(opener, &journal).map_err(|e| {
            Error::io(format!("removing the journal {}", journal.display()), e).in_file(layer)
        })?;
    }
    progress(steps * STEP, steps * STEP);
    Ok(RemoveReport {
        method: plan.method,
        backing: plan.backing,
        dependents: plan.dependents,
        merge: report,
        deleted,
    })
}

/// Finds the layer's users and decides where its data goes.
fn plan(layer: &Path, options: &RemoveOptions) -> Result<Plan> {
    let dir = layer.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut dirs = vec![dir];
    dirs.extend(options.also_in.iter().cloned());
    let forest = dependents_scan(&dirs, &options.merge)?;
    let not_an_image = || {
        let why = forest
            .skipped()
            .iter()
            .find(|e| e.file() == Some(layer))
            .map(|e| e.report().to_string())
            .unwrap_or_else(|| "not found among the images of its directory".into());
        Error::InvalidArgument(format!("cannot read it as an image: {why}")).in_file(layer)
    };
    let at = forest.find(layer).ok_or_else(not_an_image)?;
    let dependents: Vec<PathBuf> = forest
        .children(at)
        .iter()
        .map(|&c| forest.images()[c].path.clone())
        .collect();
    if dependents.is_empty() {
        return Err(Error::InvalidArgument(
            "no image uses it as backing file; removing it would lose its data".into(),
        )
        .in_file(layer));
    }
    let image = &forest.images()[at];
    let backing = forest.parent(at);
    if backing.is_none() && image.backing_name.is_some() {
        return Err(Error::InvalidArgument(
            "its backing file cannot be read, so its users could not be re-pointed at it".into(),
        )
        .in_file(layer));
    }
    if !options.keep && !image.snapshots.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "it holds internal snapshots ({}) that deleting it would lose; delete them first, \
             or keep the file",
            image.snapshots.join(", ")
        ))
        .in_file(layer));
    }
    let method = match backing {
        // A backing file no longer than the layer shows nothing past the layer's end, so
        // users re-pointed at it see there what the layer showed them: zeros.
        Some(b)
            if forest.children(b) == [at]
                && forest.images()[b].virtual_size <= image.virtual_size =>
        {
            RemoveMethod::CommitDown
        }
        _ => RemoveMethod::PullUp,
    };
    if method == RemoveMethod::PullUp {
        // Pulling writes only a user's active layer: its internal snapshots would read
        // what they did not allocate from the new backing file, and show something else.
        if let Some(&c) = forest
            .children(at)
            .iter()
            .find(|&&c| !forest.images()[c].snapshots.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "{} holds internal snapshots, which would show something else once its \
                 backing file changes",
                forest.images()[c].path.display()
            ))
            .in_file(layer));
        }
    }
    Ok(Plan {
        method,
        backing: backing.map(|b| forest.images()[b].path.clone()),
        dependents,
    })
}

/// Whether a journal found beside the layer is this remove's: every image that uses the
/// layer now is one of the journal's users, and the layer still sits on the journal's
/// backing file (or the layer is gone, and only the journal was left). A journal a crash
/// left behind for an older file of the same name fails this, and a fresh plan is made.
fn journal_holds(layer: &Path, plan: &Plan, options: &RemoveOptions) -> Result<bool> {
    let chain = &options.merge.chain;
    if let Err(e) = stat_with(chain.opener.as_deref(), layer) {
        return Ok(e.kind() == io::ErrorKind::NotFound);
    }
    let dir = layer.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut dirs = vec![dir];
    dirs.extend(options.also_in.iter().cloned());
    let forest = dependents_scan(&dirs, &options.merge)?;
    let Some(at) = forest.find(layer) else {
        return Ok(false);
    };
    let listed: Vec<usize> = plan
        .dependents
        .iter()
        .filter_map(|d| forest.find(d))
        .collect();
    let same_backing = match (&plan.backing, forest.parent(at)) {
        (None, None) => true,
        (Some(b), Some(p)) => forest.find(b) == Some(p),
        _ => false,
    };
    Ok(same_backing && forest.children(at).iter().all(|c| listed.contains(c)))
}

/// Opens every image the plan writes, for writing, and drops it: another process using
/// one (QEMU's locks), or an image marked corrupt, is refused before the journal is
/// written and anything changes.
fn preflight(options: &ChainOptions, plan: &Plan) -> Result<()> {
    let written = plan.dependents.iter().chain(match plan.method {
        RemoveMethod::CommitDown => plan.backing.as_ref(),
        RemoveMethod::PullUp => None,
    });
    for image in written {
        let chain = open(options, image, true, false)?;
        chain.ensure_writable()?;
    }
    Ok(())
}

/// Whether the image at `dependent` uses `layer` as its backing file.
fn uses(options: &ChainOptions, dependent: &Path, layer: &Path) -> Result<bool> {
    let chain = Chain::open_with(
        dependent,
        &ChainOptions {
            format: None,
            writable: false,
            no_backing: false,
            ..options.clone()
        },
    )?;
    Ok(chain.layers().len() > 1 && chain.index_of(layer).ok() == Some(1))
}

/// Points `dependent` (on the layer) at the layer's backing file, which shows what the
/// layer showed.
fn repoint(options: &ChainOptions, dependent: &Path) -> Result<()> {
    let chain = open(options, dependent, false, false)?;
    let base = (chain.layers().len() > 2).then_some(2);
    let amend = repoint_options(&chain, dependent, base)?;
    drop(chain);
    set_backing(options, dependent, &amend)
}

/// `.NAME.qimg-remove` beside the layer.
fn journal_path(layer: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(layer.file_name().unwrap_or_default());
    name.push(".qimg-remove");
    layer.with_file_name(name)
}

const JOURNAL_HEADER: &str = "qimg remove journal 1";
/// A journal is a few lines per user; anything much larger is no journal of ours.
const MAX_JOURNAL_BYTES: u64 = 1 << 20;

/// Paths are written as hex of their bytes: any byte may be in a name, newlines too.
fn hex(path: &Path) -> String {
    path.as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unhex(text: &str) -> Option<PathBuf> {
    if text.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

/// The journal's text: the plan, then a CRC-32 of everything before it, so that a
/// journal cut short by a crash reads as none.
fn encode(plan: &Plan) -> String {
    let mut text = format!("{JOURNAL_HEADER}\n");
    text.push_str(match plan.method {
        RemoveMethod::CommitDown => "commit\n",
        RemoveMethod::PullUp => "pull\n",
    });
    text.push_str(&format!(
        "backing {}\n",
        plan.backing.as_deref().map(hex).unwrap_or_default()
    ));
    for dependent in &plan.dependents {
        text.push_str(&format!("dependent {}\n", hex(dependent)));
    }
    let crc = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("end {crc:08x}\n"));
    text
}

/// The plan in a journal's text; `None` unless it is whole and intact.
fn decode(text: &[u8]) -> Option<Plan> {
    let text = std::str::from_utf8(text).ok()?;
    let body_end = text.rfind("end ")?;
    let (body, end) = text.split_at(body_end);
    let crc = u32::from_str_radix(end.strip_prefix("end ")?.strip_suffix('\n')?, 16).ok()?;
    if crc32fast::hash(body.as_bytes()) != crc {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != JOURNAL_HEADER {
        return None;
    }
    let method = match lines.next()? {
        "commit" => RemoveMethod::CommitDown,
        "pull" => RemoveMethod::PullUp,
        _ => return None,
    };
    let backing = match lines.next()?.strip_prefix("backing ")? {
        "" => None,
        h => Some(unhex(h)?),
    };
    let dependents = lines
        .map(|l| l.strip_prefix("dependent ").and_then(unhex))
        .collect::<Option<Vec<_>>>()?;
    Some(Plan {
        method,
        backing,
        dependents,
    })
}

/// Writes the journal durably; `false` when the opener cannot create files (no journal).
fn write_journal(opener: Option<&dyn Opener>, path: &Path, plan: &Plan) -> io::Result<bool> {
    let text = encode(plan);
    match opener {
        None => {
            // Whole and durable under another name, then renamed: a crash leaves no
            // journal or a complete one.
            let partial = path.with_extension("partial");
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&partial, path)?;
            sync_dir(path)?;
        }
        Some(opener) => {
            // No rename here: a journal cut short fails its CRC and reads as none, and
            // nothing changes before it is whole and flushed.
            let file = match opener.create(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(false),
                Err(e) => return Err(e),
            };
            file.write_at(text.as_bytes(), 0)?;
            file.flush()?;
        }
    }
    Ok(true)
}

/// The plan of an interrupted remove of the layer, if a whole journal is there.
fn read_journal(opener: Option<&dyn Opener>, path: &Path) -> Result<Option<Plan>> {
    let file = match open_with(opener, path, false) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("opening the remove journal", e).in_file(path)),
    };
    let len = file
        .len()
        .map_err(|e| Error::io("reading the remove journal", e).in_file(path))?;
    if len > MAX_JOURNAL_BYTES {
        return Ok(None);
    }
    let mut text = vec![0u8; len as usize];
    file.read_at(&mut text, 0)
        .map_err(|e| Error::io("reading the remove journal", e).in_file(path))?;
    Ok(decode(&text))
}

fn remove_journal(opener: Option<&dyn Opener>, path: &Path) -> io::Result<()> {
    match remove_file_with(opener, path) {
        Ok(()) if opener.is_none() => sync_dir(path),
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_reads_back_what_was_written_and_a_cut_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal_path(&dir.path().join("mid.qcow2"));
        assert!(journal.ends_with(".mid.qcow2.qimg-remove"));
        let plan = Plan {
            method: RemoveMethod::PullUp,
            backing: Some(PathBuf::from("dir/base\n.qcow2")),
            dependents: vec![PathBuf::from("a.qcow2"), PathBuf::from("b b.qcow2")],
        };
        assert!(write_journal(None, &journal, &plan).unwrap());
        assert_eq!(read_journal(None, &journal).unwrap(), Some(plan.clone()));
        let text = encode(&plan);
        for cut in 0..text.len() {
            assert_eq!(decode(&text.as_bytes()[..cut]), None, "cut at {cut}");
        }
        let mut flipped = text.into_bytes();
        flipped[25] ^= 1;
        assert_eq!(decode(&flipped), None);
        remove_journal(None, &journal).unwrap();
        assert_eq!(read_journal(None, &journal).unwrap(), None);
    }
}
