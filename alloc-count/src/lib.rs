//! A global allocator that counts allocations per thread, for measuring
//! that a code path allocates nothing: stress reports the client threads'
//! allocations per call with it. Only stress depends on this crate; stress
//! is `#![forbid(unsafe_code)]`, so the allocator, an `unsafe impl`, lives
//! here.
//!
//! ```
//! use ipc_alloc_count::{thread_allocations, CountingAllocator};
//!
//! #[global_allocator]
//! static ALLOCATOR: CountingAllocator = CountingAllocator;
//!
//! fn main() {
//!     let before = thread_allocations();
//!     let v = vec![0u8; 64];
//!     assert_eq!(thread_allocations() - before, 1);
//!     let before = thread_allocations();
//!     let sum: u32 = v.iter().map(|&b| u32::from(b)).sum();
//!     assert_eq!((sum, thread_allocations() - before), (0, 0));
//! }
//! ```
//!
//! # Safety
//!
//! [`CountingAllocator`] forwards every call unchanged to
//! [`std::alloc::System`], so it upholds `GlobalAlloc`'s contract exactly
//! as `System` does. The count lives in a const-initialised thread-local
//! `Cell` without a destructor, which neither allocates nor registers
//! anything, so counting cannot recurse into the allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Counts the calling thread's allocations (and reallocations), then
/// forwards to the system allocator. Install it in a binary with
/// `#[global_allocator] static A: CountingAllocator = CountingAllocator;`.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

/// Allocations (including reallocations) made by the calling thread so far
/// (always 0 unless [`CountingAllocator`] is the global allocator).
pub fn thread_allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn count() {
    // `try_with`: during thread teardown the slot may be gone; those
    // allocations are not counted.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged (see the module's Safety section).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`,
        // with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for `dealloc`, with the caller's `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
