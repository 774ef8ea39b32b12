#![no_main]
//! Fuzz target `request`: see `broker::fuzzing::request` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::request(data));
