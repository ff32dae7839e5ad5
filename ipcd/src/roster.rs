//! The roster: every live session the daemon knows of, for `ipcd.clients`
//! and the counts of `ipcd.status`.
//!
//! The workers own the daemon's sessions, and a worker's loop takes no
//! lock; so the roster is kept beside them rather than asked of them. The
//! acceptor enters a session when it hands it to a worker, and the
//! worker's closing of it (through [`crate::engine::SessionEvents::closed`])
//! takes it out; the broker enters the sessions it hands over, and takes
//! them out when their provider reports them closed or goes away. Each
//! entry holds the session's own call counter, which its worker bumps per
//! call without a lock ([`SessionCalls`]); readers take the roster's lock,
//! which is held only to insert, remove or copy entries, never on a call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::introspect::{ProviderInfo, SessionInfo, Transport};
use crate::request::Caller;
use crate::stats::SessionCalls;

/// One live session.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) transport: Transport,
    /// The client, as the kernel reported it (none over TCP).
    pub(crate) caller: Option<Caller>,
    /// A TCP client's address.
    pub(crate) address: Option<SocketAddr>,
    pub(crate) ring_size: Option<u32>,
    pub(crate) max_payload: u32,
    pub(crate) opened: Instant,
    /// The worker that serves it (the daemon's own sessions).
    pub(crate) worker: Option<usize>,
    /// Its calls (the daemon's own sessions: brokered calls are not seen).
    pub(crate) calls: Option<Arc<SessionCalls>>,
    /// For a brokered session: the name resolved, and its provider (with
    /// the provider's sessions as of the hand-over).
    pub(crate) service: Option<String>,
    pub(crate) provider: Option<ProviderInfo>,
}

impl Entry {
    /// Whether the process `uid` is this session's client or provider.
    pub(crate) fn belongs_to(&self, uid: u32) -> bool {
        self.caller.is_some_and(|c| c.uid == uid) || self.provider.is_some_and(|p| p.uid == uid)
    }

    /// What `ipcd.clients` says of it.
    pub(crate) fn info(&self, id: u64, now: Instant) -> SessionInfo {
        SessionInfo {
            id,
            transport: self.transport,
            pid: self.caller.map(|c| c.pid),
            uid: self.caller.map(|c| c.uid),
            gid: self.caller.map(|c| c.gid),
            address: self.address.map(|a| a.to_string()),
            ring_size: self.ring_size,
            max_payload: self.max_payload,
            age_s: now.saturating_duration_since(self.opened).as_secs_f64(),
            calls: self.calls.as_ref().map(|c| c.get()),
            worker: self.worker,
            service: self.service.clone(),
            provider: self.provider,
        }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    sessions: Mutex<BTreeMap<u64, Entry>>,
}

impl Roster {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters session `id`.
    pub(crate) fn insert(&self, id: u64, entry: Entry) {
        self.lock().insert(id, entry);
    }

    /// Takes session `id` out, if it is in.
    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// How many sessions of each transport (shm, uds, tcp, brokered).
    pub(crate) fn counts(&self) -> [usize; 4] {
        let mut counts = [0; 4];
        for entry in self.lock().values() {
            counts[entry.transport as usize] += 1;
        }
        counts
    }

    /// The sessions after `after` (by id) that `visible` keeps, in order of
    /// id, as `ipcd.clients` reports them, while `fits` accepts them.
    pub(crate) fn page(
        &self,
        after: Option<u64>,
        visible: impl Fn(&Entry) -> bool,
        mut fits: impl FnMut(&SessionInfo) -> bool,
    ) -> (Vec<SessionInfo>, bool) {
        let now = Instant::now();
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let sessions = self.lock();
        let mut page = Vec::new();
        for (&id, entry) in sessions.range((start, std::ops::Bound::Unbounded)) {
            if !visible(entry) {
                continue;
            }
            let info = entry.info(id, now);
            if !fits(&info) {
                return (page, true);
            }
            page.push(info);
        }
        (page, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(transport: Transport, uid: Option<u32>) -> Entry {
        Entry {
            transport,
            caller: uid.map(|uid| Caller { pid: 1, uid, gid: uid }),
            address: None,
            ring_size: None,
            max_payload: 100,
            opened: Instant::now(),
            worker: None,
            calls: Some(Arc::default()),
            service: None,
            provider: None,
        }
    }

    #[test]
    fn pages_go_on_after_the_last_entry_and_keep_only_the_visible() {
        let roster = Roster::default();
        for id in 1..=5 {
            roster.insert(id, entry(Transport::Shm, Some(if id % 2 == 0 { 1000 } else { 0 })));
        }
        roster.insert(6, entry(Transport::Tcp, None));
        assert_eq!(roster.counts(), [5, 0, 1, 0]);
        let mut taken = 0;
        let (first, more) = roster.page(
            None,
            |_| true,
            |_| {
                taken += 1;
                taken <= 2
            },
        );
        assert_eq!((first.iter().map(|s| s.id).collect::<Vec<_>>(), more), (vec![1, 2], true));
        let (rest, more) = roster.page(Some(2), |_| true, |_| true);
        assert_eq!((rest.iter().map(|s| s.id).collect::<Vec<_>>(), more), (vec![3, 4, 5, 6], false));
        let (own, _) = roster.page(None, |e| e.belongs_to(1000), |_| true);
        assert_eq!(own.iter().map(|s| s.id).collect::<Vec<_>>(), [2, 4]);
        roster.remove(2);
        roster.remove(99);
        let (own, _) = roster.page(None, |e| e.belongs_to(1000), |_| true);
        assert_eq!(own.iter().map(|s| s.id).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn a_brokered_session_belongs_to_its_client_and_its_provider() {
        let mut e = entry(Transport::Brokered, Some(1000));
        e.provider = Some(ProviderInfo { id: 1, pid: 2, uid: 2000, sessions: 1 });
        assert!(e.belongs_to(1000) && e.belongs_to(2000) && !e.belongs_to(0));
        assert!(!entry(Transport::Tcp, None).belongs_to(0), "a TCP session is no one's");
    }
}
