//! `qimg remove`: delete an external snapshot from a tree of images; every image that used
//! it shows what it showed and uses its backing file instead.

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::ops::{self, MergeOptions, RemoveMethod, RemoveOptions, RemoveReport};

use crate::common::{Progress, merge_error, print_already_done, print_dry_run};

/// Arguments of `qimg remove`.
#[derive(clap::Args)]
pub struct Args {
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// Change nothing; print the plan and how many bytes it would copy.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Keep LAYER's file once no chain uses it.
    #[arg(long)]
    keep: bool,
    /// Also look in DIR for images that use LAYER (besides LAYER's directory);
    /// repeatable.
    #[arg(long = "also-in", value_name = "DIR")]
    also_in: Vec<PathBuf>,
    /// The layer to take out of every chain.
    layer: PathBuf,
}

/// Runs `qimg remove`.
pub fn run(args: Args) -> Result<u8> {
    let options = RemoveOptions {
        keep: args.keep,
        also_in: args.also_in,
        merge: MergeOptions {
            dry_run: args.dry_run,
            chain: crate::common::chain_defaults(),
            ..MergeOptions::default()
        },
    };
    let mut progress = Progress::new(args.progress && !args.quiet);
    let result = ops::remove(&args.layer, &options, &mut progress.callback());
    progress.finish();
    let report = result.map_err(|e| merge_error(e, &args.layer))?;
    if args.dry_run {
        outln!("{}", plan(&args.layer, &report, false));
        print_dry_run(&report.merge);
    } else if !args.quiet {
        print_already_done(&report.merge);
        outln!("{}", plan(&args.layer, &report, true));
    }
    Ok(0)
}

/// One sentence: where the layer's data goes and what its users use afterwards.
fn plan(layer: &std::path::Path, report: &RemoveReport, done: bool) -> String {
    let names = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let backing = report
        .backing
        .as_ref()
        .map_or("no backing file".to_owned(), |b| b.display().to_string());
    let (verb, goes, then) = if done {
        ("Removed", "went", "now use")
    } else {
        ("Removing", "goes", "then use")
    };
    let how = match report.method {
        RemoveMethod::CommitDown => format!("its data {goes} down into {backing}"),
        RemoveMethod::PullUp => format!("its data {goes} up into {}", names(&report.dependents)),
    };
    format!(
        "{verb} {}: {how}; {} {then} {backing}.",
        layer.display(),
        names(&report.dependents)
    )
}
