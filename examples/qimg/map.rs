//! `qimg map`: the allocation map through the chain, as qemu-img map prints it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::{Format, ops};

use crate::common::{Output, open_chain, parse_format, parse_size};

/// Arguments of `qimg map`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Map from this guest offset (qemu-img suffixes).
    #[arg(long = "start-offset", value_name = "OFFSET", value_parser = parse_size)]
    start_offset: Option<u64>,
    /// Map at most this many bytes (qemu-img suffixes).
    #[arg(long = "max-length", value_name = "LENGTH", value_parser = parse_size)]
    max_length: Option<u64>,
    /// The image.
    file: PathBuf,
}

/// Runs `qimg map`.
pub fn run(args: Args) -> Result<u8> {
    let chain = open_chain(&args.file, args.format, args.force_share)?;
    // As qemu-img: from the start offset to the end of the image, or of the maximum
    // length when it ends sooner.
    let start = args.start_offset.unwrap_or(0);
    let end = match args.max_length {
        Some(max) => start.saturating_add(max).min(chain.size()),
        None => chain.size(),
    };
    let entries = || ops::map_range(&chain, start, end.saturating_sub(start));
    match args.output {
        Output::Json => {
            let mut first = true;
            out!("[");
            if start >= end {
                // qemu-img's loop runs once: an empty, unallocated entry at the start.
                out!(
                    "{{ \"start\": {start}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}"
                );
            }
            for entry in entries() {
                let e = entry?;
                // qemu-img's key order, which a json! object would not keep.
                let mut line = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                );
                if let Some(offset) = e.offset {
                    line.push_str(&format!(", \"offset\": {offset}"));
                }
                line.push('}');
                if !first {
                    outln!(",");
                }
                out!("{line}");
                first = false;
            }
            outln!("]");
        }
        Output::Human => {
            outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for entry in entries() {
                let e = entry?;
                if !e.data {
                    continue;
                }
                let Some(offset) = e.offset else {
                    bail!(
                        "{}: File contains external, encrypted or compressed clusters.",
                        args.file.display()
                    );
                };
                if e.zero {
                    continue;
                }
                let file = chain.layers()[e.depth].data_path();
                outln!(
                    "{:<16}{:<16}{:<16}{}",
                    hex(e.start),
                    hex(e.length),
                    hex(offset),
                    file.display()
                );
            }
        }
    }
    Ok(0)
}

/// `%#x` as C prints it: no `0x` before zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
