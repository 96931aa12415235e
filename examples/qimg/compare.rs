//! `qimg compare`: whether two images show the same content (exit 0 same, 1 different).

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::Format;
use qcow2_engine::ops::{self, Comparison};

use crate::common::{Progress, open_chain, parse_format};

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
    /// Open without taking locks (qimg never locks; accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// Runs `qimg compare`.
pub fn run(args: Args) -> Result<u8> {
    let a = open_chain(&args.a, args.format_a, args.force_share)?;
    let b = open_chain(&args.b, args.format_b, args.force_share)?;
    let mut progress = Progress::new(args.progress);
    let result = ops::compare(&a, &b, args.strict, &mut progress.callback());
    let common = a.size().min(b.size());
    let result = result.map(|comparison| print_comparison(&comparison, common));
    // qemu-img ends its progress lines after the verdict.
    progress.finish();
    Ok(result?)
}

/// Prints qemu-img's verdict on images whose first `common` bytes both have; returns the
/// exit code (0 same, 1 different).
fn print_comparison(comparison: &Comparison, common: u64) -> u8 {
    let sizes_warning = || outln!("Warning: Image size mismatch!");
    match *comparison {
        Comparison::Identical { sizes_differ } => {
            if sizes_differ {
                sizes_warning();
            }
            outln!("Images are identical.");
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
            outln!("Content mismatch at offset {offset}!");
            1
        }
        Comparison::SizeMismatch => {
            outln!("Strict mode: Image size mismatch!");
            1
        }
        Comparison::BlockStatusMismatch { offset } => {
            outln!("Strict mode: Offset {offset} block status mismatch!");
            1
        }
    }
}
