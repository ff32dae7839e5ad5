//! The figures of a run, as JSON and as a human summary.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::async_goals::AsyncGoal;
use crate::bandwidth::{GoalRow, HeapCheck};
use crate::brokered::{BrokeredRestartReport, KillProviderReport};
use crate::chaos::{KillReport, RestartReport, Sample, Soak, StopReport};
use crate::daemon::ProcessUsage;
use crate::workload::{new_histogram, ClientOutcome, Outcomes};

/// Latency percentiles in microseconds.
#[derive(Serialize, Debug, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Connect-time figures in microseconds.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Connect {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// How the connects came: `"N in a row"` (one client connecting and
    /// dropping, latency runs) or `"N at once"` (every client of the run
    /// connecting together).
    pub pattern: String,
}

/// One run, with the keys documented in the README.
#[derive(Serialize, Debug)]
pub struct Run {
    pub scenario: &'static str,
    pub transport: &'static str,
    /// Which client made the calls: `sync` (the blocking client, a thread
    /// per client) or `async` (`--client async`: a tokio task per client).
    pub client: &'static str,
    /// Async runs: tasks calling through one connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_per_connection: Option<usize>,
    /// Async runs: worker threads of the tokio runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_workers: Option<usize>,
    /// In the provider scenario: who served the calls, `daemon` (its own
    /// `echo`) or `provider` (the provider process's, brokered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<&'static str>,
    pub clients: usize,
    pub messages_per_client: u64,
    pub payload_bytes: usize,
    pub window: u32,
    /// Calls made, each with exactly one outcome below (or lost).
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub mismatched: u64,
    pub outcomes: Outcomes,
    /// Calls made that got no outcome.
    pub lost: u64,
    /// Outcomes beyond one per call, or replies carrying another
    /// request's payload.
    pub duplicated: u64,
    pub duration_s: f64,
    pub throughput_msgs_per_s: f64,
    pub latency_us: Latency,
    pub connect_us: Connect,
    /// Payload bytes carried per second, requests and replies together
    /// (bandwidth runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_s: Option<f64>,
    /// Heap allocations per call on the client side, over the calling phase
    /// of every client thread (counted by stress's global allocator).
    pub allocations_per_call: f64,
    pub daemon: ProcessUsage,
    pub peak_rss_anon_kb: u64,
    /// `--chaos kill-clients:N`: the kills and the daemon's clean-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_clients: Option<KillReport>,
    /// `--chaos restart-daemon:N`: the restarts and the clients' recovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_daemon: Option<RestartReport>,
    /// `--chaos sigterm`: the graceful stop under load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigterm: Option<StopReport>,
    /// `--chaos kill-provider:N`: the provider's kills and its callers'
    /// recovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kill_provider: Option<KillProviderReport>,
    /// `--chaos restart-daemon:N` in the provider scenario: the restarts
    /// under brokered calls, and the provider's registrations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_daemon_brokered: Option<BrokeredRestartReport>,
    /// `--duration`: the daemon sampled every second, and the trend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<Sample>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<Soak>,
    /// Bandwidth runs of payloads far beyond a ring: what one such call
    /// made the daemon and its caller hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_check: Option<HeapCheck>,
    /// The first call that failed, or why a client stopped short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(skip)]
    pub first_rejection: Option<String>,
    /// Every successful call's round trip, in nanoseconds (for `--plot`).
    #[serde(skip)]
    pub latency_ns: Histogram<u64>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Connect {
    /// The figures of `h` (nanoseconds), in microseconds.
    pub fn of(h: &Histogram<u64>, pattern: String) -> Connect {
        Connect { p50: us(h.value_at_quantile(0.50)), p99: us(h.value_at_quantile(0.99)), max: us(h.max()), pattern }
    }
}

impl Run {
    /// Gathers the outcomes of every client into one run.
    pub fn from_outcomes(
        spec: &Spec,
        outcomes: &[ClientOutcome],
        connects: Option<&[u64]>,
        duration: Duration,
        daemon: ProcessUsage,
        peak_rss_anon_kb: u64,
    ) -> Run {
        let (messages, payload) = (spec.messages, spec.payload);
        let mut latency: Histogram<u64> = new_histogram();
        let mut connect: Histogram<u64> = new_histogram();
        let (mut made, mut succeeded, mut failed, mut mismatched, mut allocations) = (0, 0, 0, 0, 0);
        let (mut lost, mut duplicated, mut kinds) = (0, 0, Outcomes::default());
        let (mut first_error, mut first_rejection) = (None, None);
        for o in outcomes {
            latency.add(&o.latency_ns).expect("histograms share bounds");
            made += o.made;
            succeeded += o.succeeded;
            failed += o.failed();
            mismatched += o.mismatched;
            lost += o.lost;
            duplicated += o.duplicated;
            kinds.add(&o.outcomes);
            allocations += o.allocations;
            if first_error.is_none() {
                first_error.clone_from(&o.first_error);
            }
            if first_rejection.is_none() {
                first_rejection.clone_from(&o.first_rejection);
            }
        }
        // Connect times: the clients' own, or (latency runs) connects made
        // one after another.
        let connect_ns: Vec<u64> =
            connects.map_or_else(|| outcomes.iter().map(|o| o.connect_ns).collect(), <[u64]>::to_vec);
        let pattern = match connects {
            Some(c) => format!("{} in a row", c.len()),
            None => format!("{} at once", outcomes.len()),
        };
        for ns in connect_ns {
            connect.saturating_record(ns.max(1));
        }
        let secs = duration.as_secs_f64();
        let q = |h: &Histogram<u64>, q: f64| us(h.value_at_quantile(q));
        let sent = made;
        Run {
            scenario: spec.scenario,
            transport: spec.transport,
            client: "sync",
            tasks_per_connection: None,
            runtime_workers: None,
            served_by: None,
            clients: outcomes.len(),
            messages_per_client: messages,
            payload_bytes: payload,
            window: spec.window,
            sent,
            succeeded,
            failed,
            mismatched,
            outcomes: kinds,
            lost,
            duplicated,
            duration_s: secs,
            throughput_msgs_per_s: if secs > 0.0 { succeeded as f64 / secs } else { 0.0 },
            latency_us: Latency {
                p50: q(&latency, 0.50),
                p90: q(&latency, 0.90),
                p99: q(&latency, 0.99),
                p999: q(&latency, 0.999),
                max: us(latency.max()),
                mean: latency.mean() / 1000.0,
            },
            connect_us: Connect::of(&connect, pattern),
            bytes_per_s: (spec.scenario == "bandwidth" && secs > 0.0)
                .then(|| 2.0 * payload as f64 * succeeded as f64 / secs),
            allocations_per_call: if sent > 0 { allocations as f64 / sent as f64 } else { 0.0 },
            daemon,
            peak_rss_anon_kb,
            kill_clients: None,
            restart_daemon: None,
            sigterm: None,
            kill_provider: None,
            restart_daemon_brokered: None,
            samples: None,
            soak: None,
            heap_check: None,
            first_error,
            first_rejection,
            latency_ns: latency,
        }
    }

    /// Whether the run passed: no call lost, duplicated or answered wrong,
    /// and every call succeeded, except (when the daemon was restarted)
    /// those in flight at a crash, which must end as `disconnected`.
    pub fn passed(&self) -> bool {
        let exact = self.lost == 0 && self.duplicated == 0 && self.mismatched == 0 && self.succeeded > 0;
        let o = &self.outcomes;
        // Only the calls in flight at a crash (of the daemon, or of the
        // provider they call) may fail, and then as `disconnected`.
        let crashed = self.restart_daemon.as_ref().map(RestartReport::passed);
        let crashed = crashed.or(self.kill_provider.as_ref().map(KillProviderReport::passed));
        let failures_ok = match (crashed, &self.sigterm) {
            (Some(recovered), _) => recovered && o.timeout == 0 && o.rejected == 0 && o.shutdown == 0,
            // Every call not answered must have been answered `shutdown`.
            (_, Some(t)) => t.passed() && o.timeout + o.disconnected + o.rejected == 0 && o.shutdown > 0,
            // Every planned call made (clients stop once disconnected); a
            // soak run plans a time, not a count. Brokered calls through
            // daemon restarts are planned calls too: none may fail.
            _ => {
                self.failed == 0 && (self.soak.is_some() || self.sent == self.clients as u64 * self.messages_per_client)
            }
        };
        exact
            && failures_ok
            && self.heap_check.as_ref().is_none_or(|h| h.verified)
            && self.kill_clients.as_ref().is_none_or(KillReport::passed)
            && self.restart_daemon_brokered.as_ref().is_none_or(BrokeredRestartReport::passed)
    }

    /// The human summary.
    pub fn summary(&self, mode: &str) -> String {
        let l = &self.latency_us;
        let served = match self.served_by {
            Some("provider") => ", served by the provider",
            Some(_) => ", served by the daemon",
            None => "",
        };
        let mut s = format!(
            "{} over {}{served}: {} clients x {} calls, {} B payloads, window {}, clients as {mode}\n",
            self.scenario, self.transport, self.clients, self.messages_per_client, self.payload_bytes, self.window
        );
        let o = &self.outcomes;
        s += &format!(
            "  calls       sent {}  succeeded {}  failed {}  mismatched {}  lost {}  duplicated {}\n",
            self.sent, self.succeeded, self.failed, self.mismatched, self.lost, self.duplicated
        );
        s += &format!(
            "  outcomes    replied {}  timeout {}  disconnected {}  rejected {}  shutdown {}\n",
            o.replied, o.timeout, o.disconnected, o.rejected, o.shutdown
        );
        s += &format!("  throughput  {:.0} msg/s over {:.3} s", self.throughput_msgs_per_s, self.duration_s);
        if let Some(b) = self.bytes_per_s {
            s += &format!("  ({:.2} GB/s of payload, both directions)", b / 1e9);
        }
        s += "\n";
        s += &format!(
            "  latency us  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        s += &format!(
            "  connect us  p50 {:.1}  p99 {:.1}  max {:.1} ({})   allocations/call {:.3}\n",
            self.connect_us.p50,
            self.connect_us.p99,
            self.connect_us.max,
            self.connect_us.pattern,
            self.allocations_per_call
        );
        s += &format!(
            "  {:<11} rss_anon {} kB (peak during run {} kB)  rss_shmem {} kB  fds {}\n",
            if self.served_by == Some("provider") { "provider" } else { "daemon" },
            self.daemon.rss_anon_kb,
            self.peak_rss_anon_kb,
            self.daemon.rss_shmem_kb,
            self.daemon.fds
        );
        if let Some(k) = &self.kill_clients {
            let ms = |t: Option<f64>, none: &str| t.map_or_else(|| none.to_string(), |t| format!("{t:.1} ms"));
            s += &format!("  chaos       killed {} client processes (seed {}); survivors above\n", k.killed, k.seed);
            s += &format!(
                "              killed processes exited {} after the last kill\n",
                ms(k.victims_exited_ms, "not within 30 s")
            );
            s += &format!(
                "              daemon fds {} before, {} connected, {} expected after the kills, reached {} after their exit ({} after the last kill)\n",
                k.daemon_before.fds,
                k.daemon_connected.fds,
                k.fds_expected_after_kills,
                ms(k.cleanup_ms, "not within 5 s"),
                ms(k.cleanup_after_kill_ms, "-")
            );
            s += &format!(
                "              daemon rss_anon {} kB connected, {} kB after clean-up; after all left: fds {}, rss_anon {} kB\n",
                k.daemon_connected.rss_anon_kb, k.rss_anon_kb_after_cleanup, k.daemon_after.fds, k.daemon_after.rss_anon_kb
            );
        }
        if let Some(r) = &self.restart_daemon {
            for (i, x) in r.restarts.iter().enumerate() {
                let rec = x.recovery_ms.map_or_else(|| "none".into(), |t| format!("{t:.1} ms"));
                s += &format!(
                    "  restart {}   at {:.0} ms: down {:.1} ms, ready {:.1} ms after start, first success {} after start\n",
                    i + 1, x.killed_at_ms, x.down_ms, x.ready_ms, rec
                );
            }
            s += &format!(
                "  disconnect  {} calls; after the kill: worst {:.1} ms, median {:.1} ms; before any kill: {}\n",
                r.disconnected_calls,
                r.disconnect_delay_ms_max,
                r.disconnect_delay_ms_p50,
                r.disconnected_before_any_kill
            );
            if let Some(c) = &r.reconnect_us {
                s += &format!(
                    "  reconnect   {} connects that made a reconnect: p50 {:.1} us  p99 {:.1} us  max {:.1} us\n",
                    r.reconnects, c.p50, c.p99, c.max
                );
            }
        }
        if let Some(k) = &self.kill_provider {
            for (i, x) in k.kills.iter().enumerate() {
                let rec = x.recovery_ms.map_or_else(|| "none".into(), |t| format!("{t:.1} ms"));
                s += &format!(
                    "  kill {}      at {:.0} ms: reaped {:.1} ms after, new provider registered {:.1} ms after the kill ({:.1} ms after its start), first success {} after that; {} calls disconnected\n",
                    i + 1, x.killed_at_ms, x.reaped_ms, x.registered_ms, x.start_to_registered_ms, rec, x.disconnected
                );
            }
            s += &format!(
                "  disconnect  {} calls; before any kill: {}\n",
                k.disconnected_calls, k.disconnected_before_any_kill
            );
        }
        if let Some(r) = &self.restart_daemon_brokered {
            for (i, x) in r.restarts.iter().enumerate() {
                let reg = x.registered_ms.map_or_else(|| "not within 10 s".into(), |t| format!("{t:.1} ms"));
                s += &format!(
                    "  restart {}   at {:.0} ms: down {:.1} ms, ready {:.1} ms after start, provider registered again {} after start; {} calls failed meanwhile\n",
                    i + 1, x.killed_at_ms, x.down_ms, x.ready_ms, reg, x.failed_while_down
                );
            }
            s += &format!(
                "  brokered    calls failed while the daemon was down {} (goal 0), at any time {}\n",
                r.failed_while_down, r.failed_calls
            );
        }
        if let Some(t) = &self.sigterm {
            s += &format!(
                "  sigterm     at {:.0} ms; the daemon exited {:?} after {:.1} ms; {} of {} clients were answered shutdown\n",
                t.sigterm_at_ms, t.exit_code, t.exit_ms, t.clients_told, self.clients
            );
        }
        if let Some(k) = &self.soak {
            s += &format!(
                "  soak        after {:.0} s warm-up: rss_anon {:+.2} kB/min ({} -> {} kB), fds {:+.3}/min\n",
                k.warmup_s, k.rss_anon_kb_per_min, k.rss_anon_kb_after_warmup, k.rss_anon_kb_end, k.fds_per_min
            );
            let p99: Vec<String> = k.p99_us_per_minute.iter().map(|p| format!("{p:.0}")).collect();
            s += &format!("              p99 us per minute: {}\n", p99.join(" "));
        }
        if let Some(e) = &self.first_error {
            s += &format!("  first error {e}\n");
        }
        if let Some(e) = self.first_rejection.as_ref().filter(|r| Some(*r) != self.first_error.as_ref()) {
            s += &format!("  first refusal {e}\n");
        }
        s += if self.passed() { "  result      PASS\n" } else { "  result      FAIL\n" };
        s
    }
}

/// What a run is, before it runs.
#[derive(Clone, Debug)]
pub struct Spec {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub clients: usize,
    pub messages: u64,
    pub payload: usize,
    pub window: u32,
}

/// A payload size as people write it: "64 B", "4 KiB", "1 MiB".
pub fn size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// `x` to two significant figures: a ratio of two figures from one run on
/// a shared machine carries no more (1.7, 0.91, 71, 100).
pub fn two_figures(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        return format!("{x}");
    }
    let magnitude = x.log10().floor() as i32;
    let scale = 10f64.powi(magnitude - 1);
    let rounded = (x / scale).round() * scale;
    // The rounding may carry into the next power of ten (9.96 -> 10).
    let magnitude = rounded.log10().floor() as i32;
    format!("{:.*}", (1 - magnitude).max(0) as usize, rounded)
}

/// The comparison table: one row per scenario and payload, each
/// transport's headline figure, and how shm compares with uds and tcp
/// (higher is better for shm in both directions: a throughput ratio, or how
/// many times lower its latency is).
pub fn comparison(runs: &[Run]) -> String {
    let mut rows: Vec<(&str, usize)> = Vec::new();
    for r in runs {
        if !rows.contains(&(r.scenario, r.payload_bytes)) {
            rows.push((r.scenario, r.payload_bytes));
        }
    }
    let mut s = format!(
        "\n{:<11} {:>8}  {:<12} {:>13} {:>13} {:>13} {:>9} {:>9}\n",
        "scenario", "payload", "figure", "shm", "uds", "tcp", "shm:uds", "shm:tcp"
    );
    for (scenario, payload) in rows {
        // The blocking client's runs: `--client async` has a table of its own.
        let find = |t: &str| {
            runs.iter().find(|r| {
                r.scenario == scenario && r.payload_bytes == payload && r.transport == t && r.client == "sync"
            })
        };
        let (label, higher_better, figure): (&str, bool, fn(&Run) -> f64) = match scenario {
            "latency" => ("p50 us", false, |r| r.latency_us.p50),
            "bandwidth" => ("GB/s", true, |r| r.bytes_per_s.unwrap_or(0.0) / 1e9),
            _ => ("msg/s", true, |r| r.throughput_msgs_per_s),
        };
        let cell = |t: &str| match find(t) {
            Some(r) if label == "msg/s" => format!("{:.0}", figure(r)),
            Some(r) => format!("{:.2}", figure(r)),
            None => "-".into(),
        };
        let ratio = |t: &str| match (find("shm"), find(t)) {
            (Some(a), Some(b)) if figure(a) > 0.0 && figure(b) > 0.0 => {
                let x = if higher_better { figure(a) / figure(b) } else { figure(b) / figure(a) };
                format!("{}x", two_figures(x))
            }
            _ => "-".into(),
        };
        s += &format!(
            "{:<11} {:>8}  {:<12} {:>13} {:>13} {:>13} {:>9} {:>9}\n",
            scenario,
            size(payload),
            label,
            cell("shm"),
            cell("uds"),
            cell("tcp"),
            ratio("uds"),
            ratio("tcp")
        );
    }
    s
}

/// What a baseline program (`stress/examples`) printed: its one JSON line,
/// kept whole.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BaselineFigures {
    pub name: String,
    pub clients: usize,
    pub messages_per_client: u64,
    /// Payload bytes each way per call (0: the floors carry none).
    pub payload_bytes: usize,
    pub calls: u64,
    pub duration_s: f64,
    pub msgs_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Figures of that baseline alone (how often each side slept, ...).
    #[serde(flatten)]
    pub notes: BTreeMap<String, serde_json::Value>,
}

/// A baseline run beside a scenario's runs, and ipcd's figures against it.
#[derive(Serialize, Debug)]
pub struct Baseline {
    /// The scenario and payload of the runs it is compared with.
    pub scenario: &'static str,
    pub payload_bytes: usize,
    pub baseline: BaselineFigures,
    /// The figure compared: `msgs_per_s` (against a RUN's
    /// `throughput_msgs_per_s`) or `p50_us` (against `latency_us.p50`).
    pub compared: &'static str,
    /// Per transport of those runs, how many times better ipcd did than the
    /// baseline: its throughput over the baseline's, or the baseline's p50
    /// over its own. Below 1, ipcd did worse.
    pub ratios: BTreeMap<&'static str, f64>,
}

/// The transports in the order they are shown.
const TRANSPORTS: [&str; 3] = ["shm", "uds", "tcp"];

impl Baseline {
    /// Compares `figures`, measured beside the runs of `spec`'s scenario and
    /// payload, with those of `runs`.
    pub fn new(spec: &Spec, figures: BaselineFigures, runs: &[Run]) -> Baseline {
        let latency = spec.scenario == "latency";
        let mut ratios = BTreeMap::new();
        let beside = |r: &&Run| r.scenario == spec.scenario && r.payload_bytes == spec.payload && r.client == "sync";
        for r in runs.iter().filter(beside) {
            let (ours, theirs) = if latency {
                (figures.p50_us, r.latency_us.p50)
            } else {
                (r.throughput_msgs_per_s, figures.msgs_per_s)
            };
            if ours > 0.0 && theirs > 0.0 {
                ratios.insert(r.transport, ours / theirs);
            }
        }
        Baseline {
            scenario: spec.scenario,
            payload_bytes: spec.payload,
            baseline: figures,
            compared: if latency { "p50_us" } else { "msgs_per_s" },
            ratios,
        }
    }

    fn label(&self) -> &'static str {
        if self.compared == "p50_us" {
            "p50 us"
        } else {
            "msg/s"
        }
    }

    fn ratio(&self, transport: &str) -> String {
        self.ratios.get(transport).map_or_else(|| "-".into(), |x| format!("{}x", two_figures(*x)))
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let b = &self.baseline;
        let mut s = format!(
            "baseline {} beside {} ({}): {} clients x {} round trips, {}\n",
            b.name,
            self.scenario,
            size(self.payload_bytes),
            b.clients,
            b.messages_per_client,
            if b.payload_bytes == 0 { "no payload".into() } else { format!("{} each way", size(b.payload_bytes)) }
        );
        s += &format!("  throughput  {:.0} msg/s over {:.3} s ({} calls)\n", b.msgs_per_s, b.duration_s, b.calls);
        s += &format!(
            "  latency us  p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.1}\n",
            b.p50_us, b.p90_us, b.p99_us, b.max_us
        );
        if !b.notes.is_empty() {
            let notes: Vec<String> = b.notes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            s += &format!("  notes       {}\n", notes.join("  "));
        }
        let ratios: Vec<String> = TRANSPORTS
            .iter()
            .filter(|t| self.ratios.contains_key(*t))
            .map(|t| format!("{t} {}", self.ratio(t)))
            .collect();
        if !ratios.is_empty() {
            s += &format!("  ipcd        {}  ({}; above 1: ipcd better)\n", ratios.join("  "), self.label());
        }
        s
    }
}

/// The table of ipcd against the baselines: one row per baseline, its
/// figure, and how many times better ipcd did over each transport (as in
/// [`Baseline::ratios`]).
pub fn baseline_table(baselines: &[Baseline]) -> String {
    let mut s = format!(
        "\n{:<15} {:<11} {:>8}  {:<7} {:>13} {:>9} {:>9} {:>9}\n",
        "baseline", "scenario", "payload", "figure", "baseline", "shm:base", "uds:base", "tcp:base"
    );
    for b in baselines {
        let value = match b.compared {
            "p50_us" => format!("{:.2}", b.baseline.p50_us),
            _ => format!("{:.0}", b.baseline.msgs_per_s),
        };
        s += &format!(
            "{:<15} {:<11} {:>8}  {:<7} {:>13} {:>9} {:>9} {:>9}\n",
            b.baseline.name,
            b.scenario,
            size(b.payload_bytes),
            b.label(),
            value,
            b.ratio("shm"),
            b.ratio("uds"),
            b.ratio("tcp")
        );
    }
    s
}

/// The JSON document: `{"runs": [RUN, ...]}`, and `"baselines": [...]`
/// when any ran.
#[derive(Serialize)]
struct Report<'a, R> {
    runs: &'a [R],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    baselines: &'a [Baseline],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    bandwidth_goals: &'a [GoalRow],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    async_goals: &'a [AsyncGoal],
}

/// Writes `document` to `path` as pretty JSON.
pub fn write_document<D: Serialize>(path: &std::path::Path, document: &D) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = serde_json::to_string_pretty(document)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `runs` to `path` as the JSON document `{"runs": [RUN, ...]}`.
pub fn write_json<R: Serialize>(path: &std::path::Path, runs: &[R]) -> anyhow::Result<()> {
    write_json_with_baselines(path, runs, &[])
}

/// Writes `runs` and `baselines` to `path` as the JSON document
/// `{"runs": [RUN, ...], "baselines": [BASELINE, ...]}` (without
/// `baselines` when there are none).
pub fn write_json_with_baselines<R: Serialize>(
    path: &std::path::Path,
    runs: &[R],
    baselines: &[Baseline],
) -> anyhow::Result<()> {
    write_json_all(path, runs, baselines, &[], &[])
}

/// As [`write_json_with_baselines`], with the bandwidth goals as
/// `"bandwidth_goals": [...]` and the async client's as `"async_goals":
/// [...]` when there are any.
pub fn write_json_all<R: Serialize>(
    path: &std::path::Path,
    runs: &[R],
    baselines: &[Baseline],
    bandwidth_goals: &[GoalRow],
    async_goals: &[AsyncGoal],
) -> anyhow::Result<()> {
    write_document(path, &Report { runs, baselines, bandwidth_goals, async_goals })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_keep_two_significant_figures() {
        let cases = [
            (1.7049, "1.7"),
            (0.9134, "0.91"),
            (71.3, "71"),
            (103.6, "100"),
            (9.96, "10"),
            (5.42, "5.4"),
            (0.0512, "0.051"),
        ];
        for (x, want) in cases {
            assert_eq!(two_figures(x), want, "{x}");
        }
    }
}
