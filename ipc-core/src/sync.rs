//! The one place the ring takes its atomics from.
//!
//! Keeping every atomic import behind this module means a model checker
//! (loom) can later be switched in for the ring logic without touching the
//! ring itself.

pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
