//! Providers: processes that offer services through the running daemon.
//!
//! A provider is built like an embedded server (services, workers,
//! spinning), but instead of listening it connects to ipcd and registers
//! its names. For each client that resolves one of them, the daemon sends
//! the session's parts (`Incoming`: the client's credentials, the sealed
//! segment, the doorbells, a liveness socket); the provider checks them as
//! a client checks a welcome, hands the session to one of its workers (the
//! same engine the daemon runs, with the same validation of every byte the
//! client writes), and accepts it. From then on the daemon is not involved:
//! calls go from the client to the provider and back through the rings.
//!
//! If the daemon goes away, the sessions go on. The provider connects
//! again, with a growing, jittered delay, and registers its names again;
//! new resolves reach it as soon as that is done.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc_core::control::{check_name, DaemonMessage, Incoming, ProviderMessage, Register, RegisterError};
use ipc_core::handshake::{self, LENGTH_PREFIX, MAX_CONTROL_MESSAGE};
use ipc_core::{Hello, Reject, Role, Segment, SegmentLayout, ServerMessage, PROTOCOL_VERSION};
use ipc_platform::{EventFd, Mapping, SocketBell};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::control_conn::{ControlConn, Fds};
use crate::engine::{Engine, SessionEvents, StallTimeout};
use crate::server::{ShutdownHandle, DEFAULT_SPIN, DEFAULT_STALL_TIMEOUT};
use crate::service::{Handler, ServiceTable};
use crate::session::{ClientWake, Session};
use crate::stats::Stats;
use crate::stream_session::Peer;
use crate::worker::{self, Conn, WorkerHandle};

const DAEMON: Token = Token(0);
const WAKER: Token = Token(1);
/// The first wait before connecting to the daemon again.
const FIRST_RETRY: Duration = Duration::from_millis(5);
/// The longest wait between attempts to reach the daemon.
const MAX_RETRY: Duration = Duration::from_millis(500);

/// Why a provider could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The daemon could not be reached.
    #[error("cannot reach ipcd at {}", path.display())]
    Connect {
        /// The control socket tried.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The daemon refused the connection.
    #[error("ipcd refused the provider: {0}")]
    Rejected(Reject),
    /// The daemon refused the names.
    #[error("ipcd refused the names: {0}")]
    Refused(RegisterError),
    /// The daemon's answers broke the protocol.
    #[error("protocol error with ipcd: {0}")]
    Protocol(String),
    /// A configuration value is out of range, or a service name is bad.
    #[error("{0}")]
    Config(String),
    /// A system call failed.
    #[error("a system call failed")]
    Io(#[from] io::Error),
}

/// Builds a [`Provider`].
///
/// ```no_run
/// use ipcd::{Provider, ServiceError};
///
/// let provider = Provider::builder()
///     .service("search.query", |req| Ok::<_, ServiceError>(req.payload().to_ascii_uppercase()))
///     .connect()?; // registers "search.query" with the running ipcd
/// let stop = provider.shutdown_handle();
/// provider.run()?; // until stop.shutdown()
/// # Ok::<(), ipcd::ProviderError>(())
/// ```
pub struct ProviderBuilder {
    socket: Option<PathBuf>,
    services: Vec<(String, Handler)>,
    pooled: bool,
    workers: Option<usize>,
    spin: Duration,
    stall_timeout: Duration,
    max_ring_capacity: u32,
    max_sessions: usize,
    connect_timeout: Duration,
    handler_threads: usize,
    max_message: u64,
}

impl Default for ProviderBuilder {
    fn default() -> ProviderBuilder {
        ProviderBuilder {
            socket: None,
            services: Vec::new(),
            pooled: false,
            workers: None,
            spin: DEFAULT_SPIN,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            max_ring_capacity: 16 << 20,
            max_sessions: 4096,
            connect_timeout: Duration::from_secs(5),
            handler_threads: crate::pool::DEFAULT_HANDLER_THREADS,
            max_message: crate::server::DEFAULT_MAX_MESSAGE,
        }
    }
}

impl ProviderBuilder {
    /// The daemon's control socket (default:
    /// [`ipc_platform::default_socket_path`], the clients' rule).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Offers the names with other providers (each new session goes to the
    /// provider with the fewest), instead of holding them alone (the
    /// default: a second provider of a name is refused while this one
    /// lives).
    pub fn pooled(mut self, pooled: bool) -> Self {
        self.pooled = pooled;
        self
    }

    /// Worker threads (default: the available cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// How long a worker watches idle rings before sleeping (as
    /// [`crate::ServerBuilder::spin`]).
    pub fn spin(mut self, limit: Duration) -> Self {
        self.spin = limit;
        self
    }

    /// How long a client may leave its replies unread before its session
    /// is closed (as [`crate::ServerBuilder::stall_timeout`]).
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t;
        self
    }

    /// The largest ring a client's session may have, in bytes (default 16
    /// MiB; the daemon's own limit applies too).
    pub fn max_ring_capacity(mut self, bytes: u32) -> Self {
        self.max_ring_capacity = bytes;
        self
    }

    /// The most sessions served at once (default 4096); past it, new ones
    /// are declined (the client gets an explicit "unavailable").
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = n;
        self
    }

    /// How long to wait for the daemon to answer (default 5 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// The longest message a session takes or sends (as
    /// [`crate::ServerBuilder::max_message`]). What a provider's sessions
    /// hold for a while (requests being assembled, replies and stream items
    /// waiting to be sent) is charged against a budget of a quarter of the
    /// machine's memory (the daemon charges the sessions themselves).
    pub fn max_message(mut self, bytes: u64) -> Self {
        self.max_message = bytes;
        self
    }

    crate::service::service_methods!();

    /// Connects to the daemon and registers the names: an error says why
    /// the daemon refused them (a name held by another live provider names
    /// its pid and uid). [`Provider::run`] then serves.
    pub fn connect(self) -> Result<Provider, ProviderError> {
        let workers = match self.workers {
            Some(0) => return Err(ProviderError::Config("workers must be at least 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if self.services.is_empty() {
            return Err(ProviderError::Config("a provider offers at least one service".into()));
        }
        if self.stall_timeout.is_zero() {
            return Err(ProviderError::Config("the stall timeout must be positive".into()));
        }
        if self.handler_threads == 0 {
            return Err(ProviderError::Config("handler threads must be at least 1".into()));
        }
        if self.max_message == 0 {
            return Err(ProviderError::Config("the largest message must be at least 1 byte".into()));
        }
        let mut services = ServiceTable::new(self.handler_threads);
        for (name, handler) in self.services {
            check_name(&name).map_err(|e| ProviderError::Config(format!("service name {name:?}: {e}")))?;
            services.add(name, handler).map_err(ProviderError::Config)?;
        }
        let socket = self.socket.unwrap_or_else(ipc_platform::default_socket_path);
        let register = Register {
            services: services.directory(),
            pooled: self.pooled,
            max_ring_capacity: self.max_ring_capacity,
            sessions: 0,
        };
        let (stream, provider_id) = register_with(&socket, &register, self.connect_timeout)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::new(workers, 0, services.directory().len()));
        let events = Box::new(Reports { tx: Mutex::new(tx), waker: Arc::clone(&waker) });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let budget = crate::settings::default_max_shm();
        let engine = Arc::new(Engine {
            workers,
            spin: if cores > 1 { self.spin } else { Duration::ZERO },
            stall_timeout: StallTimeout::new(self.stall_timeout),
            services,
            stats,
            limits: Arc::new(crate::limits::Limits::new(budget, usize::MAX)),
            max_message: crate::server::clamp_max_message(self.max_message, budget),
            shutting_down: AtomicBool::new(false),
            events,
            retirer: std::sync::OnceLock::new(),
        });
        let mut link = Link {
            socket,
            register,
            connect_timeout: self.connect_timeout,
            max_sessions: self.max_sessions,
            conn: None,
            generation: 0,
            retry: Retry::new(),
            sessions: HashMap::new(),
            next_local: 1,
            provider_id,
        };
        link.attach(&poll, stream)?;
        Ok(Provider { engine, poll, waker, reports: rx, link })
    }
}

/// A provider connected to the daemon, its names registered: [`run`] it.
///
/// [`run`]: Provider::run
pub struct Provider {
    engine: Arc<Engine>,
    poll: Poll,
    waker: Arc<Waker>,
    reports: Receiver<Report>,
    link: Link,
}

impl Provider {
    /// A builder with the defaults.
    pub fn builder() -> ProviderBuilder {
        ProviderBuilder::default()
    }

    /// The daemon's id for this provider (in its logs and `stats`); it
    /// changes when the provider registers again with a restarted daemon.
    pub fn provider_id(&self) -> u64 {
        self.link.provider_id
    }

    /// Serves Prometheus metrics of the calls this provider serves at
    /// `addr` (`GET /metrics`) while the returned server lives: the daemon
    /// never sees brokered calls, so their counts are here. The same names
    /// as the daemon's (`ipcd_calls_total` by service and outcome,
    /// `ipcd_sessions`, `ipcd_build_info`); `addr` must be a loopback
    /// address unless `allow_remote`.
    #[cfg(feature = "metrics")]
    pub fn serve_metrics(
        &self,
        addr: std::net::SocketAddr,
        allow_remote: bool,
    ) -> Result<crate::MetricsServer, crate::MetricsError> {
        let names = self.engine.services.directory().into_iter().map(|e| e.name).collect();
        let metrics = crate::metrics::ProviderMetrics { stats: Arc::clone(&self.engine.stats), names };
        crate::metrics::serve(addr, allow_remote, metrics)
    }

    /// A handle that stops the provider from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(Arc::clone(&self.engine), Arc::clone(&self.waker))
    }

    /// Serves until shut down: takes the sessions the daemon brokers, and
    /// keeps registered across daemon restarts. On shutdown, as the daemon
    /// does, it answers what waits with a shutdown error, tells each client
    /// the last request it took, and closes every session.
    pub fn run(mut self) -> Result<(), ProviderError> {
        let mut workers = worker::spawn_all(&self.engine)?;
        let mut events = Events::with_capacity(64);
        while !self.engine.shutting_down.load(Ordering::Acquire) {
            let timeout = self.link.retry_at().map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stop(&mut workers);
                return Err(e.into());
            }
            if events.iter().any(|e| e.token() == DAEMON) {
                self.link.daemon_ready(&self.poll, &self.engine, &workers);
            }
            while let Ok(report) = self.reports.try_recv() {
                self.link.report(&self.poll, report);
            }
            if self.link.retry_at().is_some_and(|at| at <= Instant::now()) {
                self.link.reconnect(&self.poll);
            }
        }
        self.stop(&mut workers);
        Ok(())
    }

    fn stop(&mut self, workers: &mut [WorkerHandle]) {
        self.engine.shutting_down.store(true, Ordering::Release);
        for w in workers.iter() {
            w.wake();
        }
        for w in workers.iter_mut() {
            w.join();
        }
        // Closing the connection frees the names at once.
        self.link.conn = None;
        tracing::info!(provider = self.link.provider_id, "provider stopped");
    }
}

/// What the workers report about sessions, for the daemon.
enum Report {
    Struck(u64),
    Closed(u64),
}

struct Reports {
    tx: Mutex<Sender<Report>>,
    waker: Arc<Waker>,
}

impl Reports {
    fn send(&self, report: Report) {
        let sent = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(report);
        if sent.is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl SessionEvents for Reports {
    fn struck(&self, _peer: &Peer, session: u64) {
        self.send(Report::Struck(session));
    }

    fn closed(&self, session: u64) {
        self.send(Report::Closed(session));
    }
}

/// A session this provider serves, as the daemon knows it.
#[derive(Clone, Copy)]
struct Brokered {
    /// Which connection to the daemon brought it: only that daemon knows
    /// its id.
    generation: u64,
    session_id: u64,
}

/// The provider's side of its connection to the daemon.
struct Link {
    socket: PathBuf,
    register: Register,
    connect_timeout: Duration,
    max_sessions: usize,
    conn: Option<ControlConn>,
    /// Bumped with each connection, so reports reach only the daemon that
    /// brokered the session.
    generation: u64,
    retry: Retry,
    /// Sessions served, by the local id their workers know them by.
    sessions: HashMap<u64, Brokered>,
    next_local: u64,
    provider_id: u64,
}

impl Link {
    fn attach(&mut self, poll: &Poll, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::UnixStream::from_std(stream);
        poll.registry().register(&mut stream, DAEMON, Interest::READABLE | Interest::WRITABLE)?;
        self.conn = Some(ControlConn::new(stream, Fds::Accept));
        self.generation += 1;
        self.retry = Retry::new();
        Ok(())
    }

    /// When to try reaching the daemon again, if it is lost.
    fn retry_at(&self) -> Option<Instant> {
        self.conn.is_none().then_some(self.retry.at)
    }

    fn lose(&mut self, poll: &Poll, why: &str) {
        if let Some(mut conn) = self.conn.take() {
            let _ = poll.registry().deregister(&mut conn.stream);
            tracing::warn!(
                provider = self.provider_id,
                sessions = self.sessions.len(),
                "lost the daemon ({why}); sessions go on; connecting again"
            );
        }
        self.retry.at = Instant::now();
    }

    fn reconnect(&mut self, poll: &Poll) {
        self.register.sessions = u32::try_from(self.sessions.len()).unwrap_or(u32::MAX);
        match register_with(&self.socket, &self.register, self.connect_timeout) {
            Ok((stream, id)) => {
                self.provider_id = id;
                if let Err(e) = self.attach(poll, stream) {
                    tracing::warn!("cannot watch the daemon connection: {e}");
                    self.retry.back_off();
                    return;
                }
                tracing::info!(provider = id, sessions = self.sessions.len(), "registered again with the daemon");
            }
            Err(e) => {
                tracing::debug!("the daemon is not back yet: {e}");
                self.retry.back_off();
            }
        }
    }

    fn daemon_ready(&mut self, poll: &Poll, engine: &Engine, workers: &[WorkerHandle]) {
        // Reading stops at the connection's limits (offers carry fds): take
        // what came, then read on until the socket is empty.
        loop {
            let Some(conn) = self.conn.as_mut() else { return };
            let more = match conn.flush().and_then(|()| conn.receive()) {
                Ok(more) => more,
                Err(e) => return self.lose(poll, &e),
            };
            loop {
                let Some(conn) = self.conn.as_mut() else { return };
                let message = match conn.next::<DaemonMessage>() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return self.lose(poll, &format!("bad message: {e}")),
                };
                match message {
                    DaemonMessage::Incoming(incoming) => {
                        let fds = match conn.take_fds(incoming.fd_count()) {
                            Ok(fds) => fds,
                            Err(e) => return self.lose(poll, &e),
                        };
                        self.incoming(poll, engine, workers, incoming, fds);
                    }
                    other => return self.lose(poll, &format!("unexpected message {other:?}")),
                }
            }
            if !more {
                break;
            }
        }
        if self.conn.as_ref().is_some_and(|c| c.closed) {
            self.lose(poll, "the daemon hung up");
        }
    }

    /// Takes a session the daemon brokers: checks its parts, gives it to
    /// the least busy worker, and accepts it (or declines, saying why).
    fn incoming(
        &mut self,
        poll: &Poll,
        engine: &Engine,
        workers: &[WorkerHandle],
        incoming: Incoming,
        fds: Vec<OwnedFd>,
    ) {
        let session_id = incoming.session_id;
        let answer = if self.sessions.len() >= self.max_sessions {
            Err(format!("the provider serves its maximum of {} sessions", self.max_sessions))
        } else {
            let local = self.next_local;
            open_session(local, &incoming, fds).and_then(|session| {
                let worker = worker::least_busy(workers, &engine.stats);
                engine.stats.connected.fetch_add(1, Ordering::Relaxed);
                worker.adopt(Conn::Shm(session)).map_err(|e| {
                    engine.stats.connected.fetch_sub(1, Ordering::Relaxed);
                    format!("no worker takes it: {e}")
                })?;
                self.next_local += 1;
                self.sessions.insert(local, Brokered { generation: self.generation, session_id });
                tracing::debug!(session = session_id, local, caller = %incoming.caller, "session taken");
                Ok(())
            })
        };
        let reply = match answer {
            Ok(()) => ProviderMessage::Accept { session_id },
            Err(reason) => {
                tracing::warn!(session = session_id, caller = %incoming.caller, "declined a session: {reason}");
                ProviderMessage::Decline { session_id, reason }
            }
        };
        self.send(poll, &reply);
    }

    fn send(&mut self, poll: &Poll, message: &ProviderMessage) {
        let Some(conn) = self.conn.as_mut() else { return };
        if let Err(e) = conn.send(message, &[]) {
            self.lose(poll, &e);
        }
    }

    /// Passes a worker's report on to the daemon that brokered the
    /// session (a daemon that restarted since never knew it).
    fn report(&mut self, poll: &Poll, report: Report) {
        let (local, closed) = match report {
            Report::Struck(local) => (local, false),
            Report::Closed(local) => (local, true),
        };
        let found = if closed { self.sessions.remove(&local) } else { self.sessions.get(&local).copied() };
        let Some(b) = found else { return };
        if b.generation != self.generation {
            // Brokered by an earlier daemon: this one knows it only as a
            // count, which it lowers (a strike cannot reach the daemon that
            // knew the client).
            if closed && self.conn.is_some() {
                self.send(poll, &ProviderMessage::EarlierClosed);
            }
            return;
        }
        let message = if closed {
            ProviderMessage::Closed { session_id: b.session_id }
        } else {
            ProviderMessage::Strike {
                session_id: b.session_id,
                reason: "broke the ring protocol or left its replies unread".into(),
            }
        };
        self.send(poll, &message);
    }
}

/// Checks a brokered session's parts as a client checks a welcome, and
/// builds the session a worker serves.
fn open_session(local: u64, incoming: &Incoming, fds: Vec<OwnedFd>) -> Result<Session, String> {
    let layout = SegmentLayout::new(incoming.ring_capacity).map_err(|e| e.to_string())?;
    if incoming.max_payload != layout.max_payload() {
        return Err(format!(
            "maximum payload {} does not match ring capacity {}",
            incoming.max_payload, incoming.ring_capacity
        ));
    }
    let mut fds = fds.into_iter();
    let (Some(memfd), Some(bell), Some(liveness)) = (fds.next(), fds.next(), fds.next()) else {
        return Err("the session came without its file descriptors".into());
    };
    // Refused unless sealed against resizing and of the announced size.
    let region = Mapping::map(memfd.as_fd(), layout.segment_size()).map_err(|e| e.to_string())?;
    drop(memfd);
    SegmentLayout::read_header(&region, incoming.ring_capacity).map_err(|e| e.to_string())?;
    let bell = EventFd::from_fd(bell).map_err(|e| e.to_string())?;
    let liveness = UnixStream::from(liveness);
    liveness.set_nonblocking(true).map_err(|e| format!("the liveness socket: {e}"))?;
    let wake = match fds.next() {
        Some(fd) => ClientWake::Pollable(SocketBell::from_fd(fd)),
        None => ClientWake::Futex,
    };
    // The provider's ends: it reads requests and writes replies.
    let Segment { request_consumer, response_producer, words, .. } = Segment::new(region, &layout);
    // Calls to services the daemon did not grant this client are refused,
    // each with an error for that call alone.
    Ok(Session::brokered(
        local,
        incoming.caller,
        &incoming.granted,
        mio::net::UnixStream::from_std(liveness),
        bell,
        wake,
        request_consumer,
        response_producer,
        words,
    ))
}

/// Connects to the daemon at `socket`, says it is a provider and registers
/// `register`'s names; returns the connection and the provider's id.
fn register_with(socket: &Path, register: &Register, timeout: Duration) -> Result<(UnixStream, u64), ProviderError> {
    let connect_err = |source| ProviderError::Connect { path: socket.to_path_buf(), source };
    let mut stream = ipc_platform::connect_unix(socket, timeout).map_err(connect_err)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let hello =
        handshake::encode(&Hello::for_role(Role::Provider)).map_err(|e| ProviderError::Protocol(e.to_string()))?;
    stream.write_all(&hello).map_err(connect_err)?;
    match read_message::<ServerMessage>(&mut stream)? {
        ServerMessage::Accepted { version, .. } if version == PROTOCOL_VERSION => {}
        ServerMessage::Accepted { version, .. } => {
            return Err(ProviderError::Protocol(format!(
                "the daemon speaks protocol {version}, not {PROTOCOL_VERSION}"
            )))
        }
        ServerMessage::Reject(r) => return Err(ProviderError::Rejected(r)),
        ServerMessage::Welcome(_) => {
            return Err(ProviderError::Protocol("a provider's hello answered with a welcome".into()))
        }
    }
    let bytes = handshake::encode(&ProviderMessage::Register(register.clone()))
        .map_err(|e| ProviderError::Protocol(e.to_string()))?;
    stream.write_all(&bytes).map_err(connect_err)?;
    match read_message::<DaemonMessage>(&mut stream)? {
        DaemonMessage::Registered { provider_id } => Ok((stream, provider_id)),
        DaemonMessage::Refused(e) => Err(ProviderError::Refused(e)),
        other => Err(ProviderError::Protocol(format!("the daemon answered the registration with {other:?}"))),
    }
}

/// Reads one framed message, blocking (within the stream's timeouts). Only
/// for the answers before serving starts, which carry no fds.
fn read_message<T: serde::de::DeserializeOwned>(stream: &mut UnixStream) -> Result<T, ProviderError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    stream.read_exact(&mut prefix)?;
    let len = handshake::body_len(prefix).map_err(|e| ProviderError::Protocol(e.to_string()))?;
    debug_assert!(len <= MAX_CONTROL_MESSAGE);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    handshake::decode(&body).map_err(|e| ProviderError::Protocol(e.to_string()))
}

/// When to try reaching a lost daemon again: soon at first, then doubling,
/// each wait jittered so that providers that lost one daemon do not all
/// come back at the same instant.
struct Retry {
    at: Instant,
    delay: Duration,
    seed: u64,
}

impl Retry {
    fn new() -> Retry {
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = (u64::from(std::process::id()) << 32 ^ clock.as_nanos() as u64) | 1;
        Retry { at: Instant::now(), delay: FIRST_RETRY, seed }
    }

    fn back_off(&mut self) {
        // xorshift: enough to spread providers apart.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = 0.5 + (self.seed % 1000) as f64 / 1000.0;
        self.at = Instant::now() + self.delay.mul_f64(jitter);
        self.delay = (self.delay * 2).min(MAX_RETRY);
    }
}
