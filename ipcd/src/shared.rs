//! What the daemon's (or an embedded server's) threads share beyond the
//! engine: its configuration (what is fixed, and the settings a reload may
//! change), the strikes against peers, the limits on what sessions may
//! cost, and the roster of live sessions. Below `server`, `acceptor` and
//! `worker` alike, so that none of them imports another for it.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use crate::cooldown::Cooldown;
use crate::engine::{Engine, SessionEvents};
use crate::limits::Limits;
use crate::roster::Roster;
use crate::settings::LiveSettings;
use crate::stats::Stats;
use crate::stream_session::Peer;

/// What is fixed of a server's configuration for its life (the engine's
/// part is in [`Engine`]; what a reload may change, in [`LiveSettings`]).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) socket: PathBuf,
    pub(crate) socket_mode: u32,
    pub(crate) uds: Option<PathBuf>,
    /// Segments kept ready ([`crate::ServerBuilder::segment_pool`]).
    pub(crate) segment_pool: usize,
    /// Opener threads (see [`crate::opener`]).
    pub(crate) openers: usize,
}

/// What every thread of a server shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) engine: Arc<Engine>,
    /// Strikes against peers that broke the protocol.
    pub(crate) cooldown: Arc<Cooldown>,
    /// The memory budget and the sessions per uid.
    pub(crate) limits: Arc<Limits>,
    /// Who may connect, provide and call, and the limits: what a reload
    /// may change.
    pub(crate) settings: Arc<LiveSettings>,
    /// The live sessions, for `ipcd.clients`.
    pub(crate) roster: Arc<Roster>,
    /// The next session id, daemon-unique: for the daemon's own sessions
    /// and those it brokers alike (`Relaxed`: only uniqueness matters).
    pub(crate) next_session: AtomicU64,
}

/// The daemon's answer to its workers' session events: a peer that broke
/// the protocol (or stalled out) gets a strike, so its next handshakes are
/// held (see `cooldown`); a session that ended leaves the roster.
pub(crate) struct Strikes {
    pub(crate) cooldown: Arc<Cooldown>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) roster: Arc<Roster>,
}

impl SessionEvents for Strikes {
    fn struck(&self, peer: &Peer, _session: u64) {
        // TCP peers carry no credentials to hold against.
        if let Peer::Unix(cred) = peer {
            self.cooldown.strike(cred, Instant::now());
            self.stats.struck();
        }
    }

    fn closed(&self, session: u64) {
        self.roster.remove(session);
    }
}
