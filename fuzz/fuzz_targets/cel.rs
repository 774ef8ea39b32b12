#![no_main]
//! Fuzz target `cel`: see `broker::fuzzing::cel` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::cel(data));
