//! Openers: the threads that open the sessions the acceptor admitted.
//!
//! The acceptor judges every handshake (its bytes, the peer's credentials,
//! the limits) on its one thread, and that is cheap; what costs is making
//! a session's segment (memfd, allocation, seals, mapping). A session that
//! needs one made runs on a few opener threads (one per usable core, at
//! most [`MAX_OPENERS`]), so that clients connecting together are welcomed
//! side by side instead of one after another behind the acceptor. A
//! session that needs none (a stream, or one with a segment from the
//! [`crate::segment_pool`]) is opened on the acceptor's thread at once
//! ([`Openers::open_here`]): handing it over would cost more than it saves.
//!
//! An admitted handshake reaches an opener with its lease on the limits
//! already taken and its place among the connected clients already
//! counted: nothing an opener does changes who is admitted. A session that
//! cannot be opened is answered with a reject and gives both back.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use ipc_core::handshake;
use ipc_core::{Hello, Reject, Segment, SegmentLayout, ServerMessage, Welcome, PROTOCOL_VERSION};

use crate::acceptor::{Kind, Pending};
use crate::introspect::Transport;
use crate::limits::Lease;
use crate::roster::Entry;
use crate::segment::NewSegment;
use crate::session::{ClientWake, Session};
use crate::shared::Shared;
use crate::stats::RejectReason;
use crate::stream_session::{Peer, Stream, StreamSession};
use crate::worker::{self, Conn, WorkerLink};

/// The most opener threads.
pub(crate) const MAX_OPENERS: usize = 4;

/// A handshake the acceptor admitted, to be opened.
pub(crate) struct Admitted {
    pub(crate) id: u64,
    pub(crate) pending: Pending,
    pub(crate) hello: Hello,
    /// The fitted ring capacity.
    pub(crate) capacity: u32,
    pub(crate) lease: Lease,
    /// A ready segment of that capacity, if the pool had one (its charge
    /// passed to the lease).
    pub(crate) pooled: Option<NewSegment>,
}

/// The opener threads, fed by the acceptor.
pub(crate) struct Openers {
    tx: Option<Sender<Admitted>>,
    threads: Vec<JoinHandle<()>>,
    /// What opens sessions on the acceptor's thread.
    here: Opener,
}

impl Openers {
    /// Starts `n` openers (at least one) that hand the sessions they open
    /// to `workers`.
    pub(crate) fn start(n: usize, shared: &Arc<Shared>, workers: Vec<WorkerLink>) -> io::Result<Openers> {
        let (tx, rx) = channel::<Admitted>();
        let rx = Arc::new(Mutex::new(rx));
        let workers: Arc<[WorkerLink]> = workers.into();
        let here = Opener { shared: Arc::clone(shared), workers: Arc::clone(&workers) };
        let mut openers = Openers { tx: Some(tx), threads: Vec::new(), here };
        for i in 0..n.max(1) {
            let opener = Opener { shared: Arc::clone(shared), workers: Arc::clone(&workers) };
            let rx = Arc::clone(&rx);
            let thread = std::thread::Builder::new().name(format!("ipcd-opener-{i}")).spawn(move || opener.run(&rx));
            match thread {
                Ok(t) => openers.threads.push(t),
                Err(e) => {
                    openers.stop();
                    return Err(e);
                }
            }
        }
        Ok(openers)
    }

    /// Queues an admitted handshake for the next free opener; hands it
    /// back if no opener is left.
    pub(crate) fn open(&self, admitted: Admitted) -> Result<(), Box<Admitted>> {
        match &self.tx {
            Some(tx) => tx.send(admitted).map_err(|lost| Box::new(lost.0)),
            None => Err(Box::new(admitted)),
        }
    }

    /// Opens an admitted handshake on this thread (one that needs no
    /// segment made).
    pub(crate) fn open_here(&self, admitted: Admitted) {
        self.here.open(admitted);
    }

    /// Lets the openers finish what is queued, then waits for them.
    pub(crate) fn stop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("opener thread panicked");
            }
        }
    }
}

impl Drop for Openers {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Opener {
    shared: Arc<Shared>,
    workers: Arc<[WorkerLink]>,
}

impl Opener {
    fn run(&self, rx: &Mutex<Receiver<Admitted>>) {
        loop {
            // One opener waits on the queue at a time; the others wait for
            // the lock, and the first to get it takes the next handshake.
            let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok(admitted) = next else { return };
            self.open(admitted);
        }
    }

    /// Opens the session, welcomes its client and hands it to a worker;
    /// or answers why not, giving back what the acceptor counted.
    fn open(&self, admitted: Admitted) {
        let Admitted { id, pending, hello, capacity, lease, pooled } = admitted;
        let stats = &self.shared.engine.stats;
        let (transport, address) = match (pending.kind, pending.peer) {
            (Kind::Shm, _) => (Transport::Shm, None),
            (Kind::Stream, Peer::Unix(_)) => (Transport::Uds, None),
            (Kind::Stream, Peer::Tcp(addr)) => (Transport::Tcp, Some(addr)),
        };
        let caller = match pending.peer {
            Peer::Unix(cred) => Some(cred.into()),
            Peer::Tcp(_) => None,
        };
        let conn = match pending.kind {
            Kind::Shm => self.open_shm(id, pending, &hello, capacity, pooled),
            Kind::Stream => self.open_stream(id, pending, &hello, capacity),
        };
        // A session that could not be opened gives its lease and its place
        // back here.
        let Some(mut conn) = conn else {
            stats.connected.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        conn.hold(lease);
        stats.accepted();
        let worker = worker::least_busy(&self.workers, stats);
        tracing::debug!(session = id, worker = worker.index, "session opened");
        let calls = match &conn {
            Conn::Shm(s) => Arc::clone(&s.context().calls),
            Conn::Stream(s) => Arc::clone(&s.context().calls),
        };
        let max_payload = SegmentLayout::new(capacity).map_or(0, |l| l.max_payload());
        // In the roster before its worker has it, so that the worker's
        // closing of it always finds it there to take out.
        self.shared.roster.insert(
            id,
            Entry {
                transport,
                caller,
                address,
                ring_size: (transport == Transport::Shm).then_some(capacity),
                max_payload,
                opened: Instant::now(),
                worker: Some(worker.index),
                calls: Some(calls),
                service: None,
                provider: None,
            },
        );
        if let Err(e) = worker.adopt(conn) {
            tracing::error!(session = id, "cannot hand the session to a worker: {e}");
            stats.connected.fetch_sub(1, Ordering::Relaxed);
            self.shared.roster.remove(id);
        }
    }

    fn open_shm(
        &self,
        id: u64,
        pending: Pending,
        hello: &Hello,
        capacity: u32,
        pooled: Option<NewSegment>,
    ) -> Option<Conn> {
        let (parts, mapping) = match self.create_session(id, &pending, hello, capacity, pooled) {
            Ok(parts) => parts,
            Err(e) => {
                tracing::error!("cannot create a session: {e}");
                let reason = e.to_string();
                pending.refuse(
                    &self.shared.engine.stats,
                    Reject::ResourceExhausted { reason },
                    RejectReason::Resources,
                );
                return None;
            }
        };
        let (bell, wake, requests, responses, words) = parts;
        let (Stream::Unix(control), Peer::Unix(peer)) = (pending.stream, pending.peer) else {
            unreachable!("the control socket is a Unix socket");
        };
        tracing::debug!(session = id, pid = peer.pid, uid = peer.uid, "shared-memory session");
        let mut session = Session::new(id, peer, control, bell, wake, requests, responses, words);
        session.mapping = Some(mapping);
        Some(Conn::Shm(session))
    }

    /// Answers a stream client's hello: a welcome without fds, after which
    /// the connection carries frames.
    fn open_stream(&self, id: u64, mut pending: Pending, hello: &Hello, capacity: u32) -> Option<Conn> {
        let max_payload = SegmentLayout::new(capacity).map(|l| l.max_payload()).unwrap_or(0);
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            session_id: id,
            ring_capacity: capacity,
            max_payload,
            doorbell: hello.doorbell,
            services: self.shared.engine.services.directory(),
        };
        let sent = handshake::encode(&ServerMessage::Welcome(welcome)).map_err(io::Error::other).and_then(|bytes| {
            // A fresh connection's send buffer takes a welcome whole.
            match pending.stream.write(&bytes)? {
                n if n == bytes.len() => Ok(()),
                n => Err(io::Error::other(format!("welcome cut short: {n} of {} bytes sent", bytes.len()))),
            }
        });
        if let Err(e) = sent {
            tracing::warn!(peer = %pending.peer, "cannot welcome a stream client: {e}");
            self.shared.engine.stats.rejected(RejectReason::HungUp);
            return None;
        }
        tracing::debug!(session = id, peer = %pending.peer, "stream session");
        Some(Conn::Stream(StreamSession::new(id, pending.peer, pending.stream, max_payload as usize)))
    }

    /// Makes the segment and doorbells (or completes a pooled segment's)
    /// and sends the welcome with their fds. Returns the daemon's ends and
    /// a hold on its mapping, which the session keeps so that its closing
    /// worker can have the mapping unmapped elsewhere.
    fn create_session(
        &self,
        id: u64,
        pending: &Pending,
        hello: &Hello,
        capacity: u32,
        pooled: Option<NewSegment>,
    ) -> io::Result<(crate::acceptor::SessionParts, ipc_core::Retained)> {
        let NewSegment { layout, memfd, region, bell, wake: client_bell } = match pooled {
            Some(segment) => segment.with_doorbell(hello.doorbell)?,
            None => NewSegment::create(capacity, hello.doorbell)?,
        };
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            session_id: id,
            ring_capacity: capacity,
            max_payload: layout.max_payload(),
            doorbell: hello.doorbell,
            services: self.shared.engine.services.directory(),
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
        let mapping = region.retain();
        // The daemon's ends: it reads requests and writes replies.
        let Segment { request_consumer, response_producer, words, .. } = Segment::new(region, &layout);
        Ok(((bell, wake, request_consumer, response_producer, words), mapping))
    }
}
