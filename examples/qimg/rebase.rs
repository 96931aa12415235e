//! `qimg rebase`: give an image another backing file, as `qemu-img rebase` (safe mode
//! keeps what the image shows; `-u` only rewrites the name).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::Format;
use qcow2_engine::ops::{self, MergeOptions};

use crate::common::{Progress, merge_error, parse_format, print_already_done, print_dry_run};

/// Arguments of `qimg rebase`.
#[derive(clap::Args)]
pub struct Args {
    /// The new backing file, stored as given and opened relative to FILE's directory;
    /// '' removes the backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the new backing file (probed when absent).
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Unsafe mode: only rewrite the backing file name, copy nothing.
    #[arg(short = 'u')]
    unsafe_: bool,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success (otherwise only an `Already in place:` line).
    #[arg(short = 'q')]
    quiet: bool,
    /// Change nothing; print how many bytes of data and of zeros would be copied.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// The image to rebase.
    file: PathBuf,
}

/// Runs `qimg rebase`.
pub fn run(args: Args) -> Result<u8> {
    let file = args.file.display().to_string();
    // As qemu-img: -u without -b removes the backing file; safe mode needs -b.
    if args.backing.is_none() && !args.unsafe_ {
        bail!("{file}: must specify a backing file (-b) or use unsafe mode (-u)");
    }
    let backing = args.backing.as_deref().filter(|b| !b.is_empty());
    if backing.is_none() && args.backing_format.is_some() {
        bail!("{file}: -F needs a backing file (-b)");
    }
    let options = MergeOptions {
        dry_run: args.dry_run,
        chain: crate::common::chain_defaults(),
        ..MergeOptions::default()
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let result = ops::rebase(
        &args.file,
        backing,
        args.backing_format.map(Format::name),
        args.unsafe_,
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
