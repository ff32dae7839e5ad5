//! The broker connection, and the sessions it hands out.
//!
//! A name that is not in the daemon's welcome is resolved through a second
//! connection to the daemon's control socket, opened with a hello whose
//! role is [`Role::Broker`] on the first such resolve and kept for later
//! ones. Each [`Resolve`] is answered by a [`Resolution`]: a session
//! brokered with a provider of the name, whose fds come with the answer
//! (memfd, eventfd, the client's end of the liveness socket pair, and with
//! a pollable doorbell the client's end of the bell), or why there is
//! none.
//!
//! The segment is checked as the daemon's own is (seals, size, header),
//! and becomes a shared-memory link whose control connection is the
//! liveness socket: its hang-up means the provider is gone. From then on
//! the session needs nothing of the daemon's: the broker connection may
//! be lost (a daemon restart) and the link goes on; the next resolve
//! opens a new connection.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipc_core::control::{Brokered, Resolution, Resolve, ResolveError, Role};
use ipc_core::handshake;
use ipc_core::{Hello, Reject, ServerMessage, PROTOCOL_VERSION};

use crate::connect::{self, Budget, Handover, ReadError};
use crate::error::{with_causes, CallError, ConnectError};
use crate::options::{ClientOptions, Transport};
use crate::shm::{Peer, ShmLink};
use crate::stream::Socket;

/// An open broker connection.
pub(crate) struct Broker {
    stream: UnixStream,
}

/// Why an exchange on the broker connection gave no answer.
pub(crate) enum Exchange {
    /// The connection is unusable (the daemon closed it, or it failed).
    Lost(String),
    /// No answer within the limit.
    Timeout,
    /// The answer broke the protocol.
    Protocol(String),
}

impl Broker {
    /// Opens a broker connection to the daemon at `path`: connect (with the
    /// same trust checks as a session), hello, acceptance, all within the
    /// connect timeout. `None` if the daemon has no broker: one that
    /// predates brokering answers the hello as a session's (it reads no
    /// role), and such a daemon brokers no names. Its session is closed
    /// at once.
    pub(crate) fn open(path: &Path, options: &ClientOptions) -> Result<Option<Broker>, ConnectError> {
        let budget = Budget::start(options.connect_timeout);
        let transport = Transport::Shm(path.to_path_buf());
        let (socket, message, fds) = connect::say_hello(&transport, &Hello::for_role(Role::Broker), &budget)?;
        let protocol = |m: String| ConnectError::Protocol(m);
        match message {
            // Dropping the connection and the fds ends that session.
            ServerMessage::Welcome(_) => return Ok(None),
            _ if !fds.is_empty() => {
                return Err(protocol(format!("the daemon accepted a broker connection with {} fds", fds.len())))
            }
            ServerMessage::Accepted { version, .. } if version == PROTOCOL_VERSION => {}
            ServerMessage::Accepted { version, .. } => {
                return Err(ConnectError::VersionMismatch { daemon: version, client: PROTOCOL_VERSION })
            }
            ServerMessage::Reject(Reject::VersionMismatch { daemon, client }) => {
                return Err(ConnectError::VersionMismatch { daemon, client })
            }
            ServerMessage::Reject(r) => return Err(ConnectError::Rejected(r)),
        }
        let Socket::Unix(stream) = socket else {
            return Err(protocol("a broker connection is a Unix socket".into()));
        };
        Ok(Some(Broker { stream }))
    }

    /// Whether the daemon has closed the connection (seen without waiting).
    pub(crate) fn is_closed(&self) -> bool {
        ipc_platform::peer_closed(self.stream.as_fd()).unwrap_or(true)
    }

    /// Sends `resolve` and reads the answer, with its fds, within `limit`.
    pub(crate) fn exchange(
        &mut self,
        resolve: &Resolve,
        limit: Duration,
    ) -> Result<(Resolution, Vec<OwnedFd>), Exchange> {
        let budget = Budget::start(limit);
        let bytes = handshake::encode(resolve).map_err(|e| Exchange::Protocol(e.to_string()))?;
        self.stream.set_write_timeout(Some(budget.limit.max(Duration::from_millis(1)))).map_err(lost)?;
        std::io::Write::write_all(&mut &self.stream, &bytes).map_err(lost)?;
        let (body, fds) = connect::read_message(self.stream.as_fd(), &budget).map_err(|e| match e {
            ReadError::Timeout => Exchange::Timeout,
            ReadError::Protocol(m) => Exchange::Protocol(m),
            e @ (ReadError::Closed | ReadError::Io(_)) => Exchange::Lost(e.to_string()),
        })?;
        let resolution =
            handshake::decode(&body).map_err(|e| Exchange::Protocol(format!("undecodable answer: {e}")))?;
        Ok((resolution, fds))
    }
}

fn lost(e: std::io::Error) -> Exchange {
    Exchange::Lost(format!("send failed: {e}"))
}

/// The request for a session with a provider of `name`, asking the daemon
/// to wait up to `wait` for one to register.
pub(crate) fn request(name: &str, wait: Duration, options: &ClientOptions) -> Resolve {
    Resolve {
        name: name.to_string(),
        ring_capacity: options.ring_capacity,
        doorbell: options.doorbell,
        wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
    }
}

/// Why a brokered session was not taken.
#[derive(Debug)]
pub(crate) enum Untaken {
    /// The answer or its fds break the protocol: why.
    Broken(String),
    /// The provider hung up its end of the session already (it died, or
    /// stopped, as the session was handed over): worth resolving again.
    ProviderGone,
}

impl From<String> for Untaken {
    fn from(reason: String) -> Untaken {
        Untaken::Broken(reason)
    }
}

/// The link of a session brokered for `name`, checked: as many fds as the
/// answer says, the doorbell asked for, a layout that matches its largest
/// payload, the name among its services, the segment and liveness end as
/// [`connect::receive_segment`] checks them, and a provider still at the
/// other end.
pub(crate) fn session(
    name: &str,
    brokered: &Brokered,
    fds: Vec<OwnedFd>,
    options: &ClientOptions,
) -> Result<ShmLink, Untaken> {
    if fds.len() != brokered.fd_count() {
        return Err(format!("the session comes with {} fds, expected {}", fds.len(), brokered.fd_count()).into());
    }
    if brokered.doorbell != options.doorbell {
        return Err(format!("asked for a {:?} doorbell, got {:?}", options.doorbell, brokered.doorbell).into());
    }
    if !brokered.services.iter().any(|s| s.name == name) {
        return Err(format!("the session does not offer {name:?}").into());
    }
    let layout = connect::granted_layout(brokered.ring_capacity, brokered.max_payload)?;
    let mut segment = connect::receive_segment(&layout, brokered.doorbell, Handover::Brokered, fds)?;
    let liveness = segment.liveness.take().expect("a brokered hand-over has a liveness end");
    if ipc_platform::peer_closed(liveness.as_fd()).unwrap_or(true) {
        return Err(Untaken::ProviderGone);
    }
    Ok(connect::shm_link(liveness, segment, &layout, Peer::Provider))
}

/// The error a failed resolve of `name` gives.
pub(crate) fn refused(name: &str, error: ResolveError) -> CallError {
    let name = name.to_string();
    match error {
        ResolveError::UnknownService { .. } => CallError::UnknownService { name },
        ResolveError::BadName { reason, .. } => CallError::BadName { name, reason },
        ResolveError::NotPermitted { reason } => CallError::NotPermitted { name, reason },
        ResolveError::Unavailable { reason } => CallError::Unavailable { name, reason },
        e @ (ResolveError::LimitReached { .. } | ResolveError::ShuttingDown) => {
            CallError::Unavailable { name, reason: e.to_string() }
        }
    }
}

/// The error of a resolve of `name` whose broker connection could not be
/// opened.
pub(crate) fn unreachable(name: &str, error: ConnectError) -> CallError {
    let name = name.to_string();
    let reason = format!("cannot open the broker connection: {}", with_causes(&error));
    match error {
        ConnectError::Rejected(Reject::NotPermitted { reason }) => CallError::NotPermitted { name, reason },
        ConnectError::VersionMismatch { .. } | ConnectError::Protocol(_) | ConnectError::Untrusted { .. } => {
            CallError::BadResolution { name, reason }
        }
        _ => CallError::Unavailable { name, reason },
    }
}

#[cfg(test)]
mod tests;
