//! `qimg compare`: whether two images show the same content (exit 0 same, 1 different).

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::Format;
use qcow2_engine::ops::{self, Comparison};

use crate::common::{open_chain, parse_format, progress_bar};

/// Arguments of `qimg compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Strict: different sizes or allocation status are a mismatch.
    #[arg(short = 's')]
    strict: bool,
    /// Show a progress bar.
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
    let bar = progress_bar(args.progress, a.size().max(b.size()));
    let result = ops::compare(&a, &b, args.strict, &mut |done, _| {
        bar.set_position(done);
        true
    });
    bar.finish_and_clear();
    let sizes_warning = || outln!("Warning: Image size mismatch!");
    Ok(match result? {
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
            if sizes_differ && offset >= a.size().min(b.size()) {
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
    })
}
