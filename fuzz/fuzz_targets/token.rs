#![no_main]
//! Fuzz target `token`: see `broker::fuzzing::token` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::token(data));
