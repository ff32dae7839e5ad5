//! Typed errors for connecting and calling.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use ipc_core::Reject;

/// Why [`crate::Client::connect`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing listens at the path (no socket file, or a stale one).
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The daemon speaks another protocol version.
    VersionMismatch {
        /// The daemon's version.
        daemon: u32,
        /// This library's version.
        client: u32,
    },
    /// The daemon refused the client.
    Rejected(Reject),
    /// The daemon did not answer the hello in time.
    Timeout {
        /// How long the client waited.
        after: Duration,
    },
    /// The daemon's answer broke the protocol (bad welcome, wrong fds,
    /// unsealed or mis-sized segment).
    Protocol(String),
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::NotRunning { path, source } => {
                write!(f, "ipcd is not running at {} ({source})", path.display())
            }
            ConnectError::VersionMismatch { daemon, client } => {
                write!(f, "protocol version mismatch: daemon speaks {daemon}, client speaks {client}")
            }
            ConnectError::Rejected(r) => write!(f, "rejected by the daemon: {r}"),
            ConnectError::Timeout { after } => {
                write!(f, "no answer from the daemon within {after:?}")
            }
            ConnectError::Protocol(m) => write!(f, "handshake protocol error: {m}"),
            ConnectError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The messages already include their cause, so `source()` is `None`:
/// printing the chain would repeat it.
impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> ConnectError {
        ConnectError::Io(e)
    }
}

/// Why a call failed. Every call ends in exactly one outcome: its reply or
/// one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// No reply within the timeout. The request may still run; its late
    /// reply is discarded.
    Timeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// The daemon is gone or broke the protocol; the client cannot be used
    /// any more. Whether the request ran is unknown.
    Disconnected {
        /// What happened.
        reason: String,
    },
    /// The client has no connection: it was lost earlier and not
    /// re-established (see [`crate::Reconnect`]). The request was not sent.
    NotConnected {
        /// Why: the loss, or the last reconnection attempt's failure.
        reason: String,
    },
    /// The daemon offers no such service.
    UnknownService {
        /// The name (or id) asked for.
        name: String,
    },
    /// The request is larger than the negotiated maximum payload.
    TooLarge {
        /// The request's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The service returned an error.
    Remote {
        /// Its message.
        message: String,
    },
    /// The daemon is shutting down; the request was not executed.
    Shutdown,
    /// [`crate::Client::try_send`] found no room for the request now.
    Full {
        /// Requests in flight at the time.
        in_flight: usize,
    },
    /// [`crate::Client::recv`] was called with no request in flight.
    NothingInFlight,
    /// The ticket has no request in flight: its outcome was already handed
    /// out (or it timed out).
    UnknownTicket {
        /// The ticket's request id.
        id: u64,
    },
    /// A typed request could not be encoded.
    Encode(String),
    /// A typed reply could not be decoded.
    Decode(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Timeout { after } => write!(f, "no reply within {after:?}"),
            CallError::Disconnected { reason } => write!(f, "disconnected from ipcd: {reason}"),
            CallError::NotConnected { reason } => write!(f, "not connected to ipcd (request not sent): {reason}"),
            CallError::UnknownService { name } => write!(f, "unknown service {name:?}"),
            CallError::TooLarge { len, max } => {
                write!(f, "request of {len} bytes exceeds the negotiated maximum {max}")
            }
            CallError::Remote { message } => write!(f, "service error: {message}"),
            CallError::Shutdown => f.write_str("ipcd is shutting down; the request was not executed"),
            CallError::Full { in_flight } => {
                write!(f, "no room for another request now ({in_flight} in flight)")
            }
            CallError::NothingInFlight => f.write_str("no request is in flight"),
            CallError::UnknownTicket { id } => {
                write!(f, "request {id} is not in flight (its outcome was already handed out)")
            }
            CallError::Encode(m) => write!(f, "cannot encode the request: {m}"),
            CallError::Decode(m) => write!(f, "cannot decode the reply: {m}"),
        }
    }
}

impl std::error::Error for CallError {}
