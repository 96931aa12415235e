//! `qimg check`: consistency check and repair of one qcow2 image, as `qemu-img check`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::{CheckReport, Format, Image, ImageOptions, RepairMode, Severity};
use serde_json::{Map, Value, json};

use crate::common::{CacheMode, Output, parse_format, parse_source_cache, print_json};

/// `-r leaks|all`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Repair {
    /// Fix leaked clusters only.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

/// Arguments of `qimg check`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Repair what the check finds.
    #[arg(short = 'r', value_enum)]
    repair: Option<Repair>,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Cache mode (none, writeback, writethrough, directsync, unsafe): none and
    /// directsync read FILE's aligned requests with O_DIRECT, as qemu-img check -T.
    #[arg(short = 'T', long = "cache", value_name = "CACHE", value_parser = parse_source_cache)]
    cache: Option<CacheMode>,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Suppress the summary (qemu-img's -q).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// qemu-img's exit code for a format without checks.
const NOT_SUPPORTED: u8 = 63;

/// Runs `qimg check`.
pub fn run(args: Args) -> Result<u8> {
    let opener = args.cache.and_then(CacheMode::opener);
    if Format::for_file(&args.file, args.format)? == Format::Raw {
        eprintln!(
            "qimg: {}: this image format does not support checks",
            args.file.display()
        );
        return Ok(NOT_SUPPORTED);
    }
    let report = match args.repair {
        None => {
            let options = ImageOptions {
                locking: crate::common::locking(args.force_share),
                opener,
                ..ImageOptions::default()
            };
            Image::open_for_check(&args.file, &options)?.check()?
        }
        Some(mode) => {
            if args.force_share {
                bail!("{}: -U cannot be used with -r", args.file.display());
            }
            let mode = match mode {
                Repair::Leaks => RepairMode::Leaks,
                Repair::All => RepairMode::All,
            };
            let options = ImageOptions {
                opener,
                ..ImageOptions::default()
            };
            Image::open_for_repair_with(&args.file, &options)?.repair(mode)?
        }
    };
    // As qemu-img: what the repair pass found and did, then what the double check finds,
    // which runs only when something was fixed.
    let fixed = report.leaks_fixed > 0 || report.corruptions_fixed > 0;
    let double_check = args.repair.is_none() || fixed;
    let shown = report
        .repair_log
        .iter()
        .chain(report.findings.iter().filter(|_| double_check));
    for finding in shown {
        let tag = match finding.severity {
            Severity::Corruption => "ERROR",
            Severity::Leak => "Leaked",
            Severity::CheckError => "ERROR",
            Severity::Repaired => "Repairing",
        };
        eprintln!("{tag} {}", finding.message);
    }
    if report.findings_omitted > 0 {
        eprintln!("... and {} more findings", report.findings_omitted);
    }
    match args.output {
        Output::Json => print_json(&json_report(&report, &args.file))?,
        Output::Human if !args.quiet => print_human(&report),
        Output::Human => {}
    }
    Ok(report.exit_code() as u8)
}

/// qemu-img's JSON: `check-errors` always, every other counter only when non-zero.
fn json_report(report: &CheckReport, file: &std::path::Path) -> Value {
    let mut map = Map::new();
    map.insert("filename".into(), json!(file.display().to_string()));
    map.insert("format".into(), json!("qcow2"));
    map.insert("check-errors".into(), json!(report.check_errors));
    for (key, value) in [
        ("corruptions", report.corruptions),
        ("leaks", report.leaks),
        ("corruptions-fixed", report.corruptions_fixed),
        ("leaks-fixed", report.leaks_fixed),
    ] {
        if value > 0 {
            map.insert(key.into(), json!(value));
        }
    }
    // qemu-img leaves out every counter that is zero.
    for (key, value) in [
        ("image-end-offset", report.image_end_offset),
        ("total-clusters", report.total_clusters),
        ("allocated-clusters", report.allocated_clusters),
        ("fragmented-clusters", report.fragmented_clusters),
        ("compressed-clusters", report.compressed_clusters),
    ] {
        if value > 0 {
            map.insert(key.into(), json!(value));
        }
    }
    Value::Object(map)
}

fn print_human(report: &CheckReport) {
    if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
        outln!("The following inconsistencies were found and repaired:\n");
        outln!("    {} leaked clusters", report.leaks_fixed);
        outln!("    {} corruptions\n", report.corruptions_fixed);
        outln!("Double checking the fixed image now...");
    }
    if report.is_clean() {
        outln!("No errors were found on the image.");
    }
    if report.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it.",
            report.corruptions
        );
    }
    if report.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image.\n\
             This means waste of disk space, but no harm to data.",
            report.leaks
        );
    }
    if report.check_errors > 0 {
        outln!(
            "\n{} internal errors have occurred during the check.",
            report.check_errors
        );
    }
    // As qemu-img: no cluster line for an image that allocates nothing.
    if report.total_clusters > 0 && report.allocated_clusters > 0 {
        let pct = |n: u64, of: u64| {
            if of == 0 {
                0.0
            } else {
                n as f64 * 100.0 / of as f64
            }
        };
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            pct(report.allocated_clusters, report.total_clusters),
            pct(report.fragmented_clusters, report.allocated_clusters),
            pct(report.compressed_clusters, report.allocated_clusters),
        );
    }
    outln!("Image end offset: {}", report.image_end_offset);
}
