//! The `provider` scenario: calls through a provider process the daemon
//! brokers to, beside the daemon's own echo in the same run.
//!
//! stress starts its private daemon and a provider process
//! ([`crate::provider`]) that offers [`SERVICE`] through it with the
//! daemon's engine settings. Then, over shared memory:
//!
//! - each workload (throughput, latency, pipelined) runs twice, with the
//!   same clients, calls and payload: first against the daemon's `echo`,
//!   then against the provider's, whose sessions the daemon brokers and
//!   whose calls never pass through it; the comparison is the provider's
//!   figure over the daemon's;
//! - resolves in a row: each on a fresh client whose connect, and whose
//!   broker connection (opened by a resolve of a name nobody provides),
//!   are made before the clock starts, so the figure is the resolve alone:
//!   the broker's checks, the hand-off to the provider and its answer.
//!
//! With `--chaos kill-provider:N`, the throughput workload runs against the
//! provider alone, with clients that reconnect, while the provider process
//! is killed with SIGKILL and started again N times; with `--chaos
//! restart-daemon:N`, while the daemon is killed and started again, which
//! established brokered sessions must not notice.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use ipc_client::{CallError, Client, ClientOptions, Transport};
use serde::Serialize;
use serde_json::Value;

use crate::chaos::{ms, Chaos};
use crate::daemon::PrivateDaemon;
use crate::progress::{self, Goal, Progress};
use crate::provider::{ProviderProcess, Replaced, Settings, MAX_RING_SIZE, SERVICE};
use crate::report::{self, two_figures, Connect, Run, Spec};
use crate::workload::{self, new_histogram, Probe, Workload, ECHO};

/// A name nobody provides: resolving it opens the broker connection.
const UNPROVIDED: &str = "stress.nobody";

/// What the scenario runs, validated from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// The ipcd binary to start.
    pub daemon: PathBuf,
    /// This binary, for the provider process.
    pub exe: PathBuf,
    /// The workloads, each run against the daemon and the provider (with
    /// chaos, the throughput workload alone, against the provider).
    pub specs: Vec<Spec>,
    /// Resolves in a row (0: none).
    pub resolves: usize,
    pub call_timeout: Duration,
    /// The clients', the daemon's and the provider's spin limit.
    pub spin: Option<Duration>,
    pub chaos: Option<Chaos>,
    /// The window of the provider kills, or the pause before each daemon
    /// restart.
    pub chaos_period: Duration,
    pub seed: u64,
    pub json: Option<PathBuf>,
}

/// The provider scenario's own figures: the `provider` object of the
/// JSON document.
#[derive(Serialize, Debug)]
pub struct ProviderFigures {
    /// The name the provider offers.
    pub service: &'static str,
    /// The engine settings of the daemon and the provider alike.
    pub workers: usize,
    pub spin_us: Option<u64>,
    pub max_ring_size: u32,
    /// Resolves of the provided name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolve: Option<ResolveFigures>,
    /// Each workload's headline figure, the daemon's against the
    /// provider's.
    pub comparison: Vec<Comparison>,
}

/// Resolves of the provided name, one after another.
#[derive(Serialize, Debug)]
pub struct ResolveFigures {
    pub resolves: usize,
    /// Resolves that did not give a session (or whose setup failed).
    pub failed: usize,
    /// The resolve alone: connected, broker connection open.
    pub resolve_us: Connect,
    /// Before it: opening the broker connection and the refused resolve of
    /// a name nobody provides.
    pub broker_open_us: Connect,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// A workload's headline figure against the daemon and the provider.
#[derive(Serialize, Debug)]
pub struct Comparison {
    pub scenario: &'static str,
    pub payload_bytes: usize,
    /// `msgs_per_s` (throughput, pipelined) or `p50_us` (latency).
    pub figure: &'static str,
    pub daemon: f64,
    pub provider: f64,
    /// The provider's figure over the daemon's.
    pub ratio: f64,
    /// Whether both runs passed; if not, the ratio is no measure of
    /// either and its goal is not judged.
    pub runs_passed: bool,
    /// The goal of the ratio (`>= 0.9`, `<= 1.2`), if it has one, and
    /// whether this run met it (absent when a run failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// Goals of the ratios, measured in one run.
const THROUGHPUT_GOAL: f64 = 0.9;
const LATENCY_GOAL: f64 = 1.2;
/// The goal of the resolve's p50, in microseconds.
const RESOLVE_GOAL_US: f64 = 1000.0;

/// One kill of the provider process.
#[derive(Serialize, Debug)]
pub struct ProviderKill {
    /// When it was killed, in ms after the calls started.
    pub killed_at_ms: f64,
    /// From the kill until the killed process was reaped.
    pub reaped_ms: f64,
    /// From the kill until the new provider's registration was done (its
    /// `connect()` returned): a process start and a registration.
    pub registered_ms: f64,
    /// Of that, from the new process's start to its registration.
    pub start_to_registered_ms: f64,
    /// From that registration to the end of the first call, made after the
    /// old provider was reaped, that succeeded; `None` if none did.
    pub recovery_ms: Option<f64>,
    /// Calls that ended `disconnected` after this kill (and before the
    /// next).
    pub disconnected: usize,
}

/// What killing the provider did to its callers.
#[derive(Serialize, Debug, Default)]
pub struct KillProviderReport {
    pub seed: u64,
    pub kills: Vec<ProviderKill>,
    pub disconnected_calls: usize,
    /// Of those, the ones that ended before the first kill (none should).
    pub disconnected_before_any_kill: usize,
    pub registered_ms_max: f64,
    pub recovery_ms_max: Option<f64>,
}

impl KillProviderReport {
    /// Whether every kill was recovered from.
    pub fn passed(&self) -> bool {
        !self.kills.is_empty() && self.kills.iter().all(|k| k.recovery_ms.is_some())
    }
}

/// One crash and restart of the daemon under brokered calls.
#[derive(Serialize, Debug)]
pub struct BrokeredRestart {
    /// When the daemon was killed, in ms after the calls started.
    pub killed_at_ms: f64,
    /// From the kill to the new daemon's start (reaping the old one).
    pub down_ms: f64,
    /// From the new daemon's start until it accepted connections.
    pub ready_ms: f64,
    /// From the new daemon's start until its `stats` listed the provider
    /// under the name again (polled every millisecond); `None` if not
    /// within 10 s.
    pub registered_ms: Option<f64>,
    /// Calls that ended in an error between the kill and that
    /// registration.
    pub failed_while_down: usize,
}

/// What restarting the daemon did to brokered calls.
#[derive(Serialize, Debug, Default)]
pub struct BrokeredRestartReport {
    pub restarts: Vec<BrokeredRestart>,
    /// Calls that failed while the daemon was down (the goal: none).
    pub failed_while_down: usize,
    /// Calls that failed at any time.
    pub failed_calls: usize,
    pub registered_ms_max: Option<f64>,
}

impl BrokeredRestartReport {
    /// Whether the provider registered again after every restart.
    pub fn passed(&self) -> bool {
        !self.restarts.is_empty() && self.restarts.iter().all(|r| r.registered_ms.is_some())
    }
}

/// The JSON document of the scenario.
#[derive(Serialize)]
struct Document<'a> {
    runs: &'a [Run],
    provider: &'a ProviderFigures,
}

/// Runs the scenario; returns whether it passed.
pub fn run(c: &Config) -> anyhow::Result<bool> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let clients = c.specs.iter().map(|s| s.clients).max().unwrap_or(1);
    // Every client holds a session with the daemon and one with the
    // provider (both charged to this uid), and the connects and resolves
    // in a row can outpace the clean-up of the ones before.
    let sessions = 2 * (clients + crate::SEQUENTIAL_CONNECTS + c.resolves) + 64;
    let extra = [
        "--workers".to_string(),
        workers.to_string(),
        "--max-ring-size".into(),
        MAX_RING_SIZE.to_string(),
        "--max-sessions-per-uid".into(),
        sessions.to_string(),
    ];
    let mut daemon = PrivateDaemon::start_with(&c.daemon, sessions, c.spin, &extra)?;
    let settings = Settings { workers, spin: c.spin };
    let mut provider = ProviderProcess::start(&c.exe, daemon.socket(), settings)?;
    if let Some(chaos) = c.chaos {
        println!("chaos {chaos:?}, seed {} (repeat with --seed {})", c.seed, c.seed);
    }
    let mut figures = ProviderFigures {
        service: SERVICE,
        workers,
        spin_us: c.spin.map(|s| s.as_micros() as u64),
        max_ring_size: MAX_RING_SIZE,
        resolve: None,
        comparison: Vec::new(),
    };
    let mut runs = Vec::new();
    match c.chaos {
        None => {
            for spec in &c.specs {
                for served_by in ["daemon", "provider"] {
                    let run = plain_run(c, spec, served_by, &daemon, &provider)?;
                    print!("{}", run.summary("threads"));
                    runs.push(run);
                }
            }
            if c.resolves > 0 {
                let options = client_options(c);
                let resolve = measure_resolves(daemon.socket(), c.resolves, &options);
                figures.resolve = Some(resolve);
            }
            figures.comparison = compare(&runs);
            print!("{}", table(&figures, &runs));
        }
        Some(Chaos::KillProvider(n)) => {
            let spec = c.specs.first().context("no workload")?;
            let run = kill_provider_run(c, spec, daemon.socket(), &mut provider, n)?;
            print!("{}", run.summary("threads"));
            runs.push(run);
        }
        Some(Chaos::RestartDaemon(n)) => {
            let spec = c.specs.first().context("no workload")?;
            let run = restart_daemon_run(c, spec, &mut daemon, &provider, n)?;
            print!("{}", run.summary("threads"));
            runs.push(run);
        }
        Some(other) => bail!("--chaos {other:?} does not go with --scenario provider"),
    }
    let provider_alive = provider.exit_status().is_none();
    if !provider_alive {
        eprintln!("error: the provider process died during the run");
    }
    let resolves_ok = figures.resolve.as_ref().is_none_or(|r| r.failed == 0);
    if let Some(path) = &c.json {
        report::write_document(path, &Document { runs: &runs, provider: &figures })?;
    }
    if provider_alive {
        provider.stop()?;
    }
    daemon.stop()?;
    Ok(provider_alive && resolves_ok && !runs.is_empty() && runs.iter().all(Run::passed))
}

fn client_options(c: &Config) -> ClientOptions {
    let options = ClientOptions::default().call_timeout(c.call_timeout);
    match c.spin {
        Some(spin) => options.spin(spin),
        None => options,
    }
}

/// The workload of `spec` against `service` (the daemon's or the
/// provider's).
fn workload(c: &Config, spec: &Spec, socket: &Path, service: &'static str) -> Workload {
    Workload {
        transport: Transport::Shm(socket.to_path_buf()),
        service,
        messages: spec.messages,
        payload: spec.payload,
        window: spec.window,
        call_timeout: c.call_timeout,
        spin: c.spin,
        reconnect: false,
        until: None,
        probe: None,
        progress: None,
    }
}

/// One RUN of `spec` served by the daemon or the provider, whose process
/// is the one measured.
fn plain_run(
    c: &Config,
    spec: &Spec,
    served_by: &'static str,
    daemon: &PrivateDaemon,
    provider: &ProviderProcess,
) -> anyhow::Result<Run> {
    let (service, pid) = match served_by {
        "daemon" => (ECHO, daemon.pid()),
        _ => (SERVICE, provider.pid()),
    };
    let w = workload(c, spec, daemon.socket(), service);
    let mut run = crate::run_one(spec, w, pid, false, &c.exe, &crate::Faults::NONE, None)?;
    run.served_by = Some(served_by);
    Ok(run)
}

/// Runs `calls` over `w` with the progress display, as a RUN of `spec`
/// makes it; `calls` is given the counts the clients publish.
fn with_progress<R>(spec: &Spec, w: &mut Workload, calls: impl FnOnce(&Workload, &progress::Calls) -> R) -> R {
    let counts = Arc::new(progress::Calls::new(spec.clients));
    w.progress = Some(Arc::clone(&counts));
    let label = format!("{} through the provider ({})", spec.scenario, report::size(spec.payload));
    let shown = Progress::start(label, Goal::Calls(spec.clients as u64 * spec.messages), Some(Arc::clone(&counts)));
    let result = calls(w, &counts);
    shown.finish();
    result
}

/// Waits until the clients have had a call answered (they all connected
/// and resolved first), or are `done`; returns that moment. A fault
/// injected before it would meet clients still resolving the name, and
/// fail their connects rather than their calls.
fn calls_under_way(counts: &progress::Calls, done: &AtomicBool) -> Instant {
    while counts.total() == 0 && !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    Instant::now()
}

/// `--chaos kill-provider:N`: the provider process killed with SIGKILL
/// and started again under callers that reconnect.
fn kill_provider_run(
    c: &Config,
    spec: &Spec,
    socket: &Path,
    provider: &mut ProviderProcess,
    times: usize,
) -> anyhow::Result<Run> {
    let mut w = workload(c, spec, socket, SERVICE);
    let probe = Arc::new(Probe::default());
    w.reconnect = true;
    w.probe = Some(Arc::clone(&probe));
    // The kills fall at random moments within the window, each once the
    // previous one was recovered from (so each recovery is measured on its
    // own).
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let mut moments: Vec<Duration> = (0..times).map(|_| c.chaos_period.mul_f64(rng.f64())).collect();
    moments.sort();
    let done = AtomicBool::new(false);
    let (kills, (outcomes, elapsed, clients)) = with_progress(spec, &mut w, |w, counts| {
        std::thread::scope(|scope| {
            let clients = scope.spawn(|| {
                let result = workload::run_threads(w, spec.clients);
                done.store(true, Ordering::Release);
                result
            });
            let start = calls_under_way(counts, &done);
            let kills = kill_provider(provider, &moments, &probe, start, &done).map(|k| (k, start));
            (kills, clients.join().expect("client threads panicked"))
        })
    });
    let usage = crate::daemon_usage(provider.pid());
    drop(clients);
    let (kills, start) = kills?;
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    run.served_by = Some("provider");
    run.kill_provider = Some(kill_report(c.seed, &kills, &probe, start));
    Ok(run)
}

/// Kills and restarts the provider at `moments` after `start` (each no
/// sooner than the previous one's first success), until the clients are
/// `done`.
fn kill_provider(
    provider: &mut ProviderProcess,
    moments: &[Duration],
    probe: &Probe,
    start: Instant,
    done: &AtomicBool,
) -> anyhow::Result<Vec<Replaced>> {
    let mut kills = Vec::new();
    for &at in moments {
        while Instant::now() < start + at && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        *probe.restarted_at.lock().expect("probe lock") = None;
        let (killed, reaped) = provider.kill()?;
        // Only a call started once the old provider is gone can be served
        // by nobody but the new one.
        *probe.restarted_at.lock().expect("probe lock") = Some(reaped);
        probe.awaiting_success.store(true, Ordering::Release);
        let (started, registered) = provider.start_again()?;
        kills.push(Replaced { killed, reaped, started, registered });
        while probe.awaiting_success.load(Ordering::Acquire) && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if kills.is_empty() {
        bail!("the clients finished before the first kill; give them more --messages");
    }
    // Clients still notice the last kill after its first recovery: read
    // their events once they are all done.
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(kills)
}

fn kill_report(seed: u64, kills: &[Replaced], probe: &Probe, start: Instant) -> KillProviderReport {
    let successes = probe.first_successes.lock().expect("probe lock").clone();
    let disconnects = probe.disconnects.lock().expect("probe lock").clone();
    let mut report = KillProviderReport { seed, ..Default::default() };
    for (i, r) in kills.iter().enumerate() {
        let next = kills.get(i + 1).map(|n| n.killed);
        let recovery = successes.iter().filter(|&&t| t >= r.registered).map(|&t| ms(t - r.registered)).reduce(f64::min);
        let disconnected = disconnects.iter().filter(|&&t| t >= r.killed && next.is_none_or(|n| t < n)).count();
        report.kills.push(ProviderKill {
            killed_at_ms: ms(r.killed - start),
            reaped_ms: ms(r.reaped - r.killed),
            registered_ms: ms(r.registered - r.killed),
            start_to_registered_ms: ms(r.registered.saturating_duration_since(r.started)),
            recovery_ms: recovery,
            disconnected,
        });
    }
    report.disconnected_calls = disconnects.len();
    let first = kills.first().map(|k| k.killed);
    report.disconnected_before_any_kill = disconnects.iter().filter(|&&t| first.is_none_or(|f| t < f)).count();
    report.registered_ms_max = report.kills.iter().map(|k| k.registered_ms).fold(0.0, f64::max);
    report.recovery_ms_max = report.kills.iter().filter_map(|k| k.recovery_ms).reduce(f64::max);
    report
}

/// `--chaos restart-daemon:N` in this scenario: the daemon killed with
/// SIGKILL and started again while calls run over brokered sessions,
/// which need nothing of it.
fn restart_daemon_run(
    c: &Config,
    spec: &Spec,
    daemon: &mut PrivateDaemon,
    provider: &ProviderProcess,
    times: usize,
) -> anyhow::Result<Run> {
    let socket = daemon.socket().to_path_buf();
    let mut w = workload(c, spec, &socket, SERVICE);
    let probe = Arc::new(Probe::default());
    w.reconnect = true;
    w.probe = Some(Arc::clone(&probe));
    let done = AtomicBool::new(false);
    let (report, (outcomes, elapsed, clients)) = with_progress(spec, &mut w, |w, counts| {
        std::thread::scope(|scope| {
            let clients = scope.spawn(|| {
                let result = workload::run_threads(w, spec.clients);
                done.store(true, Ordering::Release);
                result
            });
            let start = calls_under_way(counts, &done);
            let report = restart_daemon(daemon, times, c.chaos_period, &probe, start, &done);
            (report, clients.join().expect("client threads panicked"))
        })
    });
    let usage = crate::daemon_usage(provider.pid());
    drop(clients);
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    run.served_by = Some("provider");
    run.restart_daemon_brokered = Some(report?);
    Ok(run)
}

/// Kills and restarts `daemon` `times` times, each `period` after the
/// provider registered with the previous one, while the clients run
/// (until `done`).
fn restart_daemon(
    daemon: &mut PrivateDaemon,
    times: usize,
    period: Duration,
    probe: &Probe,
    start: Instant,
    done: &AtomicBool,
) -> anyhow::Result<BrokeredRestartReport> {
    let mut windows = Vec::new();
    let mut report = BrokeredRestartReport::default();
    for _ in 0..times {
        let step = Instant::now() + period;
        while Instant::now() < step && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        let (killed, started, ready) = daemon.crash_and_restart()?;
        let registered = await_provider(daemon.socket(), Duration::from_secs(10));
        windows.push((killed, registered.unwrap_or_else(Instant::now)));
        report.restarts.push(BrokeredRestart {
            killed_at_ms: ms(killed - start),
            down_ms: ms(started - killed),
            ready_ms: ms(ready - started),
            registered_ms: registered.map(|t| ms(t.saturating_duration_since(started))),
            failed_while_down: 0,
        });
    }
    if report.restarts.is_empty() {
        bail!("the clients finished before the first restart; give them more --messages");
    }
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let failures = probe.failures.lock().expect("probe lock").clone();
    for (r, &(from, to)) in report.restarts.iter_mut().zip(&windows) {
        r.failed_while_down = failures.iter().filter(|&&t| t >= from && t <= to).count();
    }
    report.failed_while_down = report.restarts.iter().map(|r| r.failed_while_down).sum();
    report.failed_calls = failures.len();
    report.registered_ms_max = report.restarts.iter().filter_map(|r| r.registered_ms).reduce(f64::max);
    Ok(report)
}

/// Polls the `stats` of the daemon at `socket` every millisecond until it
/// lists a provider of [`SERVICE`]; returns when it first did, or `None`
/// if not within `limit`.
fn await_provider(socket: &Path, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    let mut stats = None;
    while Instant::now() < deadline {
        if stats.is_none() {
            stats = Client::connect_to(socket).ok().and_then(|mut c| Some((c.service("stats").ok()?, c)));
        }
        if let Some((service, client)) = &mut stats {
            match client.call(service, b"") {
                Ok(reply) => {
                    if serde_json::from_slice::<Value>(&reply).is_ok_and(|v| lists_provider(&v)) {
                        return Some(Instant::now());
                    }
                }
                Err(_) => stats = None,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Whether a `stats` document lists a provider of [`SERVICE`].
fn lists_provider(stats: &Value) -> bool {
    stats["broker"]["names"].as_array().is_some_and(|names| {
        names.iter().any(|n| n["name"] == SERVICE && n["providers"].as_array().is_some_and(|p| !p.is_empty()))
    })
}

/// `n` resolves of [`SERVICE`] in a row, each on a fresh client whose
/// connect and broker connection are made before its clock starts.
fn measure_resolves(socket: &Path, n: usize, options: &ClientOptions) -> ResolveFigures {
    let mut resolve: Histogram<u64> = new_histogram();
    let mut broker_open: Histogram<u64> = new_histogram();
    let (mut failed, mut first_error) = (0, None);
    for _ in 0..n {
        match one_resolve(socket, options) {
            Ok((open_ns, resolve_ns)) => {
                broker_open.saturating_record(open_ns.max(1));
                resolve.saturating_record(resolve_ns.max(1));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let figures = |h: &Histogram<u64>| Connect::of(h, format!("{n} in a row"));
    ResolveFigures {
        resolves: n,
        failed,
        resolve_us: figures(&resolve),
        broker_open_us: figures(&broker_open),
        first_error,
    }
}

/// One resolve of [`SERVICE`] on a fresh client: the nanoseconds the
/// broker connection took to open (with a refused resolve), and the
/// resolve's.
fn one_resolve(socket: &Path, options: &ClientOptions) -> Result<(u64, u64), String> {
    let mut client = Client::connect_with(Transport::Shm(socket.to_path_buf()), options.clone())
        .map_err(|e| format!("connect: {e}"))?;
    let t0 = Instant::now();
    match client.service(UNPROVIDED) {
        Err(CallError::UnknownService { .. }) => {}
        other => return Err(format!("resolving {UNPROVIDED} gave {other:?}, not unknown")),
    }
    let t1 = Instant::now();
    let echo = client.service(SERVICE).map_err(|e| format!("resolve: {e}"))?;
    let t2 = Instant::now();
    // Not timed: the session serves.
    let reply = client.call(&echo, b"resolved").map_err(|e| format!("call after the resolve: {e}"))?;
    if reply != b"resolved" {
        return Err("the call after the resolve got another reply".into());
    }
    Ok(((t1 - t0).as_nanos() as u64, (t2 - t1).as_nanos() as u64))
}

/// Each workload's headline figure, the daemon's run against the
/// provider's.
fn compare(runs: &[Run]) -> Vec<Comparison> {
    let mut rows = Vec::new();
    for d in runs.iter().filter(|r| r.served_by == Some("daemon")) {
        let Some(p) = runs.iter().find(|r| {
            r.served_by == Some("provider") && r.scenario == d.scenario && r.payload_bytes == d.payload_bytes
        }) else {
            continue;
        };
        let (figure, daemon, provider) = match d.scenario {
            "latency" => ("p50_us", d.latency_us.p50, p.latency_us.p50),
            _ => ("msgs_per_s", d.throughput_msgs_per_s, p.throughput_msgs_per_s),
        };
        let ratio = if daemon > 0.0 { provider / daemon } else { 0.0 };
        let runs_passed = d.passed() && p.passed();
        let (goal, met) = match d.scenario {
            "throughput" => (Some(">= 0.9"), ratio >= THROUGHPUT_GOAL),
            "latency" if d.clients == 1 => (Some("<= 1.2"), ratio > 0.0 && ratio <= LATENCY_GOAL),
            _ => (None, false),
        };
        let met = goal.filter(|_| runs_passed).map(|_| met);
        rows.push(Comparison {
            scenario: d.scenario,
            payload_bytes: d.payload_bytes,
            figure,
            daemon,
            provider,
            ratio,
            runs_passed,
            goal,
            met,
        });
    }
    rows
}

/// The closing table: the daemon's echo against the provider's, and the
/// resolve.
fn table(f: &ProviderFigures, runs: &[Run]) -> String {
    let mut s = format!(
        "\nprovider scenario: the daemon's echo against {} (a provider process), shm, the same workloads in one run\n",
        f.service
    );
    s += &format!(
        "{:<11} {:>8}  {:<7} {:>13} {:>13} {:>16}  goal\n",
        "scenario", "payload", "figure", "daemon", "provider", "provider:daemon"
    );
    for row in &f.comparison {
        let cell = |x: f64| if row.figure == "p50_us" { format!("{x:.2}") } else { format!("{x:.0}") };
        let goal = match (row.goal, row.met) {
            (_, _) if !row.runs_passed => "not judged: a run failed".to_string(),
            (Some(g), Some(true)) => format!("{g}: met"),
            (Some(g), Some(false)) => format!("{g}: MISSED"),
            _ => String::new(),
        };
        s += &format!(
            "{:<11} {:>8}  {:<7} {:>13} {:>13} {:>16}  {goal}\n",
            row.scenario,
            report::size(row.payload_bytes),
            if row.figure == "p50_us" { "p50 us" } else { "msg/s" },
            cell(row.daemon),
            cell(row.provider),
            format!("{}x", two_figures(row.ratio)),
        );
    }
    if let Some(r) = &f.resolve {
        let met = if r.resolve_us.p50 < RESOLVE_GOAL_US { "met" } else { "MISSED" };
        s += &format!(
            "resolve of {} ({} in a row, connected, broker connection open): p50 {:.1} us  p99 {:.1} us  max {:.1} us; goal p50 under {RESOLVE_GOAL_US:.0} us: {met}\n",
            f.service, r.resolves, r.resolve_us.p50, r.resolve_us.p99, r.resolve_us.max
        );
        s += &format!(
            "  before each: broker connection and a refused resolve p50 {:.1} us  p99 {:.1} us; failed {}\n",
            r.broker_open_us.p50, r.broker_open_us.p99, r.failed
        );
        if let Some(e) = &r.first_error {
            s += &format!("  first error {e}\n");
        }
    }
    let passed = runs.iter().all(Run::passed);
    s += if passed { "result: every call verified, PASS\n" } else { "result: FAIL\n" };
    s
}
