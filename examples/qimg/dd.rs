//! `qimg dd`: a new image holding a range of an image's guest content, as qemu-img dd
//! (`bs=`, `count=`, `skip=`, `if=`, `of=` operands).

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Format, create};

use crate::common::{chain_defaults, open_chain, parse_format, parse_size};

/// Arguments of `qimg dd`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of IN (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// Format of OUT: raw (default, as qemu-img) or qcow2.
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    output_format: String,
    /// Open IN without QEMU's locks' refusals, as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// `bs=BLOCK_SIZE` (default 512, qemu-img size suffixes), `count=BLOCKS` (copy at
    /// most the first BLOCKS blocks of IN, the skipped ones included, as qemu-img counts
    /// them), `skip=BLOCKS` (start that many blocks into IN), `if=IN`, `of=OUT` (created,
    /// or emptied if it exists).
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The operands, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Operands {
    block_size: Option<u64>,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
}

/// A C `strtoll` number of base 0, as qemu-img reads `count=` and `skip=`: leading
/// blanks, a sign, `0x` hex, a leading `0` octal, else decimal, and nothing after it.
fn parse_integer(text: &str) -> Option<i128> {
    let t = text.trim_start();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (digits, radix) = if let Some(hex) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = i128::from_str_radix(digits, radix).ok()?;
    Some(if negative { -value } else { value })
}

/// `count=` or `skip=`: a block count from 0 to `i64::MAX`, with qemu-img's messages.
fn parse_blocks(name: &str, text: &str) -> Result<u64> {
    match parse_integer(text) {
        Some(n) if (0..=i64::MAX as i128).contains(&n) => Ok(n as u64),
        Some(_) => bail!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        ),
        None => bail!("Invalid {name} specified: '{text}'."),
    }
}

/// `bs=`: a size from 1 to `i32::MAX`, with qemu-img's messages.
fn parse_block_size(text: &str) -> Result<u64> {
    match parse_size(text) {
        Ok(n) if (1..=i32::MAX as u64).contains(&n) => Ok(n),
        Ok(_) => bail!("Invalid bs specified. Must be between 1 and {}.", i32::MAX),
        // Too large for a u64 is out of range too.
        Err(e) if e.contains("too large") => {
            bail!("Invalid bs specified. Must be between 1 and {}.", i32::MAX)
        }
        Err(_) => bail!("Invalid bs specified: '{text}'."),
    }
}

/// Reads the `key=value` operands as qemu-img dd does, the last of each key winning.
fn parse_operands(operands: &[String]) -> Result<Operands> {
    let mut parsed = Operands::default();
    for operand in operands {
        let Some((key, value)) = operand.split_once('=') else {
            bail!("unrecognized operand {operand}");
        };
        match key {
            "bs" => parsed.block_size = Some(parse_block_size(value)?),
            "count" => parsed.count = Some(parse_blocks("count", value)?),
            "skip" => parsed.skip = Some(parse_blocks("skip", value)?),
            "if" => parsed.input = Some(value.into()),
            "of" => parsed.output = Some(value.into()),
            _ => bail!("unrecognized operand {key}"),
        }
    }
    Ok(parsed)
}

/// The guest range of IN that qemu-img dd copies: `count` blocks limit the end (counted
/// from the start of IN), `skip` blocks move the start; `None` when the start lies past
/// the end (an empty OUT, with a warning).
fn copied_range(size: u64, block_size: u64, count: Option<u64>, skip: u64) -> Option<(u64, u64)> {
    let end = match count.and_then(|c| c.checked_mul(block_size)) {
        Some(limit) if limit < size => limit,
        _ => size,
    };
    match skip.checked_mul(block_size) {
        Some(start) if start <= end => Some((start, end)),
        _ => None,
    }
}

/// Runs `qimg dd`.
pub fn run(args: Args) -> Result<u8> {
    let operands = parse_operands(&args.operands)?;
    let (Some(input), Some(output)) = (&operands.input, &operands.output) else {
        bail!("Must specify both input and output files");
    };
    let block_size = operands.block_size.unwrap_or(512);
    let source = open_chain(input, args.format, args.force_share)?;
    let format = Format::from_name(&args.output_format)
        .map_err(|_| anyhow!("Unknown file format '{}'", args.output_format))?;
    let range = copied_range(
        source.size(),
        block_size,
        operands.count,
        operands.skip.unwrap_or(0),
    );
    let (start, end) = range.unwrap_or((0, 0));
    // qemu-img creates OUT in whole sectors.
    let size = (end - start).div_ceil(512) * 512;
    let options = CreateOptions {
        format,
        size: Some(size),
        ..CreateOptions::default()
    };
    create(output, &options).map_err(|e| {
        anyhow!(
            "{}: error while creating output image: {}",
            output.display(),
            e.root()
        )
    })?;
    let out = Chain::open_with(
        output,
        &ChainOptions {
            format: Some(format),
            ..chain_defaults()
        }
        .writable(true),
    )?;
    if range.is_none() {
        // As dd(1): OUT is left empty, and qemu-img says so but succeeds.
        eprintln!("qimg: {}: cannot skip to specified offset", input.display());
    }
    let mut buf = vec![0u8; block_size.min(end - start).max(1) as usize];
    let mut at = start;
    while at < end {
        let n = (end - at).min(block_size) as usize;
        source
            .read_at(&mut buf[..n], at)
            .map_err(|e| anyhow!("error while reading from input image file: {e}"))?;
        out.write_at(&buf[..n], at - start)
            .map_err(|e| anyhow!("error while writing to output image file: {e}"))?;
        at += n as u64;
    }
    out.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_read_as_strtoll_and_sizes_take_suffixes() {
        assert_eq!(parse_integer("0x10"), Some(16));
        assert_eq!(parse_integer("010"), Some(8));
        assert_eq!(parse_integer(" 2"), Some(2));
        assert_eq!(parse_integer("-1"), Some(-1));
        for bad in ["", "2b", "1k", "2.0", "0x", "08"] {
            assert_eq!(parse_integer(bad), None, "{bad}");
        }
        assert_eq!(parse_block_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_block_size("0x400").unwrap(), 1024);
        assert_eq!(
            parse_block_size("0").unwrap_err().to_string(),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            parse_blocks("count", "-1").unwrap_err().to_string(),
            "Invalid count specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            parse_operands(&["foo=1".into()]).unwrap_err().to_string(),
            "unrecognized operand foo"
        );
    }

    #[test]
    fn count_limits_from_the_start_of_the_input_as_qemu_img() {
        // bs=1000 count=3 skip=1 of 4096 bytes: bytes 1000 to 3000.
        assert_eq!(copied_range(4096, 1000, Some(3), 1), Some((1000, 3000)));
        assert_eq!(copied_range(4096, 1000, None, 0), Some((0, 4096)));
        assert_eq!(copied_range(4096, 512, Some(100), 0), Some((0, 4096)));
        assert_eq!(copied_range(4096, 512, Some(2), 5), None);
        assert_eq!(copied_range(4096, 512, None, u64::MAX), None);
        assert_eq!(copied_range(4096, 512, Some(u64::MAX), 0), Some((0, 4096)));
    }
}
