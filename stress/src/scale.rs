//! The scale scenario: N clients (10,000 by default) connected to one
//! private daemon at once, each making calls, every reply checked; with
//! what the daemon holds per client and how long the connects took.
//!
//! Every client thread connects at the same moment (a barrier), waits
//! until all are connected, makes its calls, then waits again while the
//! daemon's memory and fds are read with every session open; then all
//! disconnect. Figures: connect p50 and p99 (each connect timed alone,
//! all at once), the daemon's RssAnon, RssShmem, the shared memory its
//! budget charges (`ipcd.status`) and its fds, each before the clients
//! came and with all of them, and per client.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc_client::{Client, ClientOptions};
use serde::{Deserialize, Serialize};

use crate::daemon::{self, ProcessUsage};
use crate::fleet;
use crate::idle::loadavg;
use crate::report::two_figures;
use crate::started::{self, Registration, Stop};
use crate::workload::new_histogram;

/// Clients per client process: each costs two fds in its process (the
/// control connection and the eventfd), and the hard open-files limit
/// (20,000 on this machine, not raisable without `CAP_SYS_RESOURCE`)
/// must hold them.
pub const CLIENTS_PER_PROCESS: usize = 4_000;

/// What the scenario runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub daemon: PathBuf,
    /// This binary, run again as each client process.
    pub exe: PathBuf,
    pub clients: usize,
    /// Calls each client makes.
    pub calls: u64,
    pub payload: usize,
    pub call_timeout: Duration,
    pub spin: Option<Duration>,
}

/// What one client process did, sent to the parent as one JSON line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Each connect that succeeded, ns.
    connect_ns: Vec<u64>,
    verified: u64,
    failed_connects: usize,
    /// The first errors (all are counted).
    errors: Vec<String>,
    error_count: usize,
}

/// A client process, driven step by step over its stdin and stdout.
struct ClientProcess {
    child: std::process::Child,
    _registration: Registration,
    input: std::process::ChildStdin,
    output: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ClientProcess {
    /// Tells it to take the next step.
    fn tell(&mut self, step: &str) -> anyhow::Result<()> {
        writeln!(self.input, "{step}").and_then(|()| self.input.flush()).context("a client process is gone")
    }

    /// Waits for the line that says it took a step.
    fn expect(&mut self, step: &str) -> anyhow::Result<String> {
        match self.output.next() {
            Some(Ok(line)) if line.starts_with(step) => Ok(line),
            Some(Ok(line)) => bail!("a client process said {line:?}, expected {step}"),
            _ => bail!("client process {} ended before {step}", self.child.id()),
        }
    }
}

/// Runs the scenario and prints its figures; whether every client
/// connected and every reply was right.
pub fn run(config: &Config) -> anyhow::Result<bool> {
    let n = config.clients;
    let procs = n.div_ceil(CLIENTS_PER_PROCESS).max(1);
    // The daemon holds two fds per session (its control connection and
    // eventfd), a client process two per client; both inherit this
    // process's limit.
    let limit = fleet::raise_limits(2 * n)?;
    eprintln!("stress: scale, {n} clients in {procs} processes, open-files limit {limit}, load {}", loadavg());
    let daemon = fleet::start_daemon(&config.daemon, n, config.spin)?;
    let pid = daemon.pid();
    let socket = daemon.socket().to_path_buf();
    // The observer's own session is in both readings: it cancels out.
    let mut observer = Client::connect_to(&socket).context("the observer cannot connect")?;
    let before = (daemon::usage(pid)?, charged(&mut observer)?);
    let mut children = (0..procs)
        .map(|k| {
            let share = n / procs + usize::from(k < n % procs);
            let mut command = Command::new(&config.exe);
            command
                .args(["--scenario", "scale", "--child-scale"])
                .arg(share.to_string())
                .arg("--socket")
                .arg(&socket)
                .args(["--messages", &config.calls.to_string(), "--payload", &config.payload.to_string()])
                .args(["--call-timeout-ms", &config.call_timeout.as_millis().to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            let (mut child, registration) = started::spawn(&mut command, Stop::Kill)?;
            let (input, output) = (child.stdin.take(), child.stdout.take());
            let (Some(input), Some(output)) = (input, output) else { bail!("a client process has no pipes") };
            Ok(ClientProcess { child, _registration: registration, input, output: BufReader::new(output).lines() })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Every process is told a step before any answer is awaited: they
    // take it together.
    let all_take = |children: &mut [ClientProcess], step: &str, reply: &str| -> anyhow::Result<()> {
        children.iter_mut().try_for_each(|c| c.tell(step))?;
        children.iter_mut().try_for_each(|c| c.expect(reply).map(drop))
    };
    children.iter_mut().try_for_each(|c| c.expect("ready").map(drop))?;
    let began = Instant::now();
    all_take(&mut children, "connect", "connected")?;
    let connected_in = began.elapsed();
    all_take(&mut children, "call", "called")?;
    // Every session is open, every call made: the readings.
    let all = (daemon::usage(pid)?, charged(&mut observer)?);
    children.iter_mut().try_for_each(|c| c.tell("release"))?;
    let mut total = Outcome::default();
    for c in &mut children {
        let line = c.expect("{")?;
        let o: Outcome = serde_json::from_str(&line).context("a client process's outcome")?;
        total.connect_ns.extend(o.connect_ns);
        total.verified += o.verified;
        total.failed_connects += o.failed_connects;
        total.error_count += o.error_count;
        total.errors.extend(o.errors);
    }
    let took = began.elapsed();
    for c in &mut children {
        let status = c.child.wait()?;
        if !status.success() {
            total.error_count += 1;
            total.errors.push(format!("client process {} exited with {status}", c.child.id()));
        }
    }
    drop(observer);
    daemon.stop()?;
    let mut connects = new_histogram();
    total.connect_ns.iter().for_each(|&ns| connects.saturating_record(ns));
    report(config, procs, &before, &all, &connects, connected_in, took, total.verified);
    for e in total.errors.iter().take(10) {
        println!("  error: {e}");
    }
    let expected = n as u64 * config.calls;
    let ok = total.failed_connects == 0 && total.error_count == 0 && total.verified == expected;
    if !ok {
        println!(
            "scale: FAILED: {} connects failed, {} of {expected} replies verified, {} errors",
            total.failed_connects, total.verified, total.error_count
        );
    }
    Ok(ok)
}

/// A client process of the scenario: `clients` threads, each step when
/// its parent says (a line on stdin), answered on stdout.
pub fn child_main(
    socket: &Path,
    clients: usize,
    calls: u64,
    payload: usize,
    call_timeout: Duration,
) -> anyhow::Result<()> {
    // Every client and this thread pass each: the start, all connected,
    // the calls' start, all calls made, the readings taken.
    let barriers = Arc::new([(); 5].map(|()| Barrier::new(clients + 1)));
    let options = ClientOptions::default().connect_timeout(Duration::from_secs(120)).call_timeout(call_timeout);
    let socket = socket.to_path_buf();
    let threads = fleet::spawn_clients(clients, {
        let barriers = Arc::clone(&barriers);
        move |i| {
            let [start, connected, go, called, read] = &*barriers;
            let mut outcome = Outcome::default();
            start.wait();
            let began = Instant::now();
            let mut client = Client::connect_with(socket.as_path(), options.clone());
            match &client {
                Ok(_) => outcome.connect_ns.push(began.elapsed().as_nanos() as u64),
                Err(e) => {
                    outcome.failed_connects += 1;
                    let cause = std::error::Error::source(e).map(|c| format!(": {c}")).unwrap_or_default();
                    outcome.errors.push(format!("client {i}: connect: {e}{cause}"));
                }
            }
            connected.wait();
            go.wait();
            if let Ok(client) = &mut client {
                call_all(client, i, calls, payload, &mut outcome);
            }
            called.wait();
            read.wait();
            drop(client);
            outcome
        }
    })?;
    // Each step: the parent's word, then the threads' two barriers, then
    // the answer. A parent gone ends the process, and its threads.
    let mut words = std::io::stdin().lines();
    let mut word = |want: &str| -> anyhow::Result<()> {
        match words.next() {
            Some(Ok(w)) if w == want => Ok(()),
            other => bail!("expected {want} from the parent, got {other:?}"),
        }
    };
    let say = |what: &str| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{what}").and_then(|()| out.flush()).context("the parent is gone")
    };
    let [start, connected, go, called, read] = &*barriers;
    say("ready")?;
    word("connect")?;
    start.wait();
    connected.wait();
    say("connected")?;
    word("call")?;
    go.wait();
    called.wait();
    say("called")?;
    word("release")?;
    read.wait();
    let mut total = Outcome::default();
    for t in threads {
        let o = t
            .join()
            .unwrap_or_else(|_| Outcome { errors: vec!["a client thread panicked".into()], ..Outcome::default() });
        total.connect_ns.extend(o.connect_ns);
        total.verified += o.verified;
        total.failed_connects += o.failed_connects;
        total.error_count += o.errors.len();
        total.errors.extend(o.errors.into_iter().take(10usize.saturating_sub(total.errors.len())));
    }
    say(&serde_json::to_string(&total)?)
}
/// Makes `calls` echo calls, each checked byte for byte.
fn call_all(client: &mut Client, who: usize, calls: u64, payload: usize, outcome: &mut Outcome) {
    let echo = match client.service("echo") {
        Ok(echo) => echo,
        Err(e) => return outcome.errors.push(format!("client {who}: resolve echo: {e}")),
    };
    let mut reply = Vec::new();
    for call in 0..calls {
        let request = request(who, call, payload);
        match client.call_into(&echo, &request, &mut reply) {
            Ok(()) if reply == request => outcome.verified += 1,
            Ok(()) => outcome.errors.push(format!("client {who} call {call}: reply differs from its request")),
            Err(e) => outcome.errors.push(format!("client {who} call {call}: {e}")),
        }
    }
}

/// A request that names its client and call, filled to `len` bytes.
fn request(who: usize, call: u64, len: usize) -> Vec<u8> {
    let mut bytes = format!("{who}:{call}:").into_bytes();
    let fill = (who as u64).wrapping_mul(31).wrapping_add(call) as u8;
    bytes.resize(len.max(bytes.len()), fill);
    bytes
}

/// The shared memory the daemon's budget charges now (`ipcd.status`).
fn charged(client: &mut Client) -> anyhow::Result<u64> {
    let status = client.service("ipcd.status")?;
    let reply = client.call(&status, b"")?;
    let json: serde_json::Value = serde_json::from_slice(&reply).context("ipcd.status is not JSON")?;
    find_u64(&json, "memory_in_use").context("ipcd.status has no memory_in_use")
}

/// The first integer under `key`, at any depth.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(map) => {
            map.get(key).and_then(serde_json::Value::as_u64).or_else(|| map.values().find_map(|v| find_u64(v, key)))
        }
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    config: &Config,
    procs: usize,
    before: &(ProcessUsage, u64),
    all: &(ProcessUsage, u64),
    connects: &hdrhistogram::Histogram<u64>,
    connected_in: Duration,
    took: Duration,
    verified: u64,
) {
    let n = config.clients as f64;
    let per = |a: u64, b: u64| two_figures(a.saturating_sub(b) as f64 / n);
    let ((u0, c0), (u1, c1)) = (before, all);
    println!();
    println!(
        "scale: {} clients ({procs} processes of threads) connected at once, {} calls of {} B each: {verified} of {} \
         replies verified, in {:.1} s",
        config.clients,
        config.calls,
        config.payload,
        config.clients as u64 * config.calls,
        took.as_secs_f64()
    );
    println!(
        "connect (all at once): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; all connected {:.1} s after the start",
        connects.value_at_quantile(0.5) as f64 / 1e6,
        connects.value_at_quantile(0.99) as f64 / 1e6,
        connects.max() as f64 / 1e6,
        connected_in.as_secs_f64()
    );
    println!("| daemon | before | all connected | per client |");
    println!("|---|---|---|---|");
    println!("| RssAnon kB | {} | {} | {} |", u0.rss_anon_kb, u1.rss_anon_kb, per(u1.rss_anon_kb, u0.rss_anon_kb));
    println!("| RssShmem kB | {} | {} | {} |", u0.rss_shmem_kb, u1.rss_shmem_kb, per(u1.rss_shmem_kb, u0.rss_shmem_kb));
    println!("| shm charged kB | {} | {} | {} |", c0 / 1024, c1 / 1024, per(c1 / 1024, c0 / 1024));
    println!("| fds | {} | {} | {} |", u0.fds, u1.fds, per(u1.fds, u0.fds));
}
