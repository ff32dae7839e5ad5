//! The acceptor: takes connections, runs the handshake, hands sessions to
//! workers.
//!
//! Every connection starts as a pending handshake with a deadline. Its bytes
//! are read without blocking into a bounded buffer; a complete hello is
//! answered with a welcome (and the session's fds) or an explicit reject. A
//! connection that sends garbage is rejected, one that stays silent past the
//! deadline is closed, and neither affects anyone else.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{
    Consumer, Direction, DoorbellKind, HandshakeError, Hello, Producer, Reject, SegmentLayout, ServerMessage, Welcome,
    PROTOCOL_VERSION,
};
use ipc_platform::{EventFd, Mapping, PeerCredentials, SocketBell};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::server::{Server, ServerError, Shared, ACCEPTOR_WAKER};
use crate::session::{ClientWake, Session};
use crate::stats::RejectReason;
use crate::worker::{self, WorkerHandle};

const LISTENER: Token = Token(0);
const FIRST_PENDING: usize = 2;
/// The longest hello body accepted.
const MAX_HELLO: usize = 1024;
/// How long to stop accepting after running out of fds.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type SessionParts = (EventFd, ClientWake, Consumer, Producer);

struct Pending {
    stream: UnixStream,
    peer: PeerCredentials,
    buf: Vec<u8>,
    deadline: Instant,
}

pub(crate) struct Acceptor {
    shared: Arc<Shared>,
    bound: ipc_platform::BoundSocket,
    listener: Option<UnixListener>,
    poll: Poll,
    _waker: Arc<Waker>,
    workers: Vec<WorkerHandle>,
    pending: Slab<Pending>,
    next_session: u64,
    accept_paused_until: Option<Instant>,
}

impl Acceptor {
    pub(crate) fn new(server: Server) -> Result<Acceptor, ServerError> {
        let Server { shared, bound, poll, waker } = server;
        let listener_fd = bound.listener.try_clone()?;
        let mut listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(listener_fd));
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut workers: Vec<WorkerHandle> = Vec::with_capacity(shared.config.workers);
        for i in 0..shared.config.workers {
            match worker::spawn(i, Arc::clone(&shared)) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // Stop the workers already running before giving up.
                    shared.shutting_down.store(true, Ordering::Release);
                    for w in &mut workers {
                        w.wake();
                        w.join();
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(Acceptor {
            shared,
            bound,
            listener: Some(listener),
            poll,
            _waker: waker,
            workers,
            pending: Slab::new(),
            next_session: 1,
            accept_paused_until: None,
        })
    }

    pub(crate) fn run(mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(256);
        while !self.shared.shutting_down.load(Ordering::Acquire) {
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stop();
                return Err(e.into());
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    ACCEPTOR_WAKER => {}
                    Token(t) => self.read_hello(t - FIRST_PENDING),
                }
            }
            let now = Instant::now();
            if self.accept_paused_until.is_some_and(|t| t <= now) {
                self.accept_paused_until = None;
                self.accept();
            }
            self.expire(now);
        }
        self.stop();
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|(_, p)| p.deadline).chain(self.accept_paused_until).min()
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => self.add_pending(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE/ENFILE and the like: the connection stays queued
                    // and the listener stays readable; back off rather than
                    // spin, then try again.
                    tracing::error!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn add_pending(&mut self, mut stream: UnixStream) {
        let peer = match ipc_platform::peer_credentials(stream.as_fd()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot read peer credentials: {e}; closing the connection");
                return;
            }
        };
        let entry = self.pending.vacant_entry();
        let token = Token(entry.key() + FIRST_PENDING);
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            tracing::error!("cannot register a connection: {e}");
            return;
        }
        entry.insert(Pending {
            stream,
            peer,
            buf: Vec::with_capacity(64),
            deadline: Instant::now() + self.shared.config.handshake_timeout,
        });
    }

    fn read_hello(&mut self, key: usize) {
        let Some(pending) = self.pending.get_mut(key) else {
            return;
        };
        let mut chunk = [0u8; 512];
        loop {
            match pending.stream.read(&mut chunk) {
                Ok(0) => {
                    tracing::debug!(pid = pending.peer.pid, "connection closed before its hello");
                    self.drop_pending(key, RejectReason::HungUp);
                    return;
                }
                Ok(n) => {
                    pending.buf.extend_from_slice(&chunk[..n]);
                    if pending.buf.len() > LENGTH_PREFIX + MAX_HELLO {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(pid = pending.peer.pid, "connection failed during its hello: {e}");
                    self.drop_pending(key, RejectReason::HungUp);
                    return;
                }
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
        let mut pending = self.pending.try_remove(key)?;
        let _ = self.poll.registry().deregister(&mut pending.stream);
        Some(pending)
    }

    fn drop_pending(&mut self, key: usize, reason: RejectReason) {
        if let Some(pending) = self.take_pending(key) {
            // Count before closing, so a client that sees the close also
            // sees the count.
            self.shared.stats.rejected(reason);
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

    fn reject_pending(&self, mut pending: Pending, reject: Reject, reason: RejectReason) {
        tracing::info!(pid = pending.peer.pid, uid = pending.peer.uid, "handshake rejected: {reject}");
        // Count before answering, so a client that sees the reject also
        // sees the count.
        self.shared.stats.rejected(reason);
        if let Ok(bytes) = handshake::encode(&ServerMessage::Reject(reject)) {
            let _ = pending.stream.write(&bytes);
        }
    }

    fn admit(&mut self, key: usize, hello: Hello) {
        if self.shared.shutting_down.load(Ordering::Acquire) {
            return self.reject(key, Reject::ShuttingDown, RejectReason::ShuttingDown);
        }
        let max = self.shared.config.max_clients;
        if self.shared.stats.connected.load(Ordering::Relaxed) >= max {
            return self.reject(key, Reject::TooManyClients { max: max as u32 }, RejectReason::TooManyClients);
        }
        let Some(pending) = self.take_pending(key) else {
            return;
        };
        let id = self.next_session;
        let (bell, wake, requests, responses) = match self.create_session(id, &pending, &hello) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!("cannot create a session: {e}");
                let reason = e.to_string();
                return self.reject_pending(pending, Reject::ResourceExhausted { reason }, RejectReason::Resources);
            }
        };
        self.next_session += 1;
        let session = Session::new(id, pending.peer, pending.stream, bell, wake, requests, responses);
        self.shared.stats.connected.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.accepted();
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| self.shared.stats.workers[w.index].sessions.load(Ordering::Relaxed))
            .expect("at least one worker");
        tracing::debug!(
            session = id,
            pid = session.peer.pid,
            uid = session.peer.uid,
            worker = worker.index,
            "session opened"
        );
        if let Err(e) = worker.adopt(session) {
            tracing::error!(session = id, "cannot hand the session to a worker: {e}");
            self.shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Creates the segment and doorbells and sends the welcome with their
    /// fds.
    fn create_session(&self, id: u64, pending: &Pending, hello: &Hello) -> io::Result<SessionParts> {
        let capacity = SegmentLayout::fit_capacity(hello.ring_capacity, self.shared.config.max_ring_capacity);
        let layout = SegmentLayout::new(capacity).map_err(io::Error::other)?;
        let size = layout.segment_size();
        let memfd = ipc_platform::create_sealed("ipcd-session", size as u64)?;
        let region = Mapping::map(memfd.as_fd(), size).map_err(io::Error::other)?;
        layout.write_header(&region);
        let bell = EventFd::new()?;
        let client_bell = match hello.doorbell {
            DoorbellKind::Pollable => Some(SocketBell::pair()?),
            DoorbellKind::Futex => None,
        };
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            session_id: id,
            ring_capacity: capacity,
            max_payload: layout.max_payload(),
            doorbell: hello.doorbell,
            services: self.shared.services.directory(),
        };
        let bytes = handshake::encode(&ServerMessage::Welcome(welcome)).map_err(io::Error::other)?;
        let mut fds: Vec<BorrowedFd<'_>> = vec![memfd.as_fd(), bell.as_fd()];
        if let Some((_ours, theirs)) = &client_bell {
            fds.push(theirs.as_fd());
        }
        let sent = ipc_platform::send_with_fds(pending.stream.as_fd(), &bytes, &fds)?;
        if sent != bytes.len() {
            return Err(io::Error::other(format!("welcome cut short: {sent} of {} bytes sent", bytes.len())));
        }
        // The mapping keeps the segment alive; the daemon needs no fd for it.
        drop(memfd);
        let wake = client_bell.map_or(ClientWake::Futex, |(ours, _theirs)| ClientWake::Pollable(ours));
        Ok((
            bell,
            wake,
            Consumer::new(&region, &layout, Direction::Request),
            Producer::new(&region, &layout, Direction::Response),
        ))
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<usize> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| k).collect();
        for key in expired {
            if let Some(p) = self.pending.get(key) {
                tracing::info!(pid = p.peer.pid, uid = p.peer.uid, "handshake timed out; closing the connection");
            }
            self.drop_pending(key, RejectReason::HandshakeTimeout);
        }
    }

    /// Stops accepting, removes the socket file, and waits for the workers
    /// to answer what is in flight and close their sessions.
    fn stop(&mut self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        if let Err(e) = ipc_platform::remove_control_socket(&self.shared.config.socket, &self.bound) {
            tracing::warn!("cannot remove {}: {e}", self.shared.config.socket.display());
        }
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.pending.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.reject(key, Reject::ShuttingDown, RejectReason::ShuttingDown);
        }
        for w in &self.workers {
            w.wake();
        }
        for w in &mut self.workers {
            w.join();
        }
        tracing::info!("ipcd stopped");
    }
}
