//! The embeddable server: configuration, the service table, and `run`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc_core::SegmentLayout;
use mio::{Poll, Waker};

use crate::acceptor::{self, Acceptor, Listeners};
use crate::access::AllowList;
use crate::deferred::Responder;
use crate::engine::Engine;
use crate::limits::Limits;
use crate::request::{OwnedRequest, Request};
use crate::service::{self, Handler, ServiceError, ServiceTable};
use crate::shared::{Config, Shared, Strikes};
use crate::stats::Stats;

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

/// The memory budget for sessions when the machine's memory cannot be read
/// (otherwise the default is a quarter of it; see
/// [`ServerBuilder::max_shm`]).
pub const FALLBACK_MAX_SHM: u64 = 1 << 30;

/// The default memory budget for sessions: a quarter of the machine's RAM
/// (`MemTotal`), or [`FALLBACK_MAX_SHM`] where it cannot be read.
fn default_max_shm() -> u64 {
    ipc_platform::total_memory().map_or(FALLBACK_MAX_SHM, |total| total / 4)
}

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
/// services it offers besides the built-in `echo`, `ping` and `stats`.
pub struct ServerBuilder {
    socket: Option<PathBuf>,
    socket_mode: u32,
    workers: Option<usize>,
    max_clients: usize,
    handshake_timeout: Duration,
    max_pending_handshakes: usize,
    stall_timeout: Duration,
    max_ring_capacity: u32,
    max_shm: Option<u64>,
    max_sessions_per_uid: usize,
    debug_services: bool,
    spin: Duration,
    uds: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    allow: AllowList,
    services: Vec<(String, Handler)>,
    handler_threads: usize,
}

impl Default for ServerBuilder {
    fn default() -> ServerBuilder {
        ServerBuilder {
            socket: None,
            socket_mode: 0o600,
            workers: None,
            max_clients: 4096,
            handshake_timeout: Duration::from_secs(2),
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            max_ring_capacity: 16 << 20,
            max_shm: None,
            max_sessions_per_uid: DEFAULT_MAX_SESSIONS_PER_UID,
            debug_services: false,
            spin: DEFAULT_SPIN,
            uds: None,
            tcp: None,
            allow: AllowList::default(),
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

    /// The control socket's permission bits (default 0600).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = mode;
        self
    }

    /// Worker threads (default: the available cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// The most clients served at once (default 4096); the next gets an
    /// explicit reject.
    pub fn max_clients(mut self, n: usize) -> Self {
        self.max_clients = n;
        self
    }

    /// How long a connection may take to send its hello (default 2 s).
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
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
        self.max_pending_handshakes = n;
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
        self.stall_timeout = t;
        self
    }

    /// The largest ring a client may ask for, in bytes (default 16 MiB).
    pub fn max_ring_capacity(mut self, bytes: u32) -> Self {
        self.max_ring_capacity = bytes;
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
        self.max_shm = Some(bytes);
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
        self.max_sessions_per_uid = n;
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

    /// Admits clients running as `uid`; call once per uid. With no
    /// `allow_uid` and no `allow_gid`, anyone who can open the socket is
    /// admitted; with either, a client of the control socket or the
    /// [`uds`](Self::uds) socket is admitted if its uid is allowed or its
    /// primary gid is, as the kernel reports them for the connection
    /// (`SO_PEERCRED`). Anyone else gets an explicit "not permitted" reject.
    /// The socket's mode ([`socket_mode`](Self::socket_mode)) still decides
    /// who can connect at all.
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allow.uids.push(uid);
        self
    }

    /// Admits clients whose primary gid is `gid`; call once per gid.
    /// Supplementary groups are not consulted. See
    /// [`allow_uid`](Self::allow_uid).
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.allow.gids.push(gid);
        self
    }

    /// Also offer `debug.sleep` and `debug.fail`, for tests.
    pub fn debug_services(mut self, on: bool) -> Self {
        self.debug_services = on;
        self
    }

    /// Adds a service whose handler returns its reply, run on the worker
    /// thread that serves the session. The handler gets the call's
    /// [`Request`]: its payload (a private copy), who called, on which
    /// session. While it runs, its worker serves no one else: a handler that
    /// may take long (or block) belongs in
    /// [`blocking_service`](Self::blocking_service).
    ///
    /// ```no_run
    /// use ipcd::{Server, ServiceError};
    ///
    /// let server = Server::builder()
    ///     .socket("/tmp/upper.sock")
    ///     .service("upper", |req| Ok(req.payload().to_ascii_uppercase()))
    ///     .service("mine", |req| match req.caller() {
    ///         Some(caller) if caller.uid == 1000 => Ok(b"yours".to_vec()),
    ///         _ => Err(ServiceError::with_code(403, "not yours")),
    ///     })
    ///     .build()?;
    /// # Ok::<(), ipcd::ServerError>(())
    /// ```
    pub fn service<F>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(&Request<'_>) -> Result<Vec<u8>, ServiceError> + Send + Sync + 'static,
    {
        let handler = move |request: &Request<'_>, reply: &mut Vec<u8>| {
            *reply = handler(request)?;
            Ok(())
        };
        self.services.push((name.into(), Handler::Inline(Arc::new(handler))));
        self
    }

    /// Adds a service whose handler writes its reply into a buffer the
    /// worker reuses (it arrives empty), run on the worker thread like
    /// [`service`](Self::service)'s: a call costs no allocation if the
    /// handler makes none.
    pub fn service_into<F>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(&Request<'_>, &mut Vec<u8>) -> Result<(), ServiceError> + Send + Sync + 'static,
    {
        self.services.push((name.into(), Handler::Inline(Arc::new(handler))));
        self
    }

    /// Adds a service whose handler runs on the handler threads (see
    /// [`handler_threads`](Self::handler_threads)), for handlers that take
    /// their time or block: while one runs, its worker goes on serving
    /// every session, this one's other calls included. Each call costs a
    /// copy of the request and a hand-off each way.
    ///
    /// A session has at most [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS)
    /// calls of blocking and deferred services unanswered; at that many, it
    /// takes no further request until one is answered. Replies may reach
    /// the client in another order than its requests (the client matches
    /// them by id).
    ///
    /// ```no_run
    /// use ipcd::{Server, ServiceError};
    ///
    /// let server = Server::builder()
    ///     .socket("/tmp/files.sock")
    ///     .blocking_service("file.read", |req| {
    ///         let path = std::str::from_utf8(req.payload()).map_err(|e| ServiceError::new(e.to_string()))?;
    ///         std::fs::read(path).map_err(|e| ServiceError::with_code(e.raw_os_error().unwrap_or(0) as u32, e.to_string()))
    ///     })
    ///     .handler_threads(4)
    ///     .build()?;
    /// # Ok::<(), ipcd::ServerError>(())
    /// ```
    pub fn blocking_service<F>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(&Request<'_>) -> Result<Vec<u8>, ServiceError> + Send + Sync + 'static,
    {
        self.services.push((name.into(), Handler::Blocking(Arc::new(handler))));
        self
    }

    /// Adds a service whose handler is given the call and a [`Responder`],
    /// and answers through it when it likes, from any thread: it runs on the
    /// worker thread and should return at once (handing the work on). A
    /// responder dropped without an answer answers the call with an error,
    /// so every call gets exactly one outcome. The cap on calls unanswered
    /// per session of [`blocking_service`](Self::blocking_service) applies.
    pub fn deferred_service<F>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(OwnedRequest, Responder) + Send + Sync + 'static,
    {
        self.services.push((name.into(), Handler::Deferred(Arc::new(handler))));
        self
    }

    /// The number of threads the [`blocking_service`](Self::blocking_service)
    /// handlers run on (default [`DEFAULT_HANDLER_THREADS`](crate::DEFAULT_HANDLER_THREADS)),
    /// started only if there is such a service. Calls beyond them wait in
    /// a queue, each session's within its cap.
    pub fn handler_threads(mut self, n: usize) -> Self {
        self.handler_threads = n;
        self
    }

    /// Validates the configuration and binds the control socket. The server
    /// accepts connections (they queue) from here on; [`Server::run`] serves
    /// them.
    pub fn build(self) -> Result<Server, ServerError> {
        let workers = match self.workers {
            Some(0) => return Err(ServerError::Config("workers must be at least 1".into())),
            Some(n) => n,
            None => workers_cores(),
        };
        if self.max_clients == 0 {
            return Err(ServerError::Config("max clients must be at least 1".into()));
        }
        if self.stall_timeout.is_zero() {
            return Err(ServerError::Config("the stall timeout must be positive".into()));
        }
        if self.max_pending_handshakes == 0 {
            return Err(ServerError::Config("max pending handshakes must be at least 1".into()));
        }
        if self.max_sessions_per_uid == 0 {
            return Err(ServerError::Config("max sessions per uid must be at least 1".into()));
        }
        if self.handler_threads == 0 {
            return Err(ServerError::Config("handler threads must be at least 1".into()));
        }
        let max_shm = self.max_shm.unwrap_or_else(default_max_shm);
        let smallest = SegmentLayout::new(SegmentLayout::fit_capacity(0, u32::MAX))
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let smallest = crate::limits::shm_charge(&smallest);
        if max_shm < smallest {
            return Err(ServerError::Config(format!(
                "the memory budget of {max_shm} bytes is below the {smallest} bytes of the smallest session"
            )));
        }
        let limits = Arc::new(Limits::new(max_shm, self.max_sessions_per_uid));
        if let (Some(addr), false) = (self.tcp, self.allow.is_open()) {
            return Err(ServerError::Config(format!(
                "TCP at {addr} carries no peer credentials, so it cannot be served with an allow list"
            )));
        }
        let socket = match self.socket {
            Some(p) => p,
            None => {
                let p = ipc_platform::default_socket_path();
                if p.parent() == Some(ipc_platform::fallback_dir().as_path()) {
                    ipc_platform::ensure_private_dir(&ipc_platform::fallback_dir())
                        .map_err(|source| ServerError::Bind { path: p.clone(), source })?;
                }
                p
            }
        };
        let stats = Arc::new(Stats::new(workers, self.max_pending_handshakes));
        let mut services = ServiceTable::new(self.handler_threads);
        let mut all = vec![
            ("echo".to_string(), service::echo()),
            ("ping".to_string(), service::ping()),
            ("stats".to_string(), {
                let stats = Arc::clone(&stats);
                let limits = Arc::clone(&limits);
                Handler::Inline(Arc::new(move |_: &Request<'_>, reply: &mut Vec<u8>| {
                    *reply = stats.to_json(&limits);
                    Ok(())
                }))
            }),
        ];
        if self.debug_services {
            all.push(("debug.sleep".to_string(), service::debug_sleep()));
            all.push(("debug.fail".to_string(), service::debug_fail()));
        }
        all.extend(self.services);
        for (name, handler) in all {
            services.add(name, handler).map_err(ServerError::Service)?;
        }
        let bound = ipc_platform::bind_control_socket(&socket, self.socket_mode, 1024)
            .map_err(|source| ServerError::Bind { path: socket.clone(), source })?;
        let uds = match &self.uds {
            Some(path) => Some(
                ipc_platform::bind_control_socket(path, self.socket_mode, 1024)
                    .map_err(|source| ServerError::Bind { path: path.clone(), source })?,
            ),
            None => None,
        };
        let tcp = match self.tcp {
            Some(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| ServerError::Bind { path: PathBuf::from(addr.to_string()), source })?;
                listener.set_nonblocking(true)?;
                Some(listener)
            }
            None => None,
        };
        let spin = if workers_cores() > 1 { self.spin } else { Duration::ZERO };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), acceptor::WAKER)?);
        let config = Config {
            socket,
            socket_mode: self.socket_mode,
            max_clients: self.max_clients,
            handshake_timeout: self.handshake_timeout,
            max_pending_handshakes: self.max_pending_handshakes,
            max_ring_capacity: self.max_ring_capacity,
            uds: self.uds,
            allow: self.allow,
        };
        let cooldown = Arc::new(crate::cooldown::Cooldown::default());
        let events = Box::new(Strikes { cooldown: Arc::clone(&cooldown), stats: Arc::clone(&stats) });
        let engine = Arc::new(Engine {
            workers,
            spin,
            stall_timeout: self.stall_timeout,
            services,
            stats,
            shutting_down: AtomicBool::new(false),
            events,
        });
        let shared = Arc::new(Shared { config, engine, cooldown, limits });
        Ok(Server { shared, listeners: Listeners { bound, uds, tcp }, poll, waker })
    }
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

    /// A handle that stops the server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { engine: Arc::clone(&self.shared.engine), waker: Arc::clone(&self.waker) }
    }

    /// Serves until shut down: stops accepting, answers requests still in
    /// the rings with a shutdown error, closes every session, removes the
    /// socket file, and returns.
    pub fn run(self) -> Result<(), ServerError> {
        tracing::info!(
            socket = %self.shared.config.socket.display(),
            mode = format_args!("{:o}", self.shared.config.socket_mode),
            workers = self.shared.engine.workers,
            max_clients = self.shared.config.max_clients,
            uds = ?self.shared.config.uds,
            tcp = ?self.tcp_addr(),
            allow_uids = ?self.shared.config.allow.uids,
            allow_gids = ?self.shared.config.allow.gids,
            spin_us = self.shared.engine.spin.as_micros() as u64,
            stall_timeout_ms = self.shared.engine.stall_timeout.as_millis() as u64,
            max_shm = self.shared.limits.budget(),
            max_sessions_per_uid = self.shared.limits.max_per_uid(),
            max_pending_handshakes = self.shared.config.max_pending_handshakes,
            "ipcd listening"
        );
        let Server { shared, listeners, poll, waker } = self;
        Acceptor::new(shared, listeners, poll, waker)?.run()
    }
}

/// Stops a running [`Server`].
#[derive(Clone)]
pub struct ShutdownHandle {
    engine: Arc<Engine>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the server to shut down; [`Server::run`] returns once it has.
    pub fn shutdown(&self) {
        self.engine.shutting_down.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                assert!(message.contains("exceeds the negotiated maximum"), "{message}")
            }
            other => panic!("expected a too-large reply error, got {other:?}"),
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
        assert_eq!(default_max_shm(), total / 4);
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
