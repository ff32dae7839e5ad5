//! A loom model of the ring and its doorbell handshake.
//!
//! Run with
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p ipc-core --release --lib loom`.
//!
//! One producer thread and one consumer thread drive the real [`Producer`]
//! and [`Consumer`] over a loom-modelled region (`region/loom_model.rs`):
//! every ring word is a loom atomic and every 8 bytes of ring data a loom
//! cell. Loom then runs the pair under every interleaving (up to
//! [`PREEMPTIONS`] preemptions) and every value the memory model lets each
//! load return, and fails if any of them:
//!
//! - delivers a frame lost, twice, out of order or with other bytes than were
//!   pushed (checked by the consumer against the plan);
//! - copies frame bytes without a happens-before edge from the peer's last
//!   copy of them (a data race on a cell: `SYNC(frame-published)` or
//!   `SYNC(space-released)` too weak);
//! - loses a wake-up (`SYNC(sleep-handshake)`): each side sleeps exactly as
//!   the real ones do, in a futex wait on its waiter word while it holds 1,
//!   and is woken only when the peer's `publish` or `release` says it must
//!   be. The model has no timeouts, so a sleeper nobody wakes stays asleep,
//!   and loom reports the execution where both threads sleep, or where the
//!   producer has finished and the consumer sleeps, as a deadlock.
//!
//! The rings hold 64 bytes, two to four frames of 16 to 32 bytes, so the
//! producer fills the ring and waits for space, the consumer drains it and
//! sleeps for data, and frames wrap through a pad frame and an 8-byte
//! remnant within a few steps.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use loom::sync::{Condvar, Mutex};

use super::*;
use crate::region::HeapMemory;

/// Loom's bound on preemptions per execution, unless `LOOM_MAX_PREEMPTIONS`
/// sets another. A lost wake-up needs the peer to run between a side's
/// announcement and its re-check, and that side to run again inside the
/// peer's publish or release: two preemptions. Three leaves one for a stale
/// announcement or index around them. Four passes too, in about ten times
/// the time.
const PREEMPTIONS: usize = 3;

/// Ring capacity in the model.
const CAPACITY: u32 = 64;

/// A futex as the ring's users treat one: `wait` returns at once unless the
/// word holds 1, and otherwise sleeps until a `wake` (no timeout, no
/// spurious return). The mutex stands for the kernel's lock on the futex
/// queue, which makes "check the word, then sleep" atomic against a wake.
struct Futex {
    queue: Mutex<()>,
    woken: Condvar,
}

impl Futex {
    fn new() -> Futex {
        Futex { queue: Mutex::new(()), woken: Condvar::new() }
    }

    fn wait(&self, word: &AtomicU32) {
        let queued = self.queue.lock().unwrap();
        // Relaxed: the queue lock alone orders this check against a wake, as
        // in the kernel; anything stronger could hide a missing fence.
        if word.load(Ordering::Relaxed) == 1 {
            drop(self.woken.wait(queued).unwrap());
        }
    }

    fn wake(&self) {
        let _queued = self.queue.lock().unwrap();
        self.woken.notify_one();
    }
}

/// The two doorbells of one ring: the consumer sleeps on `data`, the
/// producer on `space`.
struct Bells {
    data: Futex,
    space: Futex,
}

/// How the two sides drive the ring in one model.
#[derive(Clone, Copy)]
struct Plan {
    /// Payload lengths of the frames, in push order.
    lens: &'static [usize],
    /// Publish after this many pushes (and always before waiting for space).
    publish_every: usize,
    /// Release after this many pops (and always before sleeping).
    release_every: usize,
    /// Push with `try_push_with` and read with `try_peek` + `read_at` +
    /// `consume`, instead of `try_push` and `try_pop`.
    in_place: bool,
}

fn payload(id: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id * 37 + i + 1) as u8).collect()
}

/// Executions explored by the last `check`, for the report.
static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);

fn check(plan: Plan) {
    EXECUTIONS.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut builder = loom::model::Builder::new();
    // LOOM_MAX_PREEMPTIONS, when set, overrides the default bound.
    builder.preemption_bound = builder.preemption_bound.or(Some(PREEMPTIONS));
    builder.check(move || run(plan));
    let executions = EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed);
    println!("{} frames: {executions} executions", plan.lens.len());
}

/// One execution: the producer on a spawned thread, the consumer on this
/// one.
fn run(plan: Plan) {
    EXECUTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let layout = SegmentLayout::for_model(CAPACITY);
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    let crate::Segment { request_producer: tx, request_consumer: mut rx, .. } = crate::Segment::new(region, &layout);
    let bells = Arc::new(Bells { data: Futex::new(), space: Futex::new() });

    let producer = {
        let bells = bells.clone();
        loom::thread::spawn(move || produce(tx, &bells, plan))
    };
    consume(&mut rx, &bells, plan);
    producer.join().unwrap();
    // Nothing beyond the plan was delivered.
    assert!(rx.is_empty().unwrap(), "a frame beyond the last one pushed");
}

/// The producer as the client's `ShmLink` drives it: push; when the ring is
/// full, publish, announce the wait, re-check, sleep on `space_waiter`.
fn produce(mut tx: Producer, bells: &Bells, plan: Plan) {
    for (id, &len) in plan.lens.iter().enumerate() {
        let body = payload(id, len);
        loop {
            let pushed = if plan.in_place {
                tx.try_push_with(7, 0, id as u64, len, |w| w.write_at(0, &body))
            } else {
                tx.try_push(7, 0, id as u64, &body)
            };
            match pushed {
                Ok(()) => break,
                Err(PushError::Full) => {
                    if tx.publish() {
                        bells.data.wake();
                    }
                    if tx.prepare_wait_space(len).unwrap() {
                        bells.space.wait(tx.space_waiter());
                        tx.finish_wait_space();
                    }
                }
                Err(e) => panic!("push of frame {id}: {e}"),
            }
        }
        if (id + 1) % plan.publish_every == 0 && tx.publish() {
            bells.data.wake();
        }
    }
    if tx.publish() {
        bells.data.wake();
    }
}

/// The consumer as a worker or a client drives it: take frames; when none
/// is there, release what was read, announce the sleep, re-check, sleep on
/// `data_waiter`.
fn consume(rx: &mut Consumer, bells: &Bells, plan: Plan) {
    let mut out = Vec::new();
    let mut next = 0;
    while next < plan.lens.len() {
        let header = if plan.in_place {
            rx.try_peek().unwrap().map(|frame| {
                out.resize(frame.len(), 0);
                rx.read_at(&frame, 0, &mut out);
                rx.consume(&frame);
                frame.header
            })
        } else {
            rx.try_pop(&mut out).unwrap()
        };
        match header {
            Some(h) => {
                assert_eq!(h.request_id, next as u64, "frame lost, repeated or reordered");
                assert_eq!((h.service, h.flags), (7, 0), "header of frame {next} corrupted");
                assert_eq!(out, payload(next, plan.lens[next]), "payload of frame {next} corrupted");
                next += 1;
                if next % plan.release_every == 0 && rx.release() {
                    bells.space.wake();
                }
            }
            None => {
                if rx.release() {
                    bells.space.wake();
                }
                if rx.prepare_sleep().unwrap() {
                    bells.data.wait(rx.data_waiter());
                    rx.finish_sleep();
                }
            }
        }
    }
    if rx.release() {
        bells.space.wake();
    }
}

/// Frames of 16, 32, 24 (after a 16-byte pad frame), 32 and 16 bytes (after
/// an 8-byte remnant): the ring fills and wraps twice. Every push and pop
/// publishes and releases at once, as the client does.
#[test]
fn loom_ring_wraps_and_wakes_one_by_one() {
    check(Plan { lens: &[0, 16, 8, 16, 0], publish_every: 1, release_every: 1, in_place: false });
}

/// The same frames in batches of two, as the daemon serves them, through
/// the in-place API.
#[test]
fn loom_ring_wraps_and_wakes_in_batches_in_place() {
    check(Plan { lens: &[0, 16, 8, 16, 0], publish_every: 2, release_every: 2, in_place: true });
}

/// Requests and replies in the session model, each of this payload: two
/// frames fill a 64-byte ring.
const SESSION_LEN: usize = 16;

/// Both rings of a session at once, driven as the client and the daemon
/// drive them: the client pushes requests until its ring is full, then
/// waits for a reply (not for room: the daemon hands a request's space back
/// before it publishes its reply, so room comes with replies); the daemon
/// takes requests, answers them, keeps an answer that does not fit and
/// waits for room in the response ring. Neither may end up asleep while
/// the other waits for it: the deadlock that sleeping on the request ring
/// alone allowed, with replies published after the client last looked.
fn run_session(requests: usize) {
    EXECUTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let layout = SegmentLayout::for_model(CAPACITY);
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    let crate::Segment { request_producer, request_consumer, response_producer, response_consumer, .. } =
        crate::Segment::new(region, &layout);
    // Index 0: the request ring's bells; 1: the response ring's.
    let bells = Arc::new([
        Bells { data: Futex::new(), space: Futex::new() },
        Bells { data: Futex::new(), space: Futex::new() },
    ]);
    let daemon = {
        let bells = bells.clone();
        loom::thread::spawn(move || serve(request_consumer, response_producer, &bells, requests))
    };
    call(request_producer, response_consumer, &bells, requests);
    daemon.join().unwrap();
}

/// The client: send every request, waiting for a reply whenever the
/// request ring is full, then take the remaining replies.
fn call(mut tx: Producer, mut rx: Consumer, bells: &[Bells; 2], requests: usize) {
    let mut replies = 0;
    let mut out = Vec::new();
    // Takes the replies there are; with `sleep` and none there, sleeps for
    // one first.
    let mut take = |rx: &mut Consumer, replies: &mut usize, sleep: bool| {
        let mut got = false;
        while let Some(h) = rx.try_pop(&mut out).unwrap() {
            assert_eq!(h.request_id, *replies as u64, "reply lost, repeated or reordered");
            assert_eq!(out, payload(*replies + 100, SESSION_LEN), "reply {} corrupted", *replies);
            *replies += 1;
            got = true;
        }
        if rx.release() {
            bells[1].space.wake();
        }
        if !got && sleep && rx.prepare_sleep().unwrap() {
            bells[1].data.wait(rx.data_waiter());
            rx.finish_sleep();
        }
    };
    for id in 0..requests {
        while tx.try_push(7, 0, id as u64, &payload(id, SESSION_LEN)) == Err(PushError::Full) {
            // Requests are in flight: wait for a reply, which brings room.
            take(&mut rx, &mut replies, true);
        }
        if tx.publish() {
            bells[0].data.wake();
        }
    }
    while replies < requests {
        take(&mut rx, &mut replies, true);
    }
}

/// The daemon: answer each request; park on the request ring when it is
/// empty, and keep an answer that does not fit until the client makes room.
fn serve(mut rx: Consumer, mut tx: Producer, bells: &[Bells; 2], requests: usize) {
    let mut served = 0;
    let mut pending: Option<u64> = None;
    let mut body = Vec::new();
    // Release, then publish: the order the client's wait relies on.
    let hand_over = |rx: &mut Consumer, tx: &mut Producer| {
        if rx.release() {
            bells[0].space.wake();
        }
        if tx.publish() {
            bells[1].data.wake();
        }
    };
    while served < requests || pending.is_some() {
        if let Some(id) = pending {
            if tx.try_push(7, 0, id, &payload(id as usize + 100, SESSION_LEN)) == Err(PushError::Full) {
                hand_over(&mut rx, &mut tx);
                if tx.prepare_wait_space(SESSION_LEN).unwrap() {
                    bells[1].space.wait(tx.space_waiter());
                    tx.finish_wait_space();
                }
                continue;
            }
            pending = None;
            continue;
        }
        match rx.try_pop(&mut body).unwrap() {
            Some(h) => {
                assert_eq!(body, payload(h.request_id as usize, SESSION_LEN), "request corrupted");
                served += 1;
                pending = Some(h.request_id);
            }
            None => {
                hand_over(&mut rx, &mut tx);
                if rx.prepare_sleep().unwrap() {
                    bells[0].data.wait(rx.data_waiter());
                    rx.finish_sleep();
                }
            }
        }
    }
    hand_over(&mut rx, &mut tx);
}

/// Three requests through 64-byte rings that hold two: the client runs
/// out of room with replies outstanding, and the daemon runs out of room
/// for a reply the client has not read.
#[test]
fn loom_session_full_rings_do_not_deadlock() {
    EXECUTIONS.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut builder = loom::model::Builder::new();
    // Two rings double the interleavings: one preemption fewer than the
    // single-ring models keeps the run within minutes.
    builder.preemption_bound = builder.preemption_bound.or(Some(PREEMPTIONS - 1));
    builder.check(|| run_session(3));
    let executions = EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed);
    println!("session, 3 requests: {executions} executions");
}
