//! `qimg info`: facts about an image, as qemu-img info prints them.

use std::path::PathBuf;

use anyhow::Result;
use qcow2_engine::ops::{self, ImageInfo, SnapshotInfo};
use qcow2_engine::{BitmapInfo, ChainOptions, Format};
use serde::Serialize;

use crate::common::{Output, parse_format};

/// Arguments of `qimg info`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Show every image of the backing chain, top first.
    #[arg(long)]
    backing_chain: bool,
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

/// Runs `qimg info`.
pub fn run(args: Args) -> Result<u8> {
    let options = ChainOptions {
        format: args.format,
        // Like qemu-img, a single image's facts do not need its backing file to exist.
        no_backing: !args.backing_chain,
        locking: crate::common::locking(args.force_share),
        ..crate::common::chain_defaults()
    };
    let infos = ops::open_info(&args.file, &options)?;
    match args.output {
        Output::Json => {
            let json: Vec<JsonInfo> = infos.iter().map(JsonInfo::from).collect();
            let text = if args.backing_chain {
                serde_json::to_string_pretty(&json)?
            } else {
                serde_json::to_string_pretty(&json[0])?
            };
            outln!("{text}");
        }
        Output::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    outln!();
                }
                print_human(info);
            }
        }
    }
    Ok(0)
}

/// qemu-img info's JSON object, keys in the order qemu-img prints them.
#[derive(Serialize)]
struct JsonInfo {
    children: Vec<JsonChild>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<JsonSnapshot>,
    #[serde(rename = "virtual-size", skip_serializing_if = "Option::is_none")]
    virtual_size: Option<u64>,
    filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<JsonFormatSpecific>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

/// The protocol (file) node qemu-img lists under `children`.
#[derive(Serialize)]
struct JsonChild {
    name: &'static str,
    info: JsonFileInfo,
}

#[derive(Serialize)]
struct JsonFileInfo {
    children: Vec<JsonChild>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    format: &'static str,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(rename = "format-specific")]
    format_specific: JsonFileSpecific,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

#[derive(Serialize)]
struct JsonFileSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct JsonSnapshot {
    #[serde(skip_serializing_if = "Option::is_none")]
    icount: Option<u64>,
    #[serde(rename = "vm-clock-nsec")]
    vm_clock_nsec: u64,
    name: String,
    #[serde(rename = "date-sec")]
    date_sec: u32,
    #[serde(rename = "date-nsec")]
    date_nsec: u32,
    #[serde(rename = "vm-clock-sec")]
    vm_clock_sec: u64,
    id: String,
    #[serde(rename = "vm-state-size")]
    vm_state_size: u64,
}

#[derive(Serialize)]
struct JsonFormatSpecific {
    #[serde(rename = "type")]
    kind: &'static str,
    data: JsonQcow2,
}

#[derive(Serialize)]
struct JsonQcow2 {
    compat: &'static str,
    #[serde(rename = "compression-type")]
    compression_type: &'static str,
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bitmaps: Vec<JsonBitmap>,
    #[serde(rename = "refcount-bits")]
    refcount_bits: u32,
    #[serde(rename = "data-file", skip_serializing_if = "Option::is_none")]
    data_file: Option<String>,
    #[serde(rename = "data-file-raw", skip_serializing_if = "Option::is_none")]
    data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// One persistent bitmap, as qemu-img lists it.
#[derive(Serialize)]
struct JsonBitmap {
    flags: Vec<&'static str>,
    name: String,
    granularity: u64,
}

impl From<&BitmapInfo> for JsonBitmap {
    fn from(b: &BitmapInfo) -> JsonBitmap {
        JsonBitmap {
            flags: bitmap_flags(b),
            name: b.name.clone(),
            granularity: b.granularity,
        }
    }
}

/// The flags qemu-img shows, in its order.
fn bitmap_flags(b: &BitmapInfo) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.enabled {
        flags.push("auto");
    }
    flags
}

impl From<&ImageInfo> for JsonInfo {
    fn from(info: &ImageInfo) -> JsonInfo {
        let filename = info.filename.display().to_string();
        JsonInfo {
            children: vec![JsonChild {
                name: "file",
                info: JsonFileInfo {
                    children: Vec::new(),
                    // The protocol layer counts whole 512-byte sectors.
                    virtual_size: info.file_length.div_ceil(512) * 512,
                    filename: filename.clone(),
                    format: "file",
                    actual_size: info.actual_size,
                    format_specific: JsonFileSpecific {
                        kind: "file",
                        data: serde_json::Map::new(),
                    },
                    dirty_flag: false,
                },
            }],
            backing_filename_format: info.backing_filename_format.clone(),
            snapshots: info.snapshots.iter().map(JsonSnapshot::from).collect(),
            virtual_size: info.virtual_size,
            filename,
            cluster_size: info.cluster_size,
            format: info.format.name(),
            actual_size: info.actual_size,
            format_specific: info.qcow2.as_ref().map(|q| {
                let v3 = q.is_v3();
                JsonFormatSpecific {
                    kind: "qcow2",
                    data: JsonQcow2 {
                        compat: q.compat,
                        compression_type: q.compression_type,
                        lazy_refcounts: v3.then_some(q.lazy_refcounts),
                        bitmaps: q.bitmaps.iter().map(JsonBitmap::from).collect(),
                        refcount_bits: q.refcount_bits,
                        data_file: q.data_file.clone(),
                        data_file_raw: q.data_file.as_ref().map(|_| q.data_file_raw),
                        corrupt: v3.then_some(q.corrupt),
                        extended_l2: v3.then_some(q.extended_l2),
                    },
                }
            }),
            full_backing_filename: info
                .full_backing_filename
                .as_ref()
                .map(|p| p.display().to_string()),
            backing_filename: info.backing_filename.clone(),
            dirty_flag: info.dirty,
        }
    }
}

impl From<&SnapshotInfo> for JsonSnapshot {
    fn from(s: &SnapshotInfo) -> JsonSnapshot {
        JsonSnapshot {
            icount: s.icount,
            vm_clock_nsec: s.vm_clock_nsec,
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_sec,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

fn print_human(info: &ImageInfo) {
    outln!("image: {}", info.filename.display());
    outln!("file format: {}", info.format.name());
    if let Some(size) = info.virtual_size {
        outln!("virtual size: {} ({size} bytes)", size_to_str(size));
    }
    if let Some(actual) = info.actual_size {
        outln!("disk size: {}", size_to_str(actual));
    }
    if let Some(cluster) = info.cluster_size {
        outln!("cluster_size: {cluster}");
    }
    if let Some(backing) = &info.backing_filename {
        match &info.full_backing_filename {
            Some(full) if full.as_os_str() != backing.as_str() => {
                outln!("backing file: {backing} (actual path: {})", full.display())
            }
            _ => outln!("backing file: {backing}"),
        }
    }
    if let Some(fmt) = &info.backing_filename_format {
        outln!("backing file format: {fmt}");
    }
    if info.dirty {
        outln!("cleanly shut down: no");
    }
    if !info.snapshots.is_empty() {
        print_snapshot_list(&info.snapshots);
    }
    if let Some(q) = &info.qcow2 {
        outln!("Format specific information:");
        outln!("    compat: {}", q.compat);
        outln!("    compression type: {}", q.compression_type);
        if q.is_v3() {
            outln!("    lazy refcounts: {}", q.lazy_refcounts);
        }
        if !q.bitmaps.is_empty() {
            outln!("    bitmaps:");
            for (i, b) in q.bitmaps.iter().enumerate() {
                outln!("        [{i}]:");
                outln!("            flags:");
                for (j, flag) in bitmap_flags(b).iter().enumerate() {
                    outln!("                [{j}]: {flag}");
                }
                outln!("            name: {}", b.name);
                outln!("            granularity: {}", b.granularity);
            }
        }
        outln!("    refcount bits: {}", q.refcount_bits);
        if let Some(data_file) = &q.data_file {
            outln!("    data file: {data_file}");
            outln!("    data file raw: {}", q.data_file_raw);
        }
        if q.is_v3() {
            outln!("    corrupt: {}", q.corrupt);
            outln!("    extended l2: {}", q.extended_l2);
        }
    }
    outln!("Child node '/file':");
    outln!("    filename: {}", info.filename.display());
    outln!("    protocol type: file");
    outln!(
        "    file length: {} ({} bytes)",
        size_to_str(info.file_length.div_ceil(512) * 512),
        info.file_length.div_ceil(512) * 512
    );
    if let Some(actual) = info.actual_size {
        outln!("    disk size: {}", size_to_str(actual));
    }
}

/// qemu's size_to_str: three significant digits and a binary unit ("336 KiB").
/// Prints snapshots as `qemu-img snapshot -l` and `qemu-img info` list them.
pub fn print_snapshot_list(snapshots: &[SnapshotInfo]) {
    outln!("Snapshot list:");
    outln!("ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT");
    for s in snapshots {
        let clock = s.vm_clock_sec;
        // qemu prints "--" for no instruction count (-1 or absent).
        let icount = s.icount.map_or_else(|| "--".to_string(), |i| i.to_string());
        outln!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_date(s.date_sec.into()),
            format!(
                "{:04}:{:02}:{:02}.{:03}",
                clock / 3600,
                clock / 60 % 60,
                clock % 60,
                s.vm_clock_nsec / 1_000_000
            ),
            icount
        );
    }
}

fn size_to_str(value: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // Switch units at 1000 of the smaller one, as qemu does.
    let mut unit = 0;
    while unit + 1 < UNITS.len() && value as f64 >= 1000.0 * (1u64 << (unit * 10)) as f64 {
        unit += 1;
    }
    let scaled = value as f64 / (1u64 << (unit * 10)) as f64;
    format!("{} {}", three_digits(scaled), UNITS[unit])
}

/// `%0.3g` for values below 1000.
fn three_digits(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// `YYYY-MM-DD HH:MM:SS` in local time (the `TZ` environment variable, else the
/// system's zone), as qemu-img prints snapshot dates (`localtime_r` and `strftime`);
/// UTC if the C library cannot convert the time.
fn local_date(secs: i64) -> String {
    // Snapshot dates are 32-bit: they fit a time_t.
    let time = secs as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value (integers, and a null zone name pointer
    // that is only written), and `localtime_r` reads `time` and writes `tm` only.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { libc::localtime_r(&time, &mut tm) };
    if converted.is_null() {
        return utc_date(secs);
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc_date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(344064), "336 KiB");
        assert_eq!(size_to_str(2 << 20), "2 MiB");
        assert_eq!(size_to_str(1000 << 10), "0.977 MiB");
        assert_eq!(size_to_str(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_795_667_013), "2026-11-26 04:23:33");
    }
}
