//! `qimg bench`: qemu-img bench's request stream on the engine's I/O path, with its report
//! lines; plus `--random[=SEED]` for random offsets.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use qcow2_engine::ops::{self, BenchOptions};
use qcow2_engine::{Chain, ChainOptions, Format};

use crate::common::{CacheMode, chain_defaults, locking, parse_cache, parse_format, parse_size};

/// Arguments of `qimg bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Requests in all.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    count: u64,
    /// Requests in flight (served by up to twice the cores' threads).
    #[arg(short = 'd', long = "depth", default_value_t = 64)]
    depth: usize,
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    /// AIO backend (threads, native, io_uring): accepted; the engine's I/O is positional
    /// reads and writes on its own threads.
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Native AIO (accepted, as -i).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", value_parser = parse_size, default_value = "0")]
    offset: u64,
    /// Accepted for qemu-img compatibility (qemu-img bench prints its lines anyway).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Bytes per request.
    #[arg(short = 's', long = "buffer-size", value_parser = parse_size, default_value = "4096")]
    buffer_size: u64,
    /// Distance between requests (default: the buffer size).
    #[arg(short = 'S', long = "step-size", value_parser = parse_size)]
    step: Option<u64>,
    /// Cache mode, as qemu-img's (none: O_DIRECT for aligned requests; default writeback).
    #[arg(short = 't', long = "cache", value_parser = parse_cache)]
    cache: Option<CacheMode>,
    /// Write requests instead of reads.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte written.
    #[arg(long = "pattern", default_value_t = 0)]
    pattern: u8,
    /// Flush after every N requests (writes only).
    #[arg(long = "flush-interval")]
    flush_interval: Option<u64>,
    /// Let requests continue while a flush runs.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Open read-only without QEMU's locks' refusals, as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Random offsets (aligned to the buffer size) instead of qemu-img's stream, from SEED
    /// (default 1).
    #[arg(long = "random", num_args = 0..=1, default_missing_value = "1")]
    random: Option<u64>,
    /// The image.
    file: PathBuf,
}

/// Runs `qimg bench`.
pub fn run(args: Args) -> Result<u8> {
    let _ = (args.quiet, args.native, &args.aio);
    if let Some(aio) = &args.aio {
        if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
            return Err(anyhow!("Invalid aio option: {aio}"));
        }
    }
    if args.force_share && args.write {
        return Err(anyhow!("--force-share/-U cannot be used with -w"));
    }
    let options = BenchOptions {
        count: args.count,
        depth: args.depth,
        buffer_size: args.buffer_size,
        step: args.step,
        offset: args.offset,
        write: args.write,
        pattern: args.pattern,
        flush_interval: args.flush_interval,
        no_drain: args.no_drain,
        random: args.random,
    };
    options.validate()?;
    let chain = Chain::open_with(
        &args.file,
        &ChainOptions {
            format: args.format,
            writable: args.write,
            locking: locking(args.force_share),
            opener: args.cache.and_then(CacheMode::opener),
            ..chain_defaults()
        },
    )?;
    outln!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step \
         size {})",
        options.count,
        if options.write { "write" } else { "read" },
        options.buffer_size,
        options.depth,
        options.offset,
        options.step()
    );
    if let Some(every) = options.flush_interval {
        outln!("Sending flush every {every} requests");
    }
    let report =
        ops::bench(&chain, &options).map_err(|e| anyhow!("Failed request: {}", e.report()))?;
    if options.write {
        chain.close()?;
    }
    outln!(
        "Run completed in {:.3} seconds.",
        report.elapsed.as_secs_f64()
    );
    Ok(0)
}
