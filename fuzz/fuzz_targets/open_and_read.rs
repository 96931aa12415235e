//! An arbitrary image opened from memory and read (at most the first 64 MiB).
//! The harness is `qcow2_engine::testing::open_and_read`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::open_and_read(data));
