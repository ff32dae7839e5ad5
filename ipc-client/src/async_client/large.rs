//! Requests longer than a frame on the async client: [`AsyncClient::send`]
//! (and so every call) sends them in chunks, with the blocking client's
//! own state machine (`client/outgoing.rs`: the first chunk takes the
//! request's id, the rest follow as room comes, an early answer stops
//! them, a request given up is cancelled on the wire). Replies in chunks
//! need nothing here: whichever task reads the links assembles them
//! (`client/inbound.rs`) and hands each out whole, as any reply.
//!
//! # Lanes
//!
//! The blocking client sends one message in chunks at a time, since it
//! takes `&mut self`; the tasks of one async connection could begin many
//! at once. A peer assembles at most [`MAX_PARTIAL`] requests of a session
//! at once (it refuses, then cuts off, a session that begins more), and the
//! daemon's echo, which sends a request back as it comes, holds a reply in
//! chunks open for each. So a link carries at most [`LANES`] requests in
//! chunks at once: a send takes a lane before its first chunk and gives
//! it back after its last (or when it is given up), waking the sends that
//! wait for one. Requests of one frame need no lane, and go on between the
//! chunks.
//!
//! # Cancel safety
//!
//! A send of a request in chunks dropped before its first chunk wrote
//! nothing. Dropped later, before it handed out its ticket, the request
//! is given up as the blocking client gives one up (`Client::abort`): on a
//! live link it is cancelled (the peer drops what it has, and answers
//! `Cancelled`, an answer dropped unread), on a lost link the outcome the
//! loss settled is dropped; an answer that came meanwhile is dropped too.
//! No ticket is left with an outcome no one will take, and the link goes
//! on: the cancel is written before any later frame of the link.

use std::collections::HashMap;
use std::task::{Context, Poll, Waker};

use ipc_core::message::MAX_PARTIAL;

use super::{State, Waiter};
use crate::calls::LinkId;
use crate::client::{Outgoing, Pushed};
use crate::{CallError, Service, Ticket};

#[cfg(doc)]
use crate::AsyncClient;

/// The most requests in chunks one link carries at once (see the module
/// docs): half of what a peer assembles, so that the echo's replies to
/// them leave room for the replies in chunks of other calls.
pub(crate) const LANES: usize = MAX_PARTIAL / 2;

/// The lanes of a connection's links, and the sends waiting for one.
#[derive(Default)]
pub(crate) struct Lanes {
    /// Lanes taken, per link.
    busy: HashMap<LinkId, usize>,
    /// The sends waiting for a lane, by waiter number.
    pub(super) waiting: HashMap<u64, Waker>,
}

impl Lanes {
    /// Takes a lane of `link` for send `me`, or registers its waker.
    pub(super) fn take(&mut self, link: LinkId, me: u64, waker: &Waker) -> bool {
        let busy = self.busy.entry(link).or_default();
        if *busy < LANES {
            *busy += 1;
            self.waiting.remove(&me);
            return true;
        }
        self.waiting.insert(me, waker.clone());
        false
    }

    /// Gives a lane of `link` back, waking every send waiting for one
    /// (each takes one, or waits again).
    pub(super) fn give_back(&mut self, link: LinkId) {
        if let Some(busy) = self.busy.get_mut(&link) {
            *busy = busy.saturating_sub(1);
        }
        for (_, waker) in self.waiting.drain() {
            waker.wake();
        }
    }
}

/// A send's request in chunks, as it goes.
pub(crate) struct Chunked<'a> {
    /// What is left to send (all of it until the first chunk is written).
    rest: &'a [u8],
    /// Its chunks' state, once it holds a lane.
    out: Option<Outgoing>,
}

/// Whether a send's request in chunks has begun on its link (it holds a
/// lane and its outgoing state).
pub(crate) fn begun(chunked: &Option<Chunked<'_>>) -> bool {
    chunked.as_ref().is_some_and(|c| c.out.is_some())
}

/// Polls send `me` of `request` to `service` if the request is longer
/// than a frame (`None`: it is not, and goes as one frame): takes a lane,
/// then writes its chunks as room comes, waiting as any waiter of the
/// connection does. Ready with its ticket once its last chunk is written
/// (or the peer answered before), or with the error that is the request's
/// outcome.
pub(crate) fn poll_send<'a>(
    st: &mut State,
    cx: &mut Context<'_>,
    me: u64,
    service: &Service,
    request: &'a [u8],
    chunked: &mut Option<Chunked<'a>>,
) -> Option<Poll<Result<Ticket, CallError>>> {
    if chunked.is_none() {
        let max = st.client.max_payload_of(service).ok()?;
        if request.len() <= max {
            return None;
        }
        *chunked = Some(Chunked { rest: request, out: None });
    }
    let c = chunked.as_mut().expect("set above");
    if c.out.is_none() {
        let out = match st.client.outgoing(service, Some(request.len() as u64)) {
            Ok(out) => out,
            Err(e) => return Some(Poll::Ready(Err(e))),
        };
        if !st.lanes.take(out.link(), me, cx.waker()) {
            return Some(Poll::Pending);
        }
        c.out = Some(out);
    }
    let max = st.client.max_payload_of(service).unwrap_or(usize::MAX);
    let next = c.out.as_ref().map_or(0, |out| out.room(max).min(c.rest.len()));
    let room = out_room(c, next);
    let polled = st.drive(cx, Waiter::Other(me), Some((service, room)), |st| step(st, service, c, max));
    let Poll::Ready(polled) = polled else { return Some(Poll::Pending) };
    let mut out = c.out.take().expect("a lane is held");
    *chunked = None;
    let sent = match polled {
        Ok(sent) => sent,
        // No way left to wait (the fds): a request begun is given up.
        Err(e) => Err(match out.ticket() {
            Some(ticket) => {
                let e = st.client.abort(&mut out, e);
                let _ = st.take(ticket);
                e
            }
            None => e,
        }),
    };
    // Sent, answered or given up: the lane is free for the next.
    st.lanes.give_back(out.link());
    Some(Poll::Ready(sent))
}

/// The room a wait for the next chunk of `c` (`next` bytes of the
/// message) waits for: its frame's payload.
fn out_room(c: &Chunked<'_>, next: usize) -> usize {
    match c.out.as_ref().and_then(Outgoing::ticket) {
        Some(_) => next,
        None => next + ipc_core::message::CHUNK_PREFIX,
    }
}

/// One step of a send in chunks: writes what fits now. `None` while a
/// chunk waits for room.
fn step(st: &mut State, service: &Service, c: &mut Chunked<'_>, max: usize) -> Option<Result<Ticket, CallError>> {
    let out = c.out.as_mut().expect("a lane is held");
    if out.ticket().is_none() {
        let (first, rest) = c.rest.split_at(out.room(max).min(c.rest.len()));
        match st.client.try_begin_chunks(service, out, first, rest.is_empty()) {
            Ok(Pushed::Full) => return None,
            Ok(_) => c.rest = rest,
            Err(e) => return Some(Err(e)),
        }
    }
    let ticket = out.ticket().expect("begun");
    // An answer before the end may have been taken for its ticket already
    // (reading for any waiter hands out every outcome): the rest is not
    // sent, and that answer is the outcome.
    if st.done.contains_key(&ticket) {
        st.client.answered(out);
        return Some(Ok(ticket));
    }
    match st.client.push_chunks(out, &mut c.rest) {
        Ok(Pushed::Full) => None,
        Ok(Pushed::Written | Pushed::Answered) => Some(Ok(ticket)),
        Err(e) => {
            // Given up: nothing of it is left to hand out.
            let _ = st.take(ticket);
            Some(Err(e))
        }
    }
}

/// A send `me` dropped unfinished (see the module docs).
pub(crate) fn drop_send(st: &mut State, me: u64, chunked: &mut Option<Chunked<'_>>) {
    st.lanes.waiting.remove(&me);
    let Some(mut out) = chunked.take().and_then(|c| c.out) else { return };
    if let Some(ticket) = out.ticket() {
        let _ = st.client.abort(&mut out, CallError::Cancelled);
        if st.take(ticket).is_none() {
            st.client.forget(ticket);
        }
    }
    st.lanes.give_back(out.link());
}
