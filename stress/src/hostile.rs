//! The `hostile` scenario: normal clients keep calling while hostile
//! clients abuse their own sessions and while a flood of connections stalls
//! in the handshake. The daemon must serve every normal call correctly
//! throughout, disconnect the hostile clients alone, and close the stalled
//! connections at its handshake timeout.
//!
//! One invocation, against a private daemon started with a short handshake
//! timeout and a provider process offering [`SERVICE`] through it
//! ([`crate::provider`]), runs six phases and reports each as a RUN:
//!
//! 1. `hostile`, baseline: the normal clients alone (synchronous echo calls
//!    over shared memory, every reply checked).
//! 2. `hostile`, attack: the same, while `--hostile N` clients attack
//!    ([`crate::attacker`]) and reconnect whenever the daemon drops them.
//! 3. `hostile`, baseline, target `provider`: the normal clients call the
//!    provider's echo, over sessions the daemon brokered.
//! 4. `hostile`, attack, target `provider`: the same, while the hostile
//!    clients resolve the provided name and attack their brokered
//!    sessions; the provider must drop them alone, and report each as a
//!    strike to the daemon.
//! 5. `handshake-flood`, without: clients connect one after another, each
//!    making one verified call.
//! 6. `handshake-flood`, with: the same connects while `--flood N`
//!    connections stall in the handshake ([`crate::flood`]); then every
//!    stalled connection must be closed at the handshake timeout.
//!
//! Figures from the daemon (disconnect and reject reasons, the strikes
//! providers reported) come from its `stats` service, as differences over
//! a phase.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc_client::{Client, ClientOptions, Service, Transport};
use serde::Serialize;
use serde_json::Value;

use crate::attacker::Tally;
use crate::daemon::{self, PrivateDaemon};
use crate::flood::{self, FloodFigures};
use crate::provider::{ProviderProcess, Settings, SERVICE};
use crate::report::{Run, Spec};
use crate::workload::Workload;

/// What the scenario runs, validated from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// The ipcd binary to start.
    pub daemon: PathBuf,
    /// This binary, for [`crate::run_one`].
    pub exe: PathBuf,
    /// Normal clients.
    pub clients: usize,
    /// Calls per normal client, per phase.
    pub messages: u64,
    /// Payload bytes per normal call.
    pub payload: usize,
    /// Hostile clients (0: no attack phase).
    pub hostile: usize,
    /// How long each hostile client sleeps after each burst.
    pub pause: Duration,
    /// The seed of every random choice.
    pub seed: u64,
    /// Stalled connections in the flood (0: no flood phases).
    pub flood: usize,
    /// Clients connected one after another in each flood phase.
    pub flood_connects: usize,
    /// The private daemon's handshake timeout.
    pub handshake_timeout: Duration,
    /// Timeout of each normal call.
    pub call_timeout: Duration,
    /// The normal clients' and the daemon's spin limit.
    pub spin: Option<Duration>,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
}

/// How late after its handshake timeout the daemon may close a stalled
/// connection and still pass: generous, for a loaded 2-core machine.
const CLOSE_SLACK: Duration = Duration::from_millis(500);
/// How long after the handshake timeout the watch waits for the last
/// stalled connection to close before reporting it as never closed.
const WATCH_GRACE: Duration = Duration::from_secs(5);
/// How long the daemon may take to drop the sessions of a phase that ended.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// The `hostile` object of a `hostile` RUN.
#[derive(Clone, Debug, Serialize)]
pub struct HostileFigures {
    /// `baseline` (normal clients alone) or `attack`.
    pub phase: &'static str,
    /// Whose sessions the normal clients call and the hostile ones attack:
    /// `daemon` (its own echo), or `provider` (the provider's, brokered).
    pub target: &'static str,
    /// Hostile clients attacking (0 in the baseline).
    pub hostile_clients: usize,
    /// The seed of the run (`--seed`).
    pub seed: u64,
    /// The pause of each hostile client after each burst, in microseconds.
    pub pause_us: u64,
    /// What the hostile clients did and what the daemon did to them.
    #[serde(flatten)]
    pub tally: Tally,
    /// Sessions the daemon ended over the phase, by its reason (its `stats`
    /// counters: normal clients' hang-ups included).
    pub daemon_disconnects: BTreeMap<String, u64>,
    /// Handshakes the daemon refused over the phase, by its reason.
    pub daemon_rejects: BTreeMap<String, u64>,
    /// Strikes providers reported to the daemon over the phase (its
    /// `broker.strikes_reported`): brokered sessions dropped for breaking
    /// the protocol.
    pub strikes_reported: u64,
    /// CPU time the daemon used over the phase, in seconds.
    pub daemon_cpu_s: f64,
    /// Normal throughput under attack over the baseline's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_ratio: Option<f64>,
}

/// A RUN of this scenario: the common figures and its own object.
#[derive(Serialize)]
pub struct ScenarioRun {
    #[serde(flatten)]
    pub run: Run,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostile: Option<HostileFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_flood: Option<FloodFigures>,
}

/// A client that reads the daemon's `stats` service.
struct Stats {
    client: Client,
    service: Service,
}

impl Stats {
    fn connect(socket: &Path) -> anyhow::Result<Stats> {
        let mut client = Client::connect_to(socket).context("cannot connect the stats client")?;
        let service = client.service("stats")?;
        Ok(Stats { client, service })
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let reply = self.client.call(&self.service, b"").context("stats call failed")?;
        Ok(serde_json::from_slice(&reply)?)
    }

    /// Waits until only the stats client is connected (the sessions of the
    /// phase that ended are closed), then reads the stats. `Null`, with a
    /// warning, if the daemon no longer answers: the run is still reported
    /// (and fails, since the daemon died).
    fn settled(&mut self) -> Value {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            match self.read() {
                Ok(stats) if stats["connected_clients"] == 1 || Instant::now() >= deadline => return stats,
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    eprintln!("warning: cannot read the daemon's stats: {e:#}");
                    return Value::Null;
                }
            }
        }
    }
}

/// The growth of each counter of the object at `pointer` between two stats
/// documents; counters that did not grow are left out.
fn growth(before: &Value, after: &Value, pointer: &str) -> BTreeMap<String, u64> {
    let Some(after) = after.pointer(pointer).and_then(Value::as_object) else {
        return BTreeMap::new();
    };
    after
        .iter()
        .filter_map(|(key, v)| {
            let old = before.pointer(&format!("{pointer}/{key}")).and_then(Value::as_u64).unwrap_or(0);
            let grown = v.as_u64()?.saturating_sub(old);
            (grown > 0).then(|| (key.clone(), grown))
        })
        .collect()
}

/// The counter at `pointer` in a stats document (0 if absent).
fn counter(stats: &Value, pointer: &str) -> u64 {
    stats.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs the scenario; returns whether it passed.
pub fn run(c: &Config) -> anyhow::Result<bool> {
    // Room for the flood, the clients and the daemon's own fds: the daemon
    // inherits this limit (and raises its own soft limit to it as well).
    let nofile = ipc_platform::raise_nofile_limit().context("cannot raise the open-files limit")?;
    let needed = (c.flood + 4 * (c.clients + c.hostile) + 64) as u64;
    if nofile.is_some_and(|n| n < needed) {
        bail!("the open-files limit {} is below the {needed} this run needs; lower --flood", nofile.unwrap_or(0));
    }
    println!("hostile: seed {} (repeat with --seed {})", c.seed, c.seed);
    let timeout_ms = c.handshake_timeout.as_millis().max(1);
    // The flood and the clients all run as this user, so room for all of
    // them among the unfinished handshakes: the scenario measures the
    // handshake timeout, not the cap (the daemon's tests cover that).
    let max_pending = c.flood + c.clients + c.hostile + 64;
    let extra = [
        "--handshake-timeout".to_string(),
        format!("{timeout_ms}ms"),
        "--max-pending-handshakes".into(),
        max_pending.to_string(),
        "--log-level".into(),
        "error".into(),
    ];
    // Room for the connects in a row too: each hung-up session is closed by
    // its worker a moment later, which a loaded machine may delay.
    let max_clients = c.clients + c.hostile + c.flood_connects + 8;
    let mut private = PrivateDaemon::start_with(&c.daemon, max_clients, c.spin, &extra)?;
    let socket = private.socket().to_path_buf();
    let pid = private.pid();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut provider = ProviderProcess::start(&c.exe, &socket, Settings { workers, spin: c.spin })?;
    let mut stats = Stats::connect(&socket)?;
    let w = Workload {
        transport: Transport::Shm(socket.clone()),
        service: crate::workload::ECHO,
        messages: c.messages,
        payload: c.payload,
        window: 1,
        call_timeout: c.call_timeout,
        spin: c.spin,
        reconnect: false,
        until: None,
        probe: None,
        progress: None,
    };
    let mut runs = Vec::new();

    let provided = Workload { service: SERVICE, ..w.clone() };
    for (target, w, pid) in [(Target::Daemon, &w, pid), (Target::Provider, &provided, provider.pid())] {
        let baseline = normal_phase(c, w, pid, &mut stats, target, None)?;
        let baseline_throughput = baseline.run.throughput_msgs_per_s;
        print!("{}", summary(&baseline));
        runs.push(baseline);
        if c.hostile > 0 {
            let mut attack = normal_phase(c, w, pid, &mut stats, target, Some(&socket))?;
            if let Some(h) = &mut attack.hostile {
                h.throughput_ratio =
                    (baseline_throughput > 0.0).then(|| attack.run.throughput_msgs_per_s / baseline_throughput);
            }
            print!("{}", summary(&attack));
            runs.push(attack);
        }
    }
    if c.flood > 0 && private.exit_status().is_none() {
        let (without, with) = flood_phases(c, &w, &socket, pid, &mut stats)?;
        print!("{}{}", summary(&without), summary(&with));
        runs.push(without);
        runs.push(with);
    }

    let exited = private.exit_status();
    let provider_exited = provider.exit_status();
    let passed = verdict(&runs, exited.is_none() && provider_exited.is_none());
    print!("{}", closing(c, &runs, exited, provider_exited, passed));
    if let Some(path) = &c.json {
        crate::report::write_json(path, &runs)?;
    }
    drop(stats);
    if provider_exited.is_none() {
        provider.stop()?;
    }
    if exited.is_none() {
        private.stop()?;
    }
    Ok(passed)
}

/// Whose sessions a phase's clients call and attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The daemon's own.
    Daemon,
    /// The provider's, brokered by the daemon.
    Provider,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Daemon => "daemon",
            Target::Provider => "provider",
        }
    }
}

/// The normal clients' calls to `target` (through `w`, served by process
/// `pid`), alone or (with `attack_socket`) under attack on `target`'s
/// sessions.
fn normal_phase(
    c: &Config,
    w: &Workload,
    pid: i32,
    stats: &mut Stats,
    target: Target,
    attack_socket: Option<&Path>,
) -> anyhow::Result<ScenarioRun> {
    let spec = Spec {
        scenario: "hostile",
        transport: "shm",
        clients: c.clients,
        messages: c.messages,
        payload: c.payload,
        window: 1,
    };
    let before = stats.settled();
    let cpu_before = daemon::cpu_seconds(&pid.to_string()).unwrap_or(0.0);
    // The attackers run in a process of their own, as a hostile peer
    // would. The attack is under way once every hostile client holds a
    // session (or has tried for a while: a daemon that refuses them is a
    // finding too).
    let service = (target == Target::Provider).then_some(SERVICE);
    let attackers = attack_socket.map(|socket| Attackers::start(c, socket, service)).transpose()?;
    let mut run = crate::run_one(&spec, w.clone(), pid, false, &c.exe, &crate::Faults::NONE, None)?;
    if target == Target::Provider {
        run.served_by = Some("provider");
    }
    let tally = match attackers {
        Some(a) => a.stop()?,
        None => Tally::default(),
    };
    let cpu = daemon::cpu_seconds(&pid.to_string()).unwrap_or(0.0) - cpu_before;
    let after = stats.settled();
    Ok(ScenarioRun {
        run,
        hostile: Some(HostileFigures {
            phase: if attack_socket.is_some() { "attack" } else { "baseline" },
            target: target.name(),
            hostile_clients: attack_socket.map_or(0, |_| c.hostile),
            seed: c.seed,
            pause_us: c.pause.as_micros() as u64,
            tally,
            daemon_disconnects: growth(&before, &after, "/disconnects"),
            daemon_rejects: growth(&before, &after, "/handshakes/rejected"),
            strikes_reported: counter(&after, "/broker/strikes_reported")
                .saturating_sub(counter(&before, "/broker/strikes_reported")),
            daemon_cpu_s: cpu,
            throughput_ratio: None,
        }),
        handshake_flood: None,
    })
}

/// A hostile process started by [`Attackers::start`].
struct Attackers {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    _registration: crate::started::Registration,
}

impl Attackers {
    /// Starts this binary again with `--child-attackers` (attacking
    /// sessions with the provider of `service`, if given) and waits until
    /// its clients are attacking.
    fn start(c: &Config, socket: &Path, service: Option<&str>) -> anyhow::Result<Attackers> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut command = Command::new(&c.exe);
        command
            .arg("--child-attackers")
            .arg(c.hostile.to_string())
            .arg("--socket")
            .arg(socket)
            .arg("--seed")
            .arg(c.seed.to_string())
            .arg("--hostile-pause-us")
            .arg(c.pause.as_micros().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(service) = service {
            command.arg("--attack-service").arg(service);
        }
        let (mut child, registration) = crate::started::spawn(&mut command, crate::started::Stop::Kill)
            .context("cannot start the hostile process")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("started") {
            bail!("the hostile process said {line:?} instead of started");
        }
        Ok(Attackers { child, stdin, stdout, _registration: registration })
    }

    /// Stops the attack and returns what the hostile clients did.
    fn stop(mut self) -> anyhow::Result<Tally> {
        use std::io::{BufRead, Write};
        self.stdin.write_all(b"stop\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        self.child.wait()?;
        let json = line.strip_prefix("done ").with_context(|| format!("the hostile process said {line:?}"))?;
        Ok(serde_json::from_str(json)?)
    }
}

/// The connects without and then with the flood, and the stalled
/// connections' fate.
fn flood_phases(
    c: &Config,
    w: &Workload,
    socket: &Path,
    pid: i32,
    stats: &mut Stats,
) -> anyhow::Result<(ScenarioRun, ScenarioRun)> {
    let spec = Spec {
        scenario: "handshake-flood",
        transport: "shm",
        clients: c.flood_connects,
        messages: 1,
        payload: c.payload,
        window: 1,
    };
    stats.settled();
    let (outcomes, elapsed, _) = flood::connect_series(w, c.flood_connects);
    let usage = crate::daemon_usage(pid);
    let run = Run::from_outcomes(&spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    let without_figures = FloodFigures::without(&run, c.handshake_timeout);
    let without = ScenarioRun { run, hostile: None, handshake_flood: Some(without_figures.clone()) };

    let before = stats.settled();
    let hello = ipc_client::raw::hello(&ClientOptions::default())?;
    let mut rng = fastrand::Rng::with_seed(c.seed ^ 0xF100D);
    let stalled = flood::open_stalled(socket, c.flood, &hello, &mut rng).context("cannot open the flood")?;
    let give_up = Instant::now() + c.handshake_timeout + WATCH_GRACE;
    let watch = flood::watch(stalled, hello, c.handshake_timeout, give_up);
    let (outcomes, elapsed, connects_end) = flood::connect_series(w, c.flood_connects);
    // Read with the stalled connections still open (unless the timeout
    // passed during the connects).
    let usage = crate::daemon_usage(pid);
    let closings = watch.join().expect("the flood watch panicked").context("the flood watch failed")?;
    let after = stats.settled();
    let timeouts = growth(&before, &after, "/handshakes/rejected").get("handshake_timeout").copied().unwrap_or(0);
    let run = Run::from_outcomes(&spec, &outcomes, None, elapsed, usage, usage.rss_anon_kb);
    let figures = FloodFigures::with(&run, &without_figures, &closings, connects_end, timeouts);
    let with = ScenarioRun { run, hostile: None, handshake_flood: Some(figures) };
    Ok((without, with))
}

/// Whether the scenario passed: every normal call succeeded with the right
/// reply, the daemon is alive, and it closed every stalled connection on
/// time.
fn verdict(runs: &[ScenarioRun], alive: bool) -> bool {
    alive
        && runs.iter().all(|r| r.run.passed())
        && runs.iter().filter_map(|r| r.handshake_flood.as_ref()).all(|f| f.stalled_closed_on_time(CLOSE_SLACK))
}

/// One RUN's summary: the common one, then this scenario's figures.
fn summary(r: &ScenarioRun) -> String {
    let mut s = r.run.summary("threads");
    if let Some(h) = &r.hostile {
        let t = &h.tally;
        s += &format!(
            "  phase       {} of the {}'s sessions ({} hostile clients)\n",
            h.phase, h.target, h.hostile_clients
        );
        if h.hostile_clients > 0 {
            s += &format!(
                "  hostile     sessions opened {}  disconnected by the {} {}  connect failures {}\n",
                t.sessions_opened, h.target, t.sessions_disconnected, t.connect_failures
            );
            s += &format!(
                "  attacks     bursts {}  scribbles {}  frames {}  eventfd rings {}  futex wakes {}  bell sends {}  control writes {}\n",
                t.bursts, t.scribbles, t.frames_pushed, t.eventfd_rings, t.futex_wakes, t.bell_rings, t.control_writes
            );
            if let Some(e) = &t.first_connect_error {
                s += &format!("  first hostile connect error {e}\n");
            }
        }
        s += &format!(
            "  daemon      disconnects {}  rejects {}  strikes reported by providers {}\n",
            counters(&h.daemon_disconnects),
            counters(&h.daemon_rejects),
            h.strikes_reported
        );
        s += &format!("  cpu s       daemon {:.2}  hostile threads {:.2}\n", h.daemon_cpu_s, t.cpu_s);
    }
    if let Some(f) = &r.handshake_flood {
        s += &format!(
            "  flood       {}: {} stalled ({} silent, {} partial hello, {} dribbling), handshake timeout {} ms\n",
            f.phase, f.stalled, f.silent, f.partial, f.dribbling, f.handshake_timeout_ms
        );
        s += &format!(
            "  connects    {} in a row: p50 {:.1} us  p99 {:.1} us  max {:.1} us\n",
            f.connects, f.connect_us.p50, f.connect_us.p99, f.connect_us.max
        );
        if f.stalled > 0 {
            s += &format!(
                "  stalled     closed {} of {} after {}  answered {}  daemon handshake timeouts {}\n",
                f.stalled_closed,
                f.stalled,
                f.stalled_closed_after_ms.map_or("-".into(), |s| format!("{:.1}..{:.1} ms", s.min, s.max)),
                f.stalled_answered,
                f.daemon_handshake_timeouts
            );
            if !f.connects_before_first_close {
                s += "  note        the daemon closed stalled connections before the connects ended\n";
            }
        }
    }
    s
}

fn counters(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
}

/// The closing summary: the comparisons the scenario is for.
fn closing(
    c: &Config,
    runs: &[ScenarioRun],
    exited: Option<std::process::ExitStatus>,
    provider_exited: Option<std::process::ExitStatus>,
    passed: bool,
) -> String {
    let mut s = format!("\nhostile scenario (seed {})\n", c.seed);
    let (failed, mismatched): (u64, u64) =
        runs.iter().fold((0, 0), |(f, m), r| (f + r.run.failed, m + r.run.mismatched));
    s += &format!("  normal calls failed {failed}, mismatched {mismatched} (goal 0)\n");
    for target in [Target::Daemon, Target::Provider] {
        let phase = |name: &str| {
            runs.iter().find(|r| r.hostile.as_ref().is_some_and(|h| h.target == target.name() && h.phase == name))
        };
        let (Some(baseline), Some(attack)) = (phase("baseline"), phase("attack")) else { continue };
        let h = attack.hostile.as_ref().expect("a hostile phase");
        s += &format!(
            "  {:<8} normal throughput alone {:.0} msg/s, with {} hostile clients {:.0} msg/s: ratio {:.2}\n",
            target.name(),
            baseline.run.throughput_msgs_per_s,
            c.hostile,
            attack.run.throughput_msgs_per_s,
            h.throughput_ratio.unwrap_or(0.0)
        );
        s += &format!(
            "  {:<8} hostile sessions opened {}, disconnected by the {} {}; daemon disconnects: {}; strikes reported by providers: {}\n",
            target.name(),
            h.tally.sessions_opened,
            target.name(),
            h.tally.sessions_disconnected,
            counters(&h.daemon_disconnects),
            h.strikes_reported
        );
    }
    let floods: Vec<&FloodFigures> = runs.iter().filter_map(|r| r.handshake_flood.as_ref()).collect();
    if let [without, with] = floods[..] {
        s += &format!(
            "  connect p50/p99 us without flood {:.1}/{:.1}, with {} stalled {:.1}/{:.1}: ratio {:.2}/{:.2}\n",
            without.connect_us.p50,
            without.connect_us.p99,
            with.stalled,
            with.connect_us.p50,
            with.connect_us.p99,
            with.connect_p50_ratio.unwrap_or(0.0),
            with.connect_p99_ratio.unwrap_or(0.0)
        );
        s += &format!(
            "  stalled closed     {} of {} at {} (handshake timeout {} ms)\n",
            with.stalled_closed,
            with.stalled,
            with.stalled_closed_after_ms.map_or("-".into(), |s| format!("{:.1}..{:.1} ms", s.min, s.max)),
            with.handshake_timeout_ms
        );
    }
    match exited {
        None => s += "  daemon             alive\n",
        Some(status) => s += &format!("  daemon             DIED ({status})\n"),
    }
    match provider_exited {
        None => s += "  provider           alive\n",
        Some(status) => s += &format!("  provider           DIED ({status})\n"),
    }
    s += if passed { "  result             PASS\n" } else { "  result             FAIL\n" };
    s
}
