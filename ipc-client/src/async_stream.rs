//! Streams of replies on the async client (feature `tokio`):
//! [`AsyncClient::stream`] opens one, and its [`AsyncStream`] is a
//! `futures_core::Stream` of its items, ending after its one terminal
//! outcome.
//!
//! It is the blocking client's stream (`client/streams.rs`: its credit,
//! its cancel, its deadline) driven by the async client's protocol (see
//! `async_client.rs`): each poll takes the item queued for it, if any,
//! else waits like any waiter of the connection. Whichever task reads the
//! links queues the items of every stream (taking frames for one waiter
//! reads them all), and wakes each stream that has something; taking an
//! item grants the server more credit as the blocking `next` does, so a
//! stream no one polls stops the server within its window.
//!
//! Dropped before its terminal outcome, an `AsyncStream` cancels its
//! stream at once (the cancel frame is written as it drops, or as soon as
//! there is room); items that come after are dropped. Its deadline runs
//! on a tokio timer: when it passes with nothing for it, the stream's
//! outcome is [`CallError::Timeout`] and the server is told to stop (the
//! server, which knows the deadline too, ends it as well).
//!
//! Cancel safety: a poll that returns `Pending` takes nothing, so a
//! `select!` that drops a `next()` future leaves the item for the next.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use ipc_core::message::StreamOpen;
use tokio::time::Sleep;

use crate::async_client::{lock, Waiter};
use crate::{AsyncClient, CallError, Service, Stream, StreamOptions};

/// A stream of replies opened by [`AsyncClient::stream`]: a
/// `futures_core::Stream` of its items, `Ok(item)` in order, then `None`
/// at its end, or one `Err` (the handler's [`CallError::Remote`], its
/// deadline's [`CallError::Timeout`], the loss of the link) and then
/// `None`. Dropping it before the end cancels the stream.
///
/// It holds its client (a clone), so it may move to another task.
///
/// ```no_run
/// # async fn run(client: ipc_client::AsyncClient) -> Result<(), ipc_client::CallError> {
/// use std::future::poll_fn;
/// use std::pin::Pin;
/// use futures_core::Stream as _;
///
/// let search = client.service("search.scan").await?;
/// let mut hits = client.stream(&search, b"rust").await?;
/// while let Some(hit) = poll_fn(|cx| Pin::new(&mut hits).poll_next(cx)).await {
///     println!("{}", String::from_utf8_lossy(&hit?));
/// }
/// # Ok(()) }
/// ```
#[must_use = "a stream is cancelled when it is dropped"]
pub struct AsyncStream {
    client: AsyncClient,
    /// `None` once dropped.
    stream: Option<Stream>,
    /// Its number as a waiter of the connection.
    me: u64,
    /// Its deadline's timer, until it fires.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Its terminal outcome was handed out: it yields nothing more.
    done: bool,
}

impl std::fmt::Debug for AsyncStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncStream").field("stream", &self.stream).field("done", &self.done).finish_non_exhaustive()
    }
}

impl AsyncStream {
    /// The id of its opening request.
    pub fn id(&self) -> u64 {
        self.stream.as_ref().map_or(0, Stream::id)
    }

    /// Whether its terminal outcome was handed out.
    pub fn is_finished(&self) -> bool {
        self.done
    }
}

impl futures_core::Stream for AsyncStream {
    type Item = Result<Vec<u8>, CallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(stream) = this.stream.as_mut().filter(|_| !this.done) else { return Poll::Ready(None) };
        let mut st = lock(&this.client.inner);
        if let Some(timer) = &mut this.deadline {
            if timer.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                st.client.stream_deadline_passed(stream);
            }
        }
        let me = this.me;
        st.streams.insert(me, stream.key());
        let polled = st.drive(cx, Waiter::Other(me), None, |st| st.client.try_next_item(stream));
        let outcome = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(outcome)) => outcome,
            // No way left to wait: that is the stream's end.
            Poll::Ready(Err(e)) => Err(e),
        };
        st.streams.remove(&me);
        // Reading for this stream may have kept replies aside, or queued
        // other streams' items: hand them out, waking their waiters.
        st.pump(Waiter::Other(me));
        match outcome {
            Ok(Some(item)) => Poll::Ready(Some(Ok(item))),
            Ok(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Err(e) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

impl Drop for AsyncStream {
    fn drop(&mut self) {
        let Some(mut stream) = self.stream.take() else { return };
        let mut st = lock(&self.client.inner);
        if !self.done {
            // At once, rather than with the connection's next operation.
            stream.cancel(&mut st.client);
        }
        drop(stream);
        st.streams.remove(&self.me);
        st.finished(Waiter::Other(self.me));
    }
}

/// Leaves the connection's waiters when an opening is dropped unfinished.
struct Opening<'a> {
    client: &'a AsyncClient,
    me: u64,
    /// Still waiting for room.
    waiting: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.waiting {
            lock(&self.client.inner).finished(Waiter::Other(self.me));
        }
    }
}

impl AsyncClient {
    /// Opens a stream of replies from `service` with `request` and the
    /// default [`StreamOptions`] (as [`Client::stream`](crate::Client::stream)),
    /// waiting for room for its opening. Cancel safe: dropped before it is
    /// ready, nothing was sent.
    pub async fn stream(&self, service: &Service, request: &[u8]) -> Result<AsyncStream, CallError> {
        self.stream_with(service, request, StreamOptions::default()).await
    }

    /// As [`AsyncClient::stream`], with `options` (its window and its
    /// deadline).
    pub async fn stream_with(
        &self,
        service: &Service,
        request: &[u8],
        options: StreamOptions,
    ) -> Result<AsyncStream, CallError> {
        let me = lock(&self.inner).new_other();
        let mut opening = Opening { client: self, me, waiting: true };
        let room = Some((service, StreamOpen::LEN + request.len()));
        let opened = poll_fn(|cx| {
            lock(&self.inner).drive(cx, Waiter::Other(me), room, |st| {
                match st.client.open_stream(service, request, options, false) {
                    Err(CallError::Full { .. }) => None,
                    opened => Some(opened),
                }
            })
        })
        .await;
        // `drive` has taken it off the waiters.
        opening.waiting = false;
        let stream = opened??;
        let deadline = stream.deadline().map(|at| Box::pin(tokio::time::sleep_until(at.into())));
        Ok(AsyncStream {
            client: self.clone(),
            stream: Some(stream),
            me: lock(&self.inner).new_other(),
            deadline,
            done: false,
        })
    }
}
