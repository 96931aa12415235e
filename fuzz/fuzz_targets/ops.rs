//! Operation sequences on a small chain held in memory, against a model of its content.
//! The harness is `qcow2_engine::testing::ops`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::ops(data));
