//! Helpers shared by the subcommands: opening chains, parsing sizes, progress bars.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use clap::ValueEnum;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use qcow2_engine::format::CompressionType;
use qcow2_engine::ops::MergeReport;
use qcow2_engine::{
    BackingPolicy, Chain, ChainOptions, Compat, CreateOptions, Format, Locking, Preallocation,
};

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

/// The backing policy of `--confine-backing` and `--regular-backing-only`, set once
/// before any command runs (global options, so a static rather than an argument threaded
/// through every command).
static BACKING_POLICY: OnceLock<BackingPolicy> = OnceLock::new();

/// Records the backing policy the command line asked for.
pub fn set_backing_policy(policy: BackingPolicy) {
    let _ = BACKING_POLICY.set(policy);
}

/// The backing policy in force (by default none: every backing file opens, as in
/// qemu-img).
pub fn backing_policy() -> BackingPolicy {
    BACKING_POLICY.get().cloned().unwrap_or_default()
}

/// The library's default chain options with the command line's backing policy; commands
/// that open chains start from these.
pub fn chain_defaults() -> ChainOptions {
    ChainOptions {
        backing_policy: backing_policy(),
        ..ChainOptions::default()
    }
}

/// How a command locks what it opens: QEMU's locks, or none of their refusals with `-U`.
pub fn locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::On
    }
}

/// Opens `path` and its backing chain read-only; `format` names the top image's format.
pub fn open_chain(path: &Path, format: Option<Format>, force_share: bool) -> Result<Chain> {
    let options = ChainOptions {
        format,
        locking: locking(force_share),
        ..chain_defaults()
    };
    Ok(Chain::open_with(path, &options)?)
}

/// Makes a failed write to stdout (a closed pipe, as in `qimg map | head`) end qimg with
/// one line on stderr and exit code 1, instead of the panic that `println!` raises.
pub fn report_broken_pipe_as_an_error() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(cause) = message.strip_prefix("failed printing to stdout: ") {
            eprintln!("qimg: stdout: {cause}");
            std::process::exit(1);
        }
        default(info);
    }));
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

/// Splits qemu-img's `-o` text into `key=value` pairs: comma-separated, `,,` for a literal
/// comma; a key without `=` is a flag (`on`).
pub fn split_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
        .into_iter()
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Ok((item, "on".to_owned())),
        })
        .collect()
}

/// Parses an on/off option value as qemu-img does.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "parameter '{key}' expects 'on' or 'off', not {value:?}"
        )),
    }
}

/// Applies qemu-img `-o` options (each argument comma-separated `key=value`s) for the
/// format `options.format` onto `options`. Unknown keys, and qcow2 keys for raw images,
/// are refused like qemu-img refuses them: `Invalid parameter 'KEY'`.
pub fn apply_create_options(options: &mut CreateOptions, texts: &[String]) -> Result<(), String> {
    for text in texts {
        for (key, value) in split_options(text)? {
            let raw_ok = matches!(key.as_str(), "size" | "preallocation");
            if options.format == Format::Raw && !raw_ok {
                return Err(format!("Invalid parameter '{key}' for format 'raw'"));
            }
            let bad = |e: String| format!("parameter '{key}': {e}");
            match key.as_str() {
                "size" => options.size = Some(parse_size(&value)?),
                "cluster_size" => options.cluster_size = parse_size(&value)?,
                "refcount_bits" => {
                    options.refcount_bits = value
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a number")))?
                }
                "compat" => {
                    options.compat = Compat::from_name(&value).map_err(|e| bad(e.to_string()))?
                }
                "extended_l2" => options.extended_l2 = parse_bool(&key, &value)?,
                "lazy_refcounts" => options.lazy_refcounts = parse_bool(&key, &value)?,
                "compression_type" => {
                    options.compression_type = match value.as_str() {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        other => {
                            return Err(bad(format!("{other:?} is not one of zlib, zstd")));
                        }
                    }
                }
                "data_file" => options.data_file = Some(value),
                "data_file_raw" => options.data_file_raw = parse_bool(&key, &value)?,
                "preallocation" => {
                    options.preallocation =
                        Preallocation::from_name(&value).map_err(|e| bad(e.to_string()))?
                }
                "backing_file" => options.backing_file = Some(value),
                "backing_fmt" => options.backing_format = Some(parse_format(&value).map_err(bad)?),
                _ => return Err(format!("Invalid parameter '{key}'")),
            }
        }
    }
    Ok(())
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

/// The progress callback of a merge, driving `bar`.
pub fn merge_progress(bar: &ProgressBar) -> impl FnMut(u64, u64) -> bool + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
        true
    }
}

/// A merge's library error, named after `file` unless it already names a file.
pub fn merge_error(error: qcow2_engine::Error, file: &Path) -> anyhow::Error {
    error.in_file(file).into()
}

/// Prints what a dry run of a merge found, on stdout.
pub fn print_dry_run(report: &MergeReport) {
    println!("Dry run: nothing was changed. The merge would copy:");
    println!(
        "  data bytes: {} ({})",
        report.data_bytes,
        HumanBytes(report.data_bytes)
    );
    println!(
        "  zero bytes: {} ({})",
        report.zero_bytes,
        HumanBytes(report.zero_bytes)
    );
    if report.already_done_bytes > 0 {
        println!(
            "  already in place: {} ({}), left alone",
            report.already_done_bytes,
            HumanBytes(report.already_done_bytes)
        );
    }
}

/// Says, on stdout, how much of a merge was in place already (what an earlier, interrupted
/// run copied, or what the destination held equal); nothing when that is nothing.
pub fn print_already_done(report: &MergeReport) {
    if report.already_done_bytes > 0 {
        println!(
            "Already in place: {} bytes ({}), skipped",
            report.already_done_bytes,
            HumanBytes(report.already_done_bytes)
        );
    }
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

    #[test]
    fn options_split_on_single_commas() {
        let pairs = split_options("cluster_size=4k,data_file=a,,b,lazy_refcounts").unwrap();
        assert_eq!(
            pairs,
            vec![
                ("cluster_size".into(), "4k".into()),
                ("data_file".into(), "a,b".into()),
                ("lazy_refcounts".into(), "on".into()),
            ]
        );
    }

    #[test]
    fn unknown_option_keys_are_refused() {
        let mut options = CreateOptions::default();
        let err = apply_create_options(&mut options, &["foo=1".into()]).unwrap_err();
        assert_eq!(err, "Invalid parameter 'foo'");
    }
}
