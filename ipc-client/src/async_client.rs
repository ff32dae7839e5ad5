//! The async client (feature `tokio`): the blocking client's calls as
//! futures, on a tokio runtime the caller supplies, built on the
//! poll-style API of `client/poll.rs`.
//!
//! # Design
//!
//! One [`AsyncClient`] is one connection; it is a cloneable handle
//! (`Arc`), so many tasks call through one connection at once and their
//! requests are pipelined on its rings. The connection's [`Client`] sits
//! behind a mutex held only inside `poll` (never across an await), with
//! what the tasks wait for: the outcomes taken for them, their wakers,
//! and the outcomes no task claimed yet (for [`AsyncClient::recv`]).
//! There is no background task: whichever waiting task is polled reads
//! every outcome there is and hands each to its task (waking it), so a
//! reply costs one task wake-up, not two. Streams (`async_stream.rs`)
//! are waiters too: reading for anyone queues their items, and the pump
//! wakes each stream that has one.
//!
//! # Protocol
//!
//! Every future that waits (a reply, a receive, room to send) goes round
//! the poll-style protocol under the lock:
//!
//! 1. take every outcome there is (`try_recv`) and hand each out;
//! 2. if it is the only waiter, spin while that pays (the blocking
//!    client's adaptive spin), and only until another task waits for the
//!    lock: a spin under the lock would hold up that task's send, the
//!    very request the daemon waits for;
//! 3. `arm` (announce in every ring, `SeqCst` fence, re-check: this
//!    fence pairs with the one after the daemon's publish of the head,
//!    `SYNC(sleep-handshake)` in `ipc_core::ring`; so either the re-check
//!    sees the reply, or the daemon sees the announcement and rings);
//!    `Ready`: back to 1;
//! 4. poll each fd's readiness (`AsyncFd::poll_read_ready`): an fd found
//!    ready is drained by `on_ready` until a read finds it empty, and
//!    only then is its readiness cleared (`clear_ready`); back to 1;
//! 5. no fd ready: register the task's waker and return `Pending`. The
//!    task is the *watcher*: tokio keeps the waker of the last task that
//!    polled an fd and found it not ready, so that task is the one woken
//!    by the next ring. A task that found one fd not ready and another
//!    ready is the watcher too, though it goes back to 1 and may finish
//!    without returning `Pending`: its waker replaced the last one.
//!
//! A ring after step 3 makes the bell readable; readiness set after the
//! last clear (step 4 of an earlier round, always before step 3) is
//! never cleared unseen, and tokio's own readiness ticks drop a clear
//! that races with a new event. So the watcher is woken whenever a reply
//! may have come. Its outcomes reach the other tasks through step 1.
//!
//! When the watcher stops waiting (its outcome came, or its future was
//! dropped) while others still wait, it wakes one of them, which becomes
//! the watcher at its next poll; until one does there is no watcher, and
//! any waiter that stops waiting meanwhile wakes the next. So some
//! waiting task always has its waker on the fds, or has been woken to
//! put it there.
//!
//! # Cancel safety
//!
//! A dropped future leaves nothing behind to be mistaken for another
//! outcome: a dropped reply future forgets its ticket
//! ([`Client::forget`]: the late reply is consumed unread) or drops the
//! outcome already taken for it; a dropped send either sent (and was
//! handed the ticket) or wrote nothing, since a request of one frame is
//! written whole or not at all, and one in chunks dropped half way is
//! cancelled (`async_client/large.rs`). A timeout is such a drop, followed by
//! [`CallError::Timeout`]: each request has exactly one outcome. A
//! dropped `_into` future leaves the caller's buffer as it was: a reply
//! is exchanged into it only as the future completes.
//!
//! # Buffers
//!
//! Each reply is read into a spare buffer of the connection's, and a
//! future of the `_into` kind ([`AsyncClient::call_into`],
//! [`AsyncClient::wait_into`], [`AsyncClient::recv_into`]) exchanges it
//! with the caller's buffer, which becomes a spare in its turn. So the
//! spares are the buffers callers lent, and once they have grown to the
//! replies' length nothing is allocated per call. A spare is made only
//! when there is none, so there are never more than the most outcomes
//! that were taken and not yet handed out at once; a buffer longer than
//! one frame's payload is not kept.

use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::Interest;

use crate::client::{Armed, FdToken, Received};
use crate::{CallError, Client, ClientOptions, ConnectError, DoorbellKind, Service, Ticket, Transport};

/// Rounds of the protocol one poll goes at most before it yields (a
/// steady stream of replies must not keep one task polling for ever).
const ROUNDS: usize = 64;

/// An async connection to ipcd: cloneable, so that many tasks call
/// through it at once, pipelined. See the module docs for the design and
/// the protocol; the methods mirror [`Client`]'s.
#[derive(Clone)]
pub struct AsyncClient {
    pub(crate) inner: Arc<Shared>,
}

/// The connection's state behind its lock, and how many tasks are
/// blocked taking the lock.
pub(crate) struct Shared {
    state: Mutex<State>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient").field("client", &lock(&self.inner).client).finish_non_exhaustive()
    }
}

/// Who waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Waiter {
    /// A reply future, for its ticket.
    Ticket(Ticket),
    /// A receive or a send waiting for room, by number.
    Other(u64),
}

/// A registered fd.
struct Registered {
    fd: AsyncFd<OwnedFd>,
    token: FdToken,
    /// A socket, registered for writability too.
    writable: bool,
}

pub(crate) struct State {
    pub(crate) client: Client,
    fds: Vec<Registered>,
    epoch: Option<u64>,
    /// Outcomes taken, not yet handed to their future (or to a receive).
    done: FxHashMap<Ticket, Result<Vec<u8>, CallError>>,
    /// Outcomes no reply future waited for when they came, in order, for
    /// receives.
    unclaimed: VecDeque<Ticket>,
    /// The wakers of reply futures whose outcome has not come.
    waiting: FxHashMap<Ticket, Waker>,
    /// The wakers of receives and of sends waiting for room.
    others: FxHashMap<u64, Waker>,
    watcher: Option<Waiter>,
    next_other: u64,
    /// The async streams waiting for an item, by waiter number: taking
    /// frames for any waiter may queue their items.
    pub(crate) streams: FxHashMap<u64, crate::calls::StreamKey>,
    /// Requests in chunks under way, per link (`async_client/large.rs`).
    lanes: large::Lanes,
    /// Whether a send is connecting the lost daemon link again
    /// (`async_client/reconnect.rs`): one at a time.
    opening: bool,
    /// Empty buffers to read replies into (see the module docs).
    spare: Vec<Vec<u8>>,
    /// [`Shared::queued`]: a spin ends when a task waits for the lock.
    queued: Arc<AtomicUsize>,
}

/// Takes the connection's lock, counting the wait in `queued` when
/// another task holds it (a hint for a spin under the lock: the count is
/// read without ordering, and a spin only ends early on it).
pub(crate) fn lock(m: &Shared) -> MutexGuard<'_, State> {
    // A panic under the lock leaves the state as consistent as the
    // client's own `&mut self` methods do.
    match m.state.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(e)) => e.into_inner(),
        Err(TryLockError::WouldBlock) => {
            m.queued.fetch_add(1, Ordering::Relaxed);
            let guard = m.state.lock().unwrap_or_else(|e| e.into_inner());
            m.queued.fetch_sub(1, Ordering::Relaxed);
            guard
        }
    }
}

impl State {
    /// Step 1: takes every outcome there is and hands each out. Whether
    /// any came.
    pub(crate) fn pump(&mut self, me: Waiter) -> bool {
        let mut any = false;
        loop {
            let mut buf = self.spare.pop().unwrap_or_default();
            let Ok(Some(Received { ticket, outcome })) = self.client.try_recv_into(&mut buf) else {
                self.recycle(buf);
                break;
            };
            let outcome = match outcome {
                Ok(()) => Ok(buf),
                Err(e) => {
                    self.recycle(buf);
                    Err(e)
                }
            };
            any = true;
            self.done.insert(ticket, outcome);
            match self.waiting.remove(&ticket) {
                // `me` is polled now: it finds its outcome without a wake.
                Some(waker) if me != Waiter::Ticket(ticket) => waker.wake(),
                Some(_) => {}
                None => self.unclaimed.push_back(ticket),
            }
            // A receive may want it, or learn that nothing is left.
            let mine = match me {
                Waiter::Other(id) => self.others.remove(&id),
                Waiter::Ticket(_) => None,
            };
            for (_, w) in self.others.drain() {
                w.wake();
            }
            if let (Some(w), Waiter::Other(id)) = (mine, me) {
                self.others.insert(id, w);
            }
        }
        // Taking frames queues stream items too, outcomes or not: wake the
        // streams that have one (`me` finds its own as it is polled).
        for (&id, &key) in &self.streams {
            if Waiter::Other(id) != me && self.client.stream_waiting(key) {
                if let Some(w) = self.others.remove(&id) {
                    w.wake();
                }
            }
        }
        any
    }

    /// Keeps `buf` as a spare, unless it has no room at all or more than
    /// a frame's payload (see the module docs).
    fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() != 0 && buf.capacity() <= self.client.largest_payload() {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// Hands the reply `buf` out in `reply`, keeping `reply`'s buffer as
    /// a spare.
    fn hand_into(&mut self, buf: Vec<u8>, reply: &mut Vec<u8>) {
        let lent = std::mem::replace(reply, buf);
        self.recycle(lent);
    }

    /// A number for a new waiter of the `Other` kind.
    pub(crate) fn new_other(&mut self) -> u64 {
        self.next_other += 1;
        self.next_other
    }

    /// Whether no task but `me` waits.
    fn alone(&self, me: Waiter) -> bool {
        let mine = match me {
            Waiter::Ticket(t) => self.waiting.contains_key(&t),
            Waiter::Other(id) => self.others.contains_key(&id),
        };
        self.waiting.len() + self.others.len() == usize::from(mine)
    }

    /// Registers the client's fds anew when they changed.
    fn sync_fds(&mut self) -> Result<(), CallError> {
        if self.epoch == Some(self.client.fd_epoch()) {
            return Ok(());
        }
        self.fds.clear();
        for w in self.client.wait_fds() {
            let owned = w.fd.try_clone_to_owned().map_err(|e| gone(format!("cannot duplicate an fd: {e}")))?;
            let writable = self.client.transport() != "shm";
            let interest = if writable { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            // A duplicate made for the registration alone, owned by it.
            let fd = ipc_platform::async_fd::register_owned(owned, interest)
                .map_err(|e| gone(format!("cannot register an fd: {e}")))?;
            self.fds.push(Registered { fd, token: w.token, writable });
        }
        self.epoch = Some(self.client.fd_epoch());
        Ok(())
    }

    /// Step 4: polls every fd; drains those ready, clearing readiness
    /// after an empty read. Whether any was ready.
    ///
    /// A poll that finds an fd not ready leaves `me`'s waker on it, in
    /// place of the watcher's, even when another fd was ready and `me`
    /// goes on to find its outcome and stop waiting: so `me` is the
    /// watcher from then on, and hands over when it stops (a test that
    /// drops futures at every poll lost wake-ups this way).
    fn poll_fds(&mut self, cx: &mut Context<'_>, me: Waiter) -> Result<bool, CallError> {
        self.sync_fds()?;
        let (mut any, mut registered) = (false, false);
        let wants_write = self.client.wait_fds().any(|w| w.writable);
        for reg in &self.fds {
            // Drains a direction found ready; notes a waker left on it.
            let mut take = |polled: Poll<std::io::Result<AsyncFdReadyGuard<'_, OwnedFd>>>| match polled {
                Poll::Ready(Ok(mut guard)) => {
                    any = true;
                    if self.client.on_ready(reg.token) {
                        guard.clear_ready();
                    }
                }
                Poll::Ready(Err(_)) => {}
                Poll::Pending => registered = true,
            };
            take(reg.fd.poll_read_ready(cx));
            if wants_write && reg.writable {
                take(reg.fd.poll_write_ready(cx));
            }
        }
        if registered {
            self.watcher = Some(me);
        }
        Ok(any)
    }

    /// Steps 1 to 5 for `me`, until `ready` gives its value.
    pub(crate) fn drive<T>(
        &mut self,
        cx: &mut Context<'_>,
        me: Waiter,
        room: Option<(&Service, usize)>,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> Poll<Result<T, CallError>> {
        for _ in 0..ROUNDS {
            if let Some(v) = ready(self) {
                self.finished(me);
                return Poll::Ready(Ok(v));
            }
            if self.pump(me) {
                continue;
            }
            // Taking frames may have queued what `me` waits for (a
            // stream's item) without an outcome to show for it.
            if let Some(v) = ready(self) {
                self.finished(me);
                return Poll::Ready(Ok(v));
            }
            // The spin holds the lock: it ends when another task waits
            // for it (that task may be about to send, which is what the
            // daemon waits for), and `me` sleeps on the fds instead.
            if room.is_none() && self.alone(me) {
                let queued = &self.queued;
                if self.client.spin_unless(|| queued.load(Ordering::Relaxed) > 0) {
                    continue;
                }
            }
            let armed = match room {
                Some((service, len)) => self.client.arm_for_room(service, len),
                None => self.client.arm(),
            };
            match armed {
                Ok(Armed::Wait) => {}
                Ok(_) => continue,
                Err(e) => {
                    self.finished(me);
                    return Poll::Ready(Err(e));
                }
            }
            match self.poll_fds(cx, me) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.finished(me);
                    return Poll::Ready(Err(e));
                }
            }
            let waker = cx.waker();
            let slot = match me {
                Waiter::Ticket(t) => self.waiting.entry(t),
                Waiter::Other(id) => {
                    match self.others.get_mut(&id) {
                        Some(w) if w.will_wake(waker) => {}
                        Some(w) => w.clone_from(waker),
                        None => {
                            self.others.insert(id, waker.clone());
                        }
                    }
                    self.watcher = Some(me);
                    return Poll::Pending;
                }
            };
            slot.and_modify(|w| {
                if !w.will_wake(waker) {
                    w.clone_from(waker)
                }
            })
            .or_insert_with(|| waker.clone());
            self.watcher = Some(me);
            return Poll::Pending;
        }
        // Many rounds, each finding something: let other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// `me` waits no more: if it was the watcher, another waiter takes
    /// over (see the module docs). So does one if there is no watcher:
    /// the waiter woken to take over may itself stop waiting before it
    /// polls an fd (its outcome was taken for it meanwhile), and then the
    /// hand-over goes on to the next.
    pub(crate) fn finished(&mut self, me: Waiter) {
        match me {
            Waiter::Ticket(t) => {
                self.waiting.remove(&t);
            }
            Waiter::Other(id) => {
                self.others.remove(&id);
            }
        }
        if self.watcher == Some(me) || self.watcher.is_none() {
            self.watcher = None;
            if let Some(&t) = self.waiting.keys().next() {
                if let Some(w) = self.waiting.get(&t) {
                    w.wake_by_ref();
                }
            } else if let Some(w) = self.others.values().next() {
                w.wake_by_ref();
            }
        }
    }

    /// Takes `ticket`'s outcome out of `done`.
    fn take(&mut self, ticket: Ticket) -> Option<Result<Vec<u8>, CallError>> {
        let outcome = self.done.remove(&ticket)?;
        if let Some(i) = self.unclaimed.iter().position(|t| *t == ticket) {
            self.unclaimed.remove(i);
        }
        Some(outcome)
    }
}

fn gone(reason: String) -> CallError {
    CallError::Disconnected { reason }
}

impl AsyncClient {
    /// Connects to the daemon at the default path (as
    /// [`Client::connect`]).
    pub async fn connect() -> Result<AsyncClient, ConnectError> {
        AsyncClient::connect_with(ipc_platform::default_socket_path(), ClientOptions::default()).await
    }

    /// Connects through `transport` with `options` (as
    /// [`Client::connect_with`]); over shared memory the doorbell is
    /// always [`DoorbellKind::Pollable`], the one a reactor can wait on.
    /// The handshake runs on tokio's blocking pool.
    pub async fn connect_with(
        transport: impl Into<Transport>,
        options: ClientOptions,
    ) -> Result<AsyncClient, ConnectError> {
        let transport = transport.into();
        let options = options.doorbell(DoorbellKind::Pollable);
        let client = tokio::task::spawn_blocking(move || Client::connect_with(transport, options))
            .await
            .map_err(|e| ConnectError::Io(std::io::Error::other(e)))??;
        Ok(AsyncClient::from_client(client))
    }

    /// Wraps a client connected already (with a pollable doorbell on
    /// shared memory: else every wait fails with
    /// [`CallError::NotPollable`]).
    pub fn from_client(client: Client) -> AsyncClient {
        let queued = Arc::new(AtomicUsize::new(0));
        let state = State {
            client,
            fds: Vec::new(),
            epoch: None,
            done: FxHashMap::default(),
            unclaimed: VecDeque::new(),
            waiting: FxHashMap::default(),
            others: FxHashMap::default(),
            watcher: None,
            next_other: 0,
            streams: FxHashMap::default(),
            lanes: large::Lanes::default(),
            opening: false,
            spare: Vec::new(),
            queued: queued.clone(),
        };
        AsyncClient { inner: Arc::new(Shared { state: Mutex::new(state), queued }) }
    }

    /// Resolves `name` (as [`Client::service`]). A provided name's first
    /// resolve is an exchange with the broker, run on tokio's blocking
    /// pool with the connection locked: resolve before the calls that
    /// matter.
    pub async fn service(&self, name: &str) -> Result<Service, CallError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || lock(&inner).client.service(&name))
            .await
            .map_err(|e| gone(format!("the resolve panicked: {e}")))?
    }

    /// Runs `f` on the connection's [`Client`] (for what has no async
    /// form: its options, its fds, a blocking call). Do not block in it
    /// for long: every task of the connection waits meanwhile.
    pub fn with_client<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        f(&mut lock(&self.inner).client)
    }

    /// Calls `service` with `request`, waiting at most the call timeout
    /// ([`CallError::Timeout`]: the request may still run, its late reply
    /// is dropped). Cancel safe: dropped, the call's reply is dropped.
    pub async fn call(&self, service: &Service, request: &[u8]) -> Result<Vec<u8>, CallError> {
        let timeout = lock(&self.inner).client.default_timeout();
        self.call_timeout(service, request, timeout).await
    }

    /// As [`AsyncClient::call`], with its own timeout.
    pub async fn call_timeout(
        &self,
        service: &Service,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.call_into_timeout(service, request, &mut reply, timeout).await?;
        Ok(reply)
    }

    /// As [`AsyncClient::call`], writing the reply into `reply`
    /// (replacing its contents), as [`Client::call_into`]. Allocates
    /// nothing once the buffers lent so have grown to the replies' length:
    /// the reply was read into a spare buffer of the connection's, which
    /// is exchanged with `reply`'s (see the module docs). A call that
    /// fails, or is dropped, leaves `reply` as it was.
    pub async fn call_into(&self, service: &Service, request: &[u8], reply: &mut Vec<u8>) -> Result<(), CallError> {
        let timeout = lock(&self.inner).client.default_timeout();
        self.call_into_timeout(service, request, reply, timeout).await
    }

    /// As [`AsyncClient::call_into`], with its own timeout.
    pub async fn call_into_timeout(
        &self,
        service: &Service,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let call = async {
            let ticket = self.send(service, request).await?;
            self.wait_into(ticket, reply).await
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CallError::Timeout { after: timeout }),
        }
    }

    /// As [`Client::call_typed`]: bincode (standard config) both ways.
    pub async fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &Service,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(request, config).map_err(|e| CallError::Encode(e.to_string()))?;
        let reply = self.call(service, &bytes).await?;
        let (value, used) =
            bincode::serde::decode_from_slice(&reply, config).map_err(|e| CallError::Decode(e.to_string()))?;
        if used != reply.len() {
            return Err(CallError::Decode(format!("{} stray bytes after the reply", reply.len() - used)));
        }
        Ok(value)
    }

    /// Queues a request, waiting for room in its link, and returns its
    /// ticket (for [`AsyncClient::wait`] or [`AsyncClient::recv`]). A
    /// request longer than [`Client::max_payload_of`] (up to
    /// [`ClientOptions::max_message`]; [`CallError::TooLarge`] past it)
    /// goes out in chunks, all of them before it is ready, as the blocking
    /// [`Client::send`] sends it. Cancel safe: dropped before it is ready,
    /// nothing was sent, or the request begun in chunks is cancelled (it
    /// does not run, and its answer is dropped).
    pub fn send<'a>(&'a self, service: &'a Service, request: &'a [u8]) -> SendFuture<'a> {
        SendFuture { client: self, service, request, me: None, chunked: None, reconnect: None }
    }

    /// Waits for `ticket`'s outcome. Dropped before it is ready, the
    /// ticket is given up: its outcome is dropped, then or when it comes.
    /// A ticket of another client is refused
    /// ([`CallError::ForeignTicket`]).
    pub fn wait(&self, ticket: Ticket) -> WaitFuture<'_> {
        WaitFuture { client: self, ticket, done: false }
    }

    /// As [`AsyncClient::wait`], writing the reply into `reply` (as
    /// [`AsyncClient::call_into`] does: no allocation once the buffers
    /// lent have grown). Dropped before it is ready, the ticket is given
    /// up and `reply` is left as it was.
    pub fn wait_into<'a>(&'a self, ticket: Ticket, reply: &'a mut Vec<u8>) -> WaitIntoFuture<'a> {
        WaitIntoFuture { wait: self.wait(ticket), reply }
    }

    /// Waits for the next outcome no [`AsyncClient::wait`] is waiting
    /// for, in the order they came; [`CallError::NothingInFlight`] once
    /// there is none left to come.
    pub fn recv(&self) -> RecvFuture<'_> {
        RecvFuture { client: self, me: None }
    }

    /// As [`AsyncClient::recv`], writing a reply into `reply` (as
    /// [`AsyncClient::call_into`] does); the outcome says whose it is.
    pub fn recv_into<'a>(&'a self, reply: &'a mut Vec<u8>) -> RecvIntoFuture<'a> {
        RecvIntoFuture { recv: self.recv(), reply }
    }

    /// Requests whose outcome has not been handed out.
    pub fn in_flight(&self) -> usize {
        let st = lock(&self.inner);
        st.client.in_flight() + st.done.len()
    }
}

/// The future of [`AsyncClient::send`].
#[must_use = "futures do nothing unless polled"]
pub struct SendFuture<'a> {
    client: &'a AsyncClient,
    service: &'a Service,
    request: &'a [u8],
    me: Option<u64>,
    /// A request longer than a frame, as its chunks go.
    chunked: Option<large::Chunked<'a>>,
    /// The lost daemon link being connected again first.
    reconnect: Option<Box<reconnect::Reconnecting>>,
}

impl Future for SendFuture<'_> {
    type Output = Result<Ticket, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut st = lock(&this.client.inner);
        // Before the request's first frame only: a request in chunks
        // whose link was lost ends with that loss, not on a new link.
        if !large::begun(&this.chunked) {
            match reconnect::poll(&mut st, cx, this.service, &mut this.reconnect) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let me = *this.me.get_or_insert_with(|| {
            st.next_other += 1;
            st.next_other
        });
        let (service, request) = (this.service, this.request);
        if let Some(polled) = large::poll_send(&mut st, cx, me, service, request, &mut this.chunked) {
            if polled.is_ready() {
                this.me = None;
            }
            return polled;
        }
        let polled = st.drive(cx, Waiter::Other(me), Some((service, request.len())), |st| {
            match st.client.try_send(service, request) {
                Err(CallError::Full { .. }) => None,
                sent => Some(sent),
            }
        });
        drop(st);
        match polled {
            Poll::Ready(sent) => {
                this.me = None;
                Poll::Ready(sent.and_then(|s| s))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for SendFuture<'_> {
    fn drop(&mut self) {
        if self.reconnect.is_some() {
            reconnect::drop_send(&mut lock(&self.client.inner), &mut self.reconnect);
        }
        if let Some(me) = self.me {
            let mut st = lock(&self.client.inner);
            large::drop_send(&mut st, me, &mut self.chunked);
            st.finished(Waiter::Other(me));
        }
    }
}

/// The future of [`AsyncClient::wait`].
#[must_use = "futures do nothing unless polled"]
pub struct WaitFuture<'a> {
    client: &'a AsyncClient,
    ticket: Ticket,
    done: bool,
}

impl WaitFuture<'_> {
    /// Polls for the ticket's outcome; a reply is handed out by `hand`,
    /// under the lock.
    fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        hand: impl FnOnce(&mut State, Vec<u8>) -> T,
    ) -> Poll<Result<T, CallError>> {
        let (client, ticket) = (self.client, self.ticket);
        let mut st = lock(&client.inner);
        if let Some(outcome) = st.take(ticket) {
            st.finished(Waiter::Ticket(ticket));
            self.done = true;
            return Poll::Ready(outcome.map(|buf| hand(&mut st, buf)));
        }
        if let Err(e) = st.client.check_pending(ticket) {
            st.finished(Waiter::Ticket(ticket));
            self.done = true;
            return Poll::Ready(Err(e));
        }
        match st.drive(cx, Waiter::Ticket(ticket), None, |st| st.take(ticket)) {
            Poll::Ready(Ok(outcome)) => {
                self.done = true;
                Poll::Ready(outcome.map(|buf| hand(&mut st, buf)))
            }
            Poll::Ready(Err(e)) => {
                // The wait failed for want of a way to wait: the ticket is
                // given up (dropped below), and this is its outcome.
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Future for WaitFuture<'_> {
    type Output = Result<Vec<u8>, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_with(cx, |_, buf| buf)
    }
}

impl Drop for WaitFuture<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = lock(&self.client.inner);
        match st.take(self.ticket) {
            Some(Ok(buf)) => st.recycle(buf),
            Some(Err(_)) => {}
            None => st.client.forget(self.ticket),
        }
        st.finished(Waiter::Ticket(self.ticket));
    }
}

/// The future of [`AsyncClient::wait_into`].
#[must_use = "futures do nothing unless polled"]
pub struct WaitIntoFuture<'a> {
    wait: WaitFuture<'a>,
    reply: &'a mut Vec<u8>,
}

impl Future for WaitIntoFuture<'_> {
    type Output = Result<(), CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.wait.poll_with(cx, |st, buf| st.hand_into(buf, this.reply))
    }
}

/// The future of [`AsyncClient::recv`].
#[must_use = "futures do nothing unless polled"]
pub struct RecvFuture<'a> {
    client: &'a AsyncClient,
    me: Option<u64>,
}

impl RecvFuture<'_> {
    /// Polls for the next unclaimed outcome; a reply is handed out by
    /// `hand`, under the lock.
    fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        hand: impl FnOnce(&mut State, Vec<u8>) -> T,
    ) -> Poll<Result<Received<T>, CallError>> {
        let this = self;
        let mut st = lock(&this.client.inner);
        let me = *this.me.get_or_insert_with(|| {
            st.next_other += 1;
            st.next_other
        });
        let polled = st.drive(cx, Waiter::Other(me), None, |st| {
            if let Some(ticket) = st.unclaimed.pop_front() {
                let outcome = st.done.remove(&ticket).expect("an unclaimed outcome is kept");
                return Some(Ok(Received { ticket, outcome }));
            }
            // Nothing left to come but what reply futures wait for.
            (st.client.in_flight() <= st.waiting.len()).then_some(Err(CallError::NothingInFlight))
        });
        match polled {
            Poll::Ready(got) => {
                this.me = None;
                Poll::Ready(got.and_then(|g| g).map(|Received { ticket, outcome }| Received {
                    ticket,
                    outcome: outcome.map(|buf| hand(&mut st, buf)),
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Future for RecvFuture<'_> {
    type Output = Result<Received, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_with(cx, |_, buf| buf)
    }
}

impl Drop for RecvFuture<'_> {
    fn drop(&mut self) {
        if let Some(me) = self.me {
            lock(&self.client.inner).finished(Waiter::Other(me));
        }
    }
}

/// The future of [`AsyncClient::recv_into`]; its reply, if the outcome is
/// one, is in the caller's buffer.
#[must_use = "futures do nothing unless polled"]
pub struct RecvIntoFuture<'a> {
    recv: RecvFuture<'a>,
    reply: &'a mut Vec<u8>,
}

impl Future for RecvIntoFuture<'_> {
    type Output = Result<Received<()>, CallError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.recv.poll_with(cx, |st, buf| st.hand_into(buf, this.reply))
    }
}
mod large;
mod reconnect;
mod upload;

pub use upload::AsyncUpload;
