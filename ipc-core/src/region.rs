//! Raw access to a shared-memory region that another, untrusted process may
//! write at any moment.
//!
//! # Safety
//!
//! This is one of the two modules of `ipc-core` that contain `unsafe`
//! (its stand-in for the loom model, `region/loom_model.rs`, built only for
//! unit tests under `--cfg loom`, has its own `# Safety` section).
//! The rules it enforces for the rest of the crate:
//!
//! - No `&[u8]`, `&mut [u8]` or `&T` of a plain type is ever formed over the
//!   region. Words shared with the peer are reached as atomics projected from
//!   raw pointers ([`AtomicU64::from_ptr`]); an atomic reference is sound even
//!   while the peer writes the same word, because every access to it is
//!   atomic.
//! - Payload bytes are only copied in or out with `ptr::copy_nonoverlapping`.
//!   Between honest ends the copies never race: the ring orders them with
//!   its Release/Acquire pairs. A hostile peer in another process may
//!   scribble over the bytes while they are copied; that race is outside
//!   Rust's memory model (it is another process), and at the machine level
//!   it yields garbage, which every reader validates. No copy reads or writes
//!   outside the region: every offset is bounds checked here, against the
//!   length fixed at construction. Within one process (tests, or an
//!   embedded server and client), only the ring ends touch the bytes.
//! - The memory stays mapped for as long as any `Region` clone exists: a
//!   region holds an `Arc` of the [`SharedMemory`] that owns the mapping.

use std::ptr::NonNull;
use std::sync::Arc;
#[cfg(not(all(test, loom)))]
use std::{fmt, ptr};

#[cfg(not(all(test, loom)))]
use crate::sync::{AtomicU32, AtomicU64};

// Under loom, `Region` keeps the ring's words as loom atomics and its data
// as loom-tracked cells instead of raw memory.
#[cfg(all(test, loom))]
mod loom_model;
#[cfg(all(test, loom))]
pub use loom_model::Region;

/// Memory that can back a [`Region`]: an `mmap`ed segment, or a heap buffer
/// in tests.
///
/// # Safety
///
/// Implementors promise that `as_ptr()` returns the same pointer for the
/// whole life of the value, that `len()` bytes from it are readable and
/// writable for that whole life, and that the pointer is aligned to at least
/// [`REGION_ALIGN`] bytes.
pub unsafe trait SharedMemory: Send + Sync + 'static {
    /// The first byte of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// The length of the memory in bytes.
    fn len(&self) -> usize;
    /// Whether the memory has no bytes (a region needs at least one).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The alignment a region's base must have: one page covers every cache
/// line and atomic placed by the segment layout.
pub const REGION_ALIGN: usize = 4096;

/// A bounds-checked window over shared memory.
///
/// Cloning is cheap (an `Arc`); every clone keeps the memory alive.
#[cfg(not(all(test, loom)))]
#[derive(Clone)]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn SharedMemory>,
}

// SAFETY: `Region` only hands out atomics and copies bytes through raw
// pointers; the memory it points to is shared by design and its owner is
// `Send + Sync`.
#[cfg(not(all(test, loom)))]
unsafe impl Send for Region {}
// SAFETY: as above; no method gives out a non-atomic reference.
#[cfg(not(all(test, loom)))]
unsafe impl Sync for Region {}

#[cfg(not(all(test, loom)))]
impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("base", &self.base).field("len", &self.len).finish()
    }
}

#[cfg(not(all(test, loom)))]
impl Region {
    /// Wraps `memory` in a region.
    ///
    /// # Panics
    ///
    /// Panics if the memory's pointer is null or not aligned to
    /// [`REGION_ALIGN`]: the [`SharedMemory`] implementation broke its
    /// contract.
    pub fn new(memory: Arc<dyn SharedMemory>) -> Region {
        let base = NonNull::new(memory.as_ptr()).expect("shared memory pointer is null");
        assert_eq!(base.as_ptr() as usize % REGION_ALIGN, 0, "shared memory is not aligned to {REGION_ALIGN} bytes");
        Region { base, len: memory.len(), _owner: memory }
    }

    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize, align: usize) {
        check_access(self.len, offset, len, align);
    }

    /// The 64-bit word at `offset`, as an atomic.
    ///
    /// # Panics
    ///
    /// Panics if the word is out of bounds or misaligned; offsets come from
    /// the validated layout, so this is a bug in the caller.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8);
        // SAFETY: the word is in bounds and 8-byte aligned (checked above),
        // it stays mapped while `self` lives (the owner is held), and every
        // access to a shared word goes through atomics, so the peer's
        // concurrent writes are not a data race on this reference.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The 32-bit word at `offset`, as an atomic.
    ///
    /// # Panics
    ///
    /// As [`Region::atomic_u64`].
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4, 4);
        // SAFETY: as in `atomic_u64`, for a 4-byte aligned word.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// Copies `src` into the region at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if the range is out of bounds.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len(), 1);
        // SAFETY: the destination range is inside the region (checked), and
        // `src` is a private buffer, so the two cannot overlap.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(offset), src.len());
        }
    }

    /// Copies `dst.len()` bytes out of the region at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if the range is out of bounds.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len(), 1);
        // SAFETY: the source range is inside the region (checked), and `dst`
        // is a private buffer. The peer may write the source concurrently;
        // the bytes copied are then garbage, which callers validate.
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr(), dst.len());
        }
    }

    /// Copies `len` bytes out of the region at `offset`, appending them to
    /// `dst` without zeroing first.
    ///
    /// # Panics
    ///
    /// Panics if the range is out of bounds.
    pub fn read_append(&self, offset: usize, len: usize, dst: &mut Vec<u8>) {
        self.check(offset, len, 1);
        dst.reserve(len);
        let start = dst.len();
        // SAFETY: the source range is inside the region (checked); the
        // destination is `len` bytes of spare capacity reserved just above,
        // which cannot overlap the region. After the copy those bytes are
        // initialised, so the new length is valid.
        unsafe {
            ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), dst.as_mut_ptr().add(start), len);
            dst.set_len(start + len);
        }
    }
}

/// Panics unless `len` bytes at `offset` lie inside a region of
/// `region_len` bytes and `offset` is a multiple of `align`.
fn check_access(region_len: usize, offset: usize, len: usize, align: usize) {
    let end = offset.checked_add(len);
    assert!(
        end.is_some_and(|end| end <= region_len) && offset % align == 0,
        "region access at offset {offset} of {len} bytes (align {align}) is outside a region of {region_len} bytes"
    );
}

/// A zeroed, page-aligned heap buffer that can back a [`Region`], for tests
/// and for running the ring inside one process.
pub struct HeapMemory {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value; sharing it between
// threads is what a region is for, and all access goes through `Region`.
unsafe impl Send for HeapMemory {}
// SAFETY: as above.
unsafe impl Sync for HeapMemory {}

impl HeapMemory {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`].
    ///
    /// # Panics
    ///
    /// Panics if `len` is zero or the allocation fails.
    pub fn new(len: usize) -> Arc<HeapMemory> {
        assert!(len > 0, "heap memory of zero bytes");
        let layout = std::alloc::Layout::from_size_align(len, REGION_ALIGN).expect("heap memory layout");
        // SAFETY: `layout` has a non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arc::new(HeapMemory { ptr, layout })
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly `layout`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the pointer is fixed for the value's life, `layout.size()` bytes
// are allocated, and the alignment is `REGION_ALIGN`.
unsafe impl SharedMemory for HeapMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_and_atomics_alias_bytes() {
        let region = Region::new(HeapMemory::new(4096));
        region.write(16, &[1, 2, 3, 4]);
        let mut out = [0u8; 4];
        region.read(16, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        region.atomic_u64(64).store(0x0807_0605_0403_0201, crate::sync::Ordering::Relaxed);
        let mut word = [0u8; 8];
        region.read(64, &mut word);
        assert_eq!(word, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut appended = vec![9u8];
        region.read_append(64, 3, &mut appended);
        assert_eq!(appended, [9, 1, 2, 3]);
    }

    #[test]
    #[should_panic(expected = "outside a region")]
    fn out_of_bounds_access_panics_instead_of_touching_memory() {
        let region = Region::new(HeapMemory::new(4096));
        region.write(4094, &[0; 4]);
    }

    #[test]
    #[should_panic(expected = "outside a region")]
    fn misaligned_atomic_panics() {
        let region = Region::new(HeapMemory::new(4096));
        region.atomic_u64(4);
    }
}
