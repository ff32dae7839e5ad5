//! What the integration tests share: a real `ipcd` process per test, raw
//! control-socket and ring access for tests that play a hostile client,
//! watchdogs, and small readers for the `stats` service's JSON.
//!
//! Every test file compiles its own copy of this module and uses only part
//! of it, hence the `dead_code` allowance.

#![allow(dead_code)]

/// Runs each named test function (taking the transport's name) as a
/// test of its own over shared memory, a Unix socket and TCP: in modules
/// `shm`, `uds` and `tcp`, for the files that `#[macro_use]` this one.
#[allow(unused_macros)]
macro_rules! on_every_transport {
    ($($test:ident),* $(,)?) => {
        mod shm {
            $(#[test] fn $test() { super::$test("shm") })*
        }
        mod uds {
            $(#[test] fn $test() { super::$test("uds") })*
        }
        mod tcp {
            $(#[test] fn $test() { super::$test("tcp") })*
        }
    };
}

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use ipc_client::raw::RawSession;
use ipc_client::{Client, ClientOptions};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{DoorbellKind, FrameHeader, Hello, ServerMessage, Welcome};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The daemon under test, built by cargo for this test run.
pub const IPCD: &str = env!("CARGO_BIN_EXE_ipcd");

/// How long a daemon may take to start listening. Generous because a
/// loaded 2-core CI machine may be linking other test binaries meanwhile.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// How long a daemon may take to exit after a signal.
pub const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// The watchdog over a whole test body. It only turns a hang into a
/// failure; it is not a performance bound.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);

/// How long the daemon may take to close a connection it has given up on.
pub const HANG_UP_LIMIT: Duration = Duration::from_secs(10);

/// How long asynchronous clean-up (a worker closing a session) may take to
/// become visible.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

/// A `Command` for the ipcd binary that cannot outlive the test thread that
/// spawns it, so that a test killed or hung mid-way leaves no daemon behind.
pub fn ipcd_command() -> Command {
    let mut cmd = Command::new(IPCD);
    die_with_parent(&mut cmd);
    cmd
}

/// Makes the kernel SIGKILL the child when the thread that spawned it exits.
pub use ipc_platform::die_with_parent;

/// Configures a [`Daemon`] before it starts.
pub struct DaemonBuilder {
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    dir: Option<tempfile::TempDir>,
    inherit_stderr: bool,
}

impl DaemonBuilder {
    /// Adds one command-line argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds command-line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Runs the daemon in `dir` (its socket is `dir/ipcd.sock`), for tests
    /// that prepare the path beforehand.
    pub fn dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Lets the daemon write to the test's stderr instead of capturing it.
    pub fn inherit_stderr(mut self) -> Self {
        self.inherit_stderr = true;
        self
    }

    /// Starts the daemon and waits until it accepts connections.
    ///
    /// # Panics
    ///
    /// Panics, with the daemon's stderr, if it exits or does not listen
    /// within [`STARTUP_LIMIT`].
    pub fn start(self) -> Daemon {
        let dir = match self.dir {
            Some(d) => d,
            None => {
                tempfile::Builder::new().prefix("ipcd-test-").tempdir().expect("cannot create a temporary directory")
            }
        };
        let socket = dir.path().join("ipcd.sock");
        let mut cmd = ipcd_command();
        cmd.arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if self.inherit_stderr { Stdio::inherit() } else { Stdio::piped() });
        let mut child = cmd.spawn().expect("cannot spawn ipcd");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        // The pipe is drained continuously so that a chatty daemon never
        // blocks on a full pipe while a test waits for it.
        let drain = child.stderr.take().map(|mut pipe| {
            let sink = Arc::clone(&stderr);
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        });
        let mut daemon = Daemon { child, socket, stderr, drain, dir: Some(dir) };
        daemon.wait_listening();
        daemon
    }
}

/// A running ipcd process with its own socket in a temporary directory.
///
/// Dropping it SIGKILLs the daemon if it still runs, reaps it (no zombie),
/// and removes the directory. A test that panics gets the daemon's stderr
/// printed.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
    stderr: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
    // Declared last so the directory outlives the process using it; `None`
    // only after `into_dir`.
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// A builder with no extra arguments.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder { args: Vec::new(), envs: Vec::new(), dir: None, inherit_stderr: false }
    }

    /// Starts a daemon with `args` besides `--socket` and `--log-level`.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::builder().args(args.iter().copied()).start()
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll ipcd") {
                self.join_drain();
                panic!("ipcd exited during startup with {status}; stderr:\n{}", self.stderr());
            }
            // A bare connect that hangs up at once proves the acceptor
            // queue is live without creating a session.
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "ipcd did not listen on {} within {STARTUP_LIMIT:?}; stderr:\n{}",
                    self.socket.display(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The control socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temporary directory holding the socket.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("directory present").path()
    }

    /// Kills the daemon (if it still runs) and hands over its directory,
    /// with whatever the daemon left in it, to start another daemon there.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        self.kill();
        self.dir.take().expect("directory present")
    }

    /// Open file descriptors of the daemon.
    pub fn fd_count(&self) -> usize {
        fd_count(self.pid())
    }

    /// What the daemon wrote to stderr so far (empty if inherited).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Whether the process is still running (reaping it if not).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("cannot poll ipcd").is_none()
    }

    /// Sends `sig` to the daemon if it still runs. A reaped pid may have
    /// been reused by another process, so it is never signalled.
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            signal::kill(Pid::from_raw(self.pid() as i32), sig).expect("cannot signal ipcd");
        }
    }

    /// Waits up to `limit` for the daemon to exit.
    ///
    /// # Panics
    ///
    /// Panics, with the daemon's stderr, if it is still running after
    /// `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll ipcd") {
                self.join_drain();
                return status;
            }
            if Instant::now() >= deadline {
                panic!("ipcd still runs {limit:?} after it was asked to stop; stderr:\n{}", self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits (at most [`EXIT_LIMIT`]) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(EXIT_LIMIT)
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait_exit(EXIT_LIMIT)
    }

    /// A client with the default options.
    ///
    /// # Panics
    ///
    /// Panics, with the daemon's stderr, if the connection fails.
    pub fn client(&self) -> Client {
        match Client::connect_to(&self.socket) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to ipcd: {e}; stderr:\n{}", self.stderr()),
        }
    }

    fn join_drain(&mut self) {
        if let Some(t) = self.drain.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.join_drain();
        if thread::panicking() {
            eprintln!("--- ipcd stderr ---\n{}--- end ---", self.stderr());
        }
    }
}

/// Waits until the daemon's first worker thread sleeps inside a handler
/// (debug.sleep), so that what is sent to that worker next queues behind
/// it. Returns false where the thread's current system call cannot be read.
///
/// # Panics
///
/// Panics if the worker is not seen in a sleep within `limit`.
pub fn wait_worker_in_handler(pid: u32, limit: Duration) -> bool {
    // nanosleep and clock_nanosleep; epoll_wait is what an idle worker
    // sits in.
    let sleeps: &[u64] = if cfg!(target_arch = "x86_64") {
        &[35, 230]
    } else if cfg!(target_arch = "aarch64") {
        &[101, 115]
    } else {
        return false;
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let worker = tasks
        .flatten()
        .map(|t| t.path())
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "ipcd-worker-0"));
    let Some(worker) = worker else {
        return false;
    };
    let syscall = || std::fs::read_to_string(worker.join("syscall")).ok();
    if syscall().is_none() {
        return false;
    }
    let in_sleep = || {
        syscall()
            .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
            .is_some_and(|n| sleeps.contains(&n))
    };
    assert!(poll_until(limit, in_sleep), "the worker never entered the debug.sleep handler");
    true
}

/// [`wait_worker_in_handler`] for a test that cannot go on without knowing
/// the worker took the request: where the worker's system call cannot be
/// read, it fails, rather than guess with a sleep.
///
/// # Panics
///
/// Panics if the worker is not seen in the handler within
/// [`HANG_UP_LIMIT`], or cannot be seen at all.
pub fn expect_worker_in_handler(pid: u32) {
    // The worker may not have started yet (nor named its thread) when it
    // is handed the session, and the wait below looks for it only once.
    worker_thread(pid);
    assert!(
        wait_worker_in_handler(pid, HANG_UP_LIMIT),
        "cannot read /proc/{pid}/task/<tid>/syscall, which this test needs to know the worker is in a handler"
    );
}

/// The id of process `pid`'s thread called `name`, if it has one.
pub fn thread_named(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

/// The thread id of the daemon `pid`'s first worker, once it has started.
///
/// # Panics
///
/// Panics if it has not within [`STARTUP_LIMIT`].
pub fn worker_thread(pid: u32) -> u32 {
    let mut tid = None;
    let started = poll_until(STARTUP_LIMIT, || {
        tid = thread_named(pid, "ipcd-worker-0");
        tid.is_some()
    });
    assert!(started, "the daemon {pid} has no thread ipcd-worker-0");
    tid.expect("found")
}

/// The system call thread `tid` of process `pid` is blocked in, as
/// `/proc/<pid>/task/<tid>/syscall` tells: `None` while the thread runs,
/// or where the kernel does not say.
pub fn blocked_in_syscall(pid: u32, tid: u32) -> Option<i64> {
    let line = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    // "running", "-1 <sp> <pc>" outside a system call, else the number
    // and its arguments.
    line.split_whitespace().next()?.parse().ok().filter(|&n| n >= 0)
}

/// The system calls a thread sleeps in: a futex wait, a poll, an epoll
/// wait, as this architecture numbers them.
pub mod sleeping_syscalls {
    /// A futex wait (the futex doorbell): `futex_waitv` on the ring words
    /// and the liveness watcher's word, or `futex` on a kernel without it.
    pub const FUTEX: &[i64] = &[libc::SYS_futex, libc::SYS_futex_waitv];
    /// `poll` and `ppoll` (the pollable doorbell).
    #[cfg(target_arch = "x86_64")]
    pub const POLL: &[i64] = &[libc::SYS_poll, libc::SYS_ppoll];
    /// `ppoll` (the pollable doorbell).
    #[cfg(not(target_arch = "x86_64"))]
    pub const POLL: &[i64] = &[libc::SYS_ppoll];
    /// The epoll waits (a worker with nothing to do).
    #[cfg(target_arch = "x86_64")]
    pub const EPOLL: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
    /// The epoll waits (a worker with nothing to do).
    #[cfg(not(target_arch = "x86_64"))]
    pub const EPOLL: &[i64] = &[libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
}

/// Bytes written on the Unix stream socket `stream` that its peer has not
/// read yet (`SIOCOUTQ`): 0 once the peer has taken everything sent.
pub fn unread_by_peer(stream: &UnixStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's value) on a socket writes one c_int
    // through the pointer, which points to `queued`, alive and writable for
    // the whole call; the fd is open, borrowed from `stream`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    assert_eq!(rc, 0, "SIOCOUTQ failed: {}", io::Error::last_os_error());
    usize::try_from(queued).expect("a queue length is not negative")
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("cannot list /proc/<pid>/fd").count()
}

/// Polls until the fd count of process `pid` stops changing for a moment,
/// and returns it: a daemon closes a session's fds just after the effects
/// a test can see.
///
/// # Panics
///
/// Panics if the count keeps changing for [`CLEANUP_LIMIT`].
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    let settled = poll_until(CLEANUP_LIMIT, || {
        thread::sleep(Duration::from_millis(50));
        let now = fd_count(pid);
        std::mem::replace(&mut last, now) == now
    });
    assert!(settled, "the daemon's fd count does not settle");
    last
}

/// Whether the daemon's fd count comes back to `baseline` within
/// [`CLEANUP_LIMIT`].
pub fn fds_back_to(pid: u32, baseline: usize) -> bool {
    poll_until(CLEANUP_LIMIT, || settled_fd_count(pid) == baseline)
}

/// A hello of this build, framed, as the client library sends it by
/// default (64 KiB rings, futex doorbell).
pub fn good_hello() -> Vec<u8> {
    handshake::encode(&Hello::new(65536, DoorbellKind::Futex)).unwrap()
}

/// One frame on the wire of a stream transport.
pub fn frame(service: u16, flags: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader { len: payload.len() as u32, service, flags, request_id };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// The id of the service called `name` in `welcome`.
///
/// # Panics
///
/// Panics if the welcome does not offer it.
pub fn service_id(welcome: &Welcome, name: &str) -> u16 {
    welcome.services.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no service {name:?}")).id
}

/// Lines of `/proc/<pid>/maps` that mention `needle`.
pub fn mapping_count(pid: u32, needle: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("cannot read /proc/<pid>/maps")
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Runs `f` on its own thread and returns its result, or panics if it has
/// not finished within `limit`, so no test can hang forever. A panic in `f`
/// is passed on unchanged.
pub fn watchdog<T, F>(limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("watched".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("cannot spawn a thread");
    match rx.recv_timeout(limit) {
        Ok(value) => {
            let _ = handle.join();
            value
        }
        Err(RecvTimeoutError::Timeout) => panic!("watchdog: not finished within {limit:?}"),
        Err(RecvTimeoutError::Disconnected) => match handle.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => unreachable!("the thread ended without sending its result"),
        },
    }
}

/// Joins `handle`, or panics if its thread has not finished within `limit`.
pub fn join_within<T>(handle: JoinHandle<T>, limit: Duration, what: &str) -> T {
    let deadline = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            panic!("watchdog: {what} not finished within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
    match handle.join() {
        Ok(v) => v,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// Joins every thread, passing on the first panic (with its message).
pub fn join_all<T>(threads: impl IntoIterator<Item = JoinHandle<T>>) -> Vec<T> {
    threads
        .into_iter()
        .map(|t| match t.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        })
        .collect()
}

/// Polls `cond` every few milliseconds until it holds or `limit` passes;
/// returns whether it held. For state that changes asynchronously, instead
/// of a fixed sleep.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The `stats` service's JSON.
pub fn stats_json(client: &mut Client) -> String {
    let stats = client.service("stats").expect("stats service");
    let reply = client.call(&stats, b"").expect("stats call");
    String::from_utf8(reply).expect("stats replies UTF-8")
}

/// The unsigned integer after `"key":` in compact JSON. The stats keys are
/// unique across the document, so no real parser is needed.
///
/// # Panics
///
/// Panics if the key is missing or not followed by an integer.
pub fn json_u64(json: &str, key: &str) -> u64 {
    json_u64_opt(json, key).unwrap_or_else(|| panic!("no integer {key:?} in stats: {json}"))
}

/// [`json_u64`], `None` where the key is missing (the broker's counts
/// appear once it first publishes them).
pub fn json_u64_opt(json: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let at = json.find(&pattern)?;
    let digits: String = json[at + pattern.len()..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Polls the stats until the counter `key` satisfies `want` (or
/// [`CLEANUP_LIMIT`] passes) and returns its last value and the JSON it
/// came from, for the caller to assert on. The daemon bumps some counters
/// just after the effect a test can observe (a reject sent, a connection
/// closed), so a single read may be a moment early.
pub fn stat_eventually(client: &mut Client, key: &str, want: impl Fn(u64) -> bool) -> (u64, String) {
    let mut json = stats_json(client);
    poll_until(CLEANUP_LIMIT, || {
        json = stats_json(client);
        json_u64_opt(&json, key).is_some_and(&want)
    });
    (json_u64(&json, key), json)
}

/// `len` bytes that differ for every `seed`, so a reply carrying another
/// call's bytes cannot pass for the right one.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How the daemon answered on the control socket.
#[derive(Debug)]
pub enum Answer {
    /// A complete message, with the fds that came with it.
    Message(ServerMessage, Vec<OwnedFd>),
    /// The daemon closed the connection (or reset it) without a message.
    Closed,
}

impl Answer {
    /// The message, or a panic naming what came instead.
    pub fn message(self) -> (ServerMessage, Vec<OwnedFd>) {
        match self {
            Answer::Message(m, fds) => (m, fds),
            Answer::Closed => panic!("the daemon closed the connection without an answer"),
        }
    }
}

/// Connects a bare control connection whose reads and writes give up after
/// [`HANG_UP_LIMIT`].
pub fn raw_connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("cannot connect to the control socket");
    stream.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
    stream.set_write_timeout(Some(HANG_UP_LIMIT)).unwrap();
    stream
}

/// Reads one length-prefixed answer and its fds.
///
/// # Panics
///
/// Panics if nothing arrives within the stream's read timeout, if the
/// answer is cut short, or if it does not decode.
pub fn read_answer(stream: &UnixStream) -> Answer {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= LENGTH_PREFIX {
            let len = handshake::body_len([buf[0], buf[1], buf[2], buf[3]]).expect("answer length prefix");
            if buf.len() >= LENGTH_PREFIX + len {
                assert_eq!(buf.len(), LENGTH_PREFIX + len, "stray bytes after the answer");
                let msg = handshake::decode_server_message(&buf[LENGTH_PREFIX..]).expect("answer decodes");
                return Answer::Message(msg, fds);
            }
        }
        match ipc_platform::recv_with_fds(stream.as_fd(), &mut chunk) {
            Ok((0, got)) if got.is_empty() => {
                assert!(buf.is_empty(), "answer cut short after {} bytes", buf.len());
                return Answer::Closed;
            }
            Ok((n, got)) => {
                fds.extend(got);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && buf.is_empty() => {
                return Answer::Closed;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no answer from the daemon: {e}"),
        }
    }
}

/// Sends `bytes` on a fresh control connection and reads the answer.
pub fn exchange(socket: &Path, bytes: &[u8]) -> Answer {
    let mut stream = raw_connect(socket);
    stream.write_all(bytes).expect("cannot send to the daemon");
    read_answer(&stream)
}

/// Opens a session by hand (see [`RawSession`]) with a hello for `capacity`
/// and `doorbell`, whose control connection gives up after
/// [`HANG_UP_LIMIT`].
///
/// # Panics
///
/// Panics if the handshake or the segment checks fail.
pub fn raw_session(socket: &Path, capacity: u32, doorbell: DoorbellKind) -> RawSession {
    let options = ClientOptions::default().ring_capacity(capacity).doorbell(doorbell).connect_timeout(HANG_UP_LIMIT);
    RawSession::connect(socket, &options).unwrap_or_else(|e| panic!("cannot open a raw session: {e}"))
}

/// What tests do with a [`RawSession`] beyond the library's methods.
pub trait RawSessionExt {
    /// The id of the service called `name`.
    ///
    /// # Panics
    ///
    /// Panics if the welcome does not offer it.
    fn service(&self, name: &str) -> u16;

    /// Sends one well-formed request and polls for its response (the raw
    /// session never announces sleep, so the daemon never has to wake it).
    fn call(&mut self, service: u16, request_id: u64, payload: &[u8]) -> (FrameHeader, Vec<u8>);

    /// Waits until the daemon closes the control connection.
    ///
    /// # Panics
    ///
    /// Panics if the connection is still open after `limit`, or if the
    /// daemon sends anything on it.
    fn expect_hang_up(&mut self, limit: Duration);
}

impl RawSessionExt for RawSession {
    fn service(&self, name: &str) -> u16 {
        self.service_id(name).unwrap_or_else(|| panic!("no service {name:?} in the welcome"))
    }

    fn call(&mut self, service: u16, request_id: u64, payload: &[u8]) -> (FrameHeader, Vec<u8>) {
        self.requests.try_push(service, 0, request_id, payload).expect("request fits");
        self.requests.publish();
        self.ring().expect("cannot ring the daemon's doorbell");
        let deadline = Instant::now() + HANG_UP_LIMIT;
        let mut body = Vec::new();
        loop {
            if let Some(header) = self.responses.try_pop(&mut body).expect("response ring") {
                self.responses.release();
                return (header, body);
            }
            assert!(Instant::now() < deadline, "no response to request {request_id} within {HANG_UP_LIMIT:?}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn expect_hang_up(&mut self, limit: Duration) {
        match self.wait_hang_up(limit) {
            Ok(true) => {}
            Ok(false) => panic!("the daemon did not close the session within {limit:?}"),
            Err(e) => panic!("waiting for the daemon to close the session: {e}"),
        }
    }
}

/// Where a daemon started by [`start_with_streams`] listens: its control
/// socket (shared memory), its `--uds` socket and its `--tcp` address.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// The control socket, for shared-memory clients.
    pub shm: PathBuf,
    /// The Unix stream socket.
    pub uds: PathBuf,
    /// The TCP address on loopback.
    pub tcp: std::net::SocketAddr,
}

impl Endpoints {
    /// The three transports, shared memory first.
    pub fn all(&self) -> [ipc_client::Transport; 3] {
        [
            ipc_client::Transport::Shm(self.shm.clone()),
            ipc_client::Transport::Uds(self.uds.clone()),
            ipc_client::Transport::Tcp(self.tcp),
        ]
    }

    /// The transport called `name` (`shm`, `uds` or `tcp`).
    ///
    /// # Panics
    ///
    /// Panics on any other name.
    pub fn transport(&self, name: &str) -> ipc_client::Transport {
        self.all().into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("no transport {name:?}"))
    }
}

/// A loopback address whose port was free a moment ago. The daemon does not
/// print the port it picks for `--tcp 127.0.0.1:0`, so tests choose one.
pub fn free_loopback_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("cannot bind a loopback port");
    listener.local_addr().expect("a bound listener has an address")
}

/// Starts a daemon that also serves `--uds` (in its directory) and `--tcp`
/// (on a free loopback port), with `args` besides, and waits until all three
/// listeners accept connections.
///
/// # Panics
///
/// Panics, with the daemon's stderr, if it does not come up (including the
/// unlikely case of another process taking the port between its choice and
/// the daemon's bind).
pub fn start_with_streams(args: &[&str]) -> (Daemon, Endpoints) {
    let dir = tempfile::Builder::new().prefix("ipcd-test-").tempdir().expect("cannot create a temporary directory");
    let uds = dir.path().join("ipcd-stream.sock");
    let tcp = free_loopback_addr();
    let mut daemon = Daemon::builder()
        .dir(dir)
        .arg("--uds")
        .arg(&uds)
        .arg("--tcp")
        .arg(tcp.to_string())
        .args(args.iter().copied())
        .start();
    // The control socket is bound before the stream listeners, so its being
    // up says nothing about them: a bare connect proves each.
    let up = poll_until(STARTUP_LIMIT, || {
        !daemon.is_running() || (UnixStream::connect(&uds).is_ok() && std::net::TcpStream::connect(tcp).is_ok())
    });
    assert!(
        up && daemon.is_running(),
        "ipcd does not listen on {} and {tcp}; stderr:\n{}",
        uds.display(),
        daemon.stderr()
    );
    let shm = daemon.socket().to_path_buf();
    (daemon, Endpoints { shm, uds, tcp })
}

/// Starts a daemon in `dir` that also serves `--uds` at
/// `dir/ipcd-stream.sock`, with `args` besides, and waits until both Unix
/// listeners accept connections. Returns the daemon and the `--uds` path.
///
/// # Panics
///
/// Panics, with the daemon's stderr, if it does not come up.
pub fn start_with_uds_in(dir: tempfile::TempDir, args: &[&str]) -> (Daemon, PathBuf) {
    let uds = dir.path().join("ipcd-stream.sock");
    let mut daemon = Daemon::builder().dir(dir).arg("--uds").arg(&uds).args(args.iter().copied()).start();
    // The control socket is bound first, so its being up says nothing
    // about the other.
    let up = poll_until(STARTUP_LIMIT, || !daemon.is_running() || UnixStream::connect(&uds).is_ok());
    assert!(up && daemon.is_running(), "ipcd does not listen on {}; stderr:\n{}", uds.display(), daemon.stderr());
    (daemon, uds)
}

/// [`start_with_uds_in`] a fresh temporary directory.
pub fn start_with_uds(args: &[&str]) -> (Daemon, PathBuf) {
    let dir = tempfile::Builder::new().prefix("ipcd-test-").tempdir().expect("cannot create a temporary directory");
    start_with_uds_in(dir, args)
}

/// Connects through `transport` with `options`.
///
/// # Panics
///
/// Panics, naming the transport, if the connection fails.
pub fn connect(transport: &ipc_client::Transport, options: ipc_client::ClientOptions) -> Client {
    match Client::connect_with(transport.clone(), options) {
        Ok(c) => {
            assert_eq!(c.transport(), transport.name(), "the client reports another transport");
            c
        }
        Err(e) => panic!("cannot connect to ipcd over {}: {e}", transport.name()),
    }
}

/// A request of the daemon's built-in `stream.count`: `n` items of `size`
/// bytes.
pub fn stream_count(n: u32, size: u32) -> Vec<u8> {
    [n.to_le_bytes(), size.to_le_bytes()].concat()
}

/// Item `i` of a `stream.count` stream of items of `size` bytes, as the
/// daemon documents it: `i` as a little-endian `u64` (cut to `size`), the
/// rest filled with `i as u8`.
pub fn count_item(i: u32, size: u32) -> Vec<u8> {
    let mut item = vec![i as u8; size as usize];
    let head = u64::from(i).to_le_bytes();
    let n = head.len().min(item.len());
    item[..n].copy_from_slice(&head[..n]);
    item
}
