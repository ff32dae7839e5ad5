//! A worker thread: one mio poll over its share of the sessions.
//!
//! A session's request doorbell (an eventfd, watched but never read) and
//! its control socket are registered in the poll. A doorbell puts the session in the ready queue; the worker
//! serves every ready session in turn, a bounded batch each, until all of
//! them are parked (request ring empty, client told to ring) or stalled
//! (response ring full, client told to ring once it frees space), and only
//! then sleeps in `epoll_wait`. While clients keep their rings busy the
//! worker makes no system call per message.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::server::Shared;
use crate::session::{Progress, Scratch, Session};
use crate::stats::DisconnectReason;

const WAKER: Token = Token(usize::MAX);
/// Requests served from one session before the worker turns to the next.
const BUDGET: usize = 64;

/// The acceptor's side of a worker.
pub(crate) struct WorkerHandle {
    pub(crate) index: usize,
    tx: Sender<Session>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Hands a new session to the worker.
    /// Hands a new session to the worker. An error means the worker did not
    /// get it (the session is dropped); a failed wake-up only delays it to
    /// the worker's next event, so it is logged, not returned.
    pub(crate) fn adopt(&self, session: Session) -> io::Result<()> {
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

    /// Waits for the worker thread to finish.
    pub(crate) fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(worker = self.index, "worker thread panicked");
            }
        }
    }
}

pub(crate) fn spawn(index: usize, shared: Arc<Shared>) -> io::Result<WorkerHandle> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(format!("ipcd-worker-{index}")).spawn(move || {
        let mut worker = Worker {
            index,
            poll,
            rx,
            shared,
            sessions: Slab::new(),
            ready: VecDeque::new(),
            scratch: Scratch::default(),
        };
        worker.run();
    })?;
    Ok(WorkerHandle { index, tx, waker, thread: Some(thread) })
}

struct Worker {
    index: usize,
    poll: Poll,
    rx: Receiver<Session>,
    shared: Arc<Shared>,
    sessions: Slab<Session>,
    ready: VecDeque<usize>,
    scratch: Scratch,
}

fn bell_token(key: usize) -> Token {
    Token(key * 2)
}

fn control_token(key: usize) -> Token {
    Token(key * 2 + 1)
}

impl Worker {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.ready.is_empty() { None } else { Some(Duration::ZERO) };
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
                    // A doorbell. Its eventfd is never read: the client
                    // shares its open file and could make a read block.
                    Token(t) if t % 2 == 0 => self.schedule(t / 2),
                    Token(t) => self.control_event(t / 2, event.is_read_closed() || event.is_error()),
                }
            }
            if self.shared.shutting_down.load(Ordering::Acquire) {
                self.shut_down();
                return;
            }
            self.serve_ready();
        }
    }

    fn schedule(&mut self, key: usize) {
        if let Some(session) = self.sessions.get_mut(key) {
            if !session.queued {
                session.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    fn adopt_sessions(&mut self) {
        while let Ok(mut session) = self.rx.try_recv() {
            let entry = self.sessions.vacant_entry();
            let key = entry.key();
            let registry = self.poll.registry();
            let registered = registry.register(&mut session.bell, bell_token(key), Interest::READABLE).and_then(|()| {
                registry.register(&mut session.control, control_token(key), Interest::READABLE).inspect_err(|_| {
                    // The client keeps the eventfd open, so a stale
                    // registration would outlive our fd: remove it.
                    let _ = registry.deregister(&mut session.bell);
                })
            });
            if let Err(e) = registered {
                tracing::error!(session = session.id, "cannot register session: {e}");
                self.shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
                self.shared.stats.disconnected(DisconnectReason::IoError);
                continue;
            }
            self.shared.stats.workers[self.index].sessions.fetch_add(1, Ordering::Relaxed);
            entry.insert(session);
            // The client may have sent requests before we registered its
            // doorbell; look once, then it parks and the doorbell takes over.
            self.schedule(key);
        }
    }

    /// Something happened on a control connection: after the handshake the
    /// client sends nothing, so this is a hang-up or a violation.
    fn control_event(&mut self, key: usize, closed: bool) {
        let Some(session) = self.sessions.get(key) else {
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
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            session.queued = false;
            let counters = &self.shared.stats.workers[self.index];
            match session.serve(&self.shared.services, counters, &mut self.scratch, BUDGET, false) {
                Ok(Progress::Busy) => self.schedule(key),
                Ok(Progress::Parked) | Ok(Progress::Stalled) => {}
                Err(reason) => {
                    tracing::warn!(
                        session = session.id,
                        pid = session.peer.pid,
                        uid = session.peer.uid,
                        "protocol violation: {reason}; disconnecting"
                    );
                    self.close(key, DisconnectReason::ProtocolViolation);
                }
            }
        }
    }

    fn close(&mut self, key: usize, reason: DisconnectReason) {
        let Some(mut session) = self.sessions.try_remove(key) else {
            return;
        };
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut session.bell);
        let _ = registry.deregister(&mut session.control);
        self.shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        self.shared.stats.workers[self.index].sessions.fetch_sub(1, Ordering::Relaxed);
        self.shared.stats.disconnected(reason);
        tracing::debug!(session = session.id, reason = reason.name(), "session closed");
        // Dropping the session unmaps its segment and closes its fds; the
        // client sees its control connection hang up.
    }

    fn close_all(&mut self, reason: DisconnectReason) {
        let keys: Vec<usize> = self.sessions.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, reason);
        }
    }

    /// Answers every request still in a ring with a shutdown error, then
    /// closes every session.
    fn shut_down(&mut self) {
        self.adopt_sessions();
        let counters = &self.shared.stats.workers[self.index];
        for (_, session) in self.sessions.iter_mut() {
            // One pass answers what is in the request ring. It ends: the
            // ring never lets a pass read more than one ring's worth before
            // releasing, and a full response ring stalls it.
            if let Err(reason) = session.serve(&self.shared.services, counters, &mut self.scratch, usize::MAX, true) {
                tracing::debug!(session = session.id, "while shutting down: {reason}");
            }
        }
        self.close_all(DisconnectReason::Shutdown);
    }
}
