//! Raw access to a shared-memory region that another, untrusted process may
//! write at any moment.
//!
//! # Safety
//!
//! This is one of the two modules of `ipc-core` that contain `unsafe`
//! (its stand-in for the loom model, `region/loom_model.rs`, built only for
//! unit tests under `--cfg loom`, has its own `# Safety` section).
//!
//! Safe code of this crate, and of any crate above it, must not be able to
//! cause a data race on the region, whatever it does: the peer in another
//! process is outside Rust's memory model, but two threads of one process
//! sharing a region (tests, an embedded server and its client, two mappings
//! of one memfd) are not. The rules that make it so:
//!
//! - **Every access is atomic.** No `&[u8]`, `&mut [u8]` or `&T` of a plain
//!   type is ever formed over the region. Words shared with the peer are
//!   reached as atomics projected from raw pointers
//!   ([`AtomicU64::from_ptr`]); payload bytes are copied in and out one
//!   aligned 64-bit word at a time, each word loaded or stored with a
//!   `Relaxed` atomic access ([`Region::copy_in`], [`Region::copy_out`]).
//!   Two such copies racing on the same bytes, or a copy racing a store to a
//!   word, yield garbage bytes (which every reader validates), never
//!   undefined behaviour. Ordering is not the copies' job: the ring orders
//!   them with its Release/Acquire pairs.
//! - **Every byte is always accessed at one size.** Mixed-size racing
//!   atomics are not allowed either, so each offset has one access width,
//!   fixed by the segment layout: the header and the ring control words at
//!   their declared widths (`u64` indices, `u32` waiter words), the ring data
//!   as aligned `u64` words. The methods that reach them are crate-private;
//!   the segment's typed handles (`crate::segment`) are the public way in,
//!   and they never mix widths on one offset.
//! - **Bounds.** Every offset is checked here against the length fixed at
//!   construction: no access leaves the region.
//! - **Lifetime.** The memory stays mapped for as long as any handle to it
//!   exists: a region holds an `Arc` of the [`SharedMemory`] that owns the
//!   mapping. A region is not `Clone`; only the crate shares it, between the
//!   ends of one segment (`crate::segment::Segment::new`), so a ring has one
//!   producer and one consumer per region by construction.
//!
//! Miri checks these rules over a heap-backed region on a machine that has
//! it: `cargo +nightly miri test -p ipc-core --lib -- region ring::tests`
//! (with `PROPTEST_CASES=8` to keep the property test short).

#[cfg(not(all(test, loom)))]
use std::fmt;
use std::ptr::NonNull;
#[cfg(not(all(test, loom)))]
use std::sync::Arc;

#[cfg(not(all(test, loom)))]
use crate::sync::{AtomicU32, AtomicU64, Ordering};

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
/// writable for that whole life, that the pointer is aligned to at least
/// [`REGION_ALIGN`] bytes, and that `len()` is a multiple of [`WORD`].
pub unsafe trait SharedMemory: Send + Sync + 'static {
    /// The first byte of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// The length of the memory in bytes.
    fn len(&self) -> usize;
    /// Whether the memory has no bytes (a region needs at least one word).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The alignment a region's base must have: one page covers every cache
/// line and atomic placed by the segment layout.
pub const REGION_ALIGN: usize = 4096;

/// The unit of a payload copy: one aligned 64-bit word.
pub const WORD: usize = 8;

/// A bounds-checked window over shared memory; see the module docs for
/// what makes it sound.
///
/// Safe code gets no second handle and no untyped access:
///
/// ```compile_fail,E0599
/// # use ipc_core::{HeapMemory, Region};
/// let region = Region::new(HeapMemory::new(8192));
/// let again = region.clone(); // not Clone: one set of ring ends per region
/// ```
///
/// ```compile_fail,E0624
/// # use ipc_core::{HeapMemory, Region};
/// let region = Region::new(HeapMemory::new(8192));
/// region.copy_in(4096, b"bytes"); // crate-private: reach data through a Segment
/// ```
///
/// ```compile_fail,E0624
/// # use ipc_core::{Direction, HeapMemory, Producer, Region, SegmentLayout};
/// let layout = SegmentLayout::new(4096).unwrap();
/// let region = Region::new(HeapMemory::new(layout.segment_size()));
/// let tx = Producer::new(region, &layout, Direction::Request); // only Segment::new makes ends
/// ```
#[cfg(not(all(test, loom)))]
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    _owner: Arc<dyn SharedMemory>,
}

// SAFETY: `Region` only hands out atomics and copies bytes with atomic
// word accesses through raw pointers; the memory it points to is shared by
// design and its owner is `Send + Sync`.
#[cfg(not(all(test, loom)))]
unsafe impl Send for Region {}
// SAFETY: as above; no method gives out a non-atomic reference.
#[cfg(not(all(test, loom)))]
unsafe impl Sync for Region {}

/// Keeps a [`Region`]'s memory alive and nothing else: see
/// [`Region::retain`]. The memory is released when the last region, ring
/// end and `Retained` of it are gone.
#[cfg(not(all(test, loom)))]
pub struct Retained {
    _owner: Arc<dyn SharedMemory>,
}

#[cfg(not(all(test, loom)))]
impl fmt::Debug for Retained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retained").field("len", &self._owner.len()).finish()
    }
}

#[cfg(not(all(test, loom)))]
impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("base", &self.base).field("len", &self.len).finish()
    }
}

#[cfg(not(all(test, loom)))]
impl Region {
    /// Takes `memory` as a region.
    ///
    /// # Panics
    ///
    /// Panics if the memory's pointer is null or not aligned to
    /// [`REGION_ALIGN`], or its length is zero or not a multiple of
    /// [`WORD`]: the [`SharedMemory`] implementation broke its contract.
    pub fn new(memory: impl SharedMemory) -> Region {
        let base = NonNull::new(memory.as_ptr()).expect("shared memory pointer is null");
        assert_eq!(base.as_ptr() as usize % REGION_ALIGN, 0, "shared memory is not aligned to {REGION_ALIGN} bytes");
        let len = memory.len();
        assert!(len > 0 && len.is_multiple_of(WORD), "shared memory of {len} bytes is not a positive number of words");
        Region { base, len, _owner: Arc::new(memory) }
    }

    /// Another handle to the same memory, for the other ends of a segment.
    /// Crate-private: outside code cannot make two producers of one ring.
    pub(crate) fn share(&self) -> Region {
        Region { base: self.base, len: self.len, _owner: Arc::clone(&self._owner) }
    }

    /// A handle that keeps the memory alive (mapped) without giving any
    /// access to it: its owner can let the region and its ends go and
    /// release the memory later, elsewhere (the daemon unmaps closed
    /// sessions' segments off its workers).
    pub fn retain(&self) -> Retained {
        Retained { _owner: Arc::clone(&self._owner) }
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

    /// The 64-bit word at `offset`, as an atomic. Only for offsets the
    /// layout declares as 64-bit words (see the module docs).
    ///
    /// # Panics
    ///
    /// Panics if the word is out of bounds or misaligned; offsets come from
    /// the validated layout, so this is a bug in the caller.
    pub(crate) fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8, 8);
        // SAFETY: the word is in bounds and 8-byte aligned (checked above),
        // it stays mapped while `self` lives (the owner is held), and every
        // access to it goes through atomics of this width, so the peer's
        // concurrent writes are not a data race on this reference.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The 32-bit word at `offset`, as an atomic. Only for offsets the
    /// layout declares as 32-bit words.
    ///
    /// # Panics
    ///
    /// As [`Region::atomic_u64`].
    pub(crate) fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check(offset, 4, 4);
        // SAFETY: as in `atomic_u64`, for a 4-byte aligned word.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// The `count` aligned words from `offset`, as atomics.
    fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        self.check(offset, count * WORD, WORD);
        // SAFETY: the words are in bounds and aligned (checked), mapped
        // while `self` lives, and every access to them is atomic (module
        // docs): a shared slice of atomics over them is sound, as each
        // element is an `AtomicU64` that may be accessed concurrently.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset).cast::<AtomicU64>(), count) }
    }

    /// Copies `src` into the region at `offset`, one `Relaxed` atomic word
    /// store at a time. The bytes of a partly covered first or last word
    /// that lie outside the range are read and stored back: the caller owns
    /// the whole words the range touches (a frame is word-aligned, so a
    /// producer writing its own frame does).
    ///
    /// # Panics
    ///
    /// Panics if the range is out of bounds.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len(), 1);
        if src.is_empty() {
            return;
        }
        let first = offset - offset % WORD;
        let end = offset + src.len();
        let words = self.words(first, end.div_ceil(WORD) - first / WORD);
        let mut src = src;
        let mut words = words.iter();
        let lead = offset - first;
        if lead != 0 || src.len() < WORD {
            // A partial first word: merge with the bytes around the range.
            let word = words.next().expect("the range covers a word");
            let n = (WORD - lead).min(src.len());
            let mut bytes = word.load(Ordering::Relaxed).to_ne_bytes();
            bytes[lead..lead + n].copy_from_slice(&src[..n]);
            word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
            src = &src[n..];
        }
        // Four words a pass, then one: fewer branches per word lets the
        // core issue the (plain, `Relaxed`) stores back to back.
        let whole = src.len() / WORD;
        let (body, rest) = words.as_slice().split_at(whole);
        let mut words = rest.iter();
        let mut quads = src.chunks_exact(4 * WORD);
        let mut body_quads = body.chunks_exact(4);
        for (chunk, quad) in quads.by_ref().zip(body_quads.by_ref()) {
            let chunk: &[u8; 4 * WORD] = chunk.try_into().expect("four words");
            let quad: &[AtomicU64; 4] = quad.try_into().expect("four words");
            for (i, word) in quad.iter().enumerate() {
                let bytes: [u8; WORD] = chunk[i * WORD..(i + 1) * WORD].try_into().expect("a word");
                word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
            }
        }
        let mut chunks = quads.remainder().chunks_exact(WORD);
        for (chunk, word) in chunks.by_ref().zip(body_quads.remainder()) {
            word.store(u64::from_ne_bytes(chunk.try_into().expect("a word")), Ordering::Relaxed);
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            let word = words.next().expect("the range covers its last word");
            let mut bytes = word.load(Ordering::Relaxed).to_ne_bytes();
            bytes[..tail.len()].copy_from_slice(tail);
            word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
        }
    }

    /// Copies `dst.len()` bytes out of the region at `offset`, one `Relaxed`
    /// atomic word load at a time. If a peer writes the source meanwhile,
    /// the bytes copied are garbage, which callers validate.
    ///
    /// # Panics
    ///
    /// Panics if the range is out of bounds.
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len(), 1);
        if dst.is_empty() {
            return;
        }
        let first = offset - offset % WORD;
        let end = offset + dst.len();
        let words = self.words(first, end.div_ceil(WORD) - first / WORD);
        let mut dst = dst;
        let mut words = words.iter();
        let lead = offset - first;
        if lead != 0 || dst.len() < WORD {
            let word = words.next().expect("the range covers a word");
            let n = (WORD - lead).min(dst.len());
            let bytes = word.load(Ordering::Relaxed).to_ne_bytes();
            let (head, rest) = dst.split_at_mut(n);
            head.copy_from_slice(&bytes[lead..lead + n]);
            dst = rest;
        }
        // As in `copy_in`: four words a pass, then one.
        let whole = dst.len() / WORD;
        let (body, rest) = words.as_slice().split_at(whole);
        let mut words = rest.iter();
        let mut quads = dst.chunks_exact_mut(4 * WORD);
        let mut body_quads = body.chunks_exact(4);
        for (chunk, quad) in quads.by_ref().zip(body_quads.by_ref()) {
            let chunk: &mut [u8; 4 * WORD] = chunk.try_into().expect("four words");
            let quad: &[AtomicU64; 4] = quad.try_into().expect("four words");
            for (i, word) in quad.iter().enumerate() {
                chunk[i * WORD..(i + 1) * WORD].copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
            }
        }
        let mut chunks = quads.into_remainder().chunks_exact_mut(WORD);
        for (chunk, word) in chunks.by_ref().zip(body_quads.remainder()) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let word = words.next().expect("the range covers its last word");
            let n = tail.len();
            tail.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes()[..n]);
        }
    }
}

/// Panics unless `len` bytes at `offset` lie inside a region of
/// `region_len` bytes and `offset` is a multiple of `align`.
fn check_access(region_len: usize, offset: usize, len: usize, align: usize) {
    let end = offset.checked_add(len);
    assert!(
        end.is_some_and(|end| end <= region_len) && offset.is_multiple_of(align),
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
    /// Panics if `len` is zero or not a multiple of [`WORD`], or the
    /// allocation fails.
    pub fn new(len: usize) -> HeapMemory {
        assert!(len > 0 && len.is_multiple_of(WORD), "heap memory of {len} bytes is not a positive number of words");
        let layout = std::alloc::Layout::from_size_align(len, REGION_ALIGN).expect("heap memory layout");
        // SAFETY: `layout` has a non-zero size (asserted above).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        HeapMemory { ptr, layout }
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly `layout`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the pointer is fixed for the value's life, `layout.size()` bytes
// are allocated, the alignment is `REGION_ALIGN`, and the size a multiple
// of `WORD` (asserted in `new`).
unsafe impl SharedMemory for HeapMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// The copy the rings use, and plain `memcpy`, over a heap region: for the
/// ring bench's comparison of the two (hidden: not part of the API).
#[doc(hidden)]
#[cfg(not(all(test, loom)))]
pub mod bench {
    use super::{HeapMemory, Region};

    /// A heap-backed region of `len` bytes.
    pub fn region(len: usize) -> Region {
        Region::new(HeapMemory::new(len))
    }

    /// `Region::copy_in` (word-wise `Relaxed` atomic stores).
    pub fn atomic_copy_in(region: &Region, offset: usize, src: &[u8]) {
        region.copy_in(offset, src);
    }

    /// `Region::copy_out` (word-wise `Relaxed` atomic loads).
    pub fn atomic_copy_out(region: &Region, offset: usize, dst: &mut [u8]) {
        region.copy_out(offset, dst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_at_every_alignment_and_length() {
        let region = Region::new(HeapMemory::new(4096));
        let pattern: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for offset in 0..24 {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 41, 48, 56, 63, 64, 65, 200] {
                // Fill around the range first, to see that the copy leaves
                // the neighbouring bytes of its partial words alone.
                region.copy_in(0, &[0xEE; 512]);
                region.copy_in(offset, &pattern[..len]);
                let mut out = vec![0u8; len];
                region.copy_out(offset, &mut out);
                assert_eq!(out, pattern[..len], "offset {offset} len {len}");
                let mut around = vec![0u8; 512];
                region.copy_out(0, &mut around);
                assert!(around[..offset].iter().all(|&b| b == 0xEE), "before: offset {offset} len {len}");
                assert!(around[offset + len..].iter().all(|&b| b == 0xEE), "after: offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn copies_and_atomics_alias_the_same_bytes() {
        let region = Region::new(HeapMemory::new(4096));
        region.atomic_u64(64).store(0x0807_0605_0403_0201, Ordering::Relaxed);
        let mut word = [0u8; 8];
        region.copy_out(64, &mut word);
        assert_eq!(word, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    #[should_panic(expected = "outside a region")]
    fn out_of_bounds_access_panics_instead_of_touching_memory() {
        let region = Region::new(HeapMemory::new(4096));
        region.copy_in(4094, &[0; 4]);
    }

    #[test]
    #[should_panic(expected = "outside a region")]
    fn misaligned_atomic_panics() {
        let region = Region::new(HeapMemory::new(4096));
        region.atomic_u64(4);
    }

    /// Two threads copying into and out of the same bytes at once: with
    /// atomic word copies this is garbage at worst, not undefined
    /// behaviour (Miri, where available, checks it: see the module docs).
    #[test]
    fn racing_copies_are_atomic_word_accesses() {
        let layout = crate::layout::SegmentLayout::new(4096).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        let other = region.share();
        let writer = std::thread::spawn(move || {
            for i in 0..200u8 {
                other.copy_in(4096 + 3, &[i; 61]);
            }
        });
        let mut out = [0u8; 61];
        for _ in 0..200 {
            region.copy_out(4096 + 3, &mut out);
        }
        writer.join().unwrap();
        region.copy_out(4096 + 3, &mut out);
        assert_eq!(out, [199; 61]);
    }
}
