//! What one frame off a link is, and where its bytes go: a reply of one
//! frame (left on the link for the caller who awaits it, or read aside), a
//! chunk of a longer reply (added to the message being assembled, which a
//! reader may be taking bytes from as they come), a stream's item (whole,
//! or a chunk of it) or its end. Also the small frames the client sends
//! beside its requests, credits and cancels, which wait in order for room.
//!
//! # What a response frame may be
//!
//! The client holds its peer to these; anything else breaks the protocol
//! and loses the link (every request and stream on it gets its outcome).
//!
//! - No flag, or `FLAG_ERROR`: a reply of one frame to a request in
//!   flight. An error reply of one frame to a stream (without `FLAG_END`)
//!   is taken as its terminal too: a peer may refuse a stream before it
//!   begins as it refuses any request.
//! - `FLAG_MORE`: the first chunk of a reply to a request in flight; its
//!   payload begins with the message's length.
//! - `FLAG_STREAM`, with `FLAG_MORE` for a first chunk: an item of a
//!   stream open on the link, within the credit it was granted.
//! - `FLAG_END`, with `FLAG_ERROR` and an error body or without and
//!   empty: a stream's terminal frame, one frame.
//! - A frame of an id whose message is being assembled goes on with it:
//!   `FLAG_STREAM` exactly when the message is an item, `FLAG_MORE` on all
//!   but its last chunk, nothing else, and the first chunk's service. A
//!   reply (not an item) may instead be cut short by `FLAG_ERROR` alone
//!   and an error body: that error is its request's outcome (a peer that
//!   echoes a request as it comes and refuses it half way does so).
//!
//! A reply (or item) longer than the client's `max_message` is not a
//! violation: it is refused, that request's (or stream's) outcome is
//! `ReplyTooLarge`, and the rest of its chunks are dropped as they come.
//! The bytes of every other message are copied once, into the message's
//! body; nothing is kept of a message whose caller gave up on it.

use ipc_core::message::{
    encode_credit, Assembler, MessageError, CHUNK_PREFIX, FLAG_CANCEL, FLAG_CREDIT, FLAG_END, FLAG_MORE, FLAG_STREAM,
    MAX_PARTIAL, UNKNOWN_LENGTH,
};
use ipc_core::{FrameHeader, FLAG_ERROR};

use super::Client;
use crate::calls::{Arrival, Awaiting, LinkId, StreamKey, Ticket, Violation};
use crate::error::CallError;
use crate::link::ReplyRef;

/// The most a message's body reserves up front from the length its first
/// chunk announces: a peer's word is not memory.
const RESERVE_CAP: u64 = 16 << 20;

/// The messages coming in chunks on one link.
pub(crate) struct Inbound {
    assembler: Assembler,
    /// The messages being assembled (the ids the assembler holds).
    partials: Vec<Partial>,
    /// Messages refused on the way (longer than the client takes), whose
    /// remaining chunks are dropped as they come.
    discarding: Vec<u64>,
    /// How a frame broke the protocol, if one did: the link is lost, and
    /// nothing more is read off it.
    violated: Option<String>,
}

/// A message being assembled, and where its bytes go.
pub(crate) struct Partial {
    id: u64,
    service: u16,
    kind: Kind,
    /// Its bytes so far, from `taken` (a reader takes them from the front).
    pub(crate) body: Vec<u8>,
    pub(crate) taken: usize,
    /// The length its first chunk announced.
    pub(crate) total: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A reply to this ticket; `None`: its caller gave up on it, and its
    /// bytes are dropped.
    Reply(Option<Ticket>),
    /// An item of the stream of the same id; `false`: the stream was given
    /// up on, and its bytes are dropped.
    Item(bool),
}

impl Inbound {
    pub(crate) fn new(max_message: u64) -> Inbound {
        Inbound {
            assembler: Assembler::new(max_message),
            partials: Vec::with_capacity(MAX_PARTIAL),
            discarding: Vec::with_capacity(MAX_PARTIAL),
            violated: None,
        }
    }

    /// Forgets every message in chunks (the link was lost).
    pub(crate) fn reset(&mut self) {
        for p in self.partials.drain(..) {
            self.assembler.drop_partial(p.id);
        }
        self.discarding.clear();
    }

    /// Whether frames of `id` go on with a message in chunks.
    fn tracks(&self, id: u64) -> bool {
        !(self.partials.is_empty() && self.discarding.is_empty())
            && (self.assembler.is_partial(id) || self.discarding.contains(&id))
    }

    /// The reply or item of `id` being assembled.
    pub(crate) fn partial_mut(&mut self, id: u64) -> Option<&mut Partial> {
        self.partials.iter_mut().find(|p| p.id == id)
    }

    /// Its caller gave up on reply `id` while it was coming: the rest of
    /// it is dropped as it comes.
    pub(crate) fn forsake(&mut self, id: u64) {
        if let Some(p) = self.partial_mut(id) {
            p.kind = Kind::Reply(None);
            p.body = Vec::new();
            p.taken = 0;
        }
    }

    /// Whether a message may begin in chunks: the peer may have at most
    /// [`MAX_PARTIAL`] open at once, the refused ones included.
    fn room(&self) -> Result<(), String> {
        if self.partials.len() + self.discarding.len() >= MAX_PARTIAL {
            return Err(format!("more than {MAX_PARTIAL} messages in chunks at once"));
        }
        Ok(())
    }
}

/// What one frame came to, for the reader of the links.
pub(super) enum Step {
    /// The reply `awaiting` waits for, one frame, claimed and left on the
    /// link.
    Reply(ReplyRef, Ticket),
    /// An outcome was kept aside for this ticket.
    Kept(Ticket),
    /// A chunk of the reply a reader awaits was added to its message.
    Chunk,
    /// A frame of this stream was taken (an item queued or dropped, its
    /// end, or its refusal).
    Stream(u64),
    /// Anything else was taken care of.
    Handled,
    /// Nothing on the link now.
    Empty,
}

/// A chunk as the assembler found it.
enum Checked {
    /// It goes with its message: whether it is the last, and the length
    /// its message's first chunk announced.
    Piece { last: bool, total: Option<u64> },
    /// The message is longer than the client takes (its length as
    /// announced, if it was): refused.
    Refused(Option<u64>),
}

/// A credit or a cancel to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Control {
    flags: u16,
    service: u16,
    id: u64,
    credit: u32,
}

impl Control {
    /// Cancels request (or stream) `id`.
    pub(super) fn cancel(service: u16, id: u64) -> Control {
        Control { flags: FLAG_CANCEL, service, id, credit: 0 }
    }

    /// Lets stream `id` send `n` more items.
    pub(super) fn credit(service: u16, id: u64, n: u32) -> Control {
        Control { flags: FLAG_CREDIT, service, id, credit: n }
    }
}

impl Client {
    /// Takes the next frame off `link`, as `awaiting` needs it (see the
    /// module docs). The error is why the link must be lost: the peer
    /// broke the protocol, or the link is broken. A failure to hand the
    /// frame's space back marks the link gone, to be settled by the next
    /// wait: the frame was taken meanwhile.
    ///
    /// Once a frame broke the protocol, nothing more is taken off the link
    /// (the same error again): the frames after it cannot be told apart,
    /// and the frame itself is left where it is, but what it broke was
    /// changed on the way (a message being assembled was dropped).
    pub(super) fn take_frame(&mut self, link: LinkId, awaiting: Awaiting) -> Result<Step, String> {
        if let Some(reason) = &self.slots[link].inbound.violated {
            return Err(reason.clone());
        }
        let r = match self.links[link].peek() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Step::Empty),
            Err(CallError::Disconnected { reason }) => return Err(reason),
            Err(e) => return Err(e.to_string()),
        };
        let taken = self.take_peeked(link, r, awaiting);
        if let Err(reason) = &taken {
            self.slots[link].inbound.violated = Some(reason.clone());
        }
        taken
    }

    /// [`Client::take_frame`] once a frame is there.
    fn take_peeked(&mut self, link: LinkId, r: ReplyRef, awaiting: Awaiting) -> Result<Step, String> {
        let h = r.header();
        // A reply of one frame, as every reply was before chunks: claimed
        // by id, and read in place by the caller who awaits it.
        if h.flags & !FLAG_ERROR == 0
            && !self.slots[link].inbound.tracks(h.request_id)
            && u64::from(h.len) <= self.options.max_message
        {
            match self.calls.arrived(link, &h, awaiting) {
                Ok(Arrival::Deliver(ticket)) => return Ok(Step::Reply(r, ticket)),
                Ok(Arrival::Keep(ticket)) => {
                    let mut body = Vec::new();
                    self.links[link].read_all(&r, &mut body);
                    self.calls.keep(ticket, h, body);
                    self.consume_taken(link, &r);
                    return Ok(Step::Kept(ticket));
                }
                Ok(Arrival::Drop) => {
                    self.consume_taken(link, &r);
                    return Ok(Step::Handled);
                }
                // An error without FLAG_END may end a stream.
                Err(Violation::NotInFlight { .. }) if h.is_error() && self.calls.is_open_stream(link, h.request_id) => {
                }
                Err(v) => return Err(v.describe(self.links[link].peer_name())),
            }
        }
        let step = self.take_other(link, &r, awaiting)?;
        self.consume_taken(link, &r);
        Ok(step)
    }

    /// Every frame but a plain reply of one frame.
    fn take_other(&mut self, link: LinkId, r: &ReplyRef, awaiting: Awaiting) -> Result<Step, String> {
        let h = r.header();
        let id = h.request_id;
        let inbound = &mut self.slots[link].inbound;
        if let Some(i) = inbound.discarding.iter().position(|&d| d == id) {
            if h.flags & FLAG_MORE == 0 {
                inbound.discarding.swap_remove(i);
            }
            return Ok(Step::Handled);
        }
        if let Some(i) = inbound.partials.iter().position(|p| p.id == id) {
            return self.go_on(link, i, r, awaiting);
        }
        const END_ERROR: u16 = FLAG_END | FLAG_ERROR;
        const ITEM_CHUNK: u16 = FLAG_STREAM | FLAG_MORE;
        match h.flags {
            FLAG_END | END_ERROR => self.end_stream(link, r),
            FLAG_ERROR if self.calls.is_open_stream(link, id) => self.end_stream(link, r),
            FLAG_STREAM | ITEM_CHUNK => self.begin_item(link, r),
            FLAG_MORE => self.begin_reply(link, r, awaiting),
            // A reply of one frame longer than the client takes.
            0 | FLAG_ERROR => {
                let ticket = self.calls.expects(link, &h).map_err(|v| v.describe(self.links[link].peer_name()))?;
                let max = self.options.max_message;
                self.calls.refuse(link, id, CallError::ReplyTooLarge { len: Some(u64::from(h.len)), max });
                Ok(ticket.map_or(Step::Handled, Step::Kept))
            }
            _ => Err(self.bad(link, &h, "a frame whose flags do not go together")),
        }
    }

    /// Why `h` broke the protocol, for the loss's reason.
    fn bad(&self, link: LinkId, h: &FrameHeader, what: &str) -> String {
        let peer = self.links[link].peer_name();
        format!("{peer} sent {what} (flags {:#x}, request {})", h.flags, h.request_id)
    }

    /// Reads a chunk's payload to the end of `body` (or, if `body` is
    /// `None`, into scratch, to be dropped) and checks it with the
    /// assembler.
    fn chunk_in(&mut self, link: LinkId, r: &ReplyRef, body: Option<&mut Vec<u8>>) -> Result<Checked, String> {
        let h = r.header();
        let mut scratch = std::mem::take(&mut self.scratch);
        let dst = match body {
            Some(body) => body,
            None => {
                scratch.clear();
                &mut scratch
            }
        };
        let start = dst.len();
        self.links[link].read_append(r, dst);
        let bytes = &dst[start..];
        let announced = bytes.first_chunk::<CHUNK_PREFIX>().map(|p| u64::from_le_bytes(*p));
        let taken = self.slots[link].inbound.assembler.take(&h, bytes).map(|p| (p.last, p.total));
        self.scratch = scratch;
        match taken {
            Ok((last, total)) => Ok(Checked::Piece { last, total }),
            Err(MessageError::TooLong { .. }) => {
                let first = !self.slots[link].inbound.partials.iter().any(|p| p.id == h.request_id);
                let len = announced.filter(|&n| first && n != UNKNOWN_LENGTH);
                Ok(Checked::Refused(len))
            }
            Err(e) => Err(format!("{} broke the protocol: {e}", self.links[link].peer_name())),
        }
    }

    /// The first chunk of a reply.
    fn begin_reply(&mut self, link: LinkId, r: &ReplyRef, awaiting: Awaiting) -> Result<Step, String> {
        let h = r.header();
        let ticket = self.calls.expects(link, &h).map_err(|v| v.describe(self.links[link].peer_name()))?;
        self.slots[link].inbound.room().map_err(|e| self.bad(link, &h, &e))?;
        let reader = matches!(awaiting, Awaiting::Chunks(t) if Some(t) == ticket);
        // A `call_into`'s own buffer, reserved once for the whole reply as
        // announced (within the longest message taken, and its prefix,
        // dropped in place): the reply is held once, where its caller
        // wants it.
        let lent = self.borrow_lent(ticket);
        let is_lent = lent.is_some();
        let mut body = lent.unwrap_or_default();
        if is_lent && r.len() >= CHUNK_PREFIX {
            let mut prefix = [0u8; CHUNK_PREFIX];
            self.links[link].read_at(r, 0, &mut prefix);
            let total = u64::from_le_bytes(prefix);
            if total != UNKNOWN_LENGTH && total <= self.options.max_message {
                body.reserve_exact(CHUNK_PREFIX + total as usize);
            }
        }
        let checked = self.chunk_in(link, r, ticket.is_some().then_some(&mut body))?;
        let total = match checked {
            Checked::Piece { total, .. } => total,
            Checked::Refused(len) => {
                self.slots[link].inbound.discarding.push(h.request_id);
                let max = self.options.max_message;
                self.calls.refuse(link, h.request_id, CallError::ReplyTooLarge { len, max });
                return Ok(ticket.map_or(Step::Handled, Step::Kept));
            }
        };
        if ticket.is_some() {
            body.drain(..CHUNK_PREFIX);
            if let (Some(total), false, false) = (total, reader, is_lent) {
                body.reserve_exact(total.min(RESERVE_CAP) as usize);
            }
        }
        let kind = Kind::Reply(ticket);
        let partial = Partial { id: h.request_id, service: h.service, kind, body, taken: 0, total };
        self.slots[link].inbound.partials.push(partial);
        Ok(if reader { Step::Chunk } else { Step::Handled })
    }

    /// An item of a stream, whole or its first chunk.
    fn begin_item(&mut self, link: LinkId, r: &ReplyRef) -> Result<Step, String> {
        let h = r.header();
        let id = h.request_id;
        let keep = self.calls.item_begins(link, id).map_err(|v| v.describe(self.links[link].peer_name()))?;
        let key = StreamKey { link, id };
        let max = self.options.max_message;
        if h.flags & FLAG_MORE == 0 {
            if u64::from(h.len) > max {
                self.refuse_item(key, Some(u64::from(h.len)));
            } else if keep {
                let mut body = Vec::new();
                self.links[link].read_all(r, &mut body);
                self.calls.item(key, body);
            }
            return Ok(Step::Stream(id));
        }
        self.slots[link].inbound.room().map_err(|e| self.bad(link, &h, &e))?;
        let mut body = Vec::new();
        let total = match self.chunk_in(link, r, keep.then_some(&mut body))? {
            Checked::Piece { total, .. } => total,
            Checked::Refused(len) => {
                self.slots[link].inbound.discarding.push(id);
                self.refuse_item(key, len);
                return Ok(Step::Stream(id));
            }
        };
        if keep {
            body.drain(..CHUNK_PREFIX);
            body.reserve_exact(total.unwrap_or(0).min(RESERVE_CAP) as usize);
        }
        let partial = Partial { id, service: h.service, kind: Kind::Item(keep), body, taken: 0, total };
        self.slots[link].inbound.partials.push(partial);
        Ok(Step::Stream(id))
    }

    /// An item longer than the client takes: the stream ends with
    /// `ReplyTooLarge` (after the items before it), and is cancelled.
    fn refuse_item(&mut self, key: StreamKey, len: Option<u64>) {
        let max = self.options.max_message;
        let service = self.calls.stream_service(key);
        if self.calls.give_up(key, CallError::ReplyTooLarge { len, max }) {
            self.queue_control(key.link, Control::cancel(service.unwrap_or(0), key.id));
        }
    }

    /// A frame that goes on with message `i` being assembled.
    fn go_on(&mut self, link: LinkId, i: usize, r: &ReplyRef, awaiting: Awaiting) -> Result<Step, String> {
        let h = r.header();
        let id = h.request_id;
        let (kind, service) = {
            let p = &self.slots[link].inbound.partials[i];
            (p.kind, p.service)
        };
        if h.flags == FLAG_ERROR && matches!(kind, Kind::Reply(_)) {
            return self.cut_reply(link, i, r);
        }
        let expected = if matches!(kind, Kind::Item(_)) { FLAG_STREAM } else { 0 };
        if h.flags & !FLAG_MORE != expected {
            return Err(self.bad(link, &h, "a chunk that does not go on with its message"));
        }
        if h.service != service {
            return Err(self.bad(link, &h, &format!("a chunk under service {}, begun under {service}", h.service)));
        }
        let keep = matches!(kind, Kind::Reply(Some(_)) | Kind::Item(true));
        let mut body = if keep { std::mem::take(&mut self.slots[link].inbound.partials[i].body) } else { Vec::new() };
        let needed = body.len() + r.len();
        if keep && needed > body.capacity() {
            // Grown by doubling, but never past the length announced: a
            // message is held once, not up to twice.
            let total = self.slots[link].inbound.partials[i].total.unwrap_or(u64::MAX);
            let most = usize::try_from(total).unwrap_or(usize::MAX);
            let grown = body.capacity().saturating_mul(2).min(most).max(needed);
            body.reserve_exact(grown - body.len());
        }
        let checked = match self.chunk_in(link, r, keep.then_some(&mut body)) {
            Ok(checked) => checked,
            Err(e) => {
                self.slots[link].inbound.partials.swap_remove(i);
                return Err(e);
            }
        };
        let inbound = &mut self.slots[link].inbound;
        let last = match checked {
            Checked::Piece { last, .. } => last,
            Checked::Refused(_) => {
                // Of unknown length, and past the maximum.
                inbound.partials.swap_remove(i);
                if h.flags & FLAG_MORE != 0 {
                    inbound.discarding.push(id);
                }
                return Ok(match kind {
                    Kind::Reply(ticket) => {
                        let max = self.options.max_message;
                        self.calls.refuse(link, id, CallError::ReplyTooLarge { len: None, max });
                        ticket.map_or(Step::Handled, Step::Kept)
                    }
                    Kind::Item(_) => {
                        self.refuse_item(StreamKey { link, id }, None);
                        Step::Stream(id)
                    }
                });
            }
        };
        if !last {
            inbound.partials[i].body = body;
            return Ok(match kind {
                Kind::Reply(Some(t)) if awaiting == Awaiting::Chunks(t) => Step::Chunk,
                Kind::Item(_) => Step::Stream(id),
                Kind::Reply(_) => Step::Handled,
            });
        }
        let p = inbound.partials.swap_remove(i);
        body.drain(..p.taken);
        match kind {
            Kind::Reply(_) => {
                // Claimed now that it is whole: until then a loss of the
                // link was its request's outcome.
                let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
                let header = FrameHeader { len, service, flags: 0, request_id: id };
                match self.calls.arrived(link, &header, Awaiting::Nothing) {
                    Ok(Arrival::Keep(ticket) | Arrival::Deliver(ticket)) => {
                        self.calls.keep(ticket, header, body);
                        Ok(Step::Kept(ticket))
                    }
                    Ok(Arrival::Drop) => Ok(Step::Handled),
                    Err(v) => Err(v.describe(self.links[link].peer_name())),
                }
            }
            Kind::Item(keep) => {
                if keep {
                    self.calls.item(StreamKey { link, id }, body);
                }
                Ok(Step::Stream(id))
            }
        }
    }

    /// An error frame that cuts reply `i` short: the reply being assembled
    /// is dropped, and the error is its request's outcome, claimed as an
    /// error reply of one frame would be.
    fn cut_reply(&mut self, link: LinkId, i: usize, r: &ReplyRef) -> Result<Step, String> {
        let h = r.header();
        let inbound = &mut self.slots[link].inbound;
        let p = inbound.partials.swap_remove(i);
        inbound.assembler.drop_partial(p.id);
        let mut body = Vec::new();
        self.links[link].read_all(r, &mut body);
        match self.calls.arrived(link, &h, Awaiting::Nothing) {
            Ok(Arrival::Keep(ticket) | Arrival::Deliver(ticket)) => {
                self.calls.keep(ticket, h, body);
                Ok(Step::Kept(ticket))
            }
            Ok(Arrival::Drop) => Ok(Step::Handled),
            Err(v) => Err(v.describe(self.links[link].peer_name())),
        }
    }

    /// A stream's terminal frame (or an error reply to it).
    fn end_stream(&mut self, link: LinkId, r: &ReplyRef) -> Result<Step, String> {
        let h = r.header();
        let outcome = if h.is_error() {
            let mut body = std::mem::take(&mut self.scratch);
            self.links[link].read_all(r, &mut body);
            let outcome = self.outcome_on(link, h, &mut body);
            self.scratch = body;
            outcome
        } else if h.len != 0 {
            return Err(self.bad(link, &h, "a stream's end with a payload"));
        } else {
            Ok(())
        };
        self.calls.stream_ended(link, h.request_id, outcome).map_err(|v| v.describe(self.links[link].peer_name()))?;
        Ok(Step::Stream(h.request_id))
    }

    /// Consumes a frame taken, handing its space back; a failure marks the
    /// link gone (see [`Client::take_frame`]).
    fn consume_taken(&mut self, link: LinkId, r: &ReplyRef) {
        if let Err(CallError::Disconnected { reason }) = self.links[link].consume(r) {
            self.links[link].mark_gone(reason);
        }
    }

    /// Queues a credit or cancel on `link`, sent with the link's next
    /// writes (nothing is sent on a lost link).
    pub(super) fn queue_control(&mut self, link: LinkId, control: Control) {
        if self.calls.lost(link).is_none() {
            self.slots[link].pending.push_back(control);
        }
    }

    /// Writes the queued credits and cancels that fit on `link` now, in
    /// order; the rest wait for room.
    pub(super) fn send_controls(&mut self, link: LinkId) -> Result<(), CallError> {
        while let Some(&c) = self.slots[link].pending.front() {
            let credit = encode_credit(c.credit);
            let payload: &[u8] = if c.flags == FLAG_CREDIT { &credit } else { &[] };
            let written =
                self.links[link].try_write(c.service, c.flags, c.id, payload.len(), |buf| buf.write_at(0, payload))?;
            if written.is_none() {
                break;
            }
            self.slots[link].pending.pop_front();
        }
        Ok(())
    }

    /// Writes every link's queued credits and cancels that fit, and hands
    /// them to the peers. Whether a link was lost doing so.
    pub(super) fn send_all_controls(&mut self) -> bool {
        let mut lost = false;
        for link in 0..self.links.len() {
            if self.slots[link].pending.is_empty() {
                continue;
            }
            if self.calls.lost(link).is_some() {
                self.slots[link].pending.clear();
                continue;
            }
            let sent = self.send_controls(link).and_then(|()| self.links[link].flush());
            lost |= self.note(link, sent).is_err();
        }
        lost
    }
}
