//! A session's calls, whatever carries their frames: each frame the client
//! sends, checked and taken; the requests received in chunks, the calls
//! handed off, the streams open; and the frames that go back.
//!
//! Both transports read frames their own way (the request ring, the
//! socket's buffer) and write them their own way (the response ring, the
//! socket's output, behind a [`Sink`]); everything between is here, once:
//!
//! - a new request of one frame is dispatched at once, and its reply
//!   written (or, if it does not fit, kept in the outbox; longer than a
//!   frame, sent in chunks);
//! - a request in chunks is assembled, uploaded or reflected as it comes
//!   ([`crate::inbox`]), and answered when it is complete, or at once with
//!   an error that refuses it (`MessageTooLarge`, `TooMany`, a handler's),
//!   after which its further chunks are discarded;
//! - an opening starts a stream's handler on a thread of its own, whose
//!   items and end go out through the stream's lane
//!   ([`crate::streaming`]); credits and cancels reach it;
//! - the answers of handed-off calls, stream items, and long replies wait
//!   in the outbox ([`crate::outbox`]) and go out as the client makes room.
//!
//! Every request the session takes gets exactly one answer: its reply, an
//! error reply, or for a stream its terminal frame; the echo's reflected
//! reply, once begun, is either finished or cut by an error frame of its
//! id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::message::{decode_credit, StreamOpen, CHUNK_PREFIX, FLAG_END, UNKNOWN_LENGTH};
use ipc_core::{encode_error, ErrorCode, FrameHeader, FLAG_ERROR};

use crate::deferred::{too_long, Completion, Outstanding, Slot};
use crate::inbox::{Inbox, Incoming, Length, Receiving};
use crate::limits::Limits;
use crate::outbox::{Flush, Message, Outbox, Sink};
use crate::request::{OwnedRequest, Request, SessionContext};
use crate::service::{
    check_request, dispatch, finish_upload, start_upload, upload_chunk, Bytes, Dispatched, Handler, Kind, Serving,
    SHUTDOWN_MESSAGE,
};
use crate::session::Tally;
use crate::stats::WorkerCounters;
use crate::streaming::{SendError, StreamLane, MAX_OPEN_STREAMS};

/// What became of a frame offered to [`Exchange::take`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Took {
    /// Taken: the transport moves past it.
    Taken,
    /// Not taken: what it needs to send (a reflected chunk, of this
    /// payload length) has no room yet. The transport leaves the frame
    /// where it is and waits for the client to make room.
    NoRoom(usize),
}

/// A session's calls; see the module docs.
pub(crate) struct Exchange {
    /// What its handlers see of it, and what it may call.
    pub(crate) context: SessionContext,
    last_request_id: u64,
    /// Calls handed off and not yet answered.
    outstanding: Outstanding,
    inbox: Inbox,
    outbox: Outbox,
}

impl Exchange {
    pub(crate) fn new(context: SessionContext) -> Exchange {
        Exchange {
            context,
            last_request_id: 0,
            outstanding: Outstanding::default(),
            inbox: Inbox::default(),
            outbox: Outbox::default(),
        }
    }

    /// The last request taken: a new request of one frame, a first chunk,
    /// or an opening.
    pub(crate) fn last_request_id(&self) -> u64 {
        self.last_request_id
    }

    /// Checks a frame's header (see [`check_request`]) before its payload
    /// is read; an error breaks the protocol.
    pub(crate) fn check(&self, header: &FrameHeader) -> Result<Kind, String> {
        let receiving = self.inbox.get(header.request_id).map(|e| e.service);
        check_request(header, self.last_request_id, receiving)
    }

    /// Takes a frame that [`check`](Self::check) found to be `kind`, with
    /// its `payload` (a private copy, or the socket's buffer), writing what
    /// it answers to `sink` (or keeping it in the outbox). `reply` is the
    /// worker's buffer for inline replies. An error breaks the protocol.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take(
        &mut self,
        with: &Serving<'_>,
        slot: Slot,
        kind: Kind,
        header: &FrameHeader,
        payload: &[u8],
        reply: &mut Vec<u8>,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<Took, String> {
        match kind {
            Kind::New { chunked: false } => {
                self.taken(header, tally);
                if payload.len() as u64 > with.max_message {
                    let message = too_long("request", payload.len() as u64, with.max_message);
                    return self
                        .refuse(header, ErrorCode::MessageTooLarge, &message, sink, tally)
                        .map(|()| Took::Taken);
                }
                let dispatched = dispatch(with, &self.context, slot, header, Bytes::Slice(payload), reply);
                self.dispatched(with, header, dispatched, reply, sink, tally)?;
                Ok(Took::Taken)
            }
            Kind::New { chunked: true } => self.begin(with, header, payload, sink, tally),
            Kind::GoOn { last } => self.go_on(with, slot, header, payload, last, reply, sink, tally),
            Kind::Open => {
                self.taken(header, tally);
                self.open(with, slot, header, payload, sink, tally)?;
                Ok(Took::Taken)
            }
            Kind::Credit => {
                let n = decode_credit(payload).map_err(|e| e.to_string())?;
                // A stream that has ended since: its caller did not know yet.
                if let Some(stream) = self.outbox.stream(header.request_id) {
                    stream.grant(n);
                }
                Ok(Took::Taken)
            }
            Kind::Cancel => {
                self.cancel(header.request_id, sink, tally)?;
                Ok(Took::Taken)
            }
        }
    }

    /// A new request is taken: it is the last taken, and counted.
    fn taken(&mut self, header: &FrameHeader, tally: &mut Tally) {
        self.last_request_id = header.request_id;
        tally.taken += 1;
    }

    /// What a dispatch left: a reply in `reply` to send, or a call handed
    /// off.
    fn dispatched(
        &mut self,
        with: &Serving<'_>,
        header: &FrameHeader,
        dispatched: Dispatched,
        reply: &mut Vec<u8>,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<(), String> {
        match dispatched {
            Dispatched::Replied(flags) => {
                tally.answered += 1;
                tally.errors += u64::from(flags != 0);
                self.send(with, header, flags, reply, sink)
            }
            Dispatched::Deferred(started) => {
                self.outstanding.add(header.request_id, header.service, started);
                Ok(())
            }
        }
    }

    /// Sends the reply in `reply` to request `header`: at once if it is one
    /// frame and fits, else by the outbox (taking the buffer). A reply
    /// longer than a frame is charged while it waits; past the budget, it
    /// is answered with `MessageTooLarge` instead.
    fn send(
        &mut self,
        with: &Serving<'_>,
        header: &FrameHeader,
        flags: u16,
        reply: &mut Vec<u8>,
        sink: &mut dyn Sink,
    ) -> Result<(), String> {
        let (id, service) = (header.request_id, header.service);
        if reply.len() <= sink.max_payload() {
            if !self.outbox.has_ready() && sink.put(header_for(id, service, flags), &[reply])? {
                return Ok(());
            }
            // The worker's buffer goes with it (and grows again), held to
            // one frame, which is what the session is charged for it.
            let mut body = std::mem::take(reply);
            body.shrink_to(sink.max_payload());
            self.outbox.push(Message::new(id, service, flags, body, None));
            return Ok(());
        }
        let mut body = std::mem::take(reply);
        body.shrink_to_fit();
        match with.limits.charge(body.capacity() as u64) {
            Some(charge) => self.outbox.push(Message::new(id, service, flags, body, Some(charge))),
            None => {
                let message = over_budget("reply", body.len(), with.limits);
                self.outbox.push(Message::new(
                    id,
                    service,
                    FLAG_ERROR,
                    error_body(ErrorCode::MessageTooLarge, &message),
                    None,
                ));
            }
        }
        Ok(())
    }

    /// Answers request `header` with an error of one frame.
    fn refuse(
        &mut self,
        header: &FrameHeader,
        code: ErrorCode,
        message: &str,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<(), String> {
        self.error(header.request_id, header.service, FLAG_ERROR, error_body(code, message), sink, tally)
    }

    /// Writes an error frame (`flags` with `FLAG_ERROR`), at once if it
    /// fits, else by the outbox; counted as an answer.
    fn error(
        &mut self,
        id: u64,
        service: u16,
        flags: u16,
        body: Vec<u8>,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<(), String> {
        tally.answered += 1;
        tally.errors += 1;
        if !self.outbox.has_ready() && sink.put(header_for(id, service, flags), &[&body])? {
            return Ok(());
        }
        self.outbox.push(Message::new(id, service, flags, body, None));
        Ok(())
    }

    /// The first chunk of a request longer than a frame.
    fn begin(
        &mut self,
        with: &Serving<'_>,
        header: &FrameHeader,
        payload: &[u8],
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<Took, String> {
        let (prefix, bytes) = payload.split_at(CHUNK_PREFIX);
        let total = u64::from_le_bytes(prefix.try_into().expect("a prefix"));
        let total = (total != UNKNOWN_LENGTH).then_some(total);
        let (id, service) = (header.request_id, header.service);
        if total.is_some_and(|t| (bytes.len() as u64) > t) {
            return Err(format!("request {id} announced {} bytes and carried {}", total.unwrap_or(0), bytes.len()));
        }
        let entry = |receiving| Incoming { id, service, total, got: bytes.len() as u64, receiving };
        // Why the request is refused, if it is: answered at once, and its
        // chunks discarded as they come.
        let refusal = if with.shutting_down {
            Some(error_body(ErrorCode::Shutdown, SHUTDOWN_MESSAGE))
        } else if !self.inbox.has_room() {
            let message = format!("{} requests are being received at once, the most", ipc_core::message::MAX_PARTIAL);
            Some(error_body(ErrorCode::TooMany, &message))
        } else if let Some(total) = total.filter(|&t| t > with.max_message) {
            Some(error_body(ErrorCode::MessageTooLarge, &too_long("request", total, with.max_message)))
        } else {
            match with.services.resolve(&self.context, service) {
                Err((code, message)) => Some(error_body(code, &message)),
                Ok((name, Handler::Stream(_))) => {
                    let message = format!("service {service} ({name}) is a stream service: open a stream");
                    Some(error_body(ErrorCode::UnknownService, &message))
                }
                Ok((_, Handler::Echo)) => {
                    // Sent back as it comes: the reply begins now.
                    if !self.outbox.begin_partial() {
                        return Ok(Took::NoRoom(sink.max_payload()));
                    }
                    if !sink.put(*header, &[payload])? {
                        self.outbox.end_partial();
                        return Ok(Took::NoRoom(payload.len()));
                    }
                    self.taken(header, tally);
                    self.inbox.insert(entry(Receiving::Reflect));
                    return Ok(Took::Taken);
                }
                Ok((name, Handler::Upload(start))) => {
                    let call = Request::new(&[], name, &self.context, id);
                    let started = start_upload(&**start, &call, total, service);
                    match started.and_then(|mut upload| {
                        upload_chunk(&mut *upload, bytes, self.context.id, service).map(|()| upload)
                    }) {
                        Ok(upload) => {
                            self.taken(header, tally);
                            self.inbox.insert(entry(Receiving::Upload(upload)));
                            return Ok(Took::Taken);
                        }
                        Err(body) => Some(body),
                    }
                }
                Ok(_) => {
                    // Assembled, as it comes, in a buffer charged as it grows.
                    let limit = total.unwrap_or(with.max_message);
                    let capacity = (bytes.len() as u64).saturating_mul(2).min(limit);
                    match with.limits.charge(capacity) {
                        Some(charge) => {
                            let mut assembled = Vec::with_capacity(capacity as usize);
                            assembled.extend_from_slice(bytes);
                            self.taken(header, tally);
                            self.inbox.insert(entry(Receiving::Assemble { bytes: assembled, charge }));
                            return Ok(Took::Taken);
                        }
                        None => {
                            let message = over_budget("request", capacity as usize, with.limits);
                            Some(error_body(ErrorCode::MessageTooLarge, &message))
                        }
                    }
                }
            }
        };
        let body = refusal.expect("refused");
        if !self.inbox.has_room_to_discard() {
            return Err(format!(
                "request {id} is refused while {} refused ones are still being sent",
                ipc_core::message::MAX_PARTIAL
            ));
        }
        self.taken(header, tally);
        self.inbox.insert(entry(Receiving::Discard));
        self.error(id, service, FLAG_ERROR, body, sink, tally)?;
        Ok(Took::Taken)
    }

    /// A chunk that goes on with a request being received.
    #[allow(clippy::too_many_arguments)]
    fn go_on(
        &mut self,
        with: &Serving<'_>,
        slot: Slot,
        header: &FrameHeader,
        payload: &[u8],
        last: bool,
        reply: &mut Vec<u8>,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<Took, String> {
        let id = header.request_id;
        let entry = self.inbox.get_mut(id).expect("checked: a request being received");
        let length = entry.check(payload.len(), last, with.max_message)?;
        if length == Length::TooLong {
            // A request of unknown length passes the largest message: refused
            // from here on.
            let message = too_long("request", entry.got.saturating_add(payload.len() as u64), with.max_message);
            let body = error_body(ErrorCode::MessageTooLarge, &message);
            let was = std::mem::replace(&mut entry.receiving, Receiving::Discard);
            entry.got += payload.len() as u64;
            if last {
                self.inbox.remove(id);
            }
            return self.refuse_received(id, header.service, was, body, sink, tally).map(|()| Took::Taken);
        }
        match &mut entry.receiving {
            Receiving::Discard => {}
            Receiving::Reflect => {
                if !sink.put(*header, &[payload])? {
                    return Ok(Took::NoRoom(payload.len()));
                }
                if last {
                    self.outbox.end_partial();
                    tally.answered += 1;
                }
            }
            Receiving::Upload(upload) => {
                if let Err(body) = upload_chunk(&mut **upload, payload, self.context.id, header.service) {
                    entry.receiving = Receiving::Discard;
                    entry.got += payload.len() as u64;
                    if last {
                        self.inbox.remove(id);
                    }
                    self.error(id, header.service, FLAG_ERROR, body, sink, tally)?;
                    return Ok(Took::Taken);
                }
            }
            Receiving::Assemble { bytes, charge } => {
                let needed = bytes.len() + payload.len();
                if needed > bytes.capacity() {
                    // Grown by doubling, never past what was announced (or the
                    // largest message), charged before it grows.
                    let limit = entry.total.unwrap_or(with.max_message) as usize;
                    let grown = bytes.capacity().saturating_mul(2).clamp(needed, limit.max(needed));
                    if !charge.grow((grown - bytes.capacity()) as u64) {
                        let message = over_budget("request", grown, with.limits);
                        entry.receiving = Receiving::Discard;
                        entry.got += payload.len() as u64;
                        if last {
                            self.inbox.remove(id);
                        }
                        self.refuse(header, ErrorCode::MessageTooLarge, &message, sink, tally)?;
                        return Ok(Took::Taken);
                    }
                    bytes.reserve_exact(grown - bytes.len());
                }
                bytes.extend_from_slice(payload);
            }
        }
        entry.got += payload.len() as u64;
        if !last {
            return Ok(Took::Taken);
        }
        let done = self.inbox.remove(id).expect("the request being received");
        match done.receiving {
            Receiving::Assemble { bytes, charge } => {
                let request = Bytes::Owned(bytes, Some(charge));
                let dispatched = dispatch(with, &self.context, slot, header, request, reply);
                self.dispatched(with, header, dispatched, reply, sink, tally)?;
            }
            Receiving::Upload(upload) => {
                finish_upload(upload, with.completions.responder(slot, header, with.max_message));
                // Its duration runs from its last chunk.
                self.outstanding.add(id, header.service, Instant::now());
            }
            Receiving::Reflect | Receiving::Discard => {}
        }
        Ok(Took::Taken)
    }

    /// Answers a request being received with the error `body`, however it
    /// was being received: the echo's reflected reply is cut with it.
    fn refuse_received(
        &mut self,
        id: u64,
        service: u16,
        was: Receiving,
        body: Vec<u8>,
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<(), String> {
        match was {
            Receiving::Discard => Ok(()),
            Receiving::Reflect => {
                tally.answered += 1;
                tally.errors += 1;
                self.outbox.push(Message::cut(id, service, body));
                Ok(())
            }
            // An upload dropped unfinished was abandoned.
            Receiving::Upload(_) | Receiving::Assemble { .. } => self.error(id, service, FLAG_ERROR, body, sink, tally),
        }
    }

    /// An opening: the stream's handler starts on a thread of its own, or
    /// the opening is refused with its terminal frame.
    fn open(
        &mut self,
        with: &Serving<'_>,
        slot: Slot,
        header: &FrameHeader,
        payload: &[u8],
        sink: &mut dyn Sink,
        tally: &mut Tally,
    ) -> Result<(), String> {
        let (open, request) = StreamOpen::decode(payload).map_err(|e| e.to_string())?;
        let (id, service) = (header.request_id, header.service);
        let refuse = |code, message: &str| Err(error_body(code, message));
        let started = if with.shutting_down {
            refuse(ErrorCode::Shutdown, SHUTDOWN_MESSAGE)
        } else if self.outbox.streams() >= MAX_OPEN_STREAMS {
            refuse(ErrorCode::TooMany, &format!("{MAX_OPEN_STREAMS} streams are open, the most a session may have"))
        } else {
            match with.services.resolve(&self.context, service) {
                Err((code, message)) => refuse(code, &message),
                Ok((name, Handler::Stream(handler))) => {
                    let deadline = (open.deadline_ms > 0)
                        .then(|| Instant::now() + Duration::from_millis(u64::from(open.deadline_ms)));
                    let (lane, sender) = StreamLane::open(
                        with.completions.clone(),
                        slot,
                        id,
                        service,
                        open.credit,
                        deadline,
                        Arc::clone(with.limits),
                        with.max_message,
                    );
                    let request = OwnedRequest::from_parts(request.to_vec(), None, Arc::clone(name), &self.context, id);
                    match with.services.streams.spawn(Arc::clone(handler), request, sender) {
                        Ok(()) => Ok(lane),
                        Err(message) => refuse(ErrorCode::TooMany, &message),
                    }
                }
                Ok((name, _)) => {
                    refuse(ErrorCode::UnknownService, &format!("service {service} ({name}) is not a stream service"))
                }
            }
        };
        match started {
            Ok(lane) => {
                self.outbox.add_stream(lane);
                Ok(())
            }
            Err(body) => self.error(id, service, FLAG_END | FLAG_ERROR, body, sink, tally),
        }
    }

    /// A cancel: of a stream (cut, `Cancelled`), or of a request being
    /// received (dropped, answered `Cancelled`). A cancel of anything else
    /// (a stream or request that has ended since) changes nothing.
    fn cancel(&mut self, id: u64, sink: &mut dyn Sink, tally: &mut Tally) -> Result<(), String> {
        if let Some(stream) = self.outbox.stream(id) {
            stream.cut(SendError::Cancelled);
            self.outbox.wake(id);
            return Ok(());
        }
        let Some(entry) = self.inbox.remove(id) else { return Ok(()) };
        let body = error_body(ErrorCode::Cancelled, "the caller cancelled the request");
        self.refuse_received(id, entry.service, entry.receiving, body, sink, tally)
    }

    /// Sends what waits, as far as there is room (see [`Outbox::flush`]).
    pub(crate) fn flush(&mut self, sink: &mut dyn Sink, tally: &mut Tally) -> Result<Flush, String> {
        self.outbox.flush(sink, tally)
    }

    /// Takes the answer to a call this session handed off, to go out at
    /// its next serve (or flush); one longer than a frame is charged while
    /// it waits (past the budget, `ReplyTooLarge` goes instead). Returns
    /// false, dropping it, if it answers no call outstanding here.
    ///
    /// The call's duration and, if it failed, its error are counted in
    /// `counters` (those of the worker that serves the session).
    pub(crate) fn complete(
        &mut self,
        answer: Completion,
        counters: &WorkerCounters,
        limits: &Arc<Limits>,
        max_payload: usize,
    ) -> bool {
        let Some((header, started)) = self.outstanding.complete(&answer) else { return false };
        let (mut flags, mut body) = (answer.flags, answer.body);
        let mut charge = None;
        if body.len() > max_payload {
            charge = limits.charge(body.capacity() as u64);
            if charge.is_none() {
                body = error_body(ErrorCode::ReplyTooLarge, &over_budget("reply", body.len(), limits));
                flags = FLAG_ERROR;
            }
        }
        counters.durations.record(header.service, started.elapsed());
        if flags & FLAG_ERROR != 0 {
            counters.services.count_error(header.service);
        }
        self.outbox.push(Message::new(header.request_id, header.service, flags, body, charge));
        true
    }

    /// The length and capacity of each reply waiting to go out.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> Vec<(usize, usize)> {
        self.outbox.waiting()
    }

    /// Stream `id` has something to send.
    pub(crate) fn stream_ready(&mut self, id: u64) {
        self.outbox.wake(id);
    }

    /// Whether the session has handed off as many calls as it may.
    pub(crate) fn outstanding_full(&self) -> bool {
        self.outstanding.is_full()
    }

    /// Whether calls handed off have not been answered yet.
    pub(crate) fn has_calls(&self) -> bool {
        self.outstanding.has_calls()
    }

    /// Whether anything waits to go out, or a stream is open.
    pub(crate) fn has_output(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Whether the session owes its client anything: answers of calls
    /// handed off, frames waiting, streams open.
    pub(crate) fn owes(&self) -> bool {
        self.has_calls() || self.has_output()
    }

    /// The earliest deadline of an open stream.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.outbox.next_deadline()
    }

    /// Cuts the streams whose deadline is `now` or past (`Timeout`).
    pub(crate) fn expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.outbox.each_stream(|s| {
            if s.expire(now) {
                expired.push(s.id());
            }
        });
        for id in expired {
            self.outbox.wake(id);
        }
    }

    /// Answers the calls still being handled with an error (see
    /// [`Outstanding::give_up`]); the next flush sends what fits.
    pub(crate) fn give_up_calls(&mut self) {
        for (h, body) in self.outstanding.give_up() {
            self.outbox.push(Message::new(h.request_id, h.service, h.flags, body, None));
        }
    }

    /// A graceful stop begins: every open stream is cut (`Shutdown`: taken,
    /// not finished, its terminal frame says so), and every request being
    /// received is answered now, since nothing more of it will be read: one
    /// assembled for a handler that never ran with `Shutdown` (not
    /// executed), an upload (abandoned, its handler saw part of it) with
    /// `Unfinished`, a reflected one by cutting its reply. All of it goes
    /// before the segment's closed word or the closing frame.
    pub(crate) fn stop(&mut self) {
        self.outbox.each_stream(|s| s.cut(SendError::Shutdown));
        self.outbox.wake_all();
        for entry in self.inbox.take_live() {
            let (id, service) = (entry.id, entry.service);
            let message = match entry.receiving {
                Receiving::Assemble { .. } => {
                    Message::new(id, service, FLAG_ERROR, error_body(ErrorCode::Shutdown, SHUTDOWN_MESSAGE), None)
                }
                Receiving::Upload(_) => {
                    let body = error_body(
                        ErrorCode::Unfinished,
                        "the server stopped during the upload; the request was not finished",
                    );
                    Message::new(id, service, FLAG_ERROR, body, None)
                }
                Receiving::Reflect => {
                    Message::cut(id, service, error_body(ErrorCode::Shutdown, "the server stopped during the echo"))
                }
                Receiving::Discard => continue,
            };
            self.outbox.push(message);
        }
    }
}

/// A header for a frame to `put` (its length is not looked at).
fn header_for(id: u64, service: u16, flags: u16) -> FrameHeader {
    FrameHeader { len: 0, service, flags, request_id: id }
}

/// An error body.
fn error_body(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    encode_error(code, message, &mut body);
    body
}

/// The message of a `MessageTooLarge` (a request) or `ReplyTooLarge` (a
/// reply) for a message the memory budget has no room for.
fn over_budget(what: &str, len: usize, limits: &Limits) -> String {
    format!(
        "{what} of {len} bytes does not fit the memory budget ({} of {} bytes in use)",
        limits.in_use(),
        limits.budget()
    )
}
