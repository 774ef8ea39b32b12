#![no_main]
//! Fuzz target `signed_token`: see `broker::fuzzing::signed_token` for what it feeds and which invariants it asserts.
libfuzzer_sys::fuzz_target!(|data: &[u8]| broker::fuzzing::signed_token(data));
