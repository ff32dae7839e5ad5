//! Reading replies off a client's links and feeding them to the state
//! machine: the reply awaited, those kept aside for others, those
//! dropped; sleeping across the links while none is there; and settling a
//! link that is lost (`break_off`).

use std::time::Instant;

use super::inbound::Step;
use super::{Client, Deadline, Next, Room};
use crate::calls::{Awaiting, LinkId, StreamKey};
use crate::error::CallError;
use crate::link::disconnected;
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
    /// (each is its request's outcome), every item still on it queued,
    /// then every request still in flight on it gets its outcome, and
    /// every stream open on it its terminal (see [`Calls::lose`]).
    ///
    /// [`Calls::lose`]: crate::calls::Calls::lose
    pub(super) fn break_off(&mut self, link: LinkId, reason: String) {
        // The peer's word on the last request it took is read before its
        // replies: on shared memory it is written after every reply to
        // those was published, so all of them are read below. A stream's
        // closing frame comes after its replies; reading them reaches it.
        let said = self.links[link].closed_after();
        self.read_remaining(link);
        let closed_after = said.or_else(|| self.links[link].closed_after());
        self.calls.lose(link, reason, closed_after);
        self.fd_epoch += 1;
        // Messages half come are lost with the link, and nothing more is
        // sent on it.
        self.slots[link].inbound.reset();
        self.slots[link].pending.clear();
    }

    /// Takes every frame left on a lost link: replies kept aside, items
    /// queued. Stops at the first thing that is not such a frame (the
    /// link's end, a stream's closing frame, or what broke the protocol).
    pub(super) fn read_remaining(&mut self, link: LinkId) {
        loop {
            match self.take_frame(link, Awaiting::Nothing) {
                // What a stream's socket still holds comes after the buffer.
                Ok(Step::Empty) if self.links[link].receive_left() => continue,
                Ok(Step::Empty) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Hands every live link's written requests (and queued credits and
    /// cancels) to its peer; cancels the streams whose handles were
    /// dropped first.
    pub(super) fn flush_live(&mut self) {
        self.collect_dropped();
        self.send_all_controls();
        for link in 0..self.links.len() {
            if self.calls.lost(link).is_none() && self.calls.replies_due(link) {
                let flushed = self.links[link].flush();
                let _ = self.note(link, flushed);
            }
        }
    }

    /// Takes every frame waiting on any link aside: replies into the
    /// stash (dropping those of abandoned requests), items into their
    /// streams. A link that fails is settled.
    pub(super) fn stash_replies(&mut self) {
        for link in 0..self.links.len() {
            while self.calls.replies_due(link) {
                match self.take_frame(link, Awaiting::Nothing) {
                    Ok(Step::Empty) => break,
                    Ok(_) => {}
                    Err(reason) => {
                        let _ = self.note::<()>(link, Err(disconnected(reason)));
                        break;
                    }
                }
            }
        }
    }

    /// Reads frames off the links with replies due until one is for
    /// `awaiting`, taking the others aside (or dropping them), and sleeps
    /// across the links while none is there. An awaited reply of one frame
    /// is left on its link, claimed. [`Next::Settled`] when outcomes were
    /// settled that may be the awaited one (a link lost, a reply
    /// assembled), or what a reader or a stream awaits came.
    pub(super) fn next_reply(&mut self, awaiting: Awaiting, dl: &mut Deadline) -> Result<Next, CallError> {
        loop {
            if let Some(next) = self.scan(awaiting) {
                return Ok(next);
            }
            if self.send_all_controls() {
                return Ok(Next::Settled);
            }
            self.sleep(None, dl)?;
            if self.notice_losses() {
                return Ok(Next::Settled);
            }
        }
    }

    /// One pass over the links with replies due, as [`Client::next_reply`]
    /// reads them, without waiting: what it found, or `None` when nothing
    /// for `awaiting` is there now. (The blocking waits and the
    /// poll-style API share it.)
    pub(super) fn scan(&mut self, awaiting: Awaiting) -> Option<Next> {
        let n = self.links.len();
        // The awaited ticket's link first; for a receive, the links in turn.
        let first = match awaiting {
            Awaiting::Ticket(t) | Awaiting::Chunks(t) => t.link(),
            Awaiting::Stream(key) => key.link,
            _ => self.next_link % n,
        };
        for k in 0..n {
            let link = (first + k) % n;
            while self.calls.replies_due(link) {
                let step = match self.take_frame(link, awaiting) {
                    Ok(step) => step,
                    Err(reason) => {
                        let _ = self.note::<()>(link, Err(disconnected(reason)));
                        return Some(Next::Settled);
                    }
                };
                match (step, awaiting) {
                    (Step::Empty, _) => break,
                    (Step::Reply(r, ticket), _) => return Some(Next::Reply(link, r, ticket)),
                    (Step::Kept(_), Awaiting::Any) | (Step::Chunk, _) => return Some(Next::Settled),
                    (Step::Kept(t), Awaiting::Ticket(x) | Awaiting::Chunks(x)) if t == x => return Some(Next::Settled),
                    (Step::Stream(id), Awaiting::Stream(key))
                        if key == (StreamKey { link, id }) && self.calls.stream_ready(key) =>
                    {
                        return Some(Next::Settled)
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// What a wait on each link waits for now (into `self.plan`): the
    /// replies due, the credits and cancels queued, and `room`.
    pub(super) fn plan(&mut self, room: Option<Room>) {
        self.plan.clear();
        for link in 0..self.links.len() {
            let due = self.calls.replies_due(link);
            let what = match room {
                _ if self.calls.lost(link).is_some() => None,
                Some(Room { link: l, len, begins: true }) if l == link => Some(Await::Room { len, replies_due: due }),
                Some(Room { link: l, len, begins: false }) if l == link => Some(Await::RoomOrReply { len }),
                // Credits and cancels waiting for room: the largest is
                // 4 bytes.
                _ if !self.slots[link].pending.is_empty() => Some(Await::RoomOrReply { len: 4 }),
                _ if due => Some(Await::Reply),
                _ => None,
            };
            self.plan.push(what);
        }
    }

    /// Sleeps until a reply may have come on any link with replies due, or
    /// (with `room`) until there may be room for a frame of that many
    /// bytes on that link, or the deadline passes.
    pub(super) fn sleep(&mut self, room: Option<Room>, dl: &mut Deadline) -> Result<(), CallError> {
        self.plan(room);
        let deadline = dl.at();
        if Instant::now() >= deadline {
            return Err(CallError::Timeout { after: dl.timeout });
        }
        wait::wait(&mut self.links, &self.plan, &mut self.pace, deadline, dl.timeout)
    }
}
