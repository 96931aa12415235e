//! A backing chain: an image and the images under it, top first.
//!
//! Opening follows each image's backing file name (relative names against the overlay's
//! directory, as QEMU does), probes formats the header does not name, and refuses loops,
//! protocol and `json:` names and chains deeper than a limit.

mod find;
mod open;
mod options;
mod policy;
mod reader;
mod resolve;
mod snapshots;
mod write;

pub use open::Chain;
pub use options::ChainOptions;
pub use policy::BackingPolicy;
pub use reader::ChainReader;
pub use resolve::{ChainRun, ChainRuns};
