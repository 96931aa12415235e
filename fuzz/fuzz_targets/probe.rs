//! Format probing, the header sizes of the formats only recognised, and the probed raw
//! image's first-sector guard, on arbitrary bytes.
//! The harness is `qcow2_engine::testing::probe`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::probe(data));
