//! The bookkeeping of requests and their outcomes, with no I/O: the ids
//! each link gives its requests, the requests in flight on each link, the
//! replies read while another was awaited (the stash), the outcomes of
//! requests lost with their link (the orphans), and the tickets given up
//! on. Every link and transport shares it: the client tells it what it
//! wrote and read, and it says what each reply is for and what each
//! request's outcome is.
//!
//! # Exactly one outcome per request
//!
//! A request is sent when [`Calls::sent`] records it (its frame is on the
//! link) and gets its [`Ticket`]. From then until its outcome is handed out
//! it is in exactly one of these places:
//!
//! - in flight on its link, waiting for a reply (its link's list, in id
//!   order);
//! - abandoned: still in its link's list, marked, because its caller was
//!   handed `Timeout`, which is its outcome; its reply is dropped when it
//!   comes;
//! - kept: its reply was read while another was awaited, and waits in the
//!   stash;
//! - orphaned: its link was lost before a reply came, and its outcome
//!   (`Shutdown` or `Disconnected`) was decided then.
//!
//! A reply is claimed with [`Calls::arrived`], which takes its request out
//! of the in-flight list at once: the reply is then delivered or kept, so a
//! later loss of the link cannot give that request a second outcome.
//! Handing an outcome out of the stash or the orphans removes it. A reply
//! that answers nothing in flight on its link, or answers under another
//! service than the request's, is a [`Violation`]: the client then loses
//! that link.
//!
//! A reply that comes in chunks is claimed when its last chunk has come
//! (the client checks each chunk against [`Calls::expects`] meanwhile, so
//! a loss before the end leaves the request in flight and gives it its
//! loss's outcome). A reply refused on the way ([`Calls::refuse`]: longer
//! than the client takes) is claimed at once, with that error.
//!
//! Ids increase strictly per link, for the client's whole life, also
//! across the links that fill a slot in turn (a reconnection): each
//! link's peer checks that they increase, and a ticket of an old link can
//! never match a request of the new one.
//!
//! # Streams
//!
//! A stream ([`Calls::open_stream`]) takes the next id of its link like a
//! request, and stays in its link's list of streams until two things have
//! happened: its terminal outcome was handed out (or its handle dropped),
//! and it is closed on the wire (its terminal frame came, or the link was
//! lost). Meanwhile:
//!
//! - Items come in order and are queued until handed out
//!   ([`Calls::take_next`]); each one the peer begins must be within the
//!   credit granted ([`Calls::item_begins`]), else it is a [`Violation`].
//!   The client grants more only as items are handed out
//!   ([`Calls::credit_due`]), never so much that the credit granted minus
//!   the items handed out exceeds the stream's window: at most a window of
//!   items is ever queued or on its way.
//! - Its terminal outcome is decided once and handed out once, after
//!   every item queued before it: the peer's end or error
//!   ([`Calls::stream_ended`]), the client's own verdict (a deadline, an
//!   item too long: [`Calls::give_up`]), a cancel ([`Calls::cancel`],
//!   which also drops the items queued, and replaces a terminal decided but
//!   not handed out), or the loss of the link (`Shutdown` for a stream the
//!   peer said it never took, else `Disconnected`).
//! - Once the client gave up on a stream (cancelled, gave up, or dropped
//!   its handle), its later items are dropped as they come; its terminal
//!   frame, when it comes, retires it.

use std::collections::VecDeque;

use ipc_core::FrameHeader;

use crate::error::CallError;

/// In-flight entries reserved per link, so that calls allocate nothing.
const IN_FLIGHT_RESERVE: usize = 256;

/// A link's place in its client: 0 is the daemon link, brokered links
/// follow in the order they were first resolved. A place is never reused
/// by another session's services (a reconnection fills it again).
pub(crate) type LinkId = usize;

/// A request sent and not yet answered: pass it to
/// [`Client::wait`](crate::Client::wait), or take replies in arrival order
/// with [`Client::recv`](crate::Client::recv).
///
/// A ticket belongs to the client that sent its request and names the
/// link it went out on: another client refuses it
/// ([`CallError::ForeignTicket`]).
#[must_use = "a ticket is the only way to match its request's outcome"]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket {
    client: u64,
    link: u32,
    id: u64,
}

impl Ticket {
    /// The request id on the wire (increasing per link).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn link(&self) -> LinkId {
        self.link as LinkId
    }
}

/// A stream's place: its link and the id of its opening request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct StreamKey {
    pub(crate) link: LinkId,
    pub(crate) id: u64,
}

/// What the reader of replies waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// Any reply: `recv`.
    Any,
    /// This ticket's reply: `wait` and the calls.
    Ticket(Ticket),
    /// This ticket's reply, chunk by chunk as it comes: a reader of it.
    Chunks(Ticket),
    /// An item or the end of this stream; replies are read aside.
    Stream(StreamKey),
    /// None: replies are read aside (while waiting for room, or from a
    /// link that is lost).
    Nothing,
}

/// What to do with a reply just claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// It is what the reader awaits: hand it out as `ticket`'s outcome.
    Deliver(Ticket),
    /// Read it aside with [`Calls::keep`]: it is `ticket`'s outcome.
    Keep(Ticket),
    /// Its caller gave up on it: consume it unread.
    Drop,
}

/// A reply that answers nothing in flight: the peer broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// No request with this id is in flight on the link.
    NotInFlight {
        /// The reply's request id.
        id: u64,
    },
    /// The request went to one service and the reply came from another.
    WrongService {
        /// The request id.
        id: u64,
        /// The service the request went to.
        sent: u16,
        /// The service the reply names.
        answered: u16,
    },
    /// An item of a stream beyond the credit the client granted it.
    NoCredit {
        /// The stream's id.
        id: u64,
        /// The items the client let it send in all.
        granted: u64,
    },
}

impl Violation {
    /// What happened, for the loss's reason; `peer` names the sender.
    pub(crate) fn describe(&self, peer: &str) -> String {
        match *self {
            Violation::NotInFlight { id } => format!("{peer} sent a reply to request {id}, which is not in flight"),
            Violation::WrongService { id, sent, answered } => {
                format!("{peer} answered request {id} of service {sent} as service {answered}")
            }
            Violation::NoCredit { id, granted } => {
                format!("{peer} sent stream {id} an item beyond the {granted} it was granted")
            }
        }
    }
}

/// An outcome decided before it was handed out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The reply, read aside (an error reply is decoded when handed out).
    Reply {
        /// Its header.
        header: FrameHeader,
        /// Its payload.
        body: Vec<u8>,
    },
    /// An error: the link was lost first, or the reply was refused.
    Failed(CallError),
}

/// What a stream hands out next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamNext {
    /// An item, in order.
    Item(Vec<u8>),
    /// Its terminal outcome: its end, or an error.
    End(Result<(), CallError>),
}

/// How a link was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lost {
    /// What happened.
    pub(crate) reason: String,
    /// The last request the peer took, if it closed on purpose.
    pub(crate) closed_after: Option<u64>,
}

/// A request on a link whose reply has not been read.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    id: u64,
    service: u16,
    /// Its caller gave up (timed out): the reply is dropped when it comes.
    abandoned: bool,
}

/// A stream opened on a link and not yet retired (see the module docs).
#[derive(Debug)]
struct StreamCalls {
    id: u64,
    service: u16,
    window: u32,
    /// Items the peer may send in all: the window at the opening, plus
    /// every credit granted since.
    granted: u64,
    /// Items the peer began sending.
    started: u64,
    /// Items handed out, or dropped by a cancel.
    consumed: u64,
    /// Items complete and not yet handed out, in order.
    items: VecDeque<Vec<u8>>,
    /// The terminal outcome, once decided; handed out after the items.
    end: Option<Result<(), CallError>>,
    /// Open on the wire: no terminal frame yet, and the link is up.
    wire: bool,
    /// The caller's handle is alive and has not been handed the terminal.
    handle: bool,
    /// Items that come from now on are dropped.
    dropping: bool,
    /// A cancel was sent (or is to be).
    cancelled: bool,
}

impl StreamCalls {
    fn retired(&self) -> bool {
        !self.wire && !self.handle
    }
}

struct LinkCalls {
    next_id: u64,
    /// Sent requests whose replies have not been read, in id order.
    in_flight: VecDeque<InFlight>,
    /// Streams not retired, in id order.
    streams: Vec<StreamCalls>,
    lost: Option<Lost>,
}

/// The state of every request a client sent; see the module docs.
pub(crate) struct Calls {
    client: u64,
    links: Vec<LinkCalls>,
    /// Outcomes settled while waiting for another (replies read aside,
    /// replies refused), in arrival order.
    stash: VecDeque<(Ticket, Settled)>,
    /// Outcomes of requests lost with their link, in the order of the
    /// losses and then of ids, not yet handed out.
    orphans: VecDeque<(Ticket, CallError)>,
}

impl Calls {
    /// The bookkeeping of client `client`, with no link yet.
    pub(crate) fn new(client: u64) -> Calls {
        Calls { client, links: Vec::new(), stash: VecDeque::new(), orphans: VecDeque::new() }
    }

    /// Adds a link, up; returns its place.
    pub(crate) fn add_link(&mut self) -> LinkId {
        self.links.push(LinkCalls {
            next_id: 1,
            // Room for a deep pipeline up front, so calls allocate nothing.
            in_flight: VecDeque::with_capacity(IN_FLIGHT_RESERVE),
            streams: Vec::new(),
            lost: None,
        });
        self.links.len() - 1
    }

    /// Whether `ticket` was made by this client.
    pub(crate) fn check(&self, ticket: Ticket) -> Result<(), CallError> {
        if ticket.client != self.client || ticket.link() >= self.links.len() {
            return Err(CallError::ForeignTicket { id: ticket.id });
        }
        Ok(())
    }

    /// The id the next request on `link` carries.
    pub(crate) fn next_id(&self, link: LinkId) -> u64 {
        self.links[link].next_id
    }

    /// Records that a request to `service` with the next id is on `link`.
    ///
    /// # Panics
    ///
    /// Panics if the link is lost: nothing is written on a lost link.
    pub(crate) fn sent(&mut self, link: LinkId, service: u16) -> Ticket {
        let calls = &mut self.links[link];
        assert!(calls.lost.is_none(), "a request recorded on lost link {link}");
        let id = calls.next_id;
        calls.next_id += 1;
        calls.in_flight.push_back(InFlight { id, service, abandoned: false });
        Ticket { client: self.client, link: link as u32, id }
    }

    /// Claims the in-flight request a reply on `link` answers, and says
    /// what to do with the reply, given what the reader awaits.
    pub(crate) fn arrived(
        &mut self,
        link: LinkId,
        header: &FrameHeader,
        awaiting: Awaiting,
    ) -> Result<Arrival, Violation> {
        let id = header.request_id;
        let in_flight = &mut self.links[link].in_flight;
        let entry = match in_flight.binary_search_by_key(&id, |p| p.id) {
            Ok(i) if in_flight[i].service == header.service => in_flight.remove(i).expect("index from the search"),
            Ok(i) => return Err(Violation::WrongService { id, sent: in_flight[i].service, answered: header.service }),
            Err(_) => return Err(Violation::NotInFlight { id }),
        };
        if entry.abandoned {
            return Ok(Arrival::Drop);
        }
        let ticket = Ticket { client: self.client, link: link as u32, id };
        Ok(match awaiting {
            Awaiting::Any => Arrival::Deliver(ticket),
            Awaiting::Ticket(t) | Awaiting::Chunks(t) if t == ticket => Arrival::Deliver(ticket),
            _ => Arrival::Keep(ticket),
        })
    }

    /// The request the first chunk of a reply on `link` answers, without
    /// claiming it (that waits for the last chunk): its ticket, or `None`
    /// if its caller gave up on it (the chunks are dropped as they come).
    pub(crate) fn expects(&self, link: LinkId, header: &FrameHeader) -> Result<Option<Ticket>, Violation> {
        let id = header.request_id;
        let in_flight = &self.links[link].in_flight;
        match in_flight.binary_search_by_key(&id, |p| p.id) {
            Ok(i) if in_flight[i].service != header.service => {
                Err(Violation::WrongService { id, sent: in_flight[i].service, answered: header.service })
            }
            Ok(i) if in_flight[i].abandoned => Ok(None),
            Ok(_) => Ok(Some(Ticket { client: self.client, link: link as u32, id })),
            Err(_) => Err(Violation::NotInFlight { id }),
        }
    }

    /// Claims request `id` on `link` with `error` as its outcome (its
    /// reply was refused on the way), kept aside for its caller; nothing
    /// if its caller gave up on it, or it is not in flight.
    pub(crate) fn refuse(&mut self, link: LinkId, id: u64, error: CallError) {
        let in_flight = &mut self.links[link].in_flight;
        let Ok(i) = in_flight.binary_search_by_key(&id, |p| p.id) else { return };
        let entry = in_flight.remove(i).expect("index from the search");
        if !entry.abandoned {
            let ticket = Ticket { client: self.client, link: link as u32, id };
            self.stash.push_back((ticket, Settled::Failed(error)));
        }
    }

    /// Gives up on `ticket` without an outcome settled for it (its caller
    /// was handed one already): its reply is dropped when it comes.
    pub(crate) fn abandon(&mut self, ticket: Ticket) {
        if let Some(entry) = self.find_mut(ticket) {
            entry.abandoned = true;
        }
    }

    /// Whether `ticket` (this client's) still has an outcome to hand out:
    /// in flight and not given up on, kept, or orphaned; else
    /// [`CallError::ForeignTicket`] or [`CallError::UnknownTicket`].
    pub(crate) fn pending(&self, ticket: Ticket) -> Result<(), CallError> {
        self.check(ticket)?;
        let live = self.find(ticket).is_some_and(|e| !e.abandoned)
            || self.kept(ticket)
            || self.orphans.iter().any(|(t, _)| *t == ticket);
        if live {
            Ok(())
        } else {
            Err(CallError::UnknownTicket { id: ticket.id })
        }
    }

    /// Whether `ticket`'s outcome was kept aside (a reply, or a refusal),
    /// not yet handed out.
    pub(crate) fn kept(&self, ticket: Ticket) -> bool {
        self.stash.iter().any(|(t, _)| *t == ticket)
    }

    /// Keeps a reply that [`Calls::arrived`] said to keep.
    pub(crate) fn keep(&mut self, ticket: Ticket, header: FrameHeader, body: Vec<u8>) {
        self.stash.push_back((ticket, Settled::Reply { header, body }));
    }

    /// The start of a wait for `ticket`: its outcome if it is settled
    /// already, `None` if its reply is still to come, or
    /// [`CallError::UnknownTicket`] if it has no outcome left to hand out
    /// (handed out already, or timed out).
    pub(crate) fn begin_wait(&mut self, ticket: Ticket) -> Result<Option<Settled>, CallError> {
        self.check(ticket)?;
        if let Some(settled) = self.take_settled(ticket) {
            return Ok(Some(settled));
        }
        match self.find(ticket) {
            Some(entry) if !entry.abandoned => Ok(None),
            _ => Err(CallError::UnknownTicket { id: ticket.id }),
        }
    }

    /// A wait for `ticket` ended with `error` before its reply came: its
    /// outcome is what settled meanwhile (its link was lost), else `error`;
    /// a timeout abandons the ticket (its late reply will be dropped).
    pub(crate) fn wait_failed(&mut self, ticket: Ticket, error: CallError) -> Result<Settled, CallError> {
        if let Some(settled) = self.take_settled(ticket) {
            return Ok(settled);
        }
        if matches!(error, CallError::Timeout { .. }) {
            self.abandon(ticket);
        }
        Err(error)
    }

    /// The start of a receive: the next outcome settled already, `None` if
    /// replies are still to come, or [`CallError::NothingInFlight`].
    pub(crate) fn begin_recv(&mut self) -> Result<Option<(Ticket, Settled)>, CallError> {
        if let Some(next) = self.next_settled() {
            return Ok(Some(next));
        }
        if (0..self.links.len()).any(|link| self.waiting(link)) {
            return Ok(None);
        }
        Err(CallError::NothingInFlight)
    }

    /// The next outcome already settled, in the order receives hand them
    /// out: replies kept aside (in arrival order), then the outcomes of
    /// requests lost with their link.
    pub(crate) fn next_settled(&mut self) -> Option<(Ticket, Settled)> {
        if let Some(kept) = self.stash.pop_front() {
            return Some(kept);
        }
        self.orphans.pop_front().map(|(ticket, error)| (ticket, Settled::Failed(error)))
    }

    /// Takes `ticket`'s outcome if it is settled.
    pub(crate) fn take_settled(&mut self, ticket: Ticket) -> Option<Settled> {
        if let Some(i) = self.stash.iter().position(|(t, _)| *t == ticket) {
            return self.stash.remove(i).map(|(_, settled)| settled);
        }
        let i = self.orphans.iter().position(|(t, _)| *t == ticket)?;
        self.orphans.remove(i).map(|(_, error)| Settled::Failed(error))
    }

    /// Records the loss of `link` and gives every request in flight on it
    /// its outcome, and every stream open on it its terminal:
    /// [`CallError::Shutdown`] for those the peer said it never took
    /// (`closed_after`, the last it took), else
    /// [`CallError::Disconnected`]. The caller has kept aside every reply
    /// (and queued every item) still on the link first.
    pub(crate) fn lose(&mut self, link: LinkId, reason: String, closed_after: Option<u64>) {
        let calls = &mut self.links[link];
        if calls.lost.is_some() {
            return;
        }
        let outcome = |id: u64| match closed_after {
            Some(last) if id > last => CallError::Shutdown,
            _ => CallError::Disconnected { reason: reason.clone() },
        };
        for entry in calls.in_flight.drain(..) {
            if entry.abandoned {
                continue;
            }
            self.orphans
                .push_back((Ticket { client: self.client, link: link as u32, id: entry.id }, outcome(entry.id)));
        }
        for stream in calls.streams.iter_mut().filter(|s| s.wire) {
            stream.wire = false;
            stream.end.get_or_insert_with(|| Err(outcome(stream.id)));
        }
        calls.streams.retain(|s| !s.retired());
        calls.lost = Some(Lost { reason, closed_after });
    }

    /// How `link` was lost, if it was.
    pub(crate) fn lost(&self, link: LinkId) -> Option<&Lost> {
        self.links[link].lost.as_ref()
    }

    /// The outcome of a request that cannot be sent on `link` because the
    /// link is lost: [`CallError::Shutdown`] if the peer closed on purpose,
    /// else [`CallError::NotConnected`]. `None` while it is up.
    pub(crate) fn refusal(&self, link: LinkId) -> Option<CallError> {
        self.lost(link).map(|lost| match lost.closed_after {
            Some(_) => CallError::Shutdown,
            None => CallError::NotConnected { reason: lost.reason.clone() },
        })
    }

    /// A new link fills lost `link`'s place. Its ids go on from the old
    /// link's.
    pub(crate) fn revive(&mut self, link: LinkId) {
        let calls = &mut self.links[link];
        debug_assert!(calls.in_flight.is_empty(), "a loss settles every request in flight");
        debug_assert!(calls.streams.iter().all(|s| !s.wire), "a loss closes every stream");
        calls.lost = None;
    }

    /// Requests sent whose outcome has not been handed out.
    pub(crate) fn outstanding(&self) -> usize {
        let in_flight: usize = self.links.iter().map(|l| l.in_flight.iter().filter(|p| !p.abandoned).count()).sum();
        in_flight + self.stash.len() + self.orphans.len()
    }

    /// Whether someone still waits for a reply on `link`.
    pub(crate) fn waiting(&self, link: LinkId) -> bool {
        self.links[link].in_flight.iter().any(|p| !p.abandoned)
    }

    /// Whether replies (or stream frames) are still to come on `link` (for
    /// requests and streams given up on, too: they must be read off for
    /// the peer's sake).
    pub(crate) fn replies_due(&self, link: LinkId) -> bool {
        let calls = &self.links[link];
        !calls.in_flight.is_empty() || calls.streams.iter().any(|s| s.wire)
    }

    /// Records that a stream's opening request to `service` with the next
    /// id is on `link`, letting the peer send `window` items (at least 1).
    ///
    /// # Panics
    ///
    /// Panics if the link is lost: nothing is written on a lost link.
    pub(crate) fn open_stream(&mut self, link: LinkId, service: u16, window: u32) -> StreamKey {
        let calls = &mut self.links[link];
        assert!(calls.lost.is_none(), "a stream opened on lost link {link}");
        let id = calls.next_id;
        calls.next_id += 1;
        let window = window.max(1);
        calls.streams.push(StreamCalls {
            id,
            service,
            window,
            granted: u64::from(window),
            started: 0,
            consumed: 0,
            items: VecDeque::new(),
            end: None,
            wire: true,
            handle: true,
            dropping: false,
            cancelled: false,
        });
        StreamKey { link, id }
    }

    /// Streams not retired, on every link: open on the wire, or with a
    /// terminal still to hand out.
    pub(crate) fn streams(&self) -> usize {
        self.links.iter().map(|l| l.streams.len()).sum()
    }

    /// Whether stream `id` on `link` is open on the wire.
    pub(crate) fn is_open_stream(&self, link: LinkId, id: u64) -> bool {
        self.stream_at(link, id).is_some_and(|s| s.wire)
    }

    /// The service a stream was opened on, if it is not retired.
    pub(crate) fn stream_service(&self, key: StreamKey) -> Option<u16> {
        self.stream_at(key.link, key.id).map(|s| s.service)
    }

    /// The peer begins an item of stream `id` on `link`: whether to keep
    /// it (`false`: the client gave up on the stream, drop it). An item
    /// of no stream open on the wire, or beyond the credit granted, is a
    /// violation.
    pub(crate) fn item_begins(&mut self, link: LinkId, id: u64) -> Result<bool, Violation> {
        let stream = self.stream_mut(link, id).filter(|s| s.wire).ok_or(Violation::NotInFlight { id })?;
        if stream.started >= stream.granted {
            return Err(Violation::NoCredit { id, granted: stream.granted });
        }
        stream.started += 1;
        if stream.dropping {
            stream.consumed += 1;
        }
        Ok(!stream.dropping)
    }

    /// A complete item of a stream, begun with [`Calls::item_begins`]:
    /// queued, or dropped if the client gave up on the stream meanwhile.
    pub(crate) fn item(&mut self, key: StreamKey, body: Vec<u8>) {
        let Some(stream) = self.stream_mut(key.link, key.id) else { return };
        if stream.dropping {
            stream.consumed += 1;
        } else {
            stream.items.push_back(body);
        }
    }

    /// The terminal frame of stream `id` on `link` came, with `outcome`:
    /// its terminal, unless one was decided already. A terminal frame of
    /// no stream open on the wire is a violation.
    pub(crate) fn stream_ended(
        &mut self,
        link: LinkId,
        id: u64,
        outcome: Result<(), CallError>,
    ) -> Result<(), Violation> {
        let calls = &mut self.links[link];
        let i = calls.streams.binary_search_by_key(&id, |s| s.id).map_err(|_| Violation::NotInFlight { id })?;
        let stream = &mut calls.streams[i];
        if !stream.wire {
            return Err(Violation::NotInFlight { id });
        }
        stream.wire = false;
        stream.end.get_or_insert(outcome);
        if stream.retired() {
            calls.streams.remove(i);
        }
        Ok(())
    }

    /// The next item of a stream, or once every item queued was handed
    /// out, its terminal outcome (handed out once: the stream is then
    /// done); `None` while neither is there.
    pub(crate) fn take_next(&mut self, key: StreamKey) -> Option<StreamNext> {
        let calls = &mut self.links[key.link];
        let i = calls.streams.binary_search_by_key(&key.id, |s| s.id).ok()?;
        let stream = &mut calls.streams[i];
        if !stream.handle {
            return None;
        }
        if let Some(item) = stream.items.pop_front() {
            stream.consumed += 1;
            return Some(StreamNext::Item(item));
        }
        let end = stream.end.take()?;
        stream.handle = false;
        stream.dropping = true;
        if stream.retired() {
            calls.streams.remove(i);
        }
        Some(StreamNext::End(end))
    }

    /// Whether [`Calls::take_next`] has something for the stream.
    pub(crate) fn stream_ready(&self, key: StreamKey) -> bool {
        self.stream_at(key.link, key.id).is_some_and(|s| s.handle && (!s.items.is_empty() || s.end.is_some()))
    }

    /// The credit to grant a stream now, if any: once the items handed
    /// out have made room for half its window (at least one item), as
    /// much as keeps the credit granted minus the items handed out within
    /// the window. None once the stream's terminal is decided.
    pub(crate) fn credit_due(&self, key: StreamKey) -> Option<u32> {
        let s = self.stream_at(key.link, key.id)?;
        if s.dropping || s.end.is_some() || !s.wire {
            return None;
        }
        let room = s.consumed + u64::from(s.window) - s.granted;
        let threshold = u64::from((s.window / 2).max(1));
        (room >= threshold).then_some(room as u32)
    }

    /// Records credit granted to a stream (its frame is written).
    pub(crate) fn credited(&mut self, key: StreamKey, n: u32) {
        if let Some(s) = self.stream_mut(key.link, key.id) {
            s.granted += u64::from(n);
            debug_assert!(s.granted - s.consumed <= u64::from(s.window), "credit beyond the window");
        }
    }

    /// The stream's credit granted minus its items handed out: what may be
    /// queued or on its way, never more than its window.
    #[cfg(test)]
    pub(crate) fn outstanding_credit(&self, key: StreamKey) -> Option<u64> {
        self.stream_at(key.link, key.id).map(|s| s.granted - s.consumed)
    }

    /// The caller cancels a stream whose terminal it was not handed yet:
    /// its queued items are dropped, and so are those that come; its
    /// terminal becomes [`CallError::Cancelled`]. Whether to send the peer
    /// a cancel (the stream is open on the wire and none was sent).
    pub(crate) fn cancel(&mut self, key: StreamKey) -> bool {
        let Some(s) = self.stream_mut(key.link, key.id).filter(|s| s.handle) else { return false };
        s.consumed += s.items.len() as u64;
        s.items.clear();
        s.end = Some(Err(CallError::Cancelled));
        s.dropping = true;
        Self::to_cancel(s)
    }

    /// The client gives up on a stream with `error` as its terminal (its
    /// deadline passed, an item was too long), unless one was decided:
    /// the items queued are still handed out first, and those that come
    /// are dropped. Whether to send the peer a cancel.
    pub(crate) fn give_up(&mut self, key: StreamKey, error: CallError) -> bool {
        let Some(s) = self.stream_mut(key.link, key.id) else { return false };
        if s.handle {
            s.end.get_or_insert(Err(error));
        }
        s.dropping = true;
        Self::to_cancel(s)
    }

    /// The caller dropped a stream's handle before it was handed the
    /// terminal: everything that comes is dropped, and the stream retires
    /// when it is closed on the wire. Whether to send the peer a cancel.
    pub(crate) fn forget(&mut self, key: StreamKey) -> bool {
        let calls = &mut self.links[key.link];
        let Ok(i) = calls.streams.binary_search_by_key(&key.id, |s| s.id) else { return false };
        let s = &mut calls.streams[i];
        s.handle = false;
        s.consumed += s.items.len() as u64;
        s.items.clear();
        s.dropping = true;
        let cancel = Self::to_cancel(s);
        if s.retired() {
            calls.streams.remove(i);
        }
        cancel
    }

    /// Whether a stream given up on needs a cancel sent (once).
    fn to_cancel(s: &mut StreamCalls) -> bool {
        let send = s.wire && !s.cancelled;
        s.cancelled |= send;
        send
    }

    fn stream_at(&self, link: LinkId, id: u64) -> Option<&StreamCalls> {
        let streams = &self.links[link].streams;
        streams.binary_search_by_key(&id, |s| s.id).ok().map(|i| &streams[i])
    }

    fn stream_mut(&mut self, link: LinkId, id: u64) -> Option<&mut StreamCalls> {
        let streams = &mut self.links[link].streams;
        let i = streams.binary_search_by_key(&id, |s| s.id).ok()?;
        Some(&mut streams[i])
    }

    fn find(&self, ticket: Ticket) -> Option<&InFlight> {
        let in_flight = &self.links[ticket.link()].in_flight;
        in_flight.binary_search_by_key(&ticket.id, |p| p.id).ok().map(|i| &in_flight[i])
    }

    fn find_mut(&mut self, ticket: Ticket) -> Option<&mut InFlight> {
        let in_flight = &mut self.links[ticket.link()].in_flight;
        let i = in_flight.binary_search_by_key(&ticket.id, |p| p.id).ok()?;
        Some(&mut in_flight[i])
    }
}

#[cfg(test)]
mod tests;
