#![no_main]
//! Fuzz target `policy`: see `broker::fuzzing::policy` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::policy(data));
