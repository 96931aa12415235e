//! stub
use anyhow::Result;
/// Arguments.
#[derive(clap::Args)]
pub struct Args {}
/// Runs.
pub fn run(_args: Args) -> Result<u8> {
    Ok(0)
}
