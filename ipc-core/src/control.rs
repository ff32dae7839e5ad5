//! What travels on the control connections that outlive the handshake: a
//! client's broker connection, on which it resolves names that providers
//! offer, and a provider's connection, on which it registers names and
//! takes the sessions the daemon brokers to it.
//!
//! Each connection starts with a [`Hello`](crate::Hello) whose
//! [`Role`] says which it is; the daemon answers
//! [`ServerMessage::Accepted`](crate::ServerMessage::Accepted) (or a
//! reject), and from then on both sides send the messages below, framed as
//! the handshake is (a `u32` length, then bincode), at most
//! [`MAX_CONTROL_MESSAGE`](crate::handshake::MAX_CONTROL_MESSAGE) bytes
//! each. A brokered session's file descriptors travel with
//! [`Resolution::Brokered`] (to the caller) and [`DaemonMessage::Incoming`]
//! (to the provider) by `SCM_RIGHTS`, in the order their `fd_count`
//! documents.
//!
//! ```text
//! caller                    daemon                      provider
//!   | Resolve{name}  ------>  |                             |
//!   |                         |  ---- Incoming{caller} + fds |
//!   |                         |  <--------- Accept{session}  |
//!   | <-- Brokered + fds      |   (the daemon closes its fds) |
//!   | ================ rings, doorbells, liveness =========== |
//! ```
//!
//! Names (see [`check_name`]) are dot-separated words of ASCII letters,
//! digits, `_` and `-`, at most [`MAX_NAME`] bytes.

use serde::{Deserialize, Serialize};

use crate::handshake::{DoorbellKind, ServiceEntry};

/// The longest service name, in bytes.
pub const MAX_NAME: usize = 255;
/// The longest word between two dots of a name, in bytes.
pub const MAX_NAME_WORD: usize = 63;

/// What a connection is for, as its hello says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A session with the daemon itself: rings (or frames on a stream)
    /// and the services the daemon serves.
    Session,
    /// A client's connection for resolving names that providers offer:
    /// it carries [`Resolve`] requests and their [`Resolution`]s.
    Broker,
    /// A provider: it registers names and takes brokered sessions.
    Provider,
}

/// The credentials the kernel recorded for a peer's connection
/// (`SO_PEERCRED`), as the daemon passes them on. The pid is 0 for a peer
/// in a pid namespace the daemon cannot see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Credentials {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl std::fmt::Display for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// A client asks for a session with the provider of `name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolve {
    /// The name to resolve.
    pub name: String,
    /// Bytes per ring the client would like (rounded and capped).
    pub ring_capacity: u32,
    /// How the provider should wake the client.
    pub doorbell: DoorbellKind,
    /// How long the daemon may wait for a provider of the name to register
    /// before answering `UnknownService`, in milliseconds (0: answer now).
    pub wait_ms: u32,
}

/// The daemon's answer to a [`Resolve`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// A session with a provider; its fds come with this message.
    Brokered(Brokered),
    /// No session.
    Failed(ResolveError),
}

/// A session the daemon brokered between a client and a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Brokered {
    /// The daemon's id for the session (in its logs and the provider's).
    pub session_id: u64,
    /// Who provides it.
    pub provider: Credentials,
    /// Bytes per ring granted.
    pub ring_capacity: u32,
    /// The largest payload either way.
    pub max_payload: u32,
    /// The doorbell granted for provider-to-client wake-ups.
    pub doorbell: DoorbellKind,
    /// The provider's services this client may call on the session, with
    /// the ids calls carry (the name resolved among them).
    pub services: Vec<ServiceEntry>,
}

/// The fds that come with a brokered session, either side: the segment
/// memfd, the client-to-provider eventfd, this side's end of the liveness
/// socket pair (it hangs up when the other side's process ends), and with
/// [`DoorbellKind::Pollable`] this side's end of the provider-to-client
/// doorbell socket pair.
pub fn brokered_fd_count(doorbell: DoorbellKind) -> usize {
    match doorbell {
        DoorbellKind::Futex => 3,
        DoorbellKind::Pollable => 4,
    }
}

impl Brokered {
    /// The fds that come with it (see [`brokered_fd_count`]).
    pub fn fd_count(&self) -> usize {
        brokered_fd_count(self.doorbell)
    }
}

/// Why a [`Resolve`] gave no session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResolveError {
    /// Nobody provides the name (within the wait asked for).
    UnknownService {
        /// The name.
        name: String,
    },
    /// The name breaks the naming rules.
    BadName {
        /// The name.
        name: String,
        /// Which rule.
        reason: String,
    },
    /// The daemon's rules do not let this client call the name.
    NotPermitted {
        /// Who was refused what.
        reason: String,
    },
    /// A provider holds the name but did not take the session (it declined,
    /// did not answer in time, or went away meanwhile).
    Unavailable {
        /// What happened.
        reason: String,
    },
    /// A limit of the daemon's refused the session.
    LimitReached {
        /// Which limit, with its numbers.
        reason: String,
    },
    /// The daemon is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::UnknownService { name } => write!(f, "no provider offers {name:?}"),
            ResolveError::BadName { name, reason } => write!(f, "bad service name {name:?}: {reason}"),
            ResolveError::NotPermitted { reason } => write!(f, "not permitted: {reason}"),
            ResolveError::Unavailable { reason } => write!(f, "provider unavailable: {reason}"),
            ResolveError::LimitReached { reason } => write!(f, "limit reached: {reason}"),
            ResolveError::ShuttingDown => f.write_str("daemon is shutting down"),
        }
    }
}

/// What a provider sends the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderMessage {
    /// Offers names; sent once, first. The daemon answers
    /// [`DaemonMessage::Registered`] or [`DaemonMessage::Refused`].
    Register(Register),
    /// Takes the session of an [`Incoming`]: the daemon hands the client
    /// its side.
    Accept {
        /// The session.
        session_id: u64,
    },
    /// Refuses the session of an [`Incoming`].
    Decline {
        /// The session.
        session_id: u64,
        /// Why (passed on to the client).
        reason: String,
    },
    /// A session this connection received has ended.
    Closed {
        /// The session.
        session_id: u64,
    },
    /// The client of a session broke the protocol; the provider dropped the
    /// session. The daemon holds that client's next resolves as it holds
    /// the handshakes of clients that broke its own sessions.
    Strike {
        /// The session.
        session_id: u64,
        /// What the client did.
        reason: String,
    },
    /// A session brokered by an earlier daemon (one counted in
    /// [`Register::sessions`]) has ended: the daemon counts one session
    /// fewer for this provider.
    EarlierClosed,
}

/// A provider's names and how it serves them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The names, with the ids calls on its sessions carry.
    pub services: Vec<ServiceEntry>,
    /// Whether other providers may hold the same names (each new session
    /// then goes to the provider with the fewest); else each name is its
    /// alone while it lives.
    pub pooled: bool,
    /// The largest ring it accepts, in bytes.
    pub max_ring_capacity: u32,
    /// Sessions it serves already, brokered by an earlier daemon (after a
    /// restart): counted when the daemon chooses among pooled providers.
    pub sessions: u32,
}

/// What the daemon sends a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonMessage {
    /// The names are the provider's.
    Registered {
        /// The daemon's id for the provider (in its logs and `stats`).
        provider_id: u64,
    },
    /// The names were refused; the daemon closes the connection.
    Refused(RegisterError),
    /// A client's session; its fds come with this message. The provider
    /// answers [`ProviderMessage::Accept`] or [`ProviderMessage::Decline`].
    Incoming(Incoming),
}

/// A session the daemon brokers to a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The daemon's id for the session.
    pub session_id: u64,
    /// The client, as the kernel reported it to the daemon.
    pub caller: Credentials,
    /// Bytes per ring.
    pub ring_capacity: u32,
    /// The largest payload either way.
    pub max_payload: u32,
    /// How to wake the client.
    pub doorbell: DoorbellKind,
    /// The ids of the services the client may call on this session: a call
    /// to any other is refused.
    pub granted: Vec<u16>,
}

impl Incoming {
    /// The fds that come with it (see [`brokered_fd_count`]).
    pub fn fd_count(&self) -> usize {
        brokered_fd_count(self.doorbell)
    }
}

/// Why a provider's names were refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegisterError {
    /// A live provider holds the name exclusively (or holds it pooled
    /// while this one asked for it alone, or the other way round).
    Taken {
        /// The name.
        name: String,
        /// The holder.
        holder: Credentials,
    },
    /// The daemon serves the name itself.
    Reserved {
        /// The name.
        name: String,
    },
    /// The name breaks the naming rules.
    BadName {
        /// The name.
        name: String,
        /// Which rule.
        reason: String,
    },
    /// The daemon's rules do not let this process provide the name.
    NotPermitted {
        /// Who was refused what.
        reason: String,
    },
    /// The registration itself is malformed (no names, repeated names or
    /// ids, a second `Register`).
    Malformed {
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegisterError::Taken { name, holder } => write!(f, "{name:?} is held by {holder}"),
            RegisterError::Reserved { name } => write!(f, "{name:?} is a name the daemon serves itself"),
            RegisterError::BadName { name, reason } => write!(f, "bad service name {name:?}: {reason}"),
            RegisterError::NotPermitted { reason } => write!(f, "not permitted: {reason}"),
            RegisterError::Malformed { reason } => write!(f, "malformed registration: {reason}"),
        }
    }
}

/// Checks `name` against the naming rules: dot-separated words, each 1 to
/// [`MAX_NAME_WORD`] bytes of ASCII letters, digits, `_` and `-`, starting
/// with a letter or digit; at most [`MAX_NAME`] bytes in all.
///
/// ```
/// use ipc_core::control::check_name;
/// assert!(check_name("search.query").is_ok());
/// assert!(check_name("search..query").is_err());
/// assert!(check_name("Search.v2-beta_1").is_ok());
/// assert!(check_name("search query").is_err());
/// ```
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a name is 1 to {MAX_NAME} bytes, not {}", name.len()));
    }
    for word in name.split('.') {
        if word.is_empty() || word.len() > MAX_NAME_WORD {
            return Err(format!("each dot-separated word is 1 to {MAX_NAME_WORD} bytes"));
        }
        if !word.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(format!("the word {word:?} does not start with a letter or digit"));
        }
        if let Some(c) = word.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
            return Err(format!("{c:?} is not a letter, digit, '_' or '-'"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{decode, encode};

    #[test]
    fn names_follow_the_rules() {
        for good in ["echo", "search.query", "a", "x-1.y_2.Z3", &"w".repeat(MAX_NAME_WORD)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        let long = ["abc"; 65].join(".");
        for bad in ["", ".", "a.", ".a", "a..b", "-a", "_a", "a b", "a/b", "é", &"w".repeat(64), &long] {
            assert!(check_name(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn messages_round_trip() {
        let caller = Credentials { pid: 7, uid: 1000, gid: 100 };
        let services = vec![ServiceEntry { name: "search.query".into(), id: 0 }];
        let framed = encode(&Resolve {
            name: "search.query".into(),
            ring_capacity: 65536,
            doorbell: DoorbellKind::Futex,
            wait_ms: 0,
        })
        .unwrap();
        let resolve: Resolve = decode(&framed[4..]).unwrap();
        assert_eq!(resolve.name, "search.query");
        for msg in [
            Resolution::Brokered(Brokered {
                session_id: 9,
                provider: caller,
                ring_capacity: 4096,
                max_payload: 2032,
                doorbell: DoorbellKind::Pollable,
                services: services.clone(),
            }),
            Resolution::Failed(ResolveError::UnknownService { name: "x".into() }),
        ] {
            assert_eq!(decode::<Resolution>(&encode(&msg).unwrap()[4..]).unwrap(), msg);
        }
        for msg in [
            ProviderMessage::Register(Register { services, pooled: true, max_ring_capacity: 1 << 20, sessions: 3 }),
            ProviderMessage::Accept { session_id: 4 },
            ProviderMessage::EarlierClosed,
            ProviderMessage::Strike { session_id: 4, reason: "bad index".into() },
        ] {
            assert_eq!(decode::<ProviderMessage>(&encode(&msg).unwrap()[4..]).unwrap(), msg);
        }
        let incoming = DaemonMessage::Incoming(Incoming {
            session_id: 4,
            caller,
            ring_capacity: 4096,
            max_payload: 2032,
            doorbell: DoorbellKind::Futex,
            granted: vec![0, 2],
        });
        assert_eq!(decode::<DaemonMessage>(&encode(&incoming).unwrap()[4..]).unwrap(), incoming);
        assert!(decode::<DaemonMessage>(&[0xff; 5]).is_err());
    }
}
