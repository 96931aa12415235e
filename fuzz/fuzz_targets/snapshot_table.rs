//! A snapshot table decoded entry by entry.
//! The harness is `qcow2_engine::testing::snapshot_table`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::snapshot_table(data));
