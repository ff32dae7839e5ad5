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
//!
//! Calls handed off to deferred or blocking handlers come back as
//! [`Completion`]s on the worker's channel, each followed by a ring of its
//! waker; the worker gives each to its session (found by slot: a closed
//! session's answers are dropped) and schedules the session to send it.
//!
//! A graceful stop answers what waits in the rings with a shutdown error,
//! then drains: for up to a second (at most the stall timeout) it sends
//! what clients are slow to read and waits for the calls handed off. Calls
//! still running at its end are answered with an error. Only then, with
//! every request taken answered, does a segment's `closed` word say which
//! was the last taken. The last worker to stop stops the handler threads.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::engine::Engine;
use ipc_core::Spinner;

use crate::deferred::{Completion, Completions, Event, Slot};
use crate::limits::Lease;
use crate::segment_pool::Retired;
use crate::service::Serving;
use crate::session::{Progress, Scratch, Session};
use crate::stats::{DisconnectReason, Stats};
use crate::stream_session::{Peer, StreamSession};

const WAKER: Token = Token(usize::MAX);
/// Requests served from one session before the worker turns to the next.
const BUDGET: usize = 64;
/// The longest a graceful stop waits for clients to read the answers that
/// did not fit their ring or socket, and for the calls handed off to be
/// answered (at most the stall timeout).
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

/// What hands new sessions to a worker from another thread (an
/// opener's).
pub(crate) struct WorkerLink {
    pub(crate) index: usize,
    tx: Sender<Conn>,
    waker: Arc<Waker>,
}

impl WorkerLink {
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
}

/// A worker's index, for [`least_busy`].
pub(crate) trait Indexed {
    fn index(&self) -> usize;
}

impl Indexed for WorkerLink {
    fn index(&self) -> usize {
        self.index
    }
}

impl Indexed for WorkerHandle {
    fn index(&self) -> usize {
        self.index
    }
}

impl WorkerHandle {
    /// A link that hands sessions to this worker.
    pub(crate) fn link(&self) -> WorkerLink {
        WorkerLink { index: self.index, tx: self.tx.clone(), waker: Arc::clone(&self.waker) }
    }

    /// As [`WorkerLink::adopt`].
    pub(crate) fn adopt(&self, session: Conn) -> io::Result<()> {
        self.link().adopt(session)
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
pub(crate) fn least_busy<'w, W: Indexed>(workers: &'w [W], stats: &Stats) -> &'w W {
    workers
        .iter()
        .min_by_key(|w| stats.workers[w.index()].sessions.load(Ordering::Relaxed))
        .expect("at least one worker")
}

/// Starts the engine's workers, and the handler threads if a service needs
/// them; if one cannot start, stops those already running and returns the
/// error.
pub(crate) fn spawn_all(engine: &Arc<Engine>) -> io::Result<Vec<WorkerHandle>> {
    engine.services.start_pool()?;
    let running = Arc::new(AtomicUsize::new(0));
    let mut workers: Vec<WorkerHandle> = Vec::with_capacity(engine.workers);
    for i in 0..engine.workers {
        match spawn(i, Arc::clone(engine), Arc::clone(&running)) {
            Ok(w) => workers.push(w),
            Err(e) => {
                engine.shutting_down.store(true, Ordering::Release);
                for w in &mut workers {
                    w.wake();
                    w.join();
                }
                if workers.is_empty() {
                    engine.services.stop_pool();
                }
                return Err(e);
            }
        }
    }
    Ok(workers)
}

/// Held by each worker thread while it runs: the last to let go, however
/// it stops, stops the handler threads, whose work answers sessions only
/// workers hold.
struct Running {
    engine: Arc<Engine>,
    count: Arc<AtomicUsize>,
}

impl Running {
    fn enter(engine: Arc<Engine>, count: Arc<AtomicUsize>) -> Running {
        // AcqRel, here and on leaving: the last one out sees every other
        // worker's stop before it stops the threads.
        count.fetch_add(1, Ordering::AcqRel);
        Running { engine, count }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.engine.services.stop_pool();
        }
    }
}

fn spawn(index: usize, engine: Arc<Engine>, running: Arc<AtomicUsize>) -> io::Result<WorkerHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let completions = Completions::new(done_tx, Arc::clone(&waker));
    // Counted before the thread starts, so that no worker can be the last
    // out while another is still starting.
    let running = Running::enter(Arc::clone(&engine), running);
    let thread = std::thread::Builder::new().name(format!("ipcd-worker-{index}")).spawn(move || {
        let _running = running;
        let spinner = Spinner::new(engine.spin);
        let mut worker = Worker {
            index,
            poll,
            rx,
            done: done_rx,
            completions,
            next_serial: 1,
            engine,
            sessions: Slab::new(),
            ready: VecDeque::new(),
            idle: Vec::new(),
            stalls: Vec::new(),
            timed: Vec::new(),
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

    fn slot(&mut self) -> &mut Slot {
        match self {
            Conn::Shm(s) => &mut s.slot,
            Conn::Stream(s) => &mut s.slot,
        }
    }

    fn complete(
        &mut self,
        answer: Completion,
        counters: &crate::stats::WorkerCounters,
        limits: &Arc<crate::limits::Limits>,
    ) -> bool {
        match self {
            Conn::Shm(s) => s.complete(answer, counters, limits),
            Conn::Stream(s) => s.complete(answer, counters, limits),
        }
    }

    fn stream_ready(&mut self, id: u64) {
        match self {
            Conn::Shm(s) => s.stream_ready(id),
            Conn::Stream(s) => s.stream_ready(id),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match self {
            Conn::Shm(s) => s.next_deadline(),
            Conn::Stream(s) => s.next_deadline(),
        }
    }

    fn expire(&mut self, now: Instant) {
        match self {
            Conn::Shm(s) => s.expire(now),
            Conn::Stream(s) => s.expire(now),
        }
    }

    /// Whether a graceful stop still waits for the session: for frames its
    /// client has yet to read (or, on a stream, to close its end), for the
    /// answers of calls handed off, or for its streams' ends.
    fn draining(&self) -> bool {
        match self {
            Conn::Shm(s) => s.has_output() || s.has_calls(),
            Conn::Stream(s) => s.has_output(),
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        match self {
            Conn::Shm(s) => s.flush(),
            Conn::Stream(s) => s.flush(),
        }
    }
}

struct Worker {
    index: usize,
    poll: Poll,
    rx: Receiver<Conn>,
    /// The answers of calls handed off, and streams' notices, from any
    /// thread.
    done: Receiver<Event>,
    /// The sending end of `done`, with this worker's waker, for
    /// responders.
    completions: Completions,
    /// The serial of the next session adopted: no two sessions of this
    /// worker share one, though they may share a slab key.
    next_serial: u64,
    engine: Arc<Engine>,
    sessions: Slab<Conn>,
    ready: VecDeque<usize>,
    /// Shared-memory sessions whose ring ran empty and whose client was not
    /// told to ring: watched by spinning, parked before the worker sleeps.
    idle: Vec<usize>,
    /// Sessions stalled on replies their client does not read (those whose
    /// `stalled_since` is set).
    stalls: Vec<usize>,
    /// Sessions with a stream that has a deadline.
    timed: Vec<usize>,
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
            let timeout = if sleep { self.until_first_timer() } else { Some(Duration::ZERO) };
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
                    // New sessions, or answers of calls handed off.
                    WAKER => {
                        self.adopt_sessions();
                        self.take_completions();
                    }
                    // A doorbell (its eventfd is never read: the client
                    // shares its open file and could make a read block), or
                    // a stream socket that can be read or written.
                    Token(t) if t % 2 == 0 => {
                        if let Some(Conn::Stream(s)) = self.sessions.get_mut(t / 2) {
                            if event.is_read_closed() {
                                s.hangup_seen = true;
                            }
                            if event.is_write_closed() {
                                s.hung_up();
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
            if !self.timed.is_empty() {
                self.expire_deadlines();
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
            *conn.slot() = Slot { key, serial: self.next_serial };
            self.next_serial += 1;
            if let Err(e) = registered {
                tracing::error!(session = conn.id(), "cannot register session: {e}");
                self.engine.stats.connected.fetch_sub(1, Ordering::Relaxed);
                self.engine.stats.disconnected(DisconnectReason::IoError);
                let id = conn.id();
                drop(conn);
                self.engine.events.closed(id);
                continue;
            }
            self.engine.stats.workers[self.index].sessions.fetch_add(1, Ordering::Relaxed);
            entry.insert(conn);
            // The client may have sent requests before we registered it;
            // look once, then the doorbell or socket takes over.
            self.schedule(key);
        }
    }

    /// Gives the answers of handed-off calls to their sessions, and
    /// schedules those to send them. An answer for a session that has
    /// closed (its slot's key empty, or another session's now) is dropped.
    fn take_completions(&mut self) {
        let (mut replies, mut errors) = (0, 0);
        while let Ok(event) = self.done.try_recv() {
            let slot = match &event {
                Event::Answer(answer) => answer.slot,
                Event::Stream { slot, .. } => *slot,
            };
            let key = slot.key;
            let Some(conn) = self.sessions.get_mut(key) else { continue };
            if *conn.slot() != slot {
                continue;
            }
            match event {
                Event::Answer(answer) => {
                    let error = answer.flags != 0;
                    if !conn.complete(answer, &self.engine.stats.workers[self.index], &self.engine.limits) {
                        continue;
                    }
                    replies += 1;
                    errors += u64::from(error);
                }
                Event::Stream { id, .. } => conn.stream_ready(id),
            }
            let queued = conn.queued();
            if !*queued {
                *queued = true;
                self.ready.push_back(key);
            }
        }
        if replies > 0 {
            self.engine.stats.workers[self.index].add(0, replies, errors);
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
            let with = Serving {
                services: &self.engine.services,
                counters: &self.engine.stats.workers[self.index],
                completions: &self.completions,
                limits: &self.engine.limits,
                max_message: self.engine.max_message,
                // Read per session, not per pass: a stop signalled while a
                // handler of this pass ran (an inline one can take seconds)
                // must keep the sessions after it from starting new calls.
                shutting_down: self.engine.shutting_down.load(Ordering::Acquire),
            };
            let was_stalled = conn.stalled_since().is_some();
            let progress = match conn {
                Conn::Shm(s) => s.serve(&with, &mut self.scratch, BUDGET, !spin),
                Conn::Stream(s) => s.serve(&with, &mut self.scratch, BUDGET),
            };
            // Only a serve begins or ends a stall.
            match (was_stalled, conn.stalled_since().is_some()) {
                (false, true) => self.stalls.push(key),
                (true, false) => self.stalls.retain(|&k| k != key),
                _ => {}
            }
            // Only a serve opens a stream; the timer list drops a session
            // once it has no deadline left.
            if conn.next_deadline().is_some() && !self.timed.contains(&key) {
                self.timed.push(key);
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
                // A session waiting for the answers of its calls is
                // scheduled by the first to come.
                Ok(Progress::Parked) | Ok(Progress::Stalled) | Ok(Progress::Waiting) => {}
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

    /// How long the worker may sleep: until the earliest stall timeout or
    /// stream deadline, or for good when there is neither.
    fn until_first_timer(&self) -> Option<Duration> {
        let first = self.stalls.iter().filter_map(|&k| self.sessions.get(k)?.stalled_since()).min();
        // A timeout too far to represent never expires.
        let stall = first.and_then(|first| first.checked_add(self.engine.stall_timeout.get()));
        let deadline = self.timed.iter().filter_map(|&k| self.sessions.get(k)?.next_deadline()).min();
        let at = stall.into_iter().chain(deadline).min()?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// Cuts the streams whose deadline has passed (their terminal frames
    /// go out at the session's next serve), and forgets the sessions that
    /// have no deadline left.
    fn expire_deadlines(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.timed.len() {
            let key = self.timed[i];
            let Some(conn) = self.sessions.get_mut(key) else {
                self.timed.swap_remove(i);
                continue;
            };
            match conn.next_deadline() {
                None => {
                    self.timed.swap_remove(i);
                    continue;
                }
                Some(at) if at <= now => {
                    conn.expire(now);
                    self.schedule(key);
                }
                Some(_) => {}
            }
            i += 1;
        }
    }

    /// Closes the sessions stalled for longer than the stall timeout.
    fn expire_stalls(&mut self) {
        let limit = self.engine.stall_timeout.get();
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
        // Its key may not outlive it in the lists: the slab hands keys out
        // again.
        self.stalls.retain(|&k| k != key);
        self.timed.retain(|&k| k != key);
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
        // The segment's mapping, with the memory it is charged, goes to be
        // unmapped off this thread (where the daemon has a segment pool);
        // the uid's slot is given back with the session.
        let retired = match (&mut conn, self.engine.retirer.get()) {
            (Conn::Shm(s), Some(retirer)) => s.mapping.take().map(|mapping| {
                let charge = s.lease.as_mut().map(Lease::take_memory);
                (retirer, Retired::new(mapping, charge))
            }),
            _ => None,
        };
        // Dropping the session closes its fds (and, unless retired, unmaps
        // its segment); the client sees its connection hang up. Only then
        // is the owner told.
        drop(conn);
        if let Some((retirer, retired)) = retired {
            retirer.retire(retired);
        }
        self.engine.events.closed(id);
    }

    fn close_all(&mut self, reason: DisconnectReason) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    /// Answers every request still waiting with a shutdown error, waits
    /// (within the drain) for the calls handed off, answers those still
    /// running with an error, then closes every session.
    fn shut_down(&mut self) {
        self.adopt_sessions();
        self.take_completions();
        let with = Serving {
            services: &self.engine.services,
            counters: &self.engine.stats.workers[self.index],
            completions: &self.completions,
            limits: &self.engine.limits,
            max_message: self.engine.max_message,
            shutting_down: true,
        };
        for (_, conn) in self.sessions.iter_mut() {
            // One pass answers what is waiting. It ends: the ring never lets
            // a pass read more than one ring's worth before releasing, a
            // full response ring stalls it, and a stream session reads at
            // most its buffer's worth.
            //
            // After that pass nothing more is taken from the session: each
            // kind tells its client the last request taken (segment word or
            // closing frame, the frame after the answers of the calls
            // outstanding), so it fails the rest as `Shutdown` (not
            // executed) rather than with an unknown outcome.
            //
            // Before that pass, its open streams are cut (their handlers'
            // sends fail; their terminal frames, `Shutdown`, go out in the
            // drain, before the closed word) and its requests being received
            // are answered: nothing more of them will be read.
            let result = match conn {
                Conn::Shm(s) => {
                    s.begin_stop();
                    s.serve(&with, &mut self.scratch, usize::MAX, true)
                }
                Conn::Stream(s) => {
                    s.begin_stop();
                    let r = s.serve(&with, &mut self.scratch, usize::MAX);
                    s.close_on_purpose();
                    r
                }
            };
            if let Err(reason) = result {
                tracing::debug!(session = conn.id(), "while shutting down: {reason}");
            }
        }
        self.drain(Instant::now() + SHUTDOWN_DRAIN.min(self.engine.stall_timeout.get()));
        // Calls still running are answered now, with an error that says
        // their outcome is unknown, and sent as far as there is room: a
        // request taken is answered before the segment says it was taken.
        for (_, conn) in self.sessions.iter_mut() {
            match conn {
                Conn::Shm(s) if s.has_calls() => s.give_up_calls(),
                Conn::Stream(s) if s.has_calls() => s.give_up_calls(),
                _ => continue,
            }
            tracing::warn!(session = conn.id(), "stopping with calls still running; answered as unfinished");
            if let Err(reason) = conn.flush() {
                tracing::debug!(session = conn.id(), "while giving up: {reason}");
            }
        }
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
    /// is out or `until`: answers that did not fit a full response ring,
    /// stream output with its closing frame, and the answers of calls
    /// handed off as they come. A client that reads nothing, or a handler
    /// that takes its time, delays the stop by no more than that.
    fn drain(&mut self, until: Instant) {
        let mut events = Events::with_capacity(64);
        loop {
            self.take_completions();
            let mut waiting = false;
            for (_, conn) in self.sessions.iter_mut() {
                if !conn.draining() {
                    continue;
                }
                if let Err(reason) = conn.flush() {
                    tracing::debug!(session = conn.id(), "while draining: {reason}");
                    continue;
                }
                waiting |= conn.draining();
            }
            let now = Instant::now();
            if !waiting || now >= until {
                return;
            }
            // A client freeing space rings the session's eventfd, a socket
            // that drains becomes writable, a client closing its end is a
            // hang-up, and an answer rings the waker: each wakes this poll,
            // and every session is looked at again. The short cap only
            // bounds a wake-up this loop could not see.
            let _ = self.poll.poll(&mut events, Some((until - now).min(DRAIN_POLL)));
            for event in events.iter() {
                let Token(t) = event.token();
                if t != WAKER.0 && t % 2 == 0 {
                    if let Some(Conn::Stream(s)) = self.sessions.get_mut(t / 2) {
                        if event.is_read_closed() {
                            s.hangup_seen = true;
                        }
                        if event.is_write_closed() {
                            s.hung_up();
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::ServiceTable;
    use crate::{session, stream_session};

    /// The drain's rule: a session keeps a graceful stop waiting while a
    /// call it handed off is unanswered, and while the answer waits to go
    /// out; not after.
    #[test]
    fn a_stop_waits_for_the_calls_a_session_handed_off() {
        let mut services = ServiceTable::default();
        let (handler, handed) = session::tests::deferred();
        services.add("later".into(), handler).unwrap();
        let mut rig = session::tests::Rig::new(services);
        let (mut session, mut tx, mut rx) = session::tests::new_session();
        tx.try_push(0, 0, 1, b"").unwrap();
        tx.publish();
        session::tests::ShmRig::serve(&mut rig, &mut session);
        let mut conn = Conn::Shm(session);
        assert!(conn.draining(), "a call outstanding keeps the drain going");
        let (_, responder) = handed.try_recv().unwrap();
        responder.reply(b"done".to_vec());
        assert!(conn.complete(rig.answer(), &crate::stats::WorkerCounters::default(), &rig.limits()));
        assert!(conn.draining(), "an answer not yet sent keeps the drain going");
        conn.flush().unwrap();
        assert!(!conn.draining());
        let mut body = Vec::new();
        assert_eq!(rx.try_pop(&mut body).unwrap().map(|h| h.request_id), Some(1));

        let (services, handed) = stream_session::tests::with_deferred();
        let mut rig = stream_session::tests::Rig::new(services);
        let (mut session, mut client) = stream_session::tests::pair();
        std::io::Write::write_all(&mut client, &stream_session::tests::request(1, 1)).unwrap();
        stream_session::tests::StreamRig::serve(&mut rig, &mut session, 64).unwrap();
        let mut conn = Conn::Stream(session);
        assert!(conn.draining(), "a call outstanding keeps the drain going");
        let (_, responder) = handed.try_recv().unwrap();
        responder.reply(b"done".to_vec());
        assert!(conn.complete(rig.answer(), &crate::stats::WorkerCounters::default(), &rig.limits()));
        conn.flush().unwrap();
        assert!(!conn.draining());
    }
}
