//! Streams of replies: [`Client::stream`] opens one, and its [`Stream`]
//! handle takes the items in order, then its one terminal outcome.
//!
//! # Credit
//!
//! The opening grants the server the stream's window of items. As the
//! caller takes items, the client grants more, in one credit frame once
//! half the window (at least one item) has been taken, never more than
//! keeps the credit granted minus the items taken within the window: a
//! caller that stops taking items stops the server within a window, and
//! at most a window of items is ever queued in the client. Past the
//! stream's deadline no more credit is granted. An item beyond the
//! credit breaks the protocol (the link is lost).
//!
//! # Cancel
//!
//! [`Stream::cancel`] writes a cancel frame at once (or as soon as there
//! is room); a dropped handle's cancel goes out with the client's next
//! operation (any call, wait, receive, stream operation or
//! [`Client::flush`]), since a handle holds no link of its own. Either
//! way the items queued and those that come after are dropped, and the
//! server's terminal frame, when it comes, retires the stream. A stream
//! whose deadline (or a `next_timeout`) passes with nothing for it is
//! cancelled the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipc_core::message::{StreamOpen, FLAG_STREAM};

use super::inbound::Control;
use super::{Client, Deadline, Service};
use crate::calls::{Awaiting, StreamKey, StreamNext};
use crate::error::CallError;
use crate::options::StreamOptions;

/// The streams whose handles were dropped, for their client to cancel at
/// its next operation.
#[derive(Debug)]
pub(crate) struct Dropped {
    any: AtomicBool,
    keys: Mutex<Vec<StreamKey>>,
}

impl Dropped {
    pub(crate) fn with_capacity(n: usize) -> Dropped {
        Dropped { any: AtomicBool::new(false), keys: Mutex::new(Vec::with_capacity(n)) }
    }

    fn push(&self, key: StreamKey) {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).push(key);
        // Relaxed: a hint; the lock orders the list.
        self.any.store(true, Ordering::Relaxed);
    }
}

/// A stream of replies opened by [`Client::stream`]: take its items in
/// order with [`Stream::next`] until its one terminal outcome, `Ok(None)`
/// for its end or an error: the handler's ([`CallError::Remote`]), its
/// deadline ([`CallError::Timeout`]), a cancel ([`CallError::Cancelled`]),
/// or the loss of its link ([`CallError::Disconnected`], or
/// [`CallError::Shutdown`] if the server never took it). After that,
/// [`CallError::UnknownTicket`].
///
/// A stream belongs to the client that opened it, and its operations take
/// that client ([`CallError::ForeignTicket`] for another), so that one
/// client may have several streams open and make calls between their
/// items. Dropping the handle before its terminal outcome cancels the
/// stream: a handle holds no link, so the cancel goes out with the
/// client's next operation ([`Stream::cancel`] sends it at once).
///
/// Items are copied out of the link into a buffer each (one allocation
/// per item), queued until taken; at most the stream's window of them.
///
/// ```no_run
/// # let mut client = ipc_client::Client::connect()?;
/// let search = client.service("search.scan")?;
/// let mut hits = client.stream(&search, b"rust")?;
/// while let Some(hit) = hits.next(&mut client)? {
///     println!("{}", String::from_utf8_lossy(&hit));
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a stream is cancelled when its handle is dropped"]
pub struct Stream {
    client: u64,
    key: StreamKey,
    service: u16,
    /// Its deadline, and how long that was from its opening.
    deadline: Option<(Instant, Duration)>,
    dropped: Arc<Dropped>,
    /// Its terminal outcome was handed out.
    finished: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.key.id)
            .field("service", &self.service)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Stream {
    /// The id of its opening request (increasing per link).
    pub fn id(&self) -> u64 {
        self.key.id
    }

    /// Whether its terminal outcome was handed out.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// When its deadline passes, if it has one.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline.map(|(at, _)| at)
    }

    /// Its key among its client's calls (to tell whether items wait).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn key(&self) -> StreamKey {
        self.key
    }

    /// The next item, waiting for it up to the stream's deadline (or,
    /// without one, the client's call timeout); `Ok(None)` at the
    /// stream's end. A wait that runs out is the stream's terminal
    /// outcome ([`CallError::Timeout`]): the stream is cancelled.
    pub fn next(&mut self, client: &mut Client) -> Result<Option<Vec<u8>>, CallError> {
        client.next_item(self, None)
    }

    /// As [`Stream::next`], waiting at most `timeout` (and never past the
    /// stream's deadline).
    pub fn next_timeout(&mut self, client: &mut Client, timeout: Duration) -> Result<Option<Vec<u8>>, CallError> {
        client.next_item(self, Some(timeout))
    }

    /// As [`Stream::next`], writing the item into `item` (replacing its
    /// contents): `Ok(true)` for an item, `Ok(false)` at the end.
    pub fn next_into(&mut self, client: &mut Client, item: &mut Vec<u8>) -> Result<bool, CallError> {
        match client.next_item(self, None)? {
            Some(bytes) => {
                *item = bytes;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Cancels the stream: the server is told at once (as soon as its link
    /// has room), items queued and those that come are dropped, and the
    /// next [`Stream::next`] is its terminal outcome,
    /// [`CallError::Cancelled`]. Nothing if that was handed out already.
    pub fn cancel(&mut self, client: &mut Client) {
        if self.finished || client.check_stream(self).is_err() {
            return;
        }
        if client.calls.cancel(self.key) {
            let link = self.key.link;
            client.queue_control(link, Control::cancel(self.service, self.key.id));
            let sent = client.send_controls(link).and_then(|()| client.links[link].flush());
            let _ = client.note(link, sent);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.finished {
            self.dropped.push(self.key);
        }
    }
}

impl Client {
    /// Opens a stream of replies from `service` with `request` and the
    /// default [`StreamOptions`] (a window of 16 items, no deadline).
    ///
    /// The opening is one frame: the request may be at most
    /// [`Client::max_payload_of`] the service's link minus 8 bytes
    /// ([`CallError::TooLarge`] past it). At most
    /// [`ClientOptions::max_streams`](crate::ClientOptions::max_streams)
    /// are open at once ([`CallError::TooManyStreams`]). It is written and
    /// handed to the server at once, waiting for room up to the call
    /// timeout ([`CallError::SendTimeout`]: not opened).
    pub fn stream(&mut self, service: &Service, request: &[u8]) -> Result<Stream, CallError> {
        self.stream_with(service, request, StreamOptions::default())
    }

    /// As [`Client::stream`], with `options`.
    pub fn stream_with(
        &mut self,
        service: &Service,
        request: &[u8],
        options: StreamOptions,
    ) -> Result<Stream, CallError> {
        self.open_stream(service, request, options, true)
    }

    /// Opens a stream; without `wait`, [`CallError::Full`] if its link has
    /// no room for the opening now (nothing was written).
    pub(crate) fn open_stream(
        &mut self,
        service: &Service,
        request: &[u8],
        options: StreamOptions,
        wait: bool,
    ) -> Result<Stream, CallError> {
        let link = self.link_of(service)?;
        self.collect_dropped();
        let max = self.options.max_streams;
        if self.calls.streams() >= max {
            return Err(CallError::TooManyStreams { max });
        }
        let room = self.slots[link].max_payload.saturating_sub(StreamOpen::LEN);
        if request.len() > room {
            return Err(CallError::TooLarge { len: request.len(), max: room });
        }
        let window = options.window.max(1);
        let deadline_ms = options.deadline.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        let open = StreamOpen { credit: window, deadline_ms }.encode();
        let mut dl = Deadline::new(self.options.call_timeout);
        let len = StreamOpen::LEN + request.len();
        self.write_request(
            service,
            FLAG_STREAM,
            len,
            |buf| {
                buf.write_at(0, &open);
                buf.write_at(StreamOpen::LEN, request);
            },
            wait,
            &mut dl,
        )?;
        let key = self.calls.open_stream(link, service.id, window);
        let deadline = options.deadline.map(|d| (Instant::now() + d, d));
        let flushed = self.links[link].flush();
        // A loss now is the stream's outcome, given by its first `next`.
        let _ = self.note(link, flushed);
        Ok(Stream {
            client: self.id,
            key,
            service: service.id,
            deadline,
            dropped: Arc::clone(&self.dropped),
            finished: false,
        })
    }

    /// Streams open: not yet handed their terminal outcome (nor dropped),
    /// or not yet ended by their server.
    pub fn open_streams(&self) -> usize {
        self.calls.streams()
    }

    fn check_stream(&self, stream: &Stream) -> Result<(), CallError> {
        if stream.client != self.id || stream.key.link >= self.links.len() {
            return Err(CallError::ForeignTicket { id: stream.key.id });
        }
        Ok(())
    }

    /// The next item of `stream` or its terminal outcome, waiting up to
    /// `timeout` (or the call timeout), never past its deadline.
    fn next_item(&mut self, stream: &mut Stream, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, CallError> {
        self.check_stream(stream)?;
        let key = stream.key;
        if stream.finished {
            return Err(CallError::UnknownTicket { id: key.id });
        }
        let wait = timeout.unwrap_or(self.options.call_timeout).min(crate::connect::MAX_TIMEOUT);
        let mut dl = match (stream.deadline, timeout) {
            (Some((at, span)), None) => Deadline::until(at, span),
            (Some((at, span)), Some(t)) if at <= Instant::now() + t => Deadline::until(at, span),
            _ => Deadline::new(wait),
        };
        self.collect_dropped();
        loop {
            match self.calls.take_next(key) {
                Some(StreamNext::Item(item)) => {
                    self.grant(stream);
                    return Ok(Some(item));
                }
                Some(StreamNext::End(outcome)) => {
                    stream.finished = true;
                    return match outcome {
                        // The server's word on the deadline: say how long it was.
                        Err(CallError::Timeout { after }) if after.is_zero() => {
                            Err(CallError::Timeout { after: stream.deadline.map_or(after, |(_, span)| span) })
                        }
                        outcome => outcome.map(|()| None),
                    };
                }
                None => {}
            }
            self.flush_live();
            if let Err(e) = self.next_reply(Awaiting::Stream(key), &mut dl) {
                // Nothing came for it in time: that is its outcome, unless
                // its terminal came on the way.
                if !self.calls.stream_ready(key) && self.calls.give_up(key, e) {
                    let service = stream.service;
                    self.queue_control(key.link, Control::cancel(service, key.id));
                    self.send_all_controls();
                }
            }
        }
    }

    /// The next item of `stream` or its terminal outcome if either is
    /// there now, without waiting (`None`: nothing yet); the async
    /// stream's step. Taking an item grants credit as [`Stream::next`]
    /// does.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn try_next_item(&mut self, stream: &mut Stream) -> Option<Result<Option<Vec<u8>>, CallError>> {
        if let Err(e) = self.check_stream(stream) {
            return Some(Err(e));
        }
        let key = stream.key;
        if stream.finished {
            return Some(Err(CallError::UnknownTicket { id: key.id }));
        }
        self.collect_dropped();
        match self.calls.take_next(key) {
            Some(StreamNext::Item(item)) => {
                self.grant(stream);
                Some(Ok(Some(item)))
            }
            Some(StreamNext::End(outcome)) => {
                stream.finished = true;
                Some(match outcome {
                    Err(CallError::Timeout { after }) if after.is_zero() => {
                        Err(CallError::Timeout { after: stream.deadline.map_or(after, |(_, span)| span) })
                    }
                    outcome => outcome.map(|()| None),
                })
            }
            None => {
                self.flush_live();
                // Read what the links hold: this stream's items, and the
                // replies of calls, kept aside for their waiters (a stream
                // is awaited, so none is delivered here).
                while self.poll_next(Awaiting::Stream(key)).is_some() {
                    if self.calls.stream_ready(key) {
                        return self.try_next_item(stream);
                    }
                }
                None
            }
        }
    }

    /// `stream`'s deadline passed with nothing for it: unless its terminal
    /// came meanwhile, that is its outcome ([`CallError::Timeout`]), and
    /// the server is told to stop.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn stream_deadline_passed(&mut self, stream: &Stream) {
        let (key, Some((_, span))) = (stream.key, stream.deadline) else { return };
        if self.check_stream(stream).is_err() || stream.finished || self.calls.stream_ready(key) {
            return;
        }
        if self.calls.give_up(key, CallError::Timeout { after: span }) {
            self.queue_control(key.link, Control::cancel(stream.service, key.id));
            self.send_all_controls();
        }
    }

    /// Whether `stream` has an item or its terminal outcome to take now.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn stream_waiting(&self, key: StreamKey) -> bool {
        self.calls.stream_ready(key)
    }

    /// Grants `stream` more credit if taking an item made room for it.
    fn grant(&mut self, stream: &Stream) {
        if stream.deadline.is_some_and(|(at, _)| Instant::now() >= at) {
            return;
        }
        let Some(n) = self.calls.credit_due(stream.key) else { return };
        let link = stream.key.link;
        self.calls.credited(stream.key, n);
        self.queue_control(link, Control::credit(stream.service, stream.key.id, n));
        let sent = self.send_controls(link).and_then(|()| self.links[link].flush());
        let _ = self.note(link, sent);
    }

    /// Cancels the streams whose handles were dropped since the last look.
    pub(super) fn collect_dropped(&mut self) {
        // Relaxed: a hint; the lock orders the list.
        if !self.dropped.any.load(Ordering::Relaxed) {
            return;
        }
        let dropped = Arc::clone(&self.dropped);
        let mut keys = dropped.keys.lock().unwrap_or_else(PoisonError::into_inner);
        dropped.any.store(false, Ordering::Relaxed);
        for key in keys.drain(..) {
            let service = self.calls.stream_service(key);
            if self.calls.forget(key) {
                self.queue_control(key.link, Control::cancel(service.unwrap_or(0), key.id));
            }
        }
    }
}

#[cfg(test)]
mod tests;
