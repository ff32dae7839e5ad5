//! Messages exchanged on the control socket, and their framing.
//!
//! Every message is a little-endian `u32` length followed by that many bytes
//! of bincode 2 (fixed-width integers, little-endian), at most
//! [`MAX_CONTROL_MESSAGE`] bytes.
//!
//! The client speaks first with a [`Hello`]. Its first eight bytes, the
//! magic and the protocol version, are fixed for all versions, so a daemon
//! can name a client's version even when it cannot decode the rest. The
//! daemon answers with a [`ServerMessage`]: a [`Welcome`] that carries the
//! session's file descriptors by `SCM_RIGHTS` (see [`Welcome::fd_count`]), or
//! a [`Reject`] that says why. After that a session's connection carries
//! nothing; it stays open for the session's life and its hang-up ends the
//! session. A hello may instead open a broker or a provider connection
//! ([`Role`]): the daemon answers [`ServerMessage::Accepted`], and the
//! connection then carries the messages of [`crate::control`].

use serde::{Deserialize, Serialize};

use crate::control::Role;
use crate::error::HandshakeError;

/// `b"IPCD"` read as a little-endian u32; starts every hello.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"IPCD");
/// The protocol version this build speaks. Version 2 added the hello's
/// role, `Accepted`, and the broker and provider messages.
pub const PROTOCOL_VERSION: u32 = 2;
/// The largest control message body accepted, in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// Bytes of the length prefix before each control message.
pub const LENGTH_PREFIX: usize = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_fixed_int_encoding().with_limit::<MAX_CONTROL_MESSAGE>()
}

/// How the daemon wakes a client that sleeps waiting for a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DoorbellKind {
    /// A futex word in the shared segment (the default: one syscall per
    /// wake, no extra fd).
    Futex,
    /// A socket the client can put in its own poll loop: readable when the
    /// daemon rings. (Not an eventfd: an eventfd would share its open file,
    /// and so its `O_NONBLOCK` flag, with the client, which could then make
    /// the daemon's writes block.)
    Pollable,
}

/// The client's opening message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`HELLO_MAGIC`].
    pub magic: u32,
    /// The client's protocol version.
    pub version: u32,
    /// Bytes per ring the client would like; the daemon rounds and clamps.
    pub ring_capacity: u32,
    /// How the client wants to be woken.
    pub doorbell: DoorbellKind,
    /// What the connection is for.
    pub role: Role,
}

impl Hello {
    /// A session's hello of this build's version.
    pub fn new(ring_capacity: u32, doorbell: DoorbellKind) -> Hello {
        Hello { magic: HELLO_MAGIC, version: PROTOCOL_VERSION, ring_capacity, doorbell, role: Role::Session }
    }

    /// The hello of a broker or provider connection (the ring fields are
    /// unused there).
    pub fn for_role(role: Role) -> Hello {
        Hello { role, ..Hello::new(0, DoorbellKind::Futex) }
    }
}

/// A service the daemon offers, and the id calls use for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The name clients resolve.
    pub name: String,
    /// The id that goes in frame headers.
    pub id: u16,
}

/// The daemon's acceptance, sent with the session's fds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The daemon's protocol version.
    pub version: u32,
    /// A daemon-unique id for the session (appears in its logs).
    pub session_id: u64,
    /// Bytes per ring granted.
    pub ring_capacity: u32,
    /// The largest payload a frame may carry, either way.
    pub max_payload: u32,
    /// The doorbell granted for daemon-to-client wake-ups.
    pub doorbell: DoorbellKind,
    /// The services offered.
    pub services: Vec<ServiceEntry>,
}

impl Welcome {
    /// The fds that travel with this welcome, in order: the segment memfd,
    /// the client-to-daemon eventfd, and with [`DoorbellKind::Pollable`] the
    /// client's end of the daemon-to-client doorbell socket.
    pub fn fd_count(&self) -> usize {
        match self.doorbell {
            DoorbellKind::Futex => 2,
            DoorbellKind::Pollable => 3,
        }
    }
}

/// Why the daemon refused a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reject {
    /// The client speaks another protocol version.
    VersionMismatch {
        /// The daemon's version.
        daemon: u32,
        /// The client's version.
        client: u32,
    },
    /// The daemon already serves its maximum number of clients.
    TooManyClients {
        /// The configured maximum.
        max: u32,
    },
    /// The client is not allowed to connect.
    NotPermitted {
        /// Why.
        reason: String,
    },
    /// The hello could not be understood.
    BadHello {
        /// Why.
        reason: String,
    },
    /// The daemon could not create the session's resources.
    ResourceExhausted {
        /// What failed.
        reason: String,
    },
    /// The daemon is shutting down.
    ShuttingDown,
    /// The session would take the daemon's memory for sessions past its
    /// budget (`--max-shm`).
    OverMemoryBudget {
        /// What this session would be charged, in bytes.
        needed: u64,
        /// What the sessions already open are charged, in bytes.
        in_use: u64,
        /// The budget, in bytes.
        budget: u64,
    },
    /// The client's uid already has the most sessions one uid may have
    /// (`--max-sessions-per-uid`).
    TooManySessionsForUid {
        /// The client's uid.
        uid: u32,
        /// The configured maximum per uid.
        max: u32,
    },
    /// The daemon already holds its maximum of unfinished handshakes
    /// (`--max-pending-handshakes`).
    TooManyPendingHandshakes {
        /// The configured maximum.
        max: u32,
    },
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::VersionMismatch { daemon, client } => {
                write!(f, "protocol version mismatch: daemon speaks {daemon}, client speaks {client}")
            }
            Reject::TooManyClients { max } => write!(f, "too many clients (maximum {max})"),
            Reject::NotPermitted { reason } => write!(f, "not permitted: {reason}"),
            Reject::BadHello { reason } => write!(f, "bad hello: {reason}"),
            Reject::ResourceExhausted { reason } => write!(f, "daemon out of resources: {reason}"),
            Reject::ShuttingDown => f.write_str("daemon is shutting down"),
            Reject::OverMemoryBudget { needed, in_use, budget } => write!(
                f,
                "a session of {needed} bytes would exceed the daemon's memory budget for sessions \
                 ({in_use} of {budget} bytes in use)"
            ),
            Reject::TooManySessionsForUid { uid, max } => {
                write!(f, "uid {uid} already has {max} sessions, the most one uid may have")
            }
            Reject::TooManyPendingHandshakes { max } => {
                write!(f, "too many unfinished handshakes (maximum {max})")
            }
        }
    }
}

/// The daemon's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// A session accepted; the fds come with this message.
    Welcome(Welcome),
    /// Refused.
    Reject(Reject),
    /// A broker or provider connection accepted (no fds).
    Accepted {
        /// The daemon's protocol version.
        version: u32,
        /// The daemon's id for the connection (in its logs).
        connection_id: u64,
    },
}

/// Encodes `msg` with its length prefix.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, HandshakeError> {
    let body =
        bincode::serde::encode_to_vec(msg, config()).map_err(|e| HandshakeError::Encode { reason: e.to_string() })?;
    if body.len() > MAX_CONTROL_MESSAGE {
        return Err(HandshakeError::TooLong { len: body.len(), max: MAX_CONTROL_MESSAGE });
    }
    let mut out = Vec::with_capacity(LENGTH_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the body length from a length prefix, refusing oversized bodies.
pub fn body_len(prefix: [u8; LENGTH_PREFIX]) -> Result<usize, HandshakeError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(HandshakeError::TooLong { len, max: MAX_CONTROL_MESSAGE });
    }
    Ok(len)
}

/// Decodes a control message body (without its prefix); every byte must
/// belong to it.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, HandshakeError> {
    decode_exact(body)
}

fn decode_exact<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, HandshakeError> {
    let (value, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| HandshakeError::Decode { reason: e.to_string() })?;
    if used != body.len() {
        return Err(HandshakeError::TrailingBytes { extra: body.len() - used });
    }
    Ok(value)
}

/// Decodes a hello body (without its prefix), checking the magic and the
/// version before anything else.
pub fn decode_hello(body: &[u8]) -> Result<Hello, HandshakeError> {
    if body.len() < 8 {
        return Err(HandshakeError::Decode { reason: format!("hello of {} bytes is too short", body.len()) });
    }
    let magic = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    if magic != HELLO_MAGIC {
        return Err(HandshakeError::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: version });
    }
    decode_exact(body)
}

/// Decodes a daemon answer body (without its prefix).
pub fn decode_server_message(body: &[u8]) -> Result<ServerMessage, HandshakeError> {
    decode_exact(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(framed: &[u8]) -> &[u8] {
        let len = body_len(framed[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, framed.len() - 4);
        &framed[4..]
    }

    #[test]
    fn hello_round_trips() {
        let hello = Hello::new(65536, DoorbellKind::Pollable);
        let framed = encode(&hello).unwrap();
        assert_eq!(decode_hello(body(&framed)).unwrap(), hello);
    }

    #[test]
    fn hello_prefix_is_fixed() {
        let framed = encode(&Hello::new(1, DoorbellKind::Futex)).unwrap();
        assert_eq!(&framed[4..8], b"IPCD");
        assert_eq!(&framed[8..12], &PROTOCOL_VERSION.to_le_bytes());
    }

    #[test]
    fn other_versions_are_named() {
        let mut hello = Hello::new(1, DoorbellKind::Futex);
        hello.version = 7;
        let framed = encode(&hello).unwrap();
        assert_eq!(
            decode_hello(body(&framed)),
            Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: 7 })
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(decode_hello(b"GET / HTTP/1.1\r\n"), Err(HandshakeError::BadMagic { .. })));
        assert!(decode_hello(b"IPC").is_err());
        let mut framed = encode(&Hello::new(1, DoorbellKind::Futex)).unwrap();
        framed.push(0);
        assert!(matches!(decode_hello(&framed[4..]), Err(HandshakeError::TrailingBytes { extra: 1 })));
        let mut bad_kind = encode(&Hello::new(1, DoorbellKind::Futex)).unwrap();
        let last = bad_kind.len() - 1;
        bad_kind[last] = 9;
        assert!(decode_hello(&bad_kind[4..]).is_err());
        assert!(decode_server_message(&[0xff; 3]).is_err());
        assert!(matches!(body_len(u32::MAX.to_le_bytes()), Err(HandshakeError::TooLong { .. })));
    }

    #[test]
    fn server_messages_round_trip() {
        let welcome = ServerMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: 42,
            ring_capacity: 65536,
            max_payload: 32752,
            doorbell: DoorbellKind::Futex,
            services: vec![ServiceEntry { name: "echo".into(), id: 1 }],
        });
        let reject = ServerMessage::Reject(Reject::VersionMismatch { daemon: 1, client: 2 });
        let limits = [
            Reject::OverMemoryBudget { needed: 3, in_use: 2, budget: 4 },
            Reject::TooManySessionsForUid { uid: 1000, max: 8 },
            Reject::TooManyPendingHandshakes { max: 9 },
        ];
        for msg in [welcome, reject].into_iter().chain(limits.map(ServerMessage::Reject)) {
            let framed = encode(&msg).unwrap();
            assert_eq!(decode_server_message(body(&framed)).unwrap(), msg);
        }
    }

    /// The variants added for the daemon's limits come after the others, so
    /// the encodings of the earlier ones did not change: a client built
    /// before them still reads every older answer.
    #[test]
    fn earlier_rejects_keep_their_encodings() {
        let framed = encode(&ServerMessage::Reject(Reject::ShuttingDown)).unwrap();
        // ServerMessage variant 1 (Reject), Reject variant 5 (ShuttingDown).
        assert_eq!(body(&framed), [1, 0, 0, 0, 5, 0, 0, 0]);
        let framed = encode(&ServerMessage::Reject(Reject::TooManyClients { max: 7 })).unwrap();
        assert_eq!(body(&framed), [1, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0]);
        let framed = encode(&ServerMessage::Reject(Reject::TooManyPendingHandshakes { max: 7 })).unwrap();
        assert_eq!(body(&framed), [1, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0]);
    }
}
