//! `qimg resize`: change an image's virtual size, as qemu-img resize.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::{Chain, ChainOptions, Format, Preallocation};

use crate::common::{parse_format, parse_size};

/// Arguments of `qimg resize`.
#[derive(clap::Args)]
pub struct Args {
    /// Allow the new size to be smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// How the area the image grows by takes disk space, as qemu-img: off (a hole),
    /// metadata (qcow2 only: clusters mapped over holes), falloc (reserved), full (zeros
    /// written). Growing only.
    #[arg(long, value_name = "MODE", value_parser = parse_preallocation)]
    preallocation: Option<Preallocation>,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
    /// The new size, or `+SIZE`/`-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// A new size as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// This many bytes.
    Absolute(u64),
    /// The current size plus this many bytes.
    Grow(u64),
    /// The current size minus this many bytes.
    Shrink(u64),
}

/// Parses `--preallocation` with qemu-img's message.
fn parse_preallocation(text: &str) -> Result<Preallocation, String> {
    Preallocation::from_name(text).map_err(|_| format!("Invalid preallocation mode '{text}'"))
}

fn parse_new_size(text: &str) -> Result<NewSize, String> {
    if let Some(rest) = text.strip_prefix('+') {
        parse_size(rest).map(NewSize::Grow)
    } else if let Some(rest) = text.strip_prefix('-') {
        parse_size(rest).map(NewSize::Shrink)
    } else {
        parse_size(text).map(NewSize::Absolute)
    }
}

impl NewSize {
    /// The new size in bytes for an image of `current` bytes; qemu-img's rule: it must be
    /// positive.
    fn resolve(self, current: u64) -> Result<u64> {
        let size = match self {
            NewSize::Absolute(n) => Some(n),
            NewSize::Grow(n) => current.checked_add(n),
            NewSize::Shrink(n) => current.checked_sub(n),
        };
        match size {
            Some(n) if n > 0 && n <= i64::MAX as u64 => Ok(n),
            Some(n) if n > 0 => bail!("new image size {n} is too large"),
            _ => bail!("new image size must be positive"),
        }
    }
}

/// Runs `qimg resize`.
pub fn run(args: Args) -> Result<u8> {
    // Checked before the image is opened, as one line (not clap's usage text).
    let requested =
        parse_new_size(&args.size).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let options = ChainOptions {
        format: args.format,
        writable: true,
        ..crate::common::chain_defaults()
    };
    let chain = Chain::open_with(&args.file, &options)?;
    chain.ensure_writable()?;
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    let current = chain.size();
    let new_size = requested
        .resolve(current)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if new_size < current && !args.shrink {
        bail!(
            "{}: use the --shrink option to shrink the image from {current} to {new_size} \
             bytes (shrinking deletes all data past the new end)",
            args.file.display()
        );
    }
    let resized = chain.resize_preallocated(
        new_size,
        args.shrink,
        args.preallocation.unwrap_or_default(),
    );
    let closed = chain.close();
    resized?;
    closed?;
    if !args.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_may_be_relative() {
        assert_eq!(parse_new_size("1M"), Ok(NewSize::Absolute(1 << 20)));
        assert_eq!(parse_new_size("+64k"), Ok(NewSize::Grow(65536)));
        assert_eq!(parse_new_size("-512"), Ok(NewSize::Shrink(512)));
        assert!(parse_new_size("+abc").is_err());
        assert!(parse_new_size("--1M").is_err());
    }

    #[test]
    fn the_new_size_must_be_positive() {
        assert_eq!(NewSize::Grow(512).resolve(1024).unwrap(), 1536);
        assert_eq!(NewSize::Shrink(512).resolve(1024).unwrap(), 512);
        assert!(NewSize::Shrink(1024).resolve(1024).is_err());
        assert!(NewSize::Shrink(4096).resolve(1024).is_err());
        assert!(NewSize::Absolute(0).resolve(1024).is_err());
        assert!(NewSize::Grow(u64::MAX).resolve(1024).is_err());
    }
}
