//! `qimg tree`: the forest of images found in directories and files, each image under its
//! backing file, with its internal snapshots.

use std::path::PathBuf;

use anyhow::Result;
use indicatif::HumanBytes;
use qcow2_engine::ops::{Forest, TreeOptions};
use serde_json::{Value, json};

use crate::common::{Output, locking, print_json};

/// Arguments of `qimg tree`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Read each image sharing it with every other user, without QEMU's locks'
    /// refusals (images a VM is writing), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Directories (their files, not recursively) and image files.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// Runs `qimg tree`.
pub fn run(args: Args) -> Result<u8> {
    let options = TreeOptions {
        locking: locking(args.force_share),
        ..TreeOptions::default()
    };
    let forest = Forest::scan(&args.paths, &options)?;
    for skipped in forest.skipped() {
        eprintln!("qimg: warning: {}", skipped.report());
    }
    match args.output {
        Output::Json => print_json(&Value::Array(
            forest
                .roots()
                .map(|root| node_json(&forest, root))
                .collect(),
        ))?,
        Output::Human => {
            for root in forest.roots() {
                print_node(&forest, root, "", "");
            }
        }
    }
    Ok(0)
}

fn node_json(forest: &Forest, index: usize) -> Value {
    let image = &forest.images()[index];
    json!({
        "filename": image.path.display().to_string(),
        "format": image.format.name(),
        "virtual-size": image.virtual_size,
        "actual-size": image.actual_size,
        "snapshots": image.snapshots,
        "children": forest
            .children(index)
            .iter()
            .map(|&child| node_json(forest, child))
            .collect::<Vec<_>>(),
    })
}

/// Prints image `index` after `lead` (its branch), and what hangs below it after `rest`.
fn print_node(forest: &Forest, index: usize, lead: &str, rest: &str) {
    let image = &forest.images()[index];
    outln!(
        "{lead}{} ({}, {}, {} on disk)",
        image.path.display(),
        image.format.name(),
        HumanBytes(image.virtual_size),
        HumanBytes(image.actual_size)
    );
    let children = forest.children(index);
    let bar = if children.is_empty() {
        "    "
    } else {
        "│   "
    };
    for name in &image.snapshots {
        outln!("{rest}{bar}snapshot: {name}");
    }
    for (i, &child) in children.iter().enumerate() {
        let last = i + 1 == children.len();
        let (branch, below) = if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        print_node(
            forest,
            child,
            &format!("{rest}{branch}"),
            &format!("{rest}{below}"),
        );
    }
}
