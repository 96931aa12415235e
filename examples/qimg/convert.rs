//! `qimg convert`: the guest content of an image (through its chain) into a new image.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use qcow2_engine::ops::{self, ConvertOptions};
use qcow2_engine::storage::FileStorage;
use qcow2_engine::{Error, Format};

use crate::common::{open_chain, parse_format, parse_size, progress_bar};

/// Arguments of `qimg convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of SRC (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format (only raw is implemented so far).
    #[arg(short = 'O', default_value = "raw")]
    output_format: String,
    /// Zero blocks of this size in data are left as holes (0: fully allocate).
    #[arg(short = 'S', value_parser = parse_size, default_value = "4k")]
    sparse_size: u64,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Open SRC without taking a lock (qimg never locks; accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image.
    src: PathBuf,
    /// Destination file (created or truncated).
    dst: PathBuf,
}

/// Runs `qimg convert`.
pub fn run(args: Args) -> Result<u8> {
    let _ = args.force_share;
    match args.output_format.as_str() {
        "raw" => {}
        "qcow2" => bail!(
            "{}: writing qcow2 (convert -O qcow2) is not implemented yet",
            args.dst.display()
        ),
        other => bail!("{}: unknown output format {other:?}", args.dst.display()),
    }
    if args.sparse_size % 512 != 0 {
        bail!(
            "invalid sparse size {}: must be a multiple of 512",
            args.sparse_size
        );
    }
    let chain = open_chain(&args.src, args.format)?;
    let out = FileStorage::create(&args.dst)
        .with_context(|| format!("{}: could not create", args.dst.display()))?;
    let options = ConvertOptions {
        min_sparse: args.sparse_size,
        ..ConvertOptions::default()
    };
    let bar = progress_bar(args.progress, chain.size());
    let result = ops::convert_to_raw(&chain, &out, &options, &mut |done, _| {
        bar.set_position(done);
        true
    });
    bar.finish_and_clear();
    result.map_err(|e| match e {
        Error::InFile { .. } => e,
        other => other.in_file(&args.dst),
    })?;
    Ok(0)
}
