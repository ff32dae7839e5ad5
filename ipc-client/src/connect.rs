//! Opening links: the handshake with the daemon over each transport, the
//! framed messages of the control socket, and the checks and mapping of a
//! shared-memory segment, whoever hands it over (the daemon's welcome, or
//! a session the daemon brokered with a provider).

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipc_core::handshake::{self, LENGTH_PREFIX, MAX_CONTROL_MESSAGE};
use ipc_core::{
    DoorbellKind, Hello, Region, Reject, Segment as Rings, SegmentLayout, ServerMessage, Welcome, PROTOCOL_VERSION,
};
use ipc_platform::{EventFd, Mapping, SocketBell};

use crate::error::ConnectError;
use crate::link::Link;
use crate::options::{ClientOptions, Transport};
use crate::shm::{Bell, Peer, ShmLink};
use crate::stream::{Socket, StreamLink};
use crate::trust;

/// The longest timeout honoured: deadlines never overflow.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Connects and handshakes: the link and the daemon's welcome.
pub(crate) fn open(transport: &Transport, options: &ClientOptions) -> Result<(Link, Welcome), ConnectError> {
    let (socket, welcome, layout, fds) = greet(transport, options)?;
    let protocol = |m: String| ConnectError::Protocol(m);
    let link = match socket {
        Socket::Unix(control) if matches!(transport, Transport::Shm(_)) => {
            control.set_read_timeout(None)?;
            control.set_write_timeout(None)?;
            if welcome.doorbell != options.doorbell {
                return Err(protocol(format!(
                    "asked for a {:?} doorbell, got {:?}",
                    options.doorbell, welcome.doorbell
                )));
            }
            let segment = receive_segment(&layout, welcome.doorbell, Handover::Welcome, fds).map_err(protocol)?;
            Link::Shm(shm_link(control, segment, &layout, Peer::Daemon))
        }
        socket => {
            if !fds.is_empty() {
                return Err(protocol(format!("a stream welcome carries {} fds", fds.len())));
            }
            socket.set_write_timeout(None)?;
            Link::Stream(StreamLink::new(socket, welcome.max_payload as usize))
        }
    };
    Ok((link, welcome))
}

/// Connects, checks that the daemon may be trusted (see `trust`), sends
/// a session's hello and checks the answer, all within the connect
/// timeout: the connection (its read and write timeouts still set to what
/// was left of it), the welcome, the layout it announces, and the fds that
/// came with it.
pub(crate) fn greet(
    transport: &Transport,
    options: &ClientOptions,
) -> Result<(Socket, Welcome, SegmentLayout, Vec<OwnedFd>), ConnectError> {
    let budget = Budget::start(options.connect_timeout);
    let hello = Hello::new(options.ring_capacity, options.doorbell);
    let (socket, message, fds) = say_hello(transport, &hello, &budget)?;
    let (welcome, layout) = accept_welcome(message)?;
    Ok((socket, welcome, layout, fds))
}

/// Connects to the daemon (checking that it may be trusted before
/// anything is sent), sends `hello`, and reads the answer, within
/// `budget`.
pub(crate) fn say_hello(
    transport: &Transport,
    hello: &Hello,
    budget: &Budget,
) -> Result<(Socket, ServerMessage, Vec<OwnedFd>), ConnectError> {
    let socket = match transport {
        Transport::Shm(path) | Transport::Uds(path) => {
            trust::check_directory(path)?;
            let unix = ipc_platform::connect_unix(path, budget.limit)
                .map_err(|e| connect_failed(path.display().to_string(), e, budget.limit))?;
            // Before the hello: nothing goes to a daemon not trusted.
            trust::check_daemon(&unix, path)?;
            Socket::Unix(unix)
        }
        Transport::Tcp(addr) => {
            let tcp = TcpStream::connect_timeout(addr, budget.left()?)
                .map_err(|e| connect_failed(addr.to_string(), e, budget.limit))?;
            tcp.set_nodelay(true)?;
            Socket::Tcp(tcp)
        }
    };
    socket.set_write_timeout(Some(budget.left()?))?;
    let hello = handshake::encode(hello).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    match &socket {
        Socket::Unix(s) => (&*s).write_all(&hello),
        Socket::Tcp(s) => (&*s).write_all(&hello),
    }
    .map_err(|e| timeout_or(e, budget.limit))?;
    let (body, fds) = read_message(socket.as_fd(), budget).map_err(|e| e.in_handshake(budget.limit))?;
    let message = handshake::decode_server_message(&body).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    Ok((socket, message, fds))
}

/// A time limit spent across the steps of connecting (or of one exchange
/// on the broker connection).
pub(crate) struct Budget {
    pub(crate) limit: Duration,
    started: Instant,
}

impl Budget {
    pub(crate) fn start(limit: Duration) -> Budget {
        Budget { limit: limit.min(MAX_TIMEOUT), started: Instant::now() }
    }

    /// What is left of it, or the timeout error once nothing is.
    pub(crate) fn left(&self) -> Result<Duration, ConnectError> {
        self.remaining().ok_or(ConnectError::Timeout { after: self.limit })
    }

    fn remaining(&self) -> Option<Duration> {
        Some(self.limit.saturating_sub(self.started.elapsed())).filter(|left| !left.is_zero())
    }
}

/// How a failed connect to `target` reads: nothing listens there, nothing
/// accepted within `limit`, or another I/O error.
fn connect_failed(target: String, source: io::Error, limit: Duration) -> ConnectError {
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ConnectError::NotRunning { path: PathBuf::from(target), source }
        }
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ConnectError::Timeout { after: limit },
        _ => ConnectError::Io(source),
    }
}

/// The hello asking for `options`' ring capacity and doorbell, framed.
#[cfg(feature = "raw")]
pub(crate) fn hello_bytes(options: &ClientOptions) -> Result<Vec<u8>, ConnectError> {
    handshake::encode(&Hello::new(options.ring_capacity, options.doorbell))
        .map_err(|e| ConnectError::Protocol(e.to_string()))
}

/// Checks the daemon's answer to the hello: a welcome of this protocol
/// version whose largest payload matches its ring capacity. Returns it with
/// the layout it announces.
fn accept_welcome(message: ServerMessage) -> Result<(Welcome, SegmentLayout), ConnectError> {
    let welcome = match message {
        ServerMessage::Welcome(w) => w,
        ServerMessage::Reject(Reject::VersionMismatch { daemon, client }) => {
            return Err(ConnectError::VersionMismatch { daemon, client })
        }
        ServerMessage::Reject(r) => return Err(ConnectError::Rejected(r)),
        ServerMessage::Accepted { .. } => {
            return Err(ConnectError::Protocol("the daemon answered a session's hello as a broker connection".into()))
        }
    };
    if welcome.version != PROTOCOL_VERSION {
        return Err(ConnectError::VersionMismatch { daemon: welcome.version, client: PROTOCOL_VERSION });
    }
    let layout = granted_layout(welcome.ring_capacity, welcome.max_payload).map_err(ConnectError::Protocol)?;
    Ok((welcome, layout))
}

/// The layout of a segment granted with rings of `ring_capacity` bytes and
/// payloads of at most `max_payload`, which must match it.
pub(crate) fn granted_layout(ring_capacity: u32, max_payload: u32) -> Result<SegmentLayout, String> {
    let layout = SegmentLayout::new(ring_capacity).map_err(|e| e.to_string())?;
    if max_payload != layout.max_payload() {
        return Err(format!("maximum payload {max_payload} does not match ring capacity {ring_capacity}"));
    }
    Ok(layout)
}

/// Who handed a segment over, which says which fds come with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Handover {
    /// The daemon's welcome: memfd, eventfd, [doorbell end].
    Welcome,
    /// A brokered session: memfd, eventfd, liveness end, [doorbell end].
    Brokered,
}

/// What a segment's hand-over gives, checked and mapped.
pub(crate) struct Segment {
    /// The segment's memfd (the mapping does not need it).
    pub(crate) memfd: OwnedFd,
    /// The mapped segment.
    pub(crate) region: Region,
    /// The client-to-peer doorbell.
    pub(crate) peer_bell: EventFd,
    /// With a brokered session, the client's end of the liveness socket
    /// pair: its hang-up means the provider is gone.
    pub(crate) liveness: Option<UnixStream>,
    /// The client's end of the peer-to-client doorbell, with a pollable
    /// doorbell.
    pub(crate) client_bell: Option<SocketBell>,
}

/// Takes the fds of a hand-over, checks the segment's seals, size and
/// header (and a liveness end's kind), and maps it. The reason, if any
/// check fails.
pub(crate) fn receive_segment(
    layout: &SegmentLayout,
    doorbell: DoorbellKind,
    handover: Handover,
    fds: Vec<OwnedFd>,
) -> Result<Segment, String> {
    let pollable = doorbell == DoorbellKind::Pollable;
    let expected = 2 + usize::from(handover == Handover::Brokered) + usize::from(pollable);
    if fds.len() != expected {
        return Err(format!("the segment comes with {} fds, expected {expected}", fds.len()));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted");
    let (memfd, peer_bell) = (next(), next());
    // Refused unless sealed against resizing, not against writing, and of
    // the announced size.
    let region = Mapping::map(memfd.as_fd(), layout.segment_size()).map_err(|e| format!("segment memfd: {e}"))?;
    SegmentLayout::read_header(&region, layout.capacity()).map_err(|e| format!("segment header: {e}"))?;
    let peer_bell = EventFd::from_fd(peer_bell).map_err(|e| format!("doorbell fd: {e}"))?;
    let liveness = match handover {
        Handover::Welcome => None,
        Handover::Brokered => Some(liveness_end(next())?),
    };
    let client_bell = pollable.then(|| SocketBell::from_fd(next()));
    Ok(Segment { memfd, region, peer_bell, liveness, client_bell })
}

/// A liveness end, which must be a socket: it is only watched for its
/// hang-up, and anything else would never hang up. (Its peer may have hung
/// up already: a provider that died as the session was handed over; the
/// caller of this tells that apart.)
fn liveness_end(fd: OwnedFd) -> Result<UnixStream, String> {
    match ipc_platform::peer_closed(fd.as_fd()) {
        Ok(_) => Ok(UnixStream::from(fd)),
        Err(e) => Err(format!("the liveness fd is not a connected socket: {e}")),
    }
}

/// The client's side of a checked segment, as a link: it writes requests
/// and reads replies; `control`'s hang-up means `peer` is gone.
pub(crate) fn shm_link(control: UnixStream, segment: Segment, layout: &SegmentLayout, peer: Peer) -> ShmLink {
    // The mapping keeps the segment alive; no fd is needed for it.
    drop(segment.memfd);
    let Rings { request_producer, response_consumer, words, .. } = Rings::new(segment.region, layout);
    let watch = crate::liveness::watch(&control, &words, segment.client_bell.is_none());
    ShmLink {
        control,
        requests: request_producer,
        responses: response_consumer,
        peer_bell: segment.peer_bell,
        bell: segment.client_bell.map_or(Bell::Futex, Bell::Pollable),
        words,
        peer,
        gone: None,
        watch,
    }
}

fn timeout_or(e: io::Error, after: Duration) -> ConnectError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectError::Timeout { after },
        _ => ConnectError::Io(e),
    }
}

/// Why [`read_message`] gave no message.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The daemon closed the connection.
    Closed,
    /// Nothing complete came within the budget.
    Timeout,
    /// What came breaks the framing.
    Protocol(String),
    /// The receive failed.
    Io(io::Error),
}

impl ReadError {
    fn in_handshake(self, limit: Duration) -> ConnectError {
        match self {
            ReadError::Closed => ConnectError::Closed,
            ReadError::Timeout => ConnectError::Timeout { after: limit },
            ReadError::Protocol(m) => ConnectError::Protocol(m),
            ReadError::Io(e) => timeout_or(e, limit),
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => f.write_str("the daemon closed the connection"),
            ReadError::Timeout => f.write_str("no answer in time"),
            ReadError::Protocol(m) => f.write_str(m),
            ReadError::Io(e) => write!(f, "receive failed: {e}"),
        }
    }
}

/// Reads one framed control message, with the fds that come with it,
/// within what is left of `budget`: its body. Nothing may follow it (the
/// daemon says one thing, then waits).
pub(crate) fn read_message(socket: BorrowedFd<'_>, budget: &Budget) -> Result<(Vec<u8>, Vec<OwnedFd>), ReadError> {
    let mut buf = Vec::with_capacity(256);
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= LENGTH_PREFIX {
            let len = handshake::body_len([buf[0], buf[1], buf[2], buf[3]])
                .map_err(|e| ReadError::Protocol(e.to_string()))?;
            if buf.len() >= LENGTH_PREFIX + len {
                if buf.len() > LENGTH_PREFIX + len {
                    return Err(ReadError::Protocol("stray bytes after the daemon's answer".into()));
                }
                buf.drain(..LENGTH_PREFIX);
                return Ok((buf, fds));
            }
        }
        // An answer dribbled out a byte at a time still ends at the limit.
        let left = budget.remaining().ok_or(ReadError::Timeout)?;
        ipc_platform::stream::set_recv_timeout(socket, Some(left)).map_err(ReadError::Io)?;
        let (n, got) = match ipc_platform::recv_with_fds(socket, &mut chunk) {
            Ok(received) => received,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(ReadError::Timeout)
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        fds.extend(got);
        if n == 0 {
            return Err(ReadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > LENGTH_PREFIX + MAX_CONTROL_MESSAGE {
            return Err(ReadError::Protocol("the daemon's answer is too long".into()));
        }
    }
}

/// Whether a failed connect would fail again however long it is retried:
/// the daemon speaks another protocol, is not trusted, or refuses this
/// client for what it is rather than for how busy it is.
pub(crate) fn lasts(error: &ConnectError) -> bool {
    matches!(
        error,
        ConnectError::VersionMismatch { .. }
            | ConnectError::Protocol(_)
            | ConnectError::Untrusted { .. }
            | ConnectError::Rejected(Reject::NotPermitted { .. } | Reject::BadHello { .. })
    )
}
