//! `qimg measure`: how large a new image would be, as qemu-img measure computes it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::ops::{self, Measurement};
use qcow2_engine::{CreateOptions, Format};
use serde::Serialize;

use crate::common::{Output, apply_create_options, open_chain, parse_format, parse_size};
use crate::convert::{load_snapshot, parse_snapshot_param};

/// Arguments of `qimg measure`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Format of the new image: raw (default, as qemu-img) or qcow2.
    #[arg(short = 'O', value_parser = parse_format, default_value = "raw")]
    output_format: Format,
    /// Options of the new image, comma-separated `key=value` (may repeat).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure an empty image of this size instead of FILE.
    #[arg(long)]
    size: Option<String>,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Measure FILE's internal snapshot instead of its active image, named as `convert
    /// -l` names it: `snapshot.id=ID`, `snapshot.name=NAME`, or an ID or name.
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAM")]
    snapshot: Option<String>,
    /// The image whose content the new image would hold.
    file: Option<PathBuf>,
}

/// qemu-img measure's JSON object, keys in qemu-img's order.
#[derive(Serialize)]
struct Json {
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<u64>,
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

/// Runs `qimg measure`.
pub fn run(args: Args) -> Result<u8> {
    let mut options = CreateOptions {
        format: args.output_format,
        ..CreateOptions::default()
    };
    apply_create_options(&mut options, &args.options).map_err(|e| anyhow::anyhow!("{e}"))?;
    let size = args
        .size
        .as_deref()
        .map(parse_size)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let m: Measurement = match (&args.file, size) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename"),
        (None, None) => bail!("either --size N or one filename must be specified"),
        (None, Some(size)) => ops::measure_size(size, &options)?,
        (Some(file), None) => {
            let chain = open_chain(file, args.format, args.force_share)?;
            if let Some(param) = &args.snapshot {
                load_snapshot(&chain, &parse_snapshot_param(param)?)?;
            }
            ops::measure_chain(&chain, &options).map_err(|e| e.in_file(file))?
        }
    };
    match args.output {
        Output::Json => {
            let json = Json {
                bitmaps: m.bitmaps,
                required: m.required,
                fully_allocated: m.fully_allocated,
            };
            outln!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Human => {
            outln!("required size: {}", m.required);
            outln!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                outln!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}
