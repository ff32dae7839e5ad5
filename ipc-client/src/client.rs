//! The client: its links (the daemon link, for the daemon's own services,
//! and one per brokered session), requests over them, one at a time or
//! pipelined, and the waits that read replies off every link.
//!
//! What each request's outcome is, is decided by the state machine in
//! `calls.rs`; the client does the I/O around it. Here: the types, the
//! calls, sends, waits and receives. In `client/replies.rs`: reading
//! replies off the links and feeding them to the state machine, sleeping
//! across links, settling a link that is lost. In `client/inbound.rs`:
//! what one frame off a link is (a reply, a chunk, a stream's item or
//! end) and where its bytes go, and the small frames the client sends
//! beside its requests (credits, cancels). In `client/messages.rs`:
//! requests longer than a frame, uploads, and readers of long replies. In
//! `client/streams.rs`: streams of replies. In `client/links.rs`:
//! resolving provided names through the broker, and re-establishing lost
//! links.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::{decode_error, Credentials, ErrorCode, FrameHeader, ServiceEntry};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::broker::Broker;
use crate::calls::{Awaiting, Calls, LinkId, Settled, Ticket};
use crate::connect::{self, MAX_TIMEOUT};
use crate::error::{CallError, ConnectError};
use crate::guard::ReplyGuard;
use crate::link::{Link, ReplyRef, RequestBuf};
use crate::options::{ClientOptions, Transport};
use crate::wait::{Await, Pace};

use self::inbound::{Control, Inbound};
use self::streams::Dropped;

/// Where client ids come from: unique in the process, so that a ticket or
/// service handed to another client is recognised as foreign.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// The daemon link's place.
const DAEMON: LinkId = 0;

/// A service resolved by name, ready to call.
///
/// It belongs to the client that resolved it and names the link its
/// calls go out on: another client refuses it
/// ([`CallError::ForeignService`]).
#[must_use = "a service is resolved to be called"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    client: u64,
    link: u32,
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

/// Where an awaited reply is.
pub(crate) enum Found {
    /// On a link, not yet consumed.
    Link(LinkId, ReplyRef),
    /// Read earlier, while another was awaited (or when its link was lost).
    Stashed(Vec<u8>),
}

/// What a read of the links came to.
enum Next {
    /// The awaited reply (any, for a receive), claimed, on its link.
    Reply(LinkId, ReplyRef, Ticket),
    /// Outcomes were settled (a link was lost, a reply assembled or
    /// refused), or what a reader or a stream awaits came: look again.
    Settled,
}

/// Room a write waits for: for a frame of `len` bytes on `link`, which
/// `begins` a request (a reply will follow it: with replies due, waiting
/// for the next reply is waiting for room) or goes on with one (a chunk,
/// a credit, a cancel: room and replies are both waited for).
#[derive(Clone, Copy, Debug)]
struct Room {
    link: LinkId,
    len: usize,
    begins: bool,
}

/// What the client knows of a link beside its calls.
struct Slot {
    max_payload: usize,
    session_id: u64,
    /// For a brokered session: who provides it, and what it offers.
    provided: Option<Provided>,
    /// Messages coming in chunks on the link, and where their bytes go.
    inbound: Inbound,
    /// Credits and cancels that found no room yet, in order.
    pending: VecDeque<Control>,
}

impl Slot {
    fn new(max_payload: usize, session_id: u64, provided: Option<Provided>, max_message: u64) -> Slot {
        Slot { max_payload, session_id, provided, inbound: Inbound::new(max_message), pending: VecDeque::new() }
    }
}

/// A caller's reply buffer, lent to the assembly of its reply.
struct Lent {
    /// The call it is for, once its request is written.
    ticket: Option<Ticket>,
    buf: Vec<u8>,
}

/// A brokered session's provider and services.
struct Provided {
    provider: Credentials,
    services: Vec<ServiceEntry>,
}

/// A connection to ipcd, and through it to the providers of the services
/// it brokers. Calls take `&mut self`; use one client per thread (a client
/// is `Send`). Requests may be pipelined: [`Client::send`] several, then
/// [`Client::wait`] or [`Client::recv`] their replies.
pub struct Client {
    /// Unique in the process; tickets and services carry it.
    id: u64,
    /// The daemon link first, then the brokered ones. A place is never
    /// removed: services name it.
    links: Vec<Link>,
    slots: Vec<Slot>,
    calls: Calls,
    /// Where and how it connected, to connect again.
    target: Transport,
    options: ClientOptions,
    /// The daemon's own services, from its welcome.
    services: HashMap<String, u16>,
    /// The names resolved through the broker, with the link and id of the
    /// latest session that offers each.
    provided: HashMap<String, (LinkId, u16)>,
    /// The broker connection, once a provided name was resolved (until
    /// it is found lost).
    broker: Option<Broker>,
    /// The last attempt to open a broker connection found a daemon that
    /// has no broker (it brokers no names).
    brokerless: bool,
    reconnects: u64,
    /// How long the connect that made the latest reconnect took.
    last_reconnect: Option<Duration>,
    /// Scratch for error replies read in place, and chunks dropped.
    scratch: Vec<u8>,
    /// An upload's buffer, kept for the next.
    upload_buf: Vec<u8>,
    /// The caller's buffer of the `call_into` under way, in which its
    /// reply is assembled if it comes in chunks.
    lent: Option<Lent>,
    pace: Pace,
    /// What the next sleep waits for on each link (scratch, one per link).
    plan: Vec<Option<Await>>,
    /// Where the next receive starts looking, so that no link is always
    /// read last.
    next_link: LinkId,
    /// The streams whose handles were dropped, to cancel.
    dropped: Arc<Dropped>,
    /// Changes with the set of fds a poll loop waits on (`poll.rs`).
    fd_epoch: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("transport", &self.target.name())
            .field("session_id", &self.session_id())
            .field("max_payload", &self.max_payload())
            .field("links", &self.links.len())
            .field("in_flight", &self.in_flight())
            .field("lost", &self.calls.lost(DAEMON).map(|l| &l.reason))
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
        let (link, welcome) = connect::open(&transport, &options)?;
        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed); // Relaxed: only uniqueness matters.
        let mut client = Client {
            id,
            links: Vec::new(),
            slots: Vec::new(),
            calls: Calls::new(id),
            target: transport,
            services: welcome.services.iter().map(|s| (s.name.clone(), s.id)).collect(),
            provided: HashMap::new(),
            broker: None,
            brokerless: false,
            reconnects: 0,
            last_reconnect: None,
            scratch: Vec::new(),
            upload_buf: Vec::new(),
            lent: None,
            pace: Pace::new(options.spin),
            plan: Vec::new(),
            next_link: 0,
            dropped: Arc::new(Dropped::with_capacity(options.max_streams)),
            fd_epoch: 0,
            options,
        };
        let slot = Slot::new(welcome.max_payload as usize, welcome.session_id, None, client.options.max_message);
        let daemon = client.add_link(link, slot);
        debug_assert_eq!(daemon, DAEMON);
        Ok(client)
    }

    fn add_link(&mut self, link: Link, slot: Slot) -> LinkId {
        self.links.push(link);
        self.slots.push(slot);
        self.fd_epoch += 1;
        // Room for every link's part of a sleep, so sleeps allocate nothing.
        self.plan = Vec::with_capacity(self.links.len());
        self.calls.add_link()
    }

    /// The transport's short name: `shm`, `uds` or `tcp`.
    pub fn transport(&self) -> &'static str {
        self.target.name()
    }

    fn handle(&self, link: LinkId, id: u16, name: &str) -> Service {
        Service { client: self.id, link: link as u32, id, name: Arc::from(name) }
    }

    /// The names of the services the daemon offers itself.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The largest request (and reply) payload to the daemon's services,
    /// in bytes.
    pub fn max_payload(&self) -> usize {
        self.slots[DAEMON].max_payload
    }

    /// The largest request (and reply) payload to `service`, in bytes.
    pub fn max_payload_of(&self, service: &Service) -> Result<usize, CallError> {
        Ok(self.slots[self.link_of(service)?].max_payload)
    }

    /// The largest payload of one frame on any of its links: the longest
    /// reply that comes whole, not in chunks.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn largest_payload(&self) -> usize {
        self.slots.iter().map(|s| s.max_payload).max().unwrap_or(0)
    }

    /// The daemon's id for this client's session with it (it appears in
    /// the daemon's logs).
    pub fn session_id(&self) -> u64 {
        self.slots[DAEMON].session_id
    }

    /// With shared memory and [`DoorbellKind::Pollable`](crate::DoorbellKind),
    /// the daemon link's fd that becomes readable when a reply may be
    /// waiting, for a poll loop of your own.
    pub fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        self.links[DAEMON].doorbell_fd()
    }

    /// As [`Client::doorbell_fd`], for every link: a poll loop that calls
    /// brokered services watches them all.
    pub fn doorbell_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.links.iter().filter_map(Link::doorbell_fd)
    }

    /// Requests sent whose outcome has not been handed out yet.
    pub fn in_flight(&self) -> usize {
        self.calls.outstanding()
    }

    /// Whether the daemon link is up (as far as the client knows: a daemon
    /// that just died is noticed by the next call).
    pub fn is_connected(&self) -> bool {
        self.calls.lost(DAEMON).is_none()
    }

    /// How many times the client has connected to the daemon again (see
    /// [`Reconnect`](crate::Reconnect)).
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// How long the connect of the latest reconnect took: the attempt that
    /// succeeded, from its start to the daemon's welcome checked and the
    /// segment mapped (the pauses and failed attempts before it left out).
    /// `None` before the first reconnect.
    pub fn last_reconnect_took(&self) -> Option<Duration> {
        self.last_reconnect
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
    /// contents). Allocates nothing once `reply` has grown large enough: a
    /// reply in chunks is assembled in `reply` itself, which grows once, to
    /// the length the reply announces, if it is too short. A call that
    /// fails may leave `reply` empty, without its capacity.
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
        // A reply in chunks is assembled in `reply` itself (lent until its
        // first chunk comes, and handed back whole).
        self.lent = Some(Lent { ticket: None, buf: std::mem::take(reply) });
        let found = self.send_message(service, request, &mut dl).and_then(|ticket| {
            self.lend_to(ticket);
            self.await_reply(ticket, &mut dl)
        });
        if let Some(lent) = self.lent.take() {
            *reply = lent.buf;
        }
        self.take_found(found?, reply);
        Ok(())
    }

    /// The buffer lent by the `call_into` under way is for `ticket`'s
    /// reply (its request's first frame is written).
    pub(super) fn lend_to(&mut self, ticket: Ticket) {
        if let Some(lent) = self.lent.as_mut().filter(|l| l.ticket.is_none()) {
            lent.ticket = Some(ticket);
        }
    }

    /// The buffer lent for `ticket`'s reply, if one is: taken, empty.
    pub(super) fn borrow_lent(&mut self, ticket: Option<Ticket>) -> Option<Vec<u8>> {
        if ticket.is_none() || self.lent.as_ref().is_none_or(|l| l.ticket != ticket) {
            return None;
        }
        let mut buf = self.lent.take().expect("lent").buf;
        buf.clear();
        Some(buf)
    }

    /// Calls `service` with a request of `len` bytes that `fill` writes in
    /// place, and returns a guard over the reply, read in place. Nothing is
    /// copied on the way but the bytes `fill` writes and those you read out
    /// of the guard; nothing is allocated.
    ///
    /// The request is one frame: at most [`Client::max_payload_of`] its
    /// service's link ([`CallError::TooLarge`] past it). The reply's space
    /// stays taken until the guard is dropped; a reply that came in chunks
    /// is held by the guard, assembled.
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
        let found = self.await_reply(ticket, &mut dl)?;
        Ok(ReplyGuard::new(self, found))
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

    /// Queues a request without waiting: [`CallError::Full`] when its link
    /// has no room for it now. Queued requests reach their peer at the next
    /// wait, receive, call or [`Client::flush`]. The request is one frame
    /// ([`CallError::TooLarge`] past [`Client::max_payload_of`]): a longer
    /// one may have to wait for room between its chunks ([`Client::send`]).
    pub fn try_send(&mut self, service: &Service, request: &[u8]) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(Duration::ZERO);
        self.start(service, request.len(), |buf| buf.write_at(0, request), false, &mut dl).map(|(t, _)| t)
    }

    /// Queues a request, waiting up to the call timeout for room in its
    /// link ([`CallError::SendTimeout`] if none came: not sent). Queued
    /// requests reach their peer at the next wait, receive, call or
    /// [`Client::flush`] (and whenever `send` must wait for room). While it
    /// waits, replies that arrive, on any link, are kept for
    /// [`Client::wait`] and [`Client::recv`], so no peer is stuck behind
    /// them.
    ///
    /// A request longer than its link's largest payload (up to
    /// [`ClientOptions::max_message`]) goes out as chunks, all of them
    /// before `send` returns: it waits for room between them as it waits
    /// for room for one frame. If no room comes in time it is cancelled,
    /// not run ([`CallError::SendTimeout`]).
    pub fn send(&mut self, service: &Service, request: &[u8]) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        self.send_message(service, request, &mut dl)
    }

    /// As [`Client::send`], with a request of `len` bytes that `fill`
    /// writes in place (one frame: at most [`Client::max_payload_of`]).
    pub fn send_with(
        &mut self,
        service: &Service,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>),
    ) -> Result<Ticket, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        self.start(service, len, fill, true, &mut dl).map(|(t, _)| t)
    }

    /// Hands the queued requests to their peers: all of them over shared
    /// memory; over a stream, what the socket takes without blocking (the
    /// rest goes out during the next wait, receive or call). An error if
    /// the daemon link (or a link that fails now) is lost.
    pub fn flush(&mut self) -> Result<(), CallError> {
        self.collect_dropped();
        let mut first = None;
        for link in 0..self.links.len() {
            if let Some(refused) = self.calls.refusal(link) {
                if link == DAEMON {
                    first.get_or_insert(refused);
                }
                continue;
            }
            let flushed = self.send_controls(link).and_then(|()| self.links[link].flush());
            if let Err(e) = self.note(link, flushed) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits up to the call timeout for the reply to `ticket`, which comes
    /// on its link (replies to others that come meanwhile, on any link,
    /// are kept aside for them). On timeout the ticket is spent: its reply
    /// is dropped when it arrives.
    pub fn wait(&mut self, ticket: Ticket) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.wait_into(ticket, &mut reply)?;
        Ok(reply)
    }

    /// As [`Client::wait`], writing the reply into `reply`.
    pub fn wait_into(&mut self, ticket: Ticket, reply: &mut Vec<u8>) -> Result<(), CallError> {
        self.wait_into_timeout(ticket, reply, self.options.call_timeout)
    }

    /// As [`Client::wait`], with its own timeout (on timeout the ticket is
    /// spent, as there).
    pub fn wait_timeout(&mut self, ticket: Ticket, timeout: Duration) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.wait_into_timeout(ticket, &mut reply, timeout)?;
        Ok(reply)
    }

    /// As [`Client::wait_into`], with its own timeout.
    pub fn wait_into_timeout(
        &mut self,
        ticket: Ticket,
        reply: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let mut dl = Deadline::new(timeout);
        let found = self.await_reply(ticket, &mut dl)?;
        self.take_found(found, reply);
        Ok(())
    }

    /// Waits up to the call timeout for the next reply to any request in
    /// flight, on any link, and returns it as a [`Received`]: its
    /// `ticket`, and its `outcome` (the reply, or that request's error).
    /// Replies kept aside come first, in arrival order; then whichever
    /// link has a reply first (the links take turns being looked at
    /// first). The same shape as [`Client::try_recv`] and the async
    /// client's `recv`.
    ///
    /// An error means no outcome came: [`CallError::Timeout`] (the
    /// requests stay in flight) or [`CallError::NothingInFlight`]. A lost
    /// link is not such an error: each request that was in flight on it
    /// comes back in turn with its own outcome (its reply if it had
    /// arrived, else [`CallError::Disconnected`] or [`CallError::Shutdown`]).
    ///
    /// ```no_run
    /// # let mut client = ipc_client::Client::connect()?;
    /// # let echo = client.service("echo")?;
    /// let sent = client.send(&echo, b"one")?;
    /// let got = client.recv()?; // no outcome came: the `?`
    /// assert_eq!(got.ticket, sent);
    /// let reply = got.outcome?; // this request's own error: the other `?`
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn recv(&mut self) -> Result<Received, CallError> {
        let mut reply = Vec::new();
        let got = self.recv_into(&mut reply)?;
        Ok(Received { ticket: got.ticket, outcome: got.outcome.map(|()| reply) })
    }

    /// As [`Client::recv`], writing a reply into `reply`. Allocates nothing
    /// once `reply` has grown large enough (unless replies had to be kept
    /// aside while [`Client::send`] or [`Client::wait`] waited for another).
    pub fn recv_into(&mut self, reply: &mut Vec<u8>) -> Result<Received<()>, CallError> {
        self.collect_dropped();
        if let Some((ticket, settled)) = self.calls.begin_recv()? {
            return Ok(Received { ticket, outcome: self.hand_out(ticket.link(), settled, reply) });
        }
        let mut dl = Deadline::new(self.options.call_timeout);
        self.flush_live();
        loop {
            // A loss (in the flush, or on the way) settles outcomes.
            if let Some((ticket, settled)) = self.calls.begin_recv()? {
                return Ok(Received { ticket, outcome: self.hand_out(ticket.link(), settled, reply) });
            }
            if let Next::Reply(link, r, ticket) = self.next_reply(Awaiting::Any, &mut dl)? {
                self.next_link = link + 1;
                self.links[link].read_all(&r, reply);
                // Read, the reply is its request's outcome whatever
                // `release` says.
                let _ = self.release(link, &r);
                return Ok(Received { ticket, outcome: self.outcome_on(link, r.header(), reply) });
            }
        }
    }

    /// Hands out a settled outcome: a reply kept aside (its body moved
    /// into `reply`), or an error.
    fn hand_out(&self, link: LinkId, settled: Settled, reply: &mut Vec<u8>) -> Result<(), CallError> {
        match settled {
            Settled::Reply { header, body } => {
                *reply = body;
                self.outcome_on(link, header, reply)
            }
            Settled::Failed(e) => Err(e),
        }
    }

    /// A settled outcome as a wait hands it out.
    fn found(&self, link: LinkId, settled: Settled) -> Result<Found, CallError> {
        match settled {
            Settled::Reply { header, mut body } => {
                self.outcome_on(link, header, &mut body).map(|()| Found::Stashed(body))
            }
            Settled::Failed(e) => Err(e),
        }
    }

    /// Copies a found reply into `reply` and hands its space back.
    fn take_found(&mut self, found: Found, reply: &mut Vec<u8>) {
        match found {
            Found::Stashed(body) => *reply = body,
            Found::Link(link, r) => {
                self.links[link].read_all(&r, reply);
                // Read, the reply is its request's outcome whatever
                // `release` says.
                let _ = self.release(link, &r);
            }
        }
    }

    pub(crate) fn link(&self, link: LinkId) -> &Link {
        &self.links[link]
    }

    /// Consumes a reply on `link` once it is read (or dropped), handing its
    /// space back to the peer. A failure (the peer cannot be rung) loses
    /// the link, which the next operation on it reports; it changes nothing
    /// for this reply: once claimed and read, it is its request's outcome.
    pub(crate) fn release(&mut self, link: LinkId, r: &ReplyRef) -> Result<(), CallError> {
        let consumed = self.links[link].consume(r);
        self.note(link, consumed)
    }

    /// The link a service's calls go on, if the service is this client's.
    fn link_of(&self, service: &Service) -> Result<LinkId, CallError> {
        if service.client != self.id || service.link as usize >= self.links.len() {
            return Err(CallError::ForeignService { name: service.name.to_string() });
        }
        Ok(service.link as LinkId)
    }

    /// Writes a request of one frame, waiting for room (with `wait`) until
    /// the deadline, and records it as sent.
    fn start<R>(
        &mut self,
        service: &Service,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
        wait: bool,
        dl: &mut Deadline,
    ) -> Result<(Ticket, R), CallError> {
        let link = self.link_of(service)?;
        let r = self.write_request(service, 0, len, fill, wait, dl)?;
        Ok((self.calls.sent(link, service.id), r))
    }

    /// Writes a frame that begins a request to `service` (a request, its
    /// first chunk, or a stream's opening) with `flags` and the link's
    /// next id, waiting for room (with `wait`) until the deadline. The
    /// caller records it in the state machine at once.
    fn write_request<R>(
        &mut self,
        service: &Service,
        flags: u16,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
        wait: bool,
        dl: &mut Deadline,
    ) -> Result<R, CallError> {
        let link = self.link_of(service)?;
        self.collect_dropped();
        self.ensure_connected(service, link, dl)?;
        let max = self.slots[link].max_payload;
        if len > max {
            return Err(CallError::TooLarge { len, max });
        }
        let id = self.calls.next_id(link);
        let mut fill = Some(fill);
        loop {
            // Credits and cancels queued go first, in order.
            let written = match self.send_controls(link) {
                Ok(()) if !self.slots[link].pending.is_empty() => Ok(None),
                Ok(()) => self.links[link]
                    .try_write(service.id, flags, id, len, |buf| (fill.take().expect("filled once"))(buf)),
                Err(e) => Err(e),
            };
            match self.note(link, written).map_err(|e| self.unsent(link, e))? {
                Some(r) => return Ok(r),
                None if !wait => return Err(CallError::Full { in_flight: self.in_flight() }),
                None => self.wait_for_room(Room { link, len, begins: true }, dl)?,
            }
        }
    }

    /// Waits for `room`. Its link's peer may be stuck on a full reply
    /// path, and so may the other links' peers: the replies already there
    /// are taken aside first, and again after the wait.
    fn wait_for_room(&mut self, room: Room, dl: &mut Deadline) -> Result<(), CallError> {
        let link = room.link;
        self.stash_replies();
        if let Some(refused) = self.calls.refusal(link) {
            return Err(refused);
        }
        match self.sleep(Some(room), dl) {
            // Nothing was written: the request did not run.
            Err(CallError::Timeout { after }) => {
                return Err(CallError::SendTimeout { after, in_flight: self.in_flight() })
            }
            other => other?,
        }
        self.notice_losses();
        self.stash_replies();
        self.calls.refusal(link).map_or(Ok(()), Err)
    }

    /// The outcome of a request whose writing failed with `e`: a lost
    /// link (already settled) means it was never sent.
    fn unsent(&self, link: LinkId, e: CallError) -> CallError {
        match e {
            CallError::Disconnected { reason } => {
                self.calls.refusal(link).unwrap_or(CallError::NotConnected { reason })
            }
            other => other,
        }
    }

    /// Waits for `ticket`'s reply and leaves it unconsumed on its link for
    /// the caller (or hands over the one kept aside); an error reply is
    /// consumed and returned as the error.
    fn await_reply(&mut self, ticket: Ticket, dl: &mut Deadline) -> Result<Found, CallError> {
        let link = ticket.link();
        self.collect_dropped();
        if let Some(settled) = self.calls.begin_wait(ticket)? {
            return self.found(link, settled);
        }
        self.flush_live();
        loop {
            let next = match self.next_reply(Awaiting::Ticket(ticket), dl) {
                Ok(next) => next,
                // A timeout: the ticket is spent (unless a loss on the way
                // settled it, which is then its outcome), and the rest of
                // a reply in chunks is dropped as it comes.
                Err(e) => {
                    if matches!(e, CallError::Timeout { .. }) {
                        self.slots[link].inbound.forsake(ticket.id());
                    }
                    return self.calls.wait_failed(ticket, e).and_then(|s| self.found(link, s));
                }
            };
            match next {
                Next::Reply(_, r, _) if r.header().is_error() => {
                    let mut body = std::mem::take(&mut self.scratch);
                    self.links[link].read_all(&r, &mut body);
                    let outcome = self.outcome_on(link, r.header(), &mut body);
                    self.scratch = body;
                    // Read, the error is its request's outcome whatever
                    // `release` says.
                    let _ = self.release(link, &r);
                    outcome?;
                    unreachable!("an error reply gives an error outcome");
                }
                Next::Reply(_, r, _) => return Ok(Found::Link(link, r)),
                // A loss on the way may have settled this ticket along with
                // the others: that is its outcome, handed out here only.
                Next::Settled => {
                    if let Some(settled) = self.calls.take_settled(ticket) {
                        return self.found(link, settled);
                    }
                }
            }
        }
    }

    /// The outcome a reply on `link` carries (see [`Client::outcome`]),
    /// an unknown service named as that link's peer knows it.
    fn outcome_on(&self, link: LinkId, header: FrameHeader, body: &mut Vec<u8>) -> Result<(), CallError> {
        let outcome = self.outcome(header, body);
        match (outcome, &self.slots[link].provided) {
            (Err(CallError::UnknownService { .. }), Some(provided)) => {
                let name = provided.services.iter().find(|s| s.id == header.service);
                let name = name.map_or_else(|| format!("#{}", header.service), |s| s.name.clone());
                Err(CallError::UnknownService { name })
            }
            (outcome, _) => outcome,
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
            ErrorCode::Cancelled => CallError::Cancelled,
            // A stream's deadline: its handle says how long it was.
            ErrorCode::Timeout => CallError::Timeout { after: Duration::ZERO },
            ErrorCode::TooMany => CallError::TooMany { message },
            ErrorCode::MessageTooLarge => CallError::MessageTooLarge { message },
            _ => CallError::Remote { code: None, message },
        })
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

    /// A deadline fixed at `at`, reported as a timeout of `timeout`.
    fn until(at: Instant, timeout: Duration) -> Deadline {
        Deadline { timeout, at: Some(at) }
    }

    fn at(&mut self) -> Instant {
        *self.at.get_or_insert_with(|| Instant::now() + self.timeout)
    }
}

mod inbound;
mod links;
mod messages;
mod outgoing;
mod poll;
mod replies;
mod streams;

pub use messages::{ReplyReader, Upload};
#[cfg_attr(not(feature = "tokio"), allow(unused_imports))]
pub(crate) use outgoing::{Gathered, Outgoing, Pushed};
pub use poll::{Armed, FdToken, Received, WaitFd};
pub use streams::Stream;
#[cfg(test)]
mod tests;
