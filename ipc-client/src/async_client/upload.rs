//! Uploads on the async client: [`AsyncClient::upload`] opens one, and
//! its [`AsyncUpload`] is a `tokio::io::AsyncWrite` of the request,
//! finished by [`AsyncUpload::finish`], which waits for the reply.
//!
//! It is the blocking [`Upload`](crate::Upload) on the same state
//! machine (`client/outgoing.rs`: the bytes gathered into chunks, the
//! length checked, a chunk sent as room comes): `poll_write` gathers what
//! fits, and sends a whole chunk before it gathers more, waiting for room
//! as any waiter of the connection does, so a peer that reads slowly
//! slows the writer down (`poll_write` stays `Pending`). An upload holds a
//! lane of its link (see `async_client/large.rs`) from its first chunk to
//! its last. `AsyncWrite` rather than a sink of chunks, because that is
//! what tokio's own copies write to (`tokio::io::copy` from a file or a
//! socket, `AsyncWriteExt::write_all`).
//!
//! Cancel safety: a `poll_write` that returns `Pending` has taken nothing.
//! Dropped before its finish (or after an error), the upload is cancelled
//! as the blocking one is: its peer drops what it has, it does not run,
//! and its answer is dropped. `poll_shutdown` does not finish it (a
//! finish has a reply to hand out): call [`AsyncUpload::finish`].

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{lock, Waiter};
use crate::client::{Gathered, Pushed};
use crate::{AsyncClient, CallError, Service, Ticket};

/// A request written bit by bit from [`AsyncClient::upload`] and sent in
/// chunks as it is written: write it (`tokio::io::AsyncWrite`), then
/// [`AsyncUpload::finish`] sends its last chunk and waits for the reply.
/// A request that fits one frame is sent as one at the finish.
///
/// Dropped before its finish (or after an error), the request is
/// cancelled: its peer drops what it has, and it does not run. Writing
/// past the announced length, or finishing short of it, fails the upload
/// ([`CallError::UploadLength`]). It holds its client (a clone), so it may
/// move to another task.
#[must_use = "an upload is cancelled unless it is finished"]
pub struct AsyncUpload {
    client: AsyncClient,
    service: Service,
    /// Its number as a waiter of the connection.
    me: u64,
    g: Gathered,
    /// It holds a lane of its link.
    lane: bool,
    failed: Option<CallError>,
    /// Sent whole (or failed): nothing to cancel.
    done: bool,
}

impl std::fmt::Debug for AsyncUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncUpload")
            .field("service", &self.service.name())
            .field("written", &self.g.written())
            .finish_non_exhaustive()
    }
}

impl AsyncClient {
    /// Starts an upload to `service` (as [`Client::upload`](crate::Client::upload)):
    /// a request of `len` bytes if known (`None`: known at the finish
    /// only), written through the returned [`AsyncUpload`] and sent in
    /// chunks as it is written. At most
    /// [`ClientOptions::max_message`](crate::ClientOptions::max_message)
    /// bytes ([`CallError::TooLarge`]). A lost daemon link is connected
    /// again first, as a send does, with a reconnect policy.
    ///
    /// ```no_run
    /// # async fn run(client: ipc_client::AsyncClient) -> Result<(), Box<dyn std::error::Error>> {
    /// let store = client.service("blob.put").await?;
    /// let mut upload = client.upload(&store, None)?;
    /// tokio::io::copy(&mut tokio::io::empty(), &mut upload).await?;
    /// let receipt = upload.finish().await?;
    /// # Ok(()) }
    /// ```
    pub fn upload(&self, service: &Service, len: Option<u64>) -> Result<AsyncUpload, CallError> {
        let mut st = lock(&self.inner);
        let g = st.client.gathered(service, len, Vec::new())?;
        let me = st.new_other();
        drop(st);
        Ok(AsyncUpload {
            client: self.clone(),
            service: service.clone(),
            me,
            g,
            lane: false,
            failed: None,
            done: false,
        })
    }
}

impl AsyncUpload {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.g.written()
    }

    /// The request's ticket, once its first chunk is sent.
    pub fn ticket(&self) -> Option<Ticket> {
        self.g.out.ticket()
    }

    /// Sends what is left and waits for the reply, up to the call timeout
    /// ([`CallError::Timeout`]). Dropped before the last chunk is sent,
    /// the upload is cancelled; after, its reply is dropped.
    pub async fn finish(mut self) -> Result<Vec<u8>, CallError> {
        let timeout = lock(&self.client.inner).client.default_timeout();
        let finish = async {
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if let Err(e) = self.g.check_whole() {
                return Err(self.fail(e));
            }
            let ticket = poll_fn(|cx| self.poll_last(cx)).await?;
            self.client.wait(ticket).await
        };
        match tokio::time::timeout(timeout, finish).await {
            Ok(outcome) => outcome,
            // Not sent whole: cancelled as it drops, and not run.
            Err(_) if !self.done => Err(CallError::SendTimeout { after: timeout, in_flight: self.client.in_flight() }),
            Err(_) => Err(CallError::Timeout { after: timeout }),
        }
    }

    /// Sends the last of it: as one frame if nothing was sent yet and it
    /// fits, else as its last chunk (unless the peer answered already).
    fn poll_last(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ticket, CallError>> {
        if self.g.out.ticket().is_none() {
            // All of it fits one frame: less than a first chunk.
            let (service, me, buf) = (&self.service, self.me, &self.g.buf);
            let mut st = lock(&self.client.inner);
            let sent = st.drive(cx, Waiter::Other(me), Some((service, buf.len())), |st| {
                match st.client.try_send(service, buf) {
                    Err(CallError::Full { .. }) => None,
                    sent => Some(sent),
                }
            });
            drop(st);
            let Poll::Ready(sent) = sent else { return Poll::Pending };
            self.done = true;
            self.give_back();
            return Poll::Ready(sent.and_then(|s| s));
        }
        if self.g.out.is_going() {
            match self.poll_send(cx, true) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
        }
        self.done = true;
        self.give_back();
        Poll::Ready(Ok(self.g.out.ticket().expect("a chunk was sent")))
    }

    /// Sends the bytes gathered as the next chunk (the last with `last`),
    /// taking a lane first, waiting for room as any waiter does.
    fn poll_send(&mut self, cx: &mut Context<'_>, last: bool) -> Poll<Result<(), CallError>> {
        let this = &mut *self;
        let mut st = lock(&this.client.inner);
        if !this.lane {
            if !st.lanes.take(this.g.out.link(), this.me, cx.waker()) {
                return Poll::Pending;
            }
            this.lane = true;
        }
        let prefix = if this.g.out.ticket().is_none() { ipc_core::message::CHUNK_PREFIX } else { 0 };
        let room = Some((&this.service, prefix + this.g.buf.len()));
        let (service, g) = (&this.service, &mut this.g);
        let sent = st.drive(cx, Waiter::Other(this.me), room, |st| {
            // An answer before the end may have been taken for its ticket
            // already: the rest is not sent.
            if g.out.ticket().is_some_and(|t| st.done.contains_key(&t)) {
                st.client.answered(&mut g.out);
                g.buf.clear();
                return Some(Ok(()));
            }
            match st.client.try_send_gathered(service, g, last) {
                Ok(Pushed::Full) => None,
                Ok(Pushed::Written | Pushed::Answered) => Some(Ok(())),
                Err(e) => Some(Err(e)),
            }
        });
        drop(st);
        match sent {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Ok(()))) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(Err(e)) | Err(e)) => Poll::Ready(Err(self.fail(e))),
        }
    }

    /// Fails the upload with `error` (cancelling it if begun, and dropping
    /// an answer taken for it); the error to hand out.
    fn fail(&mut self, error: CallError) -> CallError {
        self.done = true;
        let mut st = lock(&self.client.inner);
        let error = st.client.abort(&mut self.g.out, error);
        if let Some(ticket) = self.g.out.ticket() {
            if st.take(ticket).is_none() {
                st.client.forget(ticket);
            }
        }
        drop(st);
        self.give_back();
        self.failed = Some(error.clone());
        error
    }

    /// Gives its lane back, if it holds one.
    fn give_back(&mut self) {
        if std::mem::take(&mut self.lane) {
            lock(&self.client.inner).lanes.give_back(self.g.out.link());
        }
    }
}

impl tokio::io::AsyncWrite for AsyncUpload {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Some(e) = &self.failed {
            return Poll::Ready(Err(io::Error::other(e.clone())));
        }
        if let Err(e) = self.g.admit(data.len()) {
            return Poll::Ready(Err(io::Error::other(self.fail(e))));
        }
        while self.g.is_full() {
            match self.poll_send(cx, false) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(Ok(())) => {}
            }
        }
        Poll::Ready(Ok(self.g.gather(data)))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for AsyncUpload {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.fail(CallError::Cancelled);
        }
        self.give_back();
        let mut st = lock(&self.client.inner);
        st.lanes.waiting.remove(&self.me);
        st.finished(Waiter::Other(self.me));
    }
}
