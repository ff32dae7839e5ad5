//! The bar for ipcd's synchronous throughput: a minimal shared-memory
//! request/response of ipcd's design, and nothing else. One server thread
//! scans every client's slot for a new request and echoes it; one futex
//! word wakes the server when it sleeps; each client futex-waits on its own
//! slot for the reply. All in one process, clients as threads.
//!
//! What it leaves out, against ipcd: processes (the slots are one `Vec` in
//! this process, not a mapped memfd), sessions and the handshake, frames
//! and rings (a slot holds one request and one reply), services and
//! handlers, every check of what the peer wrote, and error replies. What it
//! keeps: the copies (the server copies each request out of the slot and
//! the reply into it, the client copies the reply out), atomics for every
//! shared word, a wake-up only for a side that announced it sleeps, and a
//! check of every reply.
//!
//! ```text
//! cargo run --release -p stress --example shm_baseline -- --clients 100 --messages 10000
//! cargo run --release -p stress --example shm_baseline -- --clients 1 --messages 100000 --json
//! ```
//!
//! # Protocol
//!
//! Words of slot `i` (each side's words on a cache line of their own):
//!
//! - `request`: the sequence number (from 1) of the client's latest
//!   request, written only by the client, with Release, after the request
//!   payload words.
//! - `reply`: the sequence number of the latest reply in its low 31 bits,
//!   and [`SLEEPING`] while the client sleeps (or is about to) waiting for
//!   the next one. The server writes it only with a swap, after the reply
//!   payload words; the client only sets [`SLEEPING`], with a
//!   compare-exchange from the value it saw.
//! - the payload words: `Relaxed` atomics, ordered by the two above.
//!
//! And one server word, `bell`: 1 while the server sleeps (or is about to),
//! 0 otherwise. The server sets it; a client clears it, with a
//! compare-exchange from 1, only to wake the server.
//!
//! Happens-before edges:
//!
//! - `SYNC(request-published)`: the client's Release store of `request`
//!   pairs with the server's Acquire load of it; the request payload is
//!   visible to the server's copy after the load.
//! - `SYNC(reply-published)`: the server's swap of `reply` (AcqRel) pairs
//!   with the client's Acquire load of it; the reply payload is visible to
//!   the client's copy. Its Acquire half also orders the server's reads of
//!   the request payload before the client's next writes to it (the client
//!   writes the next request only after it has seen this reply).
//!
//! The client sleeping without losing its reply: one word, so no fence.
//! The client sets [`SLEEPING`] with a compare-exchange from the value
//! without the reply; the server publishes with a swap. Both are
//! read-modify-writes of one word, so one comes first: if the client's,
//! the server's swap returns the bit and it wakes the client; if the
//! server's, the client's compare-exchange fails on the new value, and it
//! takes the reply without sleeping. The client then sleeps only while the
//! word still holds its value with the bit (a futex wait on that value),
//! so a wake-up landing between its compare-exchange and its sleep is not
//! lost.
//!
//! The server sleeping without missing a request (`SYNC(server-sleep)`, a
//! Dekker pattern with two SeqCst fences, as in ipc-core's ring):
//!
//! ```text
//! server                                  client
//!   bell = 1                                request = n          (Release)
//!   fence(SeqCst)                           fence(SeqCst)
//!   scan every slot: new? -> bell = 0       read bell: 1? -> compare-exchange
//!   else sleep while bell == 1                   1 -> 0; won? -> wake server
//! ```
//!
//! The fences are totally ordered. If the client's comes first, the
//! server's scan after its own fence sees the request and it does not
//! sleep. If the server's comes first, the client reads `bell` as 1 or a
//! later value: 1, and it clears it and wakes the server (which scans
//! again); 0 written by another client, which wakes the server the same
//! way; or 0 written by the server itself, which is then awake and must
//! pass through the handshake again, with a later fence, before it sleeps.
//! So a request is never left unseen by a sleeping server. Of many clients
//! that find the server announced, one wins the compare-exchange and makes
//! the system call; the server's scan after waking finds all of them.
//!
//! Every futex wait has a timeout of [`LOST_WAKE_UP`]: a side whose wait
//! times out while what it waited for is there missed a wake-up, and the
//! program fails rather than hide the bug as a slow run (a thread
//! descheduled for that long between two steps would fail it too).
//!
//! # Spinning
//!
//! Before sleeping, the server rescans for up to `--spin-us` (default 50,
//! ipcd's default) and a client polls its `reply` word for as long, like
//! ipcd's sides. Unlike ipcd, which asks the kernel before each spin
//! whether a core is free, a client here spins only when every thread of
//! the run has a core of its own (clients + 1 at most the cores this
//! process may use), decided once at the start: with 100 clients on two
//! cores they always sleep. The server always spins. `--spin-us 0` makes
//! both sides sleep at once.

#![forbid(unsafe_code)]

mod common;

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use ipc_platform::futex::{self, Wake};

use common::{fail, payload_word, Common, Figures, Rtts};

/// A minimal shared-memory request/response of ipcd's design: one server
/// thread scanning client slots, one futex word to wake it, a futex wait
/// per client.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: Common,

    /// Payload bytes per call, each way (rounded up to whole 8-byte words)
    #[arg(long, default_value_t = 64)]
    payload: usize,

    /// Longest either side spins before sleeping, in microseconds; 0 never
    /// spins
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
}

/// The bit of a slot's `reply` word that says its client sleeps.
const SLEEPING: u32 = 1 << 31;

/// Sequence numbers live in the low 31 bits of `reply`.
const SEQ_MASK: u32 = SLEEPING - 1;

/// A futex wait longer than this that finds its condition met was a lost
/// wake-up.
const LOST_WAKE_UP: Duration = Duration::from_secs(5);

/// Keeps what it holds on cache lines of its own (128 bytes: the adjacent
/// line prefetcher pulls pairs of 64-byte lines).
#[repr(align(128))]
struct Line<T>(T);

/// The words the client writes.
struct RequestSide {
    request: AtomicU32,
    payload: Box<[AtomicU64]>,
}

/// The words the server writes.
struct ReplySide {
    reply: AtomicU32,
    payload: Box<[AtomicU64]>,
}

/// One client's slot.
struct Slot {
    client: Line<RequestSide>,
    server: Line<ReplySide>,
}

impl Slot {
    fn new(words: usize) -> Slot {
        let zeros = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Slot {
            client: Line(RequestSide { request: AtomicU32::new(0), payload: zeros() }),
            server: Line(ReplySide { reply: AtomicU32::new(0), payload: zeros() }),
        }
    }
}

/// Everything the threads share.
struct Shared {
    slots: Vec<Slot>,
    /// 1 while the server sleeps or is about to.
    bell: Line<AtomicU32>,
}

/// Sleeps while `word` holds `expected`, for at most [`LOST_WAKE_UP`]. A
/// failing futex ends the program: no thread is left waiting on one that
/// panicked.
fn sleep(word: &AtomicU32, expected: u32) -> Wake {
    futex::wait(word, expected, Some(LOST_WAKE_UP)).unwrap_or_else(|e| fail(&format!("futex wait: {e}")))
}

/// Wakes the thread sleeping on `word`, if any.
fn wake(word: &AtomicU32) {
    futex::wake_one(word).unwrap_or_else(|e| fail(&format!("futex wake: {e}")));
}

/// How long to spin, and whether clients may.
#[derive(Clone, Copy)]
struct Spin {
    limit: Duration,
    clients: bool,
}

/// Polls `ready` for at most `limit`; returns whether it came true.
fn spin_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if limit.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        // A clock reading costs more than a check: a few checks per reading.
        for _ in 0..16 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return false;
        }
    }
}

/// The server: scans every slot for a new request and echoes it, until it
/// has answered `total` calls. Returns how often it slept.
fn serve(shared: &Shared, total: u64, spin: Spin) -> u64 {
    // The sequence number last answered, per slot: the server's own copy,
    // never read back from the slot.
    let mut answered = vec![0u32; shared.slots.len()];
    let words = shared.slots.first().map_or(0, |s| s.client.0.payload.len());
    let mut copy = vec![0u64; words];
    let (mut served, mut sleeps) = (0u64, 0u64);
    // One pass over every slot: answers each new request; returns how many.
    let mut pass = |answered: &mut [u32]| -> u64 {
        let mut found = 0;
        for (slot, last) in shared.slots.iter().zip(answered.iter_mut()) {
            // SYNC(request-published): the payload below is the client's.
            let seq = slot.client.0.request.load(Ordering::Acquire);
            if seq == *last {
                continue;
            }
            // The handler's copy in, then the reply's copy out, as ipcd's
            // worker makes them (an echo: the reply is the request).
            for (w, src) in copy.iter_mut().zip(slot.client.0.payload.iter()) {
                *w = src.load(Ordering::Relaxed);
            }
            for (dst, w) in slot.server.0.payload.iter().zip(copy.iter()) {
                dst.store(*w, Ordering::Relaxed);
            }
            *last = seq;
            // SYNC(reply-published); a swap, so the client's SLEEPING bit
            // cannot slip in unseen (see the protocol).
            let was = slot.server.0.reply.swap(seq, Ordering::AcqRel);
            if was & SLEEPING != 0 {
                wake(&slot.server.0.reply);
            }
            found += 1;
        }
        found
    };
    while served < total {
        let found = pass(&mut answered);
        served += found;
        if found > 0 || served >= total {
            continue;
        }
        // Nothing new: scan again for a while before sleeping.
        let mut spun = 0;
        if spin_until(spin.limit, || {
            spun = pass(&mut answered);
            spun > 0
        }) {
            served += spun;
            continue;
        }
        // SYNC(server-sleep): announce, then scan once more.
        shared.bell.0.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let found = pass(&mut answered);
        if found > 0 {
            served += found;
            // Withdraw the announcement; a client may have cleared it
            // already, and its wake-up then finds nobody asleep.
            shared.bell.0.store(0, Ordering::Relaxed);
            continue;
        }
        sleeps += 1;
        // Sleeps while the announcement stands: a client that clears it
        // before this wait makes the wait return at once.
        while shared.bell.0.load(Ordering::Relaxed) == 1 {
            if sleep(&shared.bell.0, 1) == Wake::TimedOut {
                // Every client waits for a reply only after its request is
                // published: a request now pending was one whose wake-up was
                // lost.
                let pending =
                    shared.slots.iter().zip(&answered).any(|(s, &a)| s.client.0.request.load(Ordering::Acquire) != a);
                if pending {
                    fail("shm_baseline: the server slept through a request (a lost wake-up)");
                }
            }
        }
    }
    sleeps
}

/// What one client measured.
struct ClientRun {
    rtts: Rtts,
    sleeps: u64,
}

/// Client `id`: `messages` synchronous calls through its slot, each reply
/// checked word for word.
fn client(shared: &Shared, id: usize, messages: u64, spin: Spin, barrier: &Barrier) -> ClientRun {
    let slot = &shared.slots[id];
    let words = slot.client.0.payload.len();
    let mut reply = vec![0u64; words];
    let mut rtts = Rtts::new();
    let mut sleeps = 0;
    let spin_limit = if spin.clients { spin.limit } else { Duration::ZERO };
    barrier.wait();
    for n in 1..=messages {
        let seq = (n as u32) & SEQ_MASK;
        let start = Instant::now();
        // The request: payload words, then its sequence number.
        for (i, w) in slot.client.0.payload.iter().enumerate() {
            w.store(payload_word(id as u32, n, i), Ordering::Relaxed);
        }
        // SYNC(request-published).
        slot.client.0.request.store(seq, Ordering::Release);
        // SYNC(server-sleep): published, then look for a sleeping server.
        fence(Ordering::SeqCst);
        if shared.bell.0.load(Ordering::Relaxed) == 1
            && shared.bell.0.compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            wake(&shared.bell.0);
        }
        // The reply: poll for a while, then sleep on the slot.
        // SYNC(reply-published) on every load of `reply`.
        let arrived = |v: u32| v & SEQ_MASK == seq;
        if !spin_until(spin_limit, || arrived(slot.server.0.reply.load(Ordering::Acquire))) {
            let mut seen = slot.server.0.reply.load(Ordering::Acquire);
            while !arrived(seen) {
                if seen & SLEEPING == 0 {
                    // Announce the sleep; a reply that lands first fails
                    // the exchange and is taken at once.
                    match slot.server.0.reply.compare_exchange(
                        seen,
                        seen | SLEEPING,
                        Ordering::Acquire,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => seen |= SLEEPING,
                        Err(now) => {
                            seen = now;
                            continue;
                        }
                    }
                }
                sleeps += 1;
                let woke = sleep(&slot.server.0.reply, seen);
                seen = slot.server.0.reply.load(Ordering::Acquire);
                if woke == Wake::TimedOut && arrived(seen) {
                    fail(&format!("shm_baseline: client {id} slept through its reply {n} (a lost wake-up)"));
                }
            }
        }
        for (dst, w) in reply.iter_mut().zip(slot.server.0.payload.iter()) {
            *dst = w.load(Ordering::Relaxed);
        }
        rtts.record(start);
        if reply.iter().enumerate().any(|(i, &w)| w != payload_word(id as u32, n, i)) {
            fail(&format!("shm_baseline: client {id} call {n}: the reply differs from the request"));
        }
    }
    ClientRun { rtts, sleeps }
}

fn main() {
    let args = Args::parse();
    args.common.check();
    let (clients, messages) = (args.common.clients, args.common.messages);
    let words = args.payload.div_ceil(8).max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let spin = Spin { limit: Duration::from_micros(args.spin_us), clients: clients < cores };
    let shared =
        Arc::new(Shared { slots: (0..clients).map(|_| Slot::new(words)).collect(), bell: Line(AtomicU32::new(0)) });
    let total = clients as u64 * messages;
    let server = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("server".into())
            .spawn(move || serve(&shared, total, spin))
            .expect("spawn the server thread")
    };
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let (shared, barrier) = (Arc::clone(&shared), Arc::clone(&barrier));
            std::thread::Builder::new()
                .name(format!("client-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || client(&shared, id, messages, spin, &barrier))
                .expect("spawn a client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut rtts = Rtts::new();
    let mut client_sleeps = 0;
    for t in threads {
        let run = t.join().expect("client thread panicked");
        rtts.add(&run.rtts);
        client_sleeps += run.sleeps;
    }
    let elapsed = start.elapsed();
    let server_sleeps = server.join().expect("server thread panicked");
    Figures::new("shm_baseline", &args.common, words * 8, elapsed, &rtts)
        .note("spin_us", args.spin_us)
        .note("clients_spin", spin.clients && args.spin_us > 0)
        .note("server_sleeps", server_sleeps)
        .note("client_sleeps", client_sleeps)
        .print(args.common.json);
}
