//! Runs with faults injected (`--chaos`) and long runs (`--duration`): the
//! client processes killed at random moments, the daemon killed and
//! restarted, and the daemon's memory and fds sampled every second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::daemon::{self, PrivateDaemon, ProcessUsage};
use crate::report::Connect;
use crate::workload::{new_histogram, Probe};

/// A fault to inject during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chaos {
    /// Kill this many client processes with SIGKILL (needs `--procs`).
    KillClients(usize),
    /// Kill the daemon with SIGKILL and start it again, this many times.
    RestartDaemon(usize),
    /// Stop the daemon with SIGTERM under load (then start it again for
    /// the next run).
    Sigterm,
    /// Kill the provider process with SIGKILL and start it again, this
    /// many times (the provider scenario).
    KillProvider(usize),
}

impl std::str::FromStr for Chaos {
    type Err = String;

    fn from_str(s: &str) -> Result<Chaos, String> {
        if s == "sigterm" {
            return Ok(Chaos::Sigterm);
        }
        let (kind, n) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected KIND:N"))?;
        let n: usize = n.parse().map_err(|_| format!("{s:?}: N must be a count"))?;
        if n == 0 {
            return Err(format!("{s:?}: N must be at least 1"));
        }
        match kind {
            "kill-clients" => Ok(Chaos::KillClients(n)),
            "restart-daemon" => Ok(Chaos::RestartDaemon(n)),
            "kill-provider" => Ok(Chaos::KillProvider(n)),
            _ => Err(format!("{s:?}: expected kill-clients:N, restart-daemon:N, kill-provider:N or sigterm")),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Client processes to kill during a `--procs` run.
#[derive(Clone, Copy, Debug)]
pub struct KillPlan {
    pub victims: usize,
    /// Seeds the choice of victims and moments.
    pub seed: u64,
    /// Kills fall at random moments within this long after the calls start.
    pub within: Duration,
    pub daemon_pid: i32,
}

impl KillPlan {
    /// Which of `clients` clients die, at which moments after the start,
    /// in the order of the moments.
    pub fn choose(&self, clients: usize) -> Vec<(usize, Duration)> {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let mut ids: Vec<usize> = (0..clients).collect();
        rng.shuffle(&mut ids);
        let mut picked: Vec<(usize, Duration)> =
            ids.into_iter().take(self.victims).map(|id| (id, self.within.mul_f64(rng.f64()))).collect();
        picked.sort_by_key(|&(_, at)| at);
        picked
    }
}

/// What the killing did and how the daemon cleaned up after it.
#[derive(Serialize, Debug, Default)]
pub struct KillReport {
    pub seed: u64,
    pub killed: usize,
    /// When each kill fell, in ms after the calls started.
    pub kill_at_ms: Vec<f64>,
    /// The daemon before any client connected.
    pub daemon_before: ProcessUsage,
    /// The daemon with every client connected, before the first kill.
    pub daemon_connected: ProcessUsage,
    /// The fd count the daemon should reach once the killed clients'
    /// sessions are gone: connected minus their share.
    pub fds_expected_after_kills: u64,
    /// From the last kill until every killed process had finished exiting
    /// (a zombie: its fds closed), in ms. The kernel closes a process's
    /// fds only after it has torn down its memory, which a loaded machine
    /// can take seconds over; `None` if not within 30 s.
    pub victims_exited_ms: Option<f64>,
    /// From then until the daemon's fd count came down to the expected
    /// count, in ms; `None` if it did not within 5 s.
    pub cleanup_ms: Option<f64>,
    /// The same, counted from the last kill.
    pub cleanup_after_kill_ms: Option<f64>,
    /// The daemon's anonymous memory once it had cleaned up.
    pub rss_anon_kb_after_cleanup: u64,
    /// The daemon after the surviving clients disconnected too.
    pub daemon_after: ProcessUsage,
}

impl KillReport {
    /// Whether the daemon cleaned up within a second of the killed
    /// clients' exit.
    pub fn passed(&self) -> bool {
        self.killed > 0 && self.cleanup_ms.is_some_and(|t| t <= 1000.0)
    }
}

/// Kills `victims` (pid, moment) from `start`, then watches the daemon's
/// fds come down. Runs on its own thread while the survivors call.
pub fn kill_clients(
    plan: KillPlan,
    victims: Vec<(u32, Duration)>,
    start: Instant,
    clients: usize,
    before: ProcessUsage,
    connected: ProcessUsage,
) -> KillReport {
    let mut report =
        KillReport { seed: plan.seed, daemon_before: before, daemon_connected: connected, ..Default::default() };
    let mut last = start;
    let mut killed = Vec::new();
    for (pid, at) in victims {
        if let Some(wait) = (start + at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let at = Instant::now();
        if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
            last = at;
            killed.push(pid);
            report.killed += 1;
            report.kill_at_ms.push(ms(last - start));
        }
    }
    let per_client = connected.fds.saturating_sub(before.fds) / clients.max(1) as u64;
    report.fds_expected_after_kills = connected.fds - per_client * report.killed as u64;
    let exited = loop {
        if killed.iter().all(|&pid| has_exited(pid)) {
            break Instant::now();
        }
        if last.elapsed() > Duration::from_secs(30) {
            return report;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    report.victims_exited_ms = Some(ms(exited - last));
    while exited.elapsed() < Duration::from_secs(5) {
        if let Ok(u) = daemon::usage(plan.daemon_pid) {
            if u.fds <= report.fds_expected_after_kills {
                report.cleanup_ms = Some(ms(exited.elapsed()));
                report.cleanup_after_kill_ms = Some(ms(last.elapsed()));
                report.rss_anon_kb_after_cleanup = u.rss_anon_kb;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    report
}

/// Whether process `pid` has finished exiting: a zombie waiting to be
/// reaped, or gone.
fn has_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    // The state follows the command name, which is in parentheses and may
    // hold anything.
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X") | None)
}

/// The daemon's usage once its fd count has held still for 50 ms (at most
/// 2 s): a session that just hung up is closed by its worker a moment
/// later.
pub fn settled_usage(pid: i32) -> anyhow::Result<ProcessUsage> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = daemon::usage(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = daemon::usage(pid)?;
        if now.fds == last.fds || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// One crash and restart of the daemon.
#[derive(Serialize, Debug)]
pub struct Restart {
    /// When the daemon was killed, in ms after the calls started.
    pub killed_at_ms: f64,
    /// From the kill to the new daemon's start (reaping the old one).
    pub down_ms: f64,
    /// From the new daemon's start until it accepted connections.
    pub ready_ms: f64,
    /// From the new daemon's start to the first call, started after it,
    /// that succeeded; `None` if none did.
    pub recovery_ms: Option<f64>,
}

/// What restarting the daemon did to the clients.
#[derive(Serialize, Debug, Default)]
pub struct RestartReport {
    pub restarts: Vec<Restart>,
    /// Calls that ended as `disconnected`, and how long after the kill
    /// before them each one ended: the worst and the median, in ms.
    pub disconnected_calls: usize,
    /// Of those, the ones that ended before the first kill (none should).
    pub disconnected_before_any_kill: usize,
    pub disconnect_delay_ms_max: f64,
    pub disconnect_delay_ms_p50: f64,
    /// The worst recovery, in ms.
    pub recovery_ms_max: Option<f64>,
    /// The clients' reconnects, and how long the connect that made each
    /// took (the attempt that succeeded, without the pauses before it):
    /// `null` if none reconnected.
    pub reconnects: usize,
    pub reconnect_us: Option<Connect>,
}

impl RestartReport {
    /// Whether every restart was recovered from.
    pub fn passed(&self) -> bool {
        !self.restarts.is_empty() && self.restarts.iter().all(|r| r.recovery_ms.is_some())
    }
}

/// Kills and restarts `daemon` `times` times, every `period`, while the
/// clients run (until `done`); then matches the clients' events to the
/// kills.
pub fn restart_daemon(
    daemon: &mut PrivateDaemon,
    times: usize,
    period: Duration,
    probe: &Probe,
    start: Instant,
    done: &AtomicBool,
) -> anyhow::Result<RestartReport> {
    let mut kills = Vec::new();
    let mut starts = Vec::new();
    let mut report = RestartReport::default();
    for _ in 0..times {
        let step = Instant::now() + period;
        while Instant::now() < step {
            if done.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if done.load(Ordering::Relaxed) {
            break;
        }
        *probe.restarted_at.lock().expect("probe lock") = None;
        let (killed, started, ready) = daemon.crash_and_restart()?;
        *probe.restarted_at.lock().expect("probe lock") = Some(started);
        probe.awaiting_success.store(true, Ordering::Release);
        kills.push(killed);
        starts.push(started);
        report.restarts.push(Restart {
            killed_at_ms: ms(killed - start),
            down_ms: ms(started - killed),
            ready_ms: ms(ready - started),
            recovery_ms: None,
        });
        // The next kill waits for this restart's first success (or the
        // end of the run), so each recovery is measured on its own.
        while probe.awaiting_success.load(Ordering::Acquire) && !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if report.restarts.is_empty() {
        bail!("the clients finished before the first restart; give them more --messages");
    }
    // Clients still notice the last crash after its first recovery: read
    // their events once they are all done.
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let successes = probe.first_successes.lock().expect("probe lock").clone();
    for (r, started) in report.restarts.iter_mut().zip(&starts) {
        r.recovery_ms = successes.iter().filter(|&&t| t >= *started).map(|&t| ms(t - *started)).reduce(f64::min);
    }
    report.recovery_ms_max = report.restarts.iter().filter_map(|r| r.recovery_ms).reduce(f64::max);
    let events = probe.disconnects.lock().expect("probe lock").clone();
    let mut delays: Vec<f64> =
        events.iter().filter_map(|&t| kills.iter().rev().find(|&&k| k <= t).map(|&k| ms(t - k))).collect();
    delays.sort_by(f64::total_cmp);
    report.disconnected_calls = events.len();
    report.disconnected_before_any_kill = events.len() - delays.len();
    report.disconnect_delay_ms_max = delays.last().copied().unwrap_or(0.0);
    report.disconnect_delay_ms_p50 = delays.get(delays.len() / 2).copied().unwrap_or(0.0);
    let reconnects = probe.reconnects.lock().expect("probe lock").clone();
    report.reconnects = reconnects.len();
    if !reconnects.is_empty() {
        let mut h = new_histogram();
        for ns in &reconnects {
            h.saturating_record((*ns).max(1));
        }
        report.reconnect_us = Some(Connect::of(&h, format!("{} reconnecting", reconnects.len())));
    }
    Ok(report)
}

/// What a graceful stop under load did.
#[derive(Serialize, Debug)]
pub struct StopReport {
    /// When SIGTERM was sent, in ms after the calls started.
    pub sigterm_at_ms: f64,
    /// From SIGTERM until the daemon exited, and its exit code.
    pub exit_ms: f64,
    pub exit_code: Option<i32>,
    /// Clients that had a call answered with `shutdown`.
    pub clients_told: usize,
}

impl StopReport {
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// One second of a long run.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the calls started.
    pub t_s: f64,
    pub rss_anon_kb: u64,
    pub fds: u64,
}

/// Samples the daemon every second until `done`.
pub fn sample_daemon(pid: i32, start: Instant, done: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        let mut next = start;
        while !done.load(Ordering::Relaxed) {
            if let Ok(u) = daemon::usage(pid) {
                samples.push(Sample { t_s: start.elapsed().as_secs_f64(), rss_anon_kb: u.rss_anon_kb, fds: u.fds });
            }
            next += Duration::from_secs(1);
            while Instant::now() < next && !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        samples
    })
}

/// The trend of a long run.
#[derive(Serialize, Debug)]
pub struct Soak {
    /// Samples before this are warm-up, left out of the slopes.
    pub warmup_s: f64,
    /// Least-squares slopes after warm-up, per minute.
    pub rss_anon_kb_per_min: f64,
    pub fds_per_min: f64,
    /// rss_anon_kb at the end of warm-up and at the end.
    pub rss_anon_kb_after_warmup: u64,
    pub rss_anon_kb_end: u64,
    /// Latency p99 of the calls that ended in each minute, in us.
    pub p99_us_per_minute: Vec<f64>,
}

/// Summarizes samples and per-minute latencies. Warm-up is the first fifth
/// of the run, at most a minute.
pub fn soak(samples: &[Sample], duration: Duration, probe: &Probe) -> Soak {
    let warmup_s = (duration.as_secs_f64() / 5.0).min(60.0);
    let kept: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    let slope = |y: &dyn Fn(&Sample) -> f64| -> f64 {
        let n = kept.len() as f64;
        if kept.len() < 2 {
            return 0.0;
        }
        let mx = kept.iter().map(|s| s.t_s).sum::<f64>() / n;
        let my = kept.iter().map(|s| y(s)).sum::<f64>() / n;
        let sxy: f64 = kept.iter().map(|s| (s.t_s - mx) * (y(s) - my)).sum();
        let sxx: f64 = kept.iter().map(|s| (s.t_s - mx).powi(2)).sum();
        if sxx > 0.0 {
            sxy / sxx * 60.0
        } else {
            0.0
        }
    };
    let minutes = probe.minutes.lock().expect("probe lock");
    Soak {
        warmup_s,
        rss_anon_kb_per_min: slope(&|s| s.rss_anon_kb as f64),
        fds_per_min: slope(&|s| s.fds as f64),
        rss_anon_kb_after_warmup: kept.first().map_or(0, |s| s.rss_anon_kb),
        rss_anon_kb_end: kept.last().map_or(0, |s| s.rss_anon_kb),
        p99_us_per_minute: minutes
            .iter()
            .map(|h| if h.is_empty() { 0.0 } else { h.value_at_quantile(0.99) as f64 / 1000.0 })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::new_histogram;

    #[test]
    fn chaos_parses_and_refuses_nonsense() {
        assert_eq!("kill-clients:3".parse(), Ok(Chaos::KillClients(3)));
        assert_eq!("restart-daemon:1".parse(), Ok(Chaos::RestartDaemon(1)));
        assert_eq!("kill-provider:2".parse(), Ok(Chaos::KillProvider(2)));
        assert!("restart-daemon:0".parse::<Chaos>().is_err());
        assert!("kill-clients".parse::<Chaos>().is_err());
        assert!("explode:2".parse::<Chaos>().is_err());
        assert_eq!("sigterm".parse(), Ok(Chaos::Sigterm));
    }

    #[test]
    fn kill_plan_picks_distinct_victims_in_time_order() {
        let plan = KillPlan { victims: 5, seed: 7, within: Duration::from_secs(1), daemon_pid: 0 };
        let picked = plan.choose(20);
        assert_eq!(picked.len(), 5);
        let mut ids: Vec<usize> = picked.iter().map(|p| p.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        assert!(picked.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(picked.iter().all(|p| p.1 <= Duration::from_secs(1)));
        assert_eq!(plan.choose(20), picked, "the seed decides");
    }

    #[test]
    fn soak_slope_is_per_minute_after_warmup() {
        // 2 kB a second after a warm-up spike: 120 kB a minute.
        let samples: Vec<Sample> = (0..100)
            .map(|t| Sample { t_s: t as f64, rss_anon_kb: if t < 5 { 9999 } else { 1000 + 2 * t }, fds: 10 })
            .collect();
        let probe = Probe::default();
        probe.minutes.lock().unwrap().push(new_histogram());
        let s = soak(&samples, Duration::from_secs(100), &probe);
        assert!((s.rss_anon_kb_per_min - 120.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.fds_per_min, 0.0);
        assert_eq!(s.warmup_s, 20.0);
        assert_eq!(s.p99_us_per_minute, vec![0.0]);
    }
}
