//! An arbitrary image opened from memory, checked, repaired and checked again.
//! The harness is `qcow2_engine::testing::check`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::check(data));
