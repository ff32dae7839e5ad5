//! Server streaming: a handler that answers one request with many items.
//!
//! A stream service's handler runs on a thread of its own (never on a
//! worker, never on the handler threads, which a handler waiting on a
//! slow reader would hold), with the request and a [`StreamSender`]. It
//! sends items, each any length up to the largest message, and ends the
//! stream with [`StreamSender::end`] or [`StreamSender::fail`]; a sender
//! dropped without either ends the stream with an error, so the stream
//! always has its one terminal frame.
//!
//! # Credit and buffering
//!
//! The caller says how many items it takes before it grants more (its
//! `StreamOpen` credit, then credit frames). Each item sent uses one, and
//! with none left [`StreamSender::send`] waits: the server never sends an
//! item the caller has not granted. What the daemon buffers is bounded as
//! well, whatever the credit: at most [`STREAM_BUFFER`] bytes of items per
//! stream wait to be written (or a single item, if longer), each charged
//! against the memory budget until it has gone out, and sending waits
//! until they have. So a slow reader holds up its own stream only; its
//! session's worker, and the other streams, go on.
//!
//! # Ends
//!
//! Exactly one terminal frame goes out per stream, after every item sent
//! before it: `FLAG_END` for [`StreamSender::end`], `FLAG_END |
//! FLAG_ERROR` with the handler's error for [`StreamSender::fail`] (or a
//! sender dropped, or a handler that panicked). The engine may cut a stream
//! first, and then its word is the last: the caller cancels it
//! (`Cancelled`), its deadline passes (`Timeout`), the server stops
//! (`Shutdown`). Items not yet begun are then dropped, the one being
//! written is finished, and the terminal frame carries that error. A
//! caller that hangs up cuts its streams too, with no frame (there is no
//! one to read it). The handler learns of a cut from
//! [`StreamSender::is_cancelled`] and its next send, which fails saying
//! why.
//!
//! # Protocol between the handler's thread and the worker
//!
//! The state sits behind one mutex: the items sent and not yet taken, the
//! credit left, the bytes buffered, the end once known, and whether the
//! worker has been told there is something to take. The handler's side
//! tells the worker (an event on its channel, then its waker) only when
//! that flag is clear, and sets it; the worker's lane clears it, under the
//! lock, when it finds nothing to take and parks. So each time the lane
//! parks, the next item or end wakes it, and no notice is lost. The worker
//! wakes a handler waiting to send (the condition variable) when it grants
//! credit or writes out an item and the handler may now send the item it
//! waits with, or cuts the stream.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use ipc_core::message::{FLAG_END, FLAG_STREAM};
use ipc_core::{encode_error, ErrorCode, FLAG_ERROR};

use crate::deferred::{Completions, Slot, PANICKED};
use crate::limits::{Charge, Limits};
use crate::outbox::Message;
use crate::request::OwnedRequest;
use crate::service::ServiceError;

/// The most streams one session may have open at once; an opening past it
/// is answered with `TooMany` (that stream alone).
pub const MAX_OPEN_STREAMS: usize = 16;

/// The bytes of items one stream may have waiting in the daemon to be
/// written, beyond which sending waits (a longer item waits alone).
pub const STREAM_BUFFER: usize = 256 * 1024;

/// The most stream handlers running at once in a server (each on its own
/// thread); an opening past it is answered with `TooMany`.
pub(crate) const MAX_STREAM_THREADS: usize = 1024;

/// The message of a stream whose handler dropped its sender unended.
const NOT_ENDED: &str = "the handler dropped its stream without ending it";

/// Why a stream takes no more items.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The caller cancelled the stream.
    #[error("the caller cancelled the stream")]
    Cancelled,
    /// The stream's deadline passed.
    #[error("the stream's deadline passed")]
    Timeout,
    /// The server is stopping.
    #[error("the server is stopping; the stream was cut")]
    Shutdown,
    /// The caller is gone (it hung up, or its session was closed).
    #[error("the caller is gone")]
    Disconnected,
    /// The item is longer than the largest message, or than the memory
    /// budget has room for now; the stream goes on.
    #[error("an item of {len} bytes exceeds the largest message ({max} bytes) or the memory budget left")]
    TooLarge {
        /// The item's length.
        len: usize,
        /// The largest message.
        max: u64,
    },
}

/// Why [`StreamSender::try_send`] did not take an item.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// No credit is left, or the stream has as much waiting as it may: the
    /// item, back.
    #[error("the stream is full")]
    Full(Vec<u8>),
    /// As [`StreamSender::send`] would have failed.
    #[error(transparent)]
    Failed(SendError),
}

/// How a stream ends, once known.
#[derive(Debug)]
enum End {
    /// The handler ended it.
    Ended,
    /// The handler failed it (or dropped its sender): the error body.
    Failed(Vec<u8>),
    /// The engine cut it; this has the last word.
    Cut(SendError),
}

#[derive(Debug)]
struct State {
    /// Items sent and not yet taken by the lane, with their charges.
    items: VecDeque<(Vec<u8>, Option<Charge>)>,
    /// Items the handler may still send.
    credit: u64,
    /// Bytes of items sent and not yet written out.
    buffered: usize,
    end: Option<End>,
    /// The worker has been told there is something to take, and its lane
    /// has not yet found the stream empty since.
    told: bool,
    /// The handler waits in `send`, with an item of this length.
    sender_waits: Option<usize>,
}

impl State {
    /// Whether an item of `len` bytes may be sent now: credit is left and
    /// the buffer has room (an item longer than it goes alone).
    fn may_send(&self, len: usize) -> bool {
        self.credit > 0 && (self.buffered == 0 || self.buffered + len <= STREAM_BUFFER)
    }

    /// Whether the handler waits in `send` for what it now has: it is
    /// woken only then (an item written frees no credit, so waking a
    /// sender that waits for credit at every item would cost a switch
    /// each for nothing).
    fn sender_may_go(&self) -> bool {
        self.sender_waits.is_some_and(|len| self.may_send(len))
    }
}

/// What the handler's side and the worker's lane share.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// The worker to tell, and where the stream sits in it.
    to: Completions,
    slot: Slot,
    id: u64,
    limits: Arc<Limits>,
    max_message: u64,
    deadline: Option<Instant>,
}

impl Shared {
    /// The state, whether or not a thread panicked holding it: every
    /// change under the lock leaves it whole.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the worker the stream has something for it, unless it knows.
    fn tell(&self, mut state: MutexGuard<'_, State>) {
        let tell = !std::mem::replace(&mut state.told, true);
        drop(state);
        if tell {
            self.to.stream_ready(self.slot, self.id);
        }
    }

    /// The handler's end, unless the engine cut the stream first.
    fn finish(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
            self.tell(state);
        }
    }
}

/// Sends a stream's items, from the stream handler's thread: given to a
/// stream service's handler (see
/// [`ServerBuilder::stream_service`](crate::ServerBuilder::stream_service)).
///
/// Each item is one message to the caller, of any length up to the
/// largest message. [`send`](Self::send) waits for credit (the caller
/// grants items as it reads them) and for the stream's buffer to have
/// room; [`try_send`](Self::try_send) does not wait. The stream ends with
/// [`end`](Self::end) or [`fail`](Self::fail); dropped without either, it
/// ends with an error (`NoReply`, or `HandlerPanicked` if a panic drops
/// it).
///
/// ```no_run
/// use ipcd::{SendError, Server};
///
/// let server = Server::builder()
///     .socket("/tmp/count.sock")
///     .stream_service("count", |request, mut items| {
///         let to: u32 = std::str::from_utf8(request.payload()).ok().and_then(|s| s.parse().ok()).unwrap_or(10);
///         for n in 0..to {
///             match items.send(n.to_le_bytes().to_vec()) {
///                 Ok(()) => {}
///                 // Cancelled, past its deadline, the server stopping, the caller gone.
///                 Err(SendError::TooLarge { .. }) => unreachable!("four bytes"),
///                 Err(_) => return,
///             }
///         }
///         items.end();
///     })
///     .build()?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
pub struct StreamSender {
    shared: Arc<Shared>,
    /// Ended or failed: nothing more to say on drop.
    done: bool,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender").field("request_id", &self.shared.id).finish_non_exhaustive()
    }
}

impl StreamSender {
    /// Sends `item`, waiting while the caller has granted no more items and
    /// while the stream's buffer is full. Fails, without sending, once the
    /// stream is cut (cancelled, past its deadline, the server stopping,
    /// the caller gone: it takes no more), or for an item too large (the
    /// stream goes on).
    pub fn send(&mut self, item: Vec<u8>) -> Result<(), SendError> {
        self.put(item, true).map_err(|e| match e {
            TrySendError::Failed(e) => e,
            TrySendError::Full(_) => unreachable!("a waiting send is never full"),
        })
    }

    /// Sends `item` if the caller has granted an item and the stream's
    /// buffer has room now; otherwise gives it back
    /// ([`TrySendError::Full`]).
    pub fn try_send(&mut self, item: Vec<u8>) -> Result<(), TrySendError> {
        self.put(item, false)
    }

    fn put(&mut self, mut item: Vec<u8>, wait: bool) -> Result<(), TrySendError> {
        let shared = &*self.shared;
        let too_large = |len| TrySendError::Failed(SendError::TooLarge { len, max: shared.max_message });
        let len = item.len();
        if len as u64 > shared.max_message {
            return Err(too_large(len));
        }
        let mut state = shared.lock();
        loop {
            if let Some(End::Cut(why)) = &state.end {
                return Err(TrySendError::Failed(why.clone()));
            }
            if state.may_send(len) {
                break;
            }
            if !wait {
                return Err(TrySendError::Full(item));
            }
            state.sender_waits = Some(len);
            state = shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
            state.sender_waits = None;
        }
        // What waits is charged as it is held; the buffer, exactly.
        item.shrink_to_fit();
        let charge = match shared.limits.charge(item.capacity() as u64) {
            Some(charge) => charge,
            None => return Err(too_large(len)),
        };
        state.credit -= 1;
        state.buffered += len;
        state.items.push_back((item, Some(charge)));
        shared.tell(state);
        Ok(())
    }

    /// Whether the stream was cut (cancelled by the caller, past its
    /// deadline, the server stopping, the caller gone): it takes no more
    /// items, and the handler should stop.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.shared.lock().end, Some(End::Cut(_)))
    }

    /// The stream's deadline, if the caller gave one: at it the stream is
    /// cut with `Timeout`.
    pub fn deadline(&self) -> Option<Instant> {
        self.shared.deadline
    }

    /// Ends the stream after the items sent: the caller gets them, then the
    /// end.
    pub fn end(mut self) {
        self.done = true;
        self.shared.finish(End::Ended);
    }

    /// Ends the stream with `error` after the items sent: the caller gets
    /// them, then the error (as a remote error, with its code if it has
    /// one).
    pub fn fail(mut self, error: ServiceError) {
        self.done = true;
        let mut body = Vec::new();
        error.encode(&mut body);
        self.shared.finish(End::Failed(body));
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (code, message) = if std::thread::panicking() {
            (ErrorCode::HandlerPanicked, PANICKED)
        } else {
            (ErrorCode::NoReply, NOT_ENDED)
        };
        let mut body = Vec::new();
        encode_error(code, message, &mut body);
        self.shared.finish(End::Failed(body));
    }
}

/// What a lane found when it asked its stream for the next message.
pub(crate) enum Next {
    /// The lane's current message is set: an item, or the terminal frame.
    Message,
    /// The next item would begin a chunked message, and as many as the
    /// client assembles at once are begun.
    Capped,
    /// Nothing to send until the stream says so.
    Idle,
}

/// What a lane's message was, once written.
pub(crate) enum Written {
    Item,
    /// The terminal frame: the stream is over (`true`: with an error).
    End(bool),
}

/// A stream's side in its session's [`Outbox`](crate::outbox::Outbox):
/// takes the stream's items and its end, in order, and writes them.
pub(crate) struct StreamLane {
    shared: Arc<Shared>,
    service: u16,
    /// The message being written: an item, or the terminal frame.
    current: Option<Message>,
    /// `current` is the terminal frame.
    terminal: bool,
    /// The deadline, until it has passed.
    deadline: Option<Instant>,
}

impl StreamLane {
    /// A new stream for request `id` of `service` on the session at
    /// `slot`, with the caller's `credit` and `deadline`, and the sender
    /// its handler writes through.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        to: Completions,
        slot: Slot,
        id: u64,
        service: u16,
        credit: u32,
        deadline: Option<Instant>,
        limits: Arc<Limits>,
        max_message: u64,
    ) -> (StreamLane, StreamSender) {
        let state = State {
            items: VecDeque::new(),
            credit: u64::from(credit),
            buffered: 0,
            end: None,
            told: false,
            sender_waits: None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            to,
            slot,
            id,
            limits,
            max_message,
            deadline,
        });
        let sender = StreamSender { shared: Arc::clone(&shared), done: false };
        (StreamLane { shared, service, current: None, terminal: false, deadline }, sender)
    }

    pub(crate) fn id(&self) -> u64 {
        self.shared.id
    }

    /// The deadline, if it has not passed yet.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The message being written.
    pub(crate) fn current(&mut self) -> Option<&mut Message> {
        self.current.as_mut()
    }

    /// Takes the next item, or the end after the last one, as the current
    /// message. An item longer than a frame is taken only if `may_chunk`.
    pub(crate) fn take_next(&mut self, max_payload: usize, may_chunk: bool) -> Next {
        let id = self.id();
        let mut state = self.shared.lock();
        if let Some((item, _)) = state.items.front() {
            if item.len() > max_payload && !may_chunk {
                return Next::Capped;
            }
            let (item, charge) = state.items.pop_front().expect("an item");
            self.current = Some(Message::new(id, self.service, FLAG_STREAM, item, charge));
            return Next::Message;
        }
        let (flags, body) = match &state.end {
            None => {
                // Parked from here: the next item or end tells the worker.
                state.told = false;
                return Next::Idle;
            }
            Some(End::Ended) => (FLAG_END, Vec::new()),
            Some(End::Failed(body)) => (FLAG_END | FLAG_ERROR, body.clone()),
            Some(End::Cut(why)) => {
                let (code, message) = match why {
                    SendError::Cancelled => (ErrorCode::Cancelled, "the caller cancelled the stream"),
                    SendError::Timeout => (ErrorCode::Timeout, "the stream's deadline passed"),
                    SendError::Shutdown => {
                        (ErrorCode::Shutdown, "the server stopped; the stream was cut after the items it sent")
                    }
                    // No one reads it; the session is closing.
                    _ => (ErrorCode::Other(0), "the caller is gone"),
                };
                let mut body = Vec::new();
                encode_error(code, message, &mut body);
                (FLAG_END | FLAG_ERROR, body)
            }
        };
        drop(state);
        self.terminal = true;
        self.current = Some(Message::new(id, self.service, flags, body, None));
        Next::Message
    }

    /// The current message is written: an item's bytes no longer wait, or
    /// the stream is over.
    pub(crate) fn written(&mut self) -> Written {
        let Some(message) = self.current.take() else { return Written::Item };
        if self.terminal {
            return Written::End(message.flags() & FLAG_ERROR != 0);
        }
        let mut state = self.shared.lock();
        state.buffered -= message.len();
        if state.sender_may_go() {
            self.shared.changed.notify_all();
        }
        Written::Item
    }

    /// Grants the handler `n` more items.
    pub(crate) fn grant(&mut self, n: u32) {
        let mut state = self.shared.lock();
        state.credit = state.credit.saturating_add(u64::from(n));
        if state.sender_may_go() {
            self.shared.changed.notify_all();
        }
    }

    /// Cuts the stream (unless it was cut already: the first cut's word
    /// stands): the items not yet begun are dropped, the handler's next
    /// send fails with `why`, and the terminal frame says it.
    pub(crate) fn cut(&mut self, why: SendError) {
        if self.terminal {
            return;
        }
        let mut state = self.shared.lock();
        if !matches!(state.end, Some(End::Cut(_))) {
            state.end = Some(End::Cut(why));
        }
        let dropped: usize = state.items.drain(..).map(|(item, _)| item.len()).sum();
        state.buffered -= dropped;
        self.shared.changed.notify_all();
    }

    /// Cuts the stream with `Timeout` if its deadline is `now` or past;
    /// returns whether it did.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        if self.deadline.is_some_and(|at| at <= now) {
            self.deadline = None;
            self.cut(SendError::Timeout);
            return true;
        }
        false
    }
}

impl Drop for StreamLane {
    /// A lane dropped before its end (its session closed) cuts the stream:
    /// the handler's next send fails, there being no one to read it.
    fn drop(&mut self) {
        self.cut(SendError::Disconnected);
    }
}

/// A stream handler: called on a thread of its own with the request and
/// the sender.
pub(crate) type StreamFn = dyn Fn(OwnedRequest, StreamSender) + Send + Sync;

/// The threads stream handlers run on: one per stream, at most
/// [`MAX_STREAM_THREADS`] at once; waited for when the server stops.
#[derive(Default)]
pub(crate) struct StreamThreads {
    inner: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    handles: Vec<JoinHandle<()>>,
    stopping: bool,
}

impl StreamThreads {
    /// Runs `handler` with `request` and `sender` on a new thread, or says
    /// why it cannot (the cap, a stop, the system).
    pub(crate) fn spawn(
        &self,
        handler: Arc<StreamFn>,
        request: OwnedRequest,
        sender: StreamSender,
    ) -> Result<(), String> {
        let mut threads = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if threads.stopping {
            return Err("the server is stopping".into());
        }
        // A finished thread's handle is dropped: nothing is left to wait for.
        threads.handles.retain(|h| !h.is_finished());
        if threads.handles.len() >= MAX_STREAM_THREADS {
            return Err(format!("{MAX_STREAM_THREADS} streams run at once, the most a server runs"));
        }
        let (session, service) = (request.session(), request.service().to_string());
        let job = move || {
            // A panic drops the sender as it unwinds, which ends the stream
            // as panicked.
            if catch_unwind(AssertUnwindSafe(move || handler(request, sender))).is_err() {
                tracing::error!(session, service, "stream handler panicked");
            }
        };
        let handle = std::thread::Builder::new()
            .name("ipcd-stream".into())
            .spawn(job)
            .map_err(|e| format!("cannot start the stream's thread: {e}"))?;
        threads.handles.push(handle);
        Ok(())
    }

    /// Starts no more, and waits for the running handlers to return (their
    /// streams have been cut, so their sends fail).
    pub(crate) fn stop(&self) {
        let handles = {
            let mut threads = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            threads.stopping = true;
            std::mem::take(&mut threads.handles)
        };
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!("a stream thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(credit: u64, buffered: usize, sender_waits: Option<usize>) -> State {
        State { items: VecDeque::new(), credit, buffered, end: None, told: false, sender_waits }
    }

    #[test]
    fn a_waiting_sender_is_woken_only_once_it_may_send() {
        // Waiting for credit: an item written frees buffer, not credit.
        assert!(!state(0, 0, Some(64)).sender_may_go());
        assert!(state(1, 0, Some(64)).sender_may_go());
        // Waiting for room: credit alone is not enough.
        assert!(!state(5, STREAM_BUFFER, Some(64)).sender_may_go());
        assert!(state(5, STREAM_BUFFER - 64, Some(64)).sender_may_go());
        // A longer item than the buffer goes alone, once it is empty.
        assert!(!state(5, 1, Some(STREAM_BUFFER * 2)).sender_may_go());
        assert!(state(5, 0, Some(STREAM_BUFFER * 2)).sender_may_go());
        // No one waits: no one to wake.
        assert!(!state(5, 0, None).sender_may_go());
    }
}
