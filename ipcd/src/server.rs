//! The embeddable server: configuration, the service table, and `run`.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mio::{Poll, Waker};

use crate::acceptor::{self, Acceptor, Listeners, UnixSocket};
use crate::engine::{Engine, StallTimeout};
use crate::health::Health;
use crate::introspect::{Listener, ServedBy};
use crate::limits::Limits;
use crate::policy::AccessRule;
use crate::roster::Roster;
use crate::service::{self, Handler, ServiceTable};
use crate::settings::{LiveSettings, ReloadHandle, Settings};
use crate::shared::{Config, Shared, Strikes};
use crate::stats::Stats;
use crate::views::{self, Introspection};

/// The default spin limit of a worker, chosen by measuring one and 100
/// clients on a 2-core machine (the README's spin table, with its command).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// How long a client may leave its replies unread, by default, before its
/// session is closed: long enough for a client that is busy (or swapped
/// out, or stopped in a debugger for a moment) to come back, short enough
/// that a client that has stopped for good does not hold its buffers and
/// its slot for long.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The most live sessions one uid may have, by default: a quarter of the
/// default maximum of clients, so that no one user can take the daemon's
/// every slot, and far more than any one program of a user needs.
pub const DEFAULT_MAX_SESSIONS_PER_UID: usize = 1024;

/// The most handshakes pending at once, by default: the length of the
/// listen queue, so that a burst that fills the kernel's queue fits the
/// acceptor's too, while 1,024 idle connections cost the daemon 1,024 fds
/// and a few hundred KiB.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;

/// Segments kept ready for connecting clients, by default (see
/// [`ServerBuilder::segment_pool`]): enough for a few clients connecting
/// close together, at about 135 KiB of the memory budget each.
pub const DEFAULT_SEGMENT_POOL: usize = 8;

/// The memory budget for sessions when the machine's memory cannot be read
/// (otherwise the default is a quarter of it; see
/// [`ServerBuilder::max_shm`]).
pub const FALLBACK_MAX_SHM: u64 = 1 << 30;

/// The longest message (request, reply or stream item) a server takes or
/// sends, by default: 1 GiB. Longer than a frame, a message goes in
/// chunks; see [`ServerBuilder::max_message`].
pub const DEFAULT_MAX_MESSAGE: u64 = 1 << 30;

fn workers_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Why a server could not be built or run.
///
/// A failed system call is the error's `source()`, not part of its message:
/// print the chain (`{:#}` in anyhow, as `ipcd` does) to see it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The control socket could not be bound.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A listener given to the builder cannot be served (see
    /// [`ServerBuilder::control_listener`]).
    #[error("the {listener} listener given cannot be served")]
    Listener {
        /// Which: `control`, `uds` or `tcp`.
        listener: &'static str,
        /// What is wrong with it.
        source: io::Error,
    },
    /// A service could not be registered.
    #[error("{0}")]
    Service(String),
    /// A configuration value is out of range.
    #[error("{0}")]
    Config(String),
    /// A system call failed while starting or running.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Builds a [`Server`]: where it listens, how many workers, and which
/// services it offers besides the built-in ones (`echo`, `ping`, `stats`,
/// and `ipcd.status`, `ipcd.services`, `ipcd.clients`, which describe the
/// server: see [`crate::introspect`]).
pub struct ServerBuilder {
    socket: Option<PathBuf>,
    socket_mode: u32,
    workers: Option<usize>,
    segment_pool: usize,
    /// What a reload may change later.
    settings: Settings,
    max_message: u64,
    debug_services: bool,
    spin: Duration,
    uds: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    control_listener: Option<UnixListener>,
    uds_listener: Option<UnixListener>,
    tcp_listener: Option<TcpListener>,
    services: Vec<(String, Handler)>,
    handler_threads: usize,
}

impl Default for ServerBuilder {
    fn default() -> ServerBuilder {
        ServerBuilder {
            socket: None,
            socket_mode: 0o600,
            workers: None,
            segment_pool: DEFAULT_SEGMENT_POOL,
            settings: Settings::default(),
            max_message: DEFAULT_MAX_MESSAGE,
            debug_services: false,
            spin: DEFAULT_SPIN,
            uds: None,
            tcp: None,
            control_listener: None,
            uds_listener: None,
            tcp_listener: None,
            services: Vec::new(),
            handler_threads: crate::pool::DEFAULT_HANDLER_THREADS,
        }
    }
}

impl ServerBuilder {
    /// The control socket path (default: [`ipc_platform::default_socket_path`]).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The control socket's permission bits (default 0600), for the
    /// sockets the server binds (not those given to it already listening).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = mode;
        self
    }

    /// Worker threads (default: the available cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Segments kept ready for connecting clients (default
    /// [`DEFAULT_SEGMENT_POOL`]; 0: none). A thread of their own makes
    /// them, sealed and mapped, with rings of the capacity clients ask for
    /// by default; a client that asks for it gets one at connect instead
    /// of waiting while its segment is made. Each is charged against the
    /// memory budget while it waits ([`ServerBuilder::max_shm`]), and the
    /// pool gives them up when a client would otherwise be refused for
    /// memory. A segment goes to one client only, never to another after
    /// it.
    pub fn segment_pool(mut self, n: usize) -> Self {
        self.segment_pool = n;
        self
    }

    /// The most clients served at once (default 4096); the next gets an
    /// explicit reject.
    pub fn max_clients(mut self, n: usize) -> Self {
        self.settings.max_clients = n;
        self
    }

    /// How long a connection may take to send its hello (default 2 s).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.settings.handshake_timeout = t;
        self
    }

    /// The most connections whose handshake is unfinished at once (default
    /// [`DEFAULT_MAX_PENDING_HANDSHAKES`]), shared between owners (a uid;
    /// TCP peers as one). A connection that comes at the cap takes the
    /// place of the oldest unfinished handshake of the owner with the most,
    /// if that owner has at least two more than the newcomer's; otherwise
    /// it is closed at once (after a best-effort reject). Both are counted.
    /// So one user flooding the socket with connections that never finish
    /// their hello fills only the room no one else asks for.
    pub fn max_pending_handshakes(mut self, n: usize) -> Self {
        self.settings.max_pending_handshakes = n;
        self
    }

    /// How long a client may leave its replies unread before its session is
    /// closed (default [`DEFAULT_STALL_TIMEOUT`]). A session stalls when its
    /// response ring is full (shared memory) or its unsent replies pass
    /// their bound (streams); its further requests wait, and no other
    /// session is held up. The stall ends when the client reads and the
    /// waiting reply goes out, and starts over whenever the client frees
    /// some room, not yet enough (it is reading, slowly); one that lasts
    /// longer than `t` ends the session, logged and counted as `stalled`.
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.settings.stall_timeout = t;
        self
    }

    /// The largest ring a client may ask for, in bytes (default 16 MiB).
    pub fn max_ring_capacity(mut self, bytes: u32) -> Self {
        self.settings.max_ring_capacity = bytes;
        self
    }

    /// The memory all sessions together may be charged, in bytes (default:
    /// a quarter of the machine's RAM, from `MemTotal` in `/proc/meminfo`,
    /// or [`FALLBACK_MAX_SHM`] where that cannot be read). A client whose
    /// session would pass it gets an explicit reject naming the budget, the
    /// bytes in use and what its session needs; sessions already open are
    /// not affected. A session is charged its worst case from creation to
    /// close: on shared memory its segment (allocated in full at creation)
    /// plus one maximum payload (a reply waiting while its ring is full),
    /// on a stream its buffers' bound. A quarter leaves the rest of the
    /// machine to everything else: without a budget, the defaults let
    /// anyone who can open the socket make the daemon allocate 4,096
    /// segments of 32 MiB.
    pub fn max_shm(mut self, bytes: u64) -> Self {
        self.settings.max_shm = Some(bytes);
        self
    }

    /// The longest message a session takes or sends, in bytes (default
    /// [`DEFAULT_MAX_MESSAGE`]): a request, a reply, or a stream's item.
    /// A message longer than a frame goes in chunks; one being assembled
    /// for a handler, or waiting to be sent, is charged against the memory
    /// budget ([`max_shm`](Self::max_shm)) for what it holds, so the budget
    /// bounds them too. A request longer than this (or than the budget has
    /// room for) is answered with an error, `MessageTooLarge` (not run),
    /// for that call alone; a handler's reply that is, with `ReplyTooLarge`
    /// (the handler ran: a remote error to the caller).
    pub fn max_message(mut self, bytes: u64) -> Self {
        self.max_message = bytes;
        self
    }

    /// The most live sessions one uid may have over the Unix listeners (the
    /// control socket and [`uds`](Self::uds)), by the credentials the
    /// kernel reports for each connection (default
    /// [`DEFAULT_MAX_SESSIONS_PER_UID`]); the next gets an explicit reject
    /// naming its uid and the limit. TCP carries no uid, so TCP sessions
    /// count only against [`max_clients`](Self::max_clients) and the
    /// memory budget.
    pub fn max_sessions_per_uid(mut self, n: usize) -> Self {
        self.settings.max_sessions_per_uid = n;
        self
    }

    /// How long a worker watches idle rings before it sleeps (default
    /// [`DEFAULT_SPIN`] with more than one core, else zero). Spinning
    /// adapts: it stops while spins keep finding nothing. Zero never spins.
    pub fn spin(mut self, limit: Duration) -> Self {
        self.spin = limit;
        self
    }

    /// Also serve over a plain Unix stream socket at `path`: the same
    /// services and frames, for clients that cannot map shared memory
    /// (created with the control socket's permissions).
    pub fn uds(mut self, path: impl Into<PathBuf>) -> Self {
        self.uds = Some(path.into());
        self
    }

    /// Also serve over TCP at `addr` (port 0 picks a free port; see
    /// [`Server::tcp_addr`]). There is no access control on TCP: bind it to
    /// loopback. Cannot be combined with [`allow_uid`](Self::allow_uid) or
    /// [`allow_gid`](Self::allow_gid).
    pub fn tcp(mut self, addr: SocketAddr) -> Self {
        self.tcp = Some(addr);
        self
    }

    /// Serves the control socket on `listener`, a Unix stream socket that
    /// already listens on a path (one a service manager passed in, say),
    /// instead of binding [`socket`](Self::socket) (which must then not be
    /// set). The socket file is not the server's: it takes no lock for it
    /// and does not remove it when it stops, and its permissions are
    /// whatever its maker gave it. [`build`](Self::build) checks that it is
    /// a listening Unix stream socket bound to a path (an abstract socket
    /// has no permissions, so anyone could connect), and makes it
    /// non-blocking and close-on-exec.
    pub fn control_listener(mut self, listener: UnixListener) -> Self {
        self.control_listener = Some(listener);
        self
    }

    /// Serves the stream transport on `listener` instead of binding
    /// [`uds`](Self::uds) (which must then not be set); checked, and its
    /// file left alone, as for
    /// [`control_listener`](Self::control_listener).
    pub fn uds_listener(mut self, listener: UnixListener) -> Self {
        self.uds_listener = Some(listener);
        self
    }

    /// Serves TCP on `listener`, a listening TCP socket, instead of binding
    /// [`tcp`](Self::tcp) (which must then not be set). As for `tcp`, there
    /// is no access control on it, and it cannot be combined with an allow
    /// list.
    pub fn tcp_listener(mut self, listener: TcpListener) -> Self {
        self.tcp_listener = Some(listener);
        self
    }

    /// Admits clients running as `uid`; call once per uid. With no
    /// `allow_uid` and no `allow_gid`, anyone who can open the socket is
    /// admitted; with either, a client of the control socket or the
    /// [`uds`](Self::uds) socket is admitted if its uid is allowed or its
    /// primary gid is, as the kernel reports them for the connection
    /// (`SO_PEERCRED`). Anyone else gets an explicit "not permitted" reject.
    /// The socket's mode ([`socket_mode`](Self::socket_mode)) still decides
    /// who can connect at all.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.settings.allow_uids.push(uid);
        self
    }

    /// Admits clients whose primary gid is `gid`; call once per gid.
    /// Supplementary groups are not consulted. See
    /// [`allow_uid`](Self::allow_uid).
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.settings.allow_gids.push(gid);
        self
    }

    /// Adds a rule saying who may provide and who may call the names that
    /// `rule.pattern` matches (checked in the order added; the first that
    /// matches a name decides). Without a rule for a name, only the
    /// daemon's own uid and root may provide it, and anyone who can open
    /// the socket may call it.
    pub fn access_rule(mut self, rule: AccessRule) -> Self {
        self.settings.access_rules.push(rule);
        self
    }

    /// Sets every setting a reload may change at once (see [`Settings`]),
    /// replacing what the methods of the same names set before.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Also offer `debug.sleep` and `debug.fail`, for tests.
    pub fn debug_services(mut self, on: bool) -> Self {
        self.debug_services = on;
        self
    }

    crate::service::service_methods!();

    /// Validates the configuration and binds the control socket. The server
    /// accepts connections (they queue) from here on; [`Server::run`] serves
    /// them.
    pub fn build(self) -> Result<Server, ServerError> {
        let workers = match self.workers {
            Some(0) => return Err(ServerError::Config("workers must be at least 1".into())),
            Some(n) => n,
            None => workers_cores(),
        };
        self.settings.check()?;
        if self.handler_threads == 0 {
            return Err(ServerError::Config("handler threads must be at least 1".into()));
        }
        if self.max_message == 0 {
            return Err(ServerError::Config("the largest message must be at least 1 byte".into()));
        }
        // A message held whole (assembled for a handler, a reply waiting)
        // is charged against the budget, so none can be longer than it.
        let max_message = clamp_max_message(self.max_message, self.settings.budget());
        let allow_list = !(self.settings.allow_uids.is_empty() && self.settings.allow_gids.is_empty());
        if let (Some(addr), true) = (self.tcp, allow_list) {
            return Err(ServerError::Config(format!(
                "TCP at {addr} carries no peer credentials, so it cannot be served with an allow list"
            )));
        }
        if let (Some(listener), true) = (&self.tcp_listener, allow_list) {
            let addr = listener.local_addr().map_or_else(|e| format!("(address unknown: {e})"), |a| a.to_string());
            return Err(ServerError::Config(format!(
                "TCP at {addr} carries no peer credentials, so it cannot be served with an allow list"
            )));
        }
        if let Some((name, _)) = self.services.iter().find(|(name, _)| name == "ipcd" || name.starts_with("ipcd.")) {
            return Err(ServerError::Service(format!(
                "service name {name:?}: the names under \"ipcd.\" are the server's own"
            )));
        }
        for (what, both) in [
            ("the control socket", self.socket.is_some() && self.control_listener.is_some()),
            ("the stream socket", self.uds.is_some() && self.uds_listener.is_some()),
            ("TCP", self.tcp.is_some() && self.tcp_listener.is_some()),
        ] {
            if both {
                return Err(ServerError::Config(format!(
                    "{what} is given both as an address to bind and as a listener"
                )));
            }
        }
        let control = self.control_listener.map(|l| given_unix(l, "control")).transpose()?;
        let uds_given = self.uds_listener.map(|l| given_unix(l, "uds")).transpose()?;
        let tcp_given = match self.tcp_listener {
            Some(l) => {
                ipc_platform::prepare_listener(l.as_fd(), ipc_platform::ListenerFamily::Inet)
                    .map_err(|source| ServerError::Listener { listener: "tcp", source })?;
                Some(l)
            }
            None => None,
        };
        let socket = match (&control, self.socket) {
            (Some((path, _)), _) => path.clone(),
            (None, Some(p)) => p,
            (None, None) => {
                let p = ipc_platform::default_socket_path();
                if p.parent() == Some(ipc_platform::fallback_dir().as_path()) {
                    ipc_platform::ensure_private_dir(&ipc_platform::fallback_dir())
                        .map_err(|source| ServerError::Bind { path: p.clone(), source })?;
                }
                p
            }
        };
        let daemon_uid = ipc_platform::current_uid();
        let serves_tcp = self.tcp.is_some() || tcp_given.is_some();
        let limits = Arc::new(Limits::new(self.settings.budget(), self.settings.max_sessions_per_uid));
        let stall_timeout = StallTimeout::new(self.settings.stall_timeout);
        let max_pending = self.settings.max_pending_handshakes;
        let settings = Arc::new(LiveSettings::new(self.settings, daemon_uid, serves_tcp));
        let roster = Arc::new(Roster::default());
        // The services by id: the built-in ones, the debug ones, the
        // embedder's. Their names are known before their handlers, which
        // report on them.
        let mut names: Vec<(String, ServedBy)> =
            views::BUILT_IN.iter().map(|n| (n.to_string(), ServedBy::Daemon)).collect();
        if self.debug_services {
            names.extend(["debug.sleep", "debug.fail"].map(|n| (n.to_string(), ServedBy::Daemon)));
        }
        names.extend(self.services.iter().map(|(n, _)| (n.clone(), ServedBy::Embedded)));
        let stats = Arc::new(Stats::new(workers, max_pending, names.len()));
        let view = Arc::new(Introspection {
            stats: Arc::clone(&stats),
            limits: Arc::clone(&limits),
            settings: Arc::clone(&settings),
            roster: Arc::clone(&roster),
            services: names,
            listeners: std::sync::OnceLock::new(),
            daemon_uid,
        });
        let mut services = ServiceTable::new(self.handler_threads);
        let mut all = vec![("echo".to_string(), service::echo()), ("ping".to_string(), service::ping())];
        all.extend(views::handlers(&view).map(|(name, handler)| (name.to_string(), handler)));
        all.push(("stream.count".to_string(), service::stream_count()));
        if self.debug_services {
            all.push(("debug.sleep".to_string(), service::debug_sleep()));
            all.push(("debug.fail".to_string(), service::debug_fail()));
        }
        all.extend(self.services);
        for ((name, handler), (expected, _)) in all.into_iter().zip(&view.services) {
            debug_assert_eq!(&name, expected, "a service out of its place");
            services.add(name, handler).map_err(ServerError::Service)?;
        }
        let bound = match control {
            Some((_, fd)) => UnixSocket::Given(fd),
            None => UnixSocket::Bound(
                ipc_platform::bind_control_socket(&socket, self.socket_mode, 1024)
                    .map_err(|source| ServerError::Bind { path: socket.clone(), source })?,
            ),
        };
        let (uds_path, uds) = match (uds_given, &self.uds) {
            (Some((path, fd)), _) => (Some(path), Some(UnixSocket::Given(fd))),
            (None, Some(path)) => (
                Some(path.clone()),
                Some(UnixSocket::Bound(
                    ipc_platform::bind_control_socket(path, self.socket_mode, 1024)
                        .map_err(|source| ServerError::Bind { path: path.clone(), source })?,
                )),
            ),
            (None, None) => (None, None),
        };
        let tcp = match (tcp_given, self.tcp) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => {
                let listener = TcpListener::bind(addr)
                    .map_err(|source| ServerError::Bind { path: PathBuf::from(addr.to_string()), source })?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            (None, None) => None,
        };
        let listeners = Listeners { bound, uds, tcp };
        let mut described = vec![Listener {
            kind: "control".into(),
            address: socket.display().to_string(),
            given: matches!(listeners.bound, UnixSocket::Given(_)),
        }];
        if let (Some(path), Some(uds)) = (&uds_path, &listeners.uds) {
            let given = matches!(uds, UnixSocket::Given(_));
            described.push(Listener { kind: "uds".into(), address: path.display().to_string(), given });
        }
        if let Some(tcp) = &listeners.tcp {
            let address = tcp.local_addr().map_or_else(|e| format!("(address unknown: {e})"), |a| a.to_string());
            described.push(Listener { kind: "tcp".into(), address, given: self.tcp.is_none() });
        }
        let _ = view.listeners.set(described);
        let spin = if workers_cores() > 1 { self.spin } else { Duration::ZERO };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), acceptor::WAKER)?);
        let openers = (ipc_platform::usable_cores() as usize).clamp(1, crate::opener::MAX_OPENERS);
        let config =
            Config { socket, socket_mode: self.socket_mode, uds: uds_path, segment_pool: self.segment_pool, openers };
        let cooldown = Arc::new(crate::cooldown::Cooldown::default());
        let events = Box::new(Strikes {
            cooldown: Arc::clone(&cooldown),
            stats: Arc::clone(&stats),
            roster: Arc::clone(&roster),
        });
        let engine = Arc::new(Engine {
            workers,
            spin,
            stall_timeout,
            services,
            stats,
            limits: Arc::clone(&limits),
            max_message,
            shutting_down: AtomicBool::new(false),
            events,
            retirer: std::sync::OnceLock::new(),
        });
        let shared =
            Arc::new(Shared { config, engine, cooldown, limits, settings, roster, next_session: AtomicU64::new(1) });
        Ok(Server { shared, listeners, poll, waker, view })
    }
}

/// Checks a Unix listener given to the builder and finds its path.
fn given_unix(listener: UnixListener, which: &'static str) -> Result<(PathBuf, OwnedFd), ServerError> {
    let error = |source| ServerError::Listener { listener: which, source };
    ipc_platform::prepare_listener(listener.as_fd(), ipc_platform::ListenerFamily::Unix).map_err(error)?;
    let path = ipc_platform::unix_listener_path(listener.as_fd()).map_err(error)?;
    Ok((path, OwnedFd::from(listener)))
}

/// A bound ipcd server, ready to [`run`](Server::run).
///
/// ```no_run
/// use ipcd::{Server, ServiceError};
///
/// let server = Server::builder()
///     .socket("/tmp/example-ipcd.sock")
///     .service("upper", |req| Ok::<_, ServiceError>(req.payload().to_ascii_uppercase()))
///     .build()?;
/// let stop = server.shutdown_handle();
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_secs(60));
///     stop.shutdown();
/// });
/// server.run()?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
pub struct Server {
    shared: Arc<Shared>,
    listeners: Listeners,
    poll: Poll,
    waker: Arc<Waker>,
    /// What its services about itself (and its metrics) read.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    view: Arc<Introspection>,
}

impl Server {
    /// A builder with the defaults.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The control socket path.
    pub fn socket_path(&self) -> &Path {
        &self.shared.config.socket
    }

    /// The TCP address served, if any (with the port chosen when asked for
    /// port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listeners.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle that changes the server's [`Settings`] while it runs (who
    /// may connect, provide and call; its limits), from any thread.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle::new(Arc::clone(&self.shared.settings), Arc::clone(&self.waker))
    }

    /// Serves Prometheus metrics at `addr` (`GET /metrics`) while the
    /// returned server lives, read from the counters the workers keep (see
    /// [`crate::MetricsServer`]). `addr` must be a loopback address unless
    /// `allow_remote`.
    #[cfg(feature = "metrics")]
    pub fn serve_metrics(
        &self,
        addr: SocketAddr,
        allow_remote: bool,
    ) -> Result<crate::MetricsServer, crate::MetricsError> {
        crate::metrics::serve(addr, allow_remote, crate::metrics::DaemonMetrics(Arc::clone(&self.view)))
    }

    /// A handle that stops the server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { engine: Arc::clone(&self.shared.engine), waker: Arc::clone(&self.waker) }
    }

    /// Serves until shut down: stops accepting, answers requests still in
    /// the rings with a shutdown error, closes every session, removes the
    /// socket files it bound (not those of listeners it was given), and
    /// returns.
    pub fn run(self) -> Result<(), ServerError> {
        self.run_with_ready(|_| {})
    }

    /// [`run`](Self::run), calling `ready` once the server serves: every
    /// listener is polled and every worker thread has started, and no
    /// connection has been answered yet. It runs on the thread that called
    /// this, before the first connection is handled, so it should return
    /// promptly (start a thread for anything that lasts). It is given the
    /// server's [`Health`], which tells whether its loops still turn: for a
    /// watchdog.
    pub fn run_with_ready(self, ready: impl FnOnce(Health)) -> Result<(), ServerError> {
        let current = self.shared.settings.current();
        let settings = &current.settings;
        tracing::info!(
            socket = %self.shared.config.socket.display(),
            mode = format_args!("{:o}", self.shared.config.socket_mode),
            workers = self.shared.engine.workers,
            max_clients = settings.max_clients,
            uds = ?self.shared.config.uds,
            tcp = ?self.tcp_addr(),
            given = ?self.listeners.given(),
            allow_uids = ?settings.allow_uids,
            allow_gids = ?settings.allow_gids,
            access_rules = settings.access_rules.len(),
            spin_us = self.shared.engine.spin.as_micros() as u64,
            stall_timeout_ms = settings.stall_timeout.as_millis() as u64,
            max_shm = self.shared.limits.budget(),
            max_message = self.shared.engine.max_message,
            max_sessions_per_uid = self.shared.limits.max_per_uid(),
            max_pending_handshakes = settings.max_pending_handshakes,
            "ipcd listening"
        );
        drop(current);
        let Server { shared, listeners, poll, waker, .. } = self;
        Acceptor::new(shared, listeners, poll, waker)?.run(ready)
    }
}

/// The largest message a server with a memory budget of `max_shm` bytes
/// takes: `wanted`, or the budget if that is less (a message held whole is
/// charged against it).
pub(crate) fn clamp_max_message(wanted: u64, max_shm: u64) -> u64 {
    if wanted > max_shm {
        tracing::warn!(wanted, max_shm, "the largest message is held to the memory budget");
    }
    wanted.min(max_shm)
}

/// Stops a running [`Server`].
#[derive(Clone)]
pub struct ShutdownHandle {
    engine: Arc<Engine>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// A handle that sets `engine`'s stop flag and rings `waker` (the loop
    /// of whoever owns the engine).
    pub(crate) fn new(engine: Arc<Engine>, waker: Arc<Waker>) -> ShutdownHandle {
        ShutdownHandle { engine, waker }
    }

    /// Asks the server to shut down; [`Server::run`] returns once it has.
    pub fn shutdown(&self) {
        self.engine.shutting_down.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Request;
    use crate::ServiceError;
    use crate::Stuck;
    use ipc_client::{CallError, Client};

    /// Runs an embedded server with extra services on a temporary socket.
    fn embedded() -> (tempfile::TempDir, PathBuf, ShutdownHandle, std::thread::JoinHandle<Result<(), ServerError>>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("embedded.sock");
        let server = Server::builder()
            .socket(&socket)
            .workers(1)
            .service("upper", |req| Ok(req.payload().to_ascii_uppercase()))
            .service("refuse", |_| Err(ServiceError::new("refused by policy")))
            .service("deny", |_| Err(ServiceError::with_code(403, "denied by policy")))
            .service("explode", |_| -> Result<Vec<u8>, ServiceError> { panic!("handler bug") })
            .service_into("len", |req, out| {
                out.extend_from_slice(&(req.payload().len() as u64).to_le_bytes());
                Ok(())
            })
            .service("huge", |_| Ok(vec![0u8; 1 << 20]))
            // Below the huge reply, which is then refused; a reply within
            // it but longer than a frame would go in chunks.
            .max_message(512 << 10)
            .build()
            .unwrap();
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        (dir, socket, handle, thread)
    }

    #[test]
    fn embedded_services_answer_and_errors_stay_per_call() {
        let (_dir, socket, handle, thread) = embedded();
        let mut client = Client::connect_to(&socket).unwrap();
        let upper = client.service("upper").unwrap();
        assert_eq!(client.call(&upper, b"shout").unwrap(), b"SHOUT");

        let refuse = client.service("refuse").unwrap();
        assert_eq!(
            client.call(&refuse, b"x"),
            Err(CallError::Remote { code: None, message: "refused by policy".into() })
        );
        let deny = client.service("deny").unwrap();
        let denied = CallError::Remote { code: Some(403), message: "denied by policy".into() };
        assert_eq!(client.call(&deny, b"x"), Err(denied));

        let explode = client.service("explode").unwrap();
        match client.call(&explode, b"x") {
            Err(CallError::Remote { code: None, message }) => {
                assert!(message.contains("panicked"), "{message}")
            }
            other => panic!("expected a remote error, got {other:?}"),
        }

        let huge = client.service("huge").unwrap();
        match client.call(&huge, b"") {
            Err(CallError::Remote { code: None, message }) => {
                assert!(message.contains("exceeds the largest message"), "{message}")
            }
            other => panic!("expected a too-large reply error, got {:?}", other.map(|r| r.len())),
        }

        // After every kind of error the same session still works.
        let len = client.service("len").unwrap();
        assert_eq!(client.call(&len, &[7; 300]).unwrap(), 300u64.to_le_bytes());
        assert_eq!(client.call(&upper, b"still here").unwrap(), b"STILL HERE");

        handle.shutdown();
        thread.join().unwrap().unwrap();
        assert!(!socket.exists(), "the socket file is removed on shutdown");
        // Stopping, the server marked the session closed after the last
        // request it took. The client has not looked since: this request
        // goes into the ring, and its wait finds the mark at once. So the
        // request is known not to have run: `Shutdown`, where a server that
        // died would leave `Disconnected`.
        assert_eq!(client.call(&upper, b"x"), Err(CallError::Shutdown));
        // Once the client knows, a request is not sent at all, and fails
        // with the same reason.
        assert!(!client.is_connected());
        assert_eq!(client.call(&upper, b"y"), Err(CallError::Shutdown));
    }

    #[test]
    fn a_given_listener_is_served_and_its_file_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (control, uds) = (dir.path().join("given.sock"), dir.path().join("given-stream.sock"));
        let server = Server::builder()
            .control_listener(UnixListener::bind(&control).unwrap())
            .uds_listener(UnixListener::bind(&uds).unwrap())
            .workers(1)
            .build()
            .unwrap();
        assert_eq!(server.socket_path(), control);
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        let mut client = Client::connect_to(&control).unwrap();
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"given").unwrap(), b"given");
        let mut stream = Client::connect_with(ipc_client::Transport::Uds(uds.clone()), Default::default()).unwrap();
        let echo = stream.service("echo").unwrap();
        assert_eq!(stream.call(&echo, b"stream").unwrap(), b"stream");
        handle.shutdown();
        thread.join().unwrap().unwrap();
        // The files are their maker's: no lock was taken for them, and
        // they stay (a service manager keeps listening on them).
        assert!(control.exists() && uds.exists(), "a given listener's socket file was removed");
        assert!(!dir.path().join("given.sock.lock").exists(), "a lock file was made for a given listener");
    }

    #[test]
    fn given_listeners_are_checked_and_may_not_double_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let listener = |name: &str| UnixListener::bind(dir.path().join(name)).unwrap();
        let result = Server::builder().socket(dir.path().join("x.sock")).control_listener(listener("l1.sock")).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("both as an address")));
        let result = Server::builder().uds(dir.path().join("y.sock")).uds_listener(listener("l2.sock")).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("both as an address")));

        // A socket that is bound but does not listen cannot be served.
        let datagram = std::os::unix::net::UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        let not_listening = UnixListener::from(OwnedFd::from(datagram));
        let result = Server::builder().control_listener(not_listening).build();
        match result {
            Err(err @ ServerError::Listener { listener: "control", .. }) => {
                let chain = format!("{:#}", anyhow::Error::from(err));
                assert!(chain.contains("not a stream socket"), "{chain}");
            }
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("a datagram socket was taken as a listener"),
        }

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let result = Server::builder().socket(dir.path().join("t.sock")).allow_uid(0).tcp_listener(tcp).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("no peer credentials")));
    }

    #[test]
    fn a_worker_inside_a_handler_is_stuck_and_turns_again_once_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("health.sock");
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let (entered_tx, release_rx) = (std::sync::Mutex::new(entered_tx), std::sync::Mutex::new(release_rx));
        let server = Server::builder()
            .socket(&socket)
            .workers(1)
            .service("block", move |_: &Request<'_>| {
                entered_tx.lock().unwrap().send(()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
                Ok(Vec::new())
            })
            .build()
            .unwrap();
        let handle = server.shutdown_handle();
        let (health_tx, health_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || server.run_with_ready(|health| health_tx.send(health).unwrap()));
        let mut health = health_rx.recv().unwrap();
        let limit = std::time::Instant::now() + Duration::from_secs(30);
        let turns = |health: &mut Health| {
            while health.check().is_err() {
                assert!(std::time::Instant::now() < limit, "the loops do not turn when woken");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        // Idle loops asleep in their poll turn when the check wakes them.
        turns(&mut health);
        turns(&mut health);

        let caller = std::thread::spawn(move || {
            let mut client = Client::connect_to(&socket).unwrap();
            let block = client.service("block").unwrap();
            client.call(&block, b"")
        });
        entered.recv().unwrap();
        // The worker may have turned between the last check and entering
        // the handler; after one more check it cannot have.
        let _ = health.check();
        assert_eq!(health.check(), Err(Stuck::Worker(0)));
        assert_eq!(health.check(), Err(Stuck::Worker(0)));
        assert!(!health.is_stopping());

        release.send(()).unwrap();
        assert_eq!(caller.join().unwrap(), Ok(Vec::new()));
        turns(&mut health);
        handle.shutdown();
        thread.join().unwrap().unwrap();
        assert!(health.is_stopping());
    }

    #[test]
    fn duplicate_service_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let result = Server::builder()
            .socket(dir.path().join("dup.sock"))
            .service("echo", |req| Ok(req.payload().to_vec()))
            .build();
        assert!(matches!(result, Err(ServerError::Service(m)) if m.contains("twice")));
    }

    #[test]
    fn a_bind_failure_names_the_path_and_chains_its_cause() {
        let path = Path::new("/nonexistent/dir/x.sock");
        let Err(err) = Server::builder().socket(path).build() else { panic!("bound {path:?}") };
        assert_eq!(err.to_string(), "cannot listen on /nonexistent/dir/x.sock");
        let cause = std::error::Error::source(&err).and_then(|e| e.downcast_ref::<io::Error>()).expect("an io::Error");
        assert_eq!(cause.kind(), io::ErrorKind::NotFound);
        // Printed as a chain, the cause appears once.
        let expected = format!("cannot listen on /nonexistent/dir/x.sock: {cause}");
        assert_eq!(format!("{:#}", anyhow::Error::from(err)), expected);
    }

    #[test]
    fn tcp_with_an_allow_list_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for builder in [Server::builder().allow_uid(0), Server::builder().allow_gid(0)] {
            let result = builder.socket(dir.path().join("t.sock")).tcp(loopback).build();
            assert!(matches!(&result, Err(ServerError::Config(m)) if m.contains("no peer credentials")));
            assert!(!dir.path().join("t.sock").exists(), "nothing is bound when the configuration is refused");
        }
    }

    #[test]
    fn a_budget_below_the_smallest_session_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let result = Server::builder().socket(dir.path().join("b.sock")).max_shm(4096).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("smallest session")));
        let result = Server::builder().socket(dir.path().join("b.sock")).max_sessions_per_uid(0).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("per uid")));
    }

    #[test]
    fn the_default_budget_is_a_quarter_of_the_machine() {
        let total = ipc_platform::total_memory().expect("/proc/meminfo is readable on Linux");
        assert_eq!(crate::settings::default_max_shm(), total / 4);
    }

    #[test]
    fn zero_workers_or_stall_timeout_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let result = Server::builder().socket(dir.path().join("w.sock")).workers(0).build();
        assert!(matches!(result, Err(ServerError::Config(_))));
        let result = Server::builder().socket(dir.path().join("w.sock")).stall_timeout(Duration::ZERO).build();
        assert!(matches!(result, Err(ServerError::Config(m)) if m.contains("stall timeout")));
    }
}
