//! What the serving threads share: the engine that serves sessions, the
//! same in the daemon, in an embedded server and in a provider.
//!
//! Workers ([`crate::worker`]) serve sessions; where the sessions come from
//! is the owner's business: the daemon's acceptor builds them from its own
//! handshakes, a provider from the sessions the daemon brokers to it. The
//! engine holds what every worker needs (the services, the counters, the
//! stop flag, how long to spin and to tolerate a stall) and
//! [`SessionEvents`], through which the workers tell the owner what only
//! the owner can act on: that a peer broke the protocol (the daemon holds
//! that process's next handshakes; a provider reports it to the daemon),
//! and that a session ended.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::limits::Limits;
use crate::service::ServiceTable;
use crate::stats::Stats;
use crate::stream_session::Peer;

/// What the workers tell the engine's owner about sessions. Called on a
/// worker thread, rarely (never per request): implementations may lock.
pub(crate) trait SessionEvents: Send + Sync {
    /// The peer of `session` broke the protocol, or stalled past the stall
    /// timeout, and the session is being closed.
    fn struck(&self, peer: &Peer, session: u64);

    /// `session` has ended, for whatever reason.
    fn closed(&self, _session: u64) {}
}

/// The engine's shared state; see the module docs.
pub(crate) struct Engine {
    /// Worker threads.
    pub(crate) workers: usize,
    /// How long a worker spins on idle rings before sleeping.
    pub(crate) spin: Duration,
    /// How long a session may stay stalled on replies its client does not
    /// read before it is closed (a reload may change it).
    pub(crate) stall_timeout: StallTimeout,
    pub(crate) services: ServiceTable,
    /// What messages held for a while (assembled requests, long replies,
    /// stream items) are charged against: the server's memory budget.
    pub(crate) limits: Arc<Limits>,
    /// The longest message a session takes or sends.
    pub(crate) max_message: u64,
    pub(crate) stats: Arc<Stats>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) events: Box<dyn SessionEvents>,
    /// Where closed sessions' mappings go to be unmapped, once the daemon
    /// has a segment pool (see [`crate::segment_pool`]); else a worker
    /// unmaps them as it closes them.
    pub(crate) retirer: std::sync::OnceLock<crate::segment_pool::Retirer>,
}

/// The stall timeout, which the daemon's reload may change while the
/// workers read it.
#[derive(Debug)]
pub(crate) struct StallTimeout(AtomicU64);

impl StallTimeout {
    pub(crate) fn new(timeout: Duration) -> StallTimeout {
        StallTimeout(AtomicU64::new(Self::nanos(timeout)))
    }

    fn nanos(timeout: Duration) -> u64 {
        u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The timeout in force.
    pub(crate) fn get(&self) -> Duration {
        // Relaxed: a value on its own, guarding no other memory; a worker
        // that reads the old one a moment longer errs by that moment.
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    /// Sets it; the workers must then be woken to re-arm their timers.
    pub(crate) fn set(&self, timeout: Duration) {
        self.0.store(Self::nanos(timeout), Ordering::Relaxed);
    }
}
