//! See `ipcd::fuzzing::exchange`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipcd::fuzzing::exchange(data));
