//! The client library for ipcd.
//!
//! Connect, resolve a service by name once, then call it: request bytes go
//! through a shared-memory ring to the daemon and the reply comes back
//! through another, with a doorbell only when the other side sleeps. A
//! name the daemon does not serve itself is resolved through its broker,
//! which hands the client a session of its own with the name's provider:
//! calls then go straight to the provider, over the same rings.
//!
//! Key types: [`Client`] (one link to the daemon, one per brokered
//! session), [`Service`] and [`Ticket`] (each bound to its client and
//! link), [`ClientOptions`], and the typed errors [`ConnectError`] and
//! [`CallError`]. Messages longer than a frame travel as chunks
//! transparently, up to [`ClientOptions::max_message`]; [`ReplyReader`]
//! reads a long reply as it comes, [`Upload`] writes a request as it is
//! produced, and [`Stream`] takes the many replies of a stream
//! ([`StreamOptions`]). With the `raw` feature, `raw` opens
//! sessions by hand for programs that play a hostile client (tests, stress).
//!
//! ```no_run
//! use ipc_client::Client;
//!
//! let mut client = Client::connect()?; // $IPCD_SOCKET, $XDG_RUNTIME_DIR/ipcd.sock, ...
//! let echo = client.service("echo")?;
//! let reply = client.call(&echo, b"hello")?;
//! assert_eq!(reply, b"hello");
//!
//! // Reuse a buffer: no allocation per call once it is large enough.
//! let mut buf = Vec::new();
//! client.call_into(&echo, b"again", &mut buf)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The async client's one unsafe step, registering an fd with tokio, is
// `ipc_platform::async_fd`'s.
#![forbid(unsafe_code)]

#[cfg(feature = "tokio")]
mod async_client;
#[cfg(feature = "tokio")]
mod async_stream;
mod backoff;
mod broker;
mod calls;
mod client;
mod connect;
mod error;
mod guard;
mod link;
mod liveness;
mod options;
#[cfg(feature = "raw")]
pub mod raw;
#[cfg(test)]
mod scripted;
mod shm;
mod stream;
mod trust;
mod wait;

#[cfg(feature = "tokio")]
pub use async_client::{AsyncClient, AsyncUpload, RecvFuture, RecvIntoFuture, SendFuture, WaitFuture, WaitIntoFuture};
#[cfg(feature = "tokio")]
pub use async_stream::AsyncStream;
pub use calls::Ticket;
pub use client::{Armed, Client, FdToken, Received, ReplyReader, Service, Stream, Upload, WaitFd};
pub use error::{CallError, ConnectError};
pub use guard::ReplyGuard;
pub use ipc_core::{Credentials, DoorbellKind, Reject};
pub use link::RequestBuf;
pub use liveness::watch_liveness;
pub use options::{ClientOptions, Reconnect, StreamOptions, Transport, DEFAULT_MAX_MESSAGE, DEFAULT_SPIN};
