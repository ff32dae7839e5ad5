//! A session's segment, split once into the four ring ends and the words
//! both sides share.
//!
//! [`Segment::new`] takes the [`Region`] by value and hands out each ring
//! end exactly once: the client keeps the request ring's producer and the
//! response ring's consumer, the daemon the other two, and a test in one
//! process may keep all four. Since a region is not `Clone`, no safe code
//! can make a second producer or consumer of a ring over the same region.
//! (Two mappings of one memfd in one process are two regions; the ends of
//! each then race on the same bytes, which is garbage but, every access
//! being atomic, never undefined behaviour: see `region`.)
//!
//! [`SharedWords`] reaches the words outside the rings' own bookkeeping:
//! the header's `closed` word, and for programs that play a hostile peer,
//! every ring index, waiter word and data byte, at the width the layout
//! gives each, so that even scribbling stays sound.

use std::fmt;

use crate::layout::{SegmentLayout, DATA_WAITER, HEAD, H_CLOSED, SPACE_WAITER, TAIL};
use crate::region::Region;
use crate::ring::{Consumer, Direction, Index, Producer};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Which waiter word of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiter {
    /// Set by a consumer that sleeps until data arrives.
    Data,
    /// Set by a producer that sleeps until space frees.
    Space,
}

/// Every end of a segment's two rings, each handed out once, and the shared
/// words.
#[derive(Debug)]
pub struct Segment {
    /// Writes requests: the client's.
    pub request_producer: Producer,
    /// Reads requests: the daemon's.
    pub request_consumer: Consumer,
    /// Writes replies: the daemon's.
    pub response_producer: Producer,
    /// Reads replies: the client's.
    pub response_consumer: Consumer,
    /// The header's `closed` word and the rings' raw words.
    pub words: SharedWords,
}

impl Segment {
    /// Splits `region`, laid out as `layout` says, into its ring ends. Both
    /// rings start empty from this side's point of view (each end keeps its
    /// own index, starting at 0).
    ///
    /// # Panics
    ///
    /// Panics if `region` is smaller than [`SegmentLayout::segment_size`].
    pub fn new(region: Region, layout: &SegmentLayout) -> Segment {
        assert!(region.len() >= layout.segment_size(), "region smaller than the segment layout");
        Segment {
            request_producer: Producer::new(region.share(), layout, Direction::Request),
            request_consumer: Consumer::new(region.share(), layout, Direction::Request),
            response_producer: Producer::new(region.share(), layout, Direction::Response),
            response_consumer: Consumer::new(region.share(), layout, Direction::Response),
            words: SharedWords { region, layout: *layout },
        }
    }
}

/// The words of a segment outside what the ring ends keep private, each at
/// the width the layout declares.
pub struct SharedWords {
    region: Region,
    layout: SegmentLayout,
}

impl fmt::Debug for SharedWords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedWords").field("capacity", &self.layout.capacity()).finish_non_exhaustive()
    }
}

impl SharedWords {
    /// Another handle on the same words (the region is shared, not
    /// copied), for a thread of this side that must reach them too.
    pub fn share(&self) -> SharedWords {
        SharedWords { region: self.region.share(), layout: self.layout }
    }

    /// Records in the header that the daemon closes the session on purpose
    /// and took no request after `last_taken` (0: none at all). Done by the
    /// daemon just before it hangs up; see `layout`.
    pub fn mark_closed(&self, last_taken: u64) {
        let word = crate::layout::CLOSED_BIT | (last_taken & !crate::layout::CLOSED_BIT);
        // SYNC(closed-marked): pairs with the Acquire load in `closed_after`;
        // the replies published before are visible after it.
        self.region.atomic_u64(H_CLOSED).store(word, Ordering::Release);
    }

    /// The id of the last request the daemon took, if it closed the session
    /// on purpose (see [`SharedWords::mark_closed`]); `None` while open or
    /// after a crash.
    pub fn closed_after(&self) -> Option<u64> {
        // SYNC(closed-marked): pairs with the Release store in `mark_closed`.
        let word = self.region.atomic_u64(H_CLOSED).load(Ordering::Acquire);
        (word & crate::layout::CLOSED_BIT != 0).then_some(word & !crate::layout::CLOSED_BIT)
    }

    /// Reads and checks the segment header again, as
    /// [`SegmentLayout::read_header`] did before the split.
    pub fn read_header(&self, expected_capacity: u32) -> Result<SegmentLayout, crate::LayoutError> {
        SegmentLayout::read_header(&self.region, expected_capacity)
    }

    /// A ring's producer (`Head`) or consumer (`Tail`) index.
    pub fn index(&self, direction: Direction, which: Index) -> &AtomicU64 {
        let (control, _) = self.layout.ring(direction);
        self.region.atomic_u64(control + if which == Index::Head { HEAD } else { TAIL })
    }

    /// A ring's waiter word (a futex word).
    pub fn waiter(&self, direction: Direction, which: Waiter) -> &AtomicU32 {
        let (control, _) = self.layout.ring(direction);
        self.region.atomic_u32(control + if which == Waiter::Data { DATA_WAITER } else { SPACE_WAITER })
    }

    /// Copies `bytes` into a ring's data at `offset` from its start, as the
    /// producer's copies do (atomic words; the partly covered words at either
    /// end keep their other bytes).
    ///
    /// # Panics
    ///
    /// Panics if the bytes would end past the ring's data.
    pub fn write_data(&self, direction: Direction, offset: usize, bytes: &[u8]) {
        let (_, data) = self.layout.ring(direction);
        self.check_data(offset, bytes.len());
        self.region.copy_in(data + offset, bytes);
    }

    /// Copies `dst.len()` bytes out of a ring's data at `offset` from its
    /// start.
    ///
    /// # Panics
    ///
    /// Panics if the range ends past the ring's data.
    pub fn read_data(&self, direction: Direction, offset: usize, dst: &mut [u8]) {
        let (_, data) = self.layout.ring(direction);
        self.check_data(offset, dst.len());
        self.region.copy_out(data + offset, dst);
    }

    fn check_data(&self, offset: usize, len: usize) {
        let capacity = self.layout.capacity() as usize;
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= capacity),
            "{len} bytes at offset {offset} overrun a ring of {capacity} bytes"
        );
    }

    /// The region, for this crate's tests that scribble by offset.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn region(&self) -> &Region {
        &self.region
    }
}
