//! See `ipc_core::fuzzing::message_assembler`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_core::fuzzing::message_assembler(data));
