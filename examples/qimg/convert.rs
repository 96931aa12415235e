//! `qimg convert`: the guest content of an image (through its chain) into a new image.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::{self, ConvertOptions};
use qcow2_engine::{CreateOptions, Error, Format};

use crate::common::{Progress, apply_create_options, open_chain, parse_format, parse_size};

/// Arguments of `qimg convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of SRC (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Output format options, comma-separated `key=value` (may repeat), as `create -o`.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Store clusters compressed (qcow2 output).
    #[arg(short = 'c')]
    compress: bool,
    /// Make DST an overlay on BACKING holding only what differs from it.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of BACKING.
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Zero blocks of this size in data are not written (0: fully allocate).
    #[arg(short = 'S', value_parser = parse_size, default_value = "4k")]
    sparse_size: u64,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Open SRC without taking a lock (qimg never locks; accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Copy the source's persistent bitmaps (qcow2 output).
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps, leave out bitmaps in use (with a warning) instead of failing.
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Source image.
    src: PathBuf,
    /// Destination file (created or truncated).
    dst: PathBuf,
}

/// Turns the arguments into the library's options, refusing what qemu-img refuses.
fn options(args: &Args) -> Result<(CreateOptions, ConvertOptions)> {
    let dst = args.dst.display();
    // The library refuses the formats it recognises but cannot write.
    let format =
        Format::from_name(&args.output_format).map_err(|e| anyhow::anyhow!("{dst}: {e}"))?;
    let mut create = CreateOptions {
        format,
        ..CreateOptions::default()
    };
    apply_create_options(&mut create, &args.options).map_err(|e| anyhow::anyhow!("{dst}: {e}"))?;
    if args.compress && format == Format::Raw {
        bail!("{dst}: Compression not supported for this file format");
    }
    if args.sparse_size % 512 != 0 {
        bail!(
            "invalid sparse size {}: must be a multiple of 512",
            args.sparse_size
        );
    }
    if let Some(backing) = &args.backing {
        if format == Format::Raw {
            bail!("{dst}: raw images cannot have a backing file");
        }
        create.backing_file = Some(backing.clone());
    }
    if args.backing_format.is_some() {
        create.backing_format = args.backing_format;
    }
    if create.backing_file.is_some() && create.backing_format.is_none() {
        bail!("{dst}: Use of backing file requires explicit backing format (use -F FMT)");
    }
    if args.skip_broken_bitmaps && !args.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    let convert = ConvertOptions {
        min_sparse: args.sparse_size,
        compress: args.compress,
        bitmaps: args.bitmaps,
        skip_broken_bitmaps: args.skip_broken_bitmaps,
        ..ConvertOptions::default()
    };
    Ok((create, convert))
}

/// Runs `qimg convert`.
pub fn run(args: Args) -> Result<u8> {
    let (create, options) = options(&args)?;
    let chain = open_chain(&args.src, args.format, args.force_share)?;
    if args.skip_broken_bitmaps {
        if let qcow2_engine::Layer::Qcow2(image) = chain.top() {
            for bitmap in image.bitmaps()?.iter().filter(|b| b.in_use) {
                eprintln!(
                    "qimg: warning: Skipping inconsistent bitmap '{}'",
                    bitmap.name
                );
            }
        }
    }
    let mut progress = Progress::new(args.progress);
    let result = ops::convert(
        &chain,
        &args.dst,
        &create,
        &options,
        &mut progress.callback(),
    );
    progress.finish();
    result.map_err(|e| match e {
        Error::InFile { .. } => e,
        other => other.in_file(&args.dst),
    })?;
    Ok(0)
}
