//! The acceptor: takes connections, runs the handshake, hands sessions to
//! workers.
//!
//! Every connection starts as a pending handshake with a deadline. Its bytes
//! are read without blocking into a bounded buffer; a complete hello is
//! answered with a welcome (and the session's fds) or an explicit reject. A
//! connection that sends garbage is rejected, one that stays silent past the
//! deadline is closed, and neither affects anyone else. A hello never
//! carries fds: any a peer attaches are discarded by the kernel without
//! entering the daemon (the read has no room for them), and the hello is
//! rejected.
//!
//! The deadlines sit in a timer (see [`crate::pending`]), so a loop costs
//! O(log n) per deadline it handles, not a scan of every pending handshake.
//! At most `--max-pending-handshakes` are pending at once, shared between
//! owners (a uid; TCP peers as one): a connection that comes while the cap
//! is reached takes the place of the oldest pending handshake of the owner
//! with the most, if that owner has at least two more than the newcomer's;
//! otherwise the newcomer is closed at once (after a best-effort
//! `TooManyPendingHandshakes` reject). So a flood by one user fills only
//! what no one else asks for, and cannot keep other users' connections out.
//!
//! On the Unix listeners the peer's credentials are read at accept and
//! checked against the allow lists (see [`crate::access`]); a peer that is
//! not allowed is answered, at its first bytes, with `NotPermitted`.
//!
//! A hello that is admitted first takes a lease on the limits (see
//! [`crate::limits`]): a slot of its uid and its worst-case memory. Only
//! then are its segment or buffers created; a client past a limit is
//! answered with a reject naming it.
//!
//! The same handshake runs on the stream listeners (`--uds`, `--tcp`); there
//! the welcome carries no fds and the connection itself then carries the
//! frames.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{
    Consumer, HandshakeError, Hello, Producer, Reject, Role, SegmentLayout, ServerMessage, SharedWords,
    PROTOCOL_VERSION,
};
use ipc_platform::EventFd;
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::broker::{self, Broker};
use crate::health::Health;
use crate::limits::{self, Lease, Refusal};
use crate::opener::{Admitted, Openers};
use crate::pending::{Owner, PendingSet};
use crate::segment::NewSegment;
use crate::segment_pool::{Pooled, SegmentPool};
use crate::server::ServerError;
use crate::session::ClientWake;
use crate::shared::Shared;
use crate::stats::{RejectReason, Stats};
use crate::stream_session::{Peer, Stream};
use crate::worker::{self, WorkerHandle};

const LISTENER: Token = Token(0);
/// The acceptor's waker: [`crate::ShutdownHandle`] rings it.
pub(crate) const WAKER: Token = Token(1);
const UDS_LISTENER: Token = Token(2);
const TCP_LISTENER: Token = Token(3);
const FIRST_PENDING: usize = 4;
/// The longest hello body accepted.
const MAX_HELLO: usize = 1024;
/// How long to stop accepting after running out of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a hello refused by its uid's session limit is held, looked at
/// again each time a session of any uid gives its slot back, before the
/// refusal is sent. A client that closes a session and connects again at
/// once is otherwise refused whenever its worker has not yet seen the
/// close (a worker notices a hang-up at its next turn, which on a busy
/// machine can come after the next connect's hello).
const UID_GRACE: Duration = Duration::from_millis(200);

/// The daemon's parts of a new shared-memory session.
pub(crate) type SessionParts = (EventFd, ClientWake, Consumer, Producer, SharedWords);

/// Which listener a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The control socket: the session gets shared-memory rings.
    Shm,
    /// A stream listener: frames travel on the connection itself.
    Stream,
}

/// A connection whose handshake is under way.
pub(crate) struct Pending {
    pub(crate) stream: Stream,
    pub(crate) kind: Kind,
    pub(crate) peer: Peer,
    /// Why the peer's credentials are refused, if they are: sent as the
    /// answer to its first bytes.
    refusal: Option<String>,
    buf: Vec<u8>,
    /// A complete hello held back by the peer's cool-down, or while its
    /// uid is at its session limit with sessions closing (see
    /// [`UID_GRACE`]). When the handshake's deadline passes, the hello is
    /// admitted if there is one; otherwise the handshake timed out.
    held: Option<Hello>,
    /// Until when a hello refused by its uid's session limit is held for
    /// another look, once it was first refused.
    uid_grace: Option<Instant>,
}

impl Pending {
    /// Sends `reject` (best effort: the socket is fresh, so a few bytes
    /// always fit) and closes the connection, counting `reason`.
    pub(crate) fn refuse(mut self, stats: &Stats, reject: Reject, reason: RejectReason) {
        if matches!(reason, RejectReason::NotPermitted | RejectReason::OverMemoryBudget | RejectReason::UidSessionLimit)
        {
            tracing::warn!(peer = %self.peer, "handshake rejected: {reject}");
        } else {
            tracing::info!(peer = %self.peer, "handshake rejected: {reject}");
        }
        // Count before answering, so a client that sees the reject also
        // sees the count.
        stats.rejected(reason);
        if let Ok(bytes) = handshake::encode(&ServerMessage::Reject(reject)) {
            let _ = self.stream.write(&bytes);
        }
    }
}

/// The sockets a server listens on, bound by its builder or given to it.
pub(crate) struct Listeners {
    /// The control socket.
    pub(crate) bound: UnixSocket,
    /// The `--uds` stream socket.
    pub(crate) uds: Option<UnixSocket>,
    /// The `--tcp` listener.
    pub(crate) tcp: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Which of them the server was given rather than bound, for the log.
    pub(crate) fn given(&self) -> Vec<&'static str> {
        let given = |s: Option<&UnixSocket>| matches!(s, Some(UnixSocket::Given(_)));
        [("control", given(Some(&self.bound))), ("uds", given(self.uds.as_ref()))]
            .into_iter()
            .filter_map(|(name, given)| given.then_some(name))
            .collect()
    }
}

/// A Unix listener, and whose its socket file is.
pub(crate) enum UnixSocket {
    /// Bound by the server, which holds the path's lock: the file is the
    /// server's, removed when it stops.
    Bound(ipc_platform::BoundSocket),
    /// Given to the server already listening (by a service manager, or the
    /// embedder): the file is its maker's, and stays when the server stops.
    Given(OwnedFd),
}

impl UnixSocket {
    fn listener(&self) -> &OwnedFd {
        match self {
            UnixSocket::Bound(bound) => &bound.listener,
            UnixSocket::Given(fd) => fd,
        }
    }

    /// Removes the socket file at `path` if the server bound it.
    fn remove(&self, path: &Path) -> io::Result<()> {
        match self {
            UnixSocket::Bound(bound) => ipc_platform::remove_control_socket(path, bound),
            UnixSocket::Given(_) => Ok(()),
        }
    }
}

pub(crate) struct Acceptor {
    shared: Arc<Shared>,
    bound: UnixSocket,
    listener: Option<UnixListener>,
    uds_bound: Option<UnixSocket>,
    uds_listener: Option<UnixListener>,
    tcp_listener: Option<TcpListener>,
    poll: Poll,
    waker: Arc<Waker>,
    workers: Vec<WorkerHandle>,
    pending: PendingSet<Pending>,
    accept_paused_until: Option<Instant>,
    /// Broker and provider connections, once their hello is answered.
    broker: Broker,
    /// Ready segments, taken at connect.
    pool: SegmentPool,
    /// The threads that open admitted sessions.
    openers: Openers,
    /// Pending handshakes held by their uid's session limit (keys; stale
    /// ones are skipped).
    uid_held: Vec<usize>,
}

impl Acceptor {
    /// Takes the bound listeners and the poll (with its waker registered
    /// as [`WAKER`]) and starts the workers.
    pub(crate) fn new(
        shared: Arc<Shared>,
        listeners: Listeners,
        poll: Poll,
        waker: Arc<Waker>,
    ) -> Result<Acceptor, ServerError> {
        let Listeners { bound, uds, tcp } = listeners;
        let listener_fd = bound.listener().try_clone()?;
        let mut listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(listener_fd));
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let uds_listener = match &uds {
            Some(b) => {
                let fd = b.listener().try_clone()?;
                let mut l = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd));
                poll.registry().register(&mut l, UDS_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let tcp_listener = match tcp {
            Some(l) => {
                let mut l = TcpListener::from_std(l);
                poll.registry().register(&mut l, TCP_LISTENER, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        let workers = worker::spawn_all(&shared.engine)?;
        let broker = Broker::new(Arc::clone(&shared));
        let pool_capacity = SegmentLayout::fit_capacity(
            ipc_core::DEFAULT_RING_CAPACITY,
            shared.settings.current().settings.max_ring_capacity,
        );
        let pool = SegmentPool::start(pool_capacity, shared.config.segment_pool, Arc::clone(&shared.limits))?;
        let _ = shared.engine.retirer.set(pool.retirer());
        let links = workers.iter().map(WorkerHandle::link).collect();
        let openers = Openers::start(shared.config.openers, &shared, links)?;
        shared.limits.set_slot_waker(Arc::clone(&waker));
        Ok(Acceptor {
            shared,
            bound,
            listener: Some(listener),
            uds_bound: uds,
            uds_listener,
            tcp_listener,
            poll,
            waker,
            workers,
            pending: PendingSet::default(),
            accept_paused_until: None,
            broker,
            pool,
            openers,
            uid_held: Vec::new(),
        })
    }

    /// Serves until shut down, calling `ready` first (see
    /// [`crate::Server::run_with_ready`]).
    pub(crate) fn run(mut self, ready: impl FnOnce(Health)) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(256);
        let wakers = self.workers.iter().map(WorkerHandle::waker).collect();
        ready(Health::new(Arc::clone(&self.shared.engine), wakers, Arc::clone(&self.waker)));
        while !self.shared.engine.shutting_down.load(Ordering::Acquire) {
            self.shared.engine.stats.acceptor_turns.turn();
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stop();
                return Err(e.into());
            }
            // New settings take effect here, between two turns, all at
            // once (a reload rings the waker).
            self.switch_settings();
            for event in events.iter() {
                match event.token() {
                    LISTENER | UDS_LISTENER | TCP_LISTENER => self.accept(),
                    WAKER => {}
                    Token(t) if t >= broker::FIRST_TOKEN => {
                        self.broker.ready(self.poll.registry(), t - broker::FIRST_TOKEN)
                    }
                    Token(t) => self.read_hello(t - FIRST_PENDING),
                }
            }
            if self.shared.limits.take_freed() {
                self.admit_uid_held();
            }
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|t| t <= now) {
                self.accept_paused_until = None;
                self.accept();
            }
            self.expire(now);
            self.broker.expire(self.poll.registry(), now);
        }
        self.stop();
        Ok(())
    }

    /// Switches to the settings a reload staged, if any, logs what changed,
    /// and wakes the workers to re-arm their stall timers.
    fn switch_settings(&mut self) {
        let Some(changes) = self.shared.settings.switch(&self.shared) else { return };
        if changes.is_empty() {
            tracing::info!("configuration reloaded: nothing changed");
        } else {
            tracing::info!("configuration reloaded: {}", changes.join("; "));
        }
        for w in &self.workers {
            w.wake();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .next_deadline()
            .into_iter()
            .chain(self.accept_paused_until)
            .chain(self.broker.next_deadline())
            .min()
    }

    /// Accepts what waits on every listener.
    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        for token in [LISTENER, UDS_LISTENER, TCP_LISTENER] {
            if !self.accept_from(token) {
                return;
            }
        }
    }

    /// Accepts until `token`'s listener would block. Returns false when
    /// accepting is paused (out of fds).
    fn accept_from(&mut self, token: Token) -> bool {
        loop {
            let accepted = match token {
                LISTENER => match &self.listener {
                    Some(l) => l.accept().map(|(s, _)| (Stream::Unix(s), Kind::Shm)),
                    None => return true,
                },
                UDS_LISTENER => match &self.uds_listener {
                    Some(l) => l.accept().map(|(s, _)| (Stream::Unix(s), Kind::Stream)),
                    None => return true,
                },
                _ => match &self.tcp_listener {
                    Some(l) => l.accept().map(|(s, _)| (Stream::Tcp(s), Kind::Stream)),
                    None => return true,
                },
            };
            match accepted {
                Ok((stream, kind)) => self.add_pending(stream, kind),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and the like: the connection stays queued
                    // and the listener stays readable; back off rather than
                    // spin, then try again.
                    tracing::error!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return false;
                }
            }
        }
    }

    fn add_pending(&mut self, mut stream: Stream, kind: Kind) {
        let peer = match &stream {
            Stream::Unix(s) => match ipc_platform::peer_credentials(s.as_fd()) {
                Ok(p) => Peer::Unix(p),
                Err(e) => {
                    tracing::warn!("cannot read peer credentials: {e}; closing the connection");
                    return;
                }
            },
            Stream::Tcp(s) => match s.peer_addr().and_then(|a| s.set_nodelay(true).map(|()| a)) {
                Ok(addr) => Peer::Tcp(addr),
                Err(e) => {
                    tracing::warn!("cannot set up a TCP connection: {e}; closing it");
                    return;
                }
            },
        };
        // TCP is never served with an allow list (the configuration is
        // refused), so only Unix peers have credentials to check.
        let settings = self.shared.settings.current();
        let refusal = match &peer {
            Peer::Unix(cred) => settings.allow.check(cred).err(),
            Peer::Tcp(_) => None,
        };
        let owner = match &peer {
            Peer::Unix(cred) => Owner::Uid(cred.uid),
            Peer::Tcp(_) => Owner::Tcp,
        };
        let max = settings.settings.max_pending_handshakes;
        if self.pending.len() >= max && !self.make_room(owner) {
            tracing::debug!(peer = %peer, "too many unfinished handshakes ({max}); closing the connection");
            self.shared.engine.stats.rejected(RejectReason::PendingHandshakeLimit);
            // Best effort: a client whose hello is already on its way reads
            // why; one that writes after the close sees a hang-up.
            let reject = Reject::TooManyPendingHandshakes { max: max.try_into().unwrap_or(u32::MAX) };
            if let Ok(bytes) = handshake::encode(&ServerMessage::Reject(reject)) {
                let _ = stream.write(&bytes);
            }
            return;
        }
        let token = Token(self.pending.vacant_key() + FIRST_PENDING);
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            tracing::error!("cannot register a connection: {e}");
            return;
        }
        let pending = Pending { stream, kind, peer, refusal, buf: Vec::with_capacity(64), held: None, uid_grace: None };
        let deadline = Instant::now() + settings.settings.handshake_timeout;
        self.pending.insert(pending, owner, deadline);
        self.shared.engine.stats.set_pending(self.pending.len());
    }

    /// At the cap, closes the oldest pending handshake of the owner with
    /// the most, if it has at least two more than `owner` (so that, after,
    /// it still has at least as many). Returns whether it did.
    fn make_room(&mut self, owner: Owner) -> bool {
        let Some((heaviest, count)) = self.pending.heaviest() else {
            return false;
        };
        if count < self.pending.count(owner) + 2 {
            return false;
        }
        let Some(victim) = self.pending.oldest(heaviest) else {
            return false;
        };
        if let Some(p) = self.pending.get(victim) {
            tracing::debug!(peer = %p.peer, "unfinished handshake closed to make room for another user's");
        }
        self.drop_pending(victim, RejectReason::PendingHandshakeEvicted);
        true
    }

    fn read_hello(&mut self, key: usize) {
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        let mut chunk = [0u8; 512];
        loop {
            match ipc_platform::recv_refusing_fds(pending.stream.as_fd(), &mut chunk) {
                Ok((_, true)) => {
                    let reason = "the hello carries file descriptors; none are accepted".to_string();
                    self.reject(key, Reject::BadHello { reason }, RejectReason::BadHello);
                    return;
                }
                Ok((0, false)) => {
                    tracing::debug!(peer = %pending.peer, "connection closed before its hello");
                    self.drop_pending(key, RejectReason::HungUp);
                    return;
                }
                Ok((n, false)) => {
                    pending.buf.extend_from_slice(&chunk[..n]);
                    if pending.buf.len() > LENGTH_PREFIX + MAX_HELLO {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(peer = %pending.peer, "connection failed during its hello: {e}");
                    self.drop_pending(key, RejectReason::HungUp);
                    return;
                }
            }
        }
        if !pending.buf.is_empty() {
            if let Some(reason) = pending.refusal.take() {
                // Answered once the peer has spoken, so that a client
                // writing its hello is not cut off before it can read why.
                self.reject(key, Reject::NotPermitted { reason }, RejectReason::NotPermitted);
                return;
            }
        }
        if pending.buf.len() < LENGTH_PREFIX {
            return;
        }
        let prefix = [pending.buf[0], pending.buf[1], pending.buf[2], pending.buf[3]];
        let len = match handshake::body_len(prefix) {
            Ok(len) if len <= MAX_HELLO => len,
            Ok(len) | Err(HandshakeError::TooLong { len, .. }) => {
                let reason = format!("hello of {len} bytes exceeds the maximum {MAX_HELLO}");
                self.reject(key, Reject::BadHello { reason }, RejectReason::BadHello);
                return;
            }
            Err(e) => {
                self.reject(key, Reject::BadHello { reason: e.to_string() }, RejectReason::BadHello);
                return;
            }
        };
        let have = pending.buf.len() - LENGTH_PREFIX;
        if have < len {
            return;
        }
        if have > len {
            let reason = format!("{} bytes follow the hello", have - len);
            self.reject(key, Reject::BadHello { reason }, RejectReason::BadHello);
            return;
        }
        match handshake::decode_hello(&pending.buf[LENGTH_PREFIX..]) {
            Ok(hello) => self.admit(key, hello),
            Err(HandshakeError::VersionMismatch { ours, theirs }) => self.reject(
                key,
                Reject::VersionMismatch { daemon: ours, client: theirs },
                RejectReason::VersionMismatch,
            ),
            Err(e) => self.reject(key, Reject::BadHello { reason: e.to_string() }, RejectReason::BadHello),
        }
    }

    fn take_pending(&mut self, key: usize) -> Option<Pending> {
        let mut pending = self.pending.remove(key)?;
        self.shared.engine.stats.set_pending(self.pending.len());
        let _ = self.poll.registry().deregister(&mut pending.stream);
        Some(pending)
    }

    fn drop_pending(&mut self, key: usize, reason: RejectReason) {
        if let Some(pending) = self.take_pending(key) {
            // Count before closing, so a client that sees the close also
            // sees the count.
            self.shared.engine.stats.rejected(reason);
            drop(pending);
        }
    }

    /// Sends `reject` (best effort: the socket is fresh, so a few bytes
    /// always fit) and closes the connection.
    fn reject(&mut self, key: usize, reject: Reject, reason: RejectReason) {
        if let Some(pending) = self.take_pending(key) {
            self.reject_pending(pending, reject, reason);
        }
    }

    fn reject_pending(&self, pending: Pending, reject: Reject, reason: RejectReason) {
        pending.refuse(&self.shared.engine.stats, reject, reason);
    }

    fn admit(&mut self, key: usize, hello: Hello) {
        if self.shared.engine.shutting_down.load(Ordering::Acquire) {
            return self.reject(key, Reject::ShuttingDown, RejectReason::ShuttingDown);
        }
        if let Some(pending) = self.pending.get_mut(key) {
            if let Peer::Unix(cred) = pending.peer {
                if let Some(until) = self.shared.cooldown.wait_until(&cred, Instant::now()) {
                    // Held until the peer's cool-down is over (see
                    // `cooldown`); `expire` admits it then.
                    if pending.held.is_none() {
                        tracing::debug!(peer = %pending.peer, "hello held: the peer broke the protocol lately");
                        self.shared.engine.stats.held();
                    }
                    pending.held = Some(hello);
                    self.pending.set_deadline(key, until);
                    return;
                }
            }
        }
        if hello.role != Role::Session {
            return self.admit_control(key, hello.role);
        }
        let settings = self.shared.settings.current();
        let max = settings.settings.max_clients;
        if self.shared.engine.stats.connected.load(Ordering::Relaxed) >= max {
            return self.reject(key, Reject::TooManyClients { max: max as u32 }, RejectReason::TooManyClients);
        }
        let Some(pending) = self.pending.get(key) else {
            return;
        };
        // Charged before anything is created for it, so a client over a
        // limit costs no segment (a pooled one is already charged: see
        // `segment_pool`).
        let uid = match pending.peer {
            Peer::Unix(cred) => Some(cred.uid),
            Peer::Tcp(_) => None,
        };
        let kind = pending.kind;
        let max_ring = settings.settings.max_ring_capacity;
        let capacity = SegmentLayout::fit_capacity(hello.ring_capacity, max_ring);
        let bytes = charge(kind, &hello, max_ring);
        let (lease, pooled) = match self.lease(uid, bytes, kind, capacity) {
            Ok(leased) => leased,
            Err(Refusal::Uid { .. }) if self.hold_for_uid(key, &hello) => return,
            Err(refusal) => {
                let reason = match refusal {
                    Refusal::Uid { .. } => RejectReason::UidSessionLimit,
                    Refusal::Memory { .. } => RejectReason::OverMemoryBudget,
                };
                return self.reject(key, refusal.to_reject(), reason);
            }
        };
        let Some(pending) = self.take_pending(key) else {
            return;
        };
        let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        // Counted now, so that `max_clients` holds while openers work; an
        // opener that cannot open the session takes it off again.
        self.shared.engine.stats.connected.fetch_add(1, Ordering::Relaxed);
        // Only making a segment is worth another thread.
        let cheap = kind == Kind::Stream || pooled.is_some();
        let admitted = Admitted { id, pending, hello, capacity, lease, pooled };
        if cheap {
            return self.openers.open_here(admitted);
        }
        if let Err(admitted) = self.openers.open(admitted) {
            self.shared.engine.stats.connected.fetch_sub(1, Ordering::Relaxed);
            self.reject_pending(admitted.pending, Reject::ShuttingDown, RejectReason::ShuttingDown);
        }
    }

    /// Takes the lease of a session of `uid` charged `bytes`, with a
    /// pooled segment when the pool has one of `capacity`; a session
    /// refused for memory while the pool holds segments has them given up
    /// and is judged again.
    fn lease(
        &self,
        uid: Option<u32>,
        bytes: u64,
        kind: Kind,
        capacity: u32,
    ) -> Result<(Lease, Option<NewSegment>), Refusal> {
        let limits = &self.shared.limits;
        let attempt = || match (kind == Kind::Shm).then(|| self.pool.take(capacity)).flatten() {
            Some(Pooled { segment, charge }) => match limits.lease_with(uid, bytes, charge) {
                Ok(lease) => Ok((lease, Some(segment))),
                Err((refusal, charge)) => {
                    self.pool.put_back(Pooled { segment, charge });
                    Err(refusal)
                }
            },
            None => limits.lease(uid, bytes).map(|lease| (lease, None)),
        };
        match attempt() {
            Err(Refusal::Memory { .. }) if self.pool.give_way() => attempt(),
            leased => leased,
        }
    }

    /// Holds a hello refused by its uid's session limit for another look
    /// (see [`UID_GRACE`]), unless its grace is over. Returns whether it
    /// was held.
    fn hold_for_uid(&mut self, key: usize, hello: &Hello) -> bool {
        let now = Instant::now();
        let Some(pending) = self.pending.get_mut(key) else { return false };
        let until = *pending.uid_grace.get_or_insert(now + UID_GRACE);
        if until <= now {
            return false;
        }
        pending.held = Some(hello.clone());
        self.uid_held.push(key);
        self.pending.set_deadline(key, until);
        self.shared.limits.watch_slots(true);
        true
    }

    /// Answers the hello of a broker or provider connection and hands it
    /// to the broker. Only the control socket serves them: fds must travel.
    fn admit_control(&mut self, key: usize, role: Role) {
        let Some(pending) = self.pending.get(key) else { return };
        if pending.kind != Kind::Shm {
            let reason = format!("a {role:?} connection is served on the control socket only");
            return self.reject(key, Reject::BadHello { reason }, RejectReason::BadHello);
        }
        let Some(mut pending) = self.take_pending(key) else { return };
        let (Stream::Unix(stream), Peer::Unix(creds)) = (pending.stream, pending.peer) else {
            unreachable!("the control socket is a Unix socket");
        };
        let connection_id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        let accepted = ServerMessage::Accepted { version: PROTOCOL_VERSION, connection_id };
        let sent = handshake::encode(&accepted).map_err(io::Error::other).and_then(|bytes| {
            let mut s = &stream;
            // A fresh connection's send buffer takes the answer whole.
            match s.write(&bytes)? {
                n if n == bytes.len() => Ok(()),
                n => Err(io::Error::other(format!("answer cut short: {n} of {} bytes sent", bytes.len()))),
            }
        });
        pending.stream = Stream::Unix(stream);
        if let Err(e) = sent {
            tracing::warn!(peer = %creds, "cannot answer a {role:?} hello: {e}");
            self.shared.engine.stats.rejected(RejectReason::HungUp);
            return;
        }
        let Stream::Unix(stream) = pending.stream else { unreachable!("put back above") };
        self.broker.adopt(self.poll.registry(), stream, creds, role == Role::Provider);
    }

    /// Looks again at the hellos held by their uid's session limit: a
    /// session has given its slot back.
    fn admit_uid_held(&mut self) {
        let held = std::mem::take(&mut self.uid_held);
        self.shared.limits.watch_slots(false);
        for key in held {
            let Some(pending) = self.pending.get_mut(key) else { continue };
            if pending.uid_grace.is_none() {
                continue;
            }
            if let Some(hello) = pending.held.take() {
                self.admit(key, hello);
            }
        }
    }

    /// Handles every handshake whose deadline has passed: admits a held
    /// hello (which may hold it again, with a new deadline), closes the
    /// rest.
    fn expire(&mut self, now: Instant) {
        while let Some(key) = self.pending.pop_expired(now) {
            if let Some(hello) = self.pending.get_mut(key).and_then(|p| p.held.take()) {
                self.admit(key, hello);
                continue;
            }
            if let Some(p) = self.pending.get(key) {
                tracing::info!(peer = %p.peer, "handshake timed out; closing the connection");
            }
            self.drop_pending(key, RejectReason::HandshakeTimeout);
        }
    }

    /// Stops accepting, removes the socket files it bound, and waits for the workers
    /// to answer what is in flight and close their sessions.
    fn stop(&mut self) {
        self.shared.engine.shutting_down.store(true, Ordering::Release);
        self.broker.shut_down(self.poll.registry());
        if let Err(e) = self.bound.remove(&self.shared.config.socket) {
            tracing::warn!("cannot remove {}: {e}", self.shared.config.socket.display());
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        if let (Some(path), Some(bound)) = (&self.shared.config.uds, &self.uds_bound) {
            if let Err(e) = bound.remove(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        if let Some(mut l) = self.uds_listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut l) = self.tcp_listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        for key in self.pending.keys() {
            self.reject(key, Reject::ShuttingDown, RejectReason::ShuttingDown);
        }
        // What the openers hold reaches the workers (or is refused) first.
        self.openers.stop();
        for w in &self.workers {
            w.wake();
        }
        for w in &mut self.workers {
            w.join();
        }
        self.pool.stop();
        tracing::info!("ipcd stopped");
    }
}

/// What the session `hello` asks for (its ring at most `max_ring` bytes)
/// is charged against the limits (see [`crate::limits`]).
fn charge(kind: Kind, hello: &Hello, max_ring: u32) -> u64 {
    let capacity = SegmentLayout::fit_capacity(hello.ring_capacity, max_ring);
    let layout = SegmentLayout::new(capacity);
    match (kind, layout) {
        (Kind::Shm, Ok(layout)) => limits::shm_charge(&layout),
        (Kind::Stream, Ok(layout)) => limits::stream_charge(layout.max_payload()),
        // No session can be made of it: opening it fails and says why.
        (Kind::Shm, Err(_)) => 0,
        (Kind::Stream, Err(_)) => limits::stream_charge(0),
    }
}
