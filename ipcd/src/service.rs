//! Services: named handlers that map a request to a reply, the three ways
//! a handler may run, and the dispatch both transports share.
//!
//! - *Inline* handlers ([`ServerBuilder::service`], `service_into`) run on
//!   the worker thread and write their reply into a buffer the worker
//!   reuses: the fastest, and a call costs no allocation; but while one
//!   runs, its worker serves no one else.
//! - *Blocking* handlers ([`ServerBuilder::blocking_service`]) run on the
//!   handler threads ([`crate::pool`]): the worker copies the request out
//!   and goes on, and the reply comes back through a responder.
//! - *Deferred* handlers ([`ServerBuilder::deferred_service`]) run on the
//!   worker thread, are given the request and a
//!   [`Responder`](crate::Responder), and return at once; the call is
//!   answered when the responder is used, from any thread.
//!
//! [`ServerBuilder::service`]: crate::ServerBuilder::service
//! [`ServerBuilder::blocking_service`]: crate::ServerBuilder::blocking_service
//! [`ServerBuilder::deferred_service`]: crate::ServerBuilder::deferred_service

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use ipc_core::message::{
    MessageError, StreamOpen, CHUNK_PREFIX, FLAG_CANCEL, FLAG_CREDIT, FLAG_END, FLAG_MORE, FLAG_STREAM,
};
use ipc_core::{encode_error, ErrorCode, FrameHeader, FLAG_ERROR, FLAG_PAD};

use crate::deferred::{too_long, Completions, Responder, Slot, PANICKED};
use crate::limits::{Charge, Limits};
use crate::pool::Pool;
use crate::request::{OwnedRequest, Request, SessionContext};
use crate::stats::WorkerCounters;
use crate::streaming::{StreamFn, StreamThreads};
use crate::upload::{Upload, UploadFn};

/// An error a handler returns; the client receives it as a remote error for
/// that call alone (`CallError::Remote`), with its code if it has one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    code: Option<u32>,
    message: String,
}

impl ServiceError {
    /// An error with `message` (cut to 1024 bytes on the wire).
    pub fn new(message: impl Into<String>) -> ServiceError {
        ServiceError { code: None, message: message.into() }
    }

    /// An error with a code of the service's own, which the client can
    /// match (`CallError::Remote { code: Some(code), .. }`), and `message`.
    pub fn with_code(code: u32, message: impl Into<String>) -> ServiceError {
        ServiceError { code: Some(code), message: message.into() }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The service's code, if it gave one.
    pub fn code(&self) -> Option<u32> {
        self.code
    }

    /// Writes the error body the client receives into `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let code = self.code.map_or(ErrorCode::Handler, ErrorCode::Application);
        encode_error(code, &self.message, out);
    }
}

/// An inline handler: writes its reply into a buffer that arrives empty.
pub(crate) type InlineFn = dyn Fn(&Request<'_>, &mut Vec<u8>) -> Result<(), ServiceError> + Send + Sync;
/// A blocking handler: returns its reply, on a handler thread.
pub(crate) type BlockingFn = dyn Fn(&Request<'_>) -> Result<Vec<u8>, ServiceError> + Send + Sync;
/// A deferred handler: answers through the responder, whenever.
pub(crate) type DeferredFn = dyn Fn(OwnedRequest, Responder) + Send + Sync;

/// A service's handler, by where it runs (see the module docs).
#[derive(Clone)]
pub(crate) enum Handler {
    Inline(Arc<InlineFn>),
    Blocking(Arc<BlockingFn>),
    Deferred(Arc<DeferredFn>),
    /// A deferred handler whose work goes on elsewhere (an async service's
    /// tasks), and `cancel`, which the last worker to stop calls to end it.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Cancellable {
        handler: Arc<DeferredFn>,
        cancel: Arc<dyn Fn() + Send + Sync>,
    },
    /// Takes its request chunk by chunk, on the worker.
    Upload(Arc<UploadFn>),
    /// Answers with a stream of items, on a thread of its own.
    Stream(Arc<StreamFn>),
    /// The built-in `echo`: a request of one frame is answered inline; a
    /// longer one is sent back chunk by chunk as it comes.
    Echo,
}

/// The services of a server, by id, and the threads its blocking and
/// stream handlers run on. Ids are indices: the first service is 0.
pub(crate) struct ServiceTable {
    entries: Vec<(Arc<str>, Handler)>,
    pool: Pool,
    pub(crate) streams: StreamThreads,
}

impl Default for ServiceTable {
    fn default() -> ServiceTable {
        ServiceTable::new(crate::pool::DEFAULT_HANDLER_THREADS)
    }
}

impl ServiceTable {
    /// No services yet; blocking ones will run on `handler_threads`
    /// threads.
    pub(crate) fn new(handler_threads: usize) -> ServiceTable {
        ServiceTable { entries: Vec::new(), pool: Pool::new(handler_threads), streams: StreamThreads::default() }
    }

    pub(crate) fn add(&mut self, name: String, handler: Handler) -> Result<(), String> {
        if name.is_empty() || name.len() > 256 {
            return Err(format!("service name {name:?} must be 1 to 256 bytes"));
        }
        if self.entries.iter().any(|(n, _)| **n == *name) {
            return Err(format!("service {name:?} is registered twice"));
        }
        if self.entries.len() >= usize::from(u16::MAX) {
            return Err(format!("more than {} services", u16::MAX));
        }
        self.entries.push((Arc::from(name), handler));
        Ok(())
    }

    /// The id of the service called `name`, if there is one.
    pub(crate) fn id(&self, name: &str) -> Option<u16> {
        self.entries.iter().position(|(n, _)| **n == *name).map(|i| i as u16)
    }

    fn get(&self, id: u16) -> Option<&(Arc<str>, Handler)> {
        self.entries.get(usize::from(id))
    }

    /// The service `id` as `session` may call it, or the error that
    /// answers a call to it (not granted, or no such service). Checked in
    /// that order, so a session learns nothing of the services it was not
    /// granted.
    pub(crate) fn resolve(
        &self,
        session: &SessionContext,
        id: u16,
    ) -> Result<(&Arc<str>, &Handler), (ErrorCode, String)> {
        if !session.may_call(id) {
            return Err((ErrorCode::NotPermitted, format!("session {} may not call service {id}", session.id)));
        }
        match self.get(id) {
            Some((name, handler)) => Ok((name, handler)),
            None => Err((ErrorCode::UnknownService, format!("no service has id {id}"))),
        }
    }

    pub(crate) fn directory(&self) -> Vec<ipc_core::ServiceEntry> {
        self.entries
            .iter()
            .enumerate()
            .map(|(id, (name, _))| ipc_core::ServiceEntry { name: name.to_string(), id: id as u16 })
            .collect()
    }

    /// Starts the handler threads, if a blocking service needs them.
    pub(crate) fn start_pool(&self) -> io::Result<()> {
        if self.entries.iter().any(|(_, h)| matches!(h, Handler::Blocking(_))) {
            self.pool.start()?;
        }
        Ok(())
    }

    /// Stops the handler threads (see [`Pool::stop`]), waits for the
    /// stream handlers to return, and cancels the work of cancellable
    /// handlers (async services' tasks).
    pub(crate) fn stop_pool(&self) {
        self.pool.stop();
        self.streams.stop();
        for (_, handler) in &self.entries {
            if let Handler::Cancellable { cancel, .. } = handler {
                cancel();
            }
        }
    }
}

/// What a worker lends a session for one serve.
pub(crate) struct Serving<'w> {
    pub(crate) services: &'w ServiceTable,
    pub(crate) counters: &'w WorkerCounters,
    /// Where the answers of handed-off calls go.
    pub(crate) completions: &'w Completions,
    /// What messages held for a while are charged against.
    pub(crate) limits: &'w Arc<Limits>,
    /// The longest message taken or sent.
    pub(crate) max_message: u64,
    /// Requests are answered with a shutdown error, not executed.
    pub(crate) shutting_down: bool,
}

/// What became of a dispatched request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dispatched {
    /// Answered: the reply (or error body) is in the buffer, with these
    /// response flags.
    Replied(u16),
    /// Handed off at this moment: its responder will answer it.
    Deferred(Instant),
}

/// The message of the answer to a request taken while shutting down.
pub(crate) const SHUTDOWN_MESSAGE: &str = "daemon is shutting down; the request was not executed";

/// The payload length of that answer (an error body: a `u32` code, then
/// the message), so a session can tell whether it fits before taking the
/// request it answers.
pub(crate) const SHUTDOWN_REPLY_LEN: usize = 4 + SHUTDOWN_MESSAGE.len();

/// What a request-direction frame is, by its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A new request: of one frame, or (`chunked`) the first chunk of a
    /// longer one.
    New { chunked: bool },
    /// A chunk that goes on with a request being received; `last` ends it.
    GoOn { last: bool },
    /// A new request that opens a stream.
    Open,
    /// A credit frame for a stream.
    Credit,
    /// A cancel of a stream, or of a request being received.
    Cancel,
}

impl Kind {
    /// Whether the frame is a new request, which the session takes (its
    /// id is then the last taken) and answers.
    pub(crate) fn is_new(self) -> bool {
        matches!(self, Kind::New { .. } | Kind::Open)
    }
}

/// Checks a request-direction frame's header against the session's rules,
/// given the last request id taken and, if the frame's id is a request
/// being received in chunks, that request's service. A new request (one
/// frame, a first chunk, an opening) carries an id above every earlier
/// one (so no reply can be matched to the wrong request); a chunk that
/// goes on names a request being received, with its service; credits and
/// cancels name an id already taken (naming a stream that has ended since
/// is no violation: its caller cannot know before it reads the end, so
/// those are ignored). No response flags, no unknown combinations, and
/// payloads of the length their kind has. Anything else breaks the
/// protocol.
pub(crate) fn check_request(header: &FrameHeader, last_id: u64, receiving: Option<u16>) -> Result<Kind, String> {
    let (id, flags, len) = (header.request_id, header.flags, header.len as usize);
    let new = || {
        if id <= last_id {
            return Err(format!("request id {id} is not above the previous {last_id}"));
        }
        Ok(())
    };
    let taken = || {
        if id == 0 || id > last_id {
            return Err(format!("frame {flags:#x} names request {id}, which was never sent (the last is {last_id})"));
        }
        Ok(())
    };
    match flags {
        0 | FLAG_MORE => match receiving {
            Some(service) if service != header.service => {
                Err(format!("a chunk of request {id} names service {} where its first named {service}", header.service))
            }
            Some(_) => Ok(Kind::GoOn { last: flags == 0 }),
            None => {
                new()?;
                if flags == FLAG_MORE && len < CHUNK_PREFIX {
                    return Err(MessageError::ShortPrefix { len }.to_string());
                }
                Ok(Kind::New { chunked: flags == FLAG_MORE })
            }
        },
        FLAG_STREAM => {
            new()?;
            if len < StreamOpen::LEN {
                return Err(MessageError::ShortOpen { len }.to_string());
            }
            Ok(Kind::Open)
        }
        FLAG_CREDIT => {
            taken()?;
            if len != 4 {
                return Err(MessageError::BadCredit { len }.to_string());
            }
            Ok(Kind::Credit)
        }
        FLAG_CANCEL => {
            taken()?;
            if len != 0 {
                return Err(format!("a cancel of request {id} carries {len} bytes"));
            }
            Ok(Kind::Cancel)
        }
        _ if flags & (FLAG_ERROR | FLAG_END | FLAG_PAD) != 0 => {
            Err(format!("request {id} carries response flags {flags:#x}"))
        }
        _ => Err(format!("request {id} carries flags {flags:#x}, which no request may")),
    }
}

/// A request's bytes: borrowed from the ring or the socket's buffer, or
/// assembled from chunks (owned, and charged against the memory budget).
pub(crate) enum Bytes<'a> {
    Slice(&'a [u8]),
    Owned(Vec<u8>, Option<Charge>),
}

impl Bytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Slice(s) => s,
            Bytes::Owned(v, _) => v,
        }
    }

    /// The bytes owned, copied if they were borrowed; the charge goes with
    /// them.
    fn into_owned(self) -> (Vec<u8>, Option<Charge>) {
        match self {
            Bytes::Slice(s) => (s.to_vec(), None),
            Bytes::Owned(v, charge) => (v, charge),
        }
    }
}

/// Runs one whole request of `session` (at `slot` in its worker) on any
/// transport. An inline handler's reply or any error body is left in
/// `reply`; a handler's error, panic or reply longer than the largest
/// message becomes an error reply for this request alone, as does a call
/// to a service the session was not granted, or one that streams. A
/// deferred, blocking or upload call is handed off with a responder. While
/// shutting down, no handler runs.
pub(crate) fn dispatch(
    with: &Serving<'_>,
    session: &SessionContext,
    slot: Slot,
    header: &FrameHeader,
    request: Bytes<'_>,
    reply: &mut Vec<u8>,
) -> Dispatched {
    reply.clear();
    let fail = |reply: &mut Vec<u8>, code, message: &str| {
        encode_error(code, message, reply);
        Dispatched::Replied(FLAG_ERROR)
    };
    if with.shutting_down {
        return fail(reply, ErrorCode::Shutdown, SHUTDOWN_MESSAGE);
    }
    session.calls.count();
    let (name, handler) = match with.services.resolve(session, header.service) {
        Ok(found) => found,
        Err((code, message)) => return fail(reply, code, &message),
    };
    // Read once here and once as the answer is ready (or, for a call
    // handed off, as its answer comes back): a vDSO clock read, no
    // system call.
    let started = Instant::now();
    let max_message = with.max_message;
    let counts = &with.counters.services;
    // A call answered here: counted, with its duration.
    let done = |error: bool| {
        counts.count(header.service, error);
        with.counters.durations.record(header.service, started.elapsed());
    };
    let handler = match handler {
        Handler::Inline(handler) => handler,
        Handler::Echo => {
            reply.extend_from_slice(request.as_slice());
            done(false);
            return Dispatched::Replied(0);
        }
        Handler::Blocking(handler) => {
            let handler = Arc::clone(handler);
            let (payload, charge) = request.into_owned();
            let request = OwnedRequest::from_parts(payload, charge, Arc::clone(name), session, header.request_id);
            let responder = with.completions.responder(slot, header, max_message);
            let (session, service) = (session.id, header.service);
            with.services.pool.submit(Box::new(move || {
                match catch_unwind(AssertUnwindSafe(|| handler(&request.as_request()))) {
                    Ok(Ok(body)) => responder.reply(body),
                    Ok(Err(e)) => responder.fail(e),
                    Err(_) => {
                        tracing::error!(session, service, "service handler panicked");
                        responder.fail_with(ErrorCode::HandlerPanicked, PANICKED);
                    }
                }
            }));
            counts.count(header.service, false);
            return Dispatched::Deferred(started);
        }
        Handler::Deferred(handler) | Handler::Cancellable { handler, .. } => {
            let (payload, charge) = request.into_owned();
            let request = OwnedRequest::from_parts(payload, charge, Arc::clone(name), session, header.request_id);
            let responder = with.completions.responder(slot, header, max_message);
            // A panic drops the responder as it unwinds, which answers
            // the call as panicked (unless the handler passed it on).
            if catch_unwind(AssertUnwindSafe(|| handler(request, responder))).is_err() {
                tracing::error!(session = session.id, service = header.service, "service handler panicked");
            }
            counts.count(header.service, false);
            return Dispatched::Deferred(started);
        }
        Handler::Upload(handler) => {
            // A request of one frame: an upload of one chunk.
            let bytes = request.as_slice();
            let call = Request::new(&[], name, session, header.request_id);
            let begun = start_upload(&**handler, &call, Some(bytes.len() as u64), header.service);
            let upload = begun.and_then(|mut upload| {
                upload_chunk(&mut *upload, bytes, session.id, header.service)?;
                Ok(upload)
            });
            match upload {
                Ok(upload) => {
                    finish_upload(upload, with.completions.responder(slot, header, max_message));
                    counts.count(header.service, false);
                    return Dispatched::Deferred(started);
                }
                Err(body) => {
                    *reply = body;
                    done(true);
                    return Dispatched::Replied(FLAG_ERROR);
                }
            }
        }
        Handler::Stream(_) => {
            let message = format!("service {} ({name}) is a stream service: open a stream", header.service);
            done(true);
            return fail(reply, ErrorCode::UnknownService, &message);
        }
    };
    let call = Request::new(request.as_slice(), name, session, header.request_id);
    let dispatched = match catch_unwind(AssertUnwindSafe(|| handler(&call, reply))) {
        Ok(Ok(())) if reply.len() as u64 <= max_message => Dispatched::Replied(0),
        Ok(Ok(())) => {
            let message = too_long("reply", reply.len() as u64, max_message);
            // The handler ran: not `MessageTooLarge`, which says the
            // request was refused unrun.
            fail(reply, ErrorCode::ReplyTooLarge, &message)
        }
        Ok(Err(e)) => {
            e.encode(reply);
            Dispatched::Replied(FLAG_ERROR)
        }
        Err(_) => {
            tracing::error!(session = session.id, service = header.service, "service handler panicked");
            fail(reply, ErrorCode::HandlerPanicked, PANICKED)
        }
    };
    done(dispatched == Dispatched::Replied(FLAG_ERROR));
    dispatched
}

/// Calls an upload service's handler for a request that begins: the
/// upload, or the error body that answers the call (its error, or its
/// panic).
pub(crate) fn start_upload(
    handler: &UploadFn,
    call: &Request<'_>,
    total: Option<u64>,
    service: u16,
) -> Result<Box<dyn Upload>, Vec<u8>> {
    let mut body = Vec::new();
    match catch_unwind(AssertUnwindSafe(|| handler(call, total))) {
        Ok(Ok(upload)) => return Ok(upload),
        Ok(Err(e)) => e.encode(&mut body),
        Err(_) => {
            tracing::error!(session = call.session(), service, "upload handler panicked");
            encode_error(ErrorCode::HandlerPanicked, PANICKED, &mut body);
        }
    }
    Err(body)
}

/// Hands an upload its next bytes: the error body that answers the call
/// if it fails or panics.
pub(crate) fn upload_chunk(upload: &mut dyn Upload, bytes: &[u8], session: u64, service: u16) -> Result<(), Vec<u8>> {
    let mut body = Vec::new();
    match catch_unwind(AssertUnwindSafe(|| upload.chunk(bytes))) {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e.encode(&mut body),
        Err(_) => {
            tracing::error!(session, service, "upload handler panicked");
            encode_error(ErrorCode::HandlerPanicked, PANICKED, &mut body);
        }
    }
    Err(body)
}

/// Gives a complete upload its responder. A panic drops the responder as
/// it unwinds, which answers the call as panicked.
pub(crate) fn finish_upload(upload: Box<dyn Upload>, responder: Responder) {
    if catch_unwind(AssertUnwindSafe(move || upload.finish(responder))).is_err() {
        tracing::error!("upload handler panicked as it finished");
    }
}

/// `echo`: the reply is the request; one longer than a frame is sent back
/// chunk by chunk as it comes, never held whole.
pub(crate) fn echo() -> Handler {
    Handler::Echo
}

/// `ping`: an empty reply.
pub(crate) fn ping() -> Handler {
    Handler::Inline(Arc::new(|_: &Request<'_>, _: &mut Vec<u8>| Ok(())))
}

/// `stream.count`: a stream of generated items, for tests and load. The
/// request is two little-endian `u32`s, `count` and `size`; the stream
/// carries `count` items of `size` bytes, item `i` beginning with `i` as a
/// little-endian `u64` (cut to `size`) and filled with `i as u8`, then
/// ends. Each item is made only when it can be sent (within the caller's
/// credit), so a stream of any length costs the server one item at a time.
pub(crate) fn stream_count() -> Handler {
    Handler::Stream(Arc::new(|request: OwnedRequest, mut items: crate::StreamSender| {
        let Some((count, size)) = parse_count(request.payload()) else {
            let len = request.payload().len();
            return items.fail(ServiceError::new(format!("stream.count takes two u32s (8 bytes), got {len} bytes")));
        };
        for i in 0..count {
            match items.send(count_item(i, size)) {
                Ok(()) => {}
                Err(e @ crate::SendError::TooLarge { .. }) => return items.fail(ServiceError::new(e.to_string())),
                // Cut: the terminal frame is the engine's.
                Err(_) => return,
            }
        }
        items.end();
    }))
}

/// The `count` and `size` of a `stream.count` request.
fn parse_count(payload: &[u8]) -> Option<(u32, u32)> {
    let bytes: &[u8; 8] = payload.try_into().ok()?;
    let (count, size) = bytes.split_at(4);
    Some((u32::from_le_bytes(count.try_into().ok()?), u32::from_le_bytes(size.try_into().ok()?)))
}

/// Item `i` of a `stream.count` stream of items of `size` bytes.
pub(crate) fn count_item(i: u32, size: u32) -> Vec<u8> {
    let mut item = vec![i as u8; size as usize];
    let head = u64::from(i).to_le_bytes();
    let n = head.len().min(item.len());
    item[..n].copy_from_slice(&head[..n]);
    item
}

/// `debug.sleep`: sleeps for the little-endian u32 of milliseconds in the
/// request (at most 10 s), then replies empty. Only registered with
/// `--debug-services`, for tests that need a call to stay in flight; it
/// runs inline, holding up its worker, as the tests of a busy worker need.
pub(crate) fn debug_sleep() -> Handler {
    Handler::Inline(Arc::new(|request: &Request<'_>, _: &mut Vec<u8>| {
        let request = request.payload();
        let ms: [u8; 4] = request
            .try_into()
            .map_err(|_| ServiceError::new(format!("debug.sleep takes a 4-byte u32, got {} bytes", request.len())))?;
        let ms = u32::from_le_bytes(ms).min(10_000);
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
        Ok(())
    }))
}

/// `debug.fail`: always returns an error naming the request length.
pub(crate) fn debug_fail() -> Handler {
    Handler::Inline(Arc::new(|request: &Request<'_>, _: &mut Vec<u8>| {
        Err(ServiceError::new(format!("debug.fail asked to fail ({} bytes)", request.payload().len())))
    }))
}

/// The builder methods that add services and size the handler threads, the
/// same on [`crate::ServerBuilder`] and [`crate::ProviderBuilder`]: each
/// builder has `services: Vec<(String, Handler)>` and `handler_threads:
/// usize` fields, and one engine serves what they collect.
macro_rules! service_methods {
    () => {
        /// Adds a service whose handler returns its reply, run on the worker
        /// thread that serves the session. The handler gets the call's
        /// [`Request`](crate::Request): its payload (a private copy), who called, on which
        /// session. While it runs, its worker serves no one else: a handler that
        /// may take long (or block) belongs in
        /// [`blocking_service`](Self::blocking_service).
        ///
        /// ```no_run
        /// use ipcd::{Server, ServiceError};
        ///
        /// let server = Server::builder()
        ///     .socket("/tmp/upper.sock")
        ///     .service("upper", |req| Ok(req.payload().to_ascii_uppercase()))
        ///     .service("mine", |req| match req.caller() {
        ///         Some(caller) if caller.uid == 1000 => Ok(b"yours".to_vec()),
        ///         _ => Err(ServiceError::with_code(403, "not yours")),
        ///     })
        ///     .build()?;
        /// # Ok::<(), ipcd::ServerError>(())
        /// ```
        pub fn service<F>(mut self, name: impl Into<String>, handler: F) -> Self
        where
            F: Fn(&$crate::Request<'_>) -> Result<Vec<u8>, $crate::ServiceError> + Send + Sync + 'static,
        {
            let handler = move |request: &$crate::Request<'_>, reply: &mut Vec<u8>| {
                *reply = handler(request)?;
                Ok(())
            };
            self.services.push((name.into(), $crate::service::Handler::Inline(std::sync::Arc::new(handler))));
            self
        }

        /// Adds a service whose handler writes its reply into a buffer the
        /// worker reuses (it arrives empty), run on the worker thread like
        /// [`service`](Self::service)'s: a call costs no allocation if the
        /// handler makes none.
        pub fn service_into<F>(mut self, name: impl Into<String>, handler: F) -> Self
        where
            F: Fn(&$crate::Request<'_>, &mut Vec<u8>) -> Result<(), $crate::ServiceError> + Send + Sync + 'static,
        {
            self.services.push((name.into(), $crate::service::Handler::Inline(std::sync::Arc::new(handler))));
            self
        }

        /// Adds a service whose handler runs on the handler threads (see
        /// [`handler_threads`](Self::handler_threads)), for handlers that take
        /// their time or block: while one runs, its worker goes on serving
        /// every session, this one's other calls included. Each call costs a
        /// copy of the request and a hand-off each way.
        ///
        /// A session has at most [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS)
        /// calls of blocking and deferred services unanswered; at that many, it
        /// takes no further request until one is answered. Replies may reach
        /// the client in another order than its requests (the client matches
        /// them by id).
        ///
        /// ```no_run
        /// use ipcd::{Server, ServiceError};
        ///
        /// let server = Server::builder()
        ///     .socket("/tmp/files.sock")
        ///     .blocking_service("file.read", |req| {
        ///         let path = std::str::from_utf8(req.payload()).map_err(|e| ServiceError::new(e.to_string()))?;
        ///         std::fs::read(path).map_err(|e| ServiceError::with_code(e.raw_os_error().unwrap_or(0) as u32, e.to_string()))
        ///     })
        ///     .handler_threads(4)
        ///     .build()?;
        /// # Ok::<(), ipcd::ServerError>(())
        /// ```
        pub fn blocking_service<F>(mut self, name: impl Into<String>, handler: F) -> Self
        where
            F: Fn(&$crate::Request<'_>) -> Result<Vec<u8>, $crate::ServiceError> + Send + Sync + 'static,
        {
            self.services.push((name.into(), $crate::service::Handler::Blocking(std::sync::Arc::new(handler))));
            self
        }

        /// Adds a service whose handler is given the call and a [`Responder`](crate::Responder),
        /// and answers through it when it likes, from any thread: it runs on the
        /// worker thread and should return at once (handing the work on). A
        /// responder dropped without an answer answers the call with an error,
        /// so every call gets exactly one outcome. The cap on calls unanswered
        /// per session of [`blocking_service`](Self::blocking_service) applies.
        pub fn deferred_service<F>(mut self, name: impl Into<String>, handler: F) -> Self
        where
            F: Fn($crate::OwnedRequest, $crate::Responder) + Send + Sync + 'static,
        {
            self.services.push((name.into(), $crate::service::Handler::Deferred(std::sync::Arc::new(handler))));
            self
        }

        /// Adds a service that takes its requests as they arrive, chunk by
        /// chunk, so that a request of any length (up to the largest message)
        /// need not be held whole. When a request begins, `start` is called on
        /// the worker with the call (its payload empty) and the length its
        /// sender announced (`None` for a sender that does not know it yet), and
        /// returns the [`Upload`](crate::Upload) that takes the bytes as they come
        /// and then answers through a [`Responder`](crate::Responder); an error
        /// answers the call at once. A request of one frame is an upload of one
        /// chunk. The cap on calls unanswered per session of
        /// [`blocking_service`](Self::blocking_service) applies from `finish`.
        ///
        /// ```no_run
        /// use ipcd::{Responder, Server, ServiceError, Upload};
        /// use std::io::Write;
        ///
        /// struct ToFile(std::fs::File);
        ///
        /// impl Upload for ToFile {
        ///     fn chunk(&mut self, bytes: &[u8]) -> Result<(), ServiceError> {
        ///         self.0.write_all(bytes).map_err(|e| ServiceError::with_code(5, e.to_string()))
        ///     }
        ///     fn finish(self: Box<Self>, responder: Responder) {
        ///         match self.0.sync_all() {
        ///             Ok(()) => responder.reply(Vec::new()),
        ///             Err(e) => responder.fail(ServiceError::with_code(5, e.to_string())),
        ///         }
        ///     }
        /// }
        ///
        /// let server = Server::builder()
        ///     .socket("/tmp/store.sock")
        ///     .upload_service("store", |req, _announced| {
        ///         let path = format!("/var/tmp/upload-{}-{}", req.session(), req.id());
        ///         std::fs::File::create(path).map(ToFile).map_err(|e| ServiceError::with_code(5, e.to_string()))
        ///     })
        ///     .build()?;
        /// # Ok::<(), ipcd::ServerError>(())
        /// ```
        pub fn upload_service<F, U>(mut self, name: impl Into<String>, start: F) -> Self
        where
            F: Fn(&$crate::Request<'_>, Option<u64>) -> Result<U, $crate::ServiceError> + Send + Sync + 'static,
            U: $crate::Upload + 'static,
        {
            let start = move |request: &$crate::Request<'_>, total: Option<u64>| {
                start(request, total).map(|upload| Box::new(upload) as Box<dyn $crate::Upload>)
            };
            self.services.push((name.into(), $crate::service::Handler::Upload(std::sync::Arc::new(start))));
            self
        }

        /// Adds a service that answers a request with a stream of items: the
        /// caller opens a stream, and the handler, on a thread of its own, sends
        /// items through the [`StreamSender`](crate::StreamSender) (each of any
        /// length up to the largest message), then ends the stream (or fails
        /// it). Sending waits for the caller's credit and for room in the
        /// stream's buffer, so a slow reader costs the daemon no more than that
        /// buffer; a stream cut by its caller's cancel, its deadline, the
        /// caller's hang-up or the server's stop fails the next send, and
        /// [`StreamSender::is_cancelled`](crate::StreamSender::is_cancelled) says
        /// so. A session has at most [`MAX_OPEN_STREAMS`](crate::MAX_OPEN_STREAMS)
        /// streams open; a plain call to a stream service is answered with an
        /// error.
        ///
        /// ```no_run
        /// use ipcd::{Server, ServiceError};
        ///
        /// let server = Server::builder()
        ///     .socket("/tmp/lines.sock")
        ///     .stream_service("lines", |request, mut lines| {
        ///         let Ok(text) = std::fs::read_to_string(String::from_utf8_lossy(request.payload()).as_ref()) else {
        ///             return lines.fail(ServiceError::with_code(2, "cannot read the file"));
        ///         };
        ///         for line in text.lines() {
        ///             if lines.send(line.as_bytes().to_vec()).is_err() {
        ///                 return; // cut: cancelled, timed out, stopping, or the caller is gone
        ///             }
        ///         }
        ///         lines.end();
        ///     })
        ///     .build()?;
        /// # Ok::<(), ipcd::ServerError>(())
        /// ```
        pub fn stream_service<F>(mut self, name: impl Into<String>, handler: F) -> Self
        where
            F: Fn($crate::OwnedRequest, $crate::StreamSender) + Send + Sync + 'static,
        {
            self.services.push((name.into(), $crate::service::Handler::Stream(std::sync::Arc::new(handler))));
            self
        }

        /// The number of threads the [`blocking_service`](Self::blocking_service)
        /// handlers run on (default [`DEFAULT_HANDLER_THREADS`](crate::DEFAULT_HANDLER_THREADS)),
        /// started only if there is such a service. Calls beyond them wait in
        /// a queue, each session's within its cap.
        pub fn handler_threads(mut self, n: usize) -> Self {
            self.handler_threads = n;
            self
        }

        #[cfg(feature = "tokio")]
        $crate::async_service::async_service_method!();
    };
}
pub(crate) use service_methods;
