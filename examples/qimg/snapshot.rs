//! `qimg snapshot`: list, create, apply and delete internal snapshots, as qemu-img.
//!
//! Names are resolved as qemu-img 10 resolves them: `-a` takes an ID first, then a name
//! (the qcow2 driver's lookup); `-d` takes the first snapshot with that name only, never
//! an ID (`-d 1` deletes the snapshot named "1", and fails when there is none even if
//! there is one whose ID is 1); `-c` may repeat a name (each snapshot gets a new ID).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::SnapshotInfo;
use qcow2_engine::{Chain, ChainOptions, Format, Layer};

use crate::common::{format_as_given, parse_format};
use crate::info::print_snapshot_list;

/// Arguments of `qimg snapshot`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("action").multiple(false)))]
pub struct Args {
    /// List the snapshots (also what qimg does without an action).
    #[arg(short = 'l', long = "list", group = "action")]
    list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', long = "create", value_name = "NAME", group = "action")]
    create: Option<String>,
    /// Revert the image to snapshot NAME (an ID, else a name).
    #[arg(short = 'a', long = "apply", value_name = "NAME", group = "action")]
    apply: Option<String>,
    /// Delete the first snapshot named NAME.
    #[arg(short = 'd', long = "delete", value_name = "NAME", group = "action")]
    delete: Option<String>,
    /// Format of FILE (probed when absent); a raw image has no snapshots.
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet (accepted: qemu-img prints nothing on success either).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// What `qimg snapshot` does.
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Runs `qimg snapshot`.
pub fn run(args: Args) -> Result<u8> {
    let _ = args.quiet;
    let file = args.file.display().to_string();
    let action = match (args.create, args.apply, args.delete) {
        (Some(name), _, _) => Action::Create(name),
        (_, Some(name), _) => Action::Apply(name),
        (_, _, Some(name)) => Action::Delete(name),
        _ => Action::List,
    };
    let format = format_as_given(&args.file, args.format)?;
    if format == Format::Raw {
        // qemu-img lists no snapshots for a raw image and cannot change any.
        return match action {
            Action::List => Ok(0),
            Action::Create(name) => {
                bail!("{file}: Could not create snapshot '{name}': Operation not supported")
            }
            Action::Apply(name) => {
                bail!("{file}: Could not apply snapshot '{name}': Operation not supported")
            }
            Action::Delete(name) => {
                bail!("{file}: Could not delete snapshot '{name}': Operation not supported")
            }
        };
    }
    let writable = !matches!(action, Action::List);
    let chain = Chain::open_with(
        &args.file,
        &ChainOptions {
            format: Some(format),
            writable,
            no_backing: true,
            locking: crate::common::locking(args.force_share),
            ..crate::common::chain_defaults()
        },
    )?;
    if writable {
        chain.ensure_writable()?;
    }
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    let Layer::Qcow2(image) = chain.top() else {
        bail!("{file}: snapshots need a qcow2 image");
    };
    match &action {
        Action::List => {
            let snapshots: Vec<SnapshotInfo> = image
                .snapshots()
                .iter()
                .map(SnapshotInfo::from_entry)
                .collect();
            if !snapshots.is_empty() {
                print_snapshot_list(&snapshots);
            }
        }
        Action::Create(name) => {
            image.snapshot_create(name)?;
        }
        Action::Apply(name) => image.snapshot_apply(name)?,
        Action::Delete(name) => {
            let snapshots = image.snapshots();
            let Some(index) = snapshots.iter().position(|s| &s.name == name) else {
                bail!("{file}: Could not delete snapshot '{name}': snapshot not found");
            };
            // The library takes an ID before a name: the snapshot's own ID names it,
            // unless an earlier entry of a damaged table has the same ID.
            let id = snapshots[index].id.clone();
            if snapshots.iter().position(|s| s.id == id) != Some(index) {
                bail!("{file}: Could not delete snapshot '{name}': its ID {id} is not unique");
            }
            image.snapshot_delete(&id)?;
        }
    }
    chain.close()?;
    Ok(0)
}
