//! Helpers shared by the subcommands: opening chains, parsing sizes, progress bars.

use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use qcow2_engine::{Chain, ChainOptions, Format};

/// `--output=human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// Machine-readable JSON on stdout.
    Json,
}

/// Parses a `-f`/`-F` format name.
pub fn parse_format(name: &str) -> Result<Format, String> {
    Format::from_name(name).map_err(|e| e.to_string())
}

/// Opens `path` and its backing chain; `format` names the top image's format.
pub fn open_chain(path: &Path, format: Option<Format>) -> Result<Chain> {
    let options = ChainOptions {
        format,
        ..ChainOptions::default()
    };
    Ok(Chain::open_with(path, &options)?)
}

/// Parses a size with qemu-img's suffixes (`k`=1024, `M`, `G`, `T`, `P`, `E`; `b` = bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_number(text).map_err(|e| format!("invalid size {text:?}: {e}"))
}

/// Parses an offset or length as qemu-io does: decimal, `0x` hex, or a suffixed size.
pub fn parse_number(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|e| e.to_string());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err("no digits".into());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        other => return Err(format!("unknown suffix {other:?}")),
    };
    let value = if digits.contains('.') {
        let v: f64 = digits.parse().map_err(|_| "not a number".to_string())?;
        let scaled = v * (1u64 << shift) as f64;
        if !scaled.is_finite() || scaled >= u64::MAX as f64 || scaled.fract() != 0.0 {
            return Err("not a whole number of bytes".into());
        }
        scaled as u64
    } else {
        let v: u64 = digits.parse().map_err(|_| "not a number".to_string())?;
        v.checked_mul(1u64 << shift).ok_or("too large")?
    };
    Ok(value)
}

/// A progress bar on stderr for `total` bytes, hidden unless `show`.
pub fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Writes `value` as pretty JSON on stdout with a final newline.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("formatting JSON")?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_number("0x1000"), Ok(4096));
        assert!(parse_size("12q").is_err());
        assert!(parse_size("").is_err());
    }
}
