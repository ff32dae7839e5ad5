//! The broker: providers register names on the daemon, clients resolve
//! them, and the daemon introduces the two and steps off the data path.
//!
//! It runs on the acceptor's thread, over connections the acceptor hands
//! it once their hello said [`Role::Broker`] (a client resolving names) or
//! [`Role::Provider`]. For each resolve it:
//!
//! 1. checks the name, the client's cool-down, the access rules
//!    ([`crate::policy`]) and the limits (the client's uid is charged the
//!    segment, as for the daemon's own sessions);
//! 2. picks the holder (the one holder of an exclusive name, or the pooled
//!    holder with the fewest sessions);
//! 3. creates the segment (sealed, header written), the client-to-provider
//!    eventfd, a liveness socket pair (one end each: a side whose process
//!    ends hangs up on the other) and, with a pollable doorbell, the
//!    provider-to-client doorbell pair;
//! 4. sends the provider `Incoming` with the client's credentials and its
//!    fds, and waits, at most the handshake timeout, for `Accept`;
//! 5. sends the client `Brokered` with its fds, and closes every fd it
//!    made.
//!
//! **The daemon keeps no fd of a brokered session after the hand-off**, and
//! never sees its calls: a daemon that dies or restarts leaves established
//! sessions alone. It keeps only a record (who the client is, for strikes
//! the provider reports, and the charge against the limits), dropped when
//! the provider reports the session closed or goes away.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::control::{
    check_name, Brokered, DaemonMessage, Incoming, ProviderMessage, Register, RegisterError, Resolution, Resolve,
    ResolveError,
};
use ipc_core::{Credentials, SegmentLayout, ServiceEntry};
use mio::{Interest, Registry as Poller, Token};
use slab::Slab;

use crate::control_conn::{ControlConn, Fds};
use crate::introspect::{ProviderInfo, Transport};
use crate::limits::{self, Lease};
use crate::registry::{ProviderId, Registry};
use crate::roster::Entry;
use crate::segment::NewSegment;
use crate::shared::Shared;
use crate::stats::{BrokerView, ProvidedName};

/// Where the broker's tokens start in the acceptor's poll.
pub(crate) const FIRST_TOKEN: usize = 1 << 40;

/// A client's connection for resolving names.
struct Caller {
    conn: ControlConn,
    creds: Credentials,
    /// A resolve is under way (its provider's answer, or a registration it
    /// waits for): the next message is read only after it.
    busy: bool,
    /// A resolve held back by the client's cool-down, until this instant.
    held: Option<(Resolve, Instant)>,
}

/// A provider's connection.
struct ProviderConn {
    conn: ControlConn,
    creds: Credentials,
    id: ProviderId,
    registered: Option<Registration>,
    /// Sessions it serves: those it reported serving for an earlier daemon,
    /// those being handed over, and those it accepted here.
    sessions: u32,
    /// Of those, the ones an earlier daemon brokered, still open.
    earlier: u32,
}

struct Registration {
    services: Vec<ServiceEntry>,
    max_ring_capacity: u32,
}

enum Conn {
    Caller(Caller),
    Provider(ProviderConn),
}

/// A session offered to a provider and not yet accepted.
struct Handoff {
    caller: usize,
    provider: ProviderId,
    /// The client's fds, sent once the provider accepts.
    caller_fds: Vec<OwnedFd>,
    answer: Brokered,
    lease: Lease,
    /// The name resolved, for the roster.
    name: String,
}

/// A session handed over: what the daemon remembers of it.
struct Live {
    provider: ProviderId,
    caller: Credentials,
    _lease: Lease,
}

/// A resolve waiting for a provider of its name to register.
struct Waiting {
    caller: usize,
    resolve: Resolve,
    until: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Handoff(u64),
    Held(usize),
    Waiting(usize),
}

/// Counts of what the broker did, for `stats`.
#[derive(Debug, Default)]
pub(crate) struct BrokerCounts {
    pub(crate) brokered: u64,
    pub(crate) unknown_service: u64,
    pub(crate) not_permitted: u64,
    pub(crate) unavailable: u64,
    pub(crate) limit_reached: u64,
    pub(crate) bad_name: u64,
    pub(crate) registrations: u64,
    pub(crate) registrations_refused: u64,
    pub(crate) strikes_reported: u64,
}

/// See the module docs.
pub(crate) struct Broker {
    shared: Arc<Shared>,
    registry: Registry,
    conns: Slab<Conn>,
    /// Provider ids to their connection's key.
    providers: HashMap<ProviderId, usize>,
    next_provider: ProviderId,
    handoffs: HashMap<u64, Handoff>,
    live: HashMap<u64, Live>,
    waiting: Vec<Waiting>,
    timers: BTreeSet<(Instant, Timer)>,
    counts: BrokerCounts,
    /// The connection whose messages are being taken: an answer to it needs
    /// no new pass over its input (the pass under way goes on).
    taking: Option<usize>,
}

impl Broker {
    pub(crate) fn new(shared: Arc<Shared>) -> Broker {
        Broker {
            shared,
            registry: Registry::default(),
            conns: Slab::new(),
            providers: HashMap::new(),
            next_provider: 1,
            handoffs: HashMap::new(),
            live: HashMap::new(),
            waiting: Vec::new(),
            timers: BTreeSet::new(),
            counts: BrokerCounts::default(),
            taking: None,
        }
    }

    /// Takes a connection whose hello asked for `Role::Broker` (a client),
    /// or `Role::Provider`, already answered `Accepted`.
    pub(crate) fn adopt(
        &mut self,
        poller: &Poller,
        stream: mio::net::UnixStream,
        creds: Credentials,
        provider: bool,
    ) -> Option<u64> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = ControlConn::new(stream, Fds::Refuse);
        if let Err(e) =
            poller.register(&mut conn.stream, Token(FIRST_TOKEN + key), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::error!("cannot register a broker connection: {e}");
            return None;
        }
        if provider {
            let id = self.next_provider;
            self.next_provider += 1;
            self.providers.insert(id, key);
            entry.insert(Conn::Provider(ProviderConn { conn, creds, id, registered: None, sessions: 0, earlier: 0 }));
            tracing::debug!(provider = id, peer = %creds, "provider connected");
            Some(id)
        } else {
            entry.insert(Conn::Caller(Caller { conn, creds, busy: false, held: None }));
            tracing::debug!(peer = %creds, "broker connection");
            Some(key as u64)
        }
    }

    /// Something happened on connection `key`: read and act on what came.
    /// Reading stops at the connection's input and fd limits: what it took
    /// is acted on, then reading goes on, until the socket is empty or the
    /// connection takes no more for now (a caller whose resolve is being
    /// answered: [`Broker::ready`] is called again when it is).
    pub(crate) fn ready(&mut self, poller: &Poller, key: usize) {
        loop {
            let result = match self.conns.get_mut(key) {
                Some(Conn::Caller(c)) => c.conn.flush().and_then(|()| c.conn.receive()),
                Some(Conn::Provider(p)) => p.conn.flush().and_then(|()| p.conn.receive()),
                None => return,
            };
            let more = match result {
                Ok(more) => more,
                Err(reason) => return self.violation(poller, key, &reason),
            };
            let before = self.buffered(key);
            self.take_messages(poller, key);
            if !more || self.buffered(key).is_none_or(|after| Some(after) == before) {
                return;
            }
        }
    }

    /// Bytes connection `key` read and has not acted on (`None`: it is gone).
    fn buffered(&self, key: usize) -> Option<usize> {
        match self.conns.get(key)? {
            Conn::Caller(c) => Some(c.conn.buffered()),
            Conn::Provider(p) => Some(p.conn.buffered()),
        }
    }

    /// Acts on the whole messages connection `key` holds, then closes it if
    /// its peer closed.
    fn take_messages(&mut self, poller: &Poller, key: usize) {
        let outer = self.taking.replace(key);
        self.take_messages_of(poller, key);
        self.taking = outer;
    }

    fn take_messages_of(&mut self, poller: &Poller, key: usize) {
        loop {
            let message = match self.conns.get_mut(key) {
                Some(Conn::Caller(c)) if c.busy || c.held.is_some() => break,
                Some(Conn::Caller(c)) => c.conn.next::<Resolve>().map(|m| m.map(Message::Resolve)),
                Some(Conn::Provider(p)) => p.conn.next::<ProviderMessage>().map(|m| m.map(Message::Provider)),
                None => return,
            };
            match message {
                Ok(Some(Message::Resolve(resolve))) => self.resolve(poller, key, resolve),
                Ok(Some(Message::Provider(message))) => self.provider_message(poller, key, message),
                Ok(None) => break,
                Err(reason) => return self.violation(poller, key, &format!("bad message: {reason}")),
            }
        }
        let closed = match self.conns.get(key) {
            Some(Conn::Caller(c)) => c.conn.closed && !(c.busy || c.held.is_some()),
            Some(Conn::Provider(p)) => p.conn.closed,
            None => false,
        };
        if closed {
            self.close(poller, key, "hung up");
        }
    }

    /// The peer of `key` broke the protocol: it is cut off (a client's
    /// process also gets a strike, as for the daemon's own sessions).
    fn violation(&mut self, poller: &Poller, key: usize, reason: &str) {
        if let Some(conn) = self.conns.get(key) {
            let creds = match conn {
                Conn::Caller(c) => c.creds,
                Conn::Provider(p) => p.creds,
            };
            tracing::warn!(peer = %creds, "broker connection broke the protocol: {reason}; disconnecting");
            self.shared.cooldown.strike(&creds, Instant::now());
            self.shared.engine.stats.struck();
        }
        self.close(poller, key, reason);
    }

    /// Ends connection `key`: a provider's names are freed at once, what it
    /// was being handed fails, and its sessions are forgotten; a client's
    /// pending resolves are dropped.
    fn close(&mut self, poller: &Poller, key: usize, why: &str) {
        let Some(mut conn) = self.conns.try_remove(key) else { return };
        match &mut conn {
            Conn::Caller(c) => {
                let _ = poller.deregister(&mut c.conn.stream);
                // Dropping a hand-off closes the client's liveness end: a
                // provider that took the session sees it hang up.
                self.handoffs.retain(|_, h| h.caller != key);
                self.waiting.retain(|w| w.caller != key);
            }
            Conn::Provider(p) => {
                let _ = poller.deregister(&mut p.conn.stream);
                self.providers.remove(&p.id);
                self.registry.unregister(p.id);
                let id = p.id;
                tracing::info!(provider = id, peer = %p.creds, "provider gone ({why}); its names are free");
                let failed: Vec<u64> =
                    self.handoffs.iter().filter(|(_, h)| h.provider == id).map(|(&s, _)| s).collect();
                for session in failed {
                    if let Some(h) = self.handoffs.remove(&session) {
                        let reason = format!("the provider went away before taking the session ({why})");
                        self.fail(poller, h.caller, ResolveError::Unavailable { reason });
                    }
                }
                let roster = &self.shared.roster;
                self.live.retain(|&session, l| {
                    let keep = l.provider != id;
                    if !keep {
                        roster.remove(session);
                    }
                    keep
                });
                self.publish();
            }
        }
    }

    /// Answers the resolve under way on connection `caller` with `error`,
    /// and reads on.
    fn fail(&mut self, poller: &Poller, caller: usize, error: ResolveError) {
        let counter = match &error {
            ResolveError::UnknownService { .. } => &mut self.counts.unknown_service,
            ResolveError::NotPermitted { .. } => &mut self.counts.not_permitted,
            ResolveError::Unavailable { .. } | ResolveError::ShuttingDown => &mut self.counts.unavailable,
            ResolveError::LimitReached { .. } => &mut self.counts.limit_reached,
            ResolveError::BadName { .. } => &mut self.counts.bad_name,
        };
        *counter += 1;
        tracing::debug!("resolve failed: {error}");
        // Counted before the answer, so a client that sees it sees the count.
        self.publish();
        self.answer(poller, caller, &Resolution::Failed(error), &[]);
    }

    /// Sends the answer to the resolve under way on `caller`, and reads
    /// on.
    fn answer(&mut self, poller: &Poller, caller: usize, answer: &Resolution, fds: &[OwnedFd]) {
        let Some(Conn::Caller(c)) = self.conns.get_mut(caller) else { return };
        c.busy = false;
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if let Err(reason) = c.conn.send(answer, &fds) {
            tracing::info!(peer = %c.creds, "cannot answer a resolve: {reason}; disconnecting");
            return self.close(poller, caller, &reason);
        }
        if self.taking != Some(caller) {
            self.ready(poller, caller);
        }
    }

    fn resolve(&mut self, poller: &Poller, key: usize, resolve: Resolve) {
        let Some(Conn::Caller(c)) = self.conns.get_mut(key) else { return };
        let caller = c.creds;
        c.busy = true;
        if let Some(until) = self.shared.cooldown.wait_until(&caller, Instant::now()) {
            // Held, as the daemon holds the handshakes of processes that
            // broke the protocol: answered once the cool-down is over.
            c.held = Some((resolve, until));
            c.busy = false;
            self.shared.engine.stats.held();
            self.timers.insert((until, Timer::Held(key)));
            return;
        }
        let name = resolve.name.clone();
        if let Err(reason) = check_name(&name) {
            return self.fail(poller, key, ResolveError::BadName { name, reason });
        }
        if self.shared.engine.shutting_down.load(Ordering::Acquire) {
            return self.fail(poller, key, ResolveError::ShuttingDown);
        }
        if let Err(reason) = self.shared.settings.current().policy.may_call(&name, &caller) {
            tracing::warn!(peer = %caller, "resolve refused: {reason}");
            return self.fail(poller, key, ResolveError::NotPermitted { reason });
        }
        let holder = self
            .registry
            .holders(&name)
            .iter()
            .filter_map(|id| {
                let key = *self.providers.get(id)?;
                match self.conns.get(key)? {
                    Conn::Provider(p) if p.registered.is_some() => Some((p.sessions, *id)),
                    _ => None,
                }
            })
            .min();
        let Some((_, provider)) = holder else {
            if resolve.wait_ms > 0 {
                let until = Instant::now() + Duration::from_millis(u64::from(resolve.wait_ms));
                self.timers.insert((until, Timer::Waiting(key)));
                self.waiting.push(Waiting { caller: key, resolve, until });
                self.publish();
                return;
            }
            return self.fail(poller, key, ResolveError::UnknownService { name });
        };
        if let Err(error) = self.hand_over(poller, key, caller, provider, &resolve) {
            self.fail(poller, key, error);
        }
    }

    /// Makes the session of `resolve` and offers it to `provider`.
    fn hand_over(
        &mut self,
        poller: &Poller,
        caller_key: usize,
        caller: Credentials,
        provider: ProviderId,
        resolve: &Resolve,
    ) -> Result<(), ResolveError> {
        let pkey = self.providers[&provider];
        let Some(Conn::Provider(p)) = self.conns.get(pkey) else {
            return Err(ResolveError::Unavailable { reason: "the provider went away".into() });
        };
        let registration = p.registered.as_ref().expect("only registered providers hold names");
        let provider_creds = p.creds;
        // The session offers every service of that provider the client may
        // call; the provider refuses calls to any other.
        let settings = self.shared.settings.current();
        let granted: Vec<ServiceEntry> = registration
            .services
            .iter()
            .filter(|s| settings.policy.may_call(&s.name, &caller).is_ok())
            .cloned()
            .collect();
        let max = settings.settings.max_ring_capacity.min(registration.max_ring_capacity);
        let capacity = SegmentLayout::fit_capacity(resolve.ring_capacity, max);
        let layout = SegmentLayout::new(capacity).map_err(|e| ResolveError::Unavailable { reason: e.to_string() })?;
        let lease = self
            .shared
            .limits
            .lease(Some(caller.uid), limits::shm_charge(&layout))
            .map_err(|refusal| ResolveError::LimitReached { reason: refusal.to_reject().to_string() })?;
        let made = NewSegment::create(capacity, resolve.doorbell).map_err(|e| {
            tracing::error!("cannot create a brokered session: {e}");
            ResolveError::Unavailable { reason: format!("the daemon cannot create the session: {e}") }
        })?;
        let (provider_liveness, caller_liveness) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| ResolveError::Unavailable { reason: format!("the daemon cannot create the session: {e}") })?;
        let session_id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let incoming = Incoming {
            session_id,
            caller,
            ring_capacity: capacity,
            max_payload: layout.max_payload(),
            doorbell: resolve.doorbell,
            granted: granted.iter().map(|s| s.id).collect(),
        };
        let NewSegment { memfd, region, bell, wake, .. } = made;
        // The header is written; the daemon keeps no mapping of a brokered
        // segment.
        drop(region);
        let caller_memfd = memfd.try_clone().map_err(|e| ResolveError::Unavailable { reason: e.to_string() })?;
        let caller_bell =
            bell.as_fd().try_clone_to_owned().map_err(|e| ResolveError::Unavailable { reason: e.to_string() })?;
        let mut provider_fds: Vec<OwnedFd> = vec![memfd, bell.into(), provider_liveness.into()];
        let mut caller_fds: Vec<OwnedFd> = vec![caller_memfd, caller_bell, caller_liveness.into()];
        if let Some((server_end, client_end)) = wake {
            provider_fds.push(server_end.into());
            caller_fds.push(client_end.into());
        }
        let Some(Conn::Provider(p)) = self.conns.get_mut(pkey) else { unreachable!("looked up above") };
        let borrowed: Vec<_> = provider_fds.iter().map(|f| f.as_fd()).collect();
        if let Err(reason) = p.conn.send(&DaemonMessage::Incoming(incoming), &borrowed) {
            drop(provider_fds);
            self.close(poller, pkey, &reason);
            return Err(ResolveError::Unavailable {
                reason: format!("the provider does not read its connection: {reason}"),
            });
        }
        // The provider has its fds now; the daemon's copies close here.
        drop(provider_fds);
        p.sessions += 1;
        let answer = Brokered {
            session_id,
            provider: provider_creds,
            ring_capacity: capacity,
            max_payload: layout.max_payload(),
            doorbell: resolve.doorbell,
            services: granted,
        };
        let deadline = Instant::now() + settings.settings.handshake_timeout;
        self.timers.insert((deadline, Timer::Handoff(session_id)));
        let name = resolve.name.clone();
        self.handoffs.insert(session_id, Handoff { caller: caller_key, provider, caller_fds, answer, lease, name });
        tracing::debug!(session = session_id, provider, peer = %caller, name = resolve.name, "session offered");
        self.publish();
        Ok(())
    }

    fn provider_message(&mut self, poller: &Poller, key: usize, message: ProviderMessage) {
        let Some(Conn::Provider(p)) = self.conns.get_mut(key) else { return };
        let id = p.id;
        match message {
            ProviderMessage::Register(register) => self.register(poller, key, register),
            _ if p.registered.is_none() => self.violation(poller, key, "a message before the registration"),
            ProviderMessage::Accept { session_id } => {
                let Some(h) = self.handoffs.remove(&session_id) else {
                    // Too late (timed out, or its client left): the client's
                    // liveness end is closed, so the provider sees it.
                    return tracing::debug!(session = session_id, "late or unknown accept");
                };
                if h.provider != id {
                    self.handoffs.insert(session_id, h);
                    return self.violation(poller, key, &format!("accepted session {session_id}, offered to another"));
                }
                let caller = match self.conns.get(h.caller) {
                    Some(Conn::Caller(c)) => c.creds,
                    _ => return,
                };
                self.counts.brokered += 1;
                let provider = match self.conns.get(key) {
                    Some(Conn::Provider(p)) => {
                        Some(ProviderInfo { id, pid: p.creds.pid, uid: p.creds.uid, sessions: p.sessions })
                    }
                    _ => None,
                };
                self.shared.roster.insert(
                    session_id,
                    Entry {
                        transport: Transport::Brokered,
                        caller: Some(caller.into()),
                        address: None,
                        ring_size: Some(h.answer.ring_capacity),
                        max_payload: h.answer.max_payload,
                        opened: Instant::now(),
                        worker: None,
                        calls: None,
                        service: Some(h.name),
                        provider,
                    },
                );
                self.live.insert(session_id, Live { provider: id, caller, _lease: h.lease });
                tracing::debug!(session = session_id, provider = id, peer = %caller, "session handed over");
                // Counted before the answer, so a client that sees it sees
                // the count.
                self.publish();
                self.answer(poller, h.caller, &Resolution::Brokered(h.answer), &h.caller_fds);
                // `h.caller_fds` drop here: the daemon holds nothing of the
                // session any more.
            }
            ProviderMessage::Decline { session_id, reason } => {
                if let Some(h) = self.handoffs.remove(&session_id).filter(|h| h.provider == id) {
                    p.sessions = p.sessions.saturating_sub(1);
                    self.fail(poller, h.caller, ResolveError::Unavailable { reason: format!("declined: {reason}") });
                }
            }
            ProviderMessage::Closed { session_id } => {
                if self.live.get(&session_id).is_some_and(|l| l.provider == id) {
                    self.live.remove(&session_id);
                    self.shared.roster.remove(session_id);
                    p.sessions = p.sessions.saturating_sub(1);
                    self.publish();
                }
            }
            ProviderMessage::EarlierClosed => {
                if p.earlier > 0 {
                    p.earlier -= 1;
                    p.sessions = p.sessions.saturating_sub(1);
                    self.publish();
                }
            }
            ProviderMessage::Strike { session_id, reason } => {
                if let Some(l) = self.live.get(&session_id).filter(|l| l.provider == id) {
                    tracing::warn!(session = session_id, peer = %l.caller, provider = id, "the provider dropped a client that broke the protocol: {reason}");
                    self.shared.cooldown.strike(&l.caller, Instant::now());
                    self.shared.engine.stats.struck();
                    self.counts.strikes_reported += 1;
                }
            }
        }
    }

    fn register(&mut self, poller: &Poller, key: usize, register: Register) {
        let refusal = self.check_registration(key, &register);
        let Some(Conn::Provider(p)) = self.conns.get_mut(key) else { return };
        let id = p.id;
        let result = refusal.and_then(|()| {
            let names: Vec<String> = register.services.iter().map(|s| s.name.clone()).collect();
            let conns = &self.conns;
            let providers = &self.providers;
            let creds_of = |pid: ProviderId| match providers.get(&pid).and_then(|k| conns.get(*k)) {
                Some(Conn::Provider(p)) => p.creds,
                _ => Credentials { pid: 0, uid: 0, gid: 0 },
            };
            self.registry.register(id, &names, register.pooled, creds_of)
        });
        let Some(Conn::Provider(p)) = self.conns.get_mut(key) else { return };
        match result {
            Ok(()) => {
                self.counts.registrations += 1;
                p.sessions = register.sessions;
                p.earlier = register.sessions;
                let names: Vec<&str> = register.services.iter().map(|s| s.name.as_str()).collect();
                tracing::info!(provider = id, peer = %p.creds, pooled = register.pooled, ?names, "provider registered");
                p.registered =
                    Some(Registration { services: register.services, max_ring_capacity: register.max_ring_capacity });
                if let Err(reason) = p.conn.send(&DaemonMessage::Registered { provider_id: id }, &[]) {
                    return self.close(poller, key, &reason);
                }
                self.publish();
                self.retry_waiting(poller);
            }
            Err(error) => {
                self.counts.registrations_refused += 1;
                tracing::warn!(peer = %p.creds, "registration refused: {error}");
                let _ = p.conn.send(&DaemonMessage::Refused(error), &[]);
                self.close(poller, key, "registration refused");
            }
        }
    }

    /// Why `register` from connection `key` cannot be accepted, if it
    /// cannot.
    fn check_registration(&self, key: usize, register: &Register) -> Result<(), RegisterError> {
        let Some(Conn::Provider(p)) = self.conns.get(key) else { return Ok(()) };
        let malformed = |reason: String| Err(RegisterError::Malformed { reason });
        if p.registered.is_some() {
            return malformed("a second registration on one connection".into());
        }
        if register.services.is_empty() {
            return malformed("no names".into());
        }
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for s in &register.services {
            if !names.insert(&s.name) || !ids.insert(s.id) {
                return malformed(format!("{:?} (id {}) is given twice", s.name, s.id));
            }
            check_name(&s.name).map_err(|reason| RegisterError::BadName { name: s.name.clone(), reason })?;
            if self.shared.engine.services.id(&s.name).is_some() || s.name == "ipcd" || s.name.starts_with("ipcd.") {
                return Err(RegisterError::Reserved { name: s.name.clone() });
            }
            let settings = self.shared.settings.current();
            settings.policy.may_provide(&s.name, &p.creds).map_err(|reason| RegisterError::NotPermitted { reason })?;
        }
        Ok(())
    }

    /// Resolves that wait for names now registered go on.
    fn retry_waiting(&mut self, poller: &Poller) {
        let (ready, rest): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| !self.registry.holders(&w.resolve.name).is_empty());
        self.waiting = rest;
        for w in ready {
            if let Some(Conn::Caller(c)) = self.conns.get_mut(w.caller) {
                c.busy = false;
                self.resolve(poller, w.caller, w.resolve);
            }
        }
    }

    /// When the next timer falls due, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Acts on the timers due at `now`.
    pub(crate) fn expire(&mut self, poller: &Poller, now: Instant) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Handoff(session) => {
                    if let Some(h) = self.handoffs.remove(&session) {
                        if let Some(Conn::Provider(p)) =
                            self.providers.get(&h.provider).and_then(|k| self.conns.get_mut(*k))
                        {
                            p.sessions = p.sessions.saturating_sub(1);
                        }
                        let after = self.shared.settings.current().settings.handshake_timeout;
                        let reason = format!("the provider did not take the session within {after:?}");
                        self.fail(poller, h.caller, ResolveError::Unavailable { reason });
                    }
                }
                Timer::Held(key) => {
                    let resolve = match self.conns.get_mut(key) {
                        Some(Conn::Caller(c)) => c.held.take().filter(|(_, until)| *until <= now),
                        _ => None,
                    };
                    if let Some((resolve, _)) = resolve {
                        self.resolve(poller, key, resolve);
                    }
                }
                Timer::Waiting(key) => {
                    let Some(i) = self.waiting.iter().position(|w| w.caller == key && w.until <= now) else { continue };
                    let w = self.waiting.swap_remove(i);
                    self.fail(poller, w.caller, ResolveError::UnknownService { name: w.resolve.name });
                }
            }
        }
    }

    /// Ends every connection: clients waiting are told the daemon stops;
    /// providers see the hang-up (their sessions go on without the daemon).
    pub(crate) fn shut_down(&mut self, poller: &Poller) {
        let waiting: Vec<usize> = self.waiting.drain(..).map(|w| w.caller).collect();
        for caller in waiting {
            self.fail(poller, caller, ResolveError::ShuttingDown);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(poller, key, "the daemon is shutting down");
        }
    }

    /// Puts what `stats` and `ipcd.services` report of the broker where
    /// they read it.
    fn publish(&self) {
        let names: Vec<ProvidedName> = self
            .registry
            .entries()
            .into_iter()
            .map(|(name, pooled, ids)| {
                let providers = ids
                    .iter()
                    .filter_map(|id| match self.conns.get(*self.providers.get(id)?)? {
                        Conn::Provider(p) => {
                            Some(ProviderInfo { id: p.id, pid: p.creds.pid, uid: p.creds.uid, sessions: p.sessions })
                        }
                        Conn::Caller(_) => None,
                    })
                    .collect();
                ProvidedName { name: name.to_string(), pooled, providers }
            })
            .collect();
        let c = &self.counts;
        let counts = serde_json::json!({
            "resolves": {
                "brokered": c.brokered,
                "unknown_service": c.unknown_service,
                "not_permitted": c.not_permitted,
                "unavailable": c.unavailable,
                "limit_reached": c.limit_reached,
                "bad_name": c.bad_name,
            },
            "registrations": { "accepted": c.registrations, "refused": c.registrations_refused },
            "strikes_reported": c.strikes_reported,
            "sessions_handed_over": self.live.len(),
            "sessions_offered": self.handoffs.len(),
            "waiting_resolves": self.waiting.len(),
        });
        let serde_json::Value::Object(counts) = counts else { unreachable!("an object literal") };
        self.shared.engine.stats.set_broker(BrokerView { names, counts });
    }
}

enum Message {
    Resolve(Resolve),
    Provider(ProviderMessage),
}
