//! A global allocator that counts allocations per thread, for measuring
//! that a code path allocates nothing: stress reports the client threads'
//! allocations per call with it. It also keeps each thread's heap bytes
//! (allocated minus freed by that thread) and their peak, for measuring
//! how much a call holds at once ([`thread_heap_peak`]). Only stress depends on this crate; stress
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
//!
//!     ipc_alloc_count::reset_thread_heap_peak();
//!     let base = ipc_alloc_count::thread_heap();
//!     drop(vec![0u8; 1 << 20]);
//!     assert_eq!(ipc_alloc_count::thread_heap(), base);
//!     assert!(ipc_alloc_count::thread_heap_peak() - base >= 1 << 20);
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
    /// Bytes allocated minus bytes freed by this thread (negative when it
    /// frees more than it allocated: memory another thread allocated).
    static HEAP: Cell<i64> = const { Cell::new(0) };
    /// The highest `HEAP` since the thread started or the last
    /// [`reset_thread_heap_peak`].
    static HEAP_PEAK: Cell<i64> = const { Cell::new(0) };
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

/// The calling thread's heap bytes now: allocated minus freed by it.
pub fn thread_heap() -> i64 {
    HEAP.with(Cell::get)
}

/// The highest [`thread_heap`] since the thread started or the last
/// [`reset_thread_heap_peak`].
pub fn thread_heap_peak() -> i64 {
    HEAP_PEAK.with(Cell::get)
}

/// Starts a new peak from the thread's heap bytes now.
pub fn reset_thread_heap_peak() {
    HEAP_PEAK.with(|p| p.set(thread_heap()));
}

fn count() {
    // `try_with`: during thread teardown the slot may be gone; those
    // allocations are not counted.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

/// Adds `delta` bytes to the thread's heap and raises its peak.
fn heap(delta: i64) {
    // As in `count`: nothing during teardown.
    let _ = HEAP.try_with(|h| {
        let now = h.get().wrapping_add(delta);
        h.set(now);
        let _ = HEAP_PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

/// A size as a heap delta (no allocation exceeds `isize::MAX` bytes).
fn bytes(size: usize) -> i64 {
    size as i64
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged (see the module's Safety section).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        heap(bytes(layout.size()));
        // SAFETY: the caller's contract for `alloc` is passed through.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        heap(bytes(layout.size()));
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        heap(-bytes(layout.size()));
        // SAFETY: `ptr` came from this allocator, that is from `System`,
        // with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        heap(bytes(new_size) - bytes(layout.size()));
        // SAFETY: as for `dealloc`, with the caller's `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
