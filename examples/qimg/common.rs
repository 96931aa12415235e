//! Helpers shared by the subcommands: opening chains, parsing sizes, progress bars.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use clap::ValueEnum;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use qcow2_engine::format::CompressionType;
use qcow2_engine::ops::MergeReport;
use qcow2_engine::storage::{CacheOpener, FileCache, Opener};
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

/// Set once stdout is closed (a reader gone, as in `qimg map | head`) or failed: what
/// is printed afterwards is dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// The first error writing stdout other than a closed pipe, reported when the command
/// ends ([`stdout_error`]).
static STDOUT_ERROR: OnceLock<String> = OnceLock::new();

/// Writes to stdout what `outln!` and `out!` print, flushed unless it ends a line (stdout
/// is line-buffered; progress lines end with `\r`). A closed stdout is not an error, as
/// in qemu-img, which ignores SIGPIPE and the failed writes: the command goes on (a
/// commit whose progress reader went away still completes), prints nothing more and
/// exits as it would have. Any other failure is kept for [`stdout_error`].
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let text = std::fmt::format(args);
    let mut stdout = std::io::stdout().lock();
    let mut written = stdout.write_all(text.as_bytes());
    if written.is_ok() && !text.ends_with('\n') {
        written = stdout.flush();
    }
    if let Err(e) = written {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            let _ = STDOUT_ERROR.set(e.to_string());
        }
    }
}

/// Flushes stdout; then the first failure writing it that was not a closed pipe, if any.
pub fn stdout_error() -> Option<String> {
    use std::io::Write;
    if !STDOUT_GONE.load(Ordering::Relaxed) {
        if let Err(e) = std::io::stdout().lock().flush() {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let _ = STDOUT_ERROR.set(e.to_string());
            }
        }
    }
    STDOUT_ERROR.get().cloned()
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

/// A qemu-img cache mode (`-t`/`-T`), as QEMU's `bdrv_parse_cache_mode` reads it. qimg
/// takes them as hints: it writes through the page cache in every mode and flushes at
/// the end of every change; `unsafe` also drops a merge's intermediate checkpoint flushes
/// (see [`CacheMode::checkpoints`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// `none` (or `off`): O_DIRECT in QEMU.
    None,
    /// `writeback`: qemu-img's default for most commands.
    Writeback,
    /// `writethrough`: a flush after every write in QEMU.
    Writethrough,
    /// `directsync`: O_DIRECT and writethrough in QEMU.
    Directsync,
    /// `unsafe`: QEMU ignores flushes.
    Unsafe,
}

impl CacheMode {
    /// Whether a merge flushes at its checkpoints (so that an interrupted run keeps what
    /// it copied): in every mode but `unsafe`, where flushes are what the user gave up.
    pub fn checkpoints(self) -> bool {
        self != CacheMode::Unsafe
    }
}

impl CacheMode {
    /// What the mode asks of the files it applies to, as QEMU's cache modes: `none`
    /// O_DIRECT, `writethrough` each write durable, `directsync` both, `unsafe` no
    /// flushes, `writeback` the page cache as usual.
    pub fn file_cache(self) -> FileCache {
        match self {
            CacheMode::None => FileCache {
                direct: true,
                ..FileCache::default()
            },
            CacheMode::Directsync => FileCache {
                direct: true,
                write_through: true,
                ..FileCache::default()
            },
            CacheMode::Writethrough => FileCache {
                write_through: true,
                ..FileCache::default()
            },
            CacheMode::Unsafe => FileCache {
                no_flush: true,
                ..FileCache::default()
            },
            CacheMode::Writeback => FileCache::default(),
        }
    }

    /// An opener giving the files of a chain this mode; `None` for the default
    /// (writeback), which host files have without one.
    pub fn opener(self) -> Option<Arc<dyn Opener>> {
        let cache = self.file_cache();
        (cache != FileCache::default()).then(|| Arc::new(CacheOpener { cache }) as Arc<dyn Opener>)
    }
}

/// Parses a `-t`/`-T` cache mode; the message is qemu-img's.
pub fn parse_cache(text: &str) -> Result<CacheMode, String> {
    Ok(match text {
        "none" | "off" => CacheMode::None,
        "writeback" => CacheMode::Writeback,
        "writethrough" => CacheMode::Writethrough,
        "directsync" => CacheMode::Directsync,
        "unsafe" => CacheMode::Unsafe,
        _ => return Err(format!("Invalid cache option: {text}")),
    })
}

/// Parses a cache mode for images only read (`-T`); the message is qemu-img's.
pub fn parse_source_cache(text: &str) -> Result<CacheMode, String> {
    parse_cache(text).map_err(|_| format!("Invalid source cache option: {text}"))
}

/// Parses a `-r RATE` rate limit in bytes per second, with the size suffixes; the
/// messages are qemu-img's. 0 means no limit, as in qemu-img.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        ));
    }
    match parse_number(text) {
        Ok(rate) if rate <= i64::MAX as u64 => Ok(rate),
        Ok(_) => Err(format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        )),
        Err(_) => Err(format!("Invalid rate limit specified: '{text}'.")),
    }
}

/// Holds an operation to a rate: [`Throttle::pace`] sleeps until `done` bytes are due at
/// `rate` bytes per second since the throttle started. Driven by progress callbacks, it
/// paces the part of the guest range an operation went through, which bounds what it
/// writes (qemu-img's `-r` counts only what it copies, so qimg is the stricter where an
/// image is sparse).
pub struct Throttle {
    rate: u64,
    start: std::time::Instant,
}

impl Throttle {
    /// A throttle to `rate` bytes per second; `None` for 0, which means no limit.
    pub fn new(rate: u64) -> Option<Throttle> {
        (rate > 0).then(|| Throttle {
            rate,
            start: std::time::Instant::now(),
        })
    }

    /// Sleeps until `done` bytes are due.
    pub fn pace(&self, done: u64) {
        let due = std::time::Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// The format `path` opens as under qemu-img's `-f FMT`, for commands whose library
/// operation probes the format itself: FMT when given (checked by opening the file as
/// FMT where the probe sees another format, so that a mismatch fails as it does for the
/// commands that pass `-f` on: `-f qcow2` on a raw file is refused), else the probed
/// format. `-f raw` on any file gives raw, as in qemu-img, which then sees no backing
/// file and no snapshots.
pub fn format_as_given(path: &Path, given: Option<Format>) -> Result<Format> {
    let probed = Format::for_file(path, None);
    match given {
        None => Ok(probed?),
        Some(format) if format == Format::Raw || probed.as_ref().ok() == Some(&format) => {
            Ok(format)
        }
        Some(format) => {
            let options = ChainOptions {
                format: Some(format),
                no_backing: true,
                locking: Locking::ForceShare,
                ..chain_defaults()
            };
            Chain::open_with(path, &options)?.close()?;
            Ok(format)
        }
    }
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

/// Whether qemu-img's `-o` text asks for the list of options (`help` or `?` among them).
pub fn wants_option_help(texts: &[String]) -> bool {
    texts.iter().any(|text| {
        split_options(text)
            .unwrap_or_default()
            .iter()
            .any(|(key, _)| key == "help" || key == "?")
    })
}

/// The creation options qimg honours for `format`, as qemu-img lists them: name, value
/// type, description.
fn create_option_list(
    format: Format,
    with_file: bool,
) -> Vec<(&'static str, &'static str, &'static str)> {
    const QCOW2: [(&str, &str, &str); 12] = [
        ("backing_file", "str", "File name of a base image"),
        ("backing_fmt", "str", "Image format of the base image"),
        ("cluster_size", "size", "qcow2 cluster size"),
        (
            "compat",
            "str",
            "Compatibility level (v2 [0.10] or v3 [1.1])",
        ),
        (
            "compression_type",
            "str",
            "Compression method used for image cluster compression",
        ),
        ("data_file", "str", "File name of an external data file"),
        (
            "data_file_raw",
            "bool (on/off)",
            "The external data file must stay valid as a raw image",
        ),
        ("extended_l2", "bool (on/off)", "Extended L2 tables"),
        (
            "lazy_refcounts",
            "bool (on/off)",
            "Postpone refcount updates",
        ),
        (
            "preallocation",
            "str",
            "Preallocation mode (allowed values: off, metadata, falloc, full)",
        ),
        (
            "refcount_bits",
            "num",
            "Width of a reference count entry in bits",
        ),
        ("size", "size", "Virtual disk size"),
    ];
    match (format, with_file) {
        (Format::Qcow2, _) => QCOW2.to_vec(),
        (_, false) => vec![("size", "size", "Virtual disk size")],
        (_, true) => vec![
            (
                "preallocation",
                "str",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            ("size", "size", "Virtual disk size"),
        ],
    }
}

/// Prints the creation options of `format` on stdout as qemu-img's `-o help` does: with
/// a target file named, the options of the format and of the file together; without,
/// those of the format and a note that the file has more. Only the options qimg
/// honours are listed (not qemu-img's encryption, `nocow` or `extent_size_hint`).
pub fn print_create_options_help(format: Format, with_file: bool) {
    if with_file {
        outln!("Supported options:");
    } else {
        outln!("Supported {} options:", format.name());
    }
    for (name, kind, description) in create_option_list(format, with_file) {
        outln!("  {:<22} - {description}", format!("{name}=<{kind}>"));
    }
    if !with_file {
        outln!();
        outln!("The protocol level may support further options.");
        outln!("Specify the target filename to include those options.");
    }
}

/// Progress of a long command (`-p`), shown as qemu-img shows it to what reads it: on a
/// terminal, a bar on stderr; otherwise (a pipe, a file) qemu-img's lines on stdout,
/// `    (12.34/100%)` each followed by `\r`, from `0.00` up to `100.00` and then a
/// newline, since tools such as Proxmox parse them from a pipe.
pub struct Progress {
    shown: Shown,
    throttle: Option<Throttle>,
}

enum Shown {
    Nothing,
    Bar(ProgressBar),
    /// The percentage printed last.
    Lines(f32),
}

/// The percentage points a line waits for after the last, as qemu-img's commands pass
/// to `qemu_progress_init` (100 is always printed).
const LINE_STEP: f32 = 1.0;

impl Progress {
    /// Progress shown when `show` (`-p` without `-q`).
    pub fn new(show: bool) -> Progress {
        Progress::shown(show, true)
    }

    /// Progress of a command whose stdout is JSON: a bar on a terminal, no lines.
    pub fn beside_json(show: bool) -> Progress {
        Progress::shown(show, false)
    }

    fn shown(show: bool, lines: bool) -> Progress {
        use std::io::IsTerminal;
        let shown = if !show {
            Shown::Nothing
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {percent:>3}% {bytes}/{total_bytes} {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Shown::Bar(bar)
        } else if lines {
            print_progress_line(0.0);
            Shown::Lines(0.0)
        } else {
            Shown::Nothing
        };
        Progress {
            shown,
            throttle: None,
        }
    }

    /// Also holds the operation to `rate` bytes per second (`-r`; 0: no limit), see
    /// [`Throttle`].
    pub fn throttled(mut self, rate: Option<u64>) -> Progress {
        self.throttle = rate.and_then(Throttle::new);
        self
    }

    /// The operation got to `done` of `total` bytes.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(throttle) = &self.throttle {
            throttle.pace(done);
        }
        match &mut self.shown {
            Shown::Nothing => {}
            Shown::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Shown::Lines(last) => {
                let current = if total == 0 {
                    100.0
                } else {
                    (done as f64 * 100.0 / total as f64).min(100.0) as f32
                };
                if current > *last + LINE_STEP || current == 100.0 {
                    *last = current;
                    print_progress_line(current);
                }
            }
        }
    }

    /// A library progress callback driving this progress (it never cancels).
    pub fn callback(&mut self) -> impl FnMut(u64, u64) -> bool + '_ {
        |done, total| {
            self.update(done, total);
            true
        }
    }

    /// Ends the progress: the bar cleared, or the lines' final newline.
    pub fn finish(self) {
        match self.shown {
            Shown::Nothing => {}
            Shown::Bar(bar) => bar.finish_and_clear(),
            Shown::Lines(_) => outln!(),
        }
    }
}

/// One of qemu-img's progress lines, as its `progress_simple_print` prints it.
fn print_progress_line(percent: f32) {
    out!("    ({percent:.2}/100%)\r");
}

/// A merge's library error, named after `file` unless it already names a file.
pub fn merge_error(error: qcow2_engine::Error, file: &Path) -> anyhow::Error {
    error.in_file(file).into()
}

/// Prints what a dry run of a merge found, on stdout.
pub fn print_dry_run(report: &MergeReport) {
    outln!("Dry run: nothing was changed. The merge would copy:");
    outln!(
        "  data bytes: {} ({})",
        report.data_bytes,
        HumanBytes(report.data_bytes)
    );
    outln!(
        "  zero bytes: {} ({})",
        report.zero_bytes,
        HumanBytes(report.zero_bytes)
    );
    if report.already_done_bytes > 0 {
        outln!(
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
        outln!(
            "Already in place: {} bytes ({}), skipped",
            report.already_done_bytes,
            HumanBytes(report.already_done_bytes)
        );
    }
}

/// Writes `value` as pretty JSON on stdout with a final newline.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("formatting JSON")?;
    outln!("{text}");
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
    fn cache_modes_and_rates_parse_as_qemu_img() {
        assert_eq!(parse_cache("none"), Ok(CacheMode::None));
        assert_eq!(parse_cache("off"), Ok(CacheMode::None));
        assert_eq!(parse_cache("unsafe"), Ok(CacheMode::Unsafe));
        assert_eq!(parse_cache("directsync"), Ok(CacheMode::Directsync));
        assert_eq!(
            parse_cache("fast").unwrap_err(),
            "Invalid cache option: fast"
        );
        assert!(!CacheMode::Unsafe.checkpoints() && CacheMode::Writeback.checkpoints());
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("1M"), Ok(1 << 20));
        assert_eq!(parse_rate("512k"), Ok(512 << 10));
        assert_eq!(
            parse_rate("1x").unwrap_err(),
            "Invalid rate limit specified: '1x'."
        );
        assert_eq!(
            parse_rate("-5").unwrap_err(),
            "Invalid rate limit specified. Must be between 0 and 9223372036854775807."
        );
        assert!(parse_rate("8E").is_err());
    }

    #[test]
    fn a_throttle_holds_to_its_rate() {
        assert!(Throttle::new(0).is_none());
        let throttle = Throttle::new(10 << 20).unwrap();
        throttle.pace(1 << 20);
        // 1 MiB at 10 MiB/s: a tenth of a second at least.
        assert!(throttle.start.elapsed() >= std::time::Duration::from_millis(100));
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
