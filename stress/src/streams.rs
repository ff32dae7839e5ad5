//! The stream scenario: clients open streams of the daemon's built-in
//! `stream.count` one after another and check every item in order (its
//! index and its fill), over each transport, against a private daemon.
//!
//! An item's latency is the time from the caller's previous item (or,
//! for a stream's first, from the call that opened it) until `next`
//! returned it: what a consumer taking items as fast as it can waits for
//! each. Every stream must end exactly once: after its terminal outcome
//! one more `next` must say the stream is unknown.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use ipc_client::{CallError, Client, ClientOptions, StreamOptions, Transport};
use serde::Serialize;

use crate::daemon::{self, PeakSampler, PrivateDaemon, ProcessUsage};
use crate::progress::{self, Calls, Goal, Progress};
use crate::report::{self, two_figures, Latency};
use crate::workload::{new_histogram, Outcomes};

/// The daemon's stream service.
pub const SERVICE: &str = "stream.count";

/// The goal: items per second over shm, all clients together, for
/// [`GOAL_ITEM`]-byte items.
pub const GOAL_ITEMS_PER_S: f64 = 5_000_000.0;
/// The item size the goal is for.
pub const GOAL_ITEM: usize = 64;

/// The default window (credit) of each stream: 256 items. The client
/// grants more credit once half the window is taken, so a window of 256
/// costs one credit frame (and at most one wake-up of the daemon) per 128
/// items rather than per 8 with the library's 16, while it bounds what a
/// stream may queue in the client to 256 items (1 MiB of 4 KiB items).
pub const DEFAULT_WINDOW: u32 = 256;

/// What the scenario runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: PathBuf,
    pub transports: Vec<&'static str>,
    pub clients: usize,
    /// Streams each client opens, one after another.
    pub streams: u64,
    /// Items per stream.
    pub items: u32,
    /// Item sizes, one set of runs each.
    pub sizes: Vec<usize>,
    pub window: u32,
    pub call_timeout: Duration,
    pub spin: Option<Duration>,
    pub json: Option<PathBuf>,
}

/// How one stream's items and terminal outcome went, summed.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemCounts {
    /// Items the streams were asked for.
    pub expected: u64,
    /// Items that came in order with the right index, size and fill.
    pub verified: u64,
    /// Items of the right index but the wrong size or fill, or of an
    /// index no item of the stream has.
    pub mismatched: u64,
    /// Items whose index came already.
    pub duplicated: u64,
    /// Items that never came though the stream ended (skipped or cut).
    pub lost: u64,
    /// Items not taken because the stream failed first.
    pub failed: u64,
}

/// One RUN of the stream scenario.
#[derive(Serialize, Debug)]
pub struct StreamRun {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub clients: usize,
    pub streams_per_client: u64,
    pub items_per_stream: u32,
    pub item_bytes: usize,
    pub window: u32,
    /// Streams opened (or refused at the opening).
    pub streams: u64,
    /// Terminal outcomes: `replied` counts streams that ended (`Ok(None)`
    /// or the server's error), the rest by kind, one per stream.
    pub outcomes: Outcomes,
    /// Streams that got no terminal outcome.
    pub streams_lost: u64,
    /// Terminal outcomes beyond one per stream (a `next` after the end
    /// that did not say the stream is unknown).
    pub terminals_duplicated: u64,
    pub items: ItemCounts,
    pub duration_s: f64,
    pub items_per_s: f64,
    /// Payload bytes of verified items per second.
    pub bytes_per_s: f64,
    /// Item latency (see the module docs), in microseconds.
    pub item_latency_us: Latency,
    /// From the opening to the first item, in microseconds.
    pub first_item_us: Latency,
    /// Heap allocations of the client threads per item taken.
    pub allocations_per_item: f64,
    pub daemon: ProcessUsage,
    pub peak_rss_anon_kb: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl StreamRun {
    /// Whether every stream ended once, after every item in order.
    pub fn passed(&self) -> bool {
        let i = &self.items;
        let o = &self.outcomes;
        self.streams > 0
            && self.streams_lost == 0
            && self.terminals_duplicated == 0
            && o.replied == self.streams
            && o.total() == self.streams
            && i.verified == i.expected
            && i.mismatched + i.duplicated + i.lost + i.failed == 0
            && self.first_error.is_none()
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let (i, o, l, f) = (&self.items, &self.outcomes, &self.item_latency_us, &self.first_item_us);
        let mut s = format!(
            "stream over {}: {} clients x {} streams x {} items of {} B, window {}\n",
            self.transport, self.clients, self.streams_per_client, self.items_per_stream, self.item_bytes, self.window
        );
        s += &format!(
            "  streams     opened {}  ended {}  timeout {}  disconnected {}  rejected {}  shutdown {}  lost {}  second terminals {}\n",
            self.streams, o.replied, o.timeout, o.disconnected, o.rejected, o.shutdown, self.streams_lost, self.terminals_duplicated
        );
        s += &format!(
            "  items       expected {}  verified {}  mismatched {}  duplicated {}  lost {}  not taken (stream failed) {}\n",
            i.expected, i.verified, i.mismatched, i.duplicated, i.lost, i.failed
        );
        s += &format!(
            "  throughput  {:.0} items/s over {:.3} s ({:.2} GB/s of items)\n",
            self.items_per_s,
            self.duration_s,
            self.bytes_per_s / 1e9
        );
        s += &format!(
            "  item us     p50 {:.2}  p90 {:.2}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.2}\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        s += &format!(
            "  first us    p50 {:.1}  p99 {:.1}  max {:.1}   allocations/item {:.2}\n",
            f.p50, f.p99, f.max, self.allocations_per_item
        );
        s += &format!(
            "  daemon      rss_anon {} kB (peak during run {} kB)  rss_shmem {} kB  fds {}\n",
            self.daemon.rss_anon_kb, self.peak_rss_anon_kb, self.daemon.rss_shmem_kb, self.daemon.fds
        );
        if let Some(e) = &self.first_error {
            s += &format!("  first error {e}\n");
        }
        s += if self.passed() { "  result      PASS\n" } else { "  result      FAIL\n" };
        s
    }
}

/// What one client measured.
struct ClientFigures {
    streams: u64,
    outcomes: Outcomes,
    terminals_duplicated: u64,
    items: ItemCounts,
    gaps: Histogram<u64>,
    firsts: Histogram<u64>,
    allocations: u64,
    first_error: Option<String>,
}

impl ClientFigures {
    fn new() -> ClientFigures {
        ClientFigures {
            streams: 0,
            outcomes: Outcomes::default(),
            terminals_duplicated: 0,
            items: ItemCounts::default(),
            gaps: new_histogram(),
            firsts: new_histogram(),
            allocations: 0,
            first_error: None,
        }
    }

    fn error(&mut self, what: impl FnOnce() -> String) {
        self.first_error.get_or_insert_with(what);
    }
}

/// What an item of `stream.count` is: index `i` as a little-endian u64
/// (cut to the size), then `i as u8` to the end.
fn item_is(item: &[u8], i: u64, size: usize) -> bool {
    let head = i.to_le_bytes();
    let n = head.len().min(size);
    item.len() == size && item[..n] == head[..n] && item[n..].iter().all(|&b| b == i as u8)
}

/// The index an item claims (its first 8 bytes), if it has them.
fn index_of(item: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(item.get(..8)?.try_into().ok()?))
}

/// The request for a stream of `count` items of `size` bytes.
pub fn request(count: u32, size: u32) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&count.to_le_bytes());
    r[4..].copy_from_slice(&size.to_le_bytes());
    r
}

/// One stream: opens it, takes and checks every item, then its terminal
/// outcome, then asks once more (which must say the stream is unknown).
fn one_stream(
    client: &mut Client,
    service: &ipc_client::Service,
    c: &Config,
    size: usize,
    out: &mut ClientFigures,
    id: u32,
) {
    let count = c.items;
    out.streams += 1;
    out.items.expected += u64::from(count);
    let opened = Instant::now();
    let options = StreamOptions::default().window(c.window);
    let mut stream = match client.stream_with(service, &request(count, size as u32), options) {
        Ok(s) => s,
        Err(e) => {
            out.outcomes.error(&e);
            out.items.failed += u64::from(count);
            out.error(|| format!("client {id}: opening a stream: {e}"));
            return;
        }
    };
    let mut next = 0u64;
    let mut last = opened;
    loop {
        match stream.next(client) {
            Ok(Some(item)) => {
                let now = Instant::now();
                let ns = (now - last).as_nanos() as u64;
                if next == 0 {
                    out.firsts.saturating_record(ns.max(1));
                }
                out.gaps.saturating_record(ns.max(1));
                last = now;
                if item_is(&item, next, size) {
                    out.items.verified += 1;
                    next += 1;
                    continue;
                }
                match index_of(&item) {
                    Some(i) if i < next => out.items.duplicated += 1,
                    Some(i) if i < u64::from(count) && item_is(&item, i, size) => {
                        // Items in between were skipped.
                        out.items.lost += i - next;
                        out.items.verified += 1;
                        next = i + 1;
                    }
                    _ => {
                        out.items.mismatched += 1;
                        next += 1;
                    }
                }
                out.error(|| format!("client {id} stream {}: item {next} out of order or wrong", stream.id()));
            }
            Ok(None) => {
                out.outcomes.replied += 1;
                out.items.lost += u64::from(count).saturating_sub(next);
                if next < u64::from(count) {
                    out.error(|| format!("client {id} stream {}: ended after {next} of {count} items", stream.id()));
                }
                break;
            }
            Err(e) => {
                out.outcomes.error(&e);
                out.items.failed += u64::from(count).saturating_sub(next);
                out.error(|| format!("client {id} stream {}: {e}", stream.id()));
                break;
            }
        }
    }
    match stream.next(client) {
        Err(CallError::UnknownTicket { .. }) => {}
        other => {
            out.terminals_duplicated += 1;
            out.error(|| format!("client {id} stream {}: after its end, next gave {other:?}", stream.id()));
        }
    }
}

fn connect(transport: &Transport, c: &Config) -> Result<(Client, ipc_client::Service), String> {
    let mut options = ClientOptions::default().call_timeout(c.call_timeout);
    if let Some(spin) = c.spin {
        options = options.spin(spin);
    }
    let mut client = Client::connect_with(transport.clone(), options).map_err(|e| format!("connect: {e}"))?;
    let service = client.service(SERVICE).map_err(|e| format!("resolve {SERVICE}: {e}"))?;
    Ok((client, service))
}

/// One RUN: every client on a thread, connected first; the streams start
/// together.
fn run_one(c: &Config, name: &'static str, transport: &Transport, size: usize, pid: i32) -> StreamRun {
    let barrier = Arc::new(Barrier::new(c.clients + 1));
    let calls = Arc::new(Calls::new(c.clients));
    let total = c.clients as u64 * c.streams * u64::from(c.items);
    let label = format!("stream over {name} ({})", report::size(size));
    let threads: Vec<_> = (0..c.clients)
        .map(|id| {
            let (c, barrier, calls, transport) =
                (c.clone(), Arc::clone(&barrier), Arc::clone(&calls), transport.clone());
            std::thread::Builder::new()
                .name(format!("stream-client-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let connected = connect(&transport, &c);
                    barrier.wait();
                    let mut out = ClientFigures::new();
                    let (mut client, service) = match connected {
                        Ok(x) => x,
                        Err(e) => {
                            out.streams = c.streams;
                            out.outcomes.rejected = c.streams;
                            out.items.expected = c.streams * u64::from(c.items);
                            out.items.failed = out.items.expected;
                            out.first_error = Some(format!("client {id}: {e}"));
                            return (out, None);
                        }
                    };
                    let before = ipc_alloc_count::thread_allocations();
                    for _ in 0..c.streams {
                        one_stream(&mut client, &service, &c, size, &mut out, id as u32);
                        calls.set(id as u32, out.items.verified);
                    }
                    out.allocations = ipc_alloc_count::thread_allocations() - before;
                    (out, Some(client))
                })
                .expect("spawn stream client thread")
        })
        .collect();
    barrier.wait();
    let shown = Progress::start(label, Goal::Calls(total), Some(calls));
    let sampler = PeakSampler::start(pid, Duration::from_millis(20));
    let start = Instant::now();
    let mut figures = Vec::with_capacity(c.clients);
    let mut kept = Vec::with_capacity(c.clients);
    for t in threads {
        let (f, client) = t.join().expect("stream client thread panicked");
        figures.push(f);
        kept.extend(client);
    }
    let elapsed = start.elapsed();
    let usage = daemon::usage(pid).unwrap_or_default();
    let peak = sampler.finish();
    shown.finish();
    drop(kept);
    gather(c, name, size, &figures, elapsed, usage, peak.max(usage.rss_anon_kb))
}

fn gather(
    c: &Config,
    transport: &'static str,
    size: usize,
    figures: &[ClientFigures],
    elapsed: Duration,
    daemon: ProcessUsage,
    peak_rss_anon_kb: u64,
) -> StreamRun {
    let mut gaps = new_histogram();
    let mut firsts = new_histogram();
    let (mut streams, mut outcomes, mut dup_terminals, mut items, mut allocations) =
        (0, Outcomes::default(), 0, ItemCounts::default(), 0);
    let mut first_error = None;
    for f in figures {
        gaps.add(&f.gaps).expect("histograms share bounds");
        firsts.add(&f.firsts).expect("histograms share bounds");
        streams += f.streams;
        outcomes.add(&f.outcomes);
        dup_terminals += f.terminals_duplicated;
        let i = &f.items;
        items.expected += i.expected;
        items.verified += i.verified;
        items.mismatched += i.mismatched;
        items.duplicated += i.duplicated;
        items.lost += i.lost;
        items.failed += i.failed;
        allocations += f.allocations;
        if first_error.is_none() {
            first_error.clone_from(&f.first_error);
        }
    }
    let secs = elapsed.as_secs_f64();
    let per_s = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let taken = items.verified + items.mismatched + items.duplicated;
    StreamRun {
        scenario: "stream",
        transport,
        clients: c.clients,
        streams_per_client: c.streams,
        items_per_stream: c.items,
        item_bytes: size,
        window: c.window,
        streams,
        outcomes,
        streams_lost: streams.saturating_sub(outcomes.total()),
        terminals_duplicated: dup_terminals,
        items,
        duration_s: secs,
        items_per_s: per_s(items.verified as f64),
        bytes_per_s: per_s((items.verified * size as u64) as f64),
        item_latency_us: latency(&gaps),
        first_item_us: latency(&firsts),
        allocations_per_item: if taken > 0 { allocations as f64 / taken as f64 } else { 0.0 },
        daemon,
        peak_rss_anon_kb,
        first_error,
    }
}

fn latency(h: &Histogram<u64>) -> Latency {
    let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        p999: q(0.999),
        max: h.max() as f64 / 1000.0,
        mean: h.mean() / 1000.0,
    }
}

/// One item size's row of the closing table.
#[derive(Serialize, Debug)]
pub struct GoalRow {
    pub item_bytes: usize,
    pub shm_items_per_s: Option<f64>,
    pub uds_items_per_s: Option<f64>,
    pub tcp_items_per_s: Option<f64>,
    /// The goal, for [`GOAL_ITEM`]-byte items only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<String>,
    /// Whether shm met it: absent when its run failed (nothing judged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

fn goal_rows(runs: &[StreamRun]) -> Vec<GoalRow> {
    let mut sizes: Vec<usize> = runs.iter().map(|r| r.item_bytes).collect();
    sizes.dedup();
    sizes
        .into_iter()
        .map(|size| {
            let find = |t: &str| runs.iter().find(|r| r.item_bytes == size && r.transport == t);
            let rate = |t: &str| find(t).map(|r| r.items_per_s);
            let has_goal = size == GOAL_ITEM;
            let met = find("shm").filter(|r| has_goal && r.passed()).map(|r| r.items_per_s >= GOAL_ITEMS_PER_S);
            GoalRow {
                item_bytes: size,
                shm_items_per_s: rate("shm"),
                uds_items_per_s: rate("uds"),
                tcp_items_per_s: rate("tcp"),
                goal: has_goal.then(|| format!("shm >= {GOAL_ITEMS_PER_S:.0} items/s")),
                met,
            }
        })
        .collect()
}

fn table(c: &Config, rows: &[GoalRow], runs: &[StreamRun]) -> String {
    let mut s = format!(
        "\nstream scenario: {} clients x {} streams x {} items of {SERVICE}, window {}; items/s, all clients together\n{:>8} {:>12} {:>12} {:>12} {:>8} {:>8}  goal\n",
        c.clients, c.streams, c.items, c.window, "item", "shm", "uds", "tcp", "shm:uds", "shm:tcp"
    );
    for r in rows {
        let cell = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.0}"));
        let passed = |t: &str| runs.iter().any(|x| x.item_bytes == r.item_bytes && x.transport == t && x.passed());
        // A ratio of a run that failed measures nothing.
        let ratio = |t: &str, x: Option<f64>| match (r.shm_items_per_s, x) {
            (Some(a), Some(b)) if a > 0.0 && b > 0.0 && passed("shm") && passed(t) => {
                format!("{}x", two_figures(a / b))
            }
            (Some(_), Some(_)) => "n/a".into(),
            _ => "-".into(),
        };
        let goal = match (&r.goal, r.met) {
            (Some(g), Some(true)) => format!("{g}: met"),
            (Some(g), Some(false)) => format!("{g}: MISSED"),
            (Some(g), None) => format!("{g}: not judged (the shm run failed or is missing)"),
            (None, _) => String::new(),
        };
        s += &format!(
            "{:>8} {:>12} {:>12} {:>12} {:>8} {:>8}  {goal}\n",
            report::size(r.item_bytes),
            cell(r.shm_items_per_s),
            cell(r.uds_items_per_s),
            cell(r.tcp_items_per_s),
            ratio("uds", r.uds_items_per_s),
            ratio("tcp", r.tcp_items_per_s),
        );
    }
    s
}

#[derive(Serialize)]
struct Document<'a> {
    runs: &'a [StreamRun],
    stream_goals: &'a [GoalRow],
}

/// Runs the scenario on a private daemon; whether every run passed.
pub fn run(c: &Config) -> anyhow::Result<bool> {
    if !c.daemon.exists() {
        bail!("{} not found; build it (cargo build --release) or pass --daemon PATH", c.daemon.display());
    }
    let daemon = PrivateDaemon::start(&c.daemon, c.clients, c.spin)?;
    let pid = daemon.pid();
    let mut runs = Vec::new();
    for &size in &c.sizes {
        for &name in &c.transports {
            let transport = match name {
                "shm" => Transport::Shm(daemon.socket().to_path_buf()),
                "uds" => Transport::Uds(daemon.uds().to_path_buf()),
                _ => Transport::Tcp(daemon.tcp()),
            };
            let run = run_one(c, name, &transport, size, pid);
            progress::suspend(|| print!("{}", run.summary()));
            runs.push(run);
        }
    }
    let rows = goal_rows(&runs);
    print!("{}", table(c, &rows, &runs));
    if let Some(path) = &c.json {
        report::write_document(path, &Document { runs: &runs, stream_goals: &rows })?;
    }
    daemon.stop()?;
    Ok(runs.iter().all(StreamRun::passed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_checked_by_index_size_and_fill() {
        let mut item = vec![3u8; 64];
        item[..8].copy_from_slice(&3u64.to_le_bytes());
        assert!(item_is(&item, 3, 64));
        assert!(!item_is(&item, 4, 64));
        assert!(!item_is(&item[..63], 3, 64));
        item[40] = 0;
        assert!(!item_is(&item, 3, 64));
        assert_eq!(index_of(&item), Some(3));
        // Items shorter than the index carry its first bytes.
        assert!(item_is(&[5, 0, 0, 0], 5, 4));
    }

    #[test]
    fn requests_carry_count_then_size() {
        assert_eq!(request(1000, 64), [0xe8, 0x03, 0, 0, 64, 0, 0, 0]);
    }
}
