//! ipcd under a service manager, played by the test: sockets passed with
//! socket activation (by `systemd-socket-activate`, which listens, then
//! execs ipcd with the sockets as fds 3, 4, ... on the first connection),
//! and the notifications (`READY=1`, `STOPPING=1`, `WATCHDOG=1`) on a
//! notify socket the test binds. The watchdog's pings stop while a handler
//! holds the only worker, and start again when it returns.

mod common;

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    connect, expect_worker_in_handler, join_within, poll_until, watchdog, Daemon, EXIT_LIMIT, HANG_UP_LIMIT,
    STARTUP_LIMIT, TEST_LIMIT,
};
use ipc_client::{ClientOptions, Transport};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The socket activator of systemd's tools (systemd-socket-activate(1)).
const ACTIVATOR: &str = "systemd-socket-activate";

/// Datagrams sent to a notify socket the test listens on, as a service
/// manager would, each split into its lines.
struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::Builder::new().prefix("ipcd-notify-").tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("cannot bind the notify socket");
        // Wakes often enough to notice the test is done.
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (lines, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let reader = {
            let (lines, stop) = (Arc::clone(&lines), Arc::clone(&stop));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        lines.lock().unwrap().extend(text.lines().map(str::to_string));
                    }
                }
            })
        };
        NotifySocket { path, lines, stop, reader: Some(reader), _dir: dir }
    }

    /// How many times `line` (`READY=1`, say) has come.
    fn count(&self, line: &str) -> usize {
        self.lines.lock().unwrap().iter().filter(|l| *l == line).count()
    }

    /// Waits until `line` has come at least `n` times, for at most `limit`.
    fn wait_for(&self, line: &str, n: usize, limit: Duration) -> bool {
        poll_until(limit, || self.count(line) >= n)
    }

    fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// ipcd started by the socket activator: the activator's process, which
/// becomes ipcd's when it execs it. Dropping it kills and reaps the
/// process if it still runs.
struct Activated {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
}

impl Activated {
    /// Starts the activator listening on each `(address, name)` (a name
    /// given as `FileDescriptorName=`; none if empty), passing `env` on
    /// (the activator passes on only what it is told) and running ipcd
    /// with `args`. `None` where the activator is not installed.
    fn start(listen: &[(OsString, &str)], env: &[(&str, &Path)], args: &[&str]) -> Option<Activated> {
        let mut cmd = Command::new(ACTIVATOR);
        for (address, name) in listen {
            cmd.arg("-l").arg(address);
            if !name.is_empty() {
                cmd.arg(format!("--fdname={name}"));
            }
        }
        for (key, value) in env {
            let mut pair = OsString::from(format!("{key}="));
            pair.push(value);
            cmd.arg("-E").arg(pair);
        }
        cmd.arg(common::IPCD).args(["--log-level", "info"]).args(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        common::die_with_parent(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipped: {ACTIVATOR} is not installed");
                return None;
            }
            Err(e) => panic!("cannot start {ACTIVATOR}: {e}"),
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
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
        Some(Activated { child, stderr, drain })
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the activator has exec'd ipcd (the process is called
    /// `ipcd`), so that a signal reaches ipcd and not the activator.
    fn wait_exec(&mut self) {
        let pid = self.pid();
        let ipcd = poll_until(STARTUP_LIMIT, || {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ipcd")
        });
        assert!(ipcd, "the activator did not start ipcd; stderr:\n{}", self.stderr());
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll the activated process") {
                if let Some(drain) = self.drain.take() {
                    let _ = drain.join();
                }
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {limit:?}; stderr:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        if self.child.try_wait().expect("cannot poll the activated process").is_none() {
            signal::kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("cannot signal ipcd");
        }
        self.wait_exit(EXIT_LIMIT)
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("--- activated ipcd stderr ---\n{}--- end ---", self.stderr());
        }
    }
}

fn options() -> ClientOptions {
    // Generous: the first connection is what makes the activator start
    // ipcd, on a machine that may be busy.
    ClientOptions::default().connect_timeout(STARTUP_LIMIT)
}

#[test]
fn passed_sockets_are_served_and_their_files_stay() {
    watchdog(TEST_LIMIT, || {
        let dir = tempfile::Builder::new().prefix("ipcd-test-").tempdir().unwrap();
        let (control, uds) = (dir.path().join("ipcd.sock"), dir.path().join("ipcd-stream.sock"));
        let notify = NotifySocket::bind();
        let listen = [(control.clone().into(), "control"), (uds.clone().into(), "uds")];
        let Some(mut ipcd) = Activated::start(&listen, &[("NOTIFY_SOCKET", &notify.path)], &["--workers", "1"]) else {
            return;
        };
        // The activator listens first, and starts ipcd at the first
        // connection: this client's, which thus waited for ipcd to start.
        assert!(
            poll_until(STARTUP_LIMIT, || control.exists() && uds.exists()),
            "the activator does not listen; stderr:\n{}",
            ipcd.stderr()
        );
        let mut shm = connect(&Transport::Shm(control.clone()), options());
        ipcd.wait_exec();
        assert!(notify.wait_for("READY=1", 1, STARTUP_LIMIT), "no READY=1; got {:?}", notify.all());
        let echo = shm.service("echo").unwrap();
        assert_eq!(shm.call(&echo, b"over shared memory").unwrap(), b"over shared memory");
        let mut stream = connect(&Transport::Uds(uds.clone()), options());
        let echo = stream.service("echo").unwrap();
        assert_eq!(stream.call(&echo, b"over the stream socket").unwrap(), b"over the stream socket");
        let stderr = ipcd.stderr();
        assert!(stderr.contains("given=[\"control\", \"uds\"]"), "not logged as passed in:\n{stderr}");

        let status = ipcd.terminate();
        assert!(status.success(), "exited with {status}; stderr:\n{}", ipcd.stderr());
        assert!(notify.wait_for("STOPPING=1", 1, HANG_UP_LIMIT), "no STOPPING=1; got {:?}", notify.all());
        assert_eq!(notify.count("READY=1"), 1, "{:?}", notify.all());
        // The files are the manager's: ipcd neither removed them nor took
        // a lock for them.
        assert!(control.exists() && uds.exists(), "ipcd removed a socket file it did not bind");
        for lock in ["ipcd.sock.lock", "ipcd-stream.sock.lock"] {
            assert!(!dir.path().join(lock).exists(), "ipcd took {lock} for a passed socket");
        }
    });
}

/// A start under socket activation that ipcd must refuse.
struct Refused<'a> {
    /// What the activator passes, as `(address, name)`.
    listen: Vec<(OsString, &'a str)>,
    /// ipcd's arguments.
    args: &'a [&'a str],
    /// Its exit status, and what its error says.
    code: i32,
    says: &'a str,
}

/// Connects to `address` (a path, or `@name` for an abstract socket), to
/// make the activator start ipcd; whether ipcd then answers does not
/// matter.
fn knock(address: &OsString) {
    use std::os::linux::net::SocketAddrExt;
    let address = address.to_str().expect("addresses in these tests are UTF-8");
    let _ = match address.strip_prefix('@') {
        Some(name) => {
            std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| UnixStream::connect_addr(&a))
        }
        None => UnixStream::connect(address),
    };
}

#[test]
fn passed_sockets_that_cannot_be_served_are_refused() {
    watchdog(TEST_LIMIT, || {
        let dir = tempfile::Builder::new().prefix("ipcd-test-").tempdir().unwrap();
        let path = |name: &str| OsString::from(dir.path().join(name));
        let cases = [
            // An abstract socket has no permissions: anyone could connect.
            Refused {
                listen: vec![(format!("@ipcd-test-abstract-{}", std::process::id()).into(), "control")],
                args: &[],
                code: 1,
                says: "abstract address",
            },
            // Of several sockets, each must say which listener it is.
            Refused {
                listen: vec![(path("a.sock"), "control"), (path("b.sock"), "stream")],
                args: &[],
                code: 2,
                says: "socket 1 passed by the service manager is named \"stream\"",
            },
            // A passed control socket and --socket are one listener twice.
            Refused {
                listen: vec![(path("c.sock"), "control")],
                args: &["--socket", "/nonexistent/ipcd.sock"],
                code: 2,
                says: "same listener",
            },
        ];
        for Refused { listen, args, code, says } in cases {
            let Some(mut ipcd) = Activated::start(&listen, &[], args) else { return };
            let exited = poll_until(STARTUP_LIMIT, || {
                knock(&listen[0].0);
                ipcd.child.try_wait().unwrap().is_some()
            });
            assert!(exited, "ipcd did not refuse {listen:?}; stderr:\n{}", ipcd.stderr());
            let status = ipcd.wait_exit(EXIT_LIMIT);
            let stderr = ipcd.stderr();
            assert_eq!(status.code(), Some(code), "{listen:?}: exited with {status}; stderr:\n{stderr}");
            assert!(stderr.contains(says), "{listen:?}: no {says:?} in stderr:\n{stderr}");
        }
    });
}

/// The watchdog interval the tests set (`WATCHDOG_USEC`): ipcd checks its
/// loops, and pings, every half of it.
const INTERVAL: Duration = Duration::from_secs(1);

/// How long the handler holds the worker: far longer than the grace and
/// the two intervals watched, so that the worker is still in it when the
/// watch ends on a slow machine too (checked: its call has not returned).
const HANDLER_MS: u32 = 8_000;

#[test]
fn the_watchdog_is_pinged_while_every_loop_turns_and_not_while_a_handler_holds_one() {
    let notify = NotifySocket::bind();
    let usec = (INTERVAL.as_micros() as u64).to_string();
    let mut daemon = Daemon::builder()
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", usec)
        .args(["--debug-services", "--workers", "1"])
        .start();
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        assert!(notify.wait_for("READY=1", 1, STARTUP_LIMIT), "no READY=1; got {:?}", notify.all());
        // An idle daemon is alive: its worker sleeps in its poll, and
        // turns when the check wakes it.
        assert!(notify.wait_for("WATCHDOG=1", 3, STARTUP_LIMIT), "no pings from an idle daemon");

        let caller = thread::spawn(move || {
            let mut client = ipc_client::Client::connect_to(&socket).unwrap();
            let sleep = client.service("debug.sleep").unwrap();
            client.call(&sleep, &HANDLER_MS.to_le_bytes())
        });
        expect_worker_in_handler(pid);
        // A check made before the worker entered the handler saw it turn,
        // and its ping may still come: one interval covers it (it comes
        // within half of one). From then on the worker is inside the
        // handler, and no check passes: over two whole intervals (four
        // checks), not one ping.
        thread::sleep(INTERVAL);
        let before = notify.count("WATCHDOG=1");
        thread::sleep(2 * INTERVAL);
        let after = notify.count("WATCHDOG=1");
        assert!(!caller.is_finished(), "the handler returned before the watch ended: the test proves nothing");
        assert_eq!(after, before, "pinged while the only worker was inside a handler");

        // Once the handler returns, the worker turns and the pings resume.
        let reply = join_within(caller, Duration::from_secs(u64::from(HANDLER_MS / 1000) + 30), "the caller");
        assert_eq!(reply, Ok(Vec::new()));
        assert!(notify.wait_for("WATCHDOG=1", after + 1, STARTUP_LIMIT), "the pings did not resume");
        let stderr = daemon.stderr();
        assert!(stderr.contains("worker 0 has not turned its loop"), "the stuck worker is not logged:\n{stderr}");

        let status = daemon.terminate();
        assert!(status.success(), "exited with {status}");
        assert!(notify.wait_for("STOPPING=1", 1, HANG_UP_LIMIT), "no STOPPING=1; got {:?}", notify.all());
    });
}

/// A watchdog interval short enough that its pings, if any were sent,
/// would come many times while the test below waits.
const SHORT_INTERVAL: Duration = Duration::from_millis(200);

#[test]
fn a_watchdog_meant_for_another_process_is_not_pinged() {
    let notify = NotifySocket::bind();
    // The manager's watchdog is for process 1, not ipcd: a variable ipcd
    // inherited, say, from a parent that was watched.
    let mut daemon = Daemon::builder()
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", (SHORT_INTERVAL.as_micros() as u64).to_string())
        .env("WATCHDOG_PID", "1")
        .start();
    watchdog(TEST_LIMIT, move || {
        assert!(notify.wait_for("READY=1", 1, STARTUP_LIMIT), "no READY=1; got {:?}", notify.all());
        let status_line = notify.all().into_iter().find(|l| l.starts_with("STATUS="));
        assert!(status_line.is_some_and(|l| l.contains("serving on")), "{:?}", notify.all());
        // Pinging every half interval, ipcd would have sent about twenty
        // by now.
        thread::sleep(10 * SHORT_INTERVAL);
        let mut client = daemon.client();
        let ping = client.service("ping").unwrap();
        client.call(&ping, b"").unwrap();
        let status = daemon.terminate();
        assert!(status.success(), "exited with {status}");
        assert!(notify.wait_for("STOPPING=1", 1, HANG_UP_LIMIT), "no STOPPING=1; got {:?}", notify.all());
        assert_eq!(notify.count("WATCHDOG=1"), 0, "pinged another process's watchdog: {:?}", notify.all());
    });
}
