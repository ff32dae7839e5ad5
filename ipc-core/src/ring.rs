//! A single-producer single-consumer ring of variable-length frames in
//! shared memory, where the peer is not trusted.
//!
//! # Protocol
//!
//! Words (offsets in [`crate::layout`]):
//!
//! - `head`: bytes ever published by the producer. Written only by the
//!   producer, with Release, after the frames it covers are written.
//! - `tail`: bytes ever released by the consumer. Written only by the
//!   consumer, with Release, after it has copied the frames it covers out.
//! - `data_waiter`: 1 while the consumer is (about to be) asleep waiting for
//!   data; the producer clears it back to 0 when it wakes the consumer.
//! - `space_waiter`: the same, for a producer waiting for free space.
//!
//! Both indices only grow (u64 byte counts: they never wrap in practice).
//! Each side keeps its own index privately and never reads it back from
//! shared memory; the peer's index is read once per refresh into a local,
//! checked, and used only from that local. The checks: 8-byte aligned, never
//! moving backwards, and within what the peer can honestly have reached:
//! a producer's `head` between our read position and what we have released
//! plus the capacity; a consumer's `tail` between our write position minus
//! the capacity and what we have published. A violation is a [`RingError`],
//! never a panic and never an access outside the ring.
//!
//! Happens-before edges:
//!
//! - `SYNC(frame-published)`: the producer's Release store of `head` pairs
//!   with the consumer's Acquire load of `head`; the frame bytes written
//!   before the store are visible after the load.
//! - `SYNC(space-released)`: the consumer's Release store of `tail` pairs with
//!   the producer's Acquire load of `tail`; the consumer's reads of the
//!   released bytes happen before the producer overwrites them.
//!
//! Sleeping without losing a wake-up (`SYNC(sleep-handshake)`), a Dekker
//! pattern with two SeqCst fences:
//!
//! ```text
//! consumer (prepare_sleep)            producer (publish)
//!   data_waiter = 1                     head = h            (Release)
//!   fence(SeqCst)                       fence(SeqCst)
//!   read head: data? -> cancel sleep    read data_waiter: 1? -> clear, wake
//!   else sleep while data_waiter == 1
//! ```
//!
//! The two fences are totally ordered. If the consumer's fence comes first,
//! the producer's load after its own fence sees `data_waiter == 1` and wakes
//! it. If the producer's fence comes first, the consumer's load of `head`
//! sees the new frame and it does not sleep. Either way the frame is not
//! left unseen by a sleeping consumer. The consumer sleeps only while the
//! word still holds 1 (a futex wait on that value, or an eventfd whose
//! counter the producer bumps after clearing it), so a wake that lands
//! between its check and its sleep is not lost either. The same handshake,
//! with `space_waiter` and `tail`, lets a producer sleep until space frees.
//!
//! `ring/loom_model.rs` checks all of this with loom: the ring's own code,
//! one producer and one consumer sleeping on modelled futexes, every
//! interleaving up to a preemption bound; no frame lost, repeated,
//! reordered or torn, no unordered copy, no lost wake-up.
//!
//! # Wrap-around
//!
//! A frame is always contiguous in the ring. When the next frame does not fit
//! before the end, the producer fills the rest of the lap with a pad frame
//! (`FLAG_PAD`, its length covering exactly the rest) and writes the frame at
//! offset 0; if fewer than [`HEADER_LEN`] bytes remain (only 8 can), both
//! sides skip them without a header. The largest payload is half the
//! capacity minus a header, so a maximum frame fits in an empty ring wherever
//! its indices stand.

use std::fmt;

use crate::frame::{frame_size, FrameHeader, FLAG_PAD, FRAME_ALIGN, HEADER_LEN};
use crate::layout::{SegmentLayout, DATA_WAITER, HEAD, SPACE_WAITER, TAIL};
use crate::region::Region;
use crate::sync::{fence, AtomicU32, Ordering};

/// Which of a segment's two rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to daemon.
    Request,
    /// Daemon to client.
    Response,
}

/// A ring's place in a segment, as one of its ends sees it.
#[derive(Debug)]
struct RingRef {
    region: Region,
    control: usize,
    data: usize,
    capacity: u64,
    max_payload: u32,
}

impl RingRef {
    fn new(region: Region, layout: &SegmentLayout, direction: Direction) -> RingRef {
        assert!(region.len() >= layout.segment_size(), "region smaller than the segment layout");
        let (control, data) = layout.ring(direction);
        RingRef { region, control, data, capacity: u64::from(layout.capacity()), max_payload: layout.max_payload() }
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        self.region.atomic_u32(self.control + offset)
    }

    fn data_offset(&self, index: u64) -> usize {
        self.data + (index & (self.capacity - 1)) as usize
    }

    fn to_end(&self, index: u64) -> u64 {
        self.capacity - (index & (self.capacity - 1))
    }

    /// Checks a peer-written index: aligned, within `lo..=hi`, and not below
    /// `floor`, the last value accepted for it.
    fn check_index(&self, theirs: u64, lo: u64, hi: u64, floor: u64, which: Index) -> Result<u64, RingError> {
        if !theirs.is_multiple_of(FRAME_ALIGN as u64) {
            return Err(RingError::MisalignedIndex { which, index: theirs });
        }
        if theirs < lo || theirs > hi || theirs < floor {
            return Err(RingError::IndexOutOfRange { which, index: theirs, low: lo.max(floor), high: hi });
        }
        Ok(theirs)
    }
}

/// Takes the peer's sleep announcement from `waiter`, if one stands: so one
/// announcement gets one wake, however many publishes or releases follow.
/// Returns whether the caller must wake the peer.
///
/// The caller has just issued its `SYNC(sleep-handshake)` fence, which is
/// what orders these accesses after its index store: both are Relaxed.
fn take_announcement(waiter: &AtomicU32) -> bool {
    // A plain load first: while the peer is awake the word reads 0, and the
    // common case costs no locked instruction.
    let seen = waiter.load(Ordering::Relaxed);
    // Clear exactly the value seen, which is what a swap to 0 does whenever
    // the announcement still stands. A compare-exchange rather than a swap
    // because a swap that finds the announcement withdrawn meanwhile still
    // writes its 0, and loom 0.7 may order that write after the peer's next
    // announcement (tokio-rs/loom#254: it does not keep a later store out of
    // the middle of a read-modify-write), reporting a lost wake-up that
    // cannot happen; a compare-exchange that fails writes nothing.
    seen != 0 && waiter.compare_exchange(seen, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok()
}

/// Names the index a [`RingError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    /// The producer's index.
    Head,
    /// The consumer's index.
    Tail,
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Index::Head => "producer index",
            Index::Tail => "consumer index",
        })
    }
}

/// The peer broke the ring protocol. The ring can no longer be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// An index the peer wrote is not 8-byte aligned.
    #[error("{which} {index} is not {FRAME_ALIGN}-byte aligned")]
    MisalignedIndex {
        /// Which index.
        which: Index,
        /// The value read.
        index: u64,
    },
    /// An index the peer wrote is outside the range it may take.
    #[error("{which} {index} is outside the valid range {low}..={high}")]
    IndexOutOfRange {
        /// Which index.
        which: Index,
        /// The value read.
        index: u64,
        /// Lowest value allowed.
        low: u64,
        /// Highest value allowed.
        high: u64,
    },
    /// A frame header has flag bits this version does not know.
    #[error("frame flags {flags:#06x} have unknown bits")]
    UnknownFlags {
        /// The flags read.
        flags: u16,
    },
    /// A frame claims a payload longer than the negotiated maximum.
    #[error("frame length {len} exceeds the negotiated maximum {max}")]
    PayloadTooLarge {
        /// The length claimed.
        len: u32,
        /// The negotiated maximum.
        max: u32,
    },
    /// A frame runs past the end of the ring or past the published index.
    #[error("frame of {size} bytes overruns the {available} bytes available")]
    FrameOverrun {
        /// Bytes the frame occupies.
        size: u64,
        /// Bytes available where it starts.
        available: u64,
    },
    /// A pad frame does not cover exactly the rest of the lap.
    #[error("pad frame length {len} does not cover the {expected} bytes to the end of the ring")]
    BadPad {
        /// The pad's length.
        len: u32,
        /// The length it must have.
        expected: u64,
    },
}

/// Why a frame could not be pushed.
///
/// [`PushError::Corrupt`]'s message includes the [`RingError`]'s, so
/// `source()` is `None`: the chain printed (`{:#}` in anyhow) names the
/// cause once, and so does the message alone, as the daemon logs it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// Not enough free space now; retry after the consumer releases some.
    #[error("ring is full")]
    Full,
    /// The payload is larger than the negotiated maximum; it never fits.
    #[error("payload of {len} bytes exceeds the negotiated maximum {max}")]
    TooLarge {
        /// The payload length.
        len: usize,
        /// The negotiated maximum.
        max: u32,
    },
    /// The consumer broke the protocol.
    #[error("ring is corrupt: {0}")]
    Corrupt(RingError),
}

impl From<RingError> for PushError {
    fn from(e: RingError) -> PushError {
        PushError::Corrupt(e)
    }
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct Producer {
    ring: RingRef,
    /// Next byte to write (private; the shared `head` lags until `publish`).
    head: u64,
    /// The value last stored to the shared `head`.
    published: u64,
    /// The last validated value of the consumer's `tail`.
    cached_tail: u64,
}

impl Producer {
    /// The producer end of `direction`'s ring in a fresh segment (both
    /// indices zero). Only [`crate::Segment::new`] makes ends, once each.
    pub(crate) fn new(region: Region, layout: &SegmentLayout, direction: Direction) -> Producer {
        Producer { ring: RingRef::new(region, layout, direction), head: 0, published: 0, cached_tail: 0 }
    }

    /// The largest payload a frame may carry.
    pub fn max_payload(&self) -> u32 {
        self.ring.max_payload
    }

    /// Re-reads the consumer's index.
    fn refresh_tail(&mut self) -> Result<(), RingError> {
        // SYNC(space-released): pairs with the consumer's Release store in
        // `Consumer::release`; its reads of the freed bytes are done.
        let tail = self.ring.region.atomic_u64(self.ring.control + TAIL).load(Ordering::Acquire);
        // The consumer cannot have released what was never published, nor
        // be more than a ring behind what we wrote.
        let lo = self.head.saturating_sub(self.ring.capacity);
        self.cached_tail = self.ring.check_index(tail, lo, self.published, self.cached_tail, Index::Tail)?;
        Ok(())
    }

    /// Bytes needed to place a frame of `size` bytes at `head`, padding
    /// included.
    fn needed(&self, size: u64) -> u64 {
        let to_end = self.ring.to_end(self.head);
        if size > to_end {
            to_end + size
        } else {
            size
        }
    }

    fn has_room(&self, needed: u64) -> bool {
        self.head + needed - self.cached_tail <= self.ring.capacity
    }

    /// Writes a frame carrying `payload`, unpublished until
    /// [`Producer::publish`]. Never blocks.
    pub fn try_push(&mut self, service: u16, flags: u16, request_id: u64, payload: &[u8]) -> Result<(), PushError> {
        self.try_push_with(service, flags, request_id, payload.len(), |w| w.write_at(0, payload))
    }

    /// Writes a frame of `len` payload bytes whose contents `fill` writes in
    /// place, through a [`PayloadWriter`] over the ring; unpublished until
    /// [`Producer::publish`]. Never blocks: when the frame does not fit,
    /// `fill` is not called and the error is [`PushError::Full`].
    ///
    /// Bytes `fill` leaves unwritten keep what earlier frames of this ring
    /// left there. If `fill` panics, the frame is not pushed.
    pub fn try_push_with<R>(
        &mut self,
        service: u16,
        flags: u16,
        request_id: u64,
        len: usize,
        fill: impl FnOnce(&mut PayloadWriter<'_>) -> R,
    ) -> Result<R, PushError> {
        if len > self.ring.max_payload as usize {
            return Err(PushError::TooLarge { len, max: self.ring.max_payload });
        }
        let size = frame_size(len) as u64;
        let needed = self.needed(size);
        if !self.has_room(needed) {
            self.refresh_tail()?;
            if !self.has_room(needed) {
                return Err(PushError::Full);
            }
        }
        let to_end = self.ring.to_end(self.head);
        if size > to_end {
            // The frame would straddle the end: pad the rest of the lap.
            if to_end >= HEADER_LEN as u64 {
                let pad = FrameHeader {
                    len: (to_end - HEADER_LEN as u64) as u32,
                    service: 0,
                    flags: FLAG_PAD,
                    request_id: 0,
                };
                self.ring.region.copy_in(self.ring.data_offset(self.head), &pad.encode());
            }
            self.head += to_end;
        }
        let header = FrameHeader { len: len as u32, service, flags, request_id };
        let at = self.ring.data_offset(self.head);
        self.ring.region.copy_in(at, &header.encode());
        let mut writer = PayloadWriter { region: &self.ring.region, at: at + HEADER_LEN, len, pos: 0 };
        let result = fill(&mut writer);
        self.head += size;
        Ok(result)
    }

    /// Whether a frame with `len` payload bytes would fit now, re-reading
    /// the consumer's index if the cached one says no.
    pub fn has_space_for(&mut self, len: usize) -> Result<bool, RingError> {
        let needed = self.needed(frame_size(len) as u64);
        if self.has_room(needed) {
            return Ok(true);
        }
        self.refresh_tail()?;
        Ok(self.has_room(needed))
    }

    /// How many bytes the consumer has released since the ring began: its
    /// index, re-read and checked like every read of it (so it never goes
    /// back). A rise since an earlier call means the consumer freed space
    /// meanwhile, even if not enough for the frame the caller waits to push.
    pub fn consumer_released(&mut self) -> Result<u64, RingError> {
        self.refresh_tail()?;
        Ok(self.cached_tail)
    }

    /// Makes every frame pushed so far visible to the consumer. Returns
    /// `true` when the consumer announced that it sleeps and must be woken
    /// (the caller rings the doorbell).
    pub fn publish(&mut self) -> bool {
        if self.head == self.published {
            return false;
        }
        // SYNC(frame-published): pairs with the consumer's Acquire load of
        // `head`; the frames written above are visible after it.
        self.ring.region.atomic_u64(self.ring.control + HEAD).store(self.head, Ordering::Release);
        self.published = self.head;
        // SYNC(sleep-handshake): pairs with the fence in
        // `Consumer::prepare_sleep`.
        fence(Ordering::SeqCst);
        take_announcement(self.ring.word(DATA_WAITER))
    }

    /// Announces that the producer will sleep until a frame of `len` payload
    /// bytes fits. Returns `false` (and withdraws the announcement) if it
    /// fits already; otherwise the caller sleeps while
    /// [`Producer::space_waiter`] holds 1.
    pub fn prepare_wait_space(&mut self, len: usize) -> Result<bool, RingError> {
        // Relaxed: the fence below orders it before the re-check.
        self.ring.word(SPACE_WAITER).store(1, Ordering::Relaxed);
        // SYNC(sleep-handshake): pairs with the fence in `Consumer::release`.
        fence(Ordering::SeqCst);
        if self.has_space_for(len)? {
            self.ring.word(SPACE_WAITER).store(0, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws a space-wait announcement after waking.
    pub fn finish_wait_space(&self) {
        // Relaxed: only a hint for the consumer; a stale 1 costs one wake.
        self.ring.word(SPACE_WAITER).store(0, Ordering::Relaxed);
    }

    /// The word a sleeping producer waits on (futex doorbell).
    pub fn space_waiter(&self) -> &AtomicU32 {
        self.ring.word(SPACE_WAITER)
    }

    /// The word the consumer sleeps on: futex-wake it when
    /// [`Producer::publish`] returns `true`.
    pub fn peer_waiter(&self) -> &AtomicU32 {
        self.ring.word(DATA_WAITER)
    }
}

/// The payload of a frame being pushed, written in place in the ring by
/// [`Producer::try_push_with`].
///
/// It hands out no reference to the ring (the peer can write those bytes):
/// data is copied in through [`PayloadWriter::write_at`] or [`std::io::Write`],
/// exactly once, from the caller's values to shared memory.
#[derive(Debug)]
pub struct PayloadWriter<'a> {
    region: &'a Region,
    at: usize,
    len: usize,
    pos: usize,
}

impl PayloadWriter<'_> {
    /// The payload's length, fixed when the frame was reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to `offset` within the payload.
    ///
    /// # Panics
    ///
    /// Panics if `offset + src.len()` exceeds the payload's length.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        let end = offset.checked_add(src.len());
        assert!(
            end.is_some_and(|end| end <= self.len),
            "write of {} bytes at {offset} past a payload of {} bytes",
            src.len(),
            self.len
        );
        self.region.copy_in(self.at + offset, src);
    }
}

/// Writes sequentially from the start of the payload; a write past its end
/// is cut short (and an empty write reports it, as for a full slice).
impl std::io::Write for PayloadWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.len - self.pos);
        self.write_at(self.pos, &buf[..n]);
        self.pos += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A frame found by [`Consumer::try_peek`], not yet consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The decoded header.
    pub header: FrameHeader,
    at: u64,
    payload: usize,
    size: u64,
}

impl Frame {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.header.len as usize
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.header.len == 0
    }

    /// Where the payload lies in the region, for the fuzzing checks.
    #[cfg(not(loom))]
    pub(crate) fn payload_span(&self) -> std::ops::Range<usize> {
        self.payload..self.payload + self.len()
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct Consumer {
    ring: RingRef,
    /// Next byte to read (private; the shared `tail` lags until `release`).
    tail: u64,
    /// The value last stored to the shared `tail`.
    released: u64,
    /// The last validated value of the producer's `head`.
    cached_head: u64,
}

impl Consumer {
    /// The consumer end of `direction`'s ring in a fresh segment. Only
    /// [`crate::Segment::new`] makes ends, once each.
    pub(crate) fn new(region: Region, layout: &SegmentLayout, direction: Direction) -> Consumer {
        Consumer { ring: RingRef::new(region, layout, direction), tail: 0, released: 0, cached_head: 0 }
    }

    /// The largest payload a frame may carry.
    pub fn max_payload(&self) -> u32 {
        self.ring.max_payload
    }

    fn refresh_head(&mut self) -> Result<(), RingError> {
        // SYNC(frame-published): pairs with the producer's Release store in
        // `Producer::publish`; the frames it covers are visible.
        let head = self.ring.region.atomic_u64(self.ring.control + HEAD).load(Ordering::Acquire);
        // The producer cannot be behind what we read, nor more than a ring
        // ahead of what we handed back: so however fast it publishes, one
        // serving pass reads at most one ring's worth before releasing.
        let hi = self.released.saturating_add(self.ring.capacity);
        self.cached_head = self.ring.check_index(head, self.tail, hi, self.cached_head, Index::Head)?;
        Ok(())
    }

    /// Whether no published frame is waiting, re-reading the producer's
    /// index.
    pub fn is_empty(&mut self) -> Result<bool, RingError> {
        if self.tail != self.cached_head {
            return Ok(false);
        }
        self.refresh_head()?;
        Ok(self.tail == self.cached_head)
    }

    /// The next frame, if one is published, validated against the ring's
    /// bounds and the negotiated maximum. Does not consume it.
    pub fn try_peek(&mut self) -> Result<Option<Frame>, RingError> {
        loop {
            if self.tail == self.cached_head {
                self.refresh_head()?;
                if self.tail == self.cached_head {
                    return Ok(None);
                }
            }
            let available = self.cached_head - self.tail;
            let to_end = self.ring.to_end(self.tail);
            if to_end < HEADER_LEN as u64 {
                // Too short for a header: the producer skipped it and put a
                // frame at the start of the next lap.
                if available <= to_end {
                    return Err(RingError::FrameOverrun { size: to_end, available });
                }
                self.tail += to_end;
                continue;
            }
            if available < HEADER_LEN as u64 {
                return Err(RingError::FrameOverrun { size: HEADER_LEN as u64, available });
            }
            let mut raw = [0u8; HEADER_LEN];
            self.ring.region.copy_out(self.ring.data_offset(self.tail), &mut raw);
            let header = FrameHeader::decode(&raw);
            if header.unknown_flags() != 0 {
                return Err(RingError::UnknownFlags { flags: header.flags });
            }
            if header.is_pad() {
                let expected = to_end - HEADER_LEN as u64;
                if u64::from(header.len) != expected {
                    return Err(RingError::BadPad { len: header.len, expected });
                }
                if available <= to_end {
                    return Err(RingError::FrameOverrun { size: to_end, available });
                }
                self.tail += to_end;
                continue;
            }
            if header.len > self.ring.max_payload {
                return Err(RingError::PayloadTooLarge { len: header.len, max: self.ring.max_payload });
            }
            let size = frame_size(header.len as usize) as u64;
            let room = available.min(to_end);
            if size > room {
                return Err(RingError::FrameOverrun { size, available: room });
            }
            return Ok(Some(Frame {
                header,
                at: self.tail,
                payload: self.ring.data_offset(self.tail) + HEADER_LEN,
                size,
            }));
        }
    }

    /// Copies `frame`'s payload into `out`, replacing its contents. A
    /// buffer reused frame after frame is zeroed only where it grows, so a
    /// run of frames of one length costs one pass over each payload.
    pub fn read_payload(&self, frame: &Frame, out: &mut Vec<u8>) {
        if out.len() < frame.len() {
            out.resize(frame.len(), 0);
        } else {
            out.truncate(frame.len());
        }
        self.ring.region.copy_out(frame.payload, out);
    }

    /// Copies `dst.len()` bytes of `frame`'s payload, from `offset`, into
    /// `dst`: a partial read in place, without copying the whole payload.
    ///
    /// # Panics
    ///
    /// Panics if the range is outside the payload.
    pub fn read_at(&self, frame: &Frame, offset: usize, dst: &mut [u8]) {
        let end = offset.checked_add(dst.len());
        assert!(
            end.is_some_and(|end| end <= frame.len()),
            "read of {} bytes at {offset} past a payload of {} bytes",
            dst.len(),
            frame.len()
        );
        self.ring.region.copy_out(frame.payload + offset, dst);
    }

    /// Consumes `frame`, the one the last `try_peek` returned. Its space is
    /// handed back at the next [`Consumer::release`].
    ///
    /// # Panics
    ///
    /// Panics if `frame` is not the frame at the consumer's position.
    pub fn consume(&mut self, frame: &Frame) {
        assert_eq!(frame.at, self.tail, "consume of a frame that is not the next one");
        self.tail += frame.size;
    }

    /// Peeks, copies out and consumes the next frame.
    pub fn try_pop(&mut self, out: &mut Vec<u8>) -> Result<Option<FrameHeader>, RingError> {
        match self.try_peek()? {
            None => Ok(None),
            Some(frame) => {
                self.read_payload(&frame, out);
                self.consume(&frame);
                Ok(Some(frame.header))
            }
        }
    }

    /// Hands the space of every consumed frame back to the producer. Returns
    /// `true` when the producer announced that it sleeps waiting for space
    /// and must be woken.
    pub fn release(&mut self) -> bool {
        if self.tail == self.released {
            return false;
        }
        // SYNC(space-released): pairs with the producer's Acquire load of
        // `tail`; our copies out of the released bytes are complete.
        self.ring.region.atomic_u64(self.ring.control + TAIL).store(self.tail, Ordering::Release);
        self.released = self.tail;
        // SYNC(sleep-handshake): pairs with the fence in
        // `Producer::prepare_wait_space`.
        fence(Ordering::SeqCst);
        take_announcement(self.ring.word(SPACE_WAITER))
    }

    /// Announces that the consumer will sleep until data arrives. Returns
    /// `false` (and withdraws the announcement) if data is already there;
    /// otherwise the caller sleeps while [`Consumer::data_waiter`] holds 1.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        // Relaxed: the fence below orders it before the re-check.
        self.ring.word(DATA_WAITER).store(1, Ordering::Relaxed);
        // SYNC(sleep-handshake): pairs with the fence in `Producer::publish`.
        fence(Ordering::SeqCst);
        if !self.is_empty()? {
            self.ring.word(DATA_WAITER).store(0, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    /// Withdraws a sleep announcement after waking.
    pub fn finish_sleep(&self) {
        // Relaxed: only a hint for the producer; a stale 1 costs one wake.
        self.ring.word(DATA_WAITER).store(0, Ordering::Relaxed);
    }

    /// The word a sleeping consumer waits on (futex doorbell).
    pub fn data_waiter(&self) -> &AtomicU32 {
        self.ring.word(DATA_WAITER)
    }

    /// The word the producer sleeps on: futex-wake it when
    /// [`Consumer::release`] returns `true`.
    pub fn peer_waiter(&self) -> &AtomicU32 {
        self.ring.word(SPACE_WAITER)
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_model;
