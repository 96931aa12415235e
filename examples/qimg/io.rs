//! `qimg io`: a subset of qemu-io's commands (for now `read [-P PATTERN] [-q] OFF LEN`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::{Chain, Format};

use crate::common::{open_chain, parse_format, parse_number};

/// Arguments of `qimg io`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// A command to run (repeatable; run in order).
    #[arg(short = 'c', required = true)]
    commands: Vec<String>,
    /// Open without taking a lock (qimg never locks; accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// A parsed `read` command.
struct Read {
    pattern: Option<u8>,
    quiet: bool,
    offset: u64,
    len: u64,
}

/// Runs `qimg io`.
pub fn run(args: Args) -> Result<u8> {
    let _ = args.force_share;
    // Parse every command first, so that a typo fails before anything runs.
    let reads = args
        .commands
        .iter()
        .map(|c| parse_command(c))
        .collect::<Result<Vec<_>>>()?;
    let chain = open_chain(&args.file, args.format)?;
    for read in &reads {
        if !run_read(&chain, read)? {
            return Ok(1);
        }
    }
    Ok(0)
}

fn parse_command(command: &str) -> Result<Read> {
    let mut words = command.split_whitespace();
    match words.next() {
        Some("read") => {}
        Some(other) => bail!("io: command {other:?} is not supported (supported: read)"),
        None => bail!("io: empty command"),
    }
    let mut pattern = None;
    let mut quiet = false;
    let mut positional = Vec::new();
    while let Some(word) = words.next() {
        match word {
            "-P" => {
                let value = words
                    .next()
                    .ok_or_else(|| anyhow!("read: -P needs a pattern"))?;
                let number = parse_number(value).map_err(|e| anyhow!("read: pattern: {e}"))?;
                pattern = Some(
                    u8::try_from(number)
                        .map_err(|_| anyhow!("read: pattern {number} does not fit a byte"))?,
                );
            }
            "-q" => quiet = true,
            flag if flag.starts_with('-') && flag.len() > 1 => {
                bail!("read: option {flag} is not supported")
            }
            value => positional.push(value),
        }
    }
    let [offset, len] = positional[..] else {
        bail!("read: usage: read [-P PATTERN] [-q] OFFSET LENGTH");
    };
    let offset = parse_number(offset).map_err(|e| anyhow!("read: offset {offset:?}: {e}"))?;
    let len = parse_number(len).map_err(|e| anyhow!("read: length {len:?}: {e}"))?;
    Ok(Read {
        pattern,
        quiet,
        offset,
        len,
    })
}

/// Runs one read; `Ok(false)` when pattern verification failed.
fn run_read(chain: &Chain, read: &Read) -> Result<bool> {
    let end = read.offset.checked_add(read.len);
    if end.is_none_or(|end| end > chain.size()) {
        bail!(
            "read: {} bytes at offset {} is past the end of the image ({} bytes)",
            read.len,
            read.offset,
            chain.size()
        );
    }
    let len = usize::try_from(read.len).map_err(|_| anyhow!("read: length too large"))?;
    let mut buf = vec![0u8; len];
    let started = Instant::now();
    chain.read_at(&mut buf, read.offset)?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut ok = true;
    if let Some(p) = read.pattern {
        if buf.iter().any(|&b| b != p) {
            println!(
                "Pattern verification failed at offset {}, {} bytes",
                read.offset, read.len
            );
            ok = false;
        }
    }
    if !read.quiet {
        println!(
            "read {}/{} bytes at offset {}",
            read.len, read.len, read.offset
        );
        let secs = elapsed.max(1e-9);
        println!(
            "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
            cvtstr(read.len as f64),
            elapsed,
            cvtstr(read.len as f64 / secs),
            1.0 / secs
        );
    }
    Ok(ok)
}

/// qemu-io's cvtstr: a size with a binary unit, three decimals unless whole.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 5] = [
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        ((1u64 << 10) as f64, "KiB"),
    ];
    for (scale, unit) in UNITS {
        if value >= scale {
            let text = format!("{:.3}", value / scale);
            let text = text.strip_suffix(".000").unwrap_or(&text).to_string();
            return format!("{text} {unit}");
        }
    }
    let text = format!("{value:.3}");
    format!("{} bytes", text.strip_suffix(".000").unwrap_or(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_commands_parse_offsets_and_patterns() {
        let r = parse_command("read -P 0xab 64k 0x1000").unwrap();
        assert_eq!((r.pattern, r.offset, r.len), (Some(0xab), 65536, 4096));
        assert!(parse_command("write 0 1").is_err());
        assert!(parse_command("read -P 300 0 1").is_err());
        assert!(parse_command("read 0").is_err());
    }

    #[test]
    fn sizes_print_like_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1.0), "1 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
    }
}
