//! `qimg bitmap`: manage persistent dirty bitmaps, as `qemu-img bitmap`. Several
//! operations apply in the order given, so the arguments are read in order rather than by
//! clap's derive (which keeps only the last of each flag).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use qcow2_engine::{Chain, ChainOptions, Format, Image, Layer};

use crate::common::{chain_defaults, open_chain, parse_format, parse_size};

/// Arguments of `qimg bitmap` (read in order; see `parse`).
#[derive(clap::Args)]
#[command(
    disable_help_flag = true,
    override_usage = "qimg bitmap (--add [-g SIZE] [--disable] | --remove | --clear | --enable \
                      | --disable | --merge SOURCE [-b SOURCE_FILE [-F FMT]])... [-f FMT] FILE \
                      BITMAP"
)]
pub struct Args {
    /// Operations, options, FILE and BITMAP, in qemu-img bitmap's order.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    words: Vec<String>,
}

/// One operation on the bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Operation::Add => "add",
            Operation::Remove => "remove",
            Operation::Clear => "clear",
            Operation::Enable => "enable",
            Operation::Disable => "disable",
            Operation::Merge(_) => "merge",
        }
    }
}

/// The command line, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request {
    operations: Vec<Operation>,
    granularity: Option<u64>,
    format: Option<Format>,
    source_file: Option<PathBuf>,
    source_format: Option<Format>,
    file: PathBuf,
    bitmap: String,
}

const NEED_ONE: &str =
    "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge";

fn parse(words: &[String]) -> Result<Request> {
    let mut request = Request::default();
    let mut positional = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        // `--opt=value` and `-oVALUE` as getopt reads them.
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ if word.len() > 2 && !word.starts_with("--") && word.starts_with('-') => {
                (&word[..2], Some(word[2..].to_owned()))
            }
            _ => (word.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| words.next().cloned())
                .ok_or_else(|| anyhow!("option '{name}' requires an argument"))
        };
        match flag {
            "--add" => request.operations.push(Operation::Add),
            "--remove" => request.operations.push(Operation::Remove),
            "--clear" => request.operations.push(Operation::Clear),
            "--enable" => request.operations.push(Operation::Enable),
            "--disable" => request.operations.push(Operation::Disable),
            "--merge" => request.operations.push(Operation::Merge(value("--merge")?)),
            "-g" | "--granularity" => {
                let text = value("-g")?;
                request.granularity =
                    Some(parse_size(&text).map_err(|e| anyhow!("Invalid granularity: {e}"))?);
            }
            "-f" => request.format = Some(parse_format(&value("-f")?).map_err(|e| anyhow!(e))?),
            "-F" => {
                request.source_format = Some(parse_format(&value("-F")?).map_err(|e| anyhow!(e))?)
            }
            "-b" => request.source_file = Some(value("-b")?.into()),
            "--image-opts" | "--object" => bail!("{flag} is not supported"),
            "--" => positional.extend(words.by_ref().cloned()),
            f if f.starts_with('-') && f.len() > 1 => bail!("unrecognized option '{word}'"),
            _ => positional.push(word.clone()),
        }
    }
    if request.operations.is_empty() {
        bail!(NEED_ONE);
    }
    let [file, bitmap] = positional.as_slice() else {
        bail!("Expecting filename and bitmap name");
    };
    let adds = request.operations.contains(&Operation::Add);
    let merges = request
        .operations
        .iter()
        .any(|o| matches!(o, Operation::Merge(_)));
    if request.granularity.is_some() && !adds {
        bail!("granularity only supported with --add");
    }
    if request.source_format.is_some() && request.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if request.source_file.is_some() && !merges {
        bail!("Merge bitmap source file only supported with --merge");
    }
    request.file = file.into();
    request.bitmap = bitmap.clone();
    Ok(request)
}

/// Runs `qimg bitmap`.
pub fn run(args: Args) -> Result<u8> {
    if args.words.iter().any(|w| w == "-h" || w == "--help") {
        outln!("usage: {}", USAGE);
        return Ok(0);
    }
    let request = parse(&args.words)?;
    let options = ChainOptions {
        format: request.format,
        writable: true,
        ..chain_defaults()
    };
    let chain = Chain::open_with(&request.file, &options)?;
    let Layer::Qcow2(image) = chain.top() else {
        bail!(
            "{}: persistent bitmaps need a qcow2 image",
            request.file.display()
        );
    };
    let result = apply(image, &request);
    let closed = chain.close();
    result?;
    closed?;
    Ok(0)
}

const USAGE: &str = "qimg bitmap (--add [-g SIZE] [--disable] | --remove | --clear | --enable \
                     | --disable | --merge SOURCE [-b SOURCE_FILE [-F FMT]])... [-f FMT] FILE BITMAP";

/// Applies the operations in order; the first failure stops them.
fn apply(image: &Image, request: &Request) -> Result<()> {
    // `--add --disable` adds a disabled bitmap, as qemu-img does.
    let disabled = request.operations.contains(&Operation::Disable);
    let name = &request.bitmap;
    for operation in &request.operations {
        let done = match operation {
            Operation::Add => image.add_bitmap(name, request.granularity, !disabled),
            Operation::Remove => image.remove_bitmap(name),
            Operation::Clear => image.clear_bitmap(name),
            Operation::Enable => image.enable_bitmap(name),
            Operation::Disable => image.disable_bitmap(name),
            Operation::Merge(source) => merge_source(image, request, source)
                .and_then(|bitmap| image.merge_bitmap(name, &bitmap)),
        };
        done.map_err(anyhow::Error::from)
            .with_context(|| format!("Operation {} on bitmap {name} failed", operation.name()))?;
    }
    Ok(())
}

/// The bitmap `--merge SOURCE` names: in `-b SOURCE_FILE` (opened read-only), or in the
/// image itself.
fn merge_source(
    image: &Image,
    request: &Request,
    source: &str,
) -> qcow2_engine::Result<qcow2_engine::DirtyBitmap> {
    let Some(path) = &request.source_file else {
        return image.load_bitmap(source);
    };
    let chain = open_chain(path, request.source_format, false)
        .map_err(|e| qcow2_engine::Error::InvalidArgument(format!("{e:#}")))?;
    match chain.top() {
        Layer::Qcow2(other) => other.load_bitmap(source),
        _ => Err(qcow2_engine::Error::InvalidArgument(format!(
            "{}: persistent bitmaps need a qcow2 image",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn operations_keep_their_order_and_options_their_values() {
        let r = parse(&words(
            "--add -g 4k --disable --merge=src -b o.qcow2 -F qcow2 a.qcow2 b",
        ))
        .unwrap();
        assert_eq!(
            r.operations,
            [
                Operation::Add,
                Operation::Disable,
                Operation::Merge("src".into())
            ]
        );
        assert_eq!(r.granularity, Some(4096));
        assert_eq!(r.source_file, Some("o.qcow2".into()));
        assert_eq!((r.file, r.bitmap), ("a.qcow2".into(), "b".into()));
        let r = parse(&words("-g64k --add a b")).unwrap();
        assert_eq!(r.granularity, Some(65536));
    }

    #[test]
    fn usage_errors_are_qemu_imgs() {
        for (line, message) in [
            ("a b", NEED_ONE),
            ("--add a", "Expecting filename and bitmap name"),
            ("--clear -g 4k a b", "granularity only supported with --add"),
            ("--add -F qcow2 a b", "-F only supported with -b"),
            (
                "--add -b x a b",
                "Merge bitmap source file only supported with --merge",
            ),
            ("--merge", "option '--merge' requires an argument"),
            ("--frob a b", "unrecognized option '--frob'"),
        ] {
            assert_eq!(
                parse(&words(line)).unwrap_err().to_string(),
                message,
                "{line}"
            );
        }
    }
}
