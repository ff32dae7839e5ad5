//! `Region` as loom sees it (built only under `cfg(loom)`).
//!
//! Loom can only check accesses it tracks, and it cannot project its atomics
//! from raw pointers the way the real region does. So this region keeps the
//! two things the ring touches as loom objects, at the offsets the real
//! segment has them:
//!
//! - the ring control words (`head`, `tail`, `data_waiter`, `space_waiter` of
//!   both rings) as loom atomics, so loom explores every interleaving and
//!   every value a Relaxed or Acquire load may legally return;
//! - the ring data as one loom cell per [`FRAME_ALIGN`] bytes, so a copy in or
//!   out that is not ordered after the peer's conflicting copy by the ring's
//!   Release/Acquire pairs fails the model as a data race. The cells are as
//!   small as the frame alignment so that the producer writing one frame
//!   while the consumer reads the frame before it touches different cells,
//!   as it touches different bytes in a real segment.
//!
//! Every other offset (the segment header) is refused: the model does not
//! use it, and a silent stand-in would hide a mistake.
//!
//! # Safety
//!
//! The only `unsafe` dereferences the pointers loom's cells hand out inside
//! `with`/`with_mut`. Loom tracks each such access and fails the model if
//! two of them conflict without a happens-before edge, which is exactly the
//! property under test; outside the model this type is never built.

use std::fmt;
use std::ptr;
use std::sync::Arc;

use loom::cell::UnsafeCell;

use super::{check_access, SharedMemory};
use crate::frame::FRAME_ALIGN;
use crate::layout::{DATA_START, DATA_WAITER, HEAD, HEADER_SIZE, RING_CONTROL_SIZE, SPACE_WAITER, TAIL};
use crate::sync::{AtomicU32, AtomicU64};

/// A bounds-checked window over a modelled segment; see the module docs.
pub struct Region {
    len: usize,
    model: Arc<Model>,
}

struct Model {
    words64: Vec<(usize, AtomicU64)>,
    words32: Vec<(usize, AtomicU32)>,
    /// Bytes from `DATA_START` to the end, `FRAME_ALIGN` to a cell.
    data: Vec<UnsafeCell<[u8; FRAME_ALIGN]>>,
    _owner: Box<dyn SharedMemory>,
}

// SAFETY: the cells are only reached through `with`/`with_mut`, which loom
// checks for conflicting unordered accesses across its threads; the atomics
// are loom's, which are `Sync`.
unsafe impl Sync for Model {}
// SAFETY: as above; nothing in the model is tied to the creating thread.
unsafe impl Send for Model {}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("len", &self.len).field("model", &"loom").finish()
    }
}

impl Region {
    /// Models `memory`'s length as a segment: zeroed control words and data.
    /// Call it inside `loom::model`.
    pub fn new(memory: impl SharedMemory) -> Region {
        let len = memory.len();
        assert!(len > DATA_START && (len - DATA_START) % FRAME_ALIGN == 0, "a modelled region of {len} bytes");
        let controls = [HEADER_SIZE, HEADER_SIZE + RING_CONTROL_SIZE];
        let words64 = controls.iter().flat_map(|c| [c + HEAD, c + TAIL]).map(|at| (at, AtomicU64::new(0))).collect();
        let words32 = controls
            .iter()
            .flat_map(|c| [c + DATA_WAITER, c + SPACE_WAITER])
            .map(|at| (at, AtomicU32::new(0)))
            .collect();
        let data = (0..(len - DATA_START) / FRAME_ALIGN).map(|_| UnsafeCell::new([0; FRAME_ALIGN])).collect();
        Region { len, model: Arc::new(Model { words64, words32, data, _owner: Box::new(memory) }) }
    }

    /// Another handle to the same model, for the other ends of a segment.
    pub(crate) fn share(&self) -> Region {
        Region { len: self.len, model: Arc::clone(&self.model) }
    }

    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The modelled 64-bit word at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if `offset` is not a ring index word.
    pub(crate) fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        check_access(self.len, offset, 8, 8);
        let word = self.model.words64.iter().find(|(at, _)| *at == offset);
        &word.unwrap_or_else(|| panic!("the loom region models no 64-bit word at {offset}")).1
    }

    /// The modelled 32-bit word at `offset`.
    ///
    /// # Panics
    ///
    /// Panics if `offset` is not a ring waiter word.
    pub(crate) fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        check_access(self.len, offset, 4, 4);
        let word = self.model.words32.iter().find(|(at, _)| *at == offset);
        &word.unwrap_or_else(|| panic!("the loom region models no 32-bit word at {offset}")).1
    }

    /// Calls `f(cell, range in cell, range in the caller's buffer)` for each
    /// data cell that `len` bytes at `offset` cover.
    fn cells(&self, offset: usize, len: usize, mut f: impl FnMut(&UnsafeCell<[u8; FRAME_ALIGN]>, usize, usize, usize)) {
        check_access(self.len, offset, len, 1);
        assert!(offset >= DATA_START, "the loom region models no bytes at {offset}");
        let mut done = 0;
        while done < len {
            let at = offset - DATA_START + done;
            let (cell, within) = (at / FRAME_ALIGN, at % FRAME_ALIGN);
            let n = (FRAME_ALIGN - within).min(len - done);
            f(&self.model.data[cell], within, done, n);
            done += n;
        }
    }

    /// Copies `src` into the region at `offset`, as one tracked write per
    /// cell.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) {
        self.cells(offset, src.len(), |cell, within, from, n| {
            let src = &src[from..from + n];
            // SAFETY: loom checks this write against every other access to
            // the cell (module docs); the pointer is valid for the closure,
            // and `within + n` is at most the cell's `FRAME_ALIGN` bytes.
            cell.with_mut(|bytes| unsafe { ptr::copy_nonoverlapping(src.as_ptr(), bytes.cast::<u8>().add(within), n) });
        });
    }

    /// Copies `dst.len()` bytes out of the region at `offset`, as one
    /// tracked read per cell.
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        self.cells(offset, dst.len(), |cell, within, to, n| {
            let dst = &mut dst[to..to + n];
            // SAFETY: as in `write`, for a read into a private buffer.
            cell.with(|bytes| unsafe { ptr::copy_nonoverlapping(bytes.cast::<u8>().add(within), dst.as_mut_ptr(), n) });
        });
    }
}
