//! The idle scenario: what clients that wait for a reply that does not
//! come cost the machine, and how soon they notice their daemon's death.
//!
//! N clients (threads, futex doorbells) connect to a private daemon, which
//! is then stopped (SIGSTOP) so that the call each makes next is never
//! answered: every client sleeps in its wait. The context switches of all
//! of stress's threads over a window are the wake-ups of N idle clients.
//! Then the daemon is SIGKILLed, and each blocked call must end
//! `Disconnected`; the time from the kill to each call's end is how late
//! the death was noticed. The whole runs twice in one command (or once, as
//! `watchers` says): with the liveness watcher turned off (a sleeping wait
//! looks at its peer every 50 ms, as before the watcher) and on.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc_client::{CallError, Client, ClientOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::fleet;
use crate::report::two_figures;
use crate::workload::new_histogram;

/// What the scenario runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: PathBuf,
    pub clients: usize,
    /// How long the idle clients are watched.
    pub window: Duration,
    pub spin: Option<Duration>,
    /// The passes, in order: `false` for the 50 ms checks, `true` for the
    /// watcher.
    pub watchers: Vec<bool>,
}

/// One pass: with the watcher or without.
#[derive(Debug)]
struct Pass {
    watcher: bool,
    wakeups_per_s: f64,
    /// From the SIGKILL to each blocked call's end, ns.
    noticed_p50_ns: u64,
    noticed_max_ns: u64,
    disconnected: usize,
    other: Vec<String>,
}

/// Runs both passes and prints the table; whether every call ended
/// `Disconnected`.
pub fn run(config: &Config) -> anyhow::Result<bool> {
    // Two fds per client here, one in the daemon.
    let limit = fleet::raise_limits(2 * config.clients)?;
    eprintln!("stress: idle, {} clients, open-files limit {limit}, load {}", config.clients, loadavg());
    let passes: Vec<_> = config.watchers.iter().map(|&watcher| pass(config, watcher)).collect();
    let mut ok = true;
    println!();
    println!("idle: {} clients, each blocked in a call its stopped daemon never answers", config.clients);
    println!("| liveness | wake-ups/s | per client | SIGKILL noticed: p50 / max ms | disconnected |");
    println!("|---|---|---|---|---|");
    let mut rates = Vec::new();
    for p in passes {
        let p = p?;
        let name = if p.watcher { "watcher thread" } else { "50 ms checks" };
        println!(
            "| {name} | {:.1} | {} | {:.1} / {:.1} | {} of {} |",
            p.wakeups_per_s,
            two_figures(p.wakeups_per_s / config.clients as f64),
            p.noticed_p50_ns as f64 / 1e6,
            p.noticed_max_ns as f64 / 1e6,
            p.disconnected,
            config.clients
        );
        for e in p.other.iter().take(5) {
            println!("  unexpected outcome: {e}");
        }
        ok &= p.other.is_empty() && p.disconnected == config.clients;
        rates.push(p.wakeups_per_s);
    }
    if let [before, after] = rates[..] {
        match after > 0.0 {
            true => println!("50 ms checks against the watcher: {}x the wake-ups", two_figures(before / after)),
            false => println!("50 ms checks against the watcher: no wake-up at all with the watcher"),
        }
    }
    Ok(ok)
}

fn pass(config: &Config, watcher: bool) -> anyhow::Result<Pass> {
    ipc_client::watch_liveness(watcher);
    let daemon = fleet::start_daemon(&config.daemon, config.clients, config.spin)?;
    let socket = daemon.socket().to_path_buf();
    let pid = Pid::from_raw(daemon.pid());
    let n = config.clients;
    // The clients connect, wait while the daemon is stopped, then call.
    let (connected, stopped) = (Arc::new(Barrier::new(n + 1)), Arc::new(Barrier::new(n + 1)));
    let options =
        ClientOptions::default().connect_timeout(Duration::from_secs(120)).call_timeout(Duration::from_secs(600));
    let threads = fleet::spawn_clients(n, {
        let (connected, stopped) = (Arc::clone(&connected), Arc::clone(&stopped));
        move |_| {
            let client = Client::connect_with(socket.as_path(), options.clone()).map_err(|e| e.to_string());
            let client = client.and_then(|mut c| c.service("echo").map(|s| (c, s)).map_err(|e| e.to_string()));
            connected.wait();
            stopped.wait();
            let (mut client, echo) = client?;
            let outcome = client.call(&echo, b"never answered");
            Ok::<_, String>((outcome, Instant::now()))
        }
    })?;
    connected.wait();
    kill(pid, Signal::SIGSTOP).context("cannot stop the daemon")?;
    wait_stopped(pid.as_raw())?;
    stopped.wait();
    // Let every client reach its sleep (it spins first, then announces).
    std::thread::sleep(Duration::from_secs(1));
    let (before, from) = (fleet::context_switches(), Instant::now());
    std::thread::sleep(config.window);
    let (after, to) = (fleet::context_switches(), Instant::now());
    let wakeups_per_s = after.saturating_sub(before) as f64 / (to - from).as_secs_f64();
    let killed = Instant::now();
    kill(pid, Signal::SIGKILL).context("cannot kill the daemon")?;
    let mut noticed = new_histogram();
    let (mut disconnected, mut other) = (0, Vec::new());
    for t in threads {
        match t.join() {
            Ok(Ok((Err(CallError::Disconnected { .. }), ended))) => {
                disconnected += 1;
                noticed.saturating_record(ended.saturating_duration_since(killed).as_nanos() as u64);
            }
            Ok(Ok((outcome, _))) => other.push(format!("{outcome:?}")),
            Ok(Err(e)) => other.push(format!("connect: {e}")),
            Err(_) => other.push("a client thread panicked".into()),
        }
    }
    drop(daemon);
    Ok(Pass {
        watcher,
        wakeups_per_s,
        noticed_p50_ns: noticed.value_at_quantile(0.5),
        noticed_max_ns: noticed.max(),
        disconnected,
        other,
    })
}

/// Waits until `/proc/<pid>/stat` says the process is stopped.
fn wait_stopped(pid: i32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_owned));
        if state.as_deref() == Some("T") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the daemon {pid} did not stop within 10 s of SIGSTOP");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `/proc/loadavg`'s first three fields, for the report.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
