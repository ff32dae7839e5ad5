//! ipcd: a daemon that serves request/response calls over sealed
//! shared-memory rings, and the library to embed it with your own services.
//!
//! A client connects to the control socket and sends a hello; the daemon
//! creates a sealed memfd holding a request ring and a response ring, plus
//! an eventfd doorbell, and passes them over the socket. From then on calls
//! travel through shared memory; the control connection only signals that
//! the client is gone.
//!
//! Key types: [`Server`] (built by [`ServerBuilder`]), [`ShutdownHandle`];
//! for handlers, [`Request`] (the call: its payload, its [`Caller`], its
//! session and service), [`ServiceError`] (with an optional code the
//! caller can match), and for calls answered later [`OwnedRequest`] and
//! [`Responder`].
//!
//! A handler runs on the worker thread ([`ServerBuilder::service`],
//! [`ServerBuilder::service_into`]: quick handlers, no hand-off, no
//! allocation per call), on the handler threads
//! ([`ServerBuilder::blocking_service`]: handlers that take their time,
//! and hold up no one else meanwhile), or hands its call on with a
//! responder that answers it later from any thread
//! ([`ServerBuilder::deferred_service`]).
//!
//! The builder also sets who may connect ([`ServerBuilder::allow_uid`],
//! [`ServerBuilder::allow_gid`]: checked against the credentials the kernel
//! reports for each connection), what clients may take
//! ([`ServerBuilder::max_shm`], the memory all sessions are charged;
//! [`ServerBuilder::max_sessions_per_uid`]) and how long a client may leave
//! its replies unread before its session is closed
//! ([`ServerBuilder::stall_timeout`]).
//!
//! A server binds its sockets, or takes sockets that already listen
//! ([`ServerBuilder::control_listener`], [`ServerBuilder::uds_listener`],
//! [`ServerBuilder::tcp_listener`]: a service manager's, say), whose files
//! it then leaves alone. [`Server::run_with_ready`] says when it serves,
//! with its [`Health`]: whether every loop still turns, for a watchdog.
//!
//! ```no_run
//! use ipcd::{Server, ServiceError};
//!
//! let server = Server::builder()
//!     .socket("/tmp/my-ipcd.sock")
//!     .workers(2)
//!     .service("reverse", |req| {
//!         let mut v = req.payload().to_vec();
//!         v.reverse();
//!         Ok::<_, ServiceError>(v)
//!     })
//!     .service("mine", |req| match req.caller() {
//!         Some(caller) if caller.uid == 1000 => Ok(b"yours".to_vec()),
//!         _ => Err(ServiceError::with_code(403, "not yours")),
//!     })
//!     .blocking_service("file.read", |req| {
//!         let path = std::str::from_utf8(req.payload()).map_err(|e| ServiceError::new(e.to_string()))?;
//!         std::fs::read(path).map_err(|e| ServiceError::with_code(2, e.to_string()))
//!     })
//!     .deferred_service("later", |request, responder| {
//!         std::thread::spawn(move || responder.reply(request.into_payload()));
//!     })
//!     .build()?;
//! server.run()?; // until shutdown_handle().shutdown()
//! # Ok::<(), ipcd::ServerError>(())
//! ```

#![forbid(unsafe_code)]

mod acceptor;
mod access;
#[cfg(feature = "tokio")]
mod async_service;
mod broker;
mod control_conn;
mod cooldown;
mod deferred;
mod durations;
mod engine;
mod exchange;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod inbox;
pub mod introspect;
mod limits;
#[cfg(feature = "metrics")]
mod metrics;
mod opener;
mod outbox;
mod pending;
mod policy;
mod pool;
mod provider;
mod registry;
mod request;
mod roster;
mod segment;
mod segment_pool;
mod server;
mod service;
mod session;
mod settings;
mod shared;
mod stats;
mod stream_session;
mod streaming;
#[cfg(test)]
mod test_rig;
mod upload;
mod views;
mod worker;

pub use deferred::{Responder, MAX_OUTSTANDING_CALLS};
pub use health::{Health, Stuck};
#[cfg(feature = "metrics")]
pub use metrics::{MetricsError, MetricsServer};
pub use policy::{AccessRule, Allowed};
pub use pool::DEFAULT_HANDLER_THREADS;
pub use provider::{Provider, ProviderBuilder, ProviderError};
pub use request::{Caller, OwnedRequest, Request};
pub use server::{
    Server, ServerBuilder, ServerError, ShutdownHandle, DEFAULT_MAX_MESSAGE, DEFAULT_MAX_PENDING_HANDSHAKES,
    DEFAULT_MAX_SESSIONS_PER_UID, DEFAULT_SEGMENT_POOL, DEFAULT_SPIN, DEFAULT_STALL_TIMEOUT, FALLBACK_MAX_SHM,
};
pub use service::ServiceError;
pub use settings::{ReloadHandle, Settings};
pub use streaming::{SendError, StreamSender, TrySendError, MAX_OPEN_STREAMS, STREAM_BUFFER};
pub use upload::Upload;
