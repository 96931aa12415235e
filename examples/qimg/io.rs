//! `qimg io`: a subset of qemu-io's commands: `read`, `write`, `discard`, `flush`, `map`,
//! `sleep`.
//!
//! Every command is parsed before the image is opened, so a typo fails before anything
//! runs. The image is opened read-write and locked as qemu-io does (`-r`: read-only; a
//! marked-corrupt image opens read-only unless a command writes). Commands run in order;
//! the first failure stops the run (exit 1) after the image is closed cleanly.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use qcow2_engine::{Chain, ChainOptions, Format, Mapping};

use crate::common::{parse_format, parse_number};

/// Arguments of `qimg io`.
#[derive(clap::Args)]
pub struct Args {
    /// Format of FILE (probed when absent).
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// A command to run (repeatable; run in order).
    #[arg(short = 'c', required = true)]
    commands: Vec<String>,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Open read-only sharing the image with every other user, without QEMU's locks'
    /// refusals (the image may change while it is read), as qemu-img -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// One parsed qemu-io command.
#[derive(Debug, PartialEq)]
struct Command {
    op: Op,
    /// `-q`: print nothing on success.
    quiet: bool,
}

#[derive(Debug, PartialEq)]
enum Op {
    /// `read [-P PATTERN] OFF LEN`.
    Read {
        pattern: Option<u8>,
        offset: u64,
        len: u64,
    },
    /// `write [-P PATTERN | -s FILE | -z [-u]] OFF LEN`.
    Write {
        data: WriteData,
        offset: u64,
        len: u64,
    },
    /// `discard OFF LEN`.
    Discard { offset: u64, len: u64 },
    /// `flush`.
    Flush,
    /// `map`: the top image's allocation, as qemu-io prints it.
    Map,
    /// `sleep MS`: wait, holding the image open (and locked).
    Sleep { ms: u64 },
}

/// What a `write` writes.
#[derive(Debug, PartialEq)]
enum WriteData {
    /// Every byte the pattern (qemu-io's default is 0xcd).
    Pattern(u8),
    /// The first LEN bytes of a file (`-s`).
    Source(PathBuf),
    /// Zeroes (`-z`); `unmap` (`-u`) lets the image free the clusters.
    Zeroes { unmap: bool },
}

/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

impl Command {
    fn writes(&self) -> bool {
        matches!(self.op, Op::Write { .. } | Op::Discard { .. })
    }
}

/// Runs `qimg io`.
pub fn run(args: Args) -> Result<u8> {
    let commands = args
        .commands
        .iter()
        .map(|c| parse_command(c))
        .collect::<Result<Vec<_>>>()?;
    let writes = commands.iter().any(Command::writes);
    if args.read_only && writes {
        bail!(
            "{}: -r: the image is opened read-only, and a command writes",
            args.file.display()
        );
    }
    let options = ChainOptions {
        format: args.format,
        writable: !args.read_only,
        locking: crate::common::locking(args.force_share),
        ..crate::common::chain_defaults()
    };
    let chain = Chain::open_with(&args.file, &options)?;
    if writes {
        chain.ensure_writable()?;
    }
    for warning in chain.warnings() {
        eprintln!("qimg: warning: {warning}");
    }
    let mut code = 0;
    let mut failure = None;
    for command in &commands {
        match run_command(&chain, &args.file, command) {
            Ok(true) => {}
            Ok(false) => {
                code = 1;
                break;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    // Close even after a failure, so that the image is left clean on disk.
    let closed = chain.close();
    match (failure, closed) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e.into()),
        (None, Ok(())) => Ok(code),
    }
}

/// Parses the words of one command.
fn parse_command(command: &str) -> Result<Command> {
    let mut words = command.split_whitespace();
    let name = words.next().ok_or_else(|| anyhow!("io: empty command"))?;
    let mut pattern = None;
    let mut source = None;
    let mut zeroes = false;
    let mut unmap = false;
    let mut quiet = false;
    let mut positional = Vec::new();
    let takes_flags: &[&str] = match name {
        "read" => &["-P", "-q"],
        "write" => &["-P", "-q", "-s", "-z", "-u"],
        "discard" => &["-q"],
        "flush" | "map" | "sleep" => &[],
        other => bail!(
            "io: command {other:?} is not supported (supported: read, write, discard, flush, \
             map, sleep)"
        ),
    };
    while let Some(word) = words.next() {
        if !(word.starts_with('-') && word.len() > 1) {
            positional.push(word);
            continue;
        }
        if !takes_flags.contains(&word) {
            bail!("{name}: option {word} is not supported");
        }
        match word {
            "-P" => {
                let value = words
                    .next()
                    .ok_or_else(|| anyhow!("{name}: -P needs a pattern"))?;
                pattern = Some(parse_pattern(name, value)?);
            }
            "-s" => {
                let value = words
                    .next()
                    .ok_or_else(|| anyhow!("{name}: -s needs a file"))?;
                source = Some(PathBuf::from(value));
            }
            "-z" => zeroes = true,
            "-u" => unmap = true,
            _ => quiet = true, // -q
        }
    }
    let range = |usage: &str| -> Result<(u64, u64)> {
        let [offset, len] = positional[..] else {
            bail!("{name}: usage: {usage}");
        };
        let offset = parse_number(offset).map_err(|e| anyhow!("{name}: offset {offset:?}: {e}"))?;
        let len = parse_number(len).map_err(|e| anyhow!("{name}: length {len:?}: {e}"))?;
        Ok((offset, len))
    };
    let op = match name {
        "read" => {
            let (offset, len) = range("read [-P PATTERN] [-q] OFFSET LENGTH")?;
            Op::Read {
                pattern,
                offset,
                len,
            }
        }
        "write" => {
            let (offset, len) = range("write [-P PATTERN | -s FILE | -z [-u]] [-q] OFFSET LENGTH")?;
            if usize::from(pattern.is_some()) + usize::from(source.is_some()) + usize::from(zeroes)
                > 1
            {
                bail!("write: only one of -z, -P and -s can be given");
            }
            if unmap && !zeroes {
                bail!("write: -u requires -z");
            }
            let data = match (pattern, source) {
                _ if zeroes => WriteData::Zeroes { unmap },
                (_, Some(path)) => WriteData::Source(path),
                (p, None) => WriteData::Pattern(p.unwrap_or(DEFAULT_PATTERN)),
            };
            Op::Write { data, offset, len }
        }
        "discard" => {
            let (offset, len) = range("discard [-q] OFFSET LENGTH")?;
            Op::Discard { offset, len }
        }
        "sleep" => {
            let [ms] = positional[..] else {
                bail!("sleep: usage: sleep MILLISECONDS");
            };
            let ms = ms
                .parse()
                .map_err(|_| anyhow!("sleep: {ms:?} is not a number of milliseconds"))?;
            Op::Sleep { ms }
        }
        _ => {
            if !positional.is_empty() {
                bail!("{name}: takes no arguments");
            }
            if name == "flush" { Op::Flush } else { Op::Map }
        }
    };
    Ok(Command { op, quiet })
}

fn parse_pattern(command: &str, value: &str) -> Result<u8> {
    let number = parse_number(value).map_err(|e| anyhow!("{command}: pattern: {e}"))?;
    u8::try_from(number).map_err(|_| anyhow!("{command}: {number} is not a valid pattern byte"))
}

/// Refuses a range that does not lie inside the image, before any of it is touched.
fn check_range(chain: &Chain, file: &Path, what: &str, offset: u64, len: u64) -> Result<()> {
    let size = chain.size();
    if offset.checked_add(len).is_none_or(|end| end > size) {
        bail!(
            "{}: {what}: {len} bytes at offset {offset} go past the end of the image ({size} \
             bytes)",
            file.display()
        );
    }
    Ok(())
}

/// Runs one command; `Ok(false)` when a read's pattern verification failed.
fn run_command(chain: &Chain, file: &Path, command: &Command) -> Result<bool> {
    let started = Instant::now();
    let (verb, offset, len, ok) = match &command.op {
        Op::Read {
            pattern,
            offset,
            len,
        } => {
            check_range(chain, file, "read", *offset, *len)?;
            let ok = run_read(chain, *pattern, *offset, *len)?;
            ("read", *offset, *len, ok)
        }
        Op::Write { data, offset, len } => {
            check_range(chain, file, "write", *offset, *len)?;
            run_write(chain, data, *offset, *len)?;
            ("wrote", *offset, *len, true)
        }
        Op::Discard { offset, len } => {
            check_range(chain, file, "discard", *offset, *len)?;
            chain.discard(*offset, *len)?;
            ("discard", *offset, *len, true)
        }
        Op::Flush => {
            // qemu-io -r flushes too: nothing was written, so there is nothing to do.
            if chain.ensure_writable().is_ok() {
                chain.flush()?;
            }
            return Ok(true);
        }
        Op::Map => {
            print_map(chain)?;
            return Ok(true);
        }
        Op::Sleep { ms } => {
            std::thread::sleep(std::time::Duration::from_millis(*ms));
            return Ok(true);
        }
    };
    if !command.quiet {
        print_done(verb, offset, len, started.elapsed().as_secs_f64());
    }
    Ok(ok)
}

/// Reads `len` bytes at `offset` (in pieces); `Ok(false)` when a byte differs from
/// `pattern`, after printing qemu-io's message.
fn run_read(chain: &Chain, pattern: Option<u8>, offset: u64, len: u64) -> Result<bool> {
    let mut buf = vec![0u8; chunk_len(len)];
    let mut pos = 0;
    let mut ok = true;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        chain.read_at(&mut buf[..n], offset + pos)?;
        if let Some(p) = pattern {
            ok &= buf[..n].iter().all(|&b| b == p);
        }
        pos += n as u64;
    }
    if !ok {
        outln!("Pattern verification failed at offset {offset}, {len} bytes");
    }
    Ok(ok)
}

/// Writes as `data` says; long writes go in pieces that are whole multiples of any
/// cluster size, so the pieces allocate exactly what one request would.
fn run_write(chain: &Chain, data: &WriteData, offset: u64, len: u64) -> Result<()> {
    match data {
        WriteData::Zeroes { unmap } => Ok(chain.write_zeroes(offset, len, *unmap)?),
        WriteData::Pattern(p) => write_pieces(chain, offset, len, |_, buf| {
            buf.fill(*p);
            Ok(())
        }),
        WriteData::Source(path) => {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::open(path)
                .map_err(|e| anyhow!("write: cannot open {}: {e}", path.display()))?;
            write_pieces(chain, offset, len, |pos, buf| {
                file.read_exact_at(buf, pos).map_err(|e| {
                    anyhow!(
                        "write: cannot read {} bytes at offset {pos} of {}: {e}",
                        buf.len(),
                        path.display()
                    )
                })
            })
        }
    }
}

/// For each piece of `0..len`, has `fill(pos, buf)` fill the piece's bytes and writes them
/// at `offset + pos`.
fn write_pieces(
    chain: &Chain,
    offset: u64,
    len: u64,
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; chunk_len(len)];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        fill(pos, &mut buf[..n])?;
        chain.write_at(&buf[..n], offset + pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// The buffer for a transfer of `len` bytes: all of it up to 64 MiB, else 16 MiB pieces
/// (a multiple of every cluster size).
fn chunk_len(len: u64) -> usize {
    const WHOLE: u64 = 64 << 20;
    const PIECE: u64 = 16 << 20;
    (if len <= WHOLE { len } else { PIECE }) as usize
}

/// qemu-io's two lines after a completed transfer.
fn print_done(verb: &str, offset: u64, len: u64, elapsed: f64) {
    outln!("{verb} {len}/{len} bytes at offset {offset}");
    let secs = elapsed.max(1e-9);
    outln!(
        "{}, 1 ops; {:05.2} sec ({}/sec and {:.4} ops/sec)",
        cvtstr(len as f64),
        elapsed,
        cvtstr(len as f64 / secs),
        1.0 / secs
    );
}

/// qemu-io's `map`: the top image's allocated and unallocated ranges, adjacent ranges of
/// the same kind merged. A range is allocated when the top image itself decides what it
/// reads (data or zero flags), whatever its backing file holds.
fn print_map(chain: &Chain) -> Result<()> {
    let top = chain.top();
    let size = chain.size();
    let mut start = 0;
    let mut current: Option<bool> = None;
    let mut pos = 0;
    while pos < size {
        let run = top.lookup(pos, size - pos)?;
        let allocated = run.mapping != Mapping::Unallocated;
        if current.is_some_and(|c| c != allocated) {
            print_map_line(start, pos - start, current == Some(true));
            start = pos;
        }
        current = Some(allocated);
        pos += run.len;
    }
    if let Some(allocated) = current {
        print_map_line(start, size - start, allocated);
    }
    Ok(())
}

fn print_map_line(offset: u64, len: u64, allocated: bool) {
    outln!(
        "{} ({len:#x}) bytes {} at offset {} ({offset:#x})",
        cvtstr(len as f64),
        if allocated {
            "    allocated"
        } else {
            "not allocated"
        },
        cvtstr(offset as f64),
    );
}

/// qemu-io's cvtstr: a size with a binary unit and three decimals unless whole; plain
/// bytes get six decimals unless whole.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, "EiB"),
        ((1u64 << 50) as f64, "PiB"),
        ((1u64 << 40) as f64, "TiB"),
        ((1u64 << 30) as f64, "GiB"),
        ((1u64 << 20) as f64, "MiB"),
        ((1u64 << 10) as f64, "KiB"),
    ];
    for (scale, unit) in UNITS {
        if value >= scale {
            let text = format!("{:.3}", value / scale);
            let text = text.strip_suffix(".000").unwrap_or(&text).to_string();
            return format!("{text} {unit}");
        }
    }
    let text = format!("{value:.6}");
    format!("{} bytes", text.strip_suffix(".000000").unwrap_or(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(text: &str) -> Op {
        parse_command(text).unwrap().op
    }

    #[test]
    fn read_commands_parse_offsets_and_patterns() {
        assert_eq!(
            op("read -P 0xab 64k 0x1000"),
            Op::Read {
                pattern: Some(0xab),
                offset: 65536,
                len: 4096
            }
        );
        assert!(parse_command("read -P 300 0 1").is_err());
        assert!(parse_command("read 0").is_err());
        assert!(parse_command("read -z 0 1").is_err());
    }

    #[test]
    fn write_commands_default_to_pattern_0xcd() {
        assert_eq!(
            op("write 0 512"),
            Op::Write {
                data: WriteData::Pattern(0xcd),
                offset: 0,
                len: 512
            }
        );
        assert_eq!(
            op("write -z -u 1M 64k"),
            Op::Write {
                data: WriteData::Zeroes { unmap: true },
                offset: 1 << 20,
                len: 65536
            }
        );
        let quiet = parse_command("write -q -P 7 0 1").unwrap();
        assert!(quiet.quiet);
    }

    #[test]
    fn conflicting_write_flags_are_refused() {
        assert!(parse_command("write -u 0 512").is_err());
        assert!(parse_command("write -z -P 1 0 512").is_err());
        assert!(parse_command("write -s f -P 1 0 512").is_err());
        assert!(parse_command("write 0").is_err());
        assert!(parse_command("write -c 0 512").is_err());
    }

    #[test]
    fn discard_flush_and_map_parse() {
        assert_eq!(
            op("discard -q 0 64k"),
            Op::Discard {
                offset: 0,
                len: 65536
            }
        );
        assert_eq!(op("flush"), Op::Flush);
        assert_eq!(op("map"), Op::Map);
        assert!(parse_command("map 0").is_err());
        assert!(parse_command("map -q").is_err());
        assert!(parse_command("bogus").is_err());
    }

    #[test]
    fn only_writing_commands_open_for_writing() {
        assert!(!parse_command("read 0 1").unwrap().writes());
        assert!(!parse_command("map").unwrap().writes());
        assert!(parse_command("write -z 0 1").unwrap().writes());
        assert!(parse_command("discard 0 1").unwrap().writes());
    }

    #[test]
    fn sizes_print_like_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1.0), "1 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(505.041748), "505.041748 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(1114112.0), "1.062 MiB");
    }
}
