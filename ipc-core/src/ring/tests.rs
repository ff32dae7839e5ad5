use std::collections::VecDeque;

use proptest::prelude::*;

use super::*;
use crate::frame::FLAG_ERROR;
use crate::layout::SegmentLayout;
use crate::region::HeapMemory;

/// The request ring's two ends, and a handle to scribble by offset.
fn ring(capacity: u32) -> (Region, Producer, Consumer) {
    let layout = SegmentLayout::new(capacity).unwrap();
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    let segment = crate::Segment::new(region, &layout);
    (segment.words.region().share(), segment.request_producer, segment.request_consumer)
}

/// Where the request ring's control block sits: the same offset whatever
/// the ring's capacity.
fn control() -> usize {
    SegmentLayout::new(4096).unwrap().request_control()
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed as usize * 31 + i) as u8).collect()
}

#[test]
fn empty_ring_has_nothing() {
    let (_r, _p, mut c) = ring(4096);
    let mut out = Vec::new();
    assert_eq!(c.try_pop(&mut out).unwrap(), None);
    assert!(c.is_empty().unwrap());
}

#[test]
fn unpublished_frames_are_invisible() {
    let (_r, mut p, mut c) = ring(4096);
    p.try_push(1, 0, 7, b"hello").unwrap();
    let mut out = Vec::new();
    assert_eq!(c.try_pop(&mut out).unwrap(), None);
    p.publish();
    let h = c.try_pop(&mut out).unwrap().unwrap();
    assert_eq!((h.service, h.flags, h.request_id, h.len), (1, 0, 7, 5));
    assert_eq!(out, b"hello");
}

#[test]
fn consumer_released_rises_with_each_release() {
    let (_r, mut p, mut c) = ring(4096);
    for id in 0..3 {
        p.try_push(0, 0, id, &[1; 48]).unwrap();
    }
    p.publish();
    assert_eq!(p.consumer_released().unwrap(), 0);
    let mut out = Vec::new();
    c.try_pop(&mut out).unwrap().unwrap();
    assert_eq!(p.consumer_released().unwrap(), 0, "popped but not yet released");
    c.release();
    assert_eq!(p.consumer_released().unwrap(), 64);
    c.try_pop(&mut out).unwrap().unwrap();
    c.try_pop(&mut out).unwrap().unwrap();
    c.release();
    assert_eq!(p.consumer_released().unwrap(), 192);
}

#[test]
fn full_ring_refuses_then_accepts_after_release() {
    let (_r, mut p, mut c) = ring(4096);
    let body = [0xAB; 64 - 16];
    let mut pushed = 0;
    loop {
        match p.try_push(0, 0, pushed, &body) {
            Ok(()) => pushed += 1,
            Err(PushError::Full) => break,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(pushed, 4096 / 64);
    p.publish();
    let mut out = Vec::new();
    assert_eq!(c.try_pop(&mut out).unwrap().unwrap().request_id, 0);
    // Consumed but not released: the producer still sees a full ring.
    assert_eq!(p.try_push(0, 0, 99, &body), Err(PushError::Full));
    c.release();
    p.try_push(0, 0, 99, &body).unwrap();
}

#[test]
fn frames_that_would_straddle_the_end_wrap_with_a_pad() {
    let (_r, mut p, mut c) = ring(4096);
    let mut out = Vec::new();
    // 3 frames of 1200 bytes leave 496 bytes before the end; a fourth frame
    // of 1200 bytes would straddle it and must be padded to the next lap.
    for id in 0..3 {
        p.try_push(0, 0, id, &payload(id, 1200 - 16)).unwrap();
    }
    p.publish();
    for _ in 0..3 {
        c.try_pop(&mut out).unwrap().unwrap();
    }
    c.release();
    p.try_push(0, 0, 3, &payload(3, 1200 - 16)).unwrap();
    p.publish();
    let h = c.try_pop(&mut out).unwrap().unwrap();
    assert_eq!(h.request_id, 3);
    assert_eq!(out, payload(3, 1200 - 16));
    // 3600 (three frames) + 496 (pad) + 1200 bytes consumed.
    c.release();
    let tail = _r.atomic_u64(control() + TAIL).load(Ordering::Relaxed);
    assert_eq!(tail, 4096 + 1200);
}

#[test]
fn eight_byte_remnant_is_skipped_without_a_header() {
    let (_r, mut p, mut c) = ring(4096);
    let mut out = Vec::new();
    // Two frames of 2040 bytes leave exactly 16 bytes; one more 8 => leave 8.
    p.try_push(0, 0, 0, &payload(0, 2040 - 16)).unwrap();
    p.try_push(0, 0, 1, &payload(1, 2048 - 16)).unwrap();
    p.publish();
    assert_eq!(c.try_pop(&mut out).unwrap().unwrap().request_id, 0);
    assert_eq!(c.try_pop(&mut out).unwrap().unwrap().request_id, 1);
    c.release();
    // head is at 4088: 8 bytes remain, too few for a pad header.
    p.try_push(0, 0, 2, &payload(2, 100)).unwrap();
    p.publish();
    let h = c.try_pop(&mut out).unwrap().unwrap();
    assert_eq!(h.request_id, 2);
    assert_eq!(out, payload(2, 100));
}

#[test]
fn maximum_frame_fits_wherever_the_empty_ring_stands() {
    for offset in (16usize..4096).step_by(8) {
        let (_r, mut p, mut c) = ring(4096);
        let mut out = Vec::new();
        // Move both indices to `offset` with frames of at most 1024 bytes;
        // the last one takes the remainder (at least 16 bytes).
        let mut at = 0;
        while at < offset {
            let step = if offset - at > 1024 + 16 { 1024 } else { offset - at };
            p.try_push(0, 0, 0, &payload(0, step - 16)).unwrap();
            p.publish();
            c.try_pop(&mut out).unwrap().unwrap();
            c.release();
            at += step;
        }
        let max = p.max_payload() as usize;
        assert_eq!(max, 2048 - 16);
        p.try_push(0, 0, 1, &payload(1, max)).unwrap_or_else(|e| panic!("at offset {offset}: {e}"));
        p.publish();
        assert_eq!(c.try_pop(&mut out).unwrap().unwrap().len as usize, max);
        assert_eq!(out, payload(1, max));
    }
}

#[test]
fn frame_over_the_maximum_is_refused() {
    let (_r, mut p, _c) = ring(4096);
    let max = p.max_payload();
    assert_eq!(
        p.try_push(0, 0, 0, &vec![0; max as usize + 1]),
        Err(PushError::TooLarge { len: max as usize + 1, max })
    );
}

#[test]
fn head_behind_tail_is_an_error() {
    let (r, mut p, mut c) = ring(4096);
    let mut out = Vec::new();
    p.try_push(0, 0, 0, &[1; 48]).unwrap();
    p.publish();
    c.try_pop(&mut out).unwrap();
    c.release();
    // The producer "rewinds" its published index below our consumer index.
    r.atomic_u64(control() + HEAD).store(0, Ordering::Relaxed);
    assert!(matches!(c.try_pop(&mut out), Err(RingError::IndexOutOfRange { which: Index::Head, index: 0, .. })));
}

#[test]
fn head_beyond_capacity_is_an_error() {
    let (r, _p, mut c) = ring(4096);
    r.atomic_u64(control() + HEAD).store(4096 + 8, Ordering::Relaxed);
    assert!(matches!(c.try_peek(), Err(RingError::IndexOutOfRange { which: Index::Head, index: 4104, .. })));
    r.atomic_u64(control() + HEAD).store(u64::MAX - 7, Ordering::Relaxed);
    assert!(c.try_peek().is_err());
}

#[test]
fn misaligned_head_is_an_error() {
    let (r, _p, mut c) = ring(4096);
    r.atomic_u64(control() + HEAD).store(20, Ordering::Relaxed);
    assert!(matches!(c.try_peek(), Err(RingError::MisalignedIndex { which: Index::Head, index: 20 })));
}

#[test]
fn tail_beyond_head_is_an_error_for_the_producer() {
    let (r, mut p, _c) = ring(4096);
    let body = [0u8; 4096 / 2 - 16];
    p.try_push(0, 0, 0, &body).unwrap();
    p.try_push(0, 0, 1, &body).unwrap();
    r.atomic_u64(control() + TAIL).store(1 << 20, Ordering::Relaxed);
    assert!(matches!(
        p.try_push(0, 0, 2, &[0; 8]),
        Err(PushError::Corrupt(RingError::IndexOutOfRange { which: Index::Tail, .. }))
    ));
}

#[test]
fn tail_moving_backwards_is_an_error() {
    let (r, mut p, mut c) = ring(4096);
    let body = [0u8; 1000];
    let mut out = Vec::new();
    p.try_push(0, 0, 0, &body).unwrap();
    p.try_push(0, 0, 1, &body).unwrap();
    p.publish();
    c.try_pop(&mut out).unwrap();
    c.try_pop(&mut out).unwrap();
    c.release();
    p.try_push(0, 0, 2, &body).unwrap();
    p.try_push(0, 0, 3, &body).unwrap(); // refreshes the tail (2032)
    r.atomic_u64(control() + TAIL).store(8, Ordering::Relaxed);
    p.try_push(0, 0, 4, &body).unwrap_err();
}

#[test]
fn length_beyond_the_maximum_is_an_error() {
    let (r, mut p, mut c) = ring(4096);
    p.try_push(0, 0, 0, &[0; 64]).unwrap();
    p.publish();
    // Rewrite the header's length field in place.
    let data = SegmentLayout::new(4096).unwrap().request_data();
    r.copy_in(data, &70_000u32.to_le_bytes());
    assert_eq!(c.try_peek(), Err(RingError::PayloadTooLarge { len: 70_000, max: 2032 }));
}

#[test]
fn length_beyond_the_published_index_is_an_error() {
    let (r, mut p, mut c) = ring(4096);
    p.try_push(0, 0, 0, &[0; 64]).unwrap();
    p.publish();
    let data = SegmentLayout::new(4096).unwrap().request_data();
    r.copy_in(data, &1000u32.to_le_bytes());
    assert!(matches!(c.try_peek(), Err(RingError::FrameOverrun { .. })));
}

#[test]
fn unknown_flags_and_bad_pads_are_errors() {
    let (r, mut p, mut c) = ring(4096);
    p.try_push(0, 0x4000, 0, &[0; 8]).unwrap();
    p.publish();
    assert_eq!(c.try_peek(), Err(RingError::UnknownFlags { flags: 0x4000 }));

    let (r2, mut p2, mut c2) = ring(4096);
    p2.try_push(0, 0, 0, &[0; 8]).unwrap();
    p2.publish();
    let data = SegmentLayout::new(4096).unwrap().request_data();
    r2.copy_in(data + 6, &FLAG_PAD.to_le_bytes());
    assert!(matches!(c2.try_peek(), Err(RingError::BadPad { .. })));
    drop(r);
}

#[test]
fn sleep_announcement_is_seen_by_the_producer_once() {
    let (_r, mut p, mut c) = ring(4096);
    assert!(c.prepare_sleep().unwrap(), "empty ring: may sleep");
    assert_eq!(c.data_waiter().load(Ordering::Relaxed), 1);
    p.try_push(0, 0, 0, b"x").unwrap();
    assert!(p.publish(), "the sleeping consumer must be woken");
    assert_eq!(c.data_waiter().load(Ordering::Relaxed), 0);
    p.try_push(0, 0, 1, b"y").unwrap();
    assert!(!p.publish(), "one announcement, one wake");
    assert!(!c.prepare_sleep().unwrap(), "data is waiting: must not sleep");
    assert_eq!(c.data_waiter().load(Ordering::Relaxed), 0);
}

#[test]
fn space_wait_announcement_is_seen_by_the_consumer() {
    let (_r, mut p, mut c) = ring(4096);
    let body = [0u8; 2000];
    p.try_push(0, 0, 0, &body).unwrap();
    p.try_push(0, 0, 1, &body).unwrap();
    p.publish();
    assert!(p.prepare_wait_space(2000).unwrap());
    let mut out = Vec::new();
    c.try_pop(&mut out).unwrap();
    assert!(c.release(), "the waiting producer must be woken");
    assert!(!p.prepare_wait_space(2000).unwrap());
}

#[test]
fn error_flag_round_trips() {
    let (_r, mut p, mut c) = ring(4096);
    p.try_push(3, FLAG_ERROR, 9, b"boom").unwrap();
    p.publish();
    let mut out = Vec::new();
    let h = c.try_pop(&mut out).unwrap().unwrap();
    assert!(h.is_error());
    assert_eq!(out, b"boom");
}

#[test]
fn threads_pass_every_frame_in_order() {
    let layout = SegmentLayout::new(4096).unwrap();
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    let crate::Segment { request_producer: mut p, request_consumer: mut c, .. } = crate::Segment::new(region, &layout);
    const N: u64 = 50_000;
    let producer = std::thread::spawn(move || {
        for id in 0..N {
            let body = payload(id, (id % 300) as usize);
            loop {
                match p.try_push(0, 0, id, &body) {
                    Ok(()) => break,
                    Err(PushError::Full) => {
                        p.publish();
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            if id % 7 == 0 {
                p.publish();
            }
        }
        p.publish();
    });
    let mut out = Vec::new();
    let mut next = 0;
    while next < N {
        match c.try_pop(&mut out).unwrap() {
            Some(h) => {
                assert_eq!(h.request_id, next);
                assert_eq!(out, payload(next, (next % 300) as usize));
                next += 1;
                if next % 5 == 0 {
                    c.release();
                }
            }
            None => {
                c.release();
                std::thread::yield_now();
            }
        }
    }
    producer.join().unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    /// Push a frame of this many payload bytes, with `try_push`.
    Push(usize),
    /// The same with `try_push_with`, written in two pieces in place.
    PushInPlace(usize),
    Publish,
    /// Take a frame with `try_pop`.
    Pop,
    /// Take a frame with `try_peek`, `read_at` in two pieces, `consume`.
    PeekRead,
    Release,
    /// The consumer announces a sleep (and withdraws it at once if data is
    /// there), as before waiting.
    PrepareSleep,
    FinishSleep,
    /// The producer announces a wait for room for this many payload bytes.
    PrepareWaitSpace(usize),
    FinishWaitSpace,
}

fn len(max: usize) -> impl Strategy<Value = usize> {
    // Mostly small frames, which wrap at any offset; some up to the maximum
    // and just past it.
    prop_oneof![6 => 0usize..300, 3 => 0..=max, 1 => max - 8..max + 24]
}

fn op(max: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => len(max).prop_map(Op::Push),
        2 => len(max).prop_map(Op::PushInPlace),
        2 => Just(Op::Publish),
        3 => Just(Op::Pop),
        2 => Just(Op::PeekRead),
        2 => Just(Op::Release),
        1 => Just(Op::PrepareSleep),
        1 => Just(Op::FinishSleep),
        1 => (0..=max).prop_map(Op::PrepareWaitSpace),
        1 => Just(Op::FinishWaitSpace),
    ]
}

/// The ring as a byte count and a `VecDeque` of frames: where each frame
/// goes (padding included), which are published, consumed and released,
/// and which side announced a sleep.
struct Model {
    capacity: u64,
    max: usize,
    /// Frames pushed and not yet taken: id, service, flags, payload, and the
    /// bytes they take in the ring with any pad or remnant before them.
    queue: VecDeque<(u64, u16, u16, Vec<u8>, u64)>,
    /// How many of `queue` are published.
    published: usize,
    /// Bytes written, published, taken and released.
    head: u64,
    taken: u64,
    released: u64,
    data_waiter: bool,
    space_waiter: bool,
}

impl Model {
    fn new(capacity: u32) -> Model {
        Model {
            capacity: u64::from(capacity),
            max: capacity as usize / 2 - HEADER_LEN,
            queue: VecDeque::new(),
            published: 0,
            head: 0,
            taken: 0,
            released: 0,
            data_waiter: false,
            space_waiter: false,
        }
    }

    /// Bytes a frame of `len` payload bytes takes at the current head: its
    /// size, plus the rest of the lap when it does not fit before the end.
    fn needed(&self, len: usize) -> u64 {
        let size = frame_size(len) as u64;
        let to_end = self.capacity - self.head % self.capacity;
        if size > to_end {
            to_end + size
        } else {
            size
        }
    }

    /// Whether a push must succeed: only what the consumer released is free.
    fn fits(&self, len: usize) -> bool {
        self.head + self.needed(len) - self.released <= self.capacity
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The ring behaves exactly like the model, whatever the sequence of
    /// operations and frame sizes: frames come out published, in order,
    /// byte for byte, with their headers; a push fails if and only if the
    /// released space cannot hold it (pads included), so the ring neither
    /// overwrites unreleased bytes nor refuses free ones; the consumer's
    /// index moves by exactly the frames, pads and remnants it passed; and
    /// a publish or release asks for a wake-up exactly once per announced
    /// sleep, and only when it hands the sleeper something.
    #[test]
    fn ring_matches_a_vecdeque_model(
        (capacity, ops) in prop_oneof![Just(4096u32), Just(8192u32)].prop_flat_map(|capacity| {
            let max = capacity as usize / 2 - HEADER_LEN;
            (Just(capacity), proptest::collection::vec(op(max), 1..400))
        }),
        seed in any::<u32>(),
    ) {
        let (r, mut p, mut c) = ring(capacity);
        let mut m = Model::new(capacity);
        let tail_word = r.atomic_u64(control() + TAIL);
        let mut next_id = u64::from(seed);
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Push(len) | Op::PushInPlace(len) => {
                    let (id, service, flags) = (next_id, next_id as u16, if next_id % 3 == 0 { FLAG_ERROR } else { 0 });
                    let body = payload(id, len);
                    let result = if let Op::Push(_) = op {
                        p.try_push(service, flags, id, &body)
                    } else {
                        p.try_push_with(service, flags, id, len, |w| {
                            w.write_at(len / 2, &body[len / 2..]);
                            w.write_at(0, &body[..len / 2]);
                        })
                    };
                    if len > m.max {
                        prop_assert_eq!(result, Err(PushError::TooLarge { len, max: m.max as u32 }));
                    } else if m.fits(len) {
                        prop_assert_eq!(result, Ok(()), "push of {} bytes at {} with {} released", len, m.head, m.released);
                        let needed = m.needed(len);
                        m.head += needed;
                        m.queue.push_back((id, service, flags, body, needed));
                        next_id = next_id.wrapping_add(1);
                    } else {
                        prop_assert_eq!(result, Err(PushError::Full));
                    }
                }
                Op::Publish => {
                    // Every frame takes bytes, so unpublished frames are
                    // unpublished bytes.
                    let fresh = m.published < m.queue.len();
                    prop_assert_eq!(p.publish(), fresh && m.data_waiter);
                    if fresh {
                        m.data_waiter = false;
                    }
                    m.published = m.queue.len();
                }
                Op::Pop | Op::PeekRead => {
                    let header = if let Op::Pop = op {
                        c.try_pop(&mut out).unwrap()
                    } else {
                        c.try_peek().unwrap().map(|frame| {
                            out.resize(frame.len(), 0);
                            let half = frame.len() / 2;
                            c.read_at(&frame, half, &mut out[half..]);
                            c.read_at(&frame, 0, &mut out[..half]);
                            c.consume(&frame);
                            frame.header
                        })
                    };
                    match header {
                        Some(h) => {
                            prop_assert!(m.published > 0, "an unpublished frame came out");
                            let (id, service, flags, body, needed) = m.queue.pop_front().unwrap();
                            m.published -= 1;
                            m.taken += needed;
                            prop_assert_eq!((h.request_id, h.service, h.flags, h.len as usize), (id, service, flags, body.len()));
                            prop_assert_eq!(&out, &body);
                        }
                        None => prop_assert_eq!(m.published, 0, "a published frame did not come out"),
                    }
                }
                Op::Release => {
                    let fresh = m.taken != m.released;
                    prop_assert_eq!(c.release(), fresh && m.space_waiter);
                    if fresh {
                        m.space_waiter = false;
                    }
                    m.released = m.taken;
                    prop_assert_eq!(tail_word.load(Ordering::Relaxed), m.released);
                }
                Op::PrepareSleep => {
                    let sleeps = c.prepare_sleep().unwrap();
                    prop_assert_eq!(sleeps, m.published == 0);
                    m.data_waiter = sleeps;
                }
                Op::FinishSleep => { c.finish_sleep(); m.data_waiter = false; }
                Op::PrepareWaitSpace(len) => {
                    let waits = p.prepare_wait_space(len).unwrap();
                    prop_assert_eq!(waits, !m.fits(len));
                    m.space_waiter = waits;
                }
                Op::FinishWaitSpace => { p.finish_wait_space(); m.space_waiter = false; }
            }
            prop_assert_eq!(c.data_waiter().load(Ordering::Relaxed), u32::from(m.data_waiter));
            prop_assert_eq!(p.space_waiter().load(Ordering::Relaxed), u32::from(m.space_waiter));
        }
        // Everything pushed still comes out, in order.
        p.publish();
        while let Some(h) = c.try_pop(&mut out).unwrap() {
            let (id, _, _, body, _) = m.queue.pop_front().unwrap();
            prop_assert_eq!(h.request_id, id);
            prop_assert_eq!(&out, &body);
        }
        prop_assert!(m.queue.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever a hostile producer writes (indices and every data byte), the
    /// consumer returns frames within bounds or an error: it never panics
    /// and never reads outside the ring.
    #[test]
    fn consumer_survives_arbitrary_shared_bytes(
        heads in proptest::collection::vec(any::<u64>(), 1..6),
        small_heads in proptest::collection::vec(0u64..9000, 1..6),
        data in proptest::collection::vec(any::<u8>(), 4096),
        aligned in any::<bool>(),
    ) {
        let (r, _p, mut c) = ring(4096);
        let layout = SegmentLayout::new(4096).unwrap();
        r.copy_in(layout.request_data(), &data);
        let mut out = Vec::new();
        for head in heads.iter().chain(&small_heads) {
            let head = if aligned { head & !7 } else { *head };
            r.atomic_u64(layout.request_control() + HEAD).store(head, Ordering::Relaxed);
            for _ in 0..8 {
                match c.try_pop(&mut out) {
                    Ok(Some(h)) => {
                        prop_assert!(h.len <= c.max_payload());
                        prop_assert_eq!(out.len(), h.len as usize);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            c.release();
        }
    }

    /// Whatever a hostile consumer writes as its index, the producer pushes
    /// within bounds or returns an error.
    #[test]
    fn producer_survives_arbitrary_consumer_indices(
        tails in proptest::collection::vec(any::<u64>(), 1..8),
        lens in proptest::collection::vec(0usize..2032, 1..8),
    ) {
        let (r, mut p, _c) = ring(4096);
        let layout = SegmentLayout::new(4096).unwrap();
        for (tail, len) in tails.iter().zip(lens.iter().cycle()) {
            r.atomic_u64(layout.request_control() + TAIL).store(*tail, Ordering::Relaxed);
            for _ in 0..4 {
                match p.try_push(0, 0, 0, &vec![0xA5; *len]) {
                    Ok(()) => {}
                    Err(PushError::Full) | Err(PushError::Corrupt(_)) => break,
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            p.publish();
        }
    }
}

#[test]
fn consumer_reads_at_most_one_ring_before_releasing() {
    // A hostile producer that keeps publishing cannot make the consumer read
    // more than a ring's worth before it hands the space back.
    let (r, mut p, mut c) = ring(4096);
    let mut out = Vec::new();
    let frame = [0u8; 1024 - 16];
    for id in 0..4 {
        p.try_push(0, 0, id, &frame).unwrap();
    }
    p.publish();
    for _ in 0..4 {
        c.try_pop(&mut out).unwrap().unwrap();
    }
    // Nothing released yet: a head beyond 4096 claims frames written over
    // space we have not handed back.
    let control = SegmentLayout::new(4096).unwrap().request_control();
    r.atomic_u64(control + HEAD).store(4096 + 1024, Ordering::Relaxed);
    assert!(matches!(
        c.try_pop(&mut out),
        Err(RingError::IndexOutOfRange { which: Index::Head, index: 5120, high: 4096, .. })
    ));
}

#[test]
fn producer_refuses_a_release_of_unpublished_bytes() {
    let (r, mut p, _c) = ring(4096);
    let frame = [0u8; 1024 - 16];
    for id in 0..4 {
        p.try_push(0, 0, id, &frame).unwrap();
    }
    p.publish();
    p.try_push(0, 0, 4, &frame).unwrap_err(); // full: 4096 bytes held
                                              // The consumer claims to have released 4096 bytes, all published: fine.
    let control = SegmentLayout::new(4096).unwrap().request_control();
    r.atomic_u64(control + TAIL).store(4096, Ordering::Relaxed);
    p.try_push(0, 0, 4, &frame).unwrap();
    // Now 5120 are written but only 4096 published: a tail of 5120 releases
    // a frame the consumer was never shown.
    r.atomic_u64(control + TAIL).store(5120, Ordering::Relaxed);
    for id in 5..8 {
        p.try_push(0, 0, id, &frame).unwrap();
    }
    assert!(matches!(
        p.try_push(0, 0, 8, &frame),
        Err(PushError::Corrupt(RingError::IndexOutOfRange { which: Index::Tail, index: 5120, high: 4096, .. }))
    ));
}

#[test]
fn in_place_writes_and_partial_reads_round_trip_across_the_wrap() {
    use std::io::Write;
    let (_r, mut p, mut c) = ring(4096);
    // 700-byte payloads do not divide the ring, so frames wrap with pads.
    for id in 1..=40u64 {
        let body = payload(id, 700);
        let written = p
            .try_push_with(3, 0, id, body.len(), |w| {
                assert_eq!(w.len(), 700);
                w.write_all(&body[..300]).unwrap();
                w.write_all(&body[300..]).unwrap();
                // The writer is bounded by the frame.
                w.write(b"overflow").unwrap()
            })
            .unwrap();
        assert_eq!(written, 0);
        p.publish();
        let frame = c.try_peek().unwrap().unwrap();
        assert_eq!((frame.header.request_id, frame.len()), (id, 700));
        let mut part = [0u8; 100];
        c.read_at(&frame, 600, &mut part);
        assert_eq!(&part[..], &body[600..]);
        c.consume(&frame);
        c.release();
    }
}

#[test]
fn full_ring_does_not_call_the_fill_closure() {
    let (_r, mut p, _c) = ring(4096);
    while p.try_push(0, 0, 1, &[0; 1000]).is_ok() {}
    let result = p.try_push_with(0, 0, 2, 1000, |_| panic!("must not be called on a full ring"));
    assert!(matches!(result, Err(PushError::Full)));
    let too_large = p.try_push_with(0, 0, 2, 1 << 20, |_| panic!("must not be called when too large"));
    assert!(matches!(too_large, Err(PushError::TooLarge { .. })));
}

#[test]
#[should_panic(expected = "past a payload")]
fn writer_refuses_writes_past_the_payload() {
    let (_r, mut p, _c) = ring(4096);
    let _ = p.try_push_with(0, 0, 1, 8, |w| w.write_at(4, &[0; 5]));
}

#[test]
fn error_messages_name_their_values() {
    let cases = [
        (RingError::MisalignedIndex { which: Index::Head, index: 13 }, "producer index 13 is not 8-byte aligned"),
        (
            RingError::IndexOutOfRange { which: Index::Tail, index: 5120, low: 0, high: 4096 },
            "consumer index 5120 is outside the valid range 0..=4096",
        ),
        (RingError::UnknownFlags { flags: 0x80 }, "frame flags 0x0080 have unknown bits"),
        (
            RingError::PayloadTooLarge { len: 70000, max: 65536 },
            "frame length 70000 exceeds the negotiated maximum 65536",
        ),
        (RingError::FrameOverrun { size: 512, available: 256 }, "frame of 512 bytes overruns the 256 bytes available"),
        (
            RingError::BadPad { len: 8, expected: 24 },
            "pad frame length 8 does not cover the 24 bytes to the end of the ring",
        ),
    ];
    for (err, message) in cases {
        assert_eq!(err.to_string(), message);
        assert!(std::error::Error::source(&err).is_none());
    }
    let corrupt = PushError::from(RingError::UnknownFlags { flags: 0x80 });
    let cases = [
        (PushError::Full, "ring is full"),
        (PushError::TooLarge { len: 70000, max: 65536 }, "payload of 70000 bytes exceeds the negotiated maximum 65536"),
        (corrupt, "ring is corrupt: frame flags 0x0080 have unknown bits"),
    ];
    for (err, message) in cases {
        assert_eq!(err.to_string(), message);
        // The message carries the cause, so the chain must not repeat it.
        assert!(std::error::Error::source(&err).is_none());
    }
}
