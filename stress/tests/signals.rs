//! Whatever ends stress, nothing it started outlives it. SIGTERM and SIGINT
//! stop its private daemon, its client processes (`--procs`), its hostile
//! process and its provider process and remove the daemon's directory
//! before stress exits
//! with 128 + the signal's number; SIGKILL, which stress cannot catch,
//! takes them along by their parent-death signal.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{binaries, children, poll_until, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long stress may take to start what a test waits for, and what it
/// started may take to go after a signal: generous, for a loaded 2-core
/// machine. Only a failing test waits this long.
const LIMIT: Duration = Duration::from_secs(60);

/// A stress run under test and what it was seen to start. Dropping it, a
/// failed assertion included, SIGKILLs whatever of it still runs (by pid)
/// and removes the daemon's directory if stress left it.
struct Run {
    stress: Child,
    stderr: Arc<Mutex<String>>,
    seen: Vec<Proc>,
    dirs: Vec<PathBuf>,
}

impl Run {
    /// Starts stress with `args` and the ipcd built beside it.
    fn start(args: &[&str]) -> Run {
        let (stress, ipcd) = binaries();
        let mut command = Command::new(stress);
        command.args(args).arg("--daemon").arg(ipcd).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        // Should this test die, stress dies with it.
        ipc_platform::die_with_parent(&mut command);
        let mut stress = command.spawn().expect("cannot start stress");
        // Drained as it comes and never waited for to end: whatever stress
        // started holds the pipe open for as long as it lives.
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = stress.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Run { stress, stderr, seen: Vec::new(), dirs: Vec::new() }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.stress.id() as i32)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stress's private daemon listens; returns it and its
    /// directory (from the `--socket` it was given).
    fn daemon(&mut self) -> (Proc, PathBuf) {
        let mut found = None;
        let up = poll_until(LIMIT, || {
            found = children(self.stress.id(), "ipcd").first().and_then(|&daemon| {
                let args = daemon.cmdline();
                let socket = args.iter().skip_while(|a| *a != "--socket").nth(1)?;
                Some((daemon, PathBuf::from(socket)))
            });
            // Up once stress has announced it (after it accepts): a signal
            // sent before that may stop stress before it says which daemon
            // it started.
            found.as_ref().is_some_and(|(daemon, socket)| {
                socket.exists() && self.stderr().contains(&format!("private ipcd started, pid {}", daemon.pid))
            })
        });
        if let Some((daemon, socket)) = &found {
            self.seen.push(*daemon);
            self.dirs.extend(socket.parent().map(Path::to_path_buf));
        }
        assert!(up, "stress started no daemon that listens within {LIMIT:?}; stderr:\n{}", self.stderr());
        let (daemon, socket) = found.expect("found when up");
        (daemon, socket.parent().expect("the socket is in a directory").to_path_buf())
    }

    /// Waits until stress runs `n` processes of its own binary whose
    /// command line holds `flag`; returns them.
    fn own_children(&mut self, n: usize, flag: &str) -> Vec<Proc> {
        let mut found = Vec::new();
        let all = poll_until(LIMIT, || {
            found = children(self.stress.id(), "stress");
            found.retain(|p| p.cmdline().iter().any(|a| a == flag));
            found.len() >= n
        });
        self.seen.extend(&found);
        assert!(all, "stress started {} of {n} {flag} processes within {LIMIT:?}", found.len());
        found
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("cannot signal stress");
    }

    /// Waits for stress to exit.
    fn exit_status(&mut self) -> ExitStatus {
        let mut status = None;
        poll_until(LIMIT, || {
            status = self.stress.try_wait().expect("cannot poll stress");
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("stress did not exit within {LIMIT:?}; stderr:\n{}", self.stderr()))
    }

    /// Asserts that `p` is gone, or goes within the limit.
    fn assert_gone(&self, p: Proc, what: &str) {
        assert!(
            poll_until(LIMIT, || p.is_gone()),
            "{what} (pid {}) still runs {LIMIT:?} after stress exited; stderr:\n{}",
            p.pid,
            self.stderr()
        );
    }

    /// Asserts that stderr comes to hold `text`.
    fn assert_said(&self, text: &str) {
        assert!(poll_until(LIMIT, || self.stderr().contains(text)), "stress did not say {text:?}:\n{}", self.stderr());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.stress.kill();
        let _ = self.stress.wait();
        for p in &self.seen {
            p.kill();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A long run with client threads, stopped by `signal`: the daemon is
/// gone, its directory removed, and stress says so and exits 128 + the
/// signal.
fn stops_on(signal: Signal) {
    let mut run =
        Run::start(&["--scenario", "throughput", "--transport", "shm", "--clients", "2", "--duration", "600"]);
    let (daemon, dir) = run.daemon();
    run.signal(signal);
    let status = run.exit_status();
    run.assert_gone(daemon, "the private daemon");
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert_eq!(status.code(), Some(128 + signal as i32), "stress ended with {status}");
    run.assert_said(&format!("stress: stopped by {}", signal.as_str()));
    run.assert_said(&format!("pid {}, sockets in {}", daemon.pid, dir.display()));
}

#[test]
fn sigterm_stops_the_daemon_and_removes_its_directory() {
    stops_on(Signal::SIGTERM);
}

#[test]
fn sigint_stops_the_daemon_and_removes_its_directory() {
    stops_on(Signal::SIGINT);
}

#[test]
fn sigterm_stops_client_processes_too() {
    let mut run = Run::start(&[
        "--scenario",
        "throughput",
        "--transport",
        "shm",
        "--procs",
        "--clients",
        "3",
        "--messages",
        "1000000000",
    ]);
    let (daemon, dir) = run.daemon();
    let clients = run.own_children(3, "--child-client");
    run.signal(Signal::SIGTERM);
    let status = run.exit_status();
    run.assert_gone(daemon, "the private daemon");
    for c in clients {
        run.assert_gone(c, "a client process");
    }
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert_eq!(status.code(), Some(128 + Signal::SIGTERM as i32), "stress ended with {status}");
}

/// The hostile process starts once the baseline phase has made its calls;
/// the attack phase's calls leave seconds to find it and stop stress.
#[test]
fn sigterm_stops_the_hostile_process_too() {
    let mut run = Run::start(&[
        "--scenario",
        "hostile",
        "--hostile",
        "2",
        "--clients",
        "1",
        "--messages",
        "200000",
        "--flood",
        "0",
        "--seed",
        "1",
    ]);
    let (daemon, dir) = run.daemon();
    let hostile = run.own_children(1, "--child-attackers");
    run.signal(Signal::SIGTERM);
    let status = run.exit_status();
    run.assert_gone(daemon, "the private daemon");
    run.assert_gone(hostile[0], "the hostile process");
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert_eq!(status.code(), Some(128 + Signal::SIGTERM as i32), "stress ended with {status}");
}

/// The provider process stress starts for the provider scenario is stopped
/// with the daemon; so is its replacement after a kill.
#[test]
fn sigterm_stops_the_provider_process_too() {
    let mut run = Run::start(&[
        "--scenario",
        "provider",
        "--clients",
        "1",
        "--messages",
        "1000000000",
        "--chaos",
        "kill-provider:1",
        "--chaos-ms",
        "1",
    ]);
    let (daemon, dir) = run.daemon();
    // The one started after the kill: stress has announced it.
    run.assert_said("provider of stress.echo restarted");
    let providers: Vec<Proc> = run.own_children(1, "--child-provider").into_iter().filter(|p| !p.is_gone()).collect();
    assert_eq!(providers.len(), 1, "one provider process runs");
    run.signal(Signal::SIGTERM);
    let status = run.exit_status();
    run.assert_gone(daemon, "the private daemon");
    run.assert_gone(providers[0], "the provider process");
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert_eq!(status.code(), Some(128 + Signal::SIGTERM as i32), "stress ended with {status}");
}

/// SIGKILL leaves stress no say: its daemon and client processes die by
/// their parent-death signal (the directory stays, for the test to remove).
#[test]
fn sigkill_takes_the_daemon_and_client_processes_along() {
    let mut run = Run::start(&[
        "--scenario",
        "throughput",
        "--transport",
        "shm",
        "--procs",
        "--clients",
        "2",
        "--messages",
        "1000000000",
    ]);
    let (daemon, _) = run.daemon();
    let clients = run.own_children(2, "--child-client");
    run.signal(Signal::SIGKILL);
    run.exit_status();
    run.assert_gone(daemon, "the private daemon");
    for c in clients {
        run.assert_gone(c, "a client process");
    }
}
