//! The one place the ring takes its atomics from.
//!
//! Normally these are `std`'s. In this crate's unit tests built with
//! `RUSTFLAGS="--cfg loom"` they are loom's, so the model in
//! `ring/loom_model.rs` runs the ring's own code while loom explores every
//! interleaving and every value a weak load may return. `Region` switches
//! with them (see `region/loom_model.rs`): loom's atomics cannot be projected
//! from raw pointers into a mapping. Only the unit tests switch, because
//! loom is a dev-dependency and only they run the model: any other build
//! under `--cfg loom` (the library for an integration test, another crate)
//! keeps `std`'s.

#[cfg(not(all(test, loom)))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(all(test, loom))]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
