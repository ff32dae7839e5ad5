//! The layout of a session's shared segment, version [`LAYOUT_VERSION`].
//!
//! One memfd per session holds a header and two rings:
//!
//! ```text
//! offset          size        contents
//! 0               128         SegmentHeader (written by the daemon: once
//!                             at creation, and its `closed` word at a
//!                             graceful close)
//! 128             384         request ring control  (client -> daemon)
//! 512             384         response ring control (daemon -> client)
//! 4096            capacity    request ring data
//! 4096+capacity   capacity    response ring data
//! ```
//!
//! A ring's control block puts each word on its own [`CACHE_LINE`]-sized
//! line, by writer: the producer's index, the consumer's index, and the two
//! waiter words (rarely written; read by the peer after each publish).
//!
//! ```text
//! +0    head          u64  written by the producer only
//! +128  tail          u64  written by the consumer only
//! +256  data_waiter   u32  consumer announces it sleeps until data arrives
//! +260  space_waiter  u32  producer announces it sleeps until space frees
//! ```
//!
//! The header's `closed` word (offset 32, u64) is 0 while the session is
//! open. When the daemon ends a session on purpose (it is shutting down), it
//! stores [`CLOSED_BIT`] ORed with the id of the last request it took from
//! the request ring before it hangs up: a request with a higher id was never
//! taken, so never executed. A daemon that dies leaves the word at 0, and
//! the fate of unanswered requests is unknown. Only the client reads it,
//! about its own session, so a client writing it fools no one but itself.
//!
//! All integers are little-endian (the only byte order this transport runs
//! on: both processes share one machine).

use crate::error::LayoutError;
use crate::region::Region;
use crate::ring::Direction;
use crate::sync::Ordering;

/// `b"IPCDSEG\0"` read as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"IPCDSEG\0");
/// Bumped whenever any offset or meaning in this module changes.
pub const LAYOUT_VERSION: u32 = 2;
/// The line size both processes agree on. 128 rather than 64 keeps the
/// adjacent-line prefetcher of x86 from coupling the two indices.
pub const CACHE_LINE: usize = 128;
/// Bytes of the segment header.
pub const HEADER_SIZE: usize = 128;
/// Bytes of one ring control block.
pub const RING_CONTROL_SIZE: usize = 3 * CACHE_LINE;
/// Where ring data starts: one page, so data never shares a page with the
/// control words.
pub const DATA_START: usize = 4096;
/// The smallest ring capacity accepted.
pub const MIN_RING_CAPACITY: u32 = 4096;
/// The ring capacity a client asks for unless told otherwise (the daemon
/// keeps segments of it ready).
pub const DEFAULT_RING_CAPACITY: u32 = 64 * 1024;
/// The largest ring capacity accepted (1 GiB).
pub const MAX_RING_CAPACITY: u32 = 1 << 30;

/// Offsets inside a ring control block.
pub(crate) const HEAD: usize = 0;
pub(crate) const TAIL: usize = CACHE_LINE;
pub(crate) const DATA_WAITER: usize = 2 * CACHE_LINE;
pub(crate) const SPACE_WAITER: usize = 2 * CACHE_LINE + 4;

// Header field offsets.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_CAPACITY: usize = 12;
const H_MAX_PAYLOAD: usize = 16;
const H_SEGMENT_SIZE: usize = 24;
pub(crate) const H_CLOSED: usize = 32;

/// Set in the header's `closed` word once the daemon closed the session on
/// purpose; the low 63 bits hold the id of the last request it took.
pub const CLOSED_BIT: u64 = 1 << 63;

const _: () = assert!(HEADER_SIZE + 2 * RING_CONTROL_SIZE <= DATA_START);
const _: () = assert!(SPACE_WAITER + 4 <= RING_CONTROL_SIZE);
const _: () = assert!(H_CLOSED + 8 <= HEADER_SIZE);

/// Where everything sits in a segment whose rings hold `capacity` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    capacity: u32,
}

impl SegmentLayout {
    /// The layout for rings of `capacity` bytes each.
    ///
    /// The capacity must be a power of two between [`MIN_RING_CAPACITY`] and
    /// [`MAX_RING_CAPACITY`].
    pub fn new(capacity: u32) -> Result<SegmentLayout, LayoutError> {
        if !capacity.is_power_of_two() || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&capacity) {
            return Err(LayoutError::BadCapacity { capacity });
        }
        Ok(SegmentLayout { capacity })
    }

    /// The nearest valid capacity at or above `requested`, clamped to
    /// `[MIN_RING_CAPACITY, max]`.
    pub fn fit_capacity(requested: u32, max: u32) -> u32 {
        let max = max.clamp(MIN_RING_CAPACITY, MAX_RING_CAPACITY);
        let max = if max.is_power_of_two() { max } else { max.next_power_of_two() / 2 };
        requested.max(MIN_RING_CAPACITY).checked_next_power_of_two().unwrap_or(MAX_RING_CAPACITY).min(max)
    }

    /// The smallest valid capacity whose rings carry payloads of `payload`
    /// bytes, or the largest capacity if none does.
    pub fn capacity_for_payload(payload: usize) -> u32 {
        let need = payload.saturating_add(crate::frame::HEADER_LEN).saturating_mul(2);
        need.clamp(MIN_RING_CAPACITY as usize, MAX_RING_CAPACITY as usize).next_power_of_two() as u32
    }

    /// A layout with rings far smaller than [`MIN_RING_CAPACITY`], so that
    /// the loom model (`ring/loom_model.rs`) fills a ring with a few frames
    /// and wraps it within a handful of steps. Nothing else uses it: both
    /// real processes only accept what [`SegmentLayout::new`] accepts.
    #[cfg(all(test, loom))]
    pub(crate) fn for_model(capacity: u32) -> SegmentLayout {
        assert!(
            capacity.is_power_of_two() && capacity >= 4 * crate::frame::HEADER_LEN as u32,
            "model capacity {capacity}"
        );
        SegmentLayout { capacity }
    }

    /// Bytes of ring data per direction.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The largest payload one frame may carry.
    ///
    /// Half the ring minus a header: a frame of that size always fits once
    /// the ring is empty, wherever the indices stand (see `ring`).
    pub fn max_payload(&self) -> u32 {
        self.capacity / 2 - crate::frame::HEADER_LEN as u32
    }

    /// Total bytes of the segment.
    pub fn segment_size(&self) -> usize {
        DATA_START + 2 * self.capacity as usize
    }

    /// Offsets of the control block and the data of the ring that carries
    /// `direction`.
    pub fn ring(&self, direction: Direction) -> (usize, usize) {
        match direction {
            Direction::Request => (self.request_control(), self.request_data()),
            Direction::Response => (self.response_control(), self.response_data()),
        }
    }

    /// Offset of the request ring's control block.
    pub fn request_control(&self) -> usize {
        HEADER_SIZE
    }

    /// Offset of the response ring's control block.
    pub fn response_control(&self) -> usize {
        HEADER_SIZE + RING_CONTROL_SIZE
    }

    /// Offset of the request ring's data.
    pub fn request_data(&self) -> usize {
        DATA_START
    }

    /// Offset of the response ring's data.
    pub fn response_data(&self) -> usize {
        DATA_START + self.capacity as usize
    }

    /// Writes the segment header. Done once by the daemon, before the
    /// segment is sealed and sent.
    ///
    /// # Panics
    ///
    /// Panics if the region is smaller than [`SegmentLayout::segment_size`].
    pub fn write_header(&self, region: &Region) {
        assert!(region.len() >= self.segment_size(), "region smaller than the segment");
        region.atomic_u64(H_MAGIC).store(SEGMENT_MAGIC, Ordering::Relaxed);
        region.atomic_u32(H_VERSION).store(LAYOUT_VERSION, Ordering::Relaxed);
        region.atomic_u32(H_CAPACITY).store(self.capacity, Ordering::Relaxed);
        region.atomic_u32(H_MAX_PAYLOAD).store(self.max_payload(), Ordering::Relaxed);
        region.atomic_u64(H_SEGMENT_SIZE).store(self.segment_size() as u64, Ordering::Relaxed);
        region.atomic_u64(H_CLOSED).store(0, Ordering::Relaxed);
    }

    /// Reads and checks the header of a received segment against what the
    /// handshake announced. Relaxed loads suffice: the header was written
    /// before the fd was sent, and the `sendmsg`/`recvmsg` pair orders it.
    pub fn read_header(region: &Region, expected_capacity: u32) -> Result<SegmentLayout, LayoutError> {
        if region.len() < DATA_START {
            return Err(LayoutError::TooSmall { len: region.len(), need: DATA_START });
        }
        let magic = region.atomic_u64(H_MAGIC).load(Ordering::Relaxed);
        if magic != SEGMENT_MAGIC {
            return Err(LayoutError::BadMagic { found: magic });
        }
        let version = region.atomic_u32(H_VERSION).load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(LayoutError::BadVersion { found: version, expected: LAYOUT_VERSION });
        }
        let capacity = region.atomic_u32(H_CAPACITY).load(Ordering::Relaxed);
        if capacity != expected_capacity {
            return Err(LayoutError::Mismatch {
                field: "capacity",
                found: capacity as u64,
                expected: expected_capacity as u64,
            });
        }
        let layout = SegmentLayout::new(capacity)?;
        let max_payload = region.atomic_u32(H_MAX_PAYLOAD).load(Ordering::Relaxed);
        if max_payload != layout.max_payload() {
            return Err(LayoutError::Mismatch {
                field: "max_payload",
                found: max_payload as u64,
                expected: layout.max_payload() as u64,
            });
        }
        let size = region.atomic_u64(H_SEGMENT_SIZE).load(Ordering::Relaxed);
        if size != layout.segment_size() as u64 || region.len() < layout.segment_size() {
            return Err(LayoutError::Mismatch {
                field: "segment_size",
                found: region.len() as u64,
                expected: layout.segment_size() as u64,
            });
        }
        Ok(layout)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::region::HeapMemory;

    #[test]
    fn capacity_must_be_a_power_of_two_in_range() {
        assert!(SegmentLayout::new(4096).is_ok());
        assert!(SegmentLayout::new(1 << 20).is_ok());
        assert!(matches!(SegmentLayout::new(5000), Err(LayoutError::BadCapacity { capacity: 5000 })));
        assert!(SegmentLayout::new(2048).is_err());
        assert!(SegmentLayout::new(1 << 31).is_err());
    }

    #[test]
    fn fit_capacity_rounds_up_and_clamps() {
        assert_eq!(SegmentLayout::fit_capacity(0, 1 << 20), 4096);
        assert_eq!(SegmentLayout::fit_capacity(5000, 1 << 20), 8192);
        assert_eq!(SegmentLayout::fit_capacity(u32::MAX, 1 << 20), 1 << 20);
        assert_eq!(SegmentLayout::fit_capacity(1 << 20, 3 << 20), 1 << 20);
        assert_eq!(SegmentLayout::fit_capacity(4 << 20, 3 << 20), 2 << 20);
    }

    #[test]
    fn capacity_for_payload_carries_the_payload() {
        assert_eq!(SegmentLayout::capacity_for_payload(0), MIN_RING_CAPACITY);
        for payload in [64usize, 2032, 2033, 1 << 20, (1 << 20) + 1] {
            let layout = SegmentLayout::new(SegmentLayout::capacity_for_payload(payload)).unwrap();
            assert!(layout.max_payload() as usize >= payload, "{payload}");
            // And it is the smallest: half of it would not do.
            if layout.capacity() > MIN_RING_CAPACITY {
                assert!((layout.capacity() / 2 / 2 - 16) < payload as u32, "{payload}");
            }
        }
        assert_eq!(SegmentLayout::capacity_for_payload(usize::MAX), MAX_RING_CAPACITY);
    }

    #[test]
    fn header_round_trips_and_rejects_tampering() {
        let layout = SegmentLayout::new(8192).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        layout.write_header(&region);
        assert_eq!(SegmentLayout::read_header(&region, 8192).unwrap(), layout);
        assert!(matches!(
            SegmentLayout::read_header(&region, 4096),
            Err(LayoutError::Mismatch { field: "capacity", .. })
        ));
        region.atomic_u32(H_VERSION).store(99, Ordering::Relaxed);
        assert!(matches!(SegmentLayout::read_header(&region, 8192), Err(LayoutError::BadVersion { found: 99, .. })));
        region.atomic_u64(H_MAGIC).store(7, Ordering::Relaxed);
        assert!(matches!(SegmentLayout::read_header(&region, 8192), Err(LayoutError::BadMagic { found: 7 })));
    }

    #[test]
    fn closed_word_starts_open_and_keeps_the_last_request() {
        let layout = SegmentLayout::new(4096).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        region.atomic_u64(H_CLOSED).store(u64::MAX, Ordering::Relaxed);
        layout.write_header(&region);
        let words = crate::Segment::new(region, &layout).words;
        assert_eq!(words.closed_after(), None);
        words.mark_closed(0);
        assert_eq!(words.closed_after(), Some(0));
        words.mark_closed(41);
        assert_eq!(words.closed_after(), Some(41));
    }

    #[test]
    fn rings_do_not_overlap() {
        let l = SegmentLayout::new(4096).unwrap();
        assert!(l.request_control() + RING_CONTROL_SIZE <= l.response_control());
        assert!(l.response_control() + RING_CONTROL_SIZE <= l.request_data());
        assert_eq!(l.request_data() + 4096, l.response_data());
        assert_eq!(l.response_data() + 4096, l.segment_size());
    }
}
