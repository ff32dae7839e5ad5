//! stress: replays ipcd's million-message test and its companions
//! (latency, pipelined, bandwidth) over shared memory, a Unix socket and
//! TCP in one run, against a daemon it starts itself; checks every reply
//! and reports throughput, latency percentiles, allocations per call and
//! the daemon's memory, with a side-by-side comparison.

#![forbid(unsafe_code)]

mod async_goals;
mod async_workload;
mod attacker;
mod bandwidth;
mod baselines;
mod brokered;
mod chaos;
mod daemon;
mod fleet;
mod flood;
mod hostile;
mod idle;
mod plot;
mod progress;
mod provider;
mod report;
mod scale;
mod started;
mod streams;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use ipc_client::Transport;

use crate::chaos::{Chaos, KillPlan};
use crate::daemon::{PeakSampler, PrivateDaemon};
use crate::progress::{Goal, Progress};
use crate::report::{Baseline, Run, Spec};
use crate::workload::{Probe, Workload, MIN_PAYLOAD};

/// Counts the client threads' allocations, for `allocations_per_call`.
#[global_allocator]
static ALLOCATOR: ipc_alloc_count::CountingAllocator = ipc_alloc_count::CountingAllocator;

/// Replays the million-message test and its companions against ipcd and
/// reports what it measured.
///
/// With no arguments: starts a private ipcd (the binary beside this one)
/// serving shared memory, a Unix socket and TCP on loopback, then runs every
/// scenario over every transport, one after another:
///
///   throughput  100 clients x 10,000 synchronous echo calls, 64 B
///
///   latency     1 client x 100,000 synchronous calls, 64 B (and 200
///               connects in a row, for the connect time)
///
///   pipelined   100 clients x 20,000 calls, 32 in flight each, 64 B
///
///   bandwidth   4 clients, synchronous calls of 64 B, 4 KiB, 64 KiB, 1 MiB,
///               then beyond a ring (in chunks) 16, 64 and 256 MiB, each
///               of those followed by a heap check of one call; with a
///               table of the goals (shm >= uds, shm >= 4 GB/s from
///               64 KiB up)
///
/// Every reply is checked byte for byte. Ends with a comparison table.
/// Exits 1 if any call failed or a reply did not match.
///
/// --client async makes every throughput, latency and pipelined run twice:
/// with the blocking client (a thread per client), then with the async
/// client (a tokio task per client, --async-share tasks per connection, on
/// one multi-thread runtime of --async-workers threads); and after each of
/// those scenarios the tokio_echo baseline (tokio's UnixStream against a
/// tokio echo server, stress/examples) with the same clients, calls,
/// payload and window. Ends with a table of the three and the async goals.
///
/// --scenario hostile (not part of all) starts its own daemon with a short
/// handshake timeout and runs 10 clients x 20,000 synchronous calls over
/// shared memory alone, then again while --hostile clients scribble over
/// their segments and flood their doorbells; the same against a provider
/// process's echo, the hostile clients abusing their brokered sessions;
/// then 200 connects in a row without and with --flood connections
/// stalled in the handshake. Exits 1 if a normal call failed or
/// mismatched, the daemon or the provider died, or a stalled connection
/// was not closed at the handshake timeout.
///
/// --scenario provider (not part of all) starts its own daemon and a
/// provider process offering stress.echo through it, and runs the
/// throughput, latency and pipelined workloads against the daemon's echo
/// and then the provider's, over shared memory, with a table of the two;
/// then resolves of the provided name in a row. With --chaos kill-provider:N
/// or restart-daemon:N, the throughput workload against the provider while
/// the provider or the daemon is killed and started again.
///
/// --scenario stream (not part of all) starts its own daemon and runs 100
/// clients, each opening --streams streams (10) of the daemon's
/// stream.count one after another, of --messages items (1,000) of 64 B,
/// then of 4 KiB, with a window (credit) of --window items (256), over
/// each transport; every item is checked in order (index and fill), every
/// stream must end exactly once. Reports items/s and each item's latency
/// (from the previous item, or the opening for the first), with the goal
/// of 5,000,000 items/s over shm for 64 B items.
///
/// --scenario idle (not part of all) connects --clients (1,000) blocking
/// clients to its own daemon, stops the daemon (SIGSTOP) so that the call
/// each makes next is never answered, counts the context switches of all
/// of stress's threads for --duration seconds (5): the wake-ups per
/// second of that many idle clients; then SIGKILLs the daemon, and every
/// blocked call must end disconnected (the delay is reported). Twice:
/// with the liveness watcher off (50 ms checks) and on (--liveness runs
/// one of the two alone).
///
/// --scenario scale (not part of all) connects --clients (10,000)
/// blocking clients (a thread each) to its own daemon all at once, each
/// makes --messages (10) echo calls of --payload bytes (64), every reply
/// checked; reports connect p50 and p99 and the daemon's RssAnon,
/// RssShmem, charged shared memory and fds with all connected, per
/// client. Both raise the open-files limit as needed (root may raise the
/// hard limit) and give the daemon --max-sessions-per-uid and --max-shm.
///
/// SIGTERM or SIGINT stops everything stress started (its daemon with
/// SIGTERM), removes the daemon's directory and exits 128 + the signal's
/// number. What stress starts dies with it even on SIGKILL.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,

    /// Which transport to run it over.
    #[arg(long, value_enum, default_value_t = TransportArg::All)]
    transport: TransportArg,

    /// Concurrent clients, each with its own connection [default: per
    /// scenario]
    #[arg(long)]
    clients: Option<usize>,

    /// Calls per client [default: per scenario]
    #[arg(long)]
    messages: Option<u64>,

    /// Payload bytes per call, at least 12 [default: per scenario]
    #[arg(long)]
    payload: Option<usize>,

    /// Requests in flight per client in the pipelined scenario (and in any
    /// scenario when given).
    #[arg(long)]
    window: Option<u32>,

    /// Streams each client opens one after another in the stream scenario
    /// (of --messages items of --payload bytes each).
    #[arg(long, value_name = "N", default_value_t = 10)]
    streams: u64,

    /// Hostile clients attacking during the hostile scenario; 0 skips the
    /// attack.
    #[arg(long, value_name = "N", default_value_t = 16)]
    hostile: usize,

    /// How long each hostile client sleeps after each burst, in
    /// microseconds (0: attacks without pause).
    #[arg(long, value_name = "US", default_value_t = 0)]
    hostile_pause_us: u64,

    /// Seed of the random choices of the hostile scenario and of --chaos
    /// [default: from the clock; printed, so a run can be repeated]
    #[arg(long)]
    seed: Option<u64>,

    /// Connections stalled in the handshake during the hostile scenario's
    /// flood; 0 skips the flood.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    flood: usize,

    /// Clients connected one after another (one verified call each) without
    /// and with the flood.
    #[arg(long, value_name = "N", default_value_t = 200)]
    flood_connects: usize,

    /// The handshake timeout of the hostile scenario's private daemon, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    handshake_timeout_ms: u64,

    /// Longest a client (and a private daemon's worker) spins before
    /// sleeping, in microseconds; 0 never spins [default: the library's]
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,

    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Also draw the figures as SVG pictures into this directory (created
    /// if missing): per scenario and payload, the transports' latency
    /// percentile distributions and their throughput (or bandwidth) as
    /// bars; for --duration, the daemon's memory, fds and each minute's p99
    /// over time.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,

    /// Also run the baseline programs (stress/examples, built beside this
    /// binary) after the throughput and latency runs, with the same
    /// clients, calls and payload, and report ipcd's figures against them:
    /// shm_baseline and epoll_echo, and for one client the floors
    /// spin_floor and futex_baseline.
    #[arg(long)]
    baselines: bool,

    /// Which client makes the throughput, latency and pipelined calls:
    /// `sync`, the blocking client; `async`, the blocking client and then
    /// the async client in the same run, beside tokio_echo.
    #[arg(long, value_enum, default_value_t = ClientKind::Sync)]
    client: ClientKind,

    /// With --client async: tasks calling through one connection (1: a
    /// connection per task); several, comma-separated, make a run each.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "1")]
    async_share: Vec<usize>,

    /// With --client async: worker threads of the tokio runtime (and of
    /// tokio_echo's) [default: the number of cores]
    #[arg(long, value_name = "N")]
    async_workers: Option<usize>,

    /// Use the daemon already running on this control socket instead of
    /// starting one.
    #[arg(long, conflicts_with = "daemon")]
    socket: Option<PathBuf>,

    /// With --socket: the running daemon's --uds path.
    #[arg(long, value_name = "PATH")]
    uds: Option<PathBuf>,

    /// With --socket: the running daemon's --tcp address.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,

    /// The ipcd binary to start [default: ipcd beside this binary]
    #[arg(long)]
    daemon: Option<PathBuf>,

    /// Run each client in its own process instead of its own thread.
    #[arg(long)]
    procs: bool,

    /// Timeout of each call, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    call_timeout_ms: u64,

    /// Inject faults into the throughput workload: `kill-clients:N` kills N
    /// client processes with SIGKILL at random moments (needs --procs);
    /// `restart-daemon:N` kills the private daemon with SIGKILL N times
    /// and starts it again, with clients that reconnect; `sigterm` stops
    /// the daemon under load; `kill-provider:N` (--scenario provider)
    /// kills the provider process N times and starts it again.
    #[arg(long, value_name = "KIND:N")]
    chaos: Option<Chaos>,

    /// With --chaos: kills fall at random moments within the first MS of
    /// the calls (kill-clients, kill-provider: each no sooner than the
    /// previous one's recovery); a restart comes MS after the previous
    /// one's recovery (restart-daemon); the SIGTERM comes MS into the
    /// calls (sigterm).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    chaos_ms: u64,

    /// Resolves of the provided name in a row in the provider scenario,
    /// each on a fresh client (connected before its clock starts); 0
    /// skips them.
    #[arg(long, value_name = "N", default_value_t = 200)]
    resolves: usize,

    /// Soak: run the throughput workload for this many seconds (instead of
    /// a number of calls), sampling the daemon's memory and fds every
    /// second. With --scenario idle: how long the idle clients are
    /// watched (5).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,

    /// With --scenario idle: which passes to run, the 50 ms checks, the
    /// liveness watcher or both (one alone, for a count of clients whose
    /// checks would swamp the machine).
    #[arg(long, value_enum, default_value_t = Liveness::Both)]
    liveness: Liveness,

    /// Internal: run as client process number ID of a --procs run.
    #[arg(long, hide = true)]
    child_client: Option<u32>,

    /// Internal: run as the hostile scenario's process of N attackers.
    #[arg(long, hide = true, value_name = "N")]
    child_attackers: Option<usize>,

    /// Internal: the attackers resolve this provided name and attack its
    /// brokered sessions instead of the daemon's.
    #[arg(long, hide = true, value_name = "NAME")]
    attack_service: Option<String>,

    /// Internal: run as a client process of the scale scenario, with N
    /// clients.
    #[arg(long, hide = true, value_name = "N")]
    child_scale: Option<usize>,

    /// Internal: run as the provider process, with WORKERS workers.
    #[arg(long, hide = true, value_name = "WORKERS")]
    child_provider: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Throughput,
    Latency,
    Pipelined,
    Bandwidth,
    Hostile,
    Provider,
    Stream,
    Idle,
    Scale,
    All,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Pipelined => "pipelined",
            Scenario::Bandwidth => "bandwidth",
            Scenario::Hostile => "hostile",
            Scenario::Provider => "provider",
            Scenario::Stream => "stream",
            Scenario::Idle => "idle",
            Scenario::Scale => "scale",
            Scenario::All => "all",
        }
    }

    /// (clients, messages, payloads, window) when not overridden.
    fn defaults(self) -> (usize, u64, Vec<usize>, u32) {
        match self {
            Scenario::Throughput | Scenario::All | Scenario::Provider => (100, 10_000, vec![64], 1),
            Scenario::Latency => (1, 100_000, vec![64], 1),
            Scenario::Pipelined => (100, 20_000, vec![64], 32),
            Scenario::Bandwidth => (4, 0, bandwidth::PAYLOADS.to_vec(), 1),
            Scenario::Hostile => (10, 20_000, vec![64], 1),
            Scenario::Stream => (100, 1_000, vec![64, 4 << 10], streams::DEFAULT_WINDOW),
            Scenario::Idle => (1_000, 0, vec![64], 1),
            Scenario::Scale => (10_000, 10, vec![64], 1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Liveness {
    Checks,
    Watcher,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ClientKind {
    Sync,
    Async,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Shm,
    Uds,
    Tcp,
    All,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = validate(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(workers) = args.child_provider {
        let Some(socket) = &args.socket else {
            eprintln!("error: --child-provider needs --socket");
            return ExitCode::from(2);
        };
        return match provider::child_main(socket, workers, args.spin_us.map(Duration::from_micros)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: provider process: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(n) = args.child_attackers {
        let Some(socket) = &args.socket else {
            eprintln!("error: --child-attackers needs --socket");
            return ExitCode::from(2);
        };
        let pause = Duration::from_micros(args.hostile_pause_us);
        let target = args.attack_service.as_deref();
        return match attacker::child_main(socket, target, n, args.seed.unwrap_or(0), pause) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: hostile process: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(n) = args.child_scale {
        let Some(socket) = &args.socket else {
            eprintln!("error: --child-scale needs --socket");
            return ExitCode::from(2);
        };
        let (calls, payload) = (args.messages.unwrap_or(10), args.payload.unwrap_or(64));
        let timeout = Duration::from_millis(args.call_timeout_ms);
        return match scale::child_main(socket, n, calls, payload, timeout) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: scale client process: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(id) = args.child_client {
        return match child(&args, id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: client process {id}: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let result = run(args);
    started::defer_to_stop();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn validate(args: &Args) -> Result<(), String> {
    if args.clients == Some(0) || args.messages == Some(0) || args.window == Some(0) {
        return Err("--clients, --messages and --window must be at least 1".into());
    }
    if args.payload.is_some_and(|p| p < MIN_PAYLOAD) {
        return Err(format!("--payload must be at least {MIN_PAYLOAD} bytes (client id and sequence number)"));
    }
    if args.child_client.is_some() && args.socket.is_none() && args.uds.is_none() && args.tcp.is_none() {
        return Err("--child-client needs --socket, --uds or --tcp".into());
    }
    if (args.uds.is_some() || args.tcp.is_some()) && args.socket.is_none() && args.child_client.is_none() {
        return Err("--uds and --tcp name a running daemon's listeners: give its --socket too".into());
    }
    if args.scenario == Scenario::Hostile {
        if args.plot.is_some() {
            return Err("--plot draws the throughput, latency, pipelined, bandwidth and --duration runs, not --scenario hostile".into());
        }
        if args.socket.is_some() || args.procs {
            return Err("--scenario hostile starts its own daemon and client threads: drop --socket and --procs".into());
        }
        if matches!(args.transport, TransportArg::Uds | TransportArg::Tcp) || args.window.is_some_and(|w| w > 1) {
            return Err("--scenario hostile runs synchronous calls over shared memory only".into());
        }
        if args.flood > 0 && args.flood_connects == 0 || args.handshake_timeout_ms == 0 {
            return Err("--flood-connects and --handshake-timeout-ms must be at least 1".into());
        }
    }
    if args.scenario != Scenario::Idle && args.liveness != Liveness::Both {
        return Err("--liveness chooses the passes of --scenario idle only".into());
    }
    if matches!(args.scenario, Scenario::Idle | Scenario::Scale) {
        if args.socket.is_some() && args.child_scale.is_none()
            || args.procs
            || args.chaos.is_some()
            || args.plot.is_some()
            || args.baselines
        {
            return Err("--scenario idle and scale start their own daemon and client threads: drop --socket, --procs, --chaos, --plot and --baselines".into());
        }
        if !matches!(args.transport, TransportArg::All | TransportArg::Shm) || args.client != ClientKind::Sync {
            return Err("--scenario idle and scale run blocking clients over shared memory".into());
        }
        if args.scenario == Scenario::Scale && args.duration.is_some() {
            return Err("--duration is the idle scenario's window; --scenario scale makes --messages calls".into());
        }
        if args.payload.is_some_and(|p| p < 1) || args.duration == Some(0) {
            return Err("--payload and --duration must be at least 1".into());
        }
    }
    if args.scenario == Scenario::Stream {
        if args.socket.is_some() || args.procs || args.chaos.is_some() || args.duration.is_some() {
            return Err("--scenario stream starts its own daemon and client threads: drop --socket, --procs, --chaos and --duration".into());
        }
        if args.plot.is_some() || args.baselines {
            return Err("--scenario stream takes neither --plot nor --baselines".into());
        }
        if args.streams == 0 || args.messages.is_some_and(|m| m > u64::from(u32::MAX)) {
            return Err("--streams must be at least 1 and --messages (items per stream) fit a u32".into());
        }
        if args.payload.is_some_and(|p| p > u32::MAX as usize) {
            return Err("--payload (the item size) must fit a u32".into());
        }
    }
    if args.scenario == Scenario::Provider {
        if args.socket.is_some() || args.procs {
            return Err(
                "--scenario provider starts its own daemon, provider and client threads: drop --socket and --procs"
                    .into(),
            );
        }
        if matches!(args.transport, TransportArg::Uds | TransportArg::Tcp) {
            return Err(
                "--scenario provider runs over shared memory only: providers are reached through fd passing".into()
            );
        }
        if args.plot.is_some() || args.baselines || args.duration.is_some() {
            return Err("--scenario provider takes neither --plot, --baselines nor --duration".into());
        }
        if matches!(args.chaos, Some(Chaos::KillClients(_) | Chaos::Sigterm)) {
            return Err("--scenario provider takes --chaos kill-provider:N or restart-daemon:N".into());
        }
    } else if matches!(args.chaos, Some(Chaos::KillProvider(_))) {
        return Err("--chaos kill-provider kills the provider of --scenario provider".into());
    }
    let faulty = args.chaos.is_some() || args.duration.is_some() && args.scenario != Scenario::Idle;
    if faulty && !matches!(args.scenario, Scenario::Throughput | Scenario::All | Scenario::Provider) {
        return Err("--chaos and --duration run the throughput scenario".into());
    }
    if args.chaos.is_some() && args.duration.is_some() {
        return Err("--chaos and --duration do not go together".into());
    }
    match args.chaos {
        Some(Chaos::KillClients(n)) => {
            if !args.procs {
                return Err("--chaos kill-clients needs --procs: the clients killed are processes".into());
            }
            if n >= args.clients.unwrap_or(100) {
                return Err("--chaos kill-clients:N needs more than N --clients, so some survive".into());
            }
        }
        Some(Chaos::RestartDaemon(_) | Chaos::Sigterm) if args.procs || args.socket.is_some() => {
            return Err("--chaos restart-daemon and sigterm act on a private daemon, with clients as threads".into());
        }
        _ => {}
    }
    if args.client == ClientKind::Async {
        if !matches!(args.scenario, Scenario::Throughput | Scenario::Latency | Scenario::Pipelined | Scenario::All) {
            return Err("--client async runs the throughput, latency and pipelined scenarios (or all)".into());
        }
        if faulty || args.procs || args.plot.is_some() {
            return Err("--client async makes plain runs of tasks in this process: drop --chaos, --duration, --procs and --plot".into());
        }
        if args.async_share.contains(&0) || args.async_workers == Some(0) {
            return Err("--async-share and --async-workers must be at least 1".into());
        }
    }
    if args.duration == Some(0) {
        return Err("--duration must be at least 1 second".into());
    }
    if args.duration.is_some() && args.procs {
        return Err("--duration runs clients as threads".into());
    }
    if args.baselines {
        if faulty || !matches!(args.scenario, Scenario::Throughput | Scenario::Latency | Scenario::All) {
            return Err("--baselines goes with plain throughput and latency runs (or all)".into());
        }
        if args.scenario != Scenario::All && args.window.is_some_and(|w| w > 1) {
            return Err("--baselines: the baselines make synchronous calls; drop --window".into());
        }
    }
    Ok(())
}

/// The body of a `--procs` client process.
fn child(args: &Args, id: u32) -> anyhow::Result<()> {
    let transport = match args.transport {
        TransportArg::Uds => Transport::Uds(args.uds.clone().context("--uds missing")?),
        TransportArg::Tcp => Transport::Tcp(args.tcp.context("--tcp missing")?),
        _ => Transport::Shm(args.socket.clone().context("--socket missing")?),
    };
    let w = Workload {
        transport,
        service: workload::ECHO,
        messages: args.messages.unwrap_or(10_000),
        payload: args.payload.unwrap_or(64),
        window: args.window.unwrap_or(1),
        call_timeout: Duration::from_millis(args.call_timeout_ms),
        spin: args.spin_us.map(Duration::from_micros),
        reconnect: false,
        until: None,
        probe: None,
        progress: None,
    };
    workload::child_main(&w, id)
}

/// The daemon's usage after the calls; zeros (with a warning) if it can no
/// longer be read, for example because the daemon died, so the run is still
/// reported.
fn daemon_usage(pid: i32) -> daemon::ProcessUsage {
    daemon::usage(pid).unwrap_or_else(|e| {
        progress::suspend(|| {
            eprintln!("warning: cannot read /proc/{pid} of the daemon: {e}; its figures are reported as 0");
        });
        daemon::ProcessUsage::default()
    })
}

/// Every run to make, in order: per scenario and payload, each transport
/// back to back.
fn plan(args: &Args) -> Vec<Spec> {
    let faulty = args.chaos.is_some() || args.duration.is_some();
    let scenarios = match args.scenario {
        Scenario::All if faulty => vec![Scenario::Throughput],
        Scenario::All => vec![Scenario::Throughput, Scenario::Latency, Scenario::Pipelined, Scenario::Bandwidth],
        s => vec![s],
    };
    let transports: Vec<&'static str> = match args.transport {
        TransportArg::All => vec!["shm", "uds", "tcp"],
        TransportArg::Shm => vec!["shm"],
        TransportArg::Uds => vec!["uds"],
        TransportArg::Tcp => vec!["tcp"],
    };
    let mut specs = Vec::new();
    for scenario in scenarios {
        let (clients, messages, payloads, window) = scenario.defaults();
        let payloads = args.payload.map_or(payloads, |p| vec![p]);
        for payload in payloads {
            for &transport in &transports {
                let default_messages = if messages == 0 { bandwidth::messages(payload) } else { messages };
                specs.push(Spec {
                    scenario: scenario.name(),
                    transport,
                    clients: args.clients.unwrap_or(clients),
                    messages: args.messages.unwrap_or(default_messages),
                    payload,
                    window: args.window.filter(|_| window > 1 || args.scenario != Scenario::All).unwrap_or(window),
                });
            }
        }
    }
    specs
}

/// Runs the plan; returns whether every run passed.
fn run(args: Args) -> anyhow::Result<bool> {
    started::stop_on_signals()?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    if args.scenario == Scenario::Hostile {
        return hostile::run(&hostile_config(&args, exe)?);
    }
    if args.scenario == Scenario::Provider {
        return brokered::run(&provider_config(&args, exe)?);
    }
    if args.scenario == Scenario::Stream {
        return streams::run(&stream_config(&args, &exe));
    }
    let daemon = || args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd"));
    let spin = args.spin_us.map(Duration::from_micros);
    if args.scenario == Scenario::Idle {
        let window = Duration::from_secs(args.duration.unwrap_or(5));
        let watchers = match args.liveness {
            Liveness::Checks => vec![false],
            Liveness::Watcher => vec![true],
            Liveness::Both => vec![false, true],
        };
        let clients = args.clients.unwrap_or(1_000);
        return idle::run(&idle::Config { daemon: daemon(), clients, window, spin, watchers });
    }
    if args.scenario == Scenario::Scale {
        let (clients, calls, payloads, _) = Scenario::Scale.defaults();
        return scale::run(&scale::Config {
            daemon: daemon(),
            exe: exe.clone(),
            clients: args.clients.unwrap_or(clients),
            calls: args.messages.unwrap_or(calls),
            payload: args.payload.unwrap_or(payloads[0]),
            call_timeout: Duration::from_millis(args.call_timeout_ms),
            spin,
        });
    }
    let specs = plan(&args);
    // Before the runs, so a directory that cannot be made fails at once.
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let wanted = wanted_baselines(&args);
    if wanted.classic || wanted.tokio {
        baselines::check_built(&exe, &specs, wanted)?;
    }
    // A hung-up session is closed by its worker a moment later, so connects
    // in a row (latency runs) can outpace the clean-up on a loaded machine:
    // leave room for all of them.
    let max_clients = specs.iter().map(|s| s.clients).max().unwrap_or(1) + SEQUENTIAL_CONNECTS;
    let spin = args.spin_us.map(Duration::from_micros);
    let private = match &args.socket {
        Some(_) => None,
        None => {
            let binary = args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd"));
            if !binary.exists() {
                bail!("{} not found; build it (cargo build --release) or pass --daemon PATH", binary.display());
            }
            Some(PrivateDaemon::start(&binary, max_clients, spin)?)
        }
    };
    let (socket, uds, tcp) = match (&args.socket, &private) {
        (Some(s), _) => (s.clone(), args.uds.clone(), args.tcp),
        (None, Some(d)) => (d.socket().to_path_buf(), Some(d.uds().to_path_buf()), Some(d.tcp())),
        (None, None) => unreachable!("a private daemon is started when no socket is given"),
    };
    let mut private = private;
    let mut pid = daemon::daemon_pid(&socket)?;
    let mode = if args.procs { "processes" } else { "threads" };
    // Printed with the run, so it can be repeated.
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    if let Some(chaos) = args.chaos {
        println!("chaos {chaos:?}, seed {seed} (repeat with --seed {seed})");
    }
    let mut runs = Vec::new();
    let mut baseline_rows = Vec::new();
    // The scenario and payload whose runs are under way: its baselines run
    // once the next one starts, or after the last run.
    let mut group: Option<Spec> = None;
    for spec in specs {
        if let Some(done) = group.take_if(|g| (g.scenario, g.payload) != (spec.scenario, spec.payload)) {
            baseline_rows.extend(run_baselines(&args, &exe, &done, &runs)?);
        }
        group.get_or_insert_with(|| spec.clone());
        let transport = match spec.transport {
            "shm" => Transport::Shm(socket.clone()),
            "uds" => match &uds {
                Some(p) => Transport::Uds(p.clone()),
                None => {
                    eprintln!("note: skipping {} over uds: give the running daemon's --uds", spec.scenario);
                    continue;
                }
            },
            _ => match tcp {
                Some(a) => Transport::Tcp(a),
                None => {
                    eprintln!("note: skipping {} over tcp: give the running daemon's --tcp", spec.scenario);
                    continue;
                }
            },
        };
        let w = Workload {
            transport,
            service: workload::ECHO,
            messages: spec.messages,
            payload: spec.payload,
            window: spec.window,
            call_timeout: Duration::from_millis(args.call_timeout_ms),
            spin,
            reconnect: false,
            until: None,
            probe: None,
            progress: None,
        };
        let faults = Faults {
            chaos: args.chaos,
            seed,
            chaos_period: Duration::from_millis(args.chaos_ms),
            duration: args.duration.map(Duration::from_secs),
        };
        let heap_w = (spec.scenario == "bandwidth"
            && spec.payload >= bandwidth::HEAP_CHECK_FROM
            && !args.procs
            && faults.chaos.is_none()
            && faults.duration.is_none())
        .then(|| w.clone());
        // Before the run: the daemon's allocator would otherwise hand the
        // check memory the run's 4 clients made it take from the system.
        let heap_check = heap_w.map(|w| bandwidth::heap_check(&w, spec.payload, pid));
        let w_async = (args.client == ClientKind::Async && is_async_scenario(spec.scenario)).then(|| w.clone());
        let mut run = run_one(&spec, w, pid, args.procs, &exe, &faults, private.as_mut())?;
        run.heap_check = heap_check;
        // A restarted private daemon has another pid.
        if let Some(d) = &private {
            pid = d.pid();
        }
        print!("{}", run.summary(mode));
        runs.push(run);
        if let Some(w) = w_async {
            for share in shares(&args.async_share, spec.clients) {
                let layout = async_workload::Layout { share, workers: async_workers(&args) };
                let run = async_run(&spec, w.clone(), pid, layout)?;
                let mode = format!("tokio tasks, {share} per connection, {} runtime workers", layout.workers);
                print!("{}", run.summary(&mode));
                runs.push(run);
            }
        }
    }
    if let Some(done) = group {
        baseline_rows.extend(run_baselines(&args, &exe, &done, &runs)?);
    }
    if runs.len() > 1 {
        print!("{}", report::comparison(&runs));
    }
    let goals = bandwidth::goals(&runs);
    if !goals.is_empty() {
        print!("{}", bandwidth::goals_table(&goals));
    }
    let checks: Vec<(&str, &bandwidth::HeapCheck)> =
        runs.iter().filter_map(|r| Some((r.transport, r.heap_check.as_ref()?))).collect();
    if !checks.is_empty() {
        print!("{}", bandwidth::heap_table(&checks));
    }
    if !baseline_rows.is_empty() {
        print!("{}", report::baseline_table(&baseline_rows));
    }
    let async_goals = async_goals::goals(&runs, &baseline_rows, args.spin_us == Some(0));
    print!("{}", async_goals::table(&runs, &baseline_rows, &async_goals));
    if let Some(path) = &args.json {
        report::write_json_all(path, &runs, &baseline_rows, &goals, &async_goals)?;
    }
    if let Some(dir) = &args.plot {
        let files = plot::draw(dir, &runs)?;
        let names: Vec<String> =
            files.iter().filter_map(|f| Some(f.file_name()?.to_string_lossy().into_owned())).collect();
        println!("\nplots in {}: {}", dir.display(), names.join(", "));
    }
    if let Some(d) = private {
        d.stop()?;
    }
    Ok(!runs.is_empty() && runs.iter().all(Run::passed))
}

/// With `--baselines`, runs the baselines of `spec`'s scenario and payload,
/// printing each one's summary against the runs just made.
fn run_baselines(args: &Args, exe: &std::path::Path, spec: &Spec, runs: &[Run]) -> anyhow::Result<Vec<Baseline>> {
    let wanted = wanted_baselines(args);
    if !wanted.classic && !wanted.tokio {
        return Ok(Vec::new());
    }
    if args.baselines && spec.scenario == "latency" && spec.clients != 1 {
        eprintln!("note: spin_floor and futex_baseline are one pair of threads: skipped for {} clients", spec.clients);
    }
    let mut rows = Vec::new();
    for name in baselines::for_spec(spec, wanted) {
        let figures = baselines::run(exe, name, spec, args.spin_us.map(Duration::from_micros), async_workers(args))?;
        let row = Baseline::new(spec, figures, runs);
        print!("{}", row.summary());
        rows.push(row);
    }
    Ok(rows)
}

/// The baselines the command line asks for.
fn wanted_baselines(args: &Args) -> baselines::Wanted {
    baselines::Wanted { classic: args.baselines, tokio: args.client == ClientKind::Async }
}

/// Whether `--client async` runs `scenario` with the async client too.
fn is_async_scenario(scenario: &str) -> bool {
    matches!(scenario, "throughput" | "latency" | "pipelined")
}

/// The worker threads of the async runs' runtime.
fn async_workers(args: &Args) -> usize {
    args.async_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The distinct tasks per connection `--async-share` gives for `clients`
/// tasks, in order (a share beyond the clients is one connection for all).
fn shares(asked: &[usize], clients: usize) -> Vec<usize> {
    let mut shares = Vec::new();
    for &share in asked {
        let share = share.clamp(1, clients.max(1));
        if !shares.contains(&share) {
            shares.push(share);
        }
    }
    shares
}

/// One run of `spec` with the async client, laid out as `layout` says,
/// its progress on display meanwhile.
fn async_run(spec: &Spec, mut w: Workload, pid: i32, layout: async_workload::Layout) -> anyhow::Result<Run> {
    let calls = Arc::new(progress::Calls::new(spec.clients));
    w.progress = Some(Arc::clone(&calls));
    let label =
        format!("{} over {} ({}), async x{}", spec.scenario, spec.transport, report::size(spec.payload), layout.share);
    let shown = Progress::start(label, Goal::Calls(spec.clients as u64 * spec.messages), Some(calls));
    let sampler = PeakSampler::start(pid, Duration::from_millis(20));
    let result = async_workload::run(&w, spec.clients, layout);
    let (outcomes, elapsed, kept) = match result {
        Ok(done) => done,
        Err(e) => {
            sampler.finish();
            shown.finish();
            return Err(e);
        }
    };
    let usage = daemon_usage(pid);
    let peak = sampler.finish();
    shown.finish();
    drop(kept);
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, peak.max(usage.rss_anon_kb));
    run.client = "async";
    run.tasks_per_connection = Some(layout.share);
    run.runtime_workers = Some(layout.workers);
    Ok(run)
}

/// The hostile scenario's configuration from the command line.
fn hostile_config(args: &Args, exe: PathBuf) -> anyhow::Result<hostile::Config> {
    let daemon = args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd"));
    if !daemon.exists() {
        bail!("{} not found; build it (cargo build --release) or pass --daemon PATH", daemon.display());
    }
    let (clients, messages, payloads, _) = Scenario::Hostile.defaults();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    Ok(hostile::Config {
        daemon,
        exe,
        clients: args.clients.unwrap_or(clients),
        messages: args.messages.unwrap_or(messages),
        payload: args.payload.unwrap_or(payloads[0]),
        hostile: args.hostile,
        pause: Duration::from_micros(args.hostile_pause_us),
        seed,
        flood: args.flood,
        flood_connects: args.flood_connects,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        call_timeout: Duration::from_millis(args.call_timeout_ms),
        spin: args.spin_us.map(Duration::from_micros),
        json: args.json.clone(),
    })
}

/// The provider scenario's configuration from the command line: the
/// throughput, latency and pipelined workloads over shm (with --chaos, the
/// throughput one alone), with the overrides given.
fn provider_config(args: &Args, exe: PathBuf) -> anyhow::Result<brokered::Config> {
    let daemon = args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd"));
    if !daemon.exists() {
        bail!("{} not found; build it (cargo build --release) or pass --daemon PATH", daemon.display());
    }
    let scenarios: &[Scenario] = if args.chaos.is_some() {
        &[Scenario::Throughput]
    } else {
        &[Scenario::Throughput, Scenario::Latency, Scenario::Pipelined]
    };
    let specs = scenarios
        .iter()
        .map(|&scenario| {
            let (clients, messages, payloads, window) = scenario.defaults();
            Spec {
                scenario: scenario.name(),
                transport: "shm",
                clients: args.clients.unwrap_or(clients),
                messages: args.messages.unwrap_or(messages),
                payload: args.payload.unwrap_or(payloads[0]),
                // As for all: --window is the pipelined workload's, or the
                // one workload's under chaos.
                window: args.window.filter(|_| window > 1 || args.chaos.is_some()).unwrap_or(window),
            }
        })
        .collect();
    Ok(brokered::Config {
        daemon,
        exe,
        specs,
        resolves: args.resolves,
        call_timeout: Duration::from_millis(args.call_timeout_ms),
        spin: args.spin_us.map(Duration::from_micros),
        chaos: args.chaos,
        chaos_period: Duration::from_millis(args.chaos_ms),
        seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
        json: args.json.clone(),
    })
}

/// The stream scenario's configuration from the command line.
fn stream_config(args: &Args, exe: &std::path::Path) -> streams::Config {
    let (clients, items, sizes, window) = Scenario::Stream.defaults();
    streams::Config {
        daemon: args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd")),
        transports: match args.transport {
            TransportArg::All => vec!["shm", "uds", "tcp"],
            TransportArg::Shm => vec!["shm"],
            TransportArg::Uds => vec!["uds"],
            TransportArg::Tcp => vec!["tcp"],
        },
        clients: args.clients.unwrap_or(clients),
        streams: args.streams,
        items: args.messages.unwrap_or(items) as u32,
        sizes: args.payload.map_or(sizes, |p| vec![p]),
        window: args.window.unwrap_or(window),
        call_timeout: Duration::from_millis(args.call_timeout_ms),
        spin: args.spin_us.map(Duration::from_micros),
        json: args.json.clone(),
    }
}

/// Connects this many times in a row for a latency run's connect figure.
const SEQUENTIAL_CONNECTS: usize = 200;

/// The faults and the length of a run, from the command line.
struct Faults {
    chaos: Option<Chaos>,
    seed: u64,
    chaos_period: Duration,
    duration: Option<Duration>,
}

impl Faults {
    /// A plain run: no fault, a number of calls.
    const NONE: Faults = Faults { chaos: None, seed: 0, chaos_period: Duration::ZERO, duration: None };
}

/// Makes one RUN of `spec`, its progress on display meanwhile (a bar on a
/// terminal, else a line every few seconds on stderr: see [`progress`]).
fn run_one(
    spec: &Spec,
    mut w: Workload,
    pid: i32,
    procs: bool,
    exe: &std::path::Path,
    faults: &Faults,
    daemon: Option<&mut PrivateDaemon>,
) -> anyhow::Result<Run> {
    // Client processes count their calls where the bar cannot see them.
    let calls = (!procs).then(|| Arc::new(progress::Calls::new(spec.clients)));
    w.progress = calls.clone();
    let goal = match (faults.duration, faults.chaos) {
        (Some(d), _) => Goal::Lasts(d),
        // Calls until the daemon stops.
        (None, Some(Chaos::Sigterm)) => Goal::Open,
        _ if procs => Goal::Open,
        _ => Goal::Calls(spec.clients as u64 * spec.messages),
    };
    let label = format!("{} over {} ({})", spec.scenario, spec.transport, report::size(spec.payload));
    let shown = Progress::start(label, goal, calls);
    let run = measure(spec, w, pid, procs, exe, faults, daemon);
    shown.finish();
    run
}

/// Makes one RUN of `spec`, of the kind `faults` says.
fn measure(
    spec: &Spec,
    w: Workload,
    pid: i32,
    procs: bool,
    exe: &std::path::Path,
    faults: &Faults,
    daemon: Option<&mut PrivateDaemon>,
) -> anyhow::Result<Run> {
    match faults.chaos {
        Some(Chaos::KillClients(n)) => return kill_clients_run(spec, &w, pid, exe, faults, n),
        Some(Chaos::RestartDaemon(n)) => {
            let daemon = daemon.context("--chaos restart-daemon needs the private daemon")?;
            return restart_daemon_run(spec, w, daemon, faults, n);
        }
        Some(Chaos::Sigterm) => {
            let daemon = daemon.context("--chaos sigterm needs the private daemon")?;
            return sigterm_run(spec, w, daemon, faults);
        }
        Some(Chaos::KillProvider(_)) => bail!("--chaos kill-provider runs in the provider scenario"),
        None => {}
    }
    if let Some(duration) = faults.duration {
        return soak_run(spec, w, pid, duration);
    }
    let w = &w;
    let connects = if spec.scenario == "latency" && !procs {
        // A failure here shows again, counted, when the run's client connects.
        workload::sequential_connects(w, SEQUENTIAL_CONNECTS)
            .inspect_err(|e| progress::suspend(|| eprintln!("warning: connects in a row failed: {e}")))
            .ok()
    } else {
        None
    };
    let sampler = PeakSampler::start(pid, Duration::from_millis(20));
    let (outcomes, elapsed, usage) = if procs {
        let (outcomes, elapsed, guard, _) = workload::run_procs(w, spec.clients, exe, None)?;
        let usage = daemon_usage(pid);
        drop(guard);
        (outcomes, elapsed, usage)
    } else {
        let (outcomes, elapsed, clients) = workload::run_threads(w, spec.clients);
        let usage = daemon_usage(pid);
        drop(clients);
        (outcomes, elapsed, usage)
    };
    let peak = sampler.finish();
    Ok(Run::from_outcomes(spec, &outcomes, connects.as_deref(), elapsed, usage, peak.max(usage.rss_anon_kb)))
}

/// `--chaos kill-clients:N`: client processes killed at random moments;
/// the survivors' calls are the run's.
fn kill_clients_run(
    spec: &Spec,
    w: &Workload,
    pid: i32,
    exe: &std::path::Path,
    faults: &Faults,
    victims: usize,
) -> anyhow::Result<Run> {
    let plan = KillPlan { victims, seed: faults.seed, within: faults.chaos_period, daemon_pid: pid };
    let (outcomes, elapsed, guard, report) = workload::run_procs(w, spec.clients, exe, Some(plan))?;
    let usage = daemon_usage(pid);
    drop(guard);
    let mut report = report.context("the kill report")?;
    // Once the survivors have left too, the daemon should be back where it
    // started.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        report.daemon_after = daemon_usage(pid);
        if report.daemon_after.fds <= report.daemon_before.fds || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    run.kill_clients = Some(report);
    Ok(run)
}

/// `--chaos restart-daemon:N`: the daemon killed and restarted under
/// clients that reconnect.
fn restart_daemon_run(
    spec: &Spec,
    mut w: Workload,
    daemon: &mut PrivateDaemon,
    faults: &Faults,
    times: usize,
) -> anyhow::Result<Run> {
    let probe = Arc::new(Probe::default());
    w.reconnect = true;
    w.probe = Some(Arc::clone(&probe));
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let (report, (outcomes, elapsed, clients)) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| {
            let result = workload::run_threads(&w, spec.clients);
            done.store(true, Ordering::Release);
            result
        });
        let report = chaos::restart_daemon(daemon, times, faults.chaos_period, &probe, start, &done);
        (report, clients.join().expect("client threads panicked"))
    });
    let usage = daemon_usage(daemon.pid());
    drop(clients);
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    run.restart_daemon = Some(report?);
    Ok(run)
}

/// `--duration`: the throughput workload for a while, the daemon sampled
/// every second.
fn soak_run(spec: &Spec, mut w: Workload, pid: i32, duration: Duration) -> anyhow::Result<Run> {
    let probe = Arc::new(Probe::default());
    w.messages = u64::MAX;
    w.probe = Some(Arc::clone(&probe));
    let start = Instant::now();
    w.until = Some(start + duration);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = chaos::sample_daemon(pid, start, Arc::clone(&done));
    let (outcomes, elapsed, clients) = workload::run_threads(&w, spec.clients);
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler thread panicked");
    let usage = daemon_usage(pid);
    drop(clients);
    let peak = samples.iter().map(|s| s.rss_anon_kb).max().unwrap_or(0).max(usage.rss_anon_kb);
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, peak);
    run.messages_per_client = run.sent / spec.clients.max(1) as u64;
    run.soak = Some(chaos::soak(&samples, duration, &probe));
    run.samples = Some(samples);
    Ok(run)
}

/// `--chaos sigterm`: the daemon stopped with SIGTERM while every client
/// has calls in flight; each client stops calling once it lost its
/// connection. The
/// daemon is started again for the next run.
fn sigterm_run(spec: &Spec, mut w: Workload, daemon: &mut PrivateDaemon, faults: &Faults) -> anyhow::Result<Run> {
    w.messages = u64::MAX;
    let start = Instant::now();
    let (stopped, (outcomes, elapsed, clients)) = std::thread::scope(|scope| {
        let clients = scope.spawn(|| workload::run_threads(&w, spec.clients));
        std::thread::sleep(faults.chaos_period);
        let stopped = daemon.stop_and_restart();
        (stopped, clients.join().expect("client threads panicked"))
    });
    let (sent, exited, code) = stopped?;
    drop(clients);
    let usage = daemon_usage(daemon.pid());
    let mut run = Run::from_outcomes(spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    run.messages_per_client = run.sent / spec.clients.max(1) as u64;
    run.sigterm = Some(chaos::StopReport {
        sigterm_at_ms: (sent - start).as_secs_f64() * 1000.0,
        exit_ms: (exited - sent).as_secs_f64() * 1000.0,
        exit_code: code,
        clients_told: outcomes.iter().filter(|o| o.outcomes.shutdown > 0).count(),
    });
    Ok(run)
}
