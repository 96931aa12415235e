//! `qimg du`: space accounting of a chain and its internal snapshots.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::HumanBytes;
use qcow2_engine::Format;
use qcow2_engine::ops::{self, LayerSpace, SpaceReport};
use qcow2_engine::qcow2::OwnerSpace;
use serde_json::{Value, json};

use crate::common::{Output, open_chain, parse_format, print_json};

/// Arguments of `qimg du`.
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
    /// The image.
    file: PathBuf,
}

/// Runs `qimg du`.
pub fn run(args: Args) -> Result<u8> {
    let chain = open_chain(&args.file, args.format, args.force_share)?;
    let report = ops::du(&chain)?;
    match args.output {
        Output::Json => print_json(&to_json(&report))?,
        Output::Human => print_human(&report),
    }
    Ok(0)
}

fn owner_json(space: &OwnerSpace) -> Value {
    json!({
        "allocated": space.allocated,
        "exclusive": space.exclusive,
        "shared": space.shared,
    })
}

fn layer_json(layer: &LayerSpace) -> Value {
    let mut v = json!({
        "filename": layer.filename.display().to_string(),
        "format": layer.format.name(),
        "depth": layer.depth,
        "file-length": layer.file_len,
        "guest-data": layer.guest_data,
        "visible-data": layer.visible_data,
        "shadowed-data": layer.shadowed_data,
    });
    if let Some(usage) = layer.disk_usage {
        v["disk-usage"] = json!(usage);
    }
    if let Some(c) = &layer.clusters {
        v["cluster-size"] = json!(c.cluster_size);
        v["allocated"] = json!(c.referenced);
        v["metadata"] = json!(c.metadata);
        v["shared"] = json!(c.shared);
        v["active"] = owner_json(&c.active);
        v["snapshots"] = layer
            .snapshots
            .iter()
            .map(|s| {
                let mut o = owner_json(&s.space);
                o["id"] = json!(s.id);
                o["name"] = json!(s.name);
                o
            })
            .collect();
    }
    v
}

fn to_json(report: &SpaceReport) -> Value {
    json!({
        "layers": report.layers.iter().map(layer_json).collect::<Vec<_>>(),
        "total-file-length": report.total_file_len(),
        "total-allocated": report.total_referenced(),
    })
}

fn print_human(report: &SpaceReport) {
    let b = |n: u64| HumanBytes(n).to_string();
    for layer in &report.layers {
        outln!(
            "{} ({}, depth {}): file {}{}",
            layer.filename.display(),
            layer.format.name(),
            layer.depth,
            b(layer.file_len),
            layer
                .disk_usage
                .map(|u| format!(", {} on disk", b(u)))
                .unwrap_or_default()
        );
        outln!(
            "  guest data {}: {} visible from the top, {} shadowed by layers above",
            b(layer.guest_data),
            b(layer.visible_data),
            b(layer.shadowed_data)
        );
        let Some(c) = &layer.clusters else { continue };
        outln!(
            "  allocated {} = metadata {} + exclusive {} + shared {}",
            b(c.referenced),
            b(c.metadata),
            b(c.referenced - c.metadata - c.shared),
            b(c.shared)
        );
        outln!(
            "  {:<24} {:>12} {:>12} {:>12}",
            "OWNER",
            "ALLOCATED",
            "EXCLUSIVE",
            "SHARED"
        );
        let row = |who: &str, s: &OwnerSpace| {
            outln!(
                "  {:<24} {:>12} {:>12} {:>12}",
                who,
                b(s.allocated),
                b(s.exclusive),
                b(s.shared)
            );
        };
        row("(active)", &c.active);
        for s in &layer.snapshots {
            row(&format!("snapshot {} {}", s.id, s.name), &s.space);
        }
    }
    outln!(
        "total: allocated {} in files of {}",
        b(report.total_referenced()),
        b(report.total_file_len())
    );
}
