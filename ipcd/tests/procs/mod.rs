//! Providers and callers as processes of their own, for the tests of
//! provided services end to end: the test binary runs itself again with
//! only its helper "test" selected ([`HELPER`]), which reads what to be
//! from its environment, prints one line per thing that happens (each
//! starting with [`MARKER`]) and takes commands on stdin.
//!
//! A provider helper registers its names with `ipcd::Provider` (one
//! worker, each service an upper-casing echo; the service named as the
//! "hold" one waits, the first time, until told `release`), prints
//! `registered ID` (or `refused taken NAME PID UID`, `refused
//! not-permitted REASON`, `failed WHAT`), stops gracefully on SIGTERM as
//! the provider example does (printing `stopping`, then `stopped`), and
//! prints `held PAYLOAD` when its hold service starts a call.
//!
//! A provider's service whose name ends in `whoami` answers with its
//! caller's credentials as the handler sees them: `PID UID GID`. One whose
//! name ends in `stream` is a stream service: item `i` is `i` as a
//! little-endian `u64`, until a send fails (the stream was cut), and it
//! prints `streaming` when a stream begins.
//!
//! A caller helper connects with `ipc_client::Client`, resolves its name
//! (`service`, or `wait_for_service`), calls it and prints `ok PID UID`
//! (the provider's credentials) or `error KIND MESSAGE`; in the `whoami`
//! mode it makes one call and prints `said REPLY`; in the `loop` mode it
//! prints `ready` and calls until told `stop`, answering `report` with
//! `count CALLS FAILED` and ending with `done CALLS FAILED FIRST`.
//!
//! Every helper is spawned with the parent-death signal and killed when
//! its [`Helper`] is dropped, so none outlives its test.

#![allow(dead_code)]

use std::fmt::Display;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_client::{CallError, Client, ClientOptions};
use ipc_core::control::RegisterError;
use ipcd::{Provider, ProviderError, Request, ServiceError};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::common::{die_with_parent, poll_until, stats_json, Daemon, EXIT_LIMIT, HANG_UP_LIMIT};

/// The helper "test" each test binary with helpers defines.
pub const HELPER: &str = "helper_process";
/// Starts every line a helper reports.
pub const MARKER: &str = "IPCD-HELPER ";
/// How long a helper may take to report the next thing: generous, as
/// the helper shares two cores with the daemon, other helpers and builds.
pub const REPORT_LIMIT: Duration = Duration::from_secs(60);
/// How long a caller helper waits for a provider in the `wait` mode.
pub const CALLER_WAIT: Duration = Duration::from_secs(60);

/// The unprivileged user helpers run as (nobody), and another uid and a
/// gid no real group needs to have.
pub const NOBODY: u32 = 65534;
pub const OTHER_UID: u32 = 65533;
pub const OTHER_GID: u32 = 4242;

const ROLE: &str = "IPCD_TEST_HELPER";
const SOCKET: &str = "IPCD_TEST_SOCKET";
const NAMES: &str = "IPCD_TEST_NAMES";
const POOLED: &str = "IPCD_TEST_POOLED";
const HOLD: &str = "IPCD_TEST_HOLD";
const MODE: &str = "IPCD_TEST_MODE";
const CALLS: &str = "IPCD_TEST_CALLS";

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// This process's uid and primary gid.
pub fn own_ids() -> (u32, u32) {
    (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw())
}

/// Starts a daemon with `args` (and `--config CONFIG` if given, the file
/// written beside the socket) whose socket, and the directory holding it,
/// any user may reach, so that helpers of other users can connect.
pub fn start_daemon(config: Option<&str>, args: &[&str]) -> Daemon {
    let dir =
        tempfile::Builder::new().prefix("ipcd-providers-").tempdir().expect("cannot create a temporary directory");
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(text) = config {
        let path = dir.path().join("ipcd.toml");
        std::fs::write(&path, text).expect("cannot write the configuration");
        args.extend(["--config".to_string(), path.display().to_string()]);
    }
    start_daemon_in(dir, &args)
}

/// [`start_daemon`] in `dir` (another daemon's, after it died), with
/// `args` as they are.
pub fn start_daemon_in(dir: tempfile::TempDir, args: &[String]) -> Daemon {
    // Others may pass through, not list: the socket's name is known.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    Daemon::builder().dir(dir).args(["--socket-mode", "666"]).args(args).start()
}

/// The `broker` object of the daemon's `stats`.
pub fn broker_stats(client: &mut Client) -> Value {
    let json: Value = serde_json::from_str(&stats_json(client)).expect("stats is JSON");
    json["broker"].clone()
}

/// The number at `path` (object keys) under `value`.
///
/// # Panics
///
/// Panics, showing `value`, if there is none.
pub fn number(value: &Value, path: &[&str]) -> u64 {
    let mut at = value;
    for key in path {
        at = &at[*key];
    }
    at.as_u64().unwrap_or_else(|| panic!("no number at {path:?} in {value}"))
}

/// As [`number`], for the conditions polled on: 0 where there is none
/// (the broker publishes its counts from its first event on).
pub fn count(value: &Value, path: &[&str]) -> u64 {
    let mut at = value;
    for key in path {
        at = &at[*key];
    }
    at.as_u64().unwrap_or(0)
}

/// The providers of `name` in the broker's stats, as (pid, uid, sessions),
/// in registration order; empty if nobody holds it.
pub fn holders(broker: &Value, name: &str) -> Vec<(u32, u32, u64)> {
    let names = broker["names"].as_array().cloned().unwrap_or_default();
    names
        .iter()
        .filter(|n| n["name"] == name)
        .flat_map(|n| n["providers"].as_array().cloned().unwrap_or_default())
        .map(|p| (number(&p, &["pid"]) as u32, number(&p, &["uid"]) as u32, number(&p, &["sessions"])))
        .collect()
}

/// Polls the broker's stats until `want` holds of them (or
/// [`REPORT_LIMIT`] passes: what they wait for may take a helper process
/// that has yet to start), and returns the last ones read, for the caller
/// to assert on.
pub fn broker_eventually(client: &mut Client, want: impl Fn(&Value) -> bool) -> Value {
    let mut broker = broker_stats(client);
    poll_until(REPORT_LIMIT, || {
        broker = broker_stats(client);
        want(&broker)
    });
    broker
}

/// What a helper will be.
pub struct HelperBuilder {
    envs: Vec<(&'static str, String)>,
    user: Option<(u32, u32)>,
    what: String,
}

impl HelperBuilder {
    /// A provider of `names` on the daemon at `socket`.
    pub fn provider(socket: &Path, names: &[&str]) -> HelperBuilder {
        HelperBuilder {
            envs: vec![(ROLE, "provider".into()), (SOCKET, socket.display().to_string()), (NAMES, names.join(","))],
            user: None,
            what: format!("provider of {names:?}"),
        }
    }

    /// A caller of `name` on the daemon at `socket` (mode `call`: resolve
    /// without waiting, call once).
    pub fn caller(socket: &Path, name: &str) -> HelperBuilder {
        HelperBuilder {
            envs: vec![(ROLE, "caller".into()), (SOCKET, socket.display().to_string()), (NAMES, name.into())],
            user: None,
            what: format!("caller of {name:?}"),
        }
    }

    /// A provider's names are pooled.
    pub fn pooled(mut self) -> Self {
        self.envs.push((POOLED, "1".into()));
        self
    }

    /// A provider's service `name` holds its first call until `release`.
    pub fn hold(mut self, name: &str) -> Self {
        self.envs.push((HOLD, name.into()));
        self
    }

    /// A caller's mode: `call`, `wait` (for a provider to register),
    /// `whoami` or `loop`.
    pub fn mode(mut self, mode: &str) -> Self {
        self.envs.push((MODE, mode.into()));
        self
    }

    /// A caller makes `n` calls (default 1).
    pub fn calls(mut self, n: usize) -> Self {
        self.envs.push((CALLS, n.to_string()));
        self
    }

    /// The helper runs as `uid`:`gid` (which takes root).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self.what = format!("{} as {uid}:{gid}", self.what);
        self
    }

    /// Starts the helper.
    ///
    /// # Panics
    ///
    /// Panics if it cannot be started.
    pub fn spawn(self) -> Helper {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(&exe);
        cmd.args([HELPER, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start the {}: {e}", self.what));
        let stdout = child.stdout.take().expect("piped");
        let transcript = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let seen = Arc::clone(&transcript);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                seen.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(report) = line.strip_prefix(MARKER) {
                    if tx.send(report.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Helper { pid: child.id(), child, lines, stdin, transcript, what: self.what }
    }
}

/// A helper process, killed (if it still runs) and reaped when dropped.
pub struct Helper {
    child: Child,
    pid: u32,
    lines: Receiver<String>,
    stdin: Option<ChildStdin>,
    transcript: Arc<Mutex<String>>,
    what: String,
}

impl Helper {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next line the helper reports.
    ///
    /// # Panics
    ///
    /// Panics, with what the helper printed, if none comes within
    /// [`REPORT_LIMIT`].
    pub fn line(&mut self) -> String {
        match self.lines.recv_timeout(REPORT_LIMIT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the {} reported nothing within {REPORT_LIMIT:?}; stdout:\n{}", self.what, self.stdout())
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                panic!("the {} ended ({status}) without reporting; stdout:\n{}", self.what, self.stdout())
            }
        }
    }

    /// The rest of the next line, which must start with `word`.
    ///
    /// # Panics
    ///
    /// Panics, naming what came, if it starts otherwise.
    pub fn expect(&mut self, word: &str) -> String {
        let line = self.line();
        match line.strip_prefix(word) {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => rest.trim_start().to_string(),
            _ => panic!("the {} reported {line:?}, expected {word:?}; stdout:\n{}", self.what, self.stdout()),
        }
    }

    /// Sends a command line to the helper.
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("the helper's stdin is open");
        writeln!(stdin, "{command}").unwrap_or_else(|e| panic!("cannot tell the {} {command:?}: {e}", self.what));
    }

    /// Sends `sig` to the helper (which has not been reaped: its pid is
    /// still its own).
    pub fn signal(&mut self, sig: Signal) {
        assert!(self.child.try_wait().unwrap().is_none(), "the {} has already exited", self.what);
        signal::kill(Pid::from_raw(self.pid as i32), sig).expect("cannot signal the helper");
    }

    /// Waits up to [`EXIT_LIMIT`] for the helper to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the {} still runs after {EXIT_LIMIT:?}", self.what);
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, and reaps it: once this returns, every fd the helper held
    /// is closed.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait_exit();
    }

    fn stdout(&self) -> String {
        self.transcript.lock().unwrap().clone()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a caller helper reported.
#[derive(Debug, PartialEq, Eq)]
pub enum Called {
    /// Its calls came back right, from the provider with this pid and uid.
    Ok { pid: u32, uid: u32 },
    /// The first thing that failed, as the kind of [`CallError`] (see
    /// [`kind`]) and its message.
    Error { kind: String, message: String },
}

impl Called {
    /// Parses what follows the marker.
    ///
    /// # Panics
    ///
    /// Panics on any other line.
    pub fn parse(line: &str) -> Called {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next(), words.next()) {
            (Some("ok"), Some(pid), Some(uid)) => Called::Ok { pid: pid.parse().unwrap(), uid: uid.parse().unwrap() },
            (Some("error"), Some(kind), message) => {
                Called::Error { kind: kind.to_string(), message: message.unwrap_or_default().to_string() }
            }
            _ => panic!("a caller reported {line:?}"),
        }
    }
}

/// Runs a caller helper to its end and returns what it reported.
pub fn run_caller(builder: HelperBuilder) -> Called {
    let mut caller = builder.spawn();
    let called = Called::parse(&caller.line());
    caller.wait_exit();
    called
}

/// A word for each kind of call error, as helpers report them.
pub fn kind(e: &CallError) -> &'static str {
    match e {
        CallError::NotPermitted { .. } => "not-permitted",
        CallError::UnknownService { .. } => "unknown-service",
        CallError::Unavailable { .. } => "unavailable",
        CallError::Disconnected { .. } => "disconnected",
        CallError::NotConnected { .. } => "not-connected",
        CallError::Shutdown => "shutdown",
        CallError::Timeout { .. } => "timeout",
        CallError::BadResolution { .. } => "bad-resolution",
        CallError::Remote { .. } => "remote",
        _ => "other",
    }
}

/// Everything below runs in the helper process.
fn say(line: impl Display) {
    // libtest has printed the test's name without a line break, so the
    // marker starts a fresh line of its own.
    println!("\n{MARKER}{line}");
    std::io::stdout().flush().unwrap();
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

/// The body of the helper "test": does nothing unless started as a helper.
pub fn helper_main() {
    match env(ROLE).as_deref() {
        None => {}
        Some("provider") => provider_main(),
        Some("caller") => caller_main(),
        Some(other) => panic!("unknown helper role {other:?}"),
    }
}

/// Commands from the test, one per line on stdin, until it closes it.
fn commands() -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

fn provider_main() {
    let socket = PathBuf::from(env(SOCKET).expect("socket"));
    let names = env(NAMES).expect("names");
    let hold = env(HOLD);
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let mut builder =
        Provider::builder().socket(&socket).workers(1).pooled(env(POOLED).is_some()).connect_timeout(HANG_UP_LIMIT);
    for name in names.split(',') {
        if hold.as_deref() == Some(name) {
            let gate = Arc::clone(&gate);
            builder = builder.service(name, move |req: &Request<'_>| {
                say(format!("held {}", String::from_utf8_lossy(req.payload())));
                let (open, turn) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = turn.wait(open).unwrap();
                }
                Ok::<_, ServiceError>(req.payload().to_ascii_uppercase())
            });
        } else if name.ends_with("stream") {
            builder = builder.stream_service(name, |_request, mut items| {
                say("streaming");
                let mut i = 0u64;
                while items.send(i.to_le_bytes().to_vec()).is_ok() {
                    i += 1;
                }
            });
        } else if name.ends_with("whoami") {
            builder = builder.service(name, |req: &Request<'_>| match req.caller() {
                Some(c) => Ok(format!("{} {} {}", c.pid, c.uid, c.gid).into_bytes()),
                None => Err(ServiceError::new("no caller")),
            });
        } else {
            builder = builder.service(name, |req: &Request<'_>| Ok(req.payload().to_ascii_uppercase()));
        }
    }
    let provider = match builder.connect() {
        Ok(p) => p,
        Err(ProviderError::Refused(RegisterError::Taken { name, holder })) => {
            return say(format!("refused taken {name} {} {}", holder.pid, holder.uid))
        }
        Err(ProviderError::Refused(RegisterError::NotPermitted { reason })) => {
            return say(format!("refused not-permitted {reason}"))
        }
        Err(e) => return say(format!("failed {e}")),
    };
    // As the provider example does: SIGTERM stops it gracefully.
    let stop = provider.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM]).unwrap();
    thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.shutdown();
            say("stopping");
        }
    });
    let commands = commands();
    thread::spawn(move || {
        for command in commands {
            if command == "release" {
                let (open, turn) = &*gate;
                *open.lock().unwrap() = true;
                turn.notify_all();
            }
        }
    });
    say(format!("registered {}", provider.provider_id()));
    match provider.run() {
        Ok(()) => say("stopped"),
        Err(e) => say(format!("failed {e}")),
    }
}

fn caller_main() {
    let socket = PathBuf::from(env(SOCKET).expect("socket"));
    let name = env(NAMES).expect("name");
    let mode = env(MODE).unwrap_or_else(|| "call".into());
    let calls: usize = env(CALLS).map_or(1, |n| n.parse().unwrap());
    let options = ClientOptions::default().connect_timeout(HANG_UP_LIMIT);
    let mut client = match Client::connect_with(&socket, options) {
        Ok(c) => c,
        Err(e) => return say(format!("error connect {e}")),
    };
    let resolved = match mode.as_str() {
        "wait" => client.wait_for_service(&name, CALLER_WAIT),
        _ => client.service(&name),
    };
    let service = match resolved {
        Ok(s) => s,
        Err(e) => return say(format!("error {} {e}", kind(&e))),
    };
    if mode == "whoami" {
        return match client.call(&service, b"") {
            Ok(reply) => say(format!("said {}", String::from_utf8_lossy(&reply))),
            Err(e) => say(format!("error {} {e}", kind(&e))),
        };
    }
    let me = std::process::id();
    let mut call = |client: &mut Client, i: usize| -> Result<(), String> {
        let request = format!("call {i} from {me}");
        match client.call(&service, request.as_bytes()) {
            Ok(reply) if reply == request.to_uppercase().into_bytes() => Ok(()),
            Ok(reply) => Err(format!("other wrong reply {:?} to {request:?}", String::from_utf8_lossy(&reply))),
            Err(e) => Err(format!("{} {e}", kind(&e))),
        }
    };
    if mode == "loop" {
        return caller_loop(&mut client, &mut call);
    }
    for i in 0..calls {
        if let Err(what) = call(&mut client, i) {
            return say(format!("error {what}"));
        }
    }
    let provider = client.provider(&service).expect("a provided service has a provider");
    say(format!("ok {} {}", provider.pid, provider.uid));
}

/// Calls until told `stop`, counting the calls and the failures.
fn caller_loop(client: &mut Client, call: &mut dyn FnMut(&mut Client, usize) -> Result<(), String>) {
    if let Err(what) = call(client, 0) {
        return say(format!("error {what}"));
    }
    let commands = commands();
    say("ready");
    let (mut calls, mut failed, mut first) = (1usize, 0usize, String::from("-"));
    loop {
        match commands.try_recv() {
            Ok(command) if command == "report" => say(format!("count {calls} {failed}")),
            Ok(command) if command == "stop" => break,
            Ok(_) | Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => break,
        }
        if let Err(what) = call(client, calls) {
            failed += 1;
            if failed == 1 {
                first = what;
            }
        }
        calls += 1;
    }
    say(format!("done {calls} {failed} {first}"));
}
