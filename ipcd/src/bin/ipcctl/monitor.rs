//! `ipcctl monitor`: samples `ipcd.status` and `ipcd.services` every
//! interval and shows the rates between two samples. On a terminal it
//! redraws a table in place, like `top`; otherwise it prints one line per
//! sample, so that a log or a test reads it. The monitor's own calls are
//! counted like any other (two or three per sample, on `ipcd.status` and
//! `ipcd.services`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::Daemon;

/// One sample: when, the calls and errors per service, the sessions.
struct Sample {
    at: Instant,
    /// Calls and errors by name (names whose calls the daemon sees).
    services: BTreeMap<String, (u64, u64)>,
    requests: u64,
    errors: u64,
    sessions: usize,
    brokered: usize,
}

fn sample(daemon: &mut Daemon) -> anyhow::Result<Sample> {
    let status = daemon.status()?;
    let list = daemon.services()?;
    let services =
        list.services.into_iter().filter_map(|s| Some((s.name, (s.calls?, s.errors.unwrap_or(0))))).collect();
    Ok(Sample {
        at: Instant::now(),
        services,
        requests: status.calls.requests,
        errors: status.calls.errors,
        sessions: status.clients.connected,
        brokered: status.brokered_sessions,
    })
}

/// The rates from `old` to `new`: per service (calls/s, errors/s), busiest
/// first, and the daemon-wide ones.
struct Rates {
    services: Vec<(String, f64, f64)>,
    calls: f64,
    errors: f64,
}

fn rates(old: &Sample, new: &Sample) -> Rates {
    let secs = new.at.duration_since(old.at).as_secs_f64().max(1e-9);
    let per_s = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
    let mut services: Vec<(String, f64, f64)> = new
        .services
        .iter()
        .map(|(name, &(calls, errors))| {
            let (c0, e0) = old.services.get(name).copied().unwrap_or((0, 0));
            (name.clone(), per_s(calls, c0), per_s(errors, e0))
        })
        .collect();
    services.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Rates { services, calls: per_s(new.requests, old.requests), errors: per_s(new.errors, old.errors) }
}

/// Runs the monitor: `count` samples after the first (`None`: until
/// interrupted), `interval` apart.
pub(crate) fn run(
    daemon: &mut Daemon,
    out: &mut impl Write,
    interval: Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut last = sample(daemon)?;
    let mut shown = 0;
    while count.is_none_or(|n| shown < n) {
        std::thread::sleep(interval);
        let now = sample(daemon)?;
        let r = rates(&last, &now);
        if terminal {
            // Home, clear, then the table.
            write!(out, "\x1b[H\x1b[2J")?;
            writeln!(
                out,
                "ipcd monitor (every {interval:?}): {} sessions, {} brokered; {:.1} calls/s, {:.1} errors/s",
                now.sessions, now.brokered, r.calls, r.errors
            )?;
            writeln!(out)?;
            writeln!(out, "{:<32}  {:>12}  {:>10}  {:>12}", "SERVICE", "CALLS/S", "ERRORS/S", "CALLS")?;
            for (name, calls, errors) in &r.services {
                let total = now.services.get(name).map_or(0, |c| c.0);
                writeln!(out, "{name:<32}  {calls:>12.1}  {errors:>10.1}  {total:>12}")?;
            }
        } else {
            let busy: Vec<String> = r
                .services
                .iter()
                .filter(|(_, calls, errors)| *calls > 0.0 || *errors > 0.0)
                .map(|(name, calls, errors)| format!("{name}={calls:.1}/{errors:.1}"))
                .collect();
            writeln!(
                out,
                "t={:.2}s sessions={} brokered={} calls/s={:.1} errors/s={:.1} services(calls/s/errors/s): {}",
                now.at.duration_since(start).as_secs_f64(),
                now.sessions,
                now.brokered,
                r.calls,
                r.errors,
                busy.join(" ")
            )?;
        }
        out.flush()?;
        last = now;
        shown += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_deltas_over_the_time_between_and_busiest_first() {
        let at = Instant::now();
        let old = Sample {
            at,
            services: [("a".to_string(), (10, 0)), ("b".to_string(), (0, 0))].into(),
            requests: 10,
            errors: 0,
            sessions: 1,
            brokered: 0,
        };
        let new = Sample {
            at: at + Duration::from_secs(2),
            services: [("a".to_string(), (14, 2)), ("b".to_string(), (20, 0)), ("c".to_string(), (2, 0))].into(),
            requests: 46,
            errors: 2,
            sessions: 1,
            brokered: 0,
        };
        let r = rates(&old, &new);
        assert_eq!(r.services, [("b".into(), 10.0, 0.0), ("a".into(), 2.0, 1.0), ("c".into(), 1.0, 0.0)]);
        assert_eq!((r.calls, r.errors), (18.0, 1.0));
    }
}
