//! `qimg commit`: push an image's data down into its backing chain, as `qemu-img commit`
//! (and, with `-t`, libvirt's blockcommit of a middle range).

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};

use crate::common::{merge_error, merge_progress, print_already_done, print_dry_run, progress_bar};

/// Arguments of `qimg commit`.
#[derive(clap::Args)]
pub struct Args {
    /// The image to commit into (default: the backing file of TOP); implies `-d`.
    /// Named as qemu-img names a base: as stored in the chain, or a path.
    #[arg(short = 'b')]
    base: Option<String>,
    /// The highest image whose data is committed, below FILE (default: FILE). The image
    /// directly above it is re-pointed at BASE afterwards; FILE's content is unchanged.
    #[arg(short = 't')]
    top: Option<String>,
    /// Keep the committed image's data instead of emptying it.
    #[arg(short = 'd')]
    keep: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Change nothing; print how many bytes of data and of zeros would be copied.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Commit even when images outside the chain use the base and would change.
    #[arg(long)]
    force: bool,
    /// Also look in DIR for images that use the base (besides the directories of the
    /// chain's images); repeatable.
    #[arg(long = "also-in", value_name = "DIR")]
    also_in: Vec<PathBuf>,
    /// The image the command starts from.
    file: PathBuf,
}

/// Runs `qimg commit`.
pub fn run(args: Args) -> Result<u8> {
    let options = CommitOptions {
        base: args.base.map(PathBuf::from),
        top: args.top.map(PathBuf::from),
        keep: args.keep,
        force: args.force,
        also_in: args.also_in,
        merge_bitmaps: false,
        merge: MergeOptions {
            dry_run: args.dry_run,
            chain: crate::common::chain_defaults(),
            ..MergeOptions::default()
        },
    };
    let bar = progress_bar(args.progress && !args.quiet, 0);
    let result = ops::commit(&args.file, &options, &mut merge_progress(&bar));
    bar.finish_and_clear();
    let report = result.map_err(|e| {
        if matches!(e.root(), qcow2_engine::Error::HasDependents { .. }) {
            anyhow::anyhow!("{} (use qimg remove, or --force)", e.report())
        } else {
            merge_error(e, &args.file)
        }
    })?;
    if args.dry_run {
        print_dry_run(&report);
    } else if !args.quiet {
        print_already_done(&report);
        println!("Image committed.");
    }
    Ok(0)
}
