//! What a running server can change without a restart ([`Settings`]), and
//! how it changes them ([`ReloadHandle`]).
//!
//! Settings are checked in full before anything changes, and a change is
//! taken up by the acceptor between two turns of its loop, all of it at
//! once: every handshake and every resolve is judged by the old settings
//! or by the new, never by a mixture. What they govern is what comes next:
//! new connections, new sessions, new resolves and registrations. Sessions
//! already open stay open whatever the new rules say (a client whose uid
//! is no longer allowed keeps the sessions it has; its next connection is
//! refused), registrations already made stay until their provider
//! disconnects, a lower memory budget or per-uid limit refuses new
//! sessions until enough have closed, and a lower cap on clients or
//! pending handshakes closes none. A new stall timeout applies at once to
//! every stalled session (the workers are woken to re-arm their timers).
//!
//! Not here, and so fixed for a server's life: its sockets and their mode,
//! its workers, spinning, the services and their handler threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ipc_core::SegmentLayout;
use mio::Waker;

use crate::access::AllowList;
use crate::policy::{AccessRule, Policy};
use crate::server::{ServerError, FALLBACK_MAX_SHM};
use crate::shared::Shared;

/// The settings a running server can change: who may connect, provide and
/// call, and the limits on what clients may take. [`ServerBuilder`]'s
/// methods of the same names set them at the start; a [`ReloadHandle`]
/// changes them later.
///
/// ```no_run
/// # let server = ipcd::Server::builder().socket("/tmp/reload.sock").build()?;
/// let reload = server.reload_handle();
/// let mut settings = reload.settings();
/// settings.allow_uids = vec![0, 1000];
/// settings.max_clients = 128;
/// reload.apply(settings)?; // checked in full first; the acceptor switches at its next turn
/// # Ok::<(), ipcd::ServerError>(())
/// ```
///
/// [`ServerBuilder`]: crate::ServerBuilder
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settings {
    /// Uids admitted on the Unix listeners ([`ServerBuilder::allow_uid`](crate::ServerBuilder::allow_uid));
    /// with `allow_gids`, both empty admits anyone who can open the socket.
    pub allow_uids: Vec<u32>,
    /// Primary gids admitted ([`ServerBuilder::allow_gid`](crate::ServerBuilder::allow_gid)).
    pub allow_gids: Vec<u32>,
    /// Who may provide and call provided names, the first matching rule
    /// deciding ([`ServerBuilder::access_rule`](crate::ServerBuilder::access_rule)).
    pub access_rules: Vec<AccessRule>,
    /// The most clients served at once ([`ServerBuilder::max_clients`](crate::ServerBuilder::max_clients)).
    pub max_clients: usize,
    /// How long a connection may take to send its hello, and a provider to
    /// take a session ([`ServerBuilder::handshake_timeout`](crate::ServerBuilder::handshake_timeout)).
    pub handshake_timeout: Duration,
    /// The most unfinished handshakes ([`ServerBuilder::max_pending_handshakes`](crate::ServerBuilder::max_pending_handshakes)).
    pub max_pending_handshakes: usize,
    /// The largest ring a client may ask for, in bytes ([`ServerBuilder::max_ring_capacity`](crate::ServerBuilder::max_ring_capacity)).
    pub max_ring_capacity: u32,
    /// The memory all sessions may be charged, in bytes; `None`, a quarter
    /// of the machine's ([`ServerBuilder::max_shm`](crate::ServerBuilder::max_shm)).
    pub max_shm: Option<u64>,
    /// The most live sessions of one uid ([`ServerBuilder::max_sessions_per_uid`](crate::ServerBuilder::max_sessions_per_uid)).
    pub max_sessions_per_uid: usize,
    /// How long a client may leave its replies unread ([`ServerBuilder::stall_timeout`](crate::ServerBuilder::stall_timeout)).
    pub stall_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            access_rules: Vec::new(),
            max_clients: 4096,
            handshake_timeout: Duration::from_secs(2),
            max_pending_handshakes: crate::DEFAULT_MAX_PENDING_HANDSHAKES,
            max_ring_capacity: 16 << 20,
            max_shm: None,
            max_sessions_per_uid: crate::DEFAULT_MAX_SESSIONS_PER_UID,
            stall_timeout: crate::DEFAULT_STALL_TIMEOUT,
        }
    }
}

/// The default memory budget for sessions: a quarter of the machine's RAM
/// (`MemTotal`), or [`FALLBACK_MAX_SHM`] where it cannot be read.
pub(crate) fn default_max_shm() -> u64 {
    ipc_platform::total_memory().map_or(FALLBACK_MAX_SHM, |total| total / 4)
}

impl Settings {
    /// Checks every value, as [`ServerBuilder::build`](crate::ServerBuilder::build)
    /// and [`ReloadHandle::apply`] do: counts of at least one, timeouts
    /// above zero, well-formed rule patterns, and a memory budget that
    /// holds at least the smallest session. The error names the first
    /// value refused ([`ServerError::Config`]).
    pub fn check(&self) -> Result<(), ServerError> {
        let refuse = |what: &str| Err(ServerError::Config(what.to_string()));
        if self.max_clients == 0 {
            return refuse("max clients must be at least 1");
        }
        if self.handshake_timeout.is_zero() {
            return refuse("the handshake timeout must be positive");
        }
        if self.stall_timeout.is_zero() {
            return refuse("the stall timeout must be positive");
        }
        if self.max_pending_handshakes == 0 {
            return refuse("max pending handshakes must be at least 1");
        }
        if self.max_sessions_per_uid == 0 {
            return refuse("max sessions per uid must be at least 1");
        }
        for rule in &self.access_rules {
            AccessRule::check_pattern(&rule.pattern).map_err(ServerError::Config)?;
        }
        let budget = self.budget();
        let smallest = SegmentLayout::new(SegmentLayout::fit_capacity(0, u32::MAX))
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let smallest = crate::limits::shm_charge(&smallest);
        if budget < smallest {
            return Err(ServerError::Config(format!(
                "the memory budget of {budget} bytes is below the {smallest} bytes of the smallest session"
            )));
        }
        Ok(())
    }

    /// The memory budget, the default resolved.
    pub(crate) fn budget(&self) -> u64 {
        self.max_shm.unwrap_or_else(default_max_shm)
    }

    pub(crate) fn allow(&self) -> AllowList {
        AllowList { uids: self.allow_uids.clone(), gids: self.allow_gids.clone() }
    }

    /// What differs from `old` to `self`, one phrase per setting, for the
    /// log.
    pub(crate) fn changes_from(&self, old: &Settings) -> Vec<String> {
        let mut changes = Vec::new();
        let mut note = |name: &str, old: String, new: String| {
            if old != new {
                changes.push(format!("{name} {old} -> {new}"));
            }
        };
        note("allow-uid", format!("{:?}", old.allow_uids), format!("{:?}", self.allow_uids));
        note("allow-gid", format!("{:?}", old.allow_gids), format!("{:?}", self.allow_gids));
        note("max-clients", old.max_clients.to_string(), self.max_clients.to_string());
        note("handshake-timeout", format!("{:?}", old.handshake_timeout), format!("{:?}", self.handshake_timeout));
        note("max-pending-handshakes", old.max_pending_handshakes.to_string(), self.max_pending_handshakes.to_string());
        note("max-ring-size", old.max_ring_capacity.to_string(), self.max_ring_capacity.to_string());
        note("max-shm", old.budget().to_string(), self.budget().to_string());
        note("max-sessions-per-uid", old.max_sessions_per_uid.to_string(), self.max_sessions_per_uid.to_string());
        note("stall-timeout", format!("{:?}", old.stall_timeout), format!("{:?}", self.stall_timeout));
        if old.access_rules != self.access_rules {
            let patterns: Vec<&str> = self.access_rules.iter().map(|r| r.pattern.as_str()).collect();
            changes.push(format!(
                "access rules {} -> {} (patterns {patterns:?})",
                old.access_rules.len(),
                self.access_rules.len()
            ));
        }
        changes
    }
}

/// The settings in force, with what is derived from them.
#[derive(Debug)]
pub(crate) struct Current {
    pub(crate) settings: Settings,
    /// The memory budget, resolved.
    pub(crate) budget: u64,
    pub(crate) allow: AllowList,
    pub(crate) policy: Policy,
}

impl Current {
    fn new(settings: Settings, daemon_uid: u32) -> Current {
        Current {
            budget: settings.budget(),
            allow: settings.allow(),
            policy: Policy::new(settings.access_rules.clone(), daemon_uid),
            settings,
        }
    }
}

/// The settings in force and the next ones, shared by the acceptor (which
/// reads them at each handshake and resolve, and switches between turns),
/// the reload handles, and the services that report them.
#[derive(Debug)]
pub(crate) struct LiveSettings {
    current: RwLock<Arc<Current>>,
    next: Mutex<Option<Current>>,
    reloads: AtomicU64,
    daemon_uid: u32,
    /// Whether the server serves TCP, which no allow list may be combined
    /// with.
    serves_tcp: bool,
}

impl LiveSettings {
    /// `settings`, already checked.
    pub(crate) fn new(settings: Settings, daemon_uid: u32, serves_tcp: bool) -> LiveSettings {
        LiveSettings {
            current: RwLock::new(Arc::new(Current::new(settings, daemon_uid))),
            next: Mutex::new(None),
            reloads: AtomicU64::new(0),
            daemon_uid,
            serves_tcp,
        }
    }

    /// The settings in force.
    pub(crate) fn current(&self) -> Arc<Current> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many settings have been switched to since the start.
    pub(crate) fn reloads(&self) -> u64 {
        // Relaxed: a figure for the status.
        self.reloads.load(Ordering::Relaxed)
    }

    /// Checks `settings` and makes them the next (replacing any next ones
    /// not yet taken up).
    fn stage(&self, settings: Settings) -> Result<(), ServerError> {
        settings.check()?;
        if self.serves_tcp && !(settings.allow_uids.is_empty() && settings.allow_gids.is_empty()) {
            return Err(ServerError::Config(
                "the server serves TCP, which carries no peer credentials, so it cannot have an allow list".into(),
            ));
        }
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(Current::new(settings, self.daemon_uid));
        Ok(())
    }

    /// On the acceptor's thread, between turns: switches to the next
    /// settings, if any, and gives the limits, the stall timeout and the
    /// reported cap on pending handshakes their new values. Returns what
    /// changed, if it switched.
    pub(crate) fn switch(&self, shared: &Shared) -> Option<Vec<String>> {
        let next = self.next.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let old = self.current();
        let changes = next.settings.changes_from(&old.settings);
        shared.limits.set(next.budget, next.settings.max_sessions_per_uid);
        shared.engine.stall_timeout.set(next.settings.stall_timeout);
        shared.engine.stats.set_max_pending(next.settings.max_pending_handshakes);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        // Relaxed: a figure for the status.
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Some(changes)
    }
}

/// Changes a running server's [`Settings`] from any thread: a service
/// manager's reload (`SIGHUP` in the `ipcd` binary), an embedder's own
/// configuration.
#[derive(Clone)]
pub struct ReloadHandle {
    live: Arc<LiveSettings>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadHandle").finish_non_exhaustive()
    }
}

impl ReloadHandle {
    pub(crate) fn new(live: Arc<LiveSettings>, waker: Arc<Waker>) -> ReloadHandle {
        ReloadHandle { live, waker }
    }

    /// The settings in force (or, after an [`apply`](Self::apply) the
    /// server has not taken up yet, still the ones before it).
    pub fn settings(&self) -> Settings {
        self.live.current().settings.clone()
    }

    /// Checks `settings` in full ([`Settings::check`], and no allow list
    /// on a server that serves TCP) and, if every value passes, has the
    /// server switch to all of them at once at its acceptor's next turn,
    /// which logs what changed; otherwise nothing changes and the error
    /// says why. See the [`Settings`] docs for what a switch does to what
    /// is already open.
    pub fn apply(&self, settings: Settings) -> Result<(), ServerError> {
        self.live.stage(settings)?;
        // A failed wake-up only delays the switch to the acceptor's next
        // event.
        let _ = self.waker.wake();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Allowed;

    #[test]
    fn every_value_is_checked() {
        assert!(Settings::default().check().is_ok());
        type Change = fn(&mut Settings);
        let cases: [(Change, &str); 7] = [
            (|s| s.max_clients = 0, "max clients"),
            (|s| s.handshake_timeout = Duration::ZERO, "handshake timeout"),
            (|s| s.stall_timeout = Duration::ZERO, "stall timeout"),
            (|s| s.max_pending_handshakes = 0, "pending handshakes"),
            (|s| s.max_sessions_per_uid = 0, "per uid"),
            (|s| s.max_shm = Some(4096), "smallest session"),
            (|s| s.access_rules.push(AccessRule { pattern: "a..b".into(), provide: None, call: None }), "a..b"),
        ];
        for (change, named) in cases {
            let mut settings = Settings::default();
            change(&mut settings);
            match settings.check() {
                Err(ServerError::Config(message)) => assert!(message.contains(named), "{named}: {message}"),
                other => panic!("{named}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_changes_are_named_with_both_values() {
        let old = Settings::default();
        assert!(old.changes_from(&old).is_empty());
        let new = Settings {
            allow_uids: vec![0],
            max_clients: 7,
            stall_timeout: Duration::from_millis(300),
            access_rules: vec![AccessRule {
                pattern: "a.*".into(),
                provide: None,
                call: Some(Allowed { uids: vec![0], gids: vec![] }),
            }],
            ..old.clone()
        };
        let changes = new.changes_from(&old);
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert!(changes.contains(&"allow-uid [] -> [0]".to_string()), "{changes:?}");
        assert!(changes.contains(&"max-clients 4096 -> 7".to_string()), "{changes:?}");
        assert!(changes.contains(&"stall-timeout 10s -> 300ms".to_string()), "{changes:?}");
        assert!(changes.iter().any(|c| c.starts_with("access rules 0 -> 1") && c.contains("a.*")), "{changes:?}");
    }

    #[test]
    fn a_staged_allow_list_is_refused_beside_tcp_and_nothing_is_staged() {
        let live = LiveSettings::new(Settings::default(), 0, true);
        let settings = Settings { allow_uids: vec![1], ..Settings::default() };
        assert!(matches!(live.stage(settings), Err(ServerError::Config(m)) if m.contains("TCP")));
        assert!(live.next.lock().unwrap().is_none());
        let bad = Settings { max_clients: 0, ..Settings::default() };
        assert!(live.stage(bad).is_err());
        assert!(live.next.lock().unwrap().is_none(), "a refused setting stages nothing");
    }
}
