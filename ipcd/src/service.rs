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

use ipc_core::{encode_error, ErrorCode, FrameHeader, FLAG_ERROR};

use crate::deferred::{Completions, Responder, Slot, PANICKED};
use crate::pool::Pool;
use crate::request::{OwnedRequest, Request, SessionContext};
use crate::stats::WorkerCounters;

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
}

/// The services of a server, by id, and the threads its blocking ones run
/// on. Ids are indices: the first service is 0.
pub(crate) struct ServiceTable {
    entries: Vec<(Arc<str>, Handler)>,
    pool: Pool,
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
        ServiceTable { entries: Vec::new(), pool: Pool::new(handler_threads) }
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

    /// Stops the handler threads (see [`Pool::stop`]).
    pub(crate) fn stop_pool(&self) {
        self.pool.stop();
    }
}

/// What a worker lends a session for one serve.
pub(crate) struct Serving<'w> {
    pub(crate) services: &'w ServiceTable,
    pub(crate) counters: &'w WorkerCounters,
    /// Where the answers of handed-off calls go.
    pub(crate) completions: &'w Completions,
    /// Requests are answered with a shutdown error, not executed.
    pub(crate) shutting_down: bool,
}

/// What became of a dispatched request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dispatched {
    /// Answered: the reply (or error body) is in the buffer, with these
    /// response flags.
    Replied(u16),
    /// Handed off: its responder will answer it.
    Deferred,
}

/// The message of the answer to a request taken while shutting down.
const SHUTDOWN_MESSAGE: &str = "daemon is shutting down; the request was not executed";

/// The payload length of that answer (an error body: a `u32` code, then
/// the message), so a session can tell whether it fits before taking the
/// request it answers.
pub(crate) const SHUTDOWN_REPLY_LEN: usize = 4 + SHUTDOWN_MESSAGE.len();

/// Checks a request's header against the session's rules: no response
/// flags, and ids strictly increasing (so a reply can never be matched to
/// the wrong request). Returns the new last id.
pub(crate) fn check_request(header: &FrameHeader, last_id: u64) -> Result<u64, String> {
    if header.flags != 0 {
        return Err(format!("request {} carries response flags {:#x}", header.request_id, header.flags));
    }
    if header.request_id <= last_id {
        return Err(format!("request id {} is not above the previous {last_id}", header.request_id));
    }
    Ok(header.request_id)
}

/// Runs one request of `session` (at `slot` in its worker) on any
/// transport. An inline handler's reply or any error body is left in
/// `reply`; a handler's error, panic or oversized reply becomes an error
/// reply for this request alone, as does a call to a service the session
/// was not granted. A deferred or blocking call is handed off with a
/// responder. While shutting down, no handler runs.
pub(crate) fn dispatch(
    with: &Serving<'_>,
    session: &SessionContext,
    slot: Slot,
    header: &FrameHeader,
    request: &[u8],
    reply: &mut Vec<u8>,
    max_payload: usize,
) -> Dispatched {
    reply.clear();
    if with.shutting_down {
        encode_error(ErrorCode::Shutdown, SHUTDOWN_MESSAGE, reply);
        return Dispatched::Replied(FLAG_ERROR);
    }
    session.calls.count();
    // Checked before the id is looked up, so a session learns nothing of
    // the services it was not granted.
    if !session.may_call(header.service) {
        let msg = format!("session {} may not call service {}", session.id, header.service);
        encode_error(ErrorCode::NotPermitted, &msg, reply);
        return Dispatched::Replied(FLAG_ERROR);
    }
    let Some((name, handler)) = with.services.get(header.service) else {
        encode_error(ErrorCode::UnknownService, &format!("no service has id {}", header.service), reply);
        return Dispatched::Replied(FLAG_ERROR);
    };
    let call = Request::new(request, name, session, header.request_id);
    let counts = &with.counters.services;
    let handler = match handler {
        Handler::Inline(handler) => handler,
        Handler::Blocking(handler) => {
            let (handler, request) = (Arc::clone(handler), OwnedRequest::new(&call, Arc::clone(name)));
            let responder = with.completions.responder(slot, header, max_payload);
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
            return Dispatched::Deferred;
        }
        Handler::Deferred(handler) => {
            let request = OwnedRequest::new(&call, Arc::clone(name));
            let responder = with.completions.responder(slot, header, max_payload);
            // A panic drops the responder as it unwinds, which answers
            // the call as panicked (unless the handler passed it on).
            if catch_unwind(AssertUnwindSafe(|| handler(request, responder))).is_err() {
                tracing::error!(session = session.id, service = header.service, "service handler panicked");
            }
            counts.count(header.service, false);
            return Dispatched::Deferred;
        }
    };
    let dispatched = match catch_unwind(AssertUnwindSafe(|| handler(&call, reply))) {
        Ok(Ok(())) if reply.len() <= max_payload => Dispatched::Replied(0),
        Ok(Ok(())) => {
            let msg = format!("reply of {} bytes exceeds the negotiated maximum {max_payload}", reply.len());
            encode_error(ErrorCode::ReplyTooLarge, &msg, reply);
            Dispatched::Replied(FLAG_ERROR)
        }
        Ok(Err(e)) => {
            e.encode(reply);
            Dispatched::Replied(FLAG_ERROR)
        }
        Err(_) => {
            tracing::error!(session = session.id, service = header.service, "service handler panicked");
            encode_error(ErrorCode::HandlerPanicked, PANICKED, reply);
            Dispatched::Replied(FLAG_ERROR)
        }
    };
    counts.count(header.service, dispatched == Dispatched::Replied(FLAG_ERROR));
    dispatched
}

/// `echo`: the reply is the request.
pub(crate) fn echo() -> Handler {
    Handler::Inline(Arc::new(|request: &Request<'_>, reply: &mut Vec<u8>| {
        reply.extend_from_slice(request.payload());
        Ok(())
    }))
}

/// `ping`: an empty reply.
pub(crate) fn ping() -> Handler {
    Handler::Inline(Arc::new(|_: &Request<'_>, _: &mut Vec<u8>| Ok(())))
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

        /// The number of threads the [`blocking_service`](Self::blocking_service)
        /// handlers run on (default [`DEFAULT_HANDLER_THREADS`](crate::DEFAULT_HANDLER_THREADS)),
        /// started only if there is such a service. Calls beyond them wait in
        /// a queue, each session's within its cap.
        pub fn handler_threads(mut self, n: usize) -> Self {
            self.handler_threads = n;
            self
        }
    };
}
pub(crate) use service_methods;
