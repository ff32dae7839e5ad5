//! The bandwidth scenario beyond the workload: how many calls each
//! payload gets, the goals its table judges (shm at least as fast as uds
//! at every size, and at least [`SHM_GOAL_GB_S`] from [`SHM_GOAL_FROM`]
//! up), and the heap check of one call far longer than a ring: what the
//! daemon and the calling client hold while it goes.

use std::io::Read;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::daemon::{self, PeakSampler};
use crate::report::{self, two_figures, Run};
use crate::workload::{self, fill_payload, Workload};

/// The payloads of a bandwidth run: within a ring, then beyond it (the
/// largest ring a client may ask for is 16 MiB, so its frames carry at
/// most 8 MiB and these go in chunks).
pub const PAYLOADS: [usize; 7] = [64, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20];

/// From this payload up, a bandwidth run is followed by a heap check.
pub const HEAP_CHECK_FROM: usize = 16 << 20;

/// The goal of shm's bandwidth, requests and replies together, in GB/s.
pub const SHM_GOAL_GB_S: f64 = 4.0;
/// The smallest payload whose shm bandwidth is held to [`SHM_GOAL_GB_S`].
pub const SHM_GOAL_FROM: usize = 64 << 10;
/// The most the daemon's anonymous memory may grow during one call of a
/// heap check, in kB: it passes chunks through, holding none whole.
pub const DAEMON_GROWTH_GOAL_KB: u64 = 4 << 10;

/// Calls per client: about 256 MiB of payload each way per client, within
/// 200..50,000 calls, up to 1 MiB; beyond that, where one call is tens of
/// milliseconds, about 1 GiB each way, and at least 4 calls.
pub fn messages(payload: usize) -> u64 {
    let payload = payload.max(1) as u64;
    if payload <= 1 << 20 {
        ((256u64 << 20) / payload).clamp(200, 50_000)
    } else {
        ((1u64 << 30) / payload).max(4)
    }
}

/// One payload's row of the goals table.
#[derive(Serialize, Debug)]
pub struct GoalRow {
    pub payload_bytes: usize,
    /// Payload GB/s of each transport's run (absent if it did not run).
    pub shm_gb_s: Option<f64>,
    pub uds_gb_s: Option<f64>,
    /// shm at least as fast as uds: judged only when both runs passed
    /// (absent otherwise: a ratio of a failed run measures nothing).
    pub shm_ge_uds: Option<bool>,
    /// shm at least [`SHM_GOAL_GB_S`]: judged from [`SHM_GOAL_FROM`] up,
    /// when the shm run passed.
    pub shm_ge_goal: Option<bool>,
}

/// The goals of the bandwidth runs among `runs`, one row per payload.
pub fn goals(runs: &[Run]) -> Vec<GoalRow> {
    let mut payloads: Vec<usize> = runs.iter().filter(|r| r.scenario == "bandwidth").map(|r| r.payload_bytes).collect();
    payloads.dedup();
    payloads
        .into_iter()
        .map(|payload| {
            let find = |t: &str| {
                runs.iter().find(|r| r.scenario == "bandwidth" && r.payload_bytes == payload && r.transport == t)
            };
            let gb = |r: &Run| r.bytes_per_s.unwrap_or(0.0) / 1e9;
            let (shm, uds) = (find("shm"), find("uds"));
            let shm_ge_uds = match (shm, uds) {
                (Some(s), Some(u)) if s.passed() && u.passed() => Some(gb(s) >= gb(u)),
                _ => None,
            };
            let shm_ge_goal = shm.filter(|s| payload >= SHM_GOAL_FROM && s.passed()).map(|s| gb(s) >= SHM_GOAL_GB_S);
            GoalRow { payload_bytes: payload, shm_gb_s: shm.map(gb), uds_gb_s: uds.map(gb), shm_ge_uds, shm_ge_goal }
        })
        .collect()
}

fn judged(met: Option<bool>, applies: bool) -> &'static str {
    match (met, applies) {
        (Some(true), _) => "met",
        (Some(false), _) => "MISSED",
        (None, true) => "not judged: a run failed or is missing",
        (None, false) => "-",
    }
}

/// The goals table.
pub fn goals_table(rows: &[GoalRow]) -> String {
    let mut s = format!(
        "\nbandwidth goals (payload GB/s, requests and replies together; judged only from runs that passed)\n{:>8} {:>8} {:>8} {:>9}  {:<24} shm >= {SHM_GOAL_GB_S} GB/s (from {} up)\n",
        "payload",
        "shm",
        "uds",
        "shm:uds",
        "shm >= uds",
        report::size(SHM_GOAL_FROM)
    );
    for r in rows {
        let cell = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.2}"));
        let ratio = match (r.shm_gb_s, r.uds_gb_s) {
            (Some(a), Some(b)) if a > 0.0 && b > 0.0 => format!("{}x", two_figures(a / b)),
            _ => "-".into(),
        };
        s += &format!(
            "{:>8} {:>8} {:>8} {:>9}  {:<24} {}\n",
            report::size(r.payload_bytes),
            cell(r.shm_gb_s),
            cell(r.uds_gb_s),
            ratio,
            judged(r.shm_ge_uds, r.uds_gb_s.is_some()),
            judged(r.shm_ge_goal, r.payload_bytes >= SHM_GOAL_FROM)
        );
    }
    s
}

/// What one call far longer than a ring made the daemon and its caller
/// hold: the call made twice on a fresh client, once into a reply buffer
/// reserved beforehand, once read as it comes (`call_reader`, checked
/// piece by piece against the request).
#[derive(Serialize, Debug, Default)]
pub struct HeapCheck {
    pub payload_bytes: usize,
    /// Both replies were the request, byte for byte.
    pub verified: bool,
    /// The daemon's `RssAnon` before the calls, and its peak during each
    /// (sampled every 2 ms), in kB.
    pub daemon_rss_anon_before_kb: u64,
    pub daemon_rss_anon_peak_kb: u64,
    /// The peak over the before, in kB: what the daemon held (the goal,
    /// at most [`DAEMON_GROWTH_GOAL_KB`]).
    pub daemon_rss_anon_growth_kb: u64,
    /// `VmHWM` after the calls over `VmRSS` before them (the mark reset
    /// first), in kB: exact, but it counts the session's ring pages
    /// touched (shared memory) too.
    pub daemon_vm_hwm_growth_kb: Option<u64>,
    /// The daemon's `RssShmem` after the calls, in kB (its rings).
    pub daemon_rss_shmem_kb: u64,
    /// Whether the daemon's growth met its goal (absent if not verified).
    pub daemon_goal_met: Option<bool>,
    /// The calling thread's peak heap during `call_into` over its heap
    /// before it, the reply buffer being reserved already, in kB: what the
    /// library held beyond the caller's buffers.
    pub client_call_into_growth_kb: i64,
    /// The same during `call_reader`, read through a 1 MiB buffer, in kB.
    pub client_reader_growth_kb: i64,
    /// Each call's time, in ms.
    pub call_into_ms: f64,
    pub reader_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Bytes of the buffer a reply is read through in the heap check.
const READ_PIECE: usize = 1 << 20;

/// Runs the heap check of `payload` over `w`'s transport against the
/// daemon `pid`, on a thread of its own (its heap counted alone).
pub fn heap_check(w: &Workload, payload: usize, pid: i32) -> HeapCheck {
    let mut w = w.clone();
    w.payload = payload;
    w.progress = None;
    let check = std::thread::Builder::new()
        .name("heap-check".into())
        .spawn(move || {
            let mut check = HeapCheck { payload_bytes: payload, ..HeapCheck::default() };
            if let Err(e) = check_calls(&w, pid, &mut check) {
                check.error = Some(e);
            }
            check
        })
        .expect("spawn heap-check thread");
    check.join().expect("heap-check thread panicked")
}

fn check_calls(w: &Workload, pid: i32, check: &mut HeapCheck) -> Result<(), String> {
    let (client, connect_ns) = workload::connect(w);
    let _ = connect_ns;
    let (mut client, echo) = client?;
    let payload = check.payload_bytes;
    let mut request = vec![0u8; payload];
    fill_payload(u32::MAX, 0, &mut request);
    let mut reply = Vec::with_capacity(payload);
    let mut piece = vec![0u8; READ_PIECE];
    let before = daemon::usage(pid).map_err(|e| format!("{e:#}"))?;
    check.daemon_rss_anon_before_kb = before.rss_anon_kb;
    let rss_before = daemon::reset_high_water(pid).and_then(|()| daemon::high_water(pid)).map(|(_, rss)| rss).ok();
    let sampler = PeakSampler::start(pid, Duration::from_millis(2));

    // Into a reply buffer reserved beforehand.
    ipc_alloc_count::reset_thread_heap_peak();
    let base = ipc_alloc_count::thread_heap();
    let start = Instant::now();
    let called = client.call_into(&echo, &request, &mut reply);
    check.call_into_ms = start.elapsed().as_secs_f64() * 1e3;
    check.client_call_into_growth_kb = (ipc_alloc_count::thread_heap_peak() - base) / 1024;
    let into_ok = match called {
        Ok(()) => reply == request,
        Err(e) => return Err(format!("call_into: {e}")),
    };
    drop(reply);

    // Read as it comes, checked piece by piece.
    ipc_alloc_count::reset_thread_heap_peak();
    let base = ipc_alloc_count::thread_heap();
    let start = Instant::now();
    let read_ok = read_checked(&mut client, &echo, &request, &mut piece)?;
    check.reader_ms = start.elapsed().as_secs_f64() * 1e3;
    check.client_reader_growth_kb = (ipc_alloc_count::thread_heap_peak() - base) / 1024;

    let peak = sampler.finish();
    let after = daemon::usage(pid).map_err(|e| format!("{e:#}"))?;
    check.daemon_rss_anon_peak_kb = peak.max(after.rss_anon_kb);
    check.daemon_rss_anon_growth_kb = check.daemon_rss_anon_peak_kb.saturating_sub(before.rss_anon_kb);
    check.daemon_rss_shmem_kb = after.rss_shmem_kb;
    check.daemon_vm_hwm_growth_kb =
        rss_before.and_then(|rss| daemon::high_water(pid).ok().map(|(hwm, _)| hwm.saturating_sub(rss)));
    check.verified = into_ok && read_ok;
    check.daemon_goal_met = check.verified.then_some(check.daemon_rss_anon_growth_kb <= DAEMON_GROWTH_GOAL_KB);
    if !check.verified {
        check.error = Some("a reply differed from its request".into());
    }
    Ok(())
}

/// Calls with `request` through `call_reader`, comparing each piece read
/// with the request at its offset; whether the reply was the request.
fn read_checked(
    client: &mut ipc_client::Client,
    echo: &ipc_client::Service,
    request: &[u8],
    piece: &mut [u8],
) -> Result<bool, String> {
    let mut reader = client.call_reader(echo, request).map_err(|e| format!("call_reader: {e}"))?;
    let mut at = 0;
    let mut same = true;
    loop {
        let n = reader.read(piece).map_err(|e| format!("reading the reply at {at}: {e}"))?;
        if n == 0 {
            break;
        }
        same &= request.get(at..at + n) == Some(&piece[..n]);
        at += n;
    }
    Ok(same && at == request.len())
}

/// The heap checks' table.
pub fn heap_table(checks: &[(&str, &HeapCheck)]) -> String {
    let mut s = format!(
        "\nheap check: one call at a time on a fresh client (into a reserved buffer, then read as it comes); daemon goal: RssAnon growth <= {} MiB\n{:<5} {:>8} {:>15} {:>15} {:>16} {:>15} {:>15}  goal\n",
        DAEMON_GROWTH_GOAL_KB >> 10,
        "",
        "payload",
        "daemon anon kB",
        "daemon HWM kB",
        "client into kB",
        "client read kB",
        "into/read ms"
    );
    for (transport, c) in checks {
        let goal = match (&c.error, c.daemon_goal_met) {
            (_, Some(true)) => "met".to_string(),
            (_, Some(false)) => "MISSED".to_string(),
            (Some(e), None) => format!("not judged: {e}"),
            (None, None) => "not judged".to_string(),
        };
        s += &format!(
            "{:<5} {:>8} {:>15} {:>15} {:>16} {:>15} {:>15}  {goal}\n",
            transport,
            report::size(c.payload_bytes),
            format!("+{}", c.daemon_rss_anon_growth_kb),
            c.daemon_vm_hwm_growth_kb.map_or_else(|| "-".into(), |k| format!("+{k}")),
            format!("{:+}", c.client_call_into_growth_kb),
            format!("{:+}", c.client_reader_growth_kb),
            format!("{:.0}/{:.0}", c.call_into_ms, c.reader_ms)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_payloads_make_fewer_calls() {
        assert_eq!(messages(64), 50_000);
        assert_eq!(messages(1 << 20), 256);
        assert_eq!(messages(16 << 20), 64);
        assert_eq!(messages(256 << 20), 4);
    }
}
