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
//! Keyed by process, so it slows one process: a peer that forks a new
//! process for every attempt escapes it (a limit per uid would also slow
//! that uid's honest processes). A process is its uid and pid together, so
//! that the same pid number seen under two uids (two pid namespaces) is two
//! peers. A peer in a pid namespace the daemon cannot see is reported with
//! pid 0: its strikes go to its uid as a whole, so such peers neither share
//! a bucket with other users nor escape by all being "pid 0". TCP peers
//! carry no credentials and have no cool-down.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipc_platform::PeerCredentials;

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

/// Whom a strike counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A process the daemon can name: its uid and pid.
    Process { uid: u32, pid: i32 },
    /// Every process of a uid whose pid the daemon cannot see (reported
    /// as 0).
    UnseenPids { uid: u32 },
}

impl Key {
    fn of(peer: &PeerCredentials) -> Key {
        match peer.pid {
            0 => Key::UnseenPids { uid: peer.uid },
            pid => Key::Process { uid: peer.uid, pid },
        }
    }
}

/// Strikes by process. Touched only when a session is closed for a
/// violation or a stall and when a Unix peer's hello is admitted.
#[derive(Debug, Default)]
pub(crate) struct Cooldown {
    peers: Mutex<HashMap<Key, Strikes>>,
}

/// The wait after `count` strikes.
fn wait_for(count: u32) -> Duration {
    let doubled = Duration::from_millis(1u64 << count.saturating_sub(1).min(20));
    doubled.min(MAX_WAIT)
}

impl Cooldown {
    /// Records a protocol violation (or a stall that ran out) by `peer` at
    /// `now`.
    pub(crate) fn strike(&self, peer: &PeerCredentials, now: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= SWEEP_AT {
            peers.retain(|_, s| now.saturating_duration_since(s.last) < FORGIVE_AFTER);
        }
        let s = peers.entry(Key::of(peer)).or_insert(Strikes { count: 0, last: now });
        if now.saturating_duration_since(s.last) >= FORGIVE_AFTER {
            s.count = 0;
        }
        s.count = s.count.saturating_add(1);
        s.last = now;
    }

    /// When a handshake from `peer` may be answered, if that is after
    /// `now`.
    pub(crate) fn wait_until(&self, peer: &PeerCredentials, now: Instant) -> Option<Instant> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let s = peers.get(&Key::of(peer))?;
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

    fn peer(uid: u32, pid: i32) -> PeerCredentials {
        PeerCredentials { pid, uid, gid: uid }
    }

    #[test]
    fn a_peer_waits_after_strikes_and_is_forgiven() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        let p = peer(1000, 7);
        assert_eq!(c.wait_until(&p, t0), None, "no strikes, no wait");
        for _ in 0..5 {
            c.strike(&p, t0);
        }
        assert_eq!(c.wait_until(&p, t0), Some(t0 + Duration::from_millis(16)));
        assert_eq!(c.wait_until(&peer(1000, 8), t0), None, "another process is not held");
        assert_eq!(c.wait_until(&p, t0 + Duration::from_millis(16)), None, "the wait is over");
        // Long after the last strike, a new one counts as the first.
        let later = t0 + FORGIVE_AFTER;
        assert_eq!(c.wait_until(&p, later), None);
        c.strike(&p, later);
        assert_eq!(c.wait_until(&p, later), Some(later + Duration::from_millis(1)));
    }

    #[test]
    fn the_same_pid_under_two_uids_is_two_peers() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        c.strike(&peer(1000, 42), t0);
        assert!(c.wait_until(&peer(1000, 42), t0).is_some());
        assert_eq!(c.wait_until(&peer(1001, 42), t0), None, "pid 42 of another uid (namespace) is not held");
    }

    #[test]
    fn peers_with_unseen_pids_share_their_uids_strikes_only() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        // Two processes of uid 1000 in a pid namespace the daemon cannot
        // see: both report pid 0.
        for _ in 0..3 {
            c.strike(&peer(1000, 0), t0);
        }
        let held = Some(t0 + Duration::from_millis(4));
        assert_eq!(c.wait_until(&peer(1000, 0), t0), held, "a pid-0 peer does not escape its strikes");
        assert_eq!(c.wait_until(&peer(1001, 0), t0), None, "another user's pid-0 peers are not held");
        assert_eq!(c.wait_until(&peer(1000, 5), t0), None, "a visible process of the uid is a peer of its own");
        // And a pid-0 peer is not held for a visible process's strikes.
        c.strike(&peer(1002, 9), t0);
        assert_eq!(c.wait_until(&peer(1002, 0), t0), None);
    }

    #[test]
    fn forgotten_peers_are_swept_out() {
        let c = Cooldown::default();
        let t0 = Instant::now();
        for pid in 0..SWEEP_AT as i32 {
            c.strike(&peer(1000, pid), t0);
        }
        c.strike(&peer(1000, i32::MAX), t0 + FORGIVE_AFTER);
        let peers = c.peers.lock().unwrap();
        assert_eq!(peers.len(), 1, "only the fresh strike is kept");
    }
}
