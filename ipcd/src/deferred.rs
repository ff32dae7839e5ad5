//! Calls answered after their handler returns: the [`Responder`] that
//! answers one from any thread, the way its answer travels back to the
//! worker that owns the session, and what a session keeps of the calls it
//! handed off.
//!
//! # Exactly one outcome
//!
//! A deferred or pooled call takes its request out of the ring (or the
//! socket) and gives the handler a `Responder`, which is not `Clone`:
//! [`Responder::reply`] and [`Responder::fail`] consume it, and dropping
//! it unanswered answers the call with an error (`NoReply`, or
//! `HandlerPanicked` when it is dropped by a panic unwinding). So each such
//! call gets one answer and only one. The answer goes, as a
//! [`Completion`], down the owning worker's channel, and the worker's
//! `mio` waker rings. The worker finds the session by its [`Slot`]: its
//! key in the worker's slab and a serial the worker never hands out twice,
//! so an answer for a session that has closed (whose key another session
//! may have since) is dropped; and within the session by the request's id,
//! among the calls it has outstanding ([`Outstanding`]).
//!
//! A session hands off at most [`MAX_OUTSTANDING_CALLS`] calls; at that
//! many it takes no request until one is answered. Answers that find the
//! response ring (or the stream's output) full wait in the session's
//! outbox (see [`crate::outbox`]), in the order they came, so what waits is
//! bounded by the same cap; an answer longer than a frame is charged
//! against the memory budget while it waits.
//!
//! The same channel tells the worker when a stream has items to send
//! ([`Event::Stream`]).

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use ipc_core::{encode_error, ErrorCode, FrameHeader, FLAG_ERROR};
use mio::Waker;

use crate::service::ServiceError;

/// The most calls one session may have handed off to deferred or pooled
/// handlers and not yet had answered. Past it, the session takes no
/// further request (of any service) until one is answered; that is not a
/// stall of its client, and the stall timeout does not close it.
pub const MAX_OUTSTANDING_CALLS: usize = 64;

/// The message of the answer to a call whose responder was dropped.
const NO_REPLY: &str = "the handler dropped its responder without replying";
/// The message of the answer to a call whose handler panicked.
pub(crate) const PANICKED: &str = "service handler panicked";
/// The message of the answer to a call still running when a graceful stop
/// gave up waiting for it.
const UNFINISHED: &str = "the server stopped before the handler finished; whether the request took effect is unknown";

/// Where a session sits in its worker: its slab key, and a serial the
/// worker gives no other session, so that a key handed out again is told
/// apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) key: usize,
    pub(crate) serial: u64,
}

impl Slot {
    /// A session no worker holds yet.
    pub(crate) const UNPLACED: Slot = Slot { key: usize::MAX, serial: 0 };
}

/// The answer to a handed-off call, on its way to the worker.
#[derive(Debug)]
pub(crate) struct Completion {
    pub(crate) slot: Slot,
    pub(crate) request_id: u64,
    /// 0, or `FLAG_ERROR` with an error body.
    pub(crate) flags: u16,
    pub(crate) body: Vec<u8>,
}

/// What comes back to a worker from other threads.
#[derive(Debug)]
pub(crate) enum Event {
    /// The answer to a handed-off call.
    Answer(Completion),
    /// Stream `id` of the session at `slot` has items or its end to send.
    Stream { slot: Slot, id: u64 },
}

/// A worker's end for answers: its channel and the waker of its poll.
#[derive(Clone)]
pub(crate) struct Completions {
    tx: Sender<Event>,
    waker: Arc<Waker>,
}

impl Completions {
    pub(crate) fn new(tx: Sender<Event>, waker: Arc<Waker>) -> Completions {
        Completions { tx, waker }
    }

    /// The responder for the request `header` names, on the session at
    /// `slot`, whose replies may be `max_message` bytes long.
    pub(crate) fn responder(&self, slot: Slot, header: &FrameHeader, max_message: u64) -> Responder {
        Responder { call: Some(Call { to: self.clone(), slot, request_id: header.request_id, max_message }) }
    }

    /// Tells the worker that stream `id` of the session at `slot` has
    /// something to send.
    pub(crate) fn stream_ready(&self, slot: Slot, id: u64) {
        self.send(Event::Stream { slot, id });
    }

    fn send(&self, event: Event) {
        // A worker that has exited has closed its sessions: no one waits.
        if self.tx.send(event).is_ok() {
            if let Err(e) = self.waker.wake() {
                // The event waits in the channel until the worker's next
                // one; no other thread can wake it.
                tracing::warn!("cannot wake the worker: {e}");
            }
        }
    }
}

/// The call a responder answers.
struct Call {
    to: Completions,
    slot: Slot,
    request_id: u64,
    max_message: u64,
}

/// Answers one call, once, from any thread: given to a deferred handler
/// with its [`OwnedRequest`](crate::OwnedRequest) (and used for the
/// handlers that run on the handler threads).
///
/// Dropping it without answering answers the call with an error
/// (`ErrorCode::NoReply`; `HandlerPanicked` if a panic drops it), so the
/// client always gets one outcome. A responder whose session has closed
/// answers no one, and costs nothing.
///
/// ```no_run
/// use ipcd::{Server, ServiceError};
///
/// let server = Server::builder()
///     .socket("/tmp/later.sock")
///     .deferred_service("later", |request, responder| {
///         std::thread::spawn(move || {
///             if request.payload().is_empty() {
///                 responder.fail(ServiceError::with_code(22, "empty request"));
///             } else {
///                 responder.reply(request.into_payload());
///             }
///         });
///     })
///     .build()?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
pub struct Responder {
    /// `None` once answered.
    call: Option<Call>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Responder");
        if let Some(call) = &self.call {
            d.field("session_slot", &call.slot.key).field("request_id", &call.request_id);
        }
        d.finish_non_exhaustive()
    }
}

impl Responder {
    /// Answers the call with `reply`, of any length up to the largest
    /// message (longer than a frame, it goes out in chunks). A longer reply
    /// is answered with an error instead (`ReplyTooLarge`: the handler
    /// ran), as for any handler.
    pub fn reply(mut self, mut reply: Vec<u8>) {
        let Some(call) = self.call.take() else { return };
        if reply.len() as u64 > call.max_message {
            let message = too_long("reply", reply.len() as u64, call.max_message);
            encode_error(ErrorCode::ReplyTooLarge, &message, &mut reply);
            reply.shrink_to_fit();
            return call.send(FLAG_ERROR, reply);
        }
        // What waits in the session, charged as it waits, is the reply's
        // bytes and no more.
        reply.shrink_to_fit();
        call.send(0, reply);
    }

    /// Answers the call with `error`: the client gets it as a remote error
    /// for this call alone, with its code if it has one.
    pub fn fail(mut self, error: ServiceError) {
        if let Some(call) = self.call.take() {
            let mut body = Vec::new();
            error.encode(&mut body);
            call.send(FLAG_ERROR, body);
        }
    }

    /// Answers the call with the error `code` and `message` (the daemon's
    /// own answers: a handler that panicked, ...).
    pub(crate) fn fail_with(mut self, code: ErrorCode, message: &str) {
        if let Some(call) = self.call.take() {
            let mut body = Vec::new();
            encode_error(code, message, &mut body);
            call.send(FLAG_ERROR, body);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        // Dropped by a panic unwinding through whoever held it.
        let (code, message) = if std::thread::panicking() {
            (ErrorCode::HandlerPanicked, PANICKED)
        } else {
            (ErrorCode::NoReply, NO_REPLY)
        };
        let mut body = Vec::new();
        encode_error(code, message, &mut body);
        call.send(FLAG_ERROR, body);
    }
}

impl Call {
    fn send(self, flags: u16, body: Vec<u8>) {
        let Call { to, slot, request_id, .. } = self;
        to.send(Event::Answer(Completion { slot, request_id, flags, body }));
    }
}

/// The message of a `MessageTooLarge` (a request) or `ReplyTooLarge` (a
/// reply) error: `what` of `len` bytes, over
/// the largest message `max`.
pub(crate) fn too_long(what: &str, len: u64, max: u64) -> String {
    format!("{what} of {len} bytes exceeds the largest message, {max} bytes")
}

/// The calls a session has handed off and not yet answered.
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    /// Request id, service and dispatch time of each call handed off, at
    /// most [`MAX_OUTSTANDING_CALLS`].
    calls: Vec<(u64, u16, Instant)>,
}

impl Outstanding {
    /// Whether the session has handed off as many calls as it may.
    pub(crate) fn is_full(&self) -> bool {
        self.calls.len() >= MAX_OUTSTANDING_CALLS
    }

    /// Records a call handed off at `started`.
    pub(crate) fn add(&mut self, request_id: u64, service: u16, started: Instant) {
        self.calls.push((request_id, service, started));
    }

    /// The header of the answer `c` brings, with the call's service, and
    /// when the call was handed off, if it answers a call outstanding here
    /// (which then is not any more); `None` for an answer to no call
    /// outstanding (a second one, or one the stop gave up on), to be
    /// dropped.
    pub(crate) fn complete(&mut self, c: &Completion) -> Option<(FrameHeader, Instant)> {
        let i = self.calls.iter().position(|&(id, _, _)| id == c.request_id)?;
        let (request_id, service, started) = self.calls.swap_remove(i);
        Some((FrameHeader { len: c.body.len() as u32, service, flags: c.flags, request_id }, started))
    }

    /// Whether calls are still being handled.
    pub(crate) fn has_calls(&self) -> bool {
        !self.calls.is_empty()
    }

    /// The answers to every call still being handled, for a graceful stop
    /// that waits no longer: `Unfinished` errors. Their own answers, should
    /// they come, find them gone and are dropped.
    pub(crate) fn give_up(&mut self) -> Vec<(FrameHeader, Vec<u8>)> {
        self.calls
            .drain(..)
            .map(|(request_id, service, _)| {
                let mut body = Vec::new();
                encode_error(ErrorCode::Unfinished, UNFINISHED, &mut body);
                (FrameHeader { len: body.len() as u32, service, flags: FLAG_ERROR, request_id }, body)
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver};

    /// A worker's end for answers, over a poll nobody waits on.
    pub(crate) fn completions() -> (Completions, Receiver<Event>, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let (tx, rx) = channel();
        (Completions::new(tx, waker), rx, poll)
    }

    /// The answers among `events`.
    pub(crate) fn answers(events: &Receiver<Event>) -> impl Iterator<Item = Completion> + '_ {
        events.try_iter().filter_map(|e| match e {
            Event::Answer(c) => Some(c),
            Event::Stream { .. } => None,
        })
    }

    fn header(id: u64) -> FrameHeader {
        FrameHeader { len: 0, service: 3, flags: 0, request_id: id }
    }

    const SLOT: Slot = Slot { key: 4, serial: 9 };

    #[test]
    fn each_responder_answers_once_however_it_ends() {
        let (completions, rx, _poll) = completions();
        completions.responder(SLOT, &header(1), 16).reply(b"fine".to_vec());
        completions.responder(SLOT, &header(2), 16).fail(ServiceError::with_code(7, "no"));
        drop(completions.responder(SLOT, &header(3), 16));
        completions.responder(SLOT, &header(4), 16).reply(vec![0; 17]);
        let caught = std::panic::catch_unwind(|| {
            let _held = completions.responder(SLOT, &header(5), 16);
            panic!("handler bug");
        });
        assert!(caught.is_err());
        let answers: Vec<(u64, u16, ErrorCode)> = answers(&rx)
            .map(|c| {
                assert_eq!(c.slot, SLOT);
                let code = if c.flags == 0 { ErrorCode::Other(0) } else { ipc_core::decode_error(&c.body).0 };
                (c.request_id, c.flags, code)
            })
            .collect();
        assert_eq!(
            answers,
            [
                (1, 0, ErrorCode::Other(0)),
                (2, FLAG_ERROR, ErrorCode::Application(7)),
                (3, FLAG_ERROR, ErrorCode::NoReply),
                (4, FLAG_ERROR, ErrorCode::ReplyTooLarge),
                (5, FLAG_ERROR, ErrorCode::HandlerPanicked),
            ]
        );
    }

    #[test]
    fn a_responder_whose_worker_is_gone_answers_no_one() {
        let (completions, rx, _poll) = completions();
        let responder = completions.responder(SLOT, &header(1), 16);
        drop(rx);
        responder.reply(b"late".to_vec());
    }

    #[test]
    fn only_outstanding_calls_are_answered_and_giving_up_answers_the_rest() {
        let mut outstanding = Outstanding::default();
        for id in [10, 11, 12] {
            outstanding.add(id, 1, Instant::now());
        }
        let answer = |request_id| Completion { slot: SLOT, request_id, flags: 0, body: vec![1, 2] };
        let (header, _) = outstanding.complete(&answer(11)).expect("an outstanding call");
        assert_eq!((header.request_id, header.service, header.len), (11, 1, 2));
        assert!(outstanding.complete(&answer(11)).is_none(), "a second answer to one call is dropped");
        assert!(outstanding.complete(&answer(13)).is_none(), "an answer to a call never handed off is dropped");
        let mut given_up: Vec<(u64, u16)> = outstanding
            .give_up()
            .into_iter()
            .map(|(h, body)| {
                assert_eq!((h.service, h.len as usize), (1, body.len()));
                assert_eq!(ipc_core::decode_error(&body).0, ErrorCode::Unfinished);
                (h.request_id, h.flags)
            })
            .collect();
        given_up.sort_unstable();
        assert_eq!(given_up, [(10, FLAG_ERROR), (12, FLAG_ERROR)]);
        assert!(!outstanding.has_calls());
    }
}
