//! `qimg rebase`: give an image another backing file, as `qemu-img rebase` (safe mode
//! keeps what the image shows; `-u` only rewrites the name).

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::Format;
use qcow2_engine::ops::{self, MergeOptions};

use crate::common::{
    CacheMode, Progress, format_as_given, merge_error, parse_cache, parse_format,
    parse_source_cache, print_already_done, print_dry_run,
};

/// Arguments of `qimg rebase`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE (probed when absent); a raw image has no backing file to change.
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode for FILE and its chain (none, writeback, writethrough, directsync,
    /// unsafe), as qemu-img's: none and directsync use O_DIRECT for aligned requests,
    /// writethrough and directsync make each write durable, unsafe skips the flushes.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_parser = parse_cache)]
    cache: Option<CacheMode>,
    /// Cache mode for the backing files, which are only read: accepted as qemu-img's, a
    /// hint.
    #[arg(
        short = 'T',
        long = "backing-cache",
        value_name = "CACHE",
        value_parser = parse_source_cache
    )]
    backing_cache: Option<CacheMode>,
    /// The new backing file, stored as given and opened relative to FILE's directory;
    /// '' removes the backing file.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the new backing file (probed when absent).
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Store the clusters copied into FILE compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Unsafe mode: only rewrite the backing file name, copy nothing.
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_: bool,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing on success (otherwise only an `Already in place:` line).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Change nothing; print how many bytes of data and of zeros would be copied.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Open the new backing file without QEMU's locks' refusals (it may change while it
    /// is read), as qemu-img -U; FILE and its chain are locked as always.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
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
    let _ = args.backing_cache;
    if format_as_given(&args.file, args.format)? == Format::Raw {
        // What qemu-img says of a raw image (probed, or opened with -f raw).
        bail!(
            "{file}: Could not change the backing file to '{}': Operation not supported",
            backing.unwrap_or_default()
        );
    }
    let defaults = MergeOptions::default();
    let options = MergeOptions {
        dry_run: args.dry_run,
        chain: qcow2_engine::ChainOptions {
            opener: args.cache.and_then(CacheMode::opener),
            ..crate::common::chain_defaults()
        },
        checkpoint_bytes: match args.cache {
            Some(cache) if !cache.checkpoints() => 0,
            _ => defaults.checkpoint_bytes,
        },
        compress: args.compress,
        new_backing_locking: args
            .force_share
            .then_some(qcow2_engine::Locking::ForceShare),
        ..defaults
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
