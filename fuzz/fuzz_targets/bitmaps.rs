//! Persistent bitmaps: a bitmap directory decoded (and re-encoded), or an image whose
//! bitmaps are loaded, changed through writes and bitmap operations, stored and loaded
//! again. The harness is `qcow2_engine::testing::bitmaps`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qcow2_engine::testing::bitmaps(data));
