//! `qimg snapshot`: list, create, apply and delete internal snapshots, as qemu-img.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::SnapshotInfo;
use qcow2_engine::{Chain, ChainOptions, Layer};

use crate::info::print_snapshot_list;

/// Arguments of `qimg snapshot`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("action").required(true)))]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l', group = "action")]
    list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME", group = "action")]
    create: Option<String>,
    /// Revert the image to snapshot NAME (a name or an ID).
    #[arg(short = 'a', value_name = "NAME", group = "action")]
    apply: Option<String>,
    /// Delete snapshot NAME (a name or an ID).
    #[arg(short = 'd', value_name = "NAME", group = "action")]
    delete: Option<String>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet (accepted for compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// Runs `qimg snapshot`.
pub fn run(args: Args) -> Result<u8> {
    let _ = args.quiet;
    let chain = Chain::open_with(
        &args.file,
        &ChainOptions {
            writable: !args.list,
            no_backing: true,
            locking: crate::common::locking(args.force_share),
            ..crate::common::chain_defaults()
        },
    )?;
    if !args.list {
        chain.ensure_writable()?;
    }
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    let Layer::Qcow2(image) = chain.top() else {
        bail!("{}: snapshots need a qcow2 image", args.file.display());
    };
    if args.list {
        let snapshots: Vec<SnapshotInfo> = image
            .snapshots()
            .iter()
            .map(SnapshotInfo::from_entry)
            .collect();
        if !snapshots.is_empty() {
            print_snapshot_list(&snapshots);
        }
    } else if let Some(name) = &args.create {
        image.snapshot_create(name)?;
    } else if let Some(name) = &args.apply {
        image.snapshot_apply(name)?;
    } else if let Some(name) = &args.delete {
        image.snapshot_delete(name)?;
    }
    chain.close()?;
    Ok(0)
}
