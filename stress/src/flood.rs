//! The handshake flood: connections to the control socket that never finish
//! the handshake (silent ones, ones that send part of a hello, and ones that
//! dribble a hello one byte at a time without ever completing it), held open
//! while normal clients connect one after another; and a watch that records
//! when the daemon closes each stalled connection.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fastrand::Rng;
use serde::Serialize;

use crate::report::{Connect, Run};
use crate::workload::{self, ClientOutcome, Workload};

/// How a stalled connection stalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends the first part of a hello at once, then nothing.
    Partial,
    /// Sends a hello one byte at a time, spread over the handshake timeout,
    /// and never its last byte.
    Dribble,
}

/// One stalled connection.
pub struct Stalled {
    stream: UnixStream,
    kind: Stall,
    opened: Instant,
    sent: usize,
    closed_at: Option<Instant>,
    answered: bool,
}

/// Opens `n` stalled connections to `socket`, a third of each kind (in an
/// order drawn from `rng`), sending partial hellos taken from `hello`.
pub fn open_stalled(socket: &Path, n: usize, hello: &[u8], rng: &mut Rng) -> io::Result<Vec<Stalled>> {
    let mut stalled = Vec::with_capacity(n);
    for i in 0..n {
        let kind = [Stall::Silent, Stall::Partial, Stall::Dribble][i % 3];
        let mut stream = UnixStream::connect(socket)?;
        let opened = Instant::now();
        let sent = match kind {
            Stall::Partial => {
                // At least one byte, never the whole hello.
                let len = 1 + rng.u64(..hello.len() as u64 - 1) as usize;
                stream.write_all(&hello[..len])?;
                len
            }
            Stall::Silent | Stall::Dribble => 0,
        };
        stalled.push(Stalled { stream, kind, opened, sent, closed_at: None, answered: false });
    }
    // Interleave the kinds so none is favoured by its place in the
    // acceptor's queue.
    rng.shuffle(&mut stalled);
    Ok(stalled)
}

/// When the daemon closed each stalled connection.
pub struct Closings {
    /// Per connection: its kind, how long after its connect the daemon
    /// closed it (`None`: still open when the watch gave up), and whether
    /// the daemon sent anything first (it should not).
    pub conns: Vec<(Stall, Option<Duration>, bool)>,
    /// When the first connection was closed.
    pub first_close: Option<Instant>,
}

/// Watches `stalled` on its own thread until the daemon has closed every
/// connection or `give_up` passes, dribbling the hello meanwhile: a
/// dribbling connection sends its next byte every `timeout / hello.len()`,
/// so it never completes the hello within the handshake timeout.
pub fn watch(
    mut stalled: Vec<Stalled>,
    hello: Vec<u8>,
    timeout: Duration,
    give_up: Instant,
) -> JoinHandle<io::Result<Closings>> {
    let interval = timeout / hello.len() as u32;
    std::thread::Builder::new()
        .name("flood-watch".into())
        .spawn(move || {
            // Every dribbling connection sends its next byte on the same
            // ticks, counted from here, so one pass serves them all.
            let epoch = Instant::now();
            loop {
                let now = Instant::now();
                let mut next_dribble = give_up;
                for s in stalled.iter_mut().filter(|s| s.kind == Stall::Dribble && s.closed_at.is_none()) {
                    if s.sent + 1 >= hello.len() {
                        continue;
                    }
                    let due = epoch + interval * (s.sent as u32 + 1);
                    if due <= now {
                        // The daemon may have closed it just now: that shows
                        // on the next poll.
                        if (&s.stream).write(&hello[s.sent..s.sent + 1]).is_ok() {
                            s.sent += 1;
                        }
                    }
                    next_dribble = next_dribble.min(epoch + interval * (s.sent as u32 + 1));
                }
                let open: Vec<usize> = (0..stalled.len()).filter(|&i| stalled[i].closed_at.is_none()).collect();
                if open.is_empty() || now >= give_up {
                    break;
                }
                let fds: Vec<BorrowedFd<'_>> = open.iter().map(|&i| stalled[i].stream.as_fd()).collect();
                let wait = next_dribble.saturating_duration_since(now).min(Duration::from_millis(100));
                let ready = ipc_platform::wait_readable(&fds, Some(wait))?;
                drop(fds);
                let at = Instant::now();
                for (&i, _) in open.iter().zip(ready).filter(|(_, r)| *r) {
                    let s = &mut stalled[i];
                    match ipc_platform::peer_closed(s.stream.as_fd()) {
                        Ok(false) => {
                            // Data: read it away; the close shows next.
                            s.answered = true;
                            let mut sink = [0u8; 512];
                            let _ = (&s.stream).read(&mut sink);
                        }
                        Ok(true) | Err(_) => s.closed_at = Some(at),
                    }
                }
            }
            let first_close = stalled.iter().filter_map(|s| s.closed_at).min();
            let conns =
                stalled.iter().map(|s| (s.kind, s.closed_at.map(|c| c.duration_since(s.opened)), s.answered)).collect();
            Ok(Closings { conns, first_close })
        })
        .expect("spawn the flood watch")
}

/// Connects `n` clients one after another, each making one verified call
/// and then hanging up. Returns their outcomes and when the last one ended.
pub fn connect_series(w: &Workload, n: usize) -> (Vec<ClientOutcome>, Duration, Instant) {
    let one = Workload { messages: 1, ..w.clone() };
    let start = Instant::now();
    let outcomes = (0..n)
        .map(|id| match workload::connect(&one) {
            (Ok((mut client, echo)), ns) => workload::run_calls(&mut client, &echo, &one, id as u32, ns),
            (Err(e), ns) => ClientOutcome::failed_to_connect(1, ns, e),
        })
        .collect();
    let end = Instant::now();
    (outcomes, end - start, end)
}

/// How much earlier than its handshake timeout a stalled connection may be
/// seen closed, in milliseconds: clock granularity and the gap between our
/// connect and the daemon's accept.
pub const EARLY_SLACK_MS: f64 = 10.0;

/// Shortest and longest time, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Span {
    pub min: f64,
    pub max: f64,
}

/// The `handshake_flood` object of a `handshake-flood` RUN.
#[derive(Clone, Debug, Serialize)]
pub struct FloodFigures {
    /// `without` (the connects alone) or `with` (while the flood is open).
    pub phase: &'static str,
    /// Stalled connections held open during the connects: silent, with a
    /// partial hello, and dribbling a hello.
    pub stalled: usize,
    pub silent: usize,
    pub partial: usize,
    pub dribbling: usize,
    /// Clients connected one after another, each with one verified call.
    pub connects: usize,
    /// The RUN's own `connect_us`, repeated here beside the ratios.
    pub connect_us: Connect,
    /// With the flood: its connect p50 and p99 over those without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_p50_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_p99_ratio: Option<f64>,
    /// The private daemon's `--handshake-timeout`.
    pub handshake_timeout_ms: u64,
    /// Whether every connect ended before the daemon closed the first
    /// stalled connection (so all of them met the whole flood).
    pub connects_before_first_close: bool,
    /// Stalled connections the daemon closed, and how long after their
    /// connect (`null` if none was closed).
    pub stalled_closed: usize,
    pub stalled_closed_after_ms: Option<Span>,
    /// Stalled connections the daemon sent something to first (expected 0).
    pub stalled_answered: usize,
    /// The daemon's `handshake_timeout` rejects counted over the phase.
    pub daemon_handshake_timeouts: u64,
}

impl FloodFigures {
    /// The figures of the connects made without a flood.
    pub fn without(run: &Run, timeout: Duration) -> FloodFigures {
        FloodFigures {
            phase: "without",
            stalled: 0,
            silent: 0,
            partial: 0,
            dribbling: 0,
            connects: run.clients,
            connect_us: run.connect_us.clone(),
            connect_p50_ratio: None,
            connect_p99_ratio: None,
            handshake_timeout_ms: timeout.as_millis() as u64,
            connects_before_first_close: true,
            stalled_closed: 0,
            stalled_closed_after_ms: None,
            stalled_answered: 0,
            daemon_handshake_timeouts: 0,
        }
    }

    /// The figures of the connects made during the flood, compared with
    /// `without`, and what became of the stalled connections.
    pub fn with(
        run: &Run,
        without: &FloodFigures,
        closings: &Closings,
        connects_end: Instant,
        daemon_handshake_timeouts: u64,
    ) -> FloodFigures {
        let count = |k: Stall| closings.conns.iter().filter(|c| c.0 == k).count();
        let closed: Vec<f64> = closings.conns.iter().filter_map(|c| c.1).map(|d| d.as_secs_f64() * 1e3).collect();
        let connect_us = run.connect_us.clone();
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        FloodFigures {
            phase: "with",
            stalled: closings.conns.len(),
            silent: count(Stall::Silent),
            partial: count(Stall::Partial),
            dribbling: count(Stall::Dribble),
            connects: run.clients,
            connect_p50_ratio: ratio(connect_us.p50, without.connect_us.p50),
            connect_p99_ratio: ratio(connect_us.p99, without.connect_us.p99),
            connect_us,
            handshake_timeout_ms: without.handshake_timeout_ms,
            connects_before_first_close: closings.first_close.is_none_or(|first| connects_end <= first),
            stalled_closed: closed.len(),
            stalled_closed_after_ms: (!closed.is_empty()).then(|| Span {
                min: closed.iter().copied().fold(f64::INFINITY, f64::min),
                max: closed.iter().copied().fold(0.0, f64::max),
            }),
            stalled_answered: closings.conns.iter().filter(|c| c.2).count(),
            daemon_handshake_timeouts,
        }
    }

    /// Whether the daemon closed every stalled connection, none before its
    /// handshake timeout (less [`EARLY_SLACK_MS`]: its deadline starts at
    /// accept, ours just before connect) and none later than `slack` after
    /// it, without answering any.
    pub fn stalled_closed_on_time(&self, slack: Duration) -> bool {
        let timeout = self.handshake_timeout_ms as f64;
        let slack = slack.as_secs_f64() * 1e3;
        self.stalled_closed == self.stalled
            && self.stalled_answered == 0
            && self
                .stalled_closed_after_ms
                .is_none_or(|s| s.min >= timeout - EARLY_SLACK_MS && s.max <= timeout + slack)
    }
}
