//! See `ipc_core::fuzzing::frame_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_core::fuzzing::frame_decoder(data));
