//! A client's whole conversation with the NBD server (negotiation, then requests) as
//! arbitrary bytes, over a chain in memory. The harness is `qcow2_engine::testing::nbd`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::nbd(data));
