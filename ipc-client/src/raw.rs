//! Sessions opened by hand, for programs that play a hostile client: the
//! daemon's integration tests and stress's `hostile` scenario. Only with the
//! `raw` feature; not part of the stable API.
//!
//! [`RawSession::connect`] runs the same handshake as [`Client`]: a hello
//! on the control socket, the welcome with the segment's memfd and the
//! doorbells by `SCM_RIGHTS`, the seal, size and header checks, and the
//! mapping. Then, instead of wrapping them in a client, it hands every piece
//! to the caller: the control connection, the fds, the segment's
//! [`SharedWords`] and the client's two ring ends. The caller may write
//! into the segment what the library never would and ring the doorbells at
//! will.
//!
//! [`RawSession::resolve`] does the same for a session the daemon brokers
//! with a provider: a resolve on a broker connection, the answer's fds
//! checked as [`Client`] checks them. The session is then the client's
//! and the provider's alone, and whatever the caller writes into it is the
//! provider's to cope with.
//!
//! Even here no Rust reference is formed over the shared bytes, and every
//! access is atomic at the width the layout gives it: indices and waiter
//! words through [`SharedWords::index`] and [`SharedWords::waiter`], ring
//! data through [`SharedWords::write_data`]. So scribbling is safe code,
//! and sound.
//!
//! [`Client`]: crate::Client

use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

pub use ipc_core::{
    Consumer, Direction, FrameHeader, Index, Producer, PushError, Segment, SegmentLayout, SharedWords, Waiter, Welcome,
};
use ipc_platform::{EventFd, SocketBell};

use ipc_core::control::Resolution;
use ipc_core::PROTOCOL_VERSION;

use crate::broker::{self, Broker, Exchange};
use crate::connect::{granted_layout, greet, hello_bytes, receive_segment, Handover};
use crate::stream::Socket;
use crate::{CallError, ClientOptions, ConnectError, Transport};

/// The framed hello (length prefix and body) a client sends for `options`:
/// for programs that send it in pieces, or only part of it.
pub fn hello(options: &ClientOptions) -> Result<Vec<u8>, ConnectError> {
    hello_bytes(options)
}

/// A shared-memory session opened by hand: the caller holds the same shared
/// memory and doorbells a client would, and can write anything into them.
///
/// Dropping it closes the control connection, which ends the session.
pub struct RawSession {
    /// The control connection; its hang-up ends the session. Reads and
    /// writes on it time out after the options' connect timeout. For a
    /// brokered session, the client's end of the liveness socket pair: it
    /// hangs up when the provider drops the session.
    pub stream: UnixStream,
    /// The daemon's welcome; for a brokered session, the broker's answer
    /// in the same shape (session id, rings, doorbell, the services the
    /// session offers).
    pub welcome: Welcome,
    /// The segment's memfd, kept open to inspect it.
    pub memfd: OwnedFd,
    /// The client-to-daemon doorbell.
    pub bell: EventFd,
    /// The client's end of the daemon-to-client doorbell, with
    /// [`DoorbellKind::Pollable`](crate::DoorbellKind::Pollable).
    pub client_bell: Option<SocketBell>,
    /// The layout the welcome announced.
    pub layout: SegmentLayout,
    /// The segment's shared words: header, indices, waiter words, data.
    pub words: SharedWords,
    /// Our end of the request ring.
    pub requests: Producer,
    /// Our end of the response ring.
    pub responses: Consumer,
}

impl RawSession {
    /// Handshakes with the daemon whose control socket is `socket`, asking
    /// for `options`' ring capacity and doorbell, and maps the segment after
    /// checking its seals, size and header, as [`Client`](crate::Client)
    /// does. The doorbell granted is taken as it comes.
    pub fn connect(socket: impl AsRef<Path>, options: &ClientOptions) -> Result<RawSession, ConnectError> {
        let transport = Transport::Shm(socket.as_ref().to_path_buf());
        let (Socket::Unix(stream), welcome, layout, fds) = greet(&transport, options)? else {
            unreachable!("a control socket is a Unix socket");
        };
        let segment =
            receive_segment(&layout, welcome.doorbell, Handover::Welcome, fds).map_err(ConnectError::Protocol)?;
        let Segment { request_producer: requests, response_consumer: responses, words, .. } =
            Segment::new(segment.region, &layout);
        Ok(RawSession {
            stream,
            welcome,
            memfd: segment.memfd,
            bell: segment.peer_bell,
            client_bell: segment.client_bell,
            layout,
            words,
            requests,
            responses,
        })
    }

    /// Resolves `name` through the broker of the daemon whose control
    /// socket is `socket` (a broker connection of its own, closed once the
    /// answer is in), asking for `options`' ring capacity and doorbell, and
    /// maps the session's segment after the checks [`Client`](crate::Client)
    /// makes of a brokered session. The daemon does not wait for a
    /// provider to register. The errors are those of
    /// [`Client::service`](crate::Client::service).
    pub fn resolve(socket: impl AsRef<Path>, name: &str, options: &ClientOptions) -> Result<RawSession, CallError> {
        let bad = |reason: String| CallError::BadResolution { name: name.to_string(), reason };
        let mut conn = match Broker::open(socket.as_ref(), options) {
            Ok(Some(conn)) => conn,
            Ok(None) => return Err(CallError::UnknownService { name: name.to_string() }),
            Err(e) => return Err(broker::unreachable(name, e)),
        };
        let request = broker::request(name, Duration::ZERO, options);
        let (brokered, fds) = match conn.exchange(&request, options.connect_timeout) {
            Ok((Resolution::Brokered(brokered), fds)) => (brokered, fds),
            Ok((Resolution::Failed(error), _)) => return Err(broker::refused(name, error)),
            Err(Exchange::Lost(reason)) => {
                return Err(CallError::Unavailable {
                    name: name.to_string(),
                    reason: format!("broker connection lost: {reason}"),
                })
            }
            Err(Exchange::Timeout) => {
                let reason = format!("no answer from the daemon within {:?}", options.connect_timeout);
                return Err(CallError::Unavailable { name: name.to_string(), reason });
            }
            Err(Exchange::Protocol(reason)) => return Err(bad(reason)),
        };
        if fds.len() != brokered.fd_count() {
            return Err(bad(format!("the session comes with {} fds, expected {}", fds.len(), brokered.fd_count())));
        }
        let layout = granted_layout(brokered.ring_capacity, brokered.max_payload).map_err(bad)?;
        let mut segment = receive_segment(&layout, brokered.doorbell, Handover::Brokered, fds).map_err(bad)?;
        let stream = segment.liveness.take().expect("a brokered hand-over has a liveness end");
        stream.set_read_timeout(Some(options.connect_timeout)).map_err(|e| bad(format!("liveness socket: {e}")))?;
        stream.set_write_timeout(Some(options.connect_timeout)).map_err(|e| bad(format!("liveness socket: {e}")))?;
        let Segment { request_producer: requests, response_consumer: responses, words, .. } =
            Segment::new(segment.region, &layout);
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            session_id: brokered.session_id,
            ring_capacity: brokered.ring_capacity,
            max_payload: brokered.max_payload,
            doorbell: brokered.doorbell,
            services: brokered.services,
        };
        Ok(RawSession {
            stream,
            welcome,
            memfd: segment.memfd,
            bell: segment.peer_bell,
            client_bell: segment.client_bell,
            layout,
            words,
            requests,
            responses,
        })
    }

    /// The id of the service called `name`, if the daemon offers it (for a
    /// brokered session, if the session offers it).
    pub fn service_id(&self, name: &str) -> Option<u16> {
        self.welcome.services.iter().find(|s| s.name == name).map(|s| s.id)
    }

    /// Rings the daemon's doorbell once.
    pub fn ring(&self) -> io::Result<()> {
        self.bell.notify()
    }

    /// The four 64-bit ring indices: the request ring's head (ours) and
    /// tail (the daemon's), then the response ring's head (the daemon's) and
    /// tail (ours).
    pub fn indices(&self) -> [&AtomicU64; 4] {
        let w = &self.words;
        [
            w.index(Direction::Request, Index::Head),
            w.index(Direction::Request, Index::Tail),
            w.index(Direction::Response, Index::Head),
            w.index(Direction::Response, Index::Tail),
        ]
    }

    /// The four 32-bit waiter words (the futex words): the request ring's
    /// data and space waiters, then the response ring's.
    pub fn waiters(&self) -> [&AtomicU32; 4] {
        let w = &self.words;
        [
            w.waiter(Direction::Request, Waiter::Data),
            w.waiter(Direction::Request, Waiter::Space),
            w.waiter(Direction::Response, Waiter::Data),
            w.waiter(Direction::Response, Waiter::Space),
        ]
    }

    /// Stores `value` into the request ring's producer index, as a client
    /// that scribbles its own control block would.
    pub fn store_request_head(&self, value: u64) {
        self.words.index(Direction::Request, Index::Head).store(value, Ordering::Release);
    }

    /// Stores `value` into the response ring's consumer index.
    pub fn store_response_tail(&self, value: u64) {
        self.words.index(Direction::Response, Index::Tail).store(value, Ordering::Release);
    }

    /// Writes raw bytes at `offset` into the request ring's data.
    ///
    /// # Panics
    ///
    /// Panics if the bytes would end past the ring's data.
    pub fn write_request_data(&self, offset: usize, bytes: &[u8]) {
        self.words.write_data(Direction::Request, offset, bytes);
    }

    /// Whether the daemon has closed the control connection, without
    /// waiting.
    pub fn is_hung_up(&self) -> bool {
        ipc_platform::peer_closed(self.stream.as_fd()).unwrap_or(true)
    }

    /// Waits up to `limit` for the daemon to close the control connection.
    /// Returns whether it did; an error if the daemon sent data instead
    /// (it never does after the handshake) or the read failed.
    pub fn wait_hang_up(&mut self, limit: Duration) -> io::Result<bool> {
        self.stream.set_read_timeout(Some(limit))?;
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => Ok(true),
            Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidData, "the daemon sent data on the control connection")),
            // The daemon's end was closed with our bytes unread in it.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
