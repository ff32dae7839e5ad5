//! What the daemon's (or an embedded server's) threads share beyond the
//! engine: its validated configuration, the strikes against peers, and the
//! limits on what sessions may cost. Below `server`, `acceptor` and
//! `worker` alike, so that none of them imports another for it.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::AllowList;
use crate::cooldown::Cooldown;
use crate::engine::{Engine, SessionEvents};
use crate::limits::Limits;
use crate::stats::Stats;
use crate::stream_session::Peer;

/// A validated server configuration (the engine's part is in [`Engine`]).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) socket: PathBuf,
    pub(crate) socket_mode: u32,
    pub(crate) max_clients: usize,
    pub(crate) handshake_timeout: Duration,
    /// The most handshakes pending at once.
    pub(crate) max_pending_handshakes: usize,
    pub(crate) max_ring_capacity: u32,
    pub(crate) uds: Option<PathBuf>,
    /// Who may connect to the Unix listeners.
    pub(crate) allow: AllowList,
}

/// What every thread of a server shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) engine: Arc<Engine>,
    /// Strikes against peers that broke the protocol.
    pub(crate) cooldown: Arc<Cooldown>,
    /// The memory budget and the sessions per uid.
    pub(crate) limits: Arc<Limits>,
    /// The next session id, daemon-unique: for the daemon's own sessions
    /// and those it brokers alike (`Relaxed`: only uniqueness matters).
    pub(crate) next_session: AtomicU64,
}

/// The daemon's answer to its workers' session events: a peer that broke
/// the protocol (or stalled out) gets a strike, so its next handshakes are
/// held (see `cooldown`).
pub(crate) struct Strikes {
    pub(crate) cooldown: Arc<Cooldown>,
    pub(crate) stats: Arc<Stats>,
}

impl SessionEvents for Strikes {
    fn struck(&self, peer: &Peer, _session: u64) {
        // TCP peers carry no credentials to hold against.
        if let Peer::Unix(cred) = peer {
            self.cooldown.strike(cred, Instant::now());
            self.stats.struck();
        }
    }
}
