//! `--client async`: the async client's runs against the blocking
//! client's and the tokio_echo baseline of the same run, and the
//! performance goals of the async client judged on them.
//!
//! The goals (stress, same run):
//! - one-client latency over shm: the async p50 at most 1.5x the blocking
//!   client's with spinning allowed, at most 1.2x with `--spin-us 0`;
//! - throughput over shm: the async client at least 0.9x the blocking
//!   client's, and at least 3x tokio_echo's;
//! - no allocation per call in the async client's steady state: fewer
//!   than [`ALLOCATIONS_PER_CALL`] over a run (its first calls may grow
//!   the connection's tables once).
//!
//! A ratio judges a goal only when both runs it compares passed (a
//! baseline that failed stops the whole run, so one that is there
//! passed); else the goal is "not judged".

use serde::Serialize;

use crate::report::{two_figures, Baseline, Run};

/// Below this many allocations per call, the steady state allocates
/// nothing: what is left is the start of the run, spread over its calls.
pub const ALLOCATIONS_PER_CALL: f64 = 0.01;

/// One goal, judged on one async run.
#[derive(Serialize, Debug)]
pub struct AsyncGoal {
    pub goal: String,
    pub scenario: &'static str,
    pub transport: &'static str,
    pub tasks_per_connection: usize,
    /// The measured ratio (or allocations per call).
    pub measured: Option<f64>,
    /// `met`, `MISSED`, or `not judged` (a run compared did not pass).
    pub verdict: &'static str,
}

/// An async run and what it is compared with.
struct Row<'a> {
    run: &'a Run,
    sync: Option<&'a Run>,
    tokio: Option<&'a Baseline>,
}

fn rows<'a>(runs: &'a [Run], baselines: &'a [Baseline]) -> Vec<Row<'a>> {
    runs.iter()
        .filter(|r| r.client == "async")
        .map(|run| Row {
            run,
            sync: runs.iter().find(|s| {
                s.client == "sync"
                    && (s.scenario, s.transport, s.payload_bytes, s.clients, s.window)
                        == (run.scenario, run.transport, run.payload_bytes, run.clients, run.window)
            }),
            tokio: baselines.iter().find(|b| {
                b.baseline.name == "tokio_echo" && b.scenario == run.scenario && b.payload_bytes == run.payload_bytes
            }),
        })
        .collect()
}

/// The figure a scenario is compared by, and its name.
fn figure(scenario: &str) -> &'static str {
    if scenario == "latency" {
        "p50 us"
    } else {
        "msg/s"
    }
}

fn of_run(r: &Run) -> f64 {
    if r.scenario == "latency" {
        r.latency_us.p50
    } else {
        r.throughput_msgs_per_s
    }
}

fn of_baseline(b: &Baseline) -> f64 {
    if b.scenario == "latency" {
        b.baseline.p50_us
    } else {
        b.baseline.msgs_per_s
    }
}

/// `a / b`, when both are figures.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| a / b)
}

/// The goals judged on `runs` and `baselines`; `spin_off`: the run was
/// made with `--spin-us 0` (clients and daemon).
pub fn goals(runs: &[Run], baselines: &[Baseline], spin_off: bool) -> Vec<AsyncGoal> {
    let mut goals = Vec::new();
    for row in rows(runs, baselines) {
        let r = row.run;
        let share = r.tasks_per_connection.unwrap_or(1);
        let mut judge = |goal: String, measured: Option<f64>, both_passed: bool, met: &dyn Fn(f64) -> bool| {
            let verdict = match measured {
                Some(x) if both_passed => {
                    if met(x) {
                        "met"
                    } else {
                        "MISSED"
                    }
                }
                _ => "not judged",
            };
            goals.push(AsyncGoal {
                goal,
                scenario: r.scenario,
                transport: r.transport,
                tasks_per_connection: share,
                measured,
                verdict,
            });
        };
        if r.transport != "shm" {
            continue;
        }
        let with_sync = row.sync.and_then(|s| ratio(of_run(r), of_run(s)));
        let sync_passed = r.passed() && row.sync.is_some_and(Run::passed);
        match r.scenario {
            "latency" if r.clients == 1 => {
                let limit = if spin_off { 1.2 } else { 1.5 };
                let spin = if spin_off { "spin off" } else { "spin allowed" };
                judge(format!("async p50 <= {limit}x sync ({spin})"), with_sync, sync_passed, &|x| x <= limit);
            }
            "throughput" => {
                judge("async msg/s >= 0.9x sync".into(), with_sync, sync_passed, &|x| x >= 0.9);
                let with_tokio = row.tokio.and_then(|b| ratio(of_run(r), of_baseline(b)));
                judge("async msg/s >= 3x tokio_echo".into(), with_tokio, r.passed(), &|x| x >= 3.0);
            }
            _ => {}
        }
        judge(
            format!("async allocations/call < {ALLOCATIONS_PER_CALL}"),
            Some(r.allocations_per_call),
            r.passed(),
            &|x| x < ALLOCATIONS_PER_CALL,
        );
    }
    goals
}

/// The table of every async run against the blocking client's run and
/// tokio_echo, then the goals.
pub fn table(runs: &[Run], baselines: &[Baseline], goals: &[AsyncGoal]) -> String {
    let rows = rows(runs, baselines);
    if rows.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\n{:<11} {:<9} {:>7} {:>5}  {:<7} {:>11} {:>11} {:>11} {:>10} {:>11}  {}\n",
        "async",
        "transport",
        "clients",
        "share",
        "figure",
        "sync",
        "async",
        "tokio_echo",
        "async/sync",
        "async/tokio",
        "passed"
    );
    let cell = |x: Option<f64>, latency: bool| match x {
        Some(x) if latency => format!("{x:.2}"),
        Some(x) => format!("{x:.0}"),
        None => "-".into(),
    };
    let times = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{}x", two_figures(x)));
    for row in &rows {
        let r = row.run;
        let latency = r.scenario == "latency";
        let (a, sync, tokio) = (of_run(r), row.sync.map(of_run), row.tokio.map(of_baseline));
        let passed = match row.sync {
            Some(s) if s.passed() && r.passed() => "both",
            Some(s) if s.passed() => "sync only",
            _ if r.passed() => "async only",
            _ => "neither",
        };
        s += &format!(
            "{:<11} {:<9} {:>7} {:>5}  {:<7} {:>11} {:>11} {:>11} {:>10} {:>11}  {}\n",
            r.scenario,
            r.transport,
            r.clients,
            r.tasks_per_connection.unwrap_or(1),
            figure(r.scenario),
            cell(sync, latency),
            cell(Some(a), latency),
            cell(tokio, latency),
            times(sync.and_then(|x| ratio(a, x))),
            times(tokio.and_then(|x| ratio(a, x))),
            passed
        );
    }
    s += "(share: tasks per connection; for p50, below 1 is async faster; for msg/s, above 1)\n";
    if !goals.is_empty() {
        s += &format!(
            "\n{:<40} {:<11} {:<9} {:>5} {:>9}  {}\n",
            "async goal", "scenario", "transport", "share", "measured", "verdict"
        );
        for g in goals {
            let measured = match g.measured {
                Some(x) if g.goal.contains("allocations") => format!("{x:.3}"),
                Some(x) => format!("{}x", two_figures(x)),
                None => "-".into(),
            };
            s += &format!(
                "{:<40} {:<11} {:<9} {:>5} {:>9}  {}\n",
                g.goal, g.scenario, g.transport, g.tasks_per_connection, measured, g.verdict
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::Spec;
    use crate::workload::ClientOutcome;

    /// A throughput run over shm of 100 calls, `right` of them answered
    /// right, over `secs`.
    fn run(client: &'static str, right: u64, secs: f64) -> Run {
        let spec = Spec { scenario: "throughput", transport: "shm", clients: 1, messages: 100, payload: 64, window: 1 };
        let mut o = ClientOutcome::new(1);
        o.made = 100;
        o.outcomes.replied = 100;
        o.succeeded = right;
        o.mismatched = 100 - right;
        o.latency_ns.record(1000).unwrap();
        let mut r = Run::from_outcomes(&spec, &[o], None, Duration::from_secs_f64(secs), Default::default(), 0);
        r.client = client;
        if client == "async" {
            r.tasks_per_connection = Some(1);
        }
        r
    }

    fn verdicts(goals: &[AsyncGoal]) -> Vec<(&str, &str)> {
        goals.iter().map(|g| (g.goal.as_str(), g.verdict)).collect()
    }

    #[test]
    fn goals_are_judged_on_ratios_of_runs_that_passed() {
        // 100 msg/s blocking; 95 and 85 msg/s async.
        let runs = [run("sync", 100, 1.0), run("async", 100, 100.0 / 95.0)];
        let judged = goals(&runs, &[], false);
        assert_eq!(
            verdicts(&judged),
            [
                ("async msg/s >= 0.9x sync", "met"),
                // No tokio_echo row: nothing to compare with.
                ("async msg/s >= 3x tokio_echo", "not judged"),
                ("async allocations/call < 0.01", "met"),
            ]
        );
        assert!((judged[0].measured.unwrap() - 0.95).abs() < 1e-9);
        let runs = [run("sync", 100, 1.0), run("async", 100, 100.0 / 85.0)];
        assert_eq!(goals_of(&runs)[0], ("async msg/s >= 0.9x sync".to_string(), "MISSED"));
    }

    fn goals_of(runs: &[Run]) -> Vec<(String, &'static str)> {
        goals(runs, &[], false).into_iter().map(|g| (g.goal, g.verdict)).collect()
    }

    #[test]
    fn a_ratio_from_a_run_that_failed_judges_nothing() {
        // Faster, but one reply was wrong.
        let runs = [run("sync", 100, 1.0), run("async", 99, 0.5)];
        let judged = goals_of(&runs);
        assert!(judged.iter().all(|(_, v)| *v == "not judged"), "{judged:?}");
        let runs = [run("sync", 99, 1.0), run("async", 100, 0.5)];
        assert_eq!(goals_of(&runs)[0].1, "not judged");
        assert!(table(&runs, &[], &goals(&runs, &[], false)).contains("async only"));
    }
}
