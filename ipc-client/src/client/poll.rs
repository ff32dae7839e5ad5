//! The poll-style API: take outcomes without blocking, arm the links'
//! doorbells, and the fds a reactor waits on. The async client is built
//! on it; so is any poll loop of the caller's own (mio, epoll).
//!
//! # Protocol
//!
//! A waiter that must never miss a reply goes round this loop:
//!
//! 1. **Take.** [`Client::try_recv`] or [`Client::try_wait`] read what the
//!    links hold; `Ok(None)` means nothing for it is there *now*.
//! 2. **Arm.** [`Client::arm`] announces the wait in every ring with
//!    replies due (it stores 1 in the ring's waiter word), then a
//!    `SeqCst` fence, then re-reads the ring's head. If a reply is there
//!    after all it says [`Armed::Ready`]: go back to 1. Over a socket it
//!    receives once without blocking instead: bytes mean `Ready`.
//! 3. **Wait** until one of [`Client::wait_fds`] is readable (or writable,
//!    where it says so).
//! 4. **Drain.** For each fd found ready, [`Client::on_ready`] reads it
//!    until a read finds it empty (a doorbell's bytes, a socket's frames).
//!    Only when it says the read came back empty may the reactor forget
//!    the fd's readiness (tokio: `clear_ready`); then go back to 1.
//!
//! Why no wake-up is lost. The peer publishes a reply by storing the
//! ring's head (`Release`), then a `SeqCst` fence, then it swaps the
//! waiter word to 0 and, if it held 1, rings the doorbell (a byte on the
//! socket pair). The two fences pair (`SYNC(sleep-handshake)` in
//! `ipc_core::ring`): either step 2's re-read sees the new head (it says
//! `Ready`), or the peer's swap sees the announcement and rings, after
//! the arm; the byte then makes the fd readable. Readiness is forgotten
//! only in step 4, before the next arm, and only after an empty read: a
//! ring that came before that read was read by it (and the reply it
//! announced is seen by the take that follows), and a ring after it makes
//! the fd ready again. A socket link needs no announcement: the kernel
//! makes it readable whenever bytes come, and a receive that found it
//! empty is again what allows readiness to be forgotten.
//!
//! An announcement that stands after the wait costs the peer one
//! needless ring at most (it clears the word as it rings); the next arm
//! makes it again.
//!
//! Liveness: a peer that dies closes its end of the doorbell (readable,
//! and read as a hang-up) and of the control connection, which is among
//! the fds too; a peer that stops on purpose marks the segment closed and
//! rings. Either way the link is settled by the next take.

use std::os::fd::{AsFd, BorrowedFd};

use super::{Client, Found, Next, Room, Service};
use crate::calls::{Awaiting, Ticket};
use crate::error::CallError;
use crate::link::Link;
use crate::shm::Bell;
use crate::wait::{self, Await};

/// What [`Client::arm`] found.
#[must_use = "`Wait` means wait for the fds; `Ready` means take again first"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Armed {
    /// Something may be there already (or nothing is awaited, or a link
    /// was found lost): take again before waiting.
    Ready,
    /// Every link is armed: wait until one of [`Client::wait_fds`] is
    /// ready.
    Wait,
}

/// Which of a client's fds a reactor found ready, for
/// [`Client::on_ready`]. Tokens stay valid until [`Client::fd_epoch`]
/// changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdToken(u32);

impl FdToken {
    /// The token as a number (for a reactor's own token, such as mio's).
    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// The token a number from [`FdToken::get`] stands for.
    pub fn from_usize(n: usize) -> FdToken {
        FdToken(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn new(link: usize, which: u32) -> FdToken {
        FdToken(link as u32 * 2 + which)
    }

    fn link(self) -> usize {
        (self.0 / 2) as usize
    }

    fn which(self) -> u32 {
        self.0 % 2
    }
}

/// An fd to wait on (see the module docs' protocol).
#[derive(Clone, Copy, Debug)]
pub struct WaitFd<'a> {
    /// The fd: a pollable doorbell, a control connection, or a socket.
    pub fd: BorrowedFd<'a>,
    /// What to pass [`Client::on_ready`] when it is ready.
    pub token: FdToken,
    /// Wait for it to be writable too: frames wait to be sent on it.
    /// Readable is always waited for.
    pub writable: bool,
}

/// An outcome taken by [`Client::recv`] or [`Client::try_recv`]: whose it
/// is, and what came of it (`T` is `()` for [`Client::recv_into`] and
/// [`Client::try_recv_into`], whose reply is in the caller's buffer).
#[must_use = "an outcome is handed out once"]
#[derive(Debug, PartialEq, Eq)]
pub struct Received<T = Vec<u8>> {
    /// The request's ticket.
    pub ticket: Ticket,
    /// Its reply, or why it has none.
    pub outcome: Result<T, CallError>,
}

impl Client {
    /// As [`Client::recv`], without waiting: `Ok(None)` when no outcome is
    /// there now (then [`Client::arm`], and wait for [`Client::wait_fds`]).
    /// [`CallError::NothingInFlight`] when nothing is awaited.
    pub fn try_recv(&mut self) -> Result<Option<Received>, CallError> {
        let mut reply = Vec::new();
        let got = self.try_recv_into(&mut reply)?;
        Ok(got.map(|r| Received { ticket: r.ticket, outcome: r.outcome.map(|()| reply) }))
    }

    /// As [`Client::try_recv`], writing a reply into `reply`.
    pub fn try_recv_into(&mut self, reply: &mut Vec<u8>) -> Result<Option<Received<()>>, CallError> {
        self.collect_dropped();
        self.flush_live();
        loop {
            let begun = match self.calls.begin_recv() {
                Ok(begun) => begun,
                Err(e) => {
                    // Nothing awaited, but the answers to requests given
                    // up may still be due: they are read off (and dropped)
                    // all the same, so that no peer is stuck behind them
                    // while a send waits for room.
                    self.stash_replies();
                    return Err(e);
                }
            };
            if let Some((ticket, settled)) = begun {
                return Ok(Some(Received { ticket, outcome: self.hand_out(ticket.link(), settled, reply) }));
            }
            match self.poll_next(Awaiting::Any) {
                None => return Ok(None),
                Some(Next::Settled) => {}
                Some(Next::Reply(link, r, ticket)) => {
                    self.next_link = link + 1;
                    self.links[link].read_all(&r, reply);
                    // Read, the reply is its request's outcome whatever
                    // `release` says.
                    let _ = self.release(link, &r);
                    return Ok(Some(Received { ticket, outcome: self.outcome_on(link, r.header(), reply) }));
                }
            }
        }
    }

    /// As [`Client::wait`], without waiting: `Ok(None)` while `ticket`'s
    /// outcome has not come (replies to others that come meanwhile are
    /// kept for them).
    pub fn try_wait(&mut self, ticket: Ticket) -> Result<Option<Vec<u8>>, CallError> {
        let mut reply = Vec::new();
        Ok(self.try_wait_into(ticket, &mut reply)?.then_some(reply))
    }

    /// As [`Client::try_wait`], writing the reply into `reply`: whether it
    /// came.
    pub fn try_wait_into(&mut self, ticket: Ticket, reply: &mut Vec<u8>) -> Result<bool, CallError> {
        let link = ticket.link();
        self.collect_dropped();
        if let Some(settled) = self.calls.begin_wait(ticket)? {
            let found = self.found(link, settled)?;
            self.take_found(found, reply);
            return Ok(true);
        }
        self.flush_live();
        loop {
            match self.poll_next(Awaiting::Ticket(ticket)) {
                None => return Ok(false),
                Some(Next::Reply(_, r, _)) => {
                    self.take_found(Found::Link(link, r), reply);
                    self.outcome_on(link, r.header(), reply)?;
                    return Ok(true);
                }
                Some(Next::Settled) => {
                    if let Some(settled) = self.calls.take_settled(ticket) {
                        let found = self.found(link, settled)?;
                        self.take_found(found, reply);
                        return Ok(true);
                    }
                    if self.calls.begin_wait(ticket).is_err() {
                        // Not settled and not in flight: impossible, but
                        // say so rather than wait for ever.
                        return Err(CallError::UnknownTicket { id: ticket.id() });
                    }
                }
            }
        }
    }

    /// Gives up on `ticket`: its outcome, kept or still to come, is
    /// dropped (a reply that comes later is consumed unread). A ticket of
    /// another client, or one with no outcome left, is ignored.
    pub fn forget(&mut self, ticket: Ticket) {
        if self.calls.check(ticket).is_err() {
            return;
        }
        if self.calls.take_settled(ticket).is_none() {
            self.calls.abandon(ticket);
            self.slots[ticket.link()].inbound.forsake(ticket.id());
        }
    }

    /// Whether `ticket` still has an outcome to hand out (see
    /// [`Calls::pending`](crate::calls::Calls::pending)).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn check_pending(&self, ticket: Ticket) -> Result<(), CallError> {
        self.calls.pending(ticket)
    }

    /// The call timeout it was connected with.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn default_timeout(&self) -> std::time::Duration {
        self.options.call_timeout
    }

    /// Spins while it pays (as the blocking waits do before they sleep:
    /// [`ClientOptions::spin`](crate::ClientOptions::spin), and only while
    /// a core is free), watching every shared-memory link with replies
    /// due. Whether something came: take again. Optional: a loop that
    /// never spins only sleeps more often.
    pub fn spin(&mut self) -> bool {
        self.spin_unless(|| false)
    }

    /// As [`Client::spin`], giving up as soon as `stop` says so (the
    /// async client's, when another task waits for its lock).
    pub(crate) fn spin_unless(&mut self, stop: impl FnMut() -> bool) -> bool {
        self.flush_live();
        self.plan(None);
        wait::spin_unless(&mut self.links, &self.plan, &mut self.pace, stop)
    }

    /// Step 2 of the protocol (see the module docs): hands the written
    /// requests to their peers, then announces the wait on every link
    /// with replies due and re-checks each. [`Armed::Wait`]: wait for
    /// [`Client::wait_fds`]; [`Armed::Ready`]: take again first.
    ///
    /// [`CallError::NotPollable`] for a shared-memory link whose doorbell
    /// is a futex word (connect with
    /// [`DoorbellKind::Pollable`](crate::DoorbellKind)).
    pub fn arm(&mut self) -> Result<Armed, CallError> {
        self.arm_with(None)
    }

    /// As [`Client::arm`], waiting also for room for a request of `len`
    /// bytes to `service` (after [`Client::try_send`] found its link
    /// full).
    pub fn arm_for_room(&mut self, service: &Service, len: usize) -> Result<Armed, CallError> {
        let link = self.link_of(service)?;
        self.arm_with(Some(Room { link, len, begins: true }))
    }

    fn arm_with(&mut self, room: Option<Room>) -> Result<Armed, CallError> {
        self.flush_live();
        if self.notice_losses() {
            return Ok(Armed::Ready);
        }
        self.plan(room);
        if self.plan.iter().all(Option::is_none) {
            return Ok(Armed::Ready);
        }
        let mut armed = Armed::Wait;
        for link in 0..self.links.len() {
            let Some(what) = self.plan[link] else { continue };
            match &mut self.links[link] {
                Link::Shm(l) => {
                    if l.doorbell_fd().is_none() {
                        return Err(CallError::NotPollable);
                    }
                    if l.closed_after().is_some() {
                        l.gone = l.peer_gone();
                        armed = Armed::Ready;
                    } else {
                        match l.announce(sleep_of(what)) {
                            Ok(true) => {}
                            Ok(false) => armed = Armed::Ready,
                            Err(reason) => {
                                l.gone = Some(reason);
                                armed = Armed::Ready;
                            }
                        }
                    }
                }
                Link::Stream(l) => match l.try_receive() {
                    Ok(_) if l.peek().map(|p| p.is_some()).unwrap_or(true) => armed = Armed::Ready,
                    Ok(_) => {}
                    Err(_) => armed = Armed::Ready,
                },
            }
            if armed == Armed::Ready {
                break;
            }
        }
        Ok(armed)
    }

    /// The fds to wait on after [`Armed::Wait`], one or two per live link:
    /// a shared-memory link's pollable doorbell and control connection, a
    /// socket link's socket. Register them anew when
    /// [`Client::fd_epoch`] changes.
    pub fn wait_fds(&self) -> impl Iterator<Item = WaitFd<'_>> {
        self.links.iter().enumerate().filter(|(i, _)| self.calls.lost(*i).is_none()).flat_map(|(i, link)| {
            let (first, second) = match link {
                Link::Shm(l) => match &l.bell {
                    Bell::Pollable(bell) => (
                        Some(WaitFd { fd: bell.as_fd(), token: FdToken::new(i, 0), writable: false }),
                        Some(WaitFd { fd: l.control.as_fd(), token: FdToken::new(i, 1), writable: false }),
                    ),
                    Bell::Futex => (None, None),
                },
                Link::Stream(l) => {
                    (Some(WaitFd { fd: l.socket_fd(), token: FdToken::new(i, 0), writable: l.wants_write() }), None)
                }
            };
            first.into_iter().chain(second)
        })
    }

    /// Changes whenever the set of [`Client::wait_fds`] may have changed
    /// (a link added, lost or re-established).
    pub fn fd_epoch(&self) -> u64 {
        self.fd_epoch
    }

    /// Step 4 of the protocol: the fd of `token` was found ready; reads it
    /// until a read finds it empty (and sends what a socket takes).
    /// Whether the last read came back empty: only then may the reactor
    /// forget the fd's readiness. A peer found gone is settled by the
    /// next take.
    pub fn on_ready(&mut self, token: FdToken) -> bool {
        let link = token.link();
        if link >= self.links.len() || self.calls.lost(link).is_some() {
            return true;
        }
        match (&mut self.links[link], token.which()) {
            (Link::Shm(l), 0) => {
                if let Err(reason) = l.drain_bell() {
                    l.gone.get_or_insert(reason);
                } else if l.closed_after().is_some() {
                    l.gone = l.gone.take().or_else(|| l.peer_gone());
                }
                true
            }
            (Link::Shm(l), _) => {
                // The peer never writes on it: readable means hung up.
                if let Some(reason) = l.peer_gone() {
                    l.gone.get_or_insert(reason);
                }
                true
            }
            (Link::Stream(l), _) => l.try_receive().unwrap_or(true),
        }
    }

    /// One pass over the links without waiting, socket links receiving
    /// what they hold: what [`Client::scan`] found, or `None`.
    pub(super) fn poll_next(&mut self, awaiting: Awaiting) -> Option<Next> {
        loop {
            if let Some(next) = self.scan(awaiting) {
                return Some(next);
            }
            if self.send_all_controls() || self.notice_losses() {
                return Some(Next::Settled);
            }
            let mut came = false;
            for link in 0..self.links.len() {
                if self.calls.lost(link).is_some() || !self.calls.replies_due(link) {
                    continue;
                }
                if let Link::Stream(l) = &mut self.links[link] {
                    let before = l.buffered();
                    match l.try_receive() {
                        Ok(_) => came |= l.buffered() != before,
                        Err(_) => came = true,
                    }
                }
            }
            if !came {
                return None;
            }
        }
    }
}

/// The ring handshake a planned wait makes.
fn sleep_of(what: Await) -> crate::shm::Sleep {
    what.sleep()
}
