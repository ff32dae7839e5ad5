//! See `ipc_core::fuzzing::ring_consumer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_core::fuzzing::ring_consumer(data));
