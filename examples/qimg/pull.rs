//! `qimg pull`: bring the data of an image's backing chain up into it, as libvirt's
//! blockpull; what the image shows does not change.

use std::path::{Path, PathBuf};

use anyhow::Result;
use qcow2_engine::ops::{self, MergeOptions};

use crate::common::{Progress, merge_error, print_already_done, print_dry_run};

/// Arguments of `qimg pull`.
#[derive(clap::Args)]
pub struct Args {
    /// Pull only the layers above BASE, which becomes FILE's backing file (default: pull
    /// everything; FILE ends up with no backing file). Named as stored in the chain, or a
    /// path.
    #[arg(short = 'b')]
    base: Option<String>,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success (otherwise only an `Already in place:` line).
    #[arg(short = 'q')]
    quiet: bool,
    /// Change nothing; print how many bytes of data and of zeros would be copied.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// The image to pull into.
    file: PathBuf,
}

/// Runs `qimg pull`.
pub fn run(args: Args) -> Result<u8> {
    let options = MergeOptions {
        dry_run: args.dry_run,
        chain: crate::common::chain_defaults(),
        ..MergeOptions::default()
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let result = ops::pull(
        &args.file,
        args.base.as_deref().map(Path::new),
        &options,
        &mut progress.callback(),
    );
    progress.finish();
    let report = result.map_err(|e| merge_error(e, &args.file))?;
    if args.dry_run {
        print_dry_run(&report);
    } else if !args.quiet {
        print_already_done(&report);
    }
    Ok(0)
}
