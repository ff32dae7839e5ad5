//! Reading replies off a client's links and feeding them to the state
//! machine: the reply awaited, those kept aside for others, those
//! dropped; sleeping across the links while none is there; and settling a
//! link that is lost (`break_off`).

use std::time::Instant;

use super::{Client, Deadline, Next};
use crate::calls::{Arrival, Awaiting, LinkId, Ticket};
use crate::error::CallError;
use crate::link::ReplyRef;
use crate::wait::{self, Await};

impl Client {
    /// Settles `link` when `result` says it is lost.
    pub(super) fn note<T>(&mut self, link: LinkId, result: Result<T, CallError>) -> Result<T, CallError> {
        if let Err(CallError::Disconnected { reason }) = &result {
            if self.calls.lost(link).is_none() {
                let reason = reason.clone();
                self.break_off(link, reason);
            }
        }
        result
    }

    /// Settles every link whose peer a wait found gone. Whether any was.
    pub(super) fn notice_losses(&mut self) -> bool {
        let mut any = false;
        for link in 0..self.links.len() {
            if self.calls.lost(link).is_none() {
                if let Some(reason) = self.links[link].gone() {
                    let reason = reason.to_string();
                    self.break_off(link, reason);
                    any = true;
                }
            }
        }
        any
    }

    /// Records the loss of `link`: every reply still on it is kept aside
    /// (each is its request's outcome), then every request still in flight
    /// on it gets its outcome (see [`Calls::lose`]).
    pub(super) fn break_off(&mut self, link: LinkId, reason: String) {
        // The peer's word on the last request it took is read before its
        // replies: on shared memory it is written after every reply to
        // those was published, so all of them are read below. A stream's
        // closing frame comes after its replies; reading them reaches it.
        let said = self.links[link].closed_after();
        self.read_remaining(link);
        let closed_after = said.or_else(|| self.links[link].closed_after());
        self.calls.lose(link, reason, closed_after);
    }

    /// Keeps aside every reply left on a lost link. Stops at the first
    /// thing that is not such a reply (the link's end, a stream's closing
    /// frame, or what broke the protocol).
    pub(super) fn read_remaining(&mut self, link: LinkId) {
        loop {
            let r = match self.links[link].peek() {
                Ok(Some(r)) => r,
                // What a stream's socket still holds comes after the buffer.
                Ok(None) if self.links[link].receive_left() => continue,
                _ => break,
            };
            match self.calls.arrived(link, &r.header(), Awaiting::Nothing) {
                Ok(Arrival::Keep(ticket) | Arrival::Deliver(ticket)) => {
                    let mut body = Vec::new();
                    self.links[link].read_all(&r, &mut body);
                    self.calls.keep(ticket, r.header(), body);
                }
                Ok(Arrival::Drop) => {}
                Err(_) => break,
            }
            // Whether a peer that is gone can be told of the space changes
            // nothing.
            let _ = self.links[link].consume(&r);
        }
    }

    /// Hands every live link's written requests to its peer.
    pub(super) fn flush_live(&mut self) {
        for link in 0..self.links.len() {
            if self.calls.lost(link).is_none() && self.calls.replies_due(link) {
                let flushed = self.links[link].flush();
                let _ = self.note(link, flushed);
            }
        }
    }

    /// Moves every reply waiting on any link into the stash (dropping those
    /// of abandoned requests). A link that fails is settled.
    pub(super) fn stash_replies(&mut self) {
        for link in 0..self.links.len() {
            while self.calls.replies_due(link) {
                let peeked = self.links[link].peek();
                let Ok(Some(r)) = self.note(link, peeked) else { break };
                let Ok(arrival) = self.arrived(link, &r, Awaiting::Nothing) else { break };
                let kept = match arrival {
                    Arrival::Keep(ticket) | Arrival::Deliver(ticket) => self.keep_aside(link, r, ticket),
                    Arrival::Drop => self.release(link, &r),
                };
                if kept.is_err() {
                    break;
                }
            }
        }
    }

    /// Reads a reply aside as `ticket`'s outcome, then hands its space
    /// back: kept first, a failure to hand it back leaves the reply its
    /// outcome.
    pub(super) fn keep_aside(&mut self, link: LinkId, r: ReplyRef, ticket: Ticket) -> Result<(), CallError> {
        let mut body = Vec::new();
        self.links[link].read_all(&r, &mut body);
        self.calls.keep(ticket, r.header(), body);
        self.release(link, &r)
    }

    /// Claims the request a reply on `link` answers; a reply to nothing
    /// in flight loses the link.
    pub(super) fn arrived(&mut self, link: LinkId, r: &ReplyRef, awaiting: Awaiting) -> Result<Arrival, CallError> {
        match self.calls.arrived(link, &r.header(), awaiting) {
            Ok(arrival) => Ok(arrival),
            Err(violation) => {
                let reason = violation.describe(self.links[link].peer_name());
                self.note(link, Err(CallError::Disconnected { reason }))
            }
        }
    }

    /// Reads replies off the links with replies due until one is for
    /// `awaiting`, keeping aside (or dropping) the others, and sleeps across
    /// the links while none is there. The awaited reply is left on its
    /// link, claimed. [`Next::Settled`] when a link was lost on the way.
    pub(super) fn next_reply(&mut self, awaiting: Awaiting, dl: &mut Deadline) -> Result<Next, CallError> {
        let n = self.links.len();
        // The awaited ticket's link first; for a receive, the links in turn.
        let first = match awaiting {
            Awaiting::Ticket(t) => t.link(),
            _ => self.next_link % n,
        };
        loop {
            for k in 0..n {
                let link = (first + k) % n;
                while self.calls.replies_due(link) {
                    let peeked = self.links[link].peek();
                    let r = match self.note(link, peeked) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(_) => return Ok(Next::Settled),
                    };
                    let Ok(arrival) = self.arrived(link, &r, awaiting) else { return Ok(Next::Settled) };
                    let handled = match arrival {
                        Arrival::Deliver(ticket) => return Ok(Next::Reply(link, r, ticket)),
                        Arrival::Keep(ticket) => self.keep_aside(link, r, ticket),
                        Arrival::Drop => self.release(link, &r),
                    };
                    if handled.is_err() {
                        return Ok(Next::Settled);
                    }
                }
            }
            self.sleep(None, dl)?;
            if self.notice_losses() {
                return Ok(Next::Settled);
            }
        }
    }

    /// Sleeps until a reply may have come on any link with replies due, or
    /// (with `room`) until there may be room for a request of that many
    /// bytes on that link, or the deadline passes.
    pub(super) fn sleep(&mut self, room: Option<(LinkId, usize)>, dl: &mut Deadline) -> Result<(), CallError> {
        self.plan.clear();
        for link in 0..self.links.len() {
            let due = self.calls.replies_due(link);
            let what = match room {
                _ if self.calls.lost(link).is_some() => None,
                Some((l, len)) if l == link => Some(Await::Room { len, replies_due: due }),
                _ if due => Some(Await::Reply),
                _ => None,
            };
            self.plan.push(what);
        }
        let deadline = dl.at();
        if Instant::now() >= deadline {
            return Err(CallError::Timeout { after: dl.timeout });
        }
        wait::wait(&mut self.links, &self.plan, &mut self.pace, deadline, dl.timeout)
    }
}
