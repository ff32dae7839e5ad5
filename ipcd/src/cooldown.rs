//! Peers that broke the protocol, or stalled until cut off, wait before
//! their next session.
//!
//! Cutting a misbehaving client off costs it nothing if it can reconnect at
//! once, and every new session costs the daemon a sealed, allocated and
//! mapped segment: a client that scribbles over its rings and reconnects in
//! a loop would keep the acceptor and its worker busy. A stall that
//! outlasted the stall timeout counts the same, so that a process whose
//! sessions keep stalling (many at a time, or under a short stall timeout)
//! is slowed like one that scribbles. So each protocol violation, and each
//! stall that ran out, is a strike against the peer's process id, and a
//! handshake from a process with strikes is answered only after a delay that doubles
//! with each strike: 1 ms after the first, up to [`MAX_WAIT`]. Strikes are
//! forgotten [`FORGIVE_AFTER`] after the last one. The handshake is held,
//! not refused, so a client whose bug was a one-off barely notices, and a
//! hostile one is slowed to a few sessions a second.
//!
//! Keyed by pid, so it slows one process: a peer that forks a new process
//! for every attempt escapes it (a limit per uid would also slow that uid's
//! honest processes). TCP peers carry no pid and have no cool-down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a peer waits before its next handshake is answered.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1);
/// How long after its last strike a peer's strikes are forgotten.
pub(crate) const FORGIVE_AFTER: Duration = Duration::from_secs(10);
/// Entries kept before forgotten ones are swept out.
const SWEEP_AT: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Strikes {
    count: u32,
    last: Instant,
}

/// Strikes by process id. Touched only when a session is closed for a
/// violation or a stall and when a Unix peer's hello is admitted.
#[derive(Debug, Default)]
pub(crate) struct Cooldown {
    peers: Mutex<HashMap<i32, Strikes>>,
}

/// The wait after `count` strikes.
fn wait_for(count: u32) -> Duration {
    let doubled = Duration::from_millis(1u64 << count.saturating_sub(1).min(20));
    doubled.min(MAX_WAIT)
}

impl Cooldown {
    /// Records a protocol violation (or a stall that ran out) by process
    /// `pid` at `now`.
    pub(crate) fn strike(&self, pid: i32, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= SWEEP_AT {
            peers.retain(|_, s| now.saturating_duration_since(s.last) < FORGIVE_AFTER);
        }
        let s = peers.entry(pid).or_insert(Strikes { count: 0, last: now });
        if now.saturating_duration_since(s.last) >= FORGIVE_AFTER {
            s.count = 0;
        }
        s.count = s.count.saturating_add(1);
        s.last = now;
    }

    /// When a handshake from `pid` may be answered, if that is after `now`.
    pub(crate) fn wait_until(&self, pid: i32, now: Instant) -> Option<Instant> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let s = peers.get(&pid)?;
        if now.saturating_duration_since(s.last) >= FORGIVE_AFTER {
            return None;
        }
        let until = s.last + wait_for(s.count);
        (until > now).then_some(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_per_strike_up_to_the_cap() {
        assert_eq!(wait_for(1), Duration::from_millis(1));
        assert_eq!(wait_for(2), Duration::from_millis(2));
        assert_eq!(wait_for(5), Duration::from_millis(16));
        assert_eq!(wait_for(10), Duration::from_millis(512));
        assert_eq!(wait_for(11), MAX_WAIT);
        assert_eq!(wait_for(u32::MAX), MAX_WAIT);
    }

    #[test]
    fn a_peer_waits_after_strikes_and_is_forgiven() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        assert_eq!(c.wait_until(7, t0), None, "no strikes, no wait");
        for _ in 0..5 {
            c.strike(7, t0);
        }
        assert_eq!(c.wait_until(7, t0), Some(t0 + Duration::from_millis(16)));
        assert_eq!(c.wait_until(8, t0), None, "another process is not held");
        assert_eq!(c.wait_until(7, t0 + Duration::from_millis(16)), None, "the wait is over");
        // Long after the last strike, a new one counts as the first.
        let later = t0 + FORGIVE_AFTER;
        assert_eq!(c.wait_until(7, later), None);
        c.strike(7, later);
        assert_eq!(c.wait_until(7, later), Some(later + Duration::from_millis(1)));
    }

    #[test]
    fn forgotten_peers_are_swept_out() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        for pid in 0..SWEEP_AT as i32 {
            c.strike(pid, t0);
        }
        c.strike(i32::MAX, t0 + FORGIVE_AFTER);
        let peers = c.peers.lock().unwrap();
        assert_eq!(peers.len(), 1, "only the fresh strike is kept");
    }
}
