//! `qimg amend`: change a qcow2 image's options in place, as qemu-img amend.
//!
//! Beyond qemu-img (which since QEMU 5.1 refuses to change the backing file here and
//! points at `rebase`), `backing_file` and `backing_fmt` change the stored names like
//! `qemu-img rebase -u`; an empty `backing_file` removes the backing file.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::qcow2::AmendOptions;
use qcow2_engine::{Chain, ChainOptions, Compat, Format};

use crate::common::{
    Progress, parse_bool, parse_format, parse_size, split_options, wants_option_help,
};

/// Arguments of `qimg amend`.
#[derive(clap::Args)]
pub struct Args {
    /// Options to change: comma-separated `key=value` (repeatable; later ones win).
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Format of FILE (probed when absent; only qcow2 can be amended).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Print nothing on success (qimg prints nothing anyway; accepted for compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// Show progress (0 then 100: the amendment is one step).
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode for FILE (none, writeback, writethrough, directsync, unsafe), as
    /// qemu-img amend -t: none and directsync write aligned requests with O_DIRECT,
    /// writethrough and directsync make each write durable; unsafe skips the flushes
    /// that order the amendment's steps.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_parser = crate::common::parse_cache)]
    cache: Option<crate::common::CacheMode>,
    /// Allow unsafe amendments (qemu-img's `--force`): QEMU uses it only for changes to
    /// encryption keys, which qimg refuses with every encrypted image, so it changes
    /// nothing here.
    #[arg(long = "force")]
    force: bool,
    /// The image.
    file: PathBuf,
}

/// Turns qemu-img's `-o` texts into [`AmendOptions`], refusing what amend cannot change
/// with qemu-img's reasons.
fn parse_options(texts: &[String]) -> Result<AmendOptions, String> {
    let mut options = AmendOptions::default();
    for text in texts {
        for (key, value) in split_options(text)? {
            let bad = |e: String| format!("parameter '{key}': {e}");
            match key.as_str() {
                "compat" => {
                    options.compat =
                        Some(Compat::from_name(&value).map_err(|e| bad(e.to_string()))?)
                }
                "lazy_refcounts" => options.lazy_refcounts = Some(parse_bool(&key, &value)?),
                "refcount_bits" => {
                    let bits: u32 = value
                        .parse()
                        .map_err(|_| bad(format!("{value:?} is not a number")))?;
                    options.refcount_bits = Some(bits);
                }
                "backing_file" => {
                    options.backing_file = Some((!value.is_empty()).then_some(value));
                }
                "backing_fmt" => {
                    let format = parse_format(&value).map_err(bad)?;
                    options.backing_format = Some(Some(format.name().to_owned()));
                }
                "size" => options.size = Some(parse_size(&value)?),
                "cluster_size" | "extended_l2" | "compression_type" | "preallocation"
                | "encryption" | "encrypt.format" => {
                    return Err(format!(
                        "Invalid parameter '{key}': this option is only supported for image \
                         creation"
                    ));
                }
                "data_file" | "data_file_raw" => {
                    return Err(format!("parameter '{key}' cannot be amended by qimg"));
                }
                _ => return Err(format!("Invalid parameter '{key}'")),
            }
        }
    }
    options.validate().map_err(|e| e.report().to_string())?;
    // An empty backing file takes its format along.
    if options.backing_file == Some(None) {
        options.backing_format = Some(None);
    }
    Ok(options)
}

/// What qimg can amend, as qemu-img's `-o help` lists it (name, value type,
/// description). qemu-img also lists data_file, data_file_raw and the encryption options,
/// which qimg refuses to change.
const AMENDABLE: [(&str, &str, &str); 6] = [
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    (
        "compat",
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    (
        "lazy_refcounts",
        "bool (on/off)",
        "Postpone refcount updates",
    ),
    (
        "refcount_bits",
        "num",
        "Width of a reference count entry in bits",
    ),
    ("size", "size", "Virtual disk size"),
];

/// `amend -o help`: the options of FILE's format (given, or probed from FILE), as
/// qemu-img prints them; only qcow2 has any.
fn print_amend_options_help(args: &Args) -> Result<u8> {
    let format = Format::for_file(&args.file, args.format)?;
    if format != Format::Qcow2 {
        bail!(
            "Format driver '{}' does not support option amendment",
            format.name()
        );
    }
    outln!("Amend options for 'qcow2':");
    for (name, kind, description) in AMENDABLE {
        outln!("  {:<22} - {description}", format!("{name}=<{kind}>"));
    }
    Ok(0)
}

/// Runs `qimg amend`.
pub fn run(args: Args) -> Result<u8> {
    // --force allows nothing more here (see the field).
    let _ = args.force;
    if wants_option_help(&args.options) {
        return print_amend_options_help(&args);
    }
    let options =
        parse_options(&args.options).map_err(|e| anyhow!("{}: {e}", args.file.display()))?;
    let chain = Chain::open_with(
        &args.file,
        &ChainOptions {
            format: args.format,
            writable: true,
            opener: args.cache.and_then(crate::common::CacheMode::opener),
            ..crate::common::chain_defaults()
        },
    )?;
    chain.ensure_writable()?;
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    if chain.top().format() != Format::Qcow2 {
        bail!(
            "{}: format '{}' does not support option amendment",
            args.file.display(),
            chain.top().format().name()
        );
    }
    // The library amends in one step: progress goes from 0 to 100 when it is done.
    let mut progress = Progress::new(args.progress && !args.quiet);
    let amended = chain.amend(&options);
    let closed = chain.close();
    if amended.is_ok() && closed.is_ok() {
        progress.update(1, 1);
    }
    progress.finish();
    amended?;
    closed?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AmendOptions, String> {
        parse_options(&[text.to_owned()])
    }

    #[test]
    fn every_amendable_option_parses() {
        let o = parse("compat=0.10,lazy_refcounts=off,refcount_bits=16,size=1M").unwrap();
        assert_eq!(o.compat, Some(Compat::V0_10));
        assert_eq!(o.lazy_refcounts, Some(false));
        assert_eq!(o.refcount_bits, Some(16));
        assert_eq!(o.size, Some(1 << 20));
        let o = parse("backing_file=b.qcow2,backing_fmt=qcow2").unwrap();
        assert_eq!(o.backing_file, Some(Some("b.qcow2".into())));
        assert_eq!(o.backing_format, Some(Some("qcow2".into())));
    }

    #[test]
    fn later_options_win_and_an_empty_backing_file_removes_it() {
        let o = parse_options(&["size=1M,size=2M".into(), "size=4M".into()]).unwrap();
        assert_eq!(o.size, Some(4 << 20));
        let o = parse("backing_file=").unwrap();
        assert_eq!(o.backing_file, Some(None));
        assert_eq!(o.backing_format, Some(None));
    }

    #[test]
    fn bad_values_and_creation_options_are_refused() {
        for bad in [
            "compat=2.0",
            "refcount_bits=3",
            "refcount_bits=128",
            "refcount_bits=x",
            "lazy_refcounts=maybe",
            "size=1000",
            "size=0",
            "size=abc",
            // vmdk is a format qemu-img knows: stored, and refused when the chain opens.
            "backing_fmt=vmdk4",
            "cluster_size=4k",
            "extended_l2=on",
            "data_file=x",
            "foo=1",
            "backing_file=,backing_fmt=raw",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("foo=1").unwrap_err(), "Invalid parameter 'foo'");
    }
}
