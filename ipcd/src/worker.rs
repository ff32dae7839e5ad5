//! A worker thread: one mio poll over its share of the sessions.
//!
//! A shared-memory session's request doorbell (an eventfd, watched but never
//! read) and its control socket are registered in the poll; a stream
//! session's socket is registered for reading and writing. An event puts
//! the session in the ready queue; the worker serves every ready session in
//! turn, a bounded batch each, until none is left with work, and only then
//! sleeps in `epoll_wait`. While clients keep their rings busy the worker
//! makes no system call per message.
//!
//! Before sleeping, the worker may spin: shared-memory sessions whose ring
//! ran empty are left idle (the client is not told to ring), and the worker
//! watches their rings for a bounded, adaptive time ([`ipc_core::Spinner`]),
//! and only while no runnable thread waits for a core
//! ([`ipc_platform::CoreGauge`]).
//! A request that lands meanwhile costs neither side a system call. When
//! the spin ends empty, every idle session is parked (its client told to
//! ring) before the worker sleeps, so no request is left unseen.
//!
//! A session whose client leaves its replies unread stalls: it waits for
//! the client to make room, and the worker goes on with the others. Each
//! session knows since when it has been stalled (the client taking any
//! reply, or freeing any room in its ring, ends the stall or starts it
//! over); the worker keeps a list of its stalled sessions, sleeps no
//! longer than until the earliest stall timeout, and closes a session
//! whose stall outlasts it.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::engine::Engine;
use ipc_core::Spinner;

use crate::limits::Lease;
use crate::session::{Progress, Scratch, Session};
use crate::stats::{DisconnectReason, Stats};
use crate::stream_session::{Peer, StreamSession};

const WAKER: Token = Token(usize::MAX);
/// Requests served from one session before the worker turns to the next.
const BUDGET: usize = 64;
/// The longest a graceful stop waits for clients to read the answers that
/// did not fit their ring or socket (at most the stall timeout).
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);
/// The longest the drain sleeps between looks at its sessions.
const DRAIN_POLL: Duration = Duration::from_millis(5);

/// The acceptor's side of a worker.
pub(crate) struct WorkerHandle {
    pub(crate) index: usize,
    tx: Sender<Conn>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Hands a new session to the worker. An error means the worker did not
    /// get it (the session is dropped); a failed wake-up only delays it to
    /// the worker's next event, so it is logged, not returned.
    pub(crate) fn adopt(&self, session: Conn) -> io::Result<()> {
        self.tx.send(session).map_err(|_| io::Error::other("worker has exited"))?;
        if let Err(e) = self.waker.wake() {
            tracing::warn!(worker = self.index, "cannot wake the worker for a new session: {e}");
        }
        Ok(())
    }

    /// Wakes the worker (to notice shutdown).
    pub(crate) fn wake(&self) {
        let _ = self.waker.wake();
    }

    /// The worker's waker, for the health check (see [`crate::health`]).
    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Waits for the worker thread to finish.
    pub(crate) fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(worker = self.index, "worker thread panicked");
            }
        }
    }
}

/// The worker with the fewest sessions, for a new one.
pub(crate) fn least_busy<'w>(workers: &'w [WorkerHandle], stats: &Stats) -> &'w WorkerHandle {
    workers.iter().min_by_key(|w| stats.workers[w.index].sessions.load(Ordering::Relaxed)).expect("at least one worker")
}

/// Starts the engine's workers; if one cannot start, stops those already
/// running and returns the error.
pub(crate) fn spawn_all(engine: &Arc<Engine>) -> io::Result<Vec<WorkerHandle>> {
    let mut workers: Vec<WorkerHandle> = Vec::with_capacity(engine.workers);
    for i in 0..engine.workers {
        match spawn(i, Arc::clone(engine)) {
            Ok(w) => workers.push(w),
            Err(e) => {
                engine.shutting_down.store(true, Ordering::Release);
                for w in &mut workers {
                    w.wake();
                    w.join();
                }
                return Err(e);
            }
        }
    }
    Ok(workers)
}

fn spawn(index: usize, engine: Arc<Engine>) -> io::Result<WorkerHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(format!("ipcd-worker-{index}")).spawn(move || {
        let spinner = Spinner::new(engine.spin);
        let mut worker = Worker {
            index,
            poll,
            rx,
            engine,
            sessions: Slab::new(),
            ready: VecDeque::new(),
            idle: Vec::new(),
            stalls: Vec::new(),
            spinner,
            gauge: ipc_platform::CoreGauge::new(),
            scratch: Scratch::default(),
        };
        worker.run();
    })?;
    Ok(WorkerHandle { index, tx, waker, thread: Some(thread) })
}

/// A session on either transport.
pub(crate) enum Conn {
    Shm(Session),
    Stream(StreamSession),
}

impl Conn {
    fn id(&self) -> u64 {
        match self {
            Conn::Shm(s) => s.id,
            Conn::Stream(s) => s.id,
        }
    }

    fn queued(&mut self) -> &mut bool {
        match self {
            Conn::Shm(s) => &mut s.queued,
            Conn::Stream(s) => &mut s.queued,
        }
    }

    fn stalled_since(&self) -> Option<Instant> {
        match self {
            Conn::Shm(s) => s.stalled_since(),
            Conn::Stream(s) => s.stalled_since(),
        }
    }

    fn peer(&self) -> Peer {
        match self {
            Conn::Shm(s) => Peer::Unix(s.peer),
            Conn::Stream(s) => s.peer,
        }
    }

    /// Makes the session hold what it is charged, until it drops.
    pub(crate) fn hold(&mut self, lease: Lease) {
        match self {
            Conn::Shm(s) => s.lease = Some(lease),
            Conn::Stream(s) => s.lease = Some(lease),
        }
    }
}

struct Worker {
    index: usize,
    poll: Poll,
    rx: Receiver<Conn>,
    engine: Arc<Engine>,
    sessions: Slab<Conn>,
    ready: VecDeque<usize>,
    /// Shared-memory sessions whose ring ran empty and whose client was not
    /// told to ring: watched by spinning, parked before the worker sleeps.
    idle: Vec<usize>,
    /// Sessions stalled on replies their client does not read (those whose
    /// `stalled_since` is set).
    stalls: Vec<usize>,
    spinner: Spinner,
    gauge: ipc_platform::CoreGauge,
    scratch: Scratch,
}

/// A shared-memory session's doorbell, or a stream session's socket.
fn io_token(key: usize) -> Token {
    Token(key * 2)
}

/// A shared-memory session's control connection.
fn control_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            // A sign of life for the health check, once per turn (the
            // check wakes a worker asleep in its poll to see it turn).
            self.engine.stats.workers[self.index].turn();
            let sleep = self.ready.is_empty() && self.idle.is_empty();
            let timeout = if sleep { self.until_first_stall_expires() } else { Some(Duration::ZERO) };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.index, "poll failed: {e}; closing this worker's sessions");
                self.close_all(DisconnectReason::IoError);
                return;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.adopt_sessions(),
                    // A doorbell (its eventfd is never read: the client
                    // shares its open file and could make a read block), or
                    // a stream socket that can be read or written.
                    Token(t) if t % 2 == 0 => {
                        if event.is_read_closed() {
                            if let Some(Conn::Stream(s)) = self.sessions.get_mut(t / 2) {
                                s.hangup_seen = true;
                            }
                        }
                        self.schedule(t / 2)
                    }
                    Token(t) => self.control_event(t / 2, event.is_read_closed() || event.is_error()),
                }
            }
            if self.engine.shutting_down.load(Ordering::Acquire) {
                self.shut_down();
                return;
            }
            self.wake_idle();
            self.serve_ready();
            if !self.stalls.is_empty() {
                self.expire_stalls();
            }
            if self.ready.is_empty() && !self.idle.is_empty() {
                self.spin_then_park();
            }
        }
    }

    fn schedule(&mut self, key: usize) {
        if let Some(session) = self.sessions.get_mut(key) {
            let queued = session.queued();
            if !*queued {
                *queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn adopt_sessions(&mut self) {
        while let Ok(mut conn) = self.rx.try_recv() {
            let entry = self.sessions.vacant_entry();
            let key = entry.key();
            let registry = self.poll.registry();
            let registered = match &mut conn {
                Conn::Shm(session) => {
                    registry.register(&mut session.bell, io_token(key), Interest::READABLE).and_then(|()| {
                        registry.register(&mut session.control, control_token(key), Interest::READABLE).inspect_err(
                            |_| {
                                // The client keeps the eventfd open, so a stale
                                // registration would outlive our fd: remove it.
                                let _ = registry.deregister(&mut session.bell);
                            },
                        )
                    })
                }
                Conn::Stream(session) => {
                    registry.register(&mut session.stream, io_token(key), Interest::READABLE | Interest::WRITABLE)
                }
            };
            if let Err(e) = registered {
                tracing::error!(session = conn.id(), "cannot register session: {e}");
                self.engine.stats.connected.fetch_sub(1, Ordering::Relaxed);
                self.engine.stats.disconnected(DisconnectReason::IoError);
                continue;
            }
            self.engine.stats.workers[self.index].sessions.fetch_add(1, Ordering::Relaxed);
            entry.insert(conn);
            // The client may have sent requests before we registered it;
            // look once, then the doorbell or socket takes over.
            self.schedule(key);
        }
    }

    /// Something happened on a control connection: after the handshake the
    /// client sends nothing, so this is a hang-up or a violation.
    fn control_event(&mut self, key: usize, closed: bool) {
        let Some(Conn::Shm(session)) = self.sessions.get(key) else {
            return;
        };
        let reason = match ipc_platform::peer_closed(std::os::fd::AsFd::as_fd(&session.control)) {
            Ok(true) => DisconnectReason::ClientHangup,
            Ok(false) if closed => DisconnectReason::ClientHangup,
            Ok(false) => {
                tracing::warn!(
                    session = session.id,
                    pid = session.peer.pid,
                    "unexpected data on the control connection; disconnecting"
                );
                DisconnectReason::ProtocolViolation
            }
            Err(e) => {
                tracing::warn!(session = session.id, "control connection failed: {e}");
                DisconnectReason::IoError
            }
        };
        self.close(key, reason);
    }

    fn serve_ready(&mut self) {
        // One pass over what is ready now; the caller polls (without
        // sleeping) between passes so new doorbells are seen.
        let spin = !self.spinner.limit().is_zero();
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.sessions.get_mut(key) else {
                continue;
            };
            *conn.queued() = false;
            let counters = &self.engine.stats.workers[self.index];
            let services = &self.engine.services;
            let was_stalled = conn.stalled_since().is_some();
            let progress = match conn {
                Conn::Shm(s) => s.serve(services, counters, &mut self.scratch, BUDGET, false, !spin),
                Conn::Stream(s) => s.serve(services, counters, &mut self.scratch, BUDGET, false),
            };
            // Only a serve begins or ends a stall.
            match (was_stalled, conn.stalled_since().is_some()) {
                (false, true) => self.stalls.push(key),
                (true, false) => self.stalls.retain(|&k| k != key),
                _ => {}
            }
            match progress {
                Ok(Progress::Busy) => self.schedule(key),
                Ok(Progress::Idle) => {
                    if let Conn::Shm(s) = conn {
                        if !s.idle {
                            s.idle = true;
                            self.idle.push(key);
                        }
                    }
                }
                Ok(Progress::Parked) | Ok(Progress::Stalled) => {}
                Ok(Progress::Closed) => self.close(key, DisconnectReason::ClientHangup),
                Err(reason) => {
                    match conn {
                        Conn::Shm(s) => tracing::warn!(
                            session = s.id,
                            pid = s.peer.pid,
                            uid = s.peer.uid,
                            "protocol violation: {reason}; disconnecting"
                        ),
                        Conn::Stream(s) => {
                            tracing::warn!(session = s.id, peer = %s.peer, "protocol violation: {reason}; disconnecting")
                        }
                    }
                    self.close(key, DisconnectReason::ProtocolViolation);
                }
            }
        }
    }

    /// Moves idle sessions whose client has sent a request back to the
    /// ready queue, so busy neighbours cannot starve them.
    fn wake_idle(&mut self) {
        let mut i = 0;
        while i < self.idle.len() {
            let key = self.idle[i];
            let waiting = match self.sessions.get_mut(key) {
                Some(Conn::Shm(s)) => s.has_requests(),
                // Closed meanwhile: drop the stale key.
                _ => true,
            };
            if !waiting {
                i += 1;
                continue;
            }
            self.idle.swap_remove(i);
            if let Some(Conn::Shm(s)) = self.sessions.get_mut(key) {
                s.idle = false;
                self.schedule(key);
            }
        }
    }

    /// Watches the idle sessions' rings for a while; if nothing comes, parks
    /// them all so the worker can sleep.
    fn spin_then_park(&mut self) {
        let Worker { sessions, idle, spinner, gauge, .. } = self;
        let found = spinner.spin(
            || gauge.core_free(),
            || {
                idle.iter().any(|&k| match sessions.get_mut(k) {
                    Some(Conn::Shm(s)) => s.has_requests(),
                    _ => false,
                })
            },
        );
        if found {
            self.wake_idle();
            return;
        }
        for key in std::mem::take(&mut self.idle) {
            let Some(Conn::Shm(s)) = self.sessions.get_mut(key) else {
                continue;
            };
            s.idle = false;
            match s.park() {
                Ok(Progress::Parked) => {}
                Ok(_) => self.schedule(key),
                Err(reason) => {
                    tracing::warn!(session = s.id, pid = s.peer.pid, "protocol violation: {reason}; disconnecting");
                    self.close(key, DisconnectReason::ProtocolViolation);
                }
            }
        }
    }

    /// How long the worker may sleep: until the earliest stall timeout, or
    /// for good when nothing is stalled.
    fn until_first_stall_expires(&self) -> Option<Duration> {
        let first = self.stalls.iter().filter_map(|&k| self.sessions.get(k)?.stalled_since()).min()?;
        // A timeout too far to represent never expires.
        let deadline = first.checked_add(self.engine.stall_timeout)?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }

    /// Closes the sessions stalled for longer than the stall timeout.
    fn expire_stalls(&mut self) {
        let limit = self.engine.stall_timeout;
        let now = Instant::now();
        let stalled_for = |conn: &Conn| conn.stalled_since().map(|since| now.duration_since(since));
        let expired: Vec<(usize, Duration)> = self
            .stalls
            .iter()
            .filter_map(|&k| Some((k, self.sessions.get(k).and_then(stalled_for)?)))
            .filter(|&(_, stalled)| stalled >= limit)
            .collect();
        for (key, stalled) in expired {
            if let Some(conn) = self.sessions.get(key) {
                tracing::warn!(
                    session = conn.id(),
                    peer = %conn.peer(),
                    stalled_ms = stalled.as_millis() as u64,
                    "the client has left its replies unread for {stalled:.1?} (stall timeout {limit:?}); disconnecting"
                );
            }
            self.close(key, DisconnectReason::Stalled);
        }
    }

    fn close(&mut self, key: usize, reason: DisconnectReason) {
        let Some(mut conn) = self.sessions.try_remove(key) else {
            return;
        };
        // Its key may not outlive it in the list: the slab hands keys out
        // again.
        self.stalls.retain(|&k| k != key);
        // A stall that ran out is a strike like a violation: otherwise a
        // client could stall its session, reconnect and stall the next one,
        // each time holding a segment for the whole stall timeout.
        if matches!(reason, DisconnectReason::ProtocolViolation | DisconnectReason::Stalled) {
            self.engine.events.struck(&conn.peer(), conn.id());
        }
        let registry = self.poll.registry();
        match &mut conn {
            Conn::Shm(s) => {
                let _ = registry.deregister(&mut s.bell);
                let _ = registry.deregister(&mut s.control);
            }
            Conn::Stream(s) => {
                let _ = registry.deregister(&mut s.stream);
            }
        }
        self.engine.stats.connected.fetch_sub(1, Ordering::Relaxed);
        self.engine.stats.workers[self.index].sessions.fetch_sub(1, Ordering::Relaxed);
        self.engine.stats.disconnected(reason);
        let id = conn.id();
        tracing::debug!(session = id, reason = reason.name(), "session closed");
        // Dropping the session unmaps its segment and closes its fds; the
        // client sees its connection hang up. Only then is the owner told.
        drop(conn);
        self.engine.events.closed(id);
    }

    fn close_all(&mut self, reason: DisconnectReason) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    /// Answers every request still waiting with a shutdown error, then
    /// closes every session.
    fn shut_down(&mut self) {
        self.adopt_sessions();
        let counters = &self.engine.stats.workers[self.index];
        for (_, conn) in self.sessions.iter_mut() {
            // One pass answers what is waiting. It ends: the ring never lets
            // a pass read more than one ring's worth before releasing, a
            // full response ring stalls it, and a stream session reads at
            // most its buffer's worth.
            //
            // After that pass nothing more is taken from the session: each
            // kind tells its client the last request taken (segment word or
            // closing frame), so it fails the rest as `Shutdown` (not
            // executed) rather than with an unknown outcome.
            let result = match conn {
                Conn::Shm(s) => s.serve(&self.engine.services, counters, &mut self.scratch, usize::MAX, true, true),
                Conn::Stream(s) => {
                    let r = s.serve(&self.engine.services, counters, &mut self.scratch, usize::MAX, true);
                    s.close_on_purpose();
                    r
                }
            };
            if let Err(reason) = result {
                tracing::debug!(session = conn.id(), "while shutting down: {reason}");
            }
        }
        self.drain(Instant::now() + SHUTDOWN_DRAIN.min(self.engine.stall_timeout));
        // Only now, with every answer out (or given up on), does the segment
        // say which request was the last taken.
        for (_, conn) in self.sessions.iter_mut() {
            if let Conn::Shm(s) = conn {
                s.mark_closed();
            }
        }
        self.close_all(DisconnectReason::Shutdown);
    }

    /// Sends what waits for clients that are slow to read, until all of it
    /// is out or `until`: answers that did not fit a full response ring, and
    /// stream output with its closing frame. A client that reads nothing
    /// delays the stop by no more than that.
    fn drain(&mut self, until: Instant) {
        let mut events = Events::with_capacity(64);
        loop {
            let mut waiting = false;
            for (_, conn) in self.sessions.iter_mut() {
                let (result, left) = match conn {
                    Conn::Shm(s) if s.has_output() => (s.flush(), s.has_output()),
                    Conn::Stream(s) if s.has_output() => (s.flush(), s.has_output()),
                    _ => continue,
                };
                if let Err(reason) = result {
                    tracing::debug!(session = conn.id(), "while draining: {reason}");
                    continue;
                }
                waiting |= left;
            }
            let now = Instant::now();
            if !waiting || now >= until {
                return;
            }
            // A client freeing space rings the session's eventfd, a socket
            // that drains becomes writable, and a client closing its end is
            // a hang-up: each wakes this poll, and every session is looked
            // at again. The short cap only bounds a wake-up this loop could
            // not see.
            let _ = self.poll.poll(&mut events, Some((until - now).min(DRAIN_POLL)));
            for event in events.iter() {
                let Token(t) = event.token();
                if t != WAKER.0 && t % 2 == 0 && event.is_read_closed() {
                    if let Some(Conn::Stream(s)) = self.sessions.get_mut(t / 2) {
                        s.hangup_seen = true;
                    }
                }
            }
        }
    }
}
