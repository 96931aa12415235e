//! `qimg create`: a new qcow2 or raw image, as qemu-img create makes it.

use std::path::PathBuf;

use anyhow::{Result, bail};
use qcow2_engine::{Compat, CreateOptions, Format, ImageOptions, Layer, Preallocation, create};

use crate::common::{
    apply_create_options, parse_format, parse_size, print_create_options_help, wants_option_help,
};

/// Arguments of `qimg create`.
#[derive(clap::Args)]
pub struct Args {
    /// Image format: qcow2 or raw (default raw, as qemu-img).
    #[arg(short = 'f', value_parser = parse_format, default_value = "raw")]
    format: Format,
    /// Format options, comma-separated `key=value` (may repeat).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file (stored as given, opened relative to FILE's directory).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create (truncated if it exists); not needed with `-o help`.
    file: Option<PathBuf>,
    /// Virtual size (qemu-img suffixes); taken from the backing file when absent.
    size: Option<String>,
}

/// Runs `qimg create`.
pub fn run(args: Args) -> Result<u8> {
    if wants_option_help(&args.options) {
        print_create_options_help(args.format, args.file.is_some());
        return Ok(0);
    }
    let Some(path) = args.file.clone() else {
        bail!("Expecting image file name");
    };
    let file = path.display().to_string();
    let mut options = CreateOptions {
        format: args.format,
        ..CreateOptions::default()
    };
    apply_create_options(&mut options, &args.options)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    if let Some(size) = &args.size {
        options.size = Some(parse_size(size).map_err(|e| anyhow::anyhow!("{file}: {e}"))?);
    }
    if let Some(backing) = args.backing {
        if args.format == Format::Raw {
            bail!("{file}: raw images cannot have a backing file");
        }
        options.backing_file = Some(backing);
    }
    if args.backing_format.is_some() {
        options.backing_format = args.backing_format;
    }
    options.open_backing = !args.unsafe_backing;
    if options.backing_file.is_some() && options.backing_format.is_none() {
        // qemu-img refuses to guess a backing format at creation.
        bail!("{file}: Backing file specified without backing format (use -F FMT)");
    }
    create(&path, &options)?;
    if !args.quiet {
        outln!("{}", formatting_line(&file, &path, &options));
    }
    Ok(0)
}

/// qemu-img's `Formatting 'FILE', fmt=... key=value...` line.
fn formatting_line(file: &str, path: &std::path::Path, o: &CreateOptions) -> String {
    let size = o.size.unwrap_or_else(|| {
        o.backing_file
            .as_ref()
            .map(|b| qcow2_engine::names::resolve_relative(path, b))
            .and_then(|p| Layer::open(&p, o.backing_format, &ImageOptions::default()).ok())
            .map_or(0, |layer| layer.size())
    });
    let mut line = format!("Formatting '{file}', fmt={}", o.format.name());
    if o.format == Format::Raw {
        line.push_str(&format!(" size={size}"));
        if o.preallocation != Preallocation::Off {
            line.push_str(&format!(" preallocation={}", o.preallocation.name()));
        }
        return line;
    }
    let on_off = |b: bool| if b { "on" } else { "off" };
    line.push_str(&format!(
        " cluster_size={} extended_l2={}",
        o.cluster_size,
        on_off(o.extended_l2)
    ));
    if o.preallocation != Preallocation::Off {
        line.push_str(&format!(" preallocation={}", o.preallocation.name()));
    }
    line.push_str(&format!(
        " compression_type={} size={size}",
        o.compression_type.name()
    ));
    if o.compat != Compat::V1_1 {
        line.push_str(&format!(" compat={}", o.compat.name()));
    }
    if let Some(b) = &o.backing_file {
        line.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = o.backing_format {
        line.push_str(&format!(" backing_fmt={}", f.name()));
    }
    if let Some(d) = &o.data_file {
        line.push_str(&format!(" data_file={d}"));
        if o.data_file_raw {
            line.push_str(" data_file_raw=on");
        }
    }
    line.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        on_off(o.lazy_refcounts),
        o.refcount_bits
    ));
    line
}
