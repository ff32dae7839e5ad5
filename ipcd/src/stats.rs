//! Counters the `stats` service reports.
//!
//! Per-request counters live in one cache-padded block per worker, so the
//! hot path never writes a line another worker writes; the `stats` service
//! sums them when asked. Every counter is `Relaxed`: they are statistics,
//! not synchronisation.
//!
//! The counts per service ([`ServiceCounts`], one array per worker) and
//! per session ([`SessionCalls`]) are bumped once per call, so they cost a
//! plain load and store rather than a read-modify-write: each has a
//! single writer, the worker thread that serves the call, and a reader on
//! another thread sees some recent value, never a torn one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::durations::{CallDurations, Snapshot};
use crate::limits::Limits;

/// Adds one to a counter only one thread writes: a load and a store, not
/// a locked read-modify-write (`Relaxed`: a statistic; no other thread
/// writes it, so no update is lost).
fn bump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Services per cache line of [`ServiceCounts`]: two words each.
const SERVICES_PER_LINE: usize = 8;

/// A 128-byte line of counters, so that no line holds another worker's.
#[repr(align(128))]
#[derive(Default)]
struct CountLine([AtomicU64; 2 * SERVICES_PER_LINE]);

/// One worker's calls and errors per service, indexed by service id: only
/// that worker writes them (in the dispatch), `ipcd.services` sums every
/// worker's when asked. The lines are 128-byte aligned, so the array shares
/// no line with any other allocation.
#[derive(Default)]
pub(crate) struct ServiceCounts {
    lines: Box<[CountLine]>,
}

impl ServiceCounts {
    fn new(services: usize) -> ServiceCounts {
        ServiceCounts { lines: (0..services.div_ceil(SERVICES_PER_LINE)).map(|_| CountLine::default()).collect() }
    }

    /// Counts a call to `service`, and an error if it was answered with one
    /// at once. Called on the worker that owns these counts only. An id
    /// past the lines (the unit tests' workers have none) is not counted.
    pub(crate) fn count(&self, service: u16, error: bool) {
        let i = usize::from(service);
        let Some(line) = self.lines.get(i / SERVICES_PER_LINE) else { return };
        let at = 2 * (i % SERVICES_PER_LINE);
        bump(&line.0[at]);
        if error {
            bump(&line.0[at + 1]);
        }
    }

    /// Counts an error of a call to `service` counted before: a
    /// handed-off call answered with one. On the owning worker only.
    pub(crate) fn count_error(&self, service: u16) {
        let i = usize::from(service);
        let Some(line) = self.lines.get(i / SERVICES_PER_LINE) else { return };
        bump(&line.0[2 * (i % SERVICES_PER_LINE) + 1]);
    }

    /// The calls and errors of `service` counted so far.
    fn get(&self, service: usize) -> (u64, u64) {
        let Some(line) = self.lines.get(service / SERVICES_PER_LINE) else { return (0, 0) };
        let at = 2 * (service % SERVICES_PER_LINE);
        (line.0[at].load(Ordering::Relaxed), line.0[at + 1].load(Ordering::Relaxed))
    }
}

/// The calls one session has made, for `ipcd.clients`: written by the
/// worker that serves the session, once per call, and read by whoever
/// asks. Alone on its line, so that sessions of different workers never
/// share one.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct SessionCalls(AtomicU64);

impl SessionCalls {
    /// Counts one call (on the session's worker only).
    pub(crate) fn count(&self) {
        bump(&self.0);
    }

    /// The calls counted so far.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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

pub(crate) const REJECT_NAMES: [&str; 12] = [
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

pub(crate) const DISCONNECT_NAMES: [&str; 5] =
    ["client_hangup", "protocol_violation", "shutdown", "io_error", "stalled"];

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
    /// Calls and errors per service.
    pub(crate) services: ServiceCounts,
    /// How long the calls took, per service.
    pub(crate) durations: CallDurations,
    /// Bytes of the frames taken from clients and written to them, by
    /// transport ([`TRANSPORTS`]), counted once per served batch.
    received: [AtomicU64; TRANSPORTS.len()],
    sent: [AtomicU64; TRANSPORTS.len()],
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

    /// Counts the bytes of a served batch's frames over `transport`, as
    /// [`add`](Self::add) once per batch. Only the worker writes them, so
    /// a load and a store do.
    pub(crate) fn add_bytes(&self, transport: Carrier, received: u64, sent: u64) {
        let at = transport as usize;
        for (counter, n) in [(&self.received[at], received), (&self.sent[at], sent)] {
            if n > 0 {
                counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            }
        }
    }
}

/// What carries a session's frames, for the bytes counted of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carrier {
    /// Shared-memory rings (the daemon's own sessions, or a provider's
    /// brokered ones).
    Shm,
    /// The Unix stream socket.
    Uds,
    /// TCP.
    Tcp,
}

/// The names of the [`Carrier`]s, in order.
pub(crate) const TRANSPORTS: [&str; 3] = ["shm", "uds", "tcp"];

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
    /// Handshakes pending now, and the most that may be (which a reload
    /// may change).
    pending: AtomicUsize,
    max_pending: AtomicUsize,
    rejected: [AtomicU64; REJECT_NAMES.len()],
    disconnects: [AtomicU64; DISCONNECT_NAMES.len()],
    pub(crate) workers: Vec<WorkerCounters>,
    pub(crate) acceptor_turns: AcceptorTurns,
    /// What the broker last published of itself: names, providers,
    /// resolves (written when they change, never per call).
    broker: std::sync::Mutex<BrokerView>,
}

/// What the broker publishes of itself: its names (structured, so that
/// each reader sees only those it may) and its counts.
#[derive(Clone, Debug, Default)]
pub(crate) struct BrokerView {
    /// Every provided name, sorted.
    pub(crate) names: Vec<ProvidedName>,
    /// The rest of `stats`' `broker` object: resolves, registrations...
    pub(crate) counts: serde_json::Map<String, serde_json::Value>,
}

/// A provided name and who holds it.
#[derive(Clone, Debug)]
pub(crate) struct ProvidedName {
    pub(crate) name: String,
    pub(crate) pooled: bool,
    pub(crate) providers: Vec<crate::introspect::ProviderInfo>,
}

impl Stats {
    /// Counters for `workers` workers serving `services` services.
    pub(crate) fn new(workers: usize, max_pending: usize, services: usize) -> Stats {
        Stats {
            started: Instant::now(),
            connected: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            held: AtomicU64::new(0),
            strikes: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            max_pending: AtomicUsize::new(max_pending),
            rejected: Default::default(),
            disconnects: Default::default(),
            workers: (0..workers)
                .map(|_| WorkerCounters {
                    services: ServiceCounts::new(services),
                    durations: CallDurations::new(services),
                    ..WorkerCounters::default()
                })
                .collect(),
            acceptor_turns: AcceptorTurns::default(),
            broker: std::sync::Mutex::new(BrokerView::default()),
        }
    }

    /// Replaces what `stats` reports of the broker.
    pub(crate) fn set_broker(&self, view: BrokerView) {
        *self.broker.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    /// What the broker last published.
    pub(crate) fn broker(&self) -> BrokerView {
        self.broker.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How long ago the counters started.
    pub(crate) fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The calls and errors of service `id`, summed over the workers.
    pub(crate) fn service_counts(&self, id: usize) -> (u64, u64) {
        self.workers.iter().map(|w| w.services.get(id)).fold((0, 0), |(c, e), (wc, we)| (c + wc, e + we))
    }

    /// The durations of the calls to service `id`, summed over the
    /// workers.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn durations(&self, id: usize) -> Snapshot {
        let mut sum = Snapshot::default();
        for w in &self.workers {
            sum.merge(&w.durations.get(id));
        }
        sum
    }

    /// The bytes received and sent over each transport, in [`TRANSPORTS`]
    /// order, summed over the workers.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn bytes(&self) -> [(u64, u64); TRANSPORTS.len()] {
        std::array::from_fn(|t| {
            let sum = |f: fn(&WorkerCounters) -> &[AtomicU64; 3]| -> u64 {
                self.workers.iter().map(|w| f(w)[t].load(Ordering::Relaxed)).sum()
            };
            (sum(|w| &w.received), sum(|w| &w.sent))
        })
    }

    /// Sets the most handshakes that may be pending, as reported.
    pub(crate) fn set_max_pending(&self, n: usize) {
        self.max_pending.store(n, Ordering::Relaxed);
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

    /// The handshakes accepted, held, and the strikes, so far.
    pub(crate) fn handshakes(&self) -> (u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (load(&self.accepted), load(&self.held), load(&self.strikes))
    }

    /// The handshakes pending now, and the most that may be.
    pub(crate) fn pending(&self) -> (usize, usize) {
        (self.pending.load(Ordering::Relaxed), self.max_pending.load(Ordering::Relaxed))
    }

    /// The rejects by reason, in [`REJECT_NAMES`] order.
    pub(crate) fn rejects(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REJECT_NAMES.iter().copied().zip(self.rejected.iter().map(|c| c.load(Ordering::Relaxed)))
    }

    /// The disconnects by reason, in [`DISCONNECT_NAMES`] order.
    pub(crate) fn disconnects(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DISCONNECT_NAMES.iter().copied().zip(self.disconnects.iter().map(|c| c.load(Ordering::Relaxed)))
    }

    /// Requests, replies and errors, summed over the workers.
    pub(crate) fn calls(&self) -> (u64, u64, u64) {
        let sum = |f: fn(&WorkerCounters) -> &AtomicU64| {
            self.workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum::<u64>()
        };
        (sum(|w| &w.requests), sum(|w| &w.replies), sum(|w| &w.errors))
    }

    /// The JSON the `stats` service replies with, `limits` among it; of
    /// the broker's names, only those `visible` keeps.
    pub(crate) fn to_json(&self, limits: &Limits, visible: impl Fn(&str) -> bool) -> Vec<u8> {
        let (accepted, held, strikes) = self.handshakes();
        let (requests, replies, errors) = self.calls();
        let (pending, max_pending) = self.pending();
        let named = |it: &mut dyn Iterator<Item = (&'static str, u64)>| -> serde_json::Map<String, serde_json::Value> {
            it.map(|(n, c)| (n.to_string(), c.into())).collect()
        };
        let BrokerView { names, counts } = self.broker();
        let names: Vec<serde_json::Value> = names
            .into_iter()
            .filter(|n| visible(&n.name))
            .map(|n| serde_json::json!({ "name": n.name, "pooled": n.pooled, "providers": n.providers }))
            .collect();
        let mut broker = serde_json::Map::new();
        broker.insert("names".into(), names.into());
        broker.extend(counts);
        let value = serde_json::json!({
            "connected_clients": self.connected.load(Ordering::Relaxed),
            "handshakes": {
                "accepted": accepted,
                "held": held,
                "strikes": strikes,
                "rejected": named(&mut self.rejects()),
            },
            "requests": requests,
            "replies": replies,
            "errors": errors,
            "disconnects": named(&mut self.disconnects()),
            "limits": {
                "memory_budget": limits.budget(),
                "memory_in_use": limits.in_use(),
                "memory_pooled": limits.pooled(),
                "max_sessions_per_uid": limits.max_per_uid(),
                "pending_handshakes": pending,
                "max_pending_handshakes": max_pending,
            },
            "broker": broker,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "workers": self.workers.len(),
        });
        value.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_counts_are_per_id_and_ids_past_the_table_are_not_counted() {
        let counts = ServiceCounts::new(10);
        assert_eq!(counts.lines.len(), 2, "8 services a line");
        counts.count(0, false);
        counts.count(9, true);
        counts.count(9, false);
        counts.count(16, true);
        counts.count(u16::MAX, true);
        assert_eq!((counts.get(0), counts.get(9), counts.get(8), counts.get(16)), ((1, 0), (2, 1), (0, 0), (0, 0)));
        assert_eq!(std::mem::align_of::<CountLine>(), 128);
        assert_eq!(std::mem::size_of::<CountLine>(), 128);
        assert_eq!(std::mem::align_of::<SessionCalls>(), 128);
    }

    #[test]
    fn the_workers_counts_are_summed() {
        let stats = Stats::new(2, 1, 3);
        stats.workers[0].services.count(2, true);
        stats.workers[1].services.count(2, false);
        assert_eq!(stats.service_counts(2), (2, 1));
        assert_eq!(stats.service_counts(0), (0, 0));
        stats.workers[1].services.count_error(2);
        assert_eq!(stats.service_counts(2), (2, 2), "a handed-off call's error, counted when it is answered");
        stats.workers[0].durations.record(2, std::time::Duration::from_micros(3));
        stats.workers[1].durations.record(2, std::time::Duration::from_micros(30));
        assert_eq!((stats.durations(2).count(), stats.durations(2).sum_ns), (2, 33_000));
        stats.workers[0].add_bytes(Carrier::Uds, 10, 20);
        stats.workers[1].add_bytes(Carrier::Uds, 1, 2);
        stats.workers[1].add_bytes(Carrier::Shm, 5, 0);
        assert_eq!(stats.bytes(), [(5, 0), (11, 22), (0, 0)]);
    }
}
