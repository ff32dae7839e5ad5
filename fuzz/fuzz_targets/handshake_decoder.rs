//! See `ipc_core::fuzzing::handshake_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_core::fuzzing::handshake_decoder(data));
