//! Typed errors for connecting and calling.
//!
//! Each message says what failed and names the values involved; a cause
//! that is an error of its own (an `io::Error`) is not repeated in the
//! message but returned by [`std::error::Error::source`], so that a chain
//! printer (`anyhow`'s `{:#}`, for one) shows it once.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use ipc_core::Reject;

/// Why [`crate::Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing listens at the path (no socket file, or a stale one).
    #[error("ipcd is not running at {}", path.display())]
    NotRunning {
        /// The socket path tried.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The daemon speaks another protocol version.
    #[error("protocol version mismatch: daemon speaks {daemon}, client speaks {client}")]
    VersionMismatch {
        /// The daemon's version.
        daemon: u32,
        /// This library's version.
        client: u32,
    },
    /// The daemon refused the client.
    #[error("rejected by the daemon: {0}")]
    Rejected(Reject),
    /// Connecting took longer than the connect timeout: the listener
    /// accepted no connection in time (a stopped daemon with a full
    /// backlog), or the daemon did not answer the hello in time.
    #[error("no answer from the daemon within {after:?}")]
    Timeout {
        /// How long the client waited.
        after: Duration,
    },
    /// The client does not trust what listens at the path: the socket is in
    /// the fallback directory `/tmp/ipcd-<uid>` and that directory is not
    /// the user's own or is writable by others, or the daemon runs as
    /// another user than the client's and not as root. Nothing was sent.
    #[error("refusing to trust {}: {reason}", path.display())]
    Untrusted {
        /// The socket path.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// The daemon closed the connection before it answered the hello: it
    /// stopped or was killed as the client connected (a restart), or cut
    /// the connection without a reason. Worth trying again, unlike
    /// [`ConnectError::Protocol`].
    #[error("the daemon closed the connection during the handshake")]
    Closed,
    /// The daemon's answer broke the protocol (bad welcome, wrong fds,
    /// unsealed or mis-sized segment).
    #[error("handshake protocol error: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error("a system call failed while connecting")]
    Io(#[from] io::Error),
}

/// Why a call failed. Every call ends in exactly one outcome: its reply or
/// one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No reply within the timeout. The request may still run; its late
    /// reply is discarded.
    #[error("no reply within {after:?}")]
    Timeout {
        /// The timeout that passed.
        after: Duration,
    },
    /// The request's peer (the daemon, or the provider of a brokered
    /// service) is gone or broke the protocol, and with it the link the
    /// request went out on. Whether the request ran is unknown.
    #[error("disconnected: {reason}")]
    Disconnected {
        /// What happened.
        reason: String,
    },
    /// The link to the request's peer is lost: it was lost earlier, or
    /// while the request waited for room, and not re-established (see
    /// [`crate::Reconnect`]). The request was not sent.
    #[error("not connected (request not sent): {reason}")]
    NotConnected {
        /// Why: the loss, or the last reconnection attempt's failure.
        reason: String,
    },
    /// Neither the daemon nor any provider offers the service (within the
    /// wait asked for).
    #[error("unknown service {name:?}")]
    UnknownService {
        /// The name (or id) asked for.
        name: String,
    },
    /// The request is longer than the client sends: for a request written
    /// in place ([`crate::Client::call_with`], [`crate::Client::send_with`],
    /// [`crate::Client::try_send`]) or a stream's opening, longer than one
    /// frame's payload; for any other, longer than
    /// [`ClientOptions::max_message`](crate::ClientOptions::max_message).
    /// Nothing was sent.
    #[error("request of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// The request's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The service returned an error, or the daemon answered the request
    /// with one (its handler panicked, its reply was too large, the
    /// session may not call it, ...).
    #[error("service error{}: {message}", code.map_or_else(String::new, |c| format!(" {c}")))]
    Remote {
        /// The handler's own code, when it gave one
        /// (`ipcd::ServiceError::with_code`).
        code: Option<u32>,
        /// Its message.
        message: String,
    },
    /// A reply (or a stream's item) longer than
    /// [`ClientOptions::max_message`](crate::ClientOptions::max_message):
    /// refused as its first chunk said so (or, for one of unknown length,
    /// as it passed the maximum), and the rest of it dropped as it comes.
    /// The request ran.
    #[error("reply of {} exceeds the maximum {max}", len.map_or_else(|| "unknown length".to_string(), |n| format!("{n} bytes")))]
    ReplyTooLarge {
        /// The length its first chunk announced, if it did.
        len: Option<u64>,
        /// The client's maximum.
        max: u64,
    },
    /// The peer refused the request as longer than it takes; it was not
    /// executed.
    #[error("the peer refused the request as too large: {message}")]
    MessageTooLarge {
        /// What the peer said.
        message: String,
    },
    /// The peer has its maximum of streams open, or of messages being
    /// assembled, for this client; the request was not executed.
    #[error("the peer is busy with too many streams or messages: {message}")]
    TooMany {
        /// What the peer said.
        message: String,
    },
    /// The client has [`ClientOptions::max_streams`](crate::ClientOptions::max_streams)
    /// streams open: the stream was not opened. A stream stays open until
    /// its terminal outcome was handed out (or its handle dropped) and its
    /// peer ended it.
    #[error("{max} streams are open already; the stream was not opened")]
    TooManyStreams {
        /// The client's maximum.
        max: usize,
    },
    /// The stream was cancelled ([`crate::Stream::cancel`]): items that
    /// come after are dropped.
    #[error("the stream was cancelled")]
    Cancelled,
    /// The daemon is shutting down; the request was not executed (it said
    /// so, or the request was never sent to it).
    #[error("ipcd is shutting down; the request was not executed")]
    Shutdown,
    /// [`crate::Client::try_send`] found no room for the request now.
    #[error("no room for another request now ({in_flight} in flight)")]
    Full {
        /// Requests in flight at the time.
        in_flight: usize,
    },
    /// A call or [`crate::Client::send`] found no room for the request
    /// within its timeout: the daemon took none of the requests ahead of
    /// it. The request was not sent and will not run (unlike
    /// [`CallError::Timeout`], after which it may).
    #[error("no room for the request within {after:?} ({in_flight} in flight); it was not sent")]
    SendTimeout {
        /// The timeout that passed.
        after: Duration,
        /// Requests in flight at the time.
        in_flight: usize,
    },
    /// An upload ([`crate::Client::upload`]) finished after writing
    /// other than the length it announced; it was cancelled, not sent.
    #[error("upload announced {announced} bytes and was given {written}; it was not sent")]
    UploadLength {
        /// The length announced.
        announced: u64,
        /// The bytes written.
        written: u64,
    },
    /// [`crate::Client::recv`] was called with no request in flight.
    #[error("no request is in flight")]
    NothingInFlight,
    /// The poll-style API ([`crate::Client::arm`]) was asked to wait on a
    /// shared-memory link whose doorbell is a futex word, which no poll
    /// loop can watch: connect with
    /// [`DoorbellKind::Pollable`](crate::DoorbellKind).
    #[error("the link's doorbell is a futex word, which no poll loop can watch (use DoorbellKind::Pollable)")]
    NotPollable,
    /// The ticket has no request in flight: its outcome was already handed
    /// out (or it timed out).
    #[error("request {id} is not in flight (its outcome was already handed out)")]
    UnknownTicket {
        /// The ticket's request id.
        id: u64,
    },
    /// The ticket was made by another client: each client matches only
    /// its own requests' outcomes.
    #[error("the ticket of request {id} belongs to another client")]
    ForeignTicket {
        /// The ticket's request id.
        id: u64,
    },
    /// The service was resolved by another client: a [`crate::Service`]
    /// names a link of the client that resolved it.
    #[error("service {name:?} was resolved by another client")]
    ForeignService {
        /// The service's name.
        name: String,
    },
    /// The name is not one of the daemon's own services, and names that
    /// providers offer cannot be reached over this transport: a brokered
    /// session hands over a shared-memory segment and its fds, which only
    /// the daemon's control socket carries ([`crate::Transport::Shm`]).
    #[error(
        "{name:?} is not a service of the daemon itself, and services of providers cannot be reached over \
         {transport}: they need the shared-memory transport"
    )]
    NoBroker {
        /// The name asked for.
        name: String,
        /// The client's transport (`uds` or `tcp`).
        transport: &'static str,
    },
    /// The name breaks the naming rules (see
    /// [`check_name`](ipc_core::control::check_name)).
    #[error("bad service name {name:?}: {reason}")]
    BadName {
        /// The name asked for.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The daemon's rules do not let this client call the name.
    #[error("not permitted to call {name:?}: {reason}")]
    NotPermitted {
        /// The name asked for.
        name: String,
        /// Who was refused what, as the daemon says.
        reason: String,
    },
    /// No session with a provider of the name now: the provider declined,
    /// did not answer, or went away; a limit of the daemon's refused it;
    /// or the daemon is stopping, restarting or out of reach. Trying again
    /// later may succeed ([`crate::Client::wait_for_service`] does).
    #[error("{name:?} is unavailable: {reason}")]
    Unavailable {
        /// The name asked for.
        name: String,
        /// What happened.
        reason: String,
    },
    /// The daemon's answer to a resolve broke the protocol: a message that
    /// does not decode, wrong or missing fds, a segment unsealed or of the
    /// wrong size, a doorbell not asked for, a session without the name.
    /// Nothing of it is kept.
    #[error("the answer to resolving {name:?} broke the protocol: {reason}")]
    BadResolution {
        /// The name asked for.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A typed request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(String),
    /// A typed reply could not be decoded.
    #[error("cannot decode the reply: {0}")]
    Decode(String),
}

/// `e` and its causes, joined as `anyhow`'s `{:#}` joins them: for
/// messages that carry an error as text.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// Every message of a chain, outermost first, as a chain printer
    /// (`anyhow`'s `{:#}`) walks it.
    fn chain(e: &(dyn Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(e), |&e| e.source()).map(ToString::to_string).collect()
    }

    #[test]
    fn io_causes_are_sources_and_told_once() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let cause = refused().to_string();

        let err = ConnectError::NotRunning { path: "/run/x/ipcd.sock".into(), source: refused() };
        let messages = chain(&err);
        assert_eq!(messages, ["ipcd is not running at /run/x/ipcd.sock".to_string(), cause.clone()]);

        let err = ConnectError::from(refused());
        let messages = chain(&err);
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(messages[1], cause);
        assert!(!messages[0].contains(&cause), "the cause is repeated: {messages:?}");
        assert_eq!(with_causes(&err), format!("a system call failed while connecting: {cause}"));
    }

    #[test]
    fn a_remote_error_names_its_code_when_it_has_one() {
        let with = CallError::Remote { code: Some(404), message: "no such key".into() };
        assert_eq!(with.to_string(), "service error 404: no such key");
        let without = CallError::Remote { code: None, message: "no such key".into() };
        assert_eq!(without.to_string(), "service error: no such key");
    }

    #[test]
    fn errors_without_a_cause_end_the_chain() {
        assert!(ConnectError::Timeout { after: Duration::from_secs(1) }.source().is_none());
        assert!(CallError::Shutdown.source().is_none());
        assert_eq!(
            CallError::TooLarge { len: 70000, max: 65536 }.to_string(),
            "request of 70000 bytes exceeds the maximum 65536"
        );
        assert_eq!(
            CallError::ReplyTooLarge { len: Some(9), max: 8 }.to_string(),
            "reply of 9 bytes exceeds the maximum 8"
        );
        assert_eq!(
            CallError::ReplyTooLarge { len: None, max: 8 }.to_string(),
            "reply of unknown length exceeds the maximum 8"
        );
    }
}
