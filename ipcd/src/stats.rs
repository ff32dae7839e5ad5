//! Counters the `stats` service reports.
//!
//! Per-request counters live in one cache-padded block per worker, so the
//! hot path never writes a line another worker writes; the `stats` service
//! sums them when asked. Every counter is `Relaxed`: they are statistics,
//! not synchronisation.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::limits::Limits;

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RejectReason {
    VersionMismatch,
    TooManyClients,
    BadHello,
    HandshakeTimeout,
    HungUp,
    Resources,
    ShuttingDown,
    /// The peer's uid and gid are in neither allow list.
    NotPermitted,
    /// The session would take the memory in use past the budget.
    OverMemoryBudget,
    /// The peer's uid already has the most sessions one uid may have.
    UidSessionLimit,
    /// The connection came while the most handshakes were pending, and no
    /// owner had enough more than the newcomer's to make room.
    PendingHandshakeLimit,
    /// The handshake was closed unfinished to make room for another
    /// owner's, at the cap on pending handshakes.
    PendingHandshakeEvicted,
}

const REJECT_NAMES: [&str; 12] = [
    "version_mismatch",
    "too_many_clients",
    "bad_hello",
    "handshake_timeout",
    "hung_up",
    "resources",
    "shutting_down",
    "not_permitted",
    "over_memory_budget",
    "uid_session_limit",
    "pending_handshake_limit",
    "pending_handshake_evicted",
];

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DisconnectReason {
    /// The client closed its control connection.
    ClientHangup,
    /// The client broke the ring or control protocol.
    ProtocolViolation,
    /// The daemon is shutting down.
    Shutdown,
    /// A system call on the session failed.
    IoError,
    /// The client left its replies unread for longer than the stall
    /// timeout.
    Stalled,
}

const DISCONNECT_NAMES: [&str; 5] = ["client_hangup", "protocol_violation", "shutdown", "io_error", "stalled"];

impl DisconnectReason {
    pub(crate) fn name(self) -> &'static str {
        DISCONNECT_NAMES[self as usize]
    }
}

/// One worker's counters, alone on their cache lines.
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct WorkerCounters {
    pub(crate) requests: AtomicU64,
    pub(crate) replies: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) sessions: AtomicUsize,
    /// Turns of the worker's loop, for the watchdog (see [`crate::health`]).
    pub(crate) turns: AtomicU64,
}

impl WorkerCounters {
    /// Counts a turn of the worker's loop: one add, on a line no other
    /// thread writes.
    pub(crate) fn turn(&self) {
        self.turns.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a served batch (once per batch, not per request): `requests`
    /// taken, `replies` answered (those answered at once, or the answers of
    /// handed-off calls), `errors` of the replies with an error.
    pub(crate) fn add(&self, requests: u64, replies: u64, errors: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.replies.fetch_add(replies, Ordering::Relaxed);
        self.errors.fetch_add(errors, Ordering::Relaxed);
    }
}

/// The acceptor's turn counter, alone on its cache lines (the acceptor
/// counts every turn of its loop; see [`crate::health`]).
#[repr(align(128))]
#[derive(Default)]
pub(crate) struct AcceptorTurns(pub(crate) AtomicU64);

impl AcceptorTurns {
    pub(crate) fn turn(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) struct Stats {
    started: Instant,
    pub(crate) connected: AtomicUsize,
    accepted: AtomicU64,
    /// Handshakes held back by the cool-down of a peer that broke the
    /// protocol.
    held: AtomicU64,
    /// Strikes recorded against peers (protocol violations and stalls that
    /// ran out).
    strikes: AtomicU64,
    /// Handshakes pending now, and the most that may be.
    pending: AtomicUsize,
    max_pending: usize,
    rejected: [AtomicU64; REJECT_NAMES.len()],
    disconnects: [AtomicU64; DISCONNECT_NAMES.len()],
    pub(crate) workers: Vec<WorkerCounters>,
    pub(crate) acceptor_turns: AcceptorTurns,
    /// What the broker last published of itself: names, providers,
    /// resolves (written when they change, never per call).
    broker: std::sync::Mutex<serde_json::Value>,
}

impl Stats {
    pub(crate) fn new(workers: usize, max_pending: usize) -> Stats {
        Stats {
            started: Instant::now(),
            connected: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            held: AtomicU64::new(0),
            strikes: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            max_pending,
            rejected: Default::default(),
            disconnects: Default::default(),
            workers: (0..workers).map(|_| WorkerCounters::default()).collect(),
            acceptor_turns: AcceptorTurns::default(),
            broker: std::sync::Mutex::new(serde_json::json!({ "names": [] })),
        }
    }

    /// Replaces what `stats` reports of the broker.
    pub(crate) fn set_broker(&self, value: serde_json::Value) {
        *self.broker.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn struck(&self) {
        self.strikes.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how many handshakes are pending.
    pub(crate) fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self, reason: DisconnectReason) {
        self.disconnects[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The JSON the `stats` service replies with, `limits` among it.
    pub(crate) fn to_json(&self, limits: &Limits) -> Vec<u8> {
        fn named(names: &[&str], counters: &[AtomicU64]) -> serde_json::Map<String, serde_json::Value> {
            names.iter().zip(counters).map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed).into())).collect()
        }
        let sum = |f: fn(&WorkerCounters) -> &AtomicU64| {
            self.workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum::<u64>()
        };
        let value = serde_json::json!({
            "connected_clients": self.connected.load(Ordering::Relaxed),
            "handshakes": {
                "accepted": self.accepted.load(Ordering::Relaxed),
                "held": self.held.load(Ordering::Relaxed),
                "strikes": self.strikes.load(Ordering::Relaxed),
                "rejected": named(&REJECT_NAMES, &self.rejected),
            },
            "requests": sum(|w| &w.requests),
            "replies": sum(|w| &w.replies),
            "errors": sum(|w| &w.errors),
            "disconnects": named(&DISCONNECT_NAMES, &self.disconnects),
            "limits": {
                "memory_budget": limits.budget(),
                "memory_in_use": limits.in_use(),
                "max_sessions_per_uid": limits.max_per_uid(),
                "pending_handshakes": self.pending.load(Ordering::Relaxed),
                "max_pending_handshakes": self.max_pending,
            },
            "broker": self.broker.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "workers": self.workers.len(),
        });
        value.to_string().into_bytes()
    }
}
