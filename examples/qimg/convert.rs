//! `qimg convert`: the guest content of one image (through its chain), or of several one
//! after the other, into a new image or (`-n`) into an existing one, as qemu-img convert.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use qcow2_engine::ops::{self, ConvertOptions};
use qcow2_engine::{Chain, ChainOptions, CreateOptions, Error, Format, Layer};

use crate::common::{
    CacheMode, Progress, apply_create_options, chain_defaults, locking, parse_cache, parse_format,
    parse_rate, parse_size, parse_source_cache, print_create_options_help, split_options,
    wants_option_help,
};

/// qemu-img's largest `-S` (`MAX_BUF_SECTORS` sectors) and `-m` (`MAX_COROUTINES`).
const MAX_SPARSE_SIZE: u64 = 32768 * 512;
const MAX_PARALLEL: usize = 16;

/// Arguments of `qimg convert` (qemu-img's short and long option names).
#[derive(clap::Args)]
pub struct Args {
    /// Print nothing but errors (turns -p off).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Show progress: a bar on a terminal, else qemu-img's lines on stdout.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Do not create DST: write into the existing DST, which must be at least as large as
    /// the sources together. DST is opened as -O says (raw by default, as qemu-img);
    /// a qcow2 DST is written through the library (zeros as zero clusters).
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// Store clusters compressed (qcow2 output).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Copy offloading: data ranges go to DST as copies the kernel makes
    /// (copy_file_range: shared extents on XFS and Btrfs), unread, zeros inside them
    /// included, as qemu-img -C. Compressed clusters are read and written as without -C;
    /// with -B the conversion compares with BACKING as without -C. Refused with -c and
    /// -S, as qemu-img.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Out-of-order writes: accepted; changes nothing, since qimg reads ahead on other
    /// threads but writes in guest order, which qemu-img's -W only lets go of.
    #[arg(short = 'W', long = "oob-writes")]
    oob_writes: bool,
    /// Open the sources without QEMU's locks' refusals, as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Format of the sources (probed when absent).
    #[arg(short = 'f', long = "source-format", value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: raw (default, as qemu-img) or qcow2.
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    output_format: String,
    /// Output format options, comma-separated `key=value` (may repeat), as `create -o`;
    /// `-o help` lists them.
    #[arg(short = 'o', long = "target-options")]
    options: Vec<String>,
    /// Output cache mode: unsafe (default, as qemu-img convert) leaves the written data
    /// to the kernel; every other mode (none, writeback, writethrough, directsync)
    /// flushes DST to stable storage before qimg reports success. none and directsync
    /// write DST's aligned requests with O_DIRECT; writethrough and directsync make
    /// each write durable (O_DSYNC).
    #[arg(short = 't', long = "target-cache", value_parser = parse_cache)]
    cache: Option<CacheMode>,
    /// Source cache mode (writeback by default): none and directsync read the sources'
    /// aligned requests with O_DIRECT.
    #[arg(short = 'T', long = "source-cache", value_parser = parse_source_cache)]
    source_cache: Option<CacheMode>,
    /// At most N threads compress clusters with -c (1 to 16; default: one per core).
    /// Reading ahead and writing are already on their own threads: qemu-img's -m
    /// (coroutines copying at once) has no other counterpart.
    #[arg(short = 'm', long = "parallel", value_parser = parse_parallel)]
    parallel: Option<usize>,
    /// Hold the copy to RATE bytes per second (qemu-img suffixes; 0: no limit). qimg
    /// paces the guest range it goes through, zeros included, so it is the stricter of
    /// the two where the source is sparse.
    #[arg(short = 'r', long = "rate", value_parser = parse_rate)]
    rate: Option<u64>,
    /// Zero blocks of this size in data are not written (0: fully allocate).
    #[arg(short = 'S', long = "sparse-size", value_parser = parse_sparse_size)]
    sparse_size: Option<u64>,
    /// Make DST an overlay on BACKING holding only what differs from it.
    #[arg(short = 'B', long = "backing")]
    backing: Option<String>,
    /// Format of BACKING.
    #[arg(short = 'F', long = "backing-format", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Read the first source's internal snapshot instead of its active image:
    /// `snapshot.id=ID`, `snapshot.name=NAME` (both: a snapshot matching both), or an
    /// ID or name (the ID tried first).
    #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT_PARAM")]
    snapshot: Option<String>,
    /// With -n: DST reads as zeros already, so zeros are not written.
    #[arg(long)]
    target_is_zero: bool,
    /// Copy the source's persistent bitmaps (qcow2 output).
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps, leave out bitmaps in use (with a warning) instead of failing.
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// The sources (their contents one after the other), then DST.
    #[arg(value_name = "SRC... DST")]
    files: Vec<PathBuf>,
}

/// Parses `-S` with qemu-img's limits and message.
fn parse_sparse_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size % 512 != 0 || size > MAX_SPARSE_SIZE {
        return Err(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of \
             512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection (fully \
             allocates output)."
        ));
    }
    Ok(size)
}

/// Parses `-m` with qemu-img's limits and message.
fn parse_parallel(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_PARALLEL).contains(&n) => Ok(n),
        _ => Err(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_PARALLEL}."
        )),
    }
}

/// `-l`: which snapshot to read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SnapshotParam {
    /// `snapshot.id=ID,snapshot.name=NAME` (either may be absent).
    IdAndName(Option<String>, Option<String>),
    /// A bare ID or name: the ID is tried first.
    IdOrName(String),
}

/// Parses `-l` as qemu-img does.
pub(crate) fn parse_snapshot_param(text: &str) -> Result<SnapshotParam> {
    if !text.starts_with("snapshot.") {
        return Ok(SnapshotParam::IdOrName(text.to_owned()));
    }
    let failed = || anyhow!("Failed in parsing snapshot param '{text}'");
    let (mut id, mut name) = (None, None);
    for (key, value) in split_options(text).map_err(|_| failed())? {
        match key.as_str() {
            "snapshot.id" => id = Some(value),
            "snapshot.name" => name = Some(value),
            _ => return Err(failed().context(format!("Invalid parameter '{key}'"))),
        }
    }
    Ok(SnapshotParam::IdAndName(id, name))
}

/// Makes the snapshot `param` names the content `chain` reads (its top image, opened
/// read-only), with qemu-img's messages.
pub(crate) fn load_snapshot(chain: &Chain, param: &SnapshotParam) -> Result<()> {
    let top = chain.top();
    let fail = |e: Error| {
        anyhow!(
            "{}: Failed to load snapshot: {}",
            top.name().display(),
            plain(&e)
        )
    };
    let Layer::Qcow2(image) = top else {
        bail!(
            "{}: Failed to load snapshot: Block format 'raw' used by device '' does not support \
             temporarily loading internal snapshots",
            top.name().display()
        );
    };
    match param {
        SnapshotParam::IdAndName(None, None) => {
            bail!(
                "{}: Failed to load snapshot: snapshot_id and snapshot_name are both NULL",
                top.name().display()
            )
        }
        SnapshotParam::IdAndName(id, name) => image
            .load_snapshot_read_only(id.as_deref(), name.as_deref())
            .map_err(fail),
        SnapshotParam::IdOrName(text) => image
            .load_snapshot_read_only(Some(text), None)
            .or_else(|_| image.load_snapshot_read_only(None, Some(text)))
            .map_err(fail),
    }
}

/// The library error's own message, without the files it names or the kind of error
/// that the messages qemu-img prints here do not have.
fn plain(error: &Error) -> String {
    match error.root() {
        Error::InvalidArgument(message) => message.clone(),
        other => other.to_string(),
    }
}

/// What qemu-img refuses before it opens anything, in its order and words.
fn refuse_option_combinations(args: &Args) -> Result<()> {
    if args.skip_broken_bitmaps && !args.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if args.compress && args.copy_range {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if args.sparse_size.is_some() && args.copy_range {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if args.no_create && !args.options.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    Ok(())
}

/// The new image's options, refusing what qemu-img refuses.
fn create_options(args: &Args, sources: usize) -> Result<CreateOptions> {
    let dst = args
        .files
        .last()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // The library refuses the formats it recognises but cannot write.
    let format = Format::from_name(&args.output_format).map_err(|e| anyhow!("{dst}: {e}"))?;
    let mut create = CreateOptions {
        format,
        ..CreateOptions::default()
    };
    apply_create_options(&mut create, &args.options).map_err(|e| anyhow!("{dst}: {e}"))?;
    if let Some(backing) = &args.backing {
        if format == Format::Raw {
            bail!("{dst}: raw images cannot have a backing file");
        }
        create.backing_file = Some(backing.clone());
    }
    if args.backing_format.is_some() {
        create.backing_format = args.backing_format;
    }
    if create.backing_file.is_some() && sources > 1 {
        bail!(
            "Having a backing file for the target makes no sense when concatenating \
             multiple input images"
        );
    }
    if create.backing_file.is_some() && create.backing_format.is_none() {
        bail!("{dst}: Use of backing file requires explicit backing format (use -F FMT)");
    }
    if args.compress && format == Format::Raw {
        bail!("{dst}: Compression not supported for this file format");
    }
    if args.compress && create.preallocation != qcow2_engine::Preallocation::Off {
        bail!("{dst}: Compression and preallocation not supported at the same time");
    }
    Ok(create)
}

/// Runs `qimg convert`.
pub fn run(args: Args) -> Result<u8> {
    let snapshot = args
        .snapshot
        .as_deref()
        .map(parse_snapshot_param)
        .transpose()?;
    refuse_option_combinations(&args)?;
    if wants_option_help(&args.options) {
        let format = Format::from_name(&args.output_format)
            .map_err(|_| anyhow!("Unknown file format '{}'", args.output_format))?;
        print_create_options_help(format, args.files.len() >= 2);
        return Ok(0);
    }
    let Some((dst, sources)) = args.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        bail!("Must specify image file name");
    };
    let mut chains = Vec::with_capacity(sources.len());
    let source_opener = args.source_cache.and_then(CacheMode::opener);
    for source in sources {
        chains.push(Chain::open_with(
            source,
            &ChainOptions {
                format: args.format,
                locking: locking(args.force_share),
                opener: source_opener.clone(),
                ..chain_defaults()
            },
        )?);
    }
    match &snapshot {
        Some(SnapshotParam::IdOrName(_)) if chains.len() > 1 => {
            bail!("No support for concatenating multiple snapshot")
        }
        // qemu-img loads a snapshot.id/snapshot.name snapshot into the first source only.
        Some(param) => load_snapshot(&chains[0], param)?,
        None => {}
    }
    let options = ConvertOptions {
        min_sparse: args.sparse_size.unwrap_or(4096),
        compress: args.compress,
        threads: args.parallel.unwrap_or(0),
        // qemu-img convert's default cache mode, unsafe, skips the final flush.
        sync: args.cache.is_some_and(|mode| mode != CacheMode::Unsafe),
        bitmaps: args.bitmaps,
        skip_broken_bitmaps: args.skip_broken_bitmaps,
        target_is_zero: args.target_is_zero,
        cache: args.cache.map(CacheMode::file_cache).unwrap_or_default(),
        copy_offload: args.copy_range,
        ..ConvertOptions::default()
    };
    if args.no_create {
        return convert_into(&args, chains, dst, &options);
    }
    let create = create_options(&args, chains.len())?;
    if args.bitmaps && chains.len() > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    if args.skip_broken_bitmaps {
        if let Layer::Qcow2(image) = chains[0].top() {
            for bitmap in image.bitmaps()?.iter().filter(|b| b.in_use) {
                eprintln!(
                    "qimg: warning: Skipping inconsistent bitmap '{}'",
                    bitmap.name
                );
            }
        }
    }
    let mut progress = Progress::new(args.progress && !args.quiet).throttled(args.rate);
    let result =
        ops::convert_concatenated(chains, dst, &create, &options, &mut progress.callback());
    progress.finish();
    result.map_err(|e| e.in_file(dst))?;
    Ok(0)
}

/// `-n`: writes the sources into the existing DST, opened as -O says.
fn convert_into(
    args: &Args,
    chains: Vec<Chain>,
    dst: &Path,
    options: &ConvertOptions,
) -> Result<u8> {
    let format =
        Format::from_name(&args.output_format).map_err(|e| anyhow!("{}: {e}", dst.display()))?;
    if args.compress && format == Format::Raw {
        bail!(
            "{}: Compression not supported for this file format",
            dst.display()
        );
    }
    let base = match &args.backing {
        Some(name) => Some(Chain::open_with(
            qcow2_engine::names::resolve_relative(dst, name),
            &ChainOptions {
                format: args.backing_format,
                locking: locking(true),
                ..chain_defaults()
            },
        )?),
        None => None,
    };
    if args.target_is_zero && base.is_some() {
        bail!("Cannot use --target-is-zero when the destination image has a backing file");
    }
    if args.bitmaps {
        bail!(
            "{}: --bitmaps needs a new image (without -n)",
            dst.display()
        );
    }
    let out = Chain::open_with(
        dst,
        &ChainOptions {
            format: Some(format),
            opener: args.cache.and_then(CacheMode::opener),
            ..chain_defaults()
        }
        .writable(true),
    )?;
    out.ensure_writable()?;
    let source = match chains.len() {
        1 => chains.into_iter().next().expect("one source"),
        _ => ops::concatenate(chains)?,
    };
    let mut progress = Progress::new(args.progress && !args.quiet).throttled(args.rate);
    let result = ops::convert_into(
        &source,
        &out,
        base.as_ref(),
        options,
        &mut progress.callback(),
    );
    progress.finish();
    result.map_err(|e| match e.root() {
        Error::InvalidArgument(_) => anyhow!("{}: {}", dst.display(), plain(&e)),
        _ => e.into(),
    })?;
    out.close()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_params_parse_as_qemu_img() {
        assert_eq!(
            parse_snapshot_param("snap1").unwrap(),
            SnapshotParam::IdOrName("snap1".into())
        );
        assert_eq!(
            parse_snapshot_param("snapshot.id=2").unwrap(),
            SnapshotParam::IdAndName(Some("2".into()), None)
        );
        assert_eq!(
            parse_snapshot_param("snapshot.name=a,snapshot.id=1").unwrap(),
            SnapshotParam::IdAndName(Some("1".into()), Some("a".into()))
        );
        let err = parse_snapshot_param("snapshot.foo=1").unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "Invalid parameter 'snapshot.foo': Failed in parsing snapshot param 'snapshot.foo=1'"
        );
    }

    #[test]
    fn sparse_sizes_and_parallelism_have_qemu_img_limits() {
        assert_eq!(parse_sparse_size("0"), Ok(0));
        assert_eq!(parse_sparse_size("64k"), Ok(65536));
        assert!(
            parse_sparse_size("1000")
                .unwrap_err()
                .starts_with("Invalid buffer size")
        );
        assert!(parse_sparse_size("32M").is_err());
        assert_eq!(parse_parallel("16"), Ok(16));
        assert!(parse_parallel("0").is_err() && parse_parallel("17").is_err());
        assert!(
            parse_parallel("x")
                .unwrap_err()
                .contains("Must be between 1 and 16.")
        );
    }
}
