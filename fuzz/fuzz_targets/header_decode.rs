//! Header::decode and HeaderExtensions::decode on arbitrary bytes.
//! The harness is `qcow2_engine::testing::header_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::header_decode(data));
