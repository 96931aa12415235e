//! Consistency check and repair, as `qemu-img check [-r leaks|all]`.

mod copied;
mod examine;
mod occupancy;
mod repair;
mod report;

pub use report::{CheckReport, Finding, RepairMode, Severity};
