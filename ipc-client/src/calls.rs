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
//! Ids increase strictly per link, for the client's whole life, also
//! across the links that fill a slot in turn (a reconnection): each
//! link's peer checks that they increase, and a ticket of an old link can
//! never match a request of the new one.

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

/// What the reader of replies waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// Any reply: `recv`.
    Any,
    /// This ticket's reply: `wait` and the calls.
    Ticket(Ticket),
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
}

impl Violation {
    /// What happened, for the loss's reason; `peer` names the sender.
    pub(crate) fn describe(&self, peer: &str) -> String {
        match *self {
            Violation::NotInFlight { id } => format!("{peer} sent a reply to request {id}, which is not in flight"),
            Violation::WrongService { id, sent, answered } => {
                format!("{peer} answered request {id} of service {sent} as service {answered}")
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
    /// The link was lost first.
    Lost(CallError),
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

struct LinkCalls {
    next_id: u64,
    /// Sent requests whose replies have not been read, in id order.
    in_flight: VecDeque<InFlight>,
    lost: Option<Lost>,
}

/// A reply read while another was awaited.
struct Kept {
    ticket: Ticket,
    header: FrameHeader,
    body: Vec<u8>,
}

/// The state of every request a client sent; see the module docs.
pub(crate) struct Calls {
    client: u64,
    links: Vec<LinkCalls>,
    /// Replies read while waiting for another, in arrival order.
    stash: VecDeque<Kept>,
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
            Awaiting::Ticket(t) if t == ticket => Arrival::Deliver(ticket),
            Awaiting::Ticket(_) | Awaiting::Nothing => Arrival::Keep(ticket),
        })
    }

    /// Keeps a reply that [`Calls::arrived`] said to keep.
    pub(crate) fn keep(&mut self, ticket: Ticket, header: FrameHeader, body: Vec<u8>) {
        self.stash.push_back(Kept { ticket, header, body });
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
            if let Some(entry) = self.find_mut(ticket) {
                entry.abandoned = true;
            }
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
            return Some((kept.ticket, Settled::Reply { header: kept.header, body: kept.body }));
        }
        self.orphans.pop_front().map(|(ticket, error)| (ticket, Settled::Lost(error)))
    }

    /// Takes `ticket`'s outcome if it is settled.
    pub(crate) fn take_settled(&mut self, ticket: Ticket) -> Option<Settled> {
        if let Some(i) = self.stash.iter().position(|k| k.ticket == ticket) {
            let kept = self.stash.remove(i).expect("index from the search");
            return Some(Settled::Reply { header: kept.header, body: kept.body });
        }
        let i = self.orphans.iter().position(|(t, _)| *t == ticket)?;
        self.orphans.remove(i).map(|(_, error)| Settled::Lost(error))
    }

    /// Records the loss of `link` and gives every request in flight on it
    /// its outcome: [`CallError::Shutdown`] for those the peer said it
    /// never took (`closed_after`, the last it took), else
    /// [`CallError::Disconnected`]. The caller has kept aside every reply
    /// still on the link first.
    pub(crate) fn lose(&mut self, link: LinkId, reason: String, closed_after: Option<u64>) {
        let calls = &mut self.links[link];
        if calls.lost.is_some() {
            return;
        }
        for entry in calls.in_flight.drain(..) {
            if entry.abandoned {
                continue;
            }
            let outcome = match closed_after {
                Some(last) if entry.id > last => CallError::Shutdown,
                _ => CallError::Disconnected { reason: reason.clone() },
            };
            self.orphans.push_back((Ticket { client: self.client, link: link as u32, id: entry.id }, outcome));
        }
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

    /// Whether replies are still to come on `link` (for requests given up
    /// on, too: they must be read off for the peer's sake).
    pub(crate) fn replies_due(&self, link: LinkId) -> bool {
        !self.links[link].in_flight.is_empty()
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
