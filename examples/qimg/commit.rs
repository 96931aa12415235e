//! `qimg commit`: push an image's data down into its backing chain, as `qemu-img commit`
//! (and, with `-t`, libvirt's blockcommit of a middle range).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};

use crate::common::{
    find_in_chain, merge_error, merge_progress, open_chain, print_already_done, print_dry_run,
    progress_bar,
};

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
    /// The image the command starts from.
    file: PathBuf,
}

/// Runs `qimg commit`.
pub fn run(args: Args) -> Result<u8> {
    let file = args.file.display().to_string();
    let options = {
        let chain = open_chain(&args.file, None)?;
        let top = match &args.top {
            Some(name) => Some(find_in_chain(&chain, name)?),
            None => None,
        };
        let base = match &args.base {
            Some(name) => Some(find_in_chain(&chain, name)?),
            None => None,
        };
        let index = |p: &Option<PathBuf>| p.as_ref().map(|p| ops::find_layer(&chain, p));
        let top_index = index(&top).transpose()?.unwrap_or(0);
        let base_index = index(&base).transpose()?.unwrap_or(top_index + 1);
        if base_index >= chain.layers().len() {
            let name = chain.layers()[top_index].name().display().to_string();
            bail!("{name}: image does not have a backing file to commit into");
        }
        if base_index <= top_index {
            bail!(
                "{file}: the base ({}) must lie below the top ({}) in the backing chain",
                chain.layers()[base_index].name().display(),
                chain.layers()[top_index].name().display()
            );
        }
        CommitOptions {
            base,
            top,
            keep: args.keep,
            merge: MergeOptions {
                dry_run: args.dry_run,
                chain: crate::common::chain_defaults(),
                ..MergeOptions::default()
            },
        }
    };
    let bar = progress_bar(args.progress && !args.quiet, 0);
    let result = ops::commit(&args.file, &options, &mut merge_progress(&bar));
    bar.finish_and_clear();
    let report = result.map_err(|e| merge_error(e, &args.file))?;
    if args.dry_run {
        print_dry_run(&report);
    } else if !args.quiet {
        print_already_done(&report);
        println!("Image committed.");
    }
    Ok(0)
}
