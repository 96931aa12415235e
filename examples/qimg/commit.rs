//! `qimg commit`: push an image's data down into its backing chain, as `qemu-img commit`
//! (and, with `--top`, libvirt's blockcommit of a middle range).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::Format;
use qcow2_engine::ops::{self, CommitOptions, MergeOptions};

use crate::common::{
    CacheMode, Progress, format_as_given, merge_error, parse_cache, parse_format, parse_rate,
    print_already_done, print_dry_run,
};

/// Arguments of `qimg commit`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE (probed when absent); `-f raw` sees no backing file, as qemu-img.
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode for the chain's files (none, writeback, writethrough, directsync,
    /// unsafe), as qemu-img's: none and directsync use O_DIRECT for aligned requests,
    /// writethrough and directsync make each write durable, and `unsafe` skips the
    /// flushes (an interrupted commit then restarts from the beginning).
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_parser = parse_cache)]
    cache: Option<CacheMode>,
    /// I/O rate limit in bytes per second (suffixes k, M, G...; 0: none). qimg paces the
    /// guest range the commit goes through, which bounds what it writes.
    #[arg(short = 'r', long = "rate", value_name = "RATE", value_parser = parse_rate,
          allow_hyphen_values = true)]
    rate: Option<u64>,
    /// The image to commit into (default: the backing file of TOP); implies `-d`.
    /// Named as qemu-img names a base: as stored in the chain, or a path.
    #[arg(short = 'b', long = "base")]
    base: Option<String>,
    /// The highest image whose data is committed, below FILE (default: FILE), named as
    /// libvirt's blockcommit names it. The image directly above it is re-pointed at BASE
    /// afterwards; FILE's content is unchanged.
    #[arg(long = "top", value_name = "TOP")]
    top: Option<String>,
    /// Keep the committed image's data instead of emptying it.
    #[arg(short = 'd', long = "drop")]
    keep: bool,
    /// Show progress (qemu-img's lines on stdout when it is not a terminal).
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q', long = "quiet")]
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
    if format_as_given(&args.file, args.format)? == Format::Raw {
        // What qemu-img says of a raw image (probed, or opened with -f raw).
        bail!(
            "{}: Image does not have a backing file",
            args.file.display()
        );
    }
    let cache = args.cache.unwrap_or(CacheMode::Writeback);
    let defaults = MergeOptions::default();
    let options = CommitOptions {
        base: args.base.map(PathBuf::from),
        top: args.top.map(PathBuf::from),
        keep: args.keep,
        force: args.force,
        also_in: args.also_in,
        merge_bitmaps: false,
        merge: MergeOptions {
            dry_run: args.dry_run,
            chain: qcow2_engine::ChainOptions {
                opener: cache.opener(),
                ..crate::common::chain_defaults()
            },
            checkpoint_bytes: if cache.checkpoints() {
                defaults.checkpoint_bytes
            } else {
                0
            },
            ..defaults
        },
    };
    let mut progress = Progress::new(args.progress && !args.quiet).throttled(args.rate);
    let result = ops::commit(&args.file, &options, &mut progress.callback());
    progress.finish();
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
        outln!("Image committed.");
    }
    Ok(0)
}
