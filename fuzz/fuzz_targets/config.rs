#![no_main]
//! Fuzz target `config`: see `broker::fuzzing::config` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::config(data));
