//! A request going out in chunks: the one state machine every sender of a
//! message longer than a frame drives, the blocking ones (`send`, a call,
//! an upload, a reply reader's request) and the async client alike. How
//! chunks look on the wire is `ipc_core::message`'s; what a request in
//! chunks is to its caller is in `client/messages.rs`.
//!
//! Each step here writes without waiting: [`Client::begin_chunks`] the
//! first chunk (which takes the link's next id and records the request as
//! sent), [`Client::try_chunk`] the next one, [`Client::push_chunks`] as
//! many of a request's remaining chunks as fit now. A step that finds no
//! room says so ([`Pushed::Full`]), and its caller waits for room its own
//! way: a blocking sender sleeps ([`Client::send_chunk`]), the async client
//! arms the doorbell and yields. Between steps, whatever reads the links
//! takes replies aside, so a peer that answers as it reads (the echo) is
//! never stuck behind the sender. An upload, written bit by bit, gathers
//! its bytes into chunks first ([`Gathered`]: at most a chunk held, its
//! length checked as it grows).
//!
//! A step first looks whether the peer answered the request already (a
//! refusal before its end): then the rest is not sent but cancelled, and
//! the answer is the request's outcome. A sender that gives the request up
//! before its end ([`Client::abort`]: no room in time, its handle or future
//! dropped, a wrong length) cancels it on a link still up (the peer drops
//! what it has; the request did not run), or, on a lost link, drops the
//! outcome the loss settled: either way the error it hands out is the
//! request's one outcome.

use ipc_core::message::{encode_chunk_prefix, CHUNK_LEN, CHUNK_PREFIX, FLAG_MORE, UNKNOWN_LENGTH};

use super::inbound::Control;
use super::{Client, Deadline, Room, Service};
use crate::calls::{LinkId, Ticket};
use crate::error::CallError;

/// A request being sent in chunks.
pub(crate) struct Outgoing {
    link: LinkId,
    service: u16,
    /// The length its first chunk announces (`None`: unknown).
    announced: Option<u64>,
    /// Once its first chunk is written.
    ticket: Option<Ticket>,
    state: Sending,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sending {
    /// Chunks go on.
    Going,
    /// The peer answered before its end: the rest was cancelled.
    Answered,
    /// Given up before its end, and cancelled.
    Aborted,
}

/// What a step of sending came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// The chunk (or every chunk asked for) was written.
    Written,
    /// No room for the next chunk now: wait for room, then step again.
    Full,
    /// The peer answered before the end: nothing more is sent.
    Answered,
}

impl Outgoing {
    /// A request to `service` on `link`, of `announced` bytes if known.
    pub(crate) fn new(link: LinkId, service: u16, announced: Option<u64>) -> Outgoing {
        Outgoing { link, service, announced, ticket: None, state: Sending::Going }
    }

    /// Bytes of the message the next chunk carries at most: a chunk is
    /// at most [`CHUNK_LEN`] long, whatever a frame could carry.
    pub(crate) fn room(&self, max_payload: usize) -> usize {
        let chunk = max_payload.min(CHUNK_LEN);
        if self.ticket.is_none() {
            chunk - CHUNK_PREFIX
        } else {
            chunk
        }
    }

    /// The link it goes out on.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn link(&self) -> LinkId {
        self.link
    }

    /// Its ticket, once its first chunk is written.
    pub(crate) fn ticket(&self) -> Option<Ticket> {
        self.ticket
    }

    /// Whether chunks still go on (neither answered nor given up).
    pub(crate) fn is_going(&self) -> bool {
        self.state == Sending::Going
    }

    /// The room a wait for its next chunk of `len` bytes waits for.
    pub(super) fn room_for(&self, len: usize) -> Room {
        let begins = self.ticket.is_none();
        Room { link: self.link, len: if begins { CHUNK_PREFIX + len } else { len }, begins }
    }
}

/// A request written bit by bit (an upload), gathered into chunks: the
/// bytes written and not yet sent are at most a chunk, sent when more
/// comes (so the last chunk is never empty) or at the finish.
pub(crate) struct Gathered {
    pub(crate) out: Outgoing,
    max_payload: usize,
    /// The longest message the client sends.
    limit: u64,
    pub(crate) buf: Vec<u8>,
    written: u64,
}

impl Gathered {
    /// An upload of `out` on a link of `max_payload`, gathered in `buf`.
    pub(crate) fn new(out: Outgoing, max_payload: usize, limit: u64, mut buf: Vec<u8>) -> Gathered {
        buf.clear();
        buf.reserve(max_payload.min(CHUNK_LEN));
        Gathered { out, max_payload, limit, buf, written: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Whether `n` more bytes may be written: not past the length
    /// announced ([`CallError::UploadLength`]), nor past the longest
    /// message ([`CallError::TooLarge`]).
    pub(crate) fn admit(&self, n: usize) -> Result<(), CallError> {
        let total = self.written + n as u64;
        match self.out.announced {
            Some(announced) if total > announced => Err(CallError::UploadLength { announced, written: total }),
            None if total > self.limit => {
                let len = usize::try_from(total).unwrap_or(usize::MAX);
                Err(CallError::TooLarge { len, max: usize::try_from(self.limit).unwrap_or(usize::MAX) })
            }
            _ => Ok(()),
        }
    }

    /// Whether the bytes gathered are a whole chunk, to send before more
    /// is gathered.
    pub(crate) fn is_full(&self) -> bool {
        self.out.is_going() && self.buf.len() == self.out.room(self.max_payload)
    }

    /// Gathers what fits of `data` (admitted, and not [`Gathered::is_full`]):
    /// the bytes taken. Once the peer answered, all of it is taken and
    /// dropped: the rest is not sent.
    pub(crate) fn gather(&mut self, data: &[u8]) -> usize {
        let n = if self.out.is_going() {
            let n = (self.out.room(self.max_payload) - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            n
        } else {
            data.len()
        };
        self.written += n as u64;
        n
    }

    /// At the finish: [`CallError::UploadLength`] short of the length
    /// announced.
    pub(crate) fn check_whole(&self) -> Result<(), CallError> {
        match self.out.announced {
            Some(announced) if announced != self.written => {
                Err(CallError::UploadLength { announced, written: self.written })
            }
            _ => Ok(()),
        }
    }
}

impl Client {
    /// Sends the bytes `g` gathered as its next chunk (the last with
    /// `last`) if there is room now; [`Pushed::Full`] leaves them
    /// gathered. An error is the link's, as [`Client::try_chunk`]'s.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_send_gathered(
        &mut self,
        service: &Service,
        g: &mut Gathered,
        last: bool,
    ) -> Result<Pushed, CallError> {
        let pushed = match g.out.ticket() {
            None => self.try_begin_chunks(service, &mut g.out, &g.buf, last)?,
            Some(_) => self.try_chunk(&mut g.out, &g.buf, last)?,
        };
        if pushed != Pushed::Full {
            g.buf.clear();
        }
        Ok(pushed)
    }

    /// Refuses a request of `len` bytes longer than the client's
    /// [`ClientOptions::max_message`](crate::ClientOptions::max_message).
    pub(crate) fn check_message_len(&self, len: u64) -> Result<(), CallError> {
        let limit = self.options.max_message;
        if len > limit {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            return Err(CallError::TooLarge { len, max: usize::try_from(limit).unwrap_or(usize::MAX) });
        }
        Ok(())
    }

    /// A request of `len` bytes (if known) to `service` to send in chunks:
    /// [`CallError::TooLarge`] past the client's largest message.
    pub(crate) fn outgoing(&self, service: &Service, len: Option<u64>) -> Result<Outgoing, CallError> {
        let link = self.link_of(service)?;
        if let Some(len) = len {
            self.check_message_len(len)?;
        }
        Ok(Outgoing::new(link, service.id, len))
    }

    /// An upload to `service` of `len` bytes if known, gathered in `buf`:
    /// [`CallError::TooLarge`] past the client's largest message.
    pub(crate) fn gathered(&self, service: &Service, len: Option<u64>, buf: Vec<u8>) -> Result<Gathered, CallError> {
        let out = self.outgoing(service, len)?;
        let max_payload = self.slots[out.link].max_payload;
        Ok(Gathered::new(out, max_payload, self.options.max_message, buf))
    }

    /// [`Client::begin_chunks`] without waiting: [`Pushed::Full`] if there
    /// is no room for the first chunk now (a lost daemon link is connected
    /// again at most once, as by [`Client::try_send`]).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_begin_chunks(
        &mut self,
        service: &Service,
        out: &mut Outgoing,
        bytes: &[u8],
        last: bool,
    ) -> Result<Pushed, CallError> {
        self.begin_chunks(service, out, bytes, last, false, &mut Deadline::new(std::time::Duration::ZERO))
    }

    /// Writes the first chunk of `out` (`bytes`, the last with `last`),
    /// waiting for room until the deadline with `wait`, else at once or
    /// not at all ([`Pushed::Full`]). Written, the request is sent: it has
    /// its ticket, and its reply may begin while the rest is sent.
    pub(super) fn begin_chunks(
        &mut self,
        service: &Service,
        out: &mut Outgoing,
        bytes: &[u8],
        last: bool,
        wait: bool,
        dl: &mut Deadline,
    ) -> Result<Pushed, CallError> {
        debug_assert!(out.ticket.is_none(), "a request begins once");
        let flags = if last { 0 } else { FLAG_MORE };
        let prefix = encode_chunk_prefix(out.announced.unwrap_or(UNKNOWN_LENGTH));
        let fill = |buf: &mut crate::RequestBuf<'_>| {
            buf.write_at(0, &prefix);
            buf.write_at(CHUNK_PREFIX, bytes);
        };
        match self.write_request(service, flags, CHUNK_PREFIX + bytes.len(), fill, wait, dl) {
            Ok(()) => {}
            Err(CallError::Full { .. }) if !wait => return Ok(Pushed::Full),
            Err(e) => return Err(e),
        }
        let ticket = self.calls.sent(out.link, out.service);
        out.ticket = Some(ticket);
        self.lend_to(ticket);
        Ok(Pushed::Written)
    }

    /// Writes the next chunk of `out`, begun already, if there is room
    /// now; stops, cancelling the rest, if the peer answered meanwhile.
    /// An error is the link's (the caller gives the request up with
    /// [`Client::abort`], unless it was answered meanwhile).
    pub(crate) fn try_chunk(&mut self, out: &mut Outgoing, bytes: &[u8], last: bool) -> Result<Pushed, CallError> {
        let ticket = out.ticket.expect("a request in chunks is begun first");
        if !out.is_going() {
            return Ok(Pushed::Answered);
        }
        if self.calls.kept(ticket) {
            self.answered(out);
            return Ok(Pushed::Answered);
        }
        let link = out.link;
        let flags = if last { 0 } else { FLAG_MORE };
        // Credits and cancels queued go first, in order.
        let written = match self.send_controls(link) {
            Ok(()) if !self.slots[link].pending.is_empty() => Ok(None),
            Ok(()) => self.links[link].try_write(out.service, flags, ticket.id(), bytes.len(), |buf| {
                buf.write_at(0, bytes);
            }),
            Err(e) => Err(e),
        };
        match self.note(link, written)? {
            Some(()) => Ok(Pushed::Written),
            None => Ok(Pushed::Full),
        }
    }

    /// The peer answered `out` before its end (the answer was taken for
    /// its caller): the rest is not sent, but cancelled.
    pub(crate) fn answered(&mut self, out: &mut Outgoing) {
        let Some(ticket) = out.ticket.filter(|_| out.is_going()) else { return };
        out.state = Sending::Answered;
        self.cancel_unfinished(out.link, out.service, ticket);
    }

    /// Writes as many of the chunks of `rest`, the remainder of `out`
    /// (begun already), as fit now, without waiting, and hands them to
    /// the peer. [`Pushed::Written`] once all are written, [`Pushed::Full`]
    /// while some wait for room; an error gives the request up.
    pub(crate) fn push_chunks(&mut self, out: &mut Outgoing, rest: &mut &[u8]) -> Result<Pushed, CallError> {
        let link = out.link;
        let max = self.slots[link].max_payload;
        let mut pushed = Pushed::Written;
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(out.room(max).min(rest.len()));
            match self.try_chunk(out, chunk, after.is_empty()) {
                Ok(Pushed::Written) => *rest = after,
                Ok(other) => {
                    pushed = other;
                    break;
                }
                // Answered meanwhile: that answer is its outcome.
                Err(_) if out.ticket.is_some_and(|t| self.calls.kept(t)) => {
                    self.answered(out);
                    pushed = Pushed::Answered;
                    break;
                }
                Err(e) => return Err(self.abort(out, e)),
            }
        }
        let flushed = self.links[link].flush();
        let _ = self.note(link, flushed);
        Ok(pushed)
    }

    /// Writes the next chunk of `out`, the last with `last`, waiting for
    /// room until the deadline. Stops without writing it if the peer
    /// answered the request meanwhile; gives the request up (see
    /// [`Client::abort`]) if no room came or the link was lost.
    pub(super) fn send_chunk(
        &mut self,
        service: &Service,
        out: &mut Outgoing,
        bytes: &[u8],
        last: bool,
        dl: &mut Deadline,
    ) -> Result<(), CallError> {
        if out.ticket.is_none() {
            return self.begin_chunks(service, out, bytes, last, true, dl).map(|_| ());
        }
        let ticket = out.ticket.expect("begun");
        loop {
            let error = match self.try_chunk(out, bytes, last) {
                Ok(Pushed::Written | Pushed::Answered) => return Ok(()),
                Ok(Pushed::Full) => match self.wait_for_room(out.room_for(bytes.len()), dl) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if self.calls.kept(ticket) {
                continue;
            }
            return Err(self.abort(out, error));
        }
    }

    /// Gives up a request in chunks before its end, for `error`: on a link
    /// still up, it is cancelled (its peer drops what it has, and its
    /// answer, if any, is dropped); on a lost link its outcome settled by
    /// the loss is dropped. Either way it did not run, and the returned
    /// error says so.
    pub(crate) fn abort(&mut self, out: &mut Outgoing, error: CallError) -> CallError {
        let Some(ticket) = out.ticket.filter(|_| out.is_going()) else { return error };
        out.state = Sending::Aborted;
        let link = out.link;
        if let Some(refused) = self.calls.refusal(link) {
            let _ = self.calls.take_settled(ticket);
            return match error {
                CallError::Disconnected { .. } | CallError::NotConnected { .. } | CallError::Shutdown => refused,
                other => other,
            };
        }
        self.calls.abandon(ticket);
        self.cancel_unfinished(link, out.service, ticket);
        error
    }

    /// Sends a cancel for a request whose chunks stopped before its end.
    fn cancel_unfinished(&mut self, link: LinkId, service: u16, ticket: Ticket) {
        self.queue_control(link, Control::cancel(service, ticket.id()));
        let sent = self.send_controls(link).and_then(|()| self.links[link].flush());
        let _ = self.note(link, sent);
    }
}
