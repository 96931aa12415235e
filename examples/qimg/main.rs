//! `qimg`: a qemu-img-style command line over qcow2-engine (see `CLI.md`).
//!
//! Each subcommand lives in its own file and stays thin: it turns parsed arguments into
//! library options, calls one operation and prints the result.
//!
//! Everything goes to stdout through `outln!` and `out!` (`common::write_stdout`), which
//! let a closed stdout end the output quietly; `println!` would panic there, so clippy
//! refuses it here.

#![warn(clippy::print_stdout)]

/// `println!` through [`common::write_stdout`].
macro_rules! outln {
    () => {
        $crate::common::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::common::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` through [`common::write_stdout`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::common::write_stdout(format_args!($($arg)*))
    };
}

mod amend;
mod bench;
mod bitmap;
mod check;
mod checksum;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod dd;
mod docs;
mod du;
mod info;
mod io;
mod map;
mod measure;
mod nbd;
mod pull;
mod rebase;
mod remove;
mod resize;
mod snapshot;
mod tree;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qimg",
    version,
    about = "qemu-img-style tool for qcow2 images",
    after_help = "Man pages and shell completions: qimg --generate-docs DIR"
)]
// Usage errors are qemu-img's: one line and exit code 1, see `usage_error`.
pub(crate) struct Cli {
    /// Refuse backing files and external data files outside DIR (after resolving
    /// symbolic links and `..`), for images that are not trusted. Applies to every
    /// command that opens a backing chain.
    #[arg(long, global = true, value_name = "DIR")]
    confine_backing: Option<std::path::PathBuf>,
    /// Refuse backing files and external data files that are not regular files
    /// (devices, FIFOs, sockets).
    #[arg(long, global = true)]
    regular_backing_only: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new image.
    Create(create::Args),
    /// Show facts about an image (and its backing chain).
    Info(info::Args),
    /// Check an image for consistency and optionally repair it.
    Check(check::Args),
    /// Show the allocation map of an image through its chain.
    Map(map::Args),
    /// Copy an image's content (through its chain), or several images' one after the
    /// other, into a new image or (-n) an existing one, in another format if asked.
    Convert(convert::Args),
    /// Compare the guest-visible content of two images.
    Compare(compare::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// CRC-32 of an image's guest-visible content.
    Checksum(checksum::Args),
    /// Space used by each layer and internal snapshot of a chain.
    Du(du::Args),
    /// Run qemu-io-style commands against an image.
    Io(io::Args),
    /// How large a new image would be.
    Measure(measure::Args),
    /// Commit an image's data into its backing chain.
    Commit(commit::Args),
    /// Copy the data of an image's backing chain into it.
    Pull(pull::Args),
    /// Change an image's backing file.
    Rebase(rebase::Args),
    /// Delete an external snapshot from a tree: its users keep what they show.
    Remove(remove::Args),
    /// Change an image's virtual size.
    Resize(resize::Args),
    /// Change a qcow2 image's options in place.
    Amend(amend::Args),
    /// Show the images in directories as a forest, each under its backing file.
    Tree(tree::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    Bitmap(bitmap::Args),
    /// Time a stream of read or write requests, as qemu-img bench.
    Bench(bench::Args),
    /// Copy a range of an image into a new image, dd-style (bs=, count=, skip=, if=, of=).
    Dd(dd::Args),
    /// Serve an image and its chain over NBD, as qemu-nbd.
    Nbd(nbd::Args),
}

fn main() -> ExitCode {
    raise_open_file_limit();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == docs::OPTION) {
        return generate_docs(&args[1..]);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            return usage_error(&error, subcommand_in(&args));
        }
    };
    common::set_backing_policy(qcow2_engine::BackingPolicy {
        confine_to: cli.confine_backing,
        regular_files_only: cli.regular_backing_only,
    });
    // Exit code for errors: compare reserves 1 for "different".
    let (result, error_code) = match cli.command {
        Command::Create(args) => (create::run(args), 1),
        Command::Info(args) => (info::run(args), 1),
        Command::Check(args) => (check::run(args), 1),
        Command::Map(args) => (map::run(args), 1),
        Command::Convert(args) => (convert::run(args), 1),
        Command::Compare(args) => (compare::run(args), 2),
        Command::Checksum(args) => (checksum::run(args), 1),
        Command::Snapshot(args) => (snapshot::run(args), 1),
        Command::Du(args) => (du::run(args), 1),
        Command::Io(args) => (io::run(args), 1),
        Command::Measure(args) => (measure::run(args), 1),
        Command::Commit(args) => (commit::run(args), 1),
        Command::Pull(args) => (pull::run(args), 1),
        Command::Rebase(args) => (rebase::run(args), 1),
        Command::Remove(args) => (remove::run(args), 1),
        Command::Resize(args) => (resize::run(args), 1),
        Command::Amend(args) => (amend::run(args), 1),
        Command::Tree(args) => (tree::run(args), 1),
        Command::Bitmap(args) => (bitmap::run(args), 1),
        Command::Bench(args) => (bench::run(args), 1),
        Command::Dd(args) => (dd::run(args), 1),
        Command::Nbd(args) => (nbd::run(args), 1),
    };
    // A failed stdout (other than a closed pipe) fails a command that succeeded.
    let result = result.and_then(|code| match common::stdout_error() {
        Some(e) => Err(anyhow::anyhow!("stdout: {e}")),
        None => Ok(code),
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Each error and its causes, once each, on one line.
            eprintln!("qimg: {}", one_line(&format!("{e:#}")));
            ExitCode::from(error_code)
        }
    }
}

/// `qimg --generate-docs DIR`: writes the man pages and completions into DIR and lists
/// them on stdout.
fn generate_docs(args: &[std::ffi::OsString]) -> ExitCode {
    let [dir] = args else {
        eprintln!("qimg: {} takes one directory", docs::OPTION);
        return ExitCode::from(1);
    };
    match docs::generate(std::path::Path::new(dir)) {
        Ok(files) => {
            for file in files {
                outln!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qimg: {}", one_line(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

/// What qimg says and returns when its command line is not a command: help and the
/// version on stdout (exit 0); anything else is a usage error, one line on stderr and exit
/// code 1 as in qemu-img (clap's default is several lines and exit code 2, which `check`
/// users read as "corruptions found").
fn usage_error(error: &clap::Error, command: Option<&str>) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp => {
            out!("{}", error.render());
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayVersion => {
            out!("{}", version_text());
            ExitCode::SUCCESS
        }
        _ => {
            let message = usage_message(&error.render().to_string(), command);
            eprintln!("qimg: {}", one_line(&message));
            ExitCode::from(1)
        }
    }
}

/// `qimg --version`, shaped as qemu-img's: the version line, then what it is.
fn version_text() -> String {
    format!(
        "qimg version {} (qcow2-engine)\n\
         A qemu-img-compatible disk image tool built on qcow2-engine, a pure-Rust qcow2 \
         library\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The first of `args` that names a subcommand.
fn subcommand_in(args: &[String]) -> Option<&str> {
    use clap::CommandFactory;
    let cli = Cli::command();
    args.iter()
        .map(String::as_str)
        .find(|arg| cli.find_subcommand(arg).is_some())
}

/// The one line of a clap error rendered as text: its first paragraph (the message and
/// the lines that complete it, such as the missing arguments or the possible values),
/// without clap's `error: ` and tips, then where help is (on `command`, the subcommand
/// given, if any).
fn usage_message(rendered: &str, command: Option<&str>) -> String {
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or_default();
    let mut message = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    for line in lines.take_while(|line| !line.trim().is_empty()) {
        message.push(' ');
        message.push_str(line.trim());
    }
    match command {
        Some(command) => format!("{message} (try 'qimg {command} --help')"),
        None => format!("{message} (try 'qimg --help')"),
    }
}

/// Raises the soft limit on open files to the hard limit, as many tools do: every layer
/// of a chain keeps its file open and `compare` opens two chains, so a chain deep as the
/// library allows (1024 layers) needs more than the usual soft limit of 1024.
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // No hard limit: ask for as many as a chain could use; the kernel caps it.
    let wanted = limit.maximum.unwrap_or(1 << 16);
    if limit.current.is_some_and(|current| current < wanted) {
        // Failing leaves the limit as it was; deep chains then fail with EMFILE.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: limit.maximum,
            },
        );
    }
}

/// The message with control characters escaped: names in it come from images (a backing
/// file name may hold a newline) and the error must stay one line.
fn one_line(message: &str) -> String {
    let mut line = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::{Cli, one_line, subcommand_in, usage_message};
    use clap::Parser;

    /// The usage error line qimg prints for `args`.
    fn usage(args: &[&str]) -> String {
        let error = Cli::try_parse_from(std::iter::once("qimg").chain(args.iter().copied()))
            .err()
            .expect("a usage error");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        usage_message(&error.render().to_string(), subcommand_in(&args))
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_problem_and_the_help() {
        assert_eq!(
            usage(&["check", "--bogus", "a"]),
            "unexpected argument '--bogus' found (try 'qimg check --help')"
        );
        assert_eq!(
            usage(&["check"]),
            "the following required arguments were not provided: <FILE> \
             (try 'qimg check --help')"
        );
        assert_eq!(
            usage(&["check", "-r", "some", "a"]),
            "invalid value 'some' for '-r <REPAIR>' [possible values: leaks, all] \
             (try 'qimg check --help')"
        );
        assert_eq!(
            usage(&["commit", "-t", "fast", "a"]),
            "invalid value 'fast' for '--cache <CACHE>': Invalid cache option: fast \
             (try 'qimg commit --help')"
        );
        assert_eq!(
            usage(&["--confine-backing", "/x", "bogus"]),
            "unrecognized subcommand 'bogus' (try 'qimg --help')"
        );
        for args in [
            &["check", "-T"][..],
            &[],
            &["snapshot", "-l", "-c", "x", "a"],
        ] {
            assert!(!usage(args).contains('\n'), "{args:?}");
        }
    }

    #[test]
    fn control_characters_in_errors_are_escaped() {
        assert_eq!(one_line("a\nb: x"), "a\\nb: x");
        assert_eq!(one_line("back\ning\tfile\r"), "back\\ning\\tfile\\r");
        assert_eq!(one_line("plain: é"), "plain: é");
    }
}
