//! `qimg`: a qemu-img-style command line over qcow2-engine (see `CLI.md`).
//!
//! Each subcommand lives in its own file and stays thin: it turns parsed arguments into
//! library options, calls one operation and prints the result.

mod amend;
mod checksum;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
mod info;
mod io;
mod map;
mod measure;
mod pull;
mod rebase;
mod resize;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "qimg", version, about = "qemu-img-style tool for qcow2 images")]
struct Cli {
    /// Refuse backing files outside DIR (after resolving symbolic links and `..`), for
    /// images that are not trusted. Applies to every command that opens a backing chain.
    #[arg(long, global = true, value_name = "DIR")]
    confine_backing: Option<std::path::PathBuf>,
    /// Refuse backing files that are not regular files (devices, FIFOs, sockets).
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
    /// Show the allocation map of an image through its chain.
    Map(map::Args),
    /// Convert an image (through its chain) to another format.
    Convert(convert::Args),
    /// Compare the guest-visible content of two images.
    Compare(compare::Args),
    /// List, create, apply or delete internal snapshots.
    Snapshot(snapshot::Args),
    /// CRC-32 of an image's guest-visible content.
    Checksum(checksum::Args),
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
    /// Change an image's virtual size.
    Resize(resize::Args),
    /// Change a qcow2 image's options in place.
    Amend(amend::Args),
}

fn main() -> ExitCode {
    common::report_broken_pipe_as_an_error();
    let cli = Cli::parse();
    common::set_backing_policy(qcow2_engine::BackingPolicy {
        confine_to: cli.confine_backing,
        regular_files_only: cli.regular_backing_only,
    });
    // Exit code for errors: compare reserves 1 for "different".
    let (result, error_code) = match cli.command {
        Command::Create(args) => (create::run(args), 1),
        Command::Info(args) => (info::run(args), 1),
        Command::Map(args) => (map::run(args), 1),
        Command::Convert(args) => (convert::run(args), 1),
        Command::Compare(args) => (compare::run(args), 2),
        Command::Checksum(args) => (checksum::run(args), 1),
        Command::Snapshot(args) => (snapshot::run(args), 1),
        Command::Io(args) => (io::run(args), 1),
        Command::Measure(args) => (measure::run(args), 1),
        Command::Commit(args) => (commit::run(args), 1),
        Command::Pull(args) => (pull::run(args), 1),
        Command::Rebase(args) => (rebase::run(args), 1),
        Command::Resize(args) => (resize::run(args), 1),
        Command::Amend(args) => (amend::run(args), 1),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Library errors already say everything (file, context, cause) in their
            // Display; CLI errors carry their context in anyhow's chain.
            match e.downcast_ref::<qcow2_engine::Error>() {
                Some(lib) => eprintln!("qimg: {lib}"),
                None => eprintln!("qimg: {e:#}"),
            }
            ExitCode::from(error_code)
        }
    }
}
