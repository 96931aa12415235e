//! `qimg checksum`: CRC-32 of an image's guest-visible content through its chain.

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::{Format, ops};
use serde_json::json;

use crate::common::{Output, Progress, open_chain, parse_format, print_json};

/// Arguments of `qimg checksum`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p')]
    progress: bool,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// Runs `qimg checksum`.
pub fn run(args: Args) -> Result<u8> {
    let chain = open_chain(&args.file, args.format, args.force_share)?;
    // JSON alone on stdout: no progress lines there.
    let mut progress = match args.output {
        Output::Json => Progress::beside_json(args.progress),
        Output::Human => Progress::new(args.progress),
    };
    let crc = ops::checksum(&chain, &mut progress.callback());
    progress.finish();
    let crc = crc?;
    match args.output {
        Output::Json => print_json(&json!({
            "algorithm": "crc32",
            "checksum": format!("{crc:08x}"),
            "virtual-size": chain.size(),
        }))?,
        Output::Human => outln!("crc32 {crc:08x} {}", args.file.display()),
    }
    Ok(0)
}
