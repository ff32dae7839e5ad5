//! How a client reaches the daemon and how it behaves: [`Transport`],
//! [`ClientOptions`], [`Reconnect`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipc_core::{DoorbellKind, SegmentLayout};

#[cfg(doc)]
use crate::{CallError, Client, ConnectError, Service};

/// The default spin limit, chosen by measuring one and 100 clients on a
/// 2-core machine (the README's spin table, with its command): long enough
/// to cover a peer that answers without sleeping, short enough that failed
/// spins cost little.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// How a client reaches the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// Shared-memory rings, set up over the daemon's control socket at this
    /// path.
    Shm(PathBuf),
    /// Frames over a Unix stream socket at this path (the daemon's `--uds`).
    Uds(PathBuf),
    /// Frames over TCP to this address (the daemon's `--tcp`).
    Tcp(SocketAddr),
}

impl Transport {
    /// Its short name: `shm`, `uds` or `tcp`.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Shm(_) => "shm",
            Transport::Uds(_) => "uds",
            Transport::Tcp(_) => "tcp",
        }
    }
}

impl From<PathBuf> for Transport {
    fn from(path: PathBuf) -> Transport {
        Transport::Shm(path)
    }
}

impl From<&Path> for Transport {
    fn from(path: &Path) -> Transport {
        Transport::Shm(path.to_path_buf())
    }
}

impl From<&PathBuf> for Transport {
    fn from(path: &PathBuf) -> Transport {
        Transport::Shm(path.clone())
    }
}

impl From<&str> for Transport {
    fn from(path: &str) -> Transport {
        Transport::Shm(PathBuf::from(path))
    }
}

impl From<SocketAddr> for Transport {
    fn from(addr: SocketAddr) -> Transport {
        Transport::Tcp(addr)
    }
}

/// Settings for a connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Bytes per ring to ask for, of the daemon and of each provider (each
    /// rounds up to a power of two and caps it); the largest payload is
    /// about half of it. Stream transports
    /// use it to agree on the same largest payload. Default 64 KiB.
    pub ring_capacity: u32,
    /// How the daemon, and each provider, should wake this client.
    /// Default: a futex in shared memory; [`DoorbellKind::Pollable`] gives an fd for your own poll loop.
    pub doorbell: DoorbellKind,
    /// Timeout of [`Client::call`], [`Client::send`], [`Client::wait`] and
    /// friends. Default 30 s.
    pub call_timeout: Duration,
    /// How long connecting may take in all: the connect itself (a daemon
    /// that has stopped accepting leaves it waiting), sending the hello and
    /// the daemon's answer. Past it, [`ConnectError::Timeout`]. The same
    /// bound holds for opening the broker connection, and for the daemon's
    /// answer to a resolve beyond the wait the resolve asks for. Default
    /// 5 s.
    pub connect_timeout: Duration,
    /// The longest a wait for a reply spins on the ring before sleeping
    /// (shared memory only). Spinning adapts: a wait spins only while no
    /// runnable thread is waiting for a core, and spinning stops while spins
    /// keep failing. Default [`DEFAULT_SPIN`] when more than one core is
    /// available, else zero (never spin).
    pub spin: Duration,
    /// Whether and how to re-establish a lost link. Default `None`: once a
    /// link is lost, every later request on it fails with
    /// [`CallError::NotConnected`] (or [`CallError::Shutdown`]).
    pub reconnect: Option<Reconnect>,
    /// The longest message the client sends or takes, in bytes: a request
    /// (or upload) longer is [`CallError::TooLarge`] and not sent, a reply
    /// (or stream item) longer is [`CallError::ReplyTooLarge`]. Messages
    /// longer than one frame travel as chunks. Default [`DEFAULT_MAX_MESSAGE`]
    /// (1 GiB).
    pub max_message: u64,
    /// The most streams the client has open at once, over all its links
    /// ([`Client::stream`]); past it, [`CallError::TooManyStreams`].
    /// Default 64.
    pub max_streams: usize,
}

/// The default [`ClientOptions::max_message`]: 1 GiB.
pub const DEFAULT_MAX_MESSAGE: u64 = 1 << 30;

/// How a client re-establishes a lost connection.
///
/// With a policy set, a request started after its link was lost first
/// re-establishes it, retrying with a delay that starts at `first_delay`
/// and doubles up to `max_delay` (each pause drawn at random from the upper
/// half of its delay, so clients that lost one daemon together come back
/// spread out), for at most the request's own timeout:
/// the daemon link by connecting again (same transport, same options), a
/// brokered link (its provider went away) by resolving the called
/// service's name again, which reaches a restarted provider, or another of
/// a pool. If no attempt succeeds in time, or the peer refuses for good
/// (another protocol version, not permitted), the request fails with
/// [`CallError::NotConnected`] and was not sent.
///
/// Requests in flight when a link was lost are never sent again: each
/// ends with [`CallError::Disconnected`] (the outcome is unknown) or
/// [`CallError::Shutdown`] (the peer closed on purpose and never took
/// it). The peer reached again must offer the same services under the
/// same ids, since resolved [`Service`]s keep their ids; if not,
/// re-establishing fails, and the daemon's services need a new client
/// (a provided name can be resolved again with [`Client::service`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// The wait after the first failed attempt. Default 1 ms.
    pub first_delay: Duration,
    /// The longest wait between attempts. Default 20 ms: a restarted daemon
    /// is found within that of being ready.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect { first_delay: Duration::from_millis(1), max_delay: Duration::from_millis(20) }
    }
}

impl Reconnect {
    /// A policy with these delays (`max_delay` is raised to `first_delay`
    /// if lower).
    pub fn new(first_delay: Duration, max_delay: Duration) -> Reconnect {
        Reconnect { first_delay, max_delay: max_delay.max(first_delay) }
    }
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        // Read once per process: a connect pays no system call for it.
        let cores = ipc_platform::usable_cores();
        ClientOptions {
            ring_capacity: ipc_core::DEFAULT_RING_CAPACITY,
            doorbell: DoorbellKind::Futex,
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            spin: if cores > 1 { DEFAULT_SPIN } else { Duration::ZERO },
            reconnect: None,
            max_message: DEFAULT_MAX_MESSAGE,
            max_streams: 64,
        }
    }
}

impl ClientOptions {
    /// Sets [`ClientOptions::ring_capacity`].
    pub fn ring_capacity(mut self, bytes: u32) -> Self {
        self.ring_capacity = bytes;
        self
    }

    /// Raises [`ClientOptions::ring_capacity`] so that payloads of `bytes`
    /// fit (the largest payload is about half a ring).
    pub fn fit_payload(mut self, bytes: usize) -> Self {
        self.ring_capacity = self.ring_capacity.max(SegmentLayout::capacity_for_payload(bytes));
        self
    }

    /// Sets [`ClientOptions::doorbell`].
    pub fn doorbell(mut self, kind: DoorbellKind) -> Self {
        self.doorbell = kind;
        self
    }

    /// Sets [`ClientOptions::call_timeout`].
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    /// Sets [`ClientOptions::connect_timeout`].
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Sets [`ClientOptions::spin`] (zero: never spin).
    pub fn spin(mut self, limit: Duration) -> Self {
        self.spin = limit;
        self
    }

    /// Sets [`ClientOptions::reconnect`].
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = Some(policy);
        self
    }

    /// Sets [`ClientOptions::max_message`].
    pub fn max_message(mut self, bytes: u64) -> Self {
        self.max_message = bytes;
        self
    }

    /// Sets [`ClientOptions::max_streams`].
    pub fn max_streams(mut self, n: usize) -> Self {
        self.max_streams = n;
        self
    }
}

/// How a stream is opened ([`Client::stream_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamOptions {
    /// Items the server may send before the caller takes any: the credit
    /// granted at the opening, topped up as items are taken so that never
    /// more than this many are queued in the client or on their way (at
    /// least 1). Default 16.
    pub window: u32,
    /// How long the stream may last from its opening (sent to the server,
    /// and kept by the client: a stream never waits past it). Default
    /// none: each wait for an item is bounded by the call timeout instead.
    pub deadline: Option<Duration>,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions { window: 16, deadline: None }
    }
}

impl StreamOptions {
    /// Sets [`StreamOptions::window`] (raised to 1 if 0).
    pub fn window(mut self, items: u32) -> Self {
        self.window = items.max(1);
        self
    }

    /// Sets [`StreamOptions::deadline`].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}
