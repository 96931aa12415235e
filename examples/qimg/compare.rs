//! `qimg compare`: whether two images show the same content (exit 0 same, 1 different).

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::ops::{self, Comparison};
use qcow2_engine::{Chain, ChainOptions, Format};

use crate::common::{
    CacheMode, Progress, chain_defaults, locking, parse_format, parse_source_cache,
};

/// Arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Strict: different sizes or allocation status are a mismatch.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Format of A (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format_a: Option<Format>,
    /// Format of B (probed when absent).
    #[arg(short = 'F', value_parser = parse_format)]
    format_b: Option<Format>,
    /// Open read-only sharing the images with every other user, without QEMU's locks'
    /// refusals (they may change while they are read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet: print nothing but errors; the exit code says the verdict (and no progress).
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode for both images (none, writeback, writethrough, directsync, unsafe):
    /// none and directsync read their aligned requests with O_DIRECT, as qemu-img.
    #[arg(short = 'T', long = "cache", value_name = "CACHE", value_parser = parse_source_cache)]
    cache: Option<CacheMode>,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// Runs `qimg compare`.
pub fn run(args: Args) -> Result<u8> {
    let open = |path: &PathBuf, format| {
        Chain::open_with(
            path,
            &ChainOptions {
                format,
                locking: locking(args.force_share),
                opener: args.cache.and_then(CacheMode::opener),
                ..chain_defaults()
            },
        )
    };
    let a = open(&args.a, args.format_a)?;
    let b = open(&args.b, args.format_b)?;
    let mut progress = Progress::new(args.progress && !args.quiet);
    let result = ops::compare(&a, &b, args.strict, &mut progress.callback());
    let common = a.size().min(b.size());
    let result = result.map(|comparison| print_comparison(&comparison, common, args.quiet));
    // qemu-img ends its progress lines after the verdict.
    progress.finish();
    Ok(result?)
}

/// Prints qemu-img's verdict on images whose first `common` bytes both have; returns the
/// exit code (0 same, 1 different). `quiet` (-q): the exit code only.
fn print_comparison(comparison: &Comparison, common: u64, quiet: bool) -> u8 {
    macro_rules! say {
        ($($t:tt)*) => {
            if !quiet {
                outln!($($t)*);
            }
        };
    }
    let sizes_warning = || say!("Warning: Image size mismatch!");
    match *comparison {
        Comparison::Identical { sizes_differ } => {
            if sizes_differ {
                sizes_warning();
            }
            say!("Images are identical.");
            0
        }
        Comparison::ContentMismatch {
            offset,
            sizes_differ,
        } => {
            // qemu-img warns only once the common part compared equal, when it goes on
            // to the part only the longer image has.
            if sizes_differ && offset >= common {
                sizes_warning();
            }
            say!("Content mismatch at offset {offset}!");
            1
        }
        Comparison::SizeMismatch => {
            say!("Strict mode: Image size mismatch!");
            1
        }
        Comparison::BlockStatusMismatch { offset } => {
            say!("Strict mode: Offset {offset} block status mismatch!");
            1
        }
    }
}
