//! What the daemon says of itself: the JSON replies of its `ipcd.status`,
//! `ipcd.services` and `ipcd.clients` services, as types (`ipcctl`
//! deserializes them; any client may).
//!
//! Each reply names its [`Viewer`]: who asked, as the kernel reported the
//! connection (`SO_PEERCRED`), and what that caller may see. Root and the
//! daemon's own uid see everything ([`Sees::All`]). Any other caller sees
//! [`Sees::Own`]: the daemon-wide counts and limits, the daemon's own
//! services, the provided names the access rules let it call (with their
//! providers, which a resolve would name to it anyway), and only its own
//! sessions (those whose client, or for a brokered session whose provider,
//! runs as its uid), its own uid's share of the sessions per uid, and no
//! allow lists or access rules. A caller over TCP carries no credentials:
//! it sees the counts, the daemon's own services, and no session.
//!
//! `ipcd.services` and `ipcd.clients` answer a page at a time. Their
//! request is empty (the first page) or a JSON [`Page`]; a reply whose list
//! stopped short says where to go on in `next`.
//!
//! ```no_run
//! use ipcd::introspect::{Page, SessionList};
//!
//! let mut client = ipc_client::Client::connect()?;
//! let clients = client.service("ipcd.clients")?;
//! let mut page = Page { after: None, max_bytes: Some(client.max_payload()) };
//! loop {
//!     let reply = client.call(&clients, &serde_json::to_vec(&page)?)?;
//!     let list: SessionList = serde_json::from_slice(&reply)?;
//!     for session in &list.sessions {
//!         println!("{} {:?} pid {:?} calls {:?}", session.id, session.transport, session.pid, session.calls);
//!     }
//!     match list.next {
//!         Some(next) => page.after = Some(next),
//!         None => break,
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The request of a paged service (`ipcd.services`, `ipcd.clients`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Go on after this entry: the `next` of the previous page (a service
    /// name, or a session id). `None`: from the start.
    #[serde(default)]
    pub after: Option<serde_json::Value>,
    /// The most bytes the reply may take (the caller's maximum payload);
    /// the daemon fills the page up to it. `None`: 16 KiB, which any ring
    /// holds.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

/// Who asked, and what they may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    /// The caller's pid, uid and gid (`None` over TCP).
    pub caller: Option<CallerInfo>,
    /// What the caller sees.
    pub sees: Sees,
}

/// A process as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerInfo {
    /// Process id (0 in a pid namespace the daemon cannot see).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// How much of the daemon's state a caller sees (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sees {
    /// Everything: root, and the daemon's own uid.
    All,
    /// The daemon-wide figures, and what is the caller's own.
    Own,
}

/// `ipcd.status`: the daemon, its limits and what is in use of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// The daemon's pid and uid.
    pub pid: u32,
    /// The uid the daemon runs as.
    pub uid: u32,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Worker threads.
    pub workers: usize,
    /// Who asked.
    pub viewer: Viewer,
    /// Where the daemon listens.
    pub listeners: Vec<Listener>,
    /// Sessions of the daemon's own, by transport, and the cap on them.
    pub clients: ClientCounts,
    /// Sessions the daemon brokered and whose provider has not reported
    /// them closed.
    pub brokered_sessions: usize,
    /// The limits in force, and what is in use of them.
    pub limits: LimitsInfo,
    /// Handshakes by outcome.
    pub handshakes: Handshakes,
    /// Calls the daemon's own sessions made (not the brokered ones, which
    /// the daemon never sees).
    pub calls: Calls,
    /// Sessions ended, by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// The allow lists and access rules in force: `None` unless the
    /// viewer sees everything.
    pub access: Option<Access>,
    /// Configurations applied since the start (`SIGHUP` reloads, or
    /// [`crate::ReloadHandle::apply`]).
    pub reloads: u64,
}

/// A listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// `control` (shared memory, the broker), `uds` or `tcp`.
    pub kind: String,
    /// Its path or address.
    pub address: String,
    /// Whether it was given to the daemon (a service manager's socket)
    /// rather than bound by it.
    pub given: bool,
}

/// The daemon's own sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCounts {
    /// Sessions open now, every transport.
    pub connected: usize,
    /// The most that may be (`--max-clients`).
    pub max: usize,
    /// Of those, over shared memory.
    pub shm: usize,
    /// Over the Unix stream socket (`--uds`).
    pub uds: usize,
    /// Over TCP.
    pub tcp: usize,
}

/// The limits in force and what is in use of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsInfo {
    /// The memory all sessions may be charged, in bytes (`--max-shm`).
    pub memory_budget: u64,
    /// What the live sessions are charged now, in bytes.
    pub memory_in_use: u64,
    /// The most sessions one uid may have (`--max-sessions-per-uid`).
    pub max_sessions_per_uid: usize,
    /// Uids with sessions and how many, most first (at most 64 entries;
    /// for a viewer who sees its own only, its uid's).
    pub sessions_per_uid: Vec<UidSessions>,
    /// How many uids have sessions (of those the viewer may see).
    pub uids_with_sessions: usize,
    /// Handshakes unfinished now.
    pub pending_handshakes: usize,
    /// The most that may be (`--max-pending-handshakes`).
    pub max_pending_handshakes: usize,
    /// The largest ring a client may ask for (`--max-ring-size`).
    pub max_ring_size: u32,
    /// `--handshake-timeout`, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// `--stall-timeout`, in milliseconds.
    pub stall_timeout_ms: u64,
}

/// One uid's sessions (the daemon's own and the brokered ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidSessions {
    /// The uid.
    pub uid: u32,
    /// Its live sessions.
    pub sessions: usize,
}

/// Handshakes by outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshakes {
    /// Sessions opened.
    pub accepted: u64,
    /// Hellos held by a cool-down.
    pub held: u64,
    /// Strikes against processes that broke the protocol or stalled.
    pub strikes: u64,
    /// Refusals, by reason (every reason, zero or not).
    pub rejected: BTreeMap<String, u64>,
}

/// Calls, daemon-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calls {
    /// Requests taken.
    pub requests: u64,
    /// Replies sent.
    pub replies: u64,
    /// Of those, errors.
    pub errors: u64,
}

/// The allow lists and access rules in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `--allow-uid`.
    pub allow_uids: Vec<u32>,
    /// `--allow-gid`.
    pub allow_gids: Vec<u32>,
    /// The access rules, in order.
    pub rules: Vec<Rule>,
}

/// One access rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Its pattern.
    pub pattern: String,
    /// Who may provide (`None`: the default).
    pub provide: Option<Who>,
    /// Who may call (`None`: the default, anyone).
    pub call: Option<Who>,
}

/// Uids and gids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Who {
    /// Uids.
    pub uids: Vec<u32>,
    /// Primary gids.
    pub gids: Vec<u32>,
}

/// `ipcd.services`: every name the viewer may see, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    /// Who asked.
    pub viewer: Viewer,
    /// This page of names.
    pub services: Vec<ServiceInfo>,
    /// The `after` of the next page, if this one stopped short.
    pub next: Option<serde_json::Value>,
}

/// One service name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The name.
    pub name: String,
    /// Who serves it.
    pub served_by: ServedBy,
    /// Its id in the daemon's welcome (the daemon's own and embedded ones).
    pub id: Option<u16>,
    /// Calls taken, summed over the workers (`None` for a provided name:
    /// its calls go straight to the provider and the daemon never sees
    /// them).
    pub calls: Option<u64>,
    /// Of those, answered with an error by a handler on a worker (the
    /// errors of calls handed off to blocking or deferred handlers count in
    /// the daemon-wide figures only).
    pub errors: Option<u64>,
    /// For a provided name: whether several providers may hold it.
    pub pooled: Option<bool>,
    /// For a provided name: who holds it.
    pub providers: Vec<ProviderInfo>,
}

/// Who serves a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServedBy {
    /// Built into the daemon (`echo`, `ping`, `stats`, `ipcd.*`, ...).
    Daemon,
    /// Added by the program that embeds the server.
    Embedded,
    /// A provider process, through the broker.
    Provider,
}

/// A provider of a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// The broker's id for its connection.
    pub id: u64,
    /// Its pid.
    pub pid: i32,
    /// Its uid.
    pub uid: u32,
    /// The sessions it serves.
    pub sessions: u32,
}

/// `ipcd.clients`: the sessions the viewer may see, by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    /// Who asked.
    pub viewer: Viewer,
    /// This page of sessions.
    pub sessions: Vec<SessionInfo>,
    /// The `after` of the next page, if this one stopped short.
    pub next: Option<serde_json::Value>,
}

/// One session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's id (as the client sees it, and the logs name it).
    pub id: u64,
    /// How it is served.
    pub transport: Transport,
    /// The client's pid (`None` over TCP).
    pub pid: Option<i32>,
    /// The client's uid.
    pub uid: Option<u32>,
    /// The client's primary gid.
    pub gid: Option<u32>,
    /// A TCP client's address.
    pub address: Option<String>,
    /// The ring capacity, in bytes (shared memory and brokered sessions).
    pub ring_size: Option<u32>,
    /// The largest payload a frame carries.
    pub max_payload: u32,
    /// Seconds since it opened.
    pub age_s: f64,
    /// Calls it made (`None` for a brokered session, whose calls the
    /// daemon never sees).
    pub calls: Option<u64>,
    /// The worker that serves it (the daemon's own sessions).
    pub worker: Option<usize>,
    /// For a brokered session: the name it was resolved for.
    pub service: Option<String>,
    /// For a brokered session: its provider.
    pub provider: Option<ProviderInfo>,
}

/// How a session is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Shared memory, with the daemon.
    Shm,
    /// The Unix stream socket.
    Uds,
    /// TCP.
    Tcp,
    /// Shared memory, with a provider: the daemon introduced the two.
    Brokered,
}

impl Transport {
    /// Its name, as in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Uds => "uds",
            Transport::Tcp => "tcp",
            Transport::Brokered => "brokered",
        }
    }
}
