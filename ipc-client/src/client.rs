//! The client: handshake, then calls over the link, one at a time or
//! pipelined.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::handshake::{self, LENGTH_PREFIX, MAX_CONTROL_MESSAGE};
use ipc_core::{
    decode_error, DoorbellKind, ErrorCode, FrameHeader, Hello, Region, Reject, Segment as Rings, SegmentLayout,
    ServerMessage, Spinner, Welcome, PROTOCOL_VERSION,
};
use ipc_platform::{EventFd, Mapping, SocketBell};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{with_causes, CallError, ConnectError};
use crate::link::{Link, ReplyRef, RequestBuf};
use crate::shm::{Bell, ShmLink};
use crate::stream::{Socket, StreamLink};
use crate::trust;

/// In-flight entries reserved at connect time.
const IN_FLIGHT_RESERVE: usize = 256;
/// The longest call timeout honoured.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The default spin limit, chosen by measuring one and 100 clients on a
/// 2-core machine (the README's spin table, with its command): long enough
/// to cover a peer that answers without sleeping, short enough that failed
/// spins cost little.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// How a client reaches the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Shared-memory rings, set up over the daemon's control socket at this
    /// path.
    Shm(PathBuf),
    /// Frames over a Unix stream socket at this path (the daemon's `--uds`).
    Uds(PathBuf),
    /// Frames over TCP to this address (the daemon's `--tcp`).
    Tcp(SocketAddr),
}

impl Transport {
    /// Its short name: `shm`, `uds` or `tcp`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Shm(_) => "shm",
            Transport::Uds(_) => "uds",
            Transport::Tcp(_) => "tcp",
        }
    }
}

impl From<PathBuf> for Transport {
    fn from(path: PathBuf) -> Transport {
        Transport::Shm(path)
    }
}

impl From<&Path> for Transport {
    fn from(path: &Path) -> Transport {
        Transport::Shm(path.to_path_buf())
    }
}

impl From<&PathBuf> for Transport {
    fn from(path: &PathBuf) -> Transport {
        Transport::Shm(path.clone())
    }
}

impl From<&str> for Transport {
    fn from(path: &str) -> Transport {
        Transport::Shm(PathBuf::from(path))
    }
}

impl From<SocketAddr> for Transport {
    fn from(addr: SocketAddr) -> Transport {
        Transport::Tcp(addr)
    }
}

/// Settings for a connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Bytes per ring to ask for (the daemon rounds up to a power of two and
    /// caps it); the largest payload is about half of it. Stream transports
    /// use it to agree on the same largest payload. Default 64 KiB.
    pub ring_capacity: u32,
    /// How the daemon should wake this client. Default: a futex in shared
    /// memory; [`DoorbellKind::Pollable`] gives an fd for your own poll loop.
    pub doorbell: DoorbellKind,
    /// Timeout of [`Client::call`], [`Client::send`], [`Client::wait`] and
    /// friends. Default 30 s.
    pub call_timeout: Duration,
    /// How long connecting may take in all: the connect itself (a daemon
    /// that has stopped accepting leaves it waiting), sending the hello and
    /// the daemon's answer. Past it, [`ConnectError::Timeout`]. Default 5 s.
    pub connect_timeout: Duration,
    /// The longest a wait for a reply spins on the ring before sleeping
    /// (shared memory only). Spinning adapts: a wait spins only while no
    /// runnable thread is waiting for a core, and spinning stops while spins
    /// keep failing. Default [`DEFAULT_SPIN`] when more than one core is
    /// available, else zero (never spin).
    pub spin: Duration,
    /// Whether and how to re-establish a lost connection. Default `None`:
    /// once lost, every later request fails with
    /// [`CallError::NotConnected`] (or [`CallError::Shutdown`]).
    pub reconnect: Option<Reconnect>,
}

/// How a client re-establishes a lost connection.
///
/// With a policy set, a request started after the connection was lost
/// first connects again (same transport, same options), retrying with a
/// delay that starts at `first_delay` and doubles up to `max_delay`, for at
/// most the request's own timeout. If no attempt succeeds in time, or the
/// daemon refuses for good (another protocol version, not permitted), the
/// request fails with [`CallError::NotConnected`] and was not sent.
///
/// Requests in flight when the connection was lost are never sent again:
/// each ends with [`CallError::Disconnected`] (the outcome is unknown) or
/// [`CallError::Shutdown`] (the daemon closed on purpose and never took
/// it). The daemon reached again must offer the same services under the
/// same ids, since resolved [`Service`]s keep their ids; if not,
/// reconnecting fails and a new client must resolve them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// The wait after the first failed attempt. Default 1 ms.
    pub first_delay: Duration,
    /// The longest wait between attempts. Default 20 ms: a restarted daemon
    /// is found within that of being ready.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect { first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(20) }
    }
}

impl Reconnect {
    /// A policy with these delays (`max_delay` is raised to `first_delay`
    /// if lower).
    pub fn new(first_delay: Duration, max_delay: Duration) -> Reconnect {
        Reconnect { first_delay, max_delay: max_delay.max(first_delay) }
    }
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ClientOptions {
            ring_capacity: 64 * 1024,
            doorbell: DoorbellKind::Futex,
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            spin: if cores > 1 { DEFAULT_SPIN } else { Duration::ZERO },
            reconnect: None,
        }
    }
}

impl ClientOptions {
    /// Sets [`ClientOptions::ring_capacity`].
    pub fn ring_capacity(mut self, bytes: u32) -> Self {
        self.ring_capacity = bytes;
        self
    }

    /// Raises [`ClientOptions::ring_capacity`] so that payloads of `bytes`
    /// fit (the largest payload is about half a ring).
    pub fn fit_payload(mut self, bytes: usize) -> Self {
        self.ring_capacity = self.ring_capacity.max(SegmentLayout::capacity_for_payload(bytes));
        self
    }

    /// Sets [`ClientOptions::doorbell`].
    pub fn doorbell(mut self, kind: DoorbellKind) -> Self {
        self.doorbell = kind;
        self
    }

    /// Sets [`ClientOptions::call_timeout`].
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    /// Sets [`ClientOptions::connect_timeout`].
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets [`ClientOptions::spin`] (zero: never spin).
    pub fn spin(mut self, limit: Duration) -> Self {
        self.spin = limit;
        self
    }

    /// Sets [`ClientOptions::reconnect`].
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = Some(policy);
        self
    }
}

/// A service resolved by name, ready to call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    id: u16,
    name: Arc<str>,
}

impl Service {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id requests carry.
    pub fn id(&self) -> u16 {
        self.id
    }
}

/// A request sent with [`Client::send`] and not yet answered: pass it to
/// [`Client::wait`], or take replies in arrival order with [`Client::recv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket {
    id: u64,
}

impl Ticket {
    /// The request id on the wire (unique per client, increasing).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// A request on the link whose reply has not been read.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    id: u64,
    service: u16,
    /// Its caller gave up (timed out): the reply is dropped when it comes.
    abandoned: bool,
}

/// Where an awaited reply is.
enum Found {
    /// On the link, not yet consumed.
    Link(ReplyRef),
    /// Read earlier, while another was awaited.
    Stashed(Vec<u8>),
}

/// A reply read off the link while another was awaited.
struct Stashed {
    header: FrameHeader,
    body: Vec<u8>,
}

/// How the connection was lost.
struct Broken {
    reason: String,
    /// The last request the daemon took, if it closed on purpose.
    closed_after: Option<u64>,
}

/// A connection to ipcd. Calls take `&mut self`; use one client per thread
/// (a client is `Send`). Requests may be pipelined: [`Client::send`] several,
/// then [`Client::wait`] or [`Client::recv`] their replies.
pub struct Client {
    link: Link,
    /// Where and how it connected, to connect again.
    target: Transport,
    options: ClientOptions,
    services: HashMap<String, u16>,
    max_payload: usize,
    session_id: u64,
    next_id: u64,
    /// Sent requests whose replies have not been read, in id order.
    in_flight: VecDeque<InFlight>,
    /// Replies read while waiting for another, in arrival order.
    stash: VecDeque<Stashed>,
    /// Outcomes of requests lost with a connection, in id order, not yet
    /// handed out.
    orphans: VecDeque<(u64, CallError)>,
    broken: Option<Broken>,
    reconnects: u64,
    /// Scratch for error replies read in place.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.target.name())
            .field("session_id", &self.session_id)
            .field("max_payload", &self.max_payload)
            .field("in_flight", &self.in_flight())
            .field("broken", &self.broken.as_ref().map(|b| &b.reason))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon at the default path: `$IPCD_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/ipcd.sock`, else `/tmp/ipcd-<uid>/ipcd.sock`.
    pub fn connect() -> Result<Client, ConnectError> {
        Client::connect_to(ipc_platform::default_socket_path())
    }

    /// Connects over shared memory to the daemon listening at `path`.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Client, ConnectError> {
        Client::connect_with(path.as_ref(), ClientOptions::default())
    }

    /// Connects through `transport` (a path means shared memory) with
    /// `options`. The API above the transport is the same for all three.
    pub fn connect_with(transport: impl Into<Transport>, options: ClientOptions) -> Result<Client, ConnectError> {
        let transport = transport.into();
        let (link, welcome) = open(&transport, &options)?;
        Ok(Client {
            link,
            target: transport,
            services: welcome.services.into_iter().map(|s| (s.name, s.id)).collect(),
            max_payload: welcome.max_payload as usize,
            session_id: welcome.session_id,
            next_id: 1,
            options,
            // Room for a deep pipeline up front, so calls allocate nothing.
            in_flight: VecDeque::with_capacity(IN_FLIGHT_RESERVE),
            stash: VecDeque::new(),
            orphans: VecDeque::new(),
            broken: None,
            reconnects: 0,
            scratch: Vec::new(),
        })
    }

    /// The transport's short name: `shm`, `uds` or `tcp`.
    pub fn transport(&self) -> &'static str {
        self.target.name()
    }

    /// Resolves a service by name.
    pub fn service(&self, name: &str) -> Result<Service, CallError> {
        match self.services.get(name) {
            Some(&id) => Ok(Service { id, name: Arc::from(name) }),
            None => Err(CallError::UnknownService { name: name.to_string() }),
        }
    }

    /// The names of the services the daemon offers.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The largest request (and reply) payload, in bytes.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The daemon's id for this session (it appears in the daemon's logs).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// With shared memory and [`DoorbellKind::Pollable`], the fd that
    /// becomes readable when a reply may be waiting, for a poll loop of your
    /// own.
    pub fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        self.link.doorbell_fd()
    }

    /// Requests sent whose outcome has not been handed out yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|p| !p.abandoned).count() + self.stash.len() + self.orphans.len()
    }

    /// Whether the connection is up (as far as the client knows: a daemon
    /// that just died is noticed by the next call).
    pub fn is_connected(&self) -> bool {
        self.broken.is_none()
    }

    /// How many times the client has connected again (see [`Reconnect`]).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Connects again now if the connection was lost, retrying with the
    /// [`ClientOptions::reconnect`] policy (or the default one) for at most
    /// the call timeout. Does nothing while connected.
    pub fn reconnect(&mut self) -> Result<(), CallError> {
        if self.broken.is_none() {
            return Ok(());
        }
        let policy = self.options.reconnect.unwrap_or_default();
        let mut dl = Deadline::new(self.options.call_timeout);
        self.connect_again(policy, &mut dl)
    }

    /// Calls `service` with `request` and returns the reply, waiting at most
    /// the client's call timeout.
    pub fn call(&mut self, service: &Service, request: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_timeout(service, request, self.options.call_timeout)
    }

    /// As [`Client::call`], with its own timeout.
    pub fn call_timeout(&mut self, service: &Service, request: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.call_into_timeout(service, request, &mut reply, timeout)?;
        Ok(reply)
    }

    /// As [`Client::call`], writing the reply into `reply` (replacing its
    /// contents). Allocates nothing once `reply` has grown large enough.
    pub fn call_into(&mut self, service: &Service, request: &[u8], reply: &mut Vec<u8>) -> Result<(), CallError> {
        self.call_into_timeout(service, request, reply, self.options.call_timeout)
    }

    /// As [`Client::call_into`], with its own timeout.
    pub fn call_into_timeout(
        &mut self,
        service: &Service,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let mut dl = Deadline::new(timeout);
        let ticket = self.start(service, request.len(), |buf| buf.write_at(0, request), true, &mut dl)?.0;
        let found = self.await_reply(ticket, &mut dl)?;
        self.take_found(found, reply);
        Ok(())
    }

    /// Calls `service` with a request of `len` bytes that `fill` writes in
    /// place, and returns a guard over the reply, read in place. Nothing is
    /// copied on the way but the bytes `fill` writes and those you read out
    /// of the guard; nothing is allocated.
    ///
    /// The reply's space stays taken until the guard is dropped.
    ///
    /// ```no_run
    /// # let mut client = ipc_client::Client::connect()?;
    /// let echo = client.service("echo")?;
    /// let reply = client.call_with(&echo, 8, |buf| buf.write_at(0, &42u64.to_le_bytes()))?;
    /// let mut word = [0u8; 8];
    /// reply.read_at(0, &mut word);
    /// assert_eq!(u64::from_le_bytes(word), 42);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_with(
        &mut self,
        service: &Service,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>),
    ) -> Result<ReplyGuard<'_>, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        let ticket = self.start(service, len, fill, true, &mut dl)?.0;
        let reply = match self.await_reply(ticket, &mut dl)? {
            Found::Link(r) => Held::Link(r),
            // The connection was lost with the reply on the link, and the
            // loss read it out.
            Found::Stashed(body) => Held::Read(body),
        };
        Ok(ReplyGuard { client: self, reply, pos: 0 })
    }

    /// Calls `service` with a serde-encoded request and decodes the reply.
    ///
    /// Both travel as `bincode::serde` with `bincode::config::standard()`
    /// (bincode 2): a service decodes the request and encodes its reply the
    /// same way.
    pub fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        service: &Service,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(request, config).map_err(|e| CallError::Encode(e.to_string()))?;
        let reply = self.call(service, &bytes)?;
        let (value, used) =
            bincode::serde::decode_from_slice(&reply, config).map_err(|e| CallError::Decode(e.to_string()))?;
        if used != reply.len() {
            return Err(CallError::Decode(format!("{} stray bytes after the reply", reply.len() - used)));
        }
        Ok(value)
    }

    /// Queues a request without waiting: [`CallError::Full`] when the link
    /// has no room for it now. Queued requests reach the daemon at the next
    /// wait, receive, call or [`Client::flush`].
    pub fn try_send(&mut self, service: &Service, request: &[u8]) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(Duration::ZERO);
        self.start(service, request.len(), |buf| buf.write_at(0, request), false, &mut dl).map(|(t, _)| t)
    }

    /// Queues a request, waiting up to the call timeout for room in the
    /// link ([`CallError::SendTimeout`] if none came: not sent). Queued requests reach the daemon at the next wait, receive,
    /// call or [`Client::flush`] (and whenever `send` must wait for room).
    /// While it waits, replies that arrive are kept for [`Client::wait`] and
    /// [`Client::recv`], so the daemon is never stuck behind them.
    pub fn send(&mut self, service: &Service, request: &[u8]) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        self.start(service, request.len(), |buf| buf.write_at(0, request), true, &mut dl).map(|(t, _)| t)
    }

    /// As [`Client::send`], with a request of `len` bytes that `fill`
    /// writes in place.
    pub fn send_with(
        &mut self,
        service: &Service,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>),
    ) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        self.start(service, len, fill, true, &mut dl).map(|(t, _)| t)
    }

    /// Hands the queued requests to the daemon: all of them over shared
    /// memory; over a stream, what the socket takes without blocking (the
    /// rest goes out during the next wait, receive or call).
    pub fn flush(&mut self) -> Result<(), CallError> {
        if self.broken.is_some() {
            return Err(self.not_sent());
        }
        let flushed = self.link.flush();
        self.note(flushed)
    }

    /// Waits up to the call timeout for the reply to `ticket`. On timeout the
    /// ticket is spent: its reply is dropped when it arrives.
    pub fn wait(&mut self, ticket: Ticket) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.wait_into(ticket, &mut reply)?;
        Ok(reply)
    }

    /// As [`Client::wait`], writing the reply into `reply`.
    pub fn wait_into(&mut self, ticket: Ticket, reply: &mut Vec<u8>) -> Result<(), CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        let found = self.await_reply(ticket, &mut dl)?;
        self.take_found(found, reply);
        Ok(())
    }

    /// Waits up to the call timeout for the next reply to any request in
    /// flight, in arrival order, and returns its ticket with its outcome.
    ///
    /// The outer error means no outcome came: [`CallError::Timeout`] (the
    /// requests stay in flight) or [`CallError::NothingInFlight`]. A lost
    /// connection is not an outer error: each request that was in flight
    /// comes back in turn with its own outcome (its reply if it had
    /// arrived, else [`CallError::Disconnected`] or [`CallError::Shutdown`]).
    pub fn recv(&mut self) -> Result<(Ticket, Result<Vec<u8>, CallError>), CallError> {
        let mut reply = Vec::new();
        let (ticket, outcome) = self.recv_into(&mut reply)?;
        Ok((ticket, outcome.map(|()| reply)))
    }

    /// As [`Client::recv`], writing a reply into `reply`. Allocates nothing
    /// once `reply` has grown large enough (unless replies had to be kept
    /// aside while [`Client::send`] or [`Client::wait`] waited for another).
    pub fn recv_into(&mut self, reply: &mut Vec<u8>) -> Result<(Ticket, Result<(), CallError>), CallError> {
        if let Some(settled) = self.next_settled(reply) {
            return Ok(settled);
        }
        if self.in_flight.iter().all(|p| p.abandoned) {
            return Err(CallError::NothingInFlight);
        }
        let mut dl = Deadline::new(self.options.call_timeout);
        let flushed = self.link.flush();
        let next = self.note(flushed).and_then(|()| self.next_reply(&mut dl));
        let r = match self.note(next) {
            Ok((_, r)) => r,
            // The connection is lost: hand out the first outcome that
            // settled.
            Err(e) => return self.next_settled(reply).ok_or(e),
        };
        self.link.read_all(&r, reply);
        // Read, the reply is its request's outcome whatever `release` says.
        let _ = self.release(&r);
        Ok((Ticket { id: r.header().request_id }, self.outcome(r.header(), reply)))
    }

    /// The next outcome already settled, in the order [`Client::recv`]
    /// hands them out: replies kept aside (in arrival order), then the
    /// outcomes of requests lost with a connection (in id order).
    fn next_settled(&mut self, reply: &mut Vec<u8>) -> Option<(Ticket, Result<(), CallError>)> {
        if let Some(stashed) = self.stash.pop_front() {
            *reply = stashed.body;
            return Some((Ticket { id: stashed.header.request_id }, self.outcome(stashed.header, reply)));
        }
        self.orphans.pop_front().map(|(id, outcome)| (Ticket { id }, Err(outcome)))
    }

    /// Takes request `id`'s outcome if it is already settled: its reply kept
    /// aside, or the error it got when the connection was lost.
    fn settled(&mut self, id: u64) -> Option<Result<Found, CallError>> {
        if let Some(i) = self.stash.iter().position(|s| s.header.request_id == id) {
            let stashed = self.stash.remove(i).expect("index from the search");
            let mut body = stashed.body;
            return Some(self.outcome(stashed.header, &mut body).map(|()| Found::Stashed(body)));
        }
        self.take_orphan(id).map(Err)
    }

    /// Copies a found reply into `reply` and hands its space back.
    fn take_found(&mut self, found: Found, reply: &mut Vec<u8>) {
        match found {
            Found::Stashed(body) => *reply = body,
            Found::Link(r) => {
                self.link.read_all(&r, reply);
                // Read, the reply is its request's outcome whatever
                // `release` says.
                let _ = self.release(&r);
            }
        }
    }

    /// Consumes a reply on the link once it is read (or dropped), handing
    /// its space back to the daemon. A failure (the daemon cannot be rung)
    /// breaks the connection, which the next operation reports; it changes
    /// nothing for this reply: once claimed and read, it is its request's
    /// outcome.
    fn release(&mut self, r: &ReplyRef) -> Result<(), CallError> {
        let consumed = self.link.consume(r);
        self.note(consumed)
    }

    /// The error of a request that cannot be sent: the connection is lost.
    fn not_sent(&self) -> CallError {
        match &self.broken {
            Some(Broken { closed_after: Some(_), .. }) => CallError::Shutdown,
            Some(Broken { reason, .. }) => CallError::NotConnected { reason: reason.clone() },
            None => CallError::NotConnected { reason: "the connection is up".into() },
        }
    }

    /// Marks the client broken when `result` says the link is gone.
    fn note<T>(&mut self, result: Result<T, CallError>) -> Result<T, CallError> {
        if let Err(CallError::Disconnected { reason }) = &result {
            if self.broken.is_none() {
                let reason = reason.clone();
                self.break_off(reason);
            }
        }
        result
    }

    /// Records the loss of the connection and gives every request in
    /// flight its outcome: its reply if one is on the link still, else
    /// [`CallError::Shutdown`] for those the daemon said it never took, else
    /// [`CallError::Disconnected`].
    fn break_off(&mut self, reason: String) {
        // The daemon's word on the last request it took is read before its
        // replies: on shared memory it is written after every reply to
        // those was published, so all of them are read below. A stream's
        // closing frame comes after its replies; reading them reaches it.
        let said = self.link.closed_after();
        self.read_remaining();
        let closed_after = said.or_else(|| self.link.closed_after());
        for entry in self.in_flight.drain(..) {
            if entry.abandoned {
                continue;
            }
            let outcome = match closed_after {
                Some(last) if entry.id > last => CallError::Shutdown,
                _ => CallError::Disconnected { reason: reason.clone() },
            };
            self.orphans.push_back((entry.id, outcome));
        }
        self.broken = Some(Broken { reason, closed_after });
    }

    /// Keeps aside every reply left on the link of a lost connection, as
    /// replies to requests in flight are kept aside while another is
    /// awaited: each is its request's outcome. Stops at the first thing
    /// that is not such a reply (the link's end, a stream's closing frame,
    /// or what broke the protocol).
    fn read_remaining(&mut self) {
        loop {
            let r = match self.link.peek() {
                Ok(Some(r)) => r,
                // What a stream's socket still holds comes after the buffer.
                Ok(None) if self.link.receive_left() => continue,
                _ => break,
            };
            let Ok(entry) = self.claim_entry(r.header()) else { break };
            if !entry.abandoned {
                let mut body = Vec::new();
                self.link.read_all(&r, &mut body);
                self.stash.push_back(Stashed { header: r.header(), body });
            }
            // Whether a daemon that is gone can be told of the space
            // changes nothing.
            let _ = self.link.consume(&r);
        }
    }

    /// Takes the outcome of a request lost with the connection.
    fn take_orphan(&mut self, id: u64) -> Option<CallError> {
        let i = self.orphans.iter().position(|(o, _)| *o == id)?;
        self.orphans.remove(i).map(|(_, outcome)| outcome)
    }

    /// Restores a lost connection before a request is sent: reconnects with
    /// the policy until the deadline, or fails the request as not sent.
    fn ensure_connected(&mut self, dl: &mut Deadline) -> Result<(), CallError> {
        if self.broken.is_none() {
            return Ok(());
        }
        match self.options.reconnect {
            Some(policy) => self.connect_again(policy, dl),
            None => Err(self.not_sent()),
        }
    }

    /// Connects again, retrying with `policy`'s backoff until the deadline.
    fn connect_again(&mut self, policy: Reconnect, dl: &mut Deadline) -> Result<(), CallError> {
        let mut delay = policy.first_delay;
        loop {
            let now = Instant::now();
            let left = dl.at().saturating_duration_since(now);
            let mut options = self.options.clone();
            // An attempt never outlasts the request's deadline by much.
            options.connect_timeout = options.connect_timeout.min(left.max(Duration::from_millis(1)));
            let error = match open(&self.target, &options) {
                Ok((link, welcome)) => return self.adopt(link, welcome),
                Err(e) => e,
            };
            let lasting = matches!(
                error,
                ConnectError::VersionMismatch { .. }
                    | ConnectError::Protocol(_)
                    | ConnectError::Untrusted { .. }
                    | ConnectError::Rejected(Reject::NotPermitted { .. } | Reject::BadHello { .. })
            );
            let left = dl.at().saturating_duration_since(Instant::now());
            if lasting || left.is_zero() {
                return Err(CallError::NotConnected { reason: format!("cannot reconnect: {}", with_causes(&error)) });
            }
            std::thread::sleep(delay.min(left));
            delay = (delay * 2).min(policy.max_delay);
        }
    }

    /// Takes a new link in place of the lost one.
    fn adopt(&mut self, link: Link, welcome: Welcome) -> Result<(), CallError> {
        let same = welcome.services.len() == self.services.len()
            && welcome.services.iter().all(|s| self.services.get(&s.name) == Some(&s.id));
        if !same {
            return Err(CallError::NotConnected {
                reason: "the daemon reached again offers other services; connect a new client".into(),
            });
        }
        if welcome.max_payload as usize != self.max_payload {
            return Err(CallError::NotConnected {
                reason: format!(
                    "the daemon reached again offers payloads of {} bytes, not {}; connect a new client",
                    welcome.max_payload, self.max_payload
                ),
            });
        }
        self.link = link;
        self.session_id = welcome.session_id;
        self.broken = None;
        self.reconnects += 1;
        Ok(())
    }

    /// Writes a request, waiting for room (with `wait`) until the deadline.
    /// With `flush`, hands it to the daemon at once.
    fn start<R>(
        &mut self,
        service: &Service,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
        wait: bool,
        dl: &mut Deadline,
    ) -> Result<(Ticket, R), CallError> {
        self.ensure_connected(dl)?;
        if len > self.max_payload {
            return Err(CallError::TooLarge { len, max: self.max_payload });
        }
        let id = self.next_id;
        let mut fill = Some(fill);
        loop {
            let written = self.link.try_write(service.id, id, len, |buf| (fill.take().expect("filled once"))(buf));
            match self.note(written).map_err(|e| self.unsent(e))? {
                Some(r) => {
                    self.next_id += 1;
                    self.in_flight.push_back(InFlight { id, service: service.id, abandoned: false });
                    return Ok((Ticket { id }, r));
                }
                None if !wait => return Err(CallError::Full { in_flight: self.in_flight() }),
                None => self.wait_for_room(len, dl).map_err(|e| self.unsent(e))?,
            }
        }
    }

    /// Waits for room for a request of `len` bytes. The daemon may be stuck
    /// on a full reply path: the replies already there are taken aside
    /// first, and again after the wait.
    fn wait_for_room(&mut self, len: usize, dl: &mut Deadline) -> Result<(), CallError> {
        self.stash_replies()?;
        // Requests in flight, abandoned or not, all have replies coming.
        let awaiting_replies = !self.in_flight.is_empty();
        let waited = self.link.wait_writable(len, awaiting_replies, dl.at(), dl.timeout);
        match self.note(waited) {
            // Nothing was written: the request did not run.
            Err(CallError::Timeout { after }) => Err(CallError::SendTimeout { after, in_flight: self.in_flight() }),
            other => other,
        }?;
        self.stash_replies()
    }

    /// The outcome of a request whose writing failed with `e`: a lost
    /// connection (already noted) means it was never sent.
    fn unsent(&self, e: CallError) -> CallError {
        match e {
            CallError::Disconnected { .. } => self.not_sent(),
            other => other,
        }
    }

    /// Moves every reply waiting on the link into the stash (dropping those
    /// of abandoned requests).
    fn stash_replies(&mut self) -> Result<(), CallError> {
        loop {
            let peeked = self.link.peek();
            let Some(r) = self.note(peeked)? else { return Ok(()) };
            let entry = self.claim(&r)?;
            if !entry.abandoned {
                let mut body = Vec::new();
                self.link.read_all(&r, &mut body);
                self.stash.push_back(Stashed { header: r.header(), body });
            }
            // Kept aside first: a failure here leaves the reply its outcome.
            self.release(&r)?;
        }
    }

    /// Takes the in-flight entry a reply answers; a reply to nothing we sent
    /// breaks the connection.
    fn claim(&mut self, r: &ReplyRef) -> Result<InFlight, CallError> {
        let claimed = self.claim_entry(r.header());
        self.note(claimed.map_err(|reason| CallError::Disconnected { reason }))
    }

    /// Takes the in-flight entry a reply with `header` answers, or says why
    /// none does.
    fn claim_entry(&mut self, header: FrameHeader) -> Result<InFlight, String> {
        let id = header.request_id;
        match self.in_flight.binary_search_by_key(&id, |p| p.id) {
            Ok(i) if self.in_flight[i].service == header.service => {
                Ok(self.in_flight.remove(i).expect("index from the search"))
            }
            Ok(i) => Err(format!(
                "the daemon answered request {id} of service {} as service {}",
                self.in_flight[i].service, header.service
            )),
            Err(_) => Err(format!("the daemon sent a reply to request {id}, which is not in flight")),
        }
    }

    /// The next reply on the link that someone still waits for, not yet
    /// consumed, with its claimed entry.
    fn next_reply(&mut self, dl: &mut Deadline) -> Result<(InFlight, ReplyRef), CallError> {
        loop {
            match self.link.peek()? {
                Some(r) => {
                    let entry = self.claim(&r)?;
                    if !entry.abandoned {
                        return Ok((entry, r));
                    }
                    self.link.consume(&r)?;
                }
                None => {
                    let deadline = dl.at();
                    if Instant::now() >= deadline {
                        return Err(CallError::Timeout { after: dl.timeout });
                    }
                    self.link.wait_readable(deadline, dl.timeout)?;
                }
            }
        }
    }

    /// Waits for `ticket`'s reply and leaves it unconsumed on the link for
    /// the caller (or hands over the stashed one); an error reply is
    /// consumed and returned as the error.
    fn await_reply(&mut self, ticket: Ticket, dl: &mut Deadline) -> Result<Found, CallError> {
        if let Some(found) = self.settled(ticket.id) {
            return found;
        }
        let Ok(i) = self.in_flight.binary_search_by_key(&ticket.id, |p| p.id) else {
            return Err(CallError::UnknownTicket { id: ticket.id });
        };
        if self.in_flight[i].abandoned {
            return Err(CallError::UnknownTicket { id: ticket.id });
        }
        match self.await_on_link(ticket, dl) {
            Ok(found) => Ok(found),
            Err(e) => {
                if matches!(e, CallError::Timeout { .. }) {
                    self.abandon(ticket.id);
                }
                // A loss on the way settled this ticket along with the
                // others: that is its outcome, handed out here only.
                self.settled(ticket.id).unwrap_or(Err(e))
            }
        }
    }

    /// [`Client::await_reply`] on the link: reads replies, keeping those of
    /// other requests aside, until `ticket`'s comes. An error returned
    /// without `ticket` settled is its outcome (its error reply, or a
    /// timeout).
    fn await_on_link(&mut self, ticket: Ticket, dl: &mut Deadline) -> Result<Found, CallError> {
        let flushed = self.link.flush();
        self.note(flushed)?;
        loop {
            let next = self.next_reply(dl);
            let (entry, r) = self.note(next)?;
            if entry.id == ticket.id {
                if r.header().is_error() {
                    let mut body = std::mem::take(&mut self.scratch);
                    self.link.read_all(&r, &mut body);
                    let outcome = self.outcome(r.header(), &mut body);
                    self.scratch = body;
                    // Read, the error is its request's outcome whatever
                    // `release` says.
                    let _ = self.release(&r);
                    outcome?;
                    unreachable!("an error reply gives an error outcome");
                }
                return Ok(Found::Link(r));
            }
            let mut body = Vec::new();
            self.link.read_all(&r, &mut body);
            self.stash.push_back(Stashed { header: r.header(), body });
            // Kept aside first: a failure here leaves the reply its outcome.
            self.release(&r)?;
        }
    }

    fn abandon(&mut self, id: u64) {
        if let Ok(i) = self.in_flight.binary_search_by_key(&id, |p| p.id) {
            self.in_flight[i].abandoned = true;
        }
    }

    /// The outcome a reply carries; an error reply's body is decoded (and
    /// `body` cleared).
    fn outcome(&self, header: FrameHeader, body: &mut Vec<u8>) -> Result<(), CallError> {
        if !header.is_error() {
            return Ok(());
        }
        let (code, message) = decode_error(body);
        body.clear();
        Err(match code {
            ErrorCode::UnknownService => {
                let name = self
                    .services
                    .iter()
                    .find(|(_, &id)| id == header.service)
                    .map_or_else(|| format!("#{}", header.service), |(n, _)| n.clone());
                CallError::UnknownService { name }
            }
            ErrorCode::Shutdown => CallError::Shutdown,
            ErrorCode::Application(code) => CallError::Remote { code: Some(code), message },
            _ => CallError::Remote { code: None, message },
        })
    }
}

/// A reply read in place, from [`Client::call_with`]. Its space in the ring
/// (or input buffer) is handed back when the guard is dropped.
///
/// Like the request side, it hands out no reference to shared memory: read
/// with [`ReplyGuard::read_at`], [`std::io::Read`], or copy it all out with
/// [`ReplyGuard::to_vec`].
pub struct ReplyGuard<'c> {
    client: &'c mut Client,
    reply: Held,
    pos: usize,
}

/// Where a guarded reply is.
enum Held {
    /// On the link; its space is handed back when the guard drops.
    Link(ReplyRef),
    /// Read out already: the connection was lost while the call waited,
    /// and the loss read every reply left on the link.
    Read(Vec<u8>),
}

impl ReplyGuard<'_> {
    /// The reply's length in bytes.
    pub fn len(&self) -> usize {
        match &self.reply {
            Held::Link(r) => r.len(),
            Held::Read(body) => body.len(),
        }
    }

    /// Whether the reply is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    ///
    /// # Panics
    ///
    /// Panics if the range is past the reply's end.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        match &self.reply {
            Held::Link(r) => self.client.link.read_at(r, offset, dst),
            Held::Read(body) => {
                let end = offset.checked_add(dst.len()).filter(|&end| end <= body.len());
                let end = end.unwrap_or_else(|| panic!("read of {} bytes at {offset} past the reply", dst.len()));
                dst.copy_from_slice(&body[offset..end]);
            }
        }
    }

    /// Copies the whole reply into `out`, replacing its contents.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        match &self.reply {
            Held::Link(r) => self.client.link.read_all(r, out),
            Held::Read(body) => {
                out.clear();
                out.extend_from_slice(body);
            }
        }
    }

    /// The whole reply, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.copy_into(&mut out);
        out
    }
}

/// Sequential reads from the start of the reply.
impl io::Read for ReplyGuard<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.len() - self.pos);
        self.read_at(self.pos, &mut buf[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::fmt::Debug for ReplyGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyGuard").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        if let Held::Link(r) = &self.reply {
            // The reply was handed out with the guard; a failure to ring
            // the daemon breaks the client, and the next call reports it.
            let _ = self.client.release(r);
        }
    }
}

/// The deadline of an operation, fixed the first time it is needed: an
/// operation that finds its reply (or room) at once never reads the clock.
/// Timeouts are capped at a year so the deadline never overflows.
struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        Deadline { timeout: timeout.min(MAX_TIMEOUT), at: None }
    }

    fn at(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| Instant::now() + self.timeout)
    }
}

/// Connects and handshakes: the link and the daemon's welcome.
fn open(transport: &Transport, options: &ClientOptions) -> Result<(Link, Welcome), ConnectError> {
    let (socket, welcome, layout, fds) = greet(transport, options)?;
    let protocol = |m: String| ConnectError::Protocol(m);
    let link = match socket {
        Socket::Unix(control) if matches!(transport, Transport::Shm(_)) => {
            control.set_read_timeout(None)?;
            control.set_write_timeout(None)?;
            Link::Shm(shm_link(control, &welcome, &layout, fds, options)?)
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
/// the hello and checks the answer, all within the connect timeout: the
/// connection (its read and write timeouts still set to
/// what was left of it), the welcome, the layout it announces, and the fds
/// that came with it.
pub(crate) fn greet(
    transport: &Transport,
    options: &ClientOptions,
) -> Result<(Socket, Welcome, SegmentLayout, Vec<OwnedFd>), ConnectError> {
    let budget = Budget::start(options.connect_timeout);
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
    let hello = hello_bytes(options)?;
    match &socket {
        Socket::Unix(s) => (&*s).write_all(&hello),
        Socket::Tcp(s) => (&*s).write_all(&hello),
    }
    .map_err(|e| timeout_or(e, budget.limit))?;
    let (message, fds) = read_answer(&socket, &budget)?;
    let (welcome, layout) = accept_welcome(message)?;
    Ok((socket, welcome, layout, fds))
}

/// The connect timeout, spent across the steps of connecting.
struct Budget {
    limit: Duration,
    started: Instant,
}

impl Budget {
    fn start(limit: Duration) -> Budget {
        Budget { limit: limit.min(MAX_TIMEOUT), started: Instant::now() }
    }

    /// What is left of it, or the timeout error once nothing is.
    fn left(&self) -> Result<Duration, ConnectError> {
        let left = self.limit.saturating_sub(self.started.elapsed());
        if left.is_zero() {
            return Err(ConnectError::Timeout { after: self.limit });
        }
        Ok(left)
    }
}

fn shm_link(
    control: UnixStream,
    welcome: &Welcome,
    layout: &SegmentLayout,
    fds: Vec<OwnedFd>,
    options: &ClientOptions,
) -> Result<ShmLink, ConnectError> {
    if welcome.doorbell != options.doorbell {
        return Err(ConnectError::Protocol(format!(
            "asked for a {:?} doorbell, got {:?}",
            options.doorbell, welcome.doorbell
        )));
    }
    let segment = receive_segment(welcome, layout, fds)?;
    // The mapping keeps the segment alive; no fd is needed for it.
    drop(segment.memfd);
    // The client's ends: it writes requests and reads replies.
    let Rings { request_producer, response_consumer, words, .. } = Rings::new(segment.region, layout);
    Ok(ShmLink {
        control,
        requests: request_producer,
        responses: response_consumer,
        daemon_bell: segment.daemon_bell,
        bell: segment.client_bell.map_or(Bell::Futex, Bell::Pollable),
        spinner: Spinner::new(options.spin),
        gauge: ipc_platform::CoreGauge::new(),
        words,
        gone: None,
    })
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
    let protocol = |m: String| ConnectError::Protocol(m);
    if welcome.version != PROTOCOL_VERSION {
        return Err(ConnectError::VersionMismatch { daemon: welcome.version, client: PROTOCOL_VERSION });
    }
    let layout = SegmentLayout::new(welcome.ring_capacity).map_err(|e| protocol(e.to_string()))?;
    if welcome.max_payload != layout.max_payload() {
        return Err(protocol(format!(
            "maximum payload {} does not match ring capacity {}",
            welcome.max_payload, welcome.ring_capacity
        )));
    }
    Ok((welcome, layout))
}

/// What a shared-memory welcome hands over, checked and mapped.
pub(crate) struct Segment {
    /// The segment's memfd (the mapping does not need it).
    pub(crate) memfd: OwnedFd,
    /// The mapped segment.
    pub(crate) region: Region,
    /// The client-to-daemon doorbell.
    pub(crate) daemon_bell: EventFd,
    /// The client's end of the daemon-to-client doorbell, with a pollable
    /// doorbell.
    pub(crate) client_bell: Option<SocketBell>,
}

/// Takes the welcome's fds, checks the segment's seals, size and header,
/// and maps it.
pub(crate) fn receive_segment(
    welcome: &Welcome,
    layout: &SegmentLayout,
    fds: Vec<OwnedFd>,
) -> Result<Segment, ConnectError> {
    let protocol = |m: String| ConnectError::Protocol(m);
    if fds.len() != welcome.fd_count() {
        return Err(protocol(format!("welcome carries {} fds, expected {}", fds.len(), welcome.fd_count())));
    }
    let mut fds = fds.into_iter();
    let (memfd, daemon_bell) = (fds.next().expect("counted"), fds.next().expect("counted"));
    // Refused unless sealed against resizing, not against writing, and of
    // the announced size.
    let region = Mapping::map(memfd.as_fd(), layout.segment_size()).map_err(|e| protocol(e.to_string()))?;
    SegmentLayout::read_header(&region, welcome.ring_capacity).map_err(|e| protocol(e.to_string()))?;
    Ok(Segment {
        memfd,
        region,
        daemon_bell: EventFd::from_fd(daemon_bell)?,
        client_bell: fds.next().map(SocketBell::from_fd),
    })
}

fn timeout_or(e: io::Error, after: Duration) -> ConnectError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectError::Timeout { after },
        _ => ConnectError::Io(e),
    }
}

/// Reads the daemon's answer to the hello, with the fds that come with it,
/// within what is left of the connect timeout.
fn read_answer(control: &Socket, budget: &Budget) -> Result<(ServerMessage, Vec<OwnedFd>), ConnectError> {
    let mut buf = Vec::with_capacity(256);
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= LENGTH_PREFIX {
            let len = handshake::body_len([buf[0], buf[1], buf[2], buf[3]])
                .map_err(|e| ConnectError::Protocol(e.to_string()))?;
            if buf.len() >= LENGTH_PREFIX + len {
                if buf.len() > LENGTH_PREFIX + len {
                    return Err(ConnectError::Protocol("stray bytes after the daemon's answer".into()));
                }
                let message = handshake::decode_server_message(&buf[LENGTH_PREFIX..])
                    .map_err(|e| ConnectError::Protocol(e.to_string()))?;
                return Ok((message, fds));
            }
        }
        // An answer dribbled out a byte at a time still ends at the limit.
        control.set_read_timeout(Some(budget.left()?))?;
        let (n, got) =
            ipc_platform::recv_with_fds(control.as_fd(), &mut chunk).map_err(|e| timeout_or(e, budget.limit))?;
        fds.extend(got);
        if n == 0 {
            return Err(ConnectError::Protocol("the daemon closed the connection during the handshake".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > LENGTH_PREFIX + MAX_CONTROL_MESSAGE {
            return Err(ConnectError::Protocol("the daemon's answer is too long".into()));
        }
    }
}

#[cfg(test)]
mod tests;
