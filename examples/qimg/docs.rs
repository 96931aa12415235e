//! `qimg --generate-docs DIR`: the man pages (`qimg.1` and one `qimg-COMMAND.1` per
//! command) and the bash, zsh and fish completions, written from the same clap
//! definitions the command line is parsed with, so they cannot drift from it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::Cli;

/// The option that asks for the documents; not a clap option, since every other qimg
/// command line needs a command.
pub const OPTION: &str = "--generate-docs";

/// Writes the man pages and completions into `dir` (created if missing); returns the
/// files written.
pub fn generate(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: creating", dir.display()))?;
    let failed = |e: std::io::Error| anyhow::anyhow!("{}: {e}", dir.display());
    clap_mangen::generate_to(Cli::command(), dir).map_err(failed)?;
    let mut written: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(failed)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            name.starts_with("qimg") && name.ends_with(".1")
        })
        .collect();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = Cli::command();
        written.push(clap_complete::generate_to(shell, &mut command, "qimg", dir).map_err(failed)?);
    }
    written.sort();
    Ok(written)
}
