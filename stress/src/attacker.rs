//! A hostile client: it handshakes as a real client would, then writes
//! random bytes over its own segment (ring indices, frame headers and
//! lengths, the futex words, payloads), pushes frames with bad fields, and
//! rings its doorbells in floods. When the daemon disconnects it, it counts
//! that and connects again, until told to stop.
//!
//! Given a provided name, it resolves that name through the daemon's broker
//! instead and does the same to the brokered session, whose peer is the
//! provider: it is the provider that must cope, drop the session (which
//! the client sees as its liveness socket hanging up) and report a strike
//! to the daemon.
//!
//! Every choice comes from a seeded generator, so a run can be repeated.
//! Writes into the segment go through the segment's shared words, atomic
//! at the width the layout gives each: no Rust reference is ever formed
//! over the shared bytes, and no scribble is a data race.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fastrand::Rng;
use ipc_client::raw::{FrameHeader, RawSession};
use ipc_client::{ClientOptions, DoorbellKind};
use serde::{Deserialize, Serialize};

/// What one hostile client did, and what the daemon did to it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Handshakes that gave it a session.
    pub sessions_opened: u64,
    /// Sessions that ended because the daemon hung up the control
    /// connection (a brokered session's provider, its liveness socket;
    /// the rest ended when the run stopped).
    pub sessions_disconnected: u64,
    /// Handshakes (or resolves) that failed (rejected, timed out, daemon
    /// gone).
    pub connect_failures: u64,
    /// Attacks made: scribbles, forged frames, floods.
    pub bursts: u64,
    /// Random words and byte runs written into the segment.
    pub scribbles: u64,
    /// Frames pushed through the ring with random fields.
    pub frames_pushed: u64,
    /// Writes to the daemon's eventfd.
    pub eventfd_rings: u64,
    /// Futex wakes on the segment's waiter words.
    pub futex_wakes: u64,
    /// Bytes sent back on a pollable doorbell socket.
    pub bell_rings: u64,
    /// Bytes written on the control connection after the handshake.
    pub control_writes: u64,
    /// CPU time the client's thread used, in seconds.
    pub cpu_s: f64,
    /// The first handshake error, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_connect_error: Option<String>,
}

impl Tally {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Tally) {
        self.sessions_opened += other.sessions_opened;
        self.sessions_disconnected += other.sessions_disconnected;
        self.connect_failures += other.connect_failures;
        self.bursts += other.bursts;
        self.scribbles += other.scribbles;
        self.frames_pushed += other.frames_pushed;
        self.eventfd_rings += other.eventfd_rings;
        self.futex_wakes += other.futex_wakes;
        self.bell_rings += other.bell_rings;
        self.control_writes += other.control_writes;
        self.cpu_s += other.cpu_s;
        if self.first_connect_error.is_none() {
            self.first_connect_error.clone_from(&other.first_connect_error);
        }
    }
}

/// The seed of hostile client `i` of a run seeded with `seed`: each
/// client its own stream.
pub fn client_seed(seed: u64, i: usize) -> u64 {
    Rng::with_seed(seed ^ (i as u64).wrapping_mul(0xA076_1D64_78BD_642F)).u64(..)
}

/// The body of a hostile process (`--child-attackers N`): N hostile
/// clients as threads, attacking the daemon's sessions or (with `target`)
/// brokered sessions of that provided name. Prints `started` once each
/// holds a session (or after 5 s), attacks until a line arrives on stdin,
/// then prints `done` and the summed tally as JSON. A process of its own,
/// as a hostile peer would be: the daemon holds back handshakes and
/// resolves per process, and the normal clients must not share the
/// attackers' pid.
pub fn child_main(
    socket: &Path,
    target: Option<&str>,
    hostile: usize,
    seed: u64,
    pause: Duration,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..hostile)
        .map(|i| {
            let (socket, stop, started) = (socket.to_path_buf(), Arc::clone(&stop), Arc::clone(&started));
            let target = target.map(str::to_string);
            let seed = client_seed(seed, i);
            std::thread::Builder::new()
                .name(format!("hostile-{i}"))
                .spawn(move || attack(&socket, target.as_deref(), seed, pause, &stop, &started))
                .context("cannot start a hostile client")
        })
        .collect::<anyhow::Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.load(Ordering::Relaxed) < hostile && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "started {}", started.load(Ordering::Relaxed))?;
    stdout.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for t in threads {
        tally.add(&t.join().map_err(|_| anyhow::anyhow!("a hostile client panicked"))?);
    }
    writeln!(stdout, "done {}", serde_json::to_string(&tally)?)?;
    stdout.flush()?;
    Ok(())
}

/// Ring capacities a hostile client asks for: the smallest, a middling one,
/// and the client library's default.
const CAPACITIES: [u32; 3] = [4096, 16 << 10, 64 << 10];
/// How long to wait before connecting again after a failed handshake.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(2);

/// Attacks the daemon at `socket` until `stop` is set: one session after
/// another, each abused until the daemon hangs up; with `target`, sessions
/// with the provider of that name, brokered by the daemon, each abused
/// until the provider hangs up. Sleeps `pause` after each burst (zero:
/// never). Adds one to `started` once the first session is open.
pub fn attack(
    socket: &Path,
    target: Option<&str>,
    seed: u64,
    pause: Duration,
    stop: &AtomicBool,
    started: &AtomicUsize,
) -> Tally {
    let mut rng = Rng::with_seed(seed);
    let mut tally = Tally::default();
    // Relaxed: the flag carries no data, and a burst more or less after it
    // is set does not matter.
    while !stop.load(Ordering::Relaxed) {
        let options = ClientOptions::default()
            .ring_capacity(rng.choice(CAPACITIES).expect("a choice"))
            .doorbell(rng.choice([DoorbellKind::Futex, DoorbellKind::Pollable]).expect("a choice"))
            .connect_timeout(Duration::from_secs(5));
        let opened = match target {
            Some(name) => RawSession::resolve(socket, name, &options).map_err(|e| e.to_string()),
            None => RawSession::connect(socket, &options).map_err(|e| e.to_string()),
        };
        let mut session = match opened {
            Ok(s) => s,
            Err(e) => {
                tally.connect_failures += 1;
                tally.first_connect_error.get_or_insert(e);
                std::thread::sleep(RECONNECT_BACKOFF);
                continue;
            }
        };
        tally.sessions_opened += 1;
        if tally.sessions_opened == 1 {
            // Relaxed: a progress count, read by polling.
            started.fetch_add(1, Ordering::Relaxed);
        }
        let mut next_id = 1u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if session.is_hung_up() {
                tally.sessions_disconnected += 1;
                break;
            }
            burst(&mut session, target.unwrap_or("echo"), &mut rng, &mut next_id, &mut tally);
            tally.bursts += 1;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
    tally.cpu_s = crate::daemon::cpu_seconds("thread-self").unwrap_or(0.0);
    tally
}

/// One attack on `s`, whose echo service is `echo`, chosen at random.
fn burst(s: &mut RawSession, echo: &str, rng: &mut Rng, next_id: &mut u64, tally: &mut Tally) {
    let capacity = u64::from(s.layout.capacity());
    match rng.u64(..100) {
        // A ring index: random, aligned but out of range, or near where it
        // should be.
        0..=19 => {
            let word = rng.choice(s.indices()).expect("a choice");
            let current = word.load(Ordering::Relaxed);
            let value = match rng.u64(..4) {
                0 => rng.u64(..),
                1 => rng.u64(..4 * capacity) & !7,
                2 => current.wrapping_add(rng.u64(..2 * capacity)).wrapping_sub(capacity),
                _ => current.wrapping_add(rng.u64(..64)),
            };
            // Relaxed and Release alike: the daemon must cope with any
            // ordering, and this is a lie either way.
            word.store(value, Ordering::Release);
            tally.scribbles += 1;
        }
        // A futex word: the daemon reads them to decide whom to wake.
        20..=29 => {
            let word = rng.choice(s.waiters()).expect("a choice");
            let value = match rng.u64(..3) {
                0 => 0,
                1 => 1,
                _ => rng.u64(..) as u32,
            };
            word.store(value, Ordering::Release);
            tally.scribbles += 1;
        }
        // A forged frame header where the daemon reads next, published.
        30..=44 => forge_frame(s, rng, capacity, tally),
        // Frames through the ring with random fields: unknown services,
        // response flags, repeated ids, and plain echo requests.
        45..=64 => push_frames(s, echo, rng, next_id, tally),
        // Random bytes anywhere in the request ring's data, where the
        // daemon reads frames. (The segment header is read by the client
        // only, at connect, so scribbling it fools nobody but ourselves.)
        65..=79 => {
            let len = 1 + rng.u64(..256) as usize;
            let offset = rng.u64(..capacity - len as u64 + 1) as usize;
            let mut bytes = [0u8; 256];
            rng.fill(&mut bytes[..len]);
            s.write_request_data(offset, &bytes[..len]);
            tally.scribbles += 1;
        }
        // A doorbell flood, both kinds.
        80..=94 => flood_doorbells(s, rng, tally),
        // Read the replies, as a client would, so the response ring is not
        // always full.
        95..=98 => {
            let mut body = Vec::new();
            while let Ok(Some(_)) = s.responses.try_pop(&mut body) {}
            s.responses.release();
        }
        // Bytes on the control connection after the handshake.
        _ => {
            use std::io::Write;
            if (&s.stream).write(b"surprise").is_ok() {
                tally.control_writes += 1;
            }
        }
    }
}

/// Writes a frame header with random fields at the request ring's current
/// read position and publishes a head that covers some of it.
fn forge_frame(s: &mut RawSession, rng: &mut Rng, capacity: u64, tally: &mut Tally) {
    // The daemon's tail, read once: we attack from where it reads.
    let tail = s.indices()[1].load(Ordering::Acquire);
    let at = (tail % capacity) & !7;
    if at + 16 > capacity {
        return;
    }
    let service = match rng.u64(..3) {
        0 => rng.u64(..) as u16,
        _ => s.welcome.services.get(rng.u64(..s.welcome.services.len().max(1) as u64) as usize).map_or(0, |e| e.id),
    };
    let header = FrameHeader {
        len: match rng.u64(..3) {
            0 => rng.u64(..) as u32,
            1 => rng.u64(..capacity) as u32,
            _ => rng.u64(..64) as u32,
        },
        service,
        flags: if rng.u64(..2) == 0 { 0 } else { rng.u64(..) as u16 },
        request_id: rng.u64(..),
    };
    s.write_request_data(at as usize, &header.encode());
    let head = tail.wrapping_add(16 + (rng.u64(..64) & !7));
    s.store_request_head(head);
    tally.scribbles += 1;
    if s.ring().is_ok() {
        tally.eventfd_rings += 1;
    }
}

/// Pushes up to 32 frames through the library's own producer, with random
/// fields, publishes them and rings.
fn push_frames(s: &mut RawSession, echo: &str, rng: &mut Rng, next_id: &mut u64, tally: &mut Tally) {
    let mut payload = [0u8; 256];
    for _ in 0..1 + rng.u64(..32) {
        let service = match rng.u64(..8) {
            0 => rng.u64(..) as u16,
            _ => s.service_id(echo).unwrap_or(0),
        };
        let flags = if rng.u64(..16) == 0 { rng.u64(..) as u16 } else { 0 };
        let id = match rng.u64(..16) {
            // A repeated or going-back id.
            0 => next_id.saturating_sub(rng.u64(..3)),
            _ => {
                *next_id += 1;
                *next_id
            }
        };
        let len = rng.u64(..payload.len() as u64 + 1) as usize;
        rng.fill(&mut payload[..len]);
        match s.requests.try_push(service, flags, id, &payload[..len]) {
            Ok(()) => tally.frames_pushed += 1,
            // Full, or a ring we scribbled: stop pushing for this burst.
            Err(_) => break,
        }
    }
    s.requests.publish();
    if s.ring().is_ok() {
        tally.eventfd_rings += 1;
    }
}

/// Rings the daemon's eventfd, wakes the futex words, and (with a pollable
/// doorbell) sends bytes back on the doorbell socket, up to 512 times each.
fn flood_doorbells(s: &mut RawSession, rng: &mut Rng, tally: &mut Tally) {
    let n = 1 + rng.u64(..512);
    for _ in 0..n {
        if s.ring().is_ok() {
            tally.eventfd_rings += 1;
        }
    }
    for _ in 0..n / 8 + 1 {
        let word = rng.choice(s.waiters()).expect("a choice");
        if ipc_platform::futex::wake_one(word).is_ok() {
            tally.futex_wakes += 1;
        }
    }
    if let Some(bell) = &s.client_bell {
        for _ in 0..n {
            if bell.ring().is_ok() {
                tally.bell_rings += 1;
            }
        }
        let _ = bell.drain();
    }
}
