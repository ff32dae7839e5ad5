//! The workload of one run: each client makes echo calls whose payload
//! names the client and the sequence number, one at a time or with a window
//! of requests in flight, and checks every reply byte for byte.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use ipc_client::{CallError, Client, ClientOptions, Received, Reconnect, Service, Ticket, Transport};
use serde::Serialize;

use crate::chaos::{self, KillPlan, KillReport};
use crate::progress::Calls;
use crate::started::{self, Registration, Stop};

/// What every client of a run does.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How clients reach the daemon.
    pub transport: Transport,
    /// The echo service called: the daemon's own ([`ECHO`]), or a name a
    /// provider offers through it.
    pub service: &'static str,
    /// Calls per client.
    pub messages: u64,
    /// Payload bytes per call (at least [`MIN_PAYLOAD`]).
    pub payload: usize,
    /// Requests in flight per client (1: synchronous calls).
    pub window: u32,
    /// Timeout of each call.
    pub call_timeout: Duration,
    /// The clients' spin limit (`None`: the library's default).
    pub spin: Option<Duration>,
    /// Whether clients reconnect (with the library's default policy) after
    /// losing their connection.
    pub reconnect: bool,
    /// Stop making calls at this moment even if `messages` are not all
    /// made (soak runs).
    pub until: Option<Instant>,
    /// Where clients report events a chaos or soak run measures.
    pub probe: Option<Arc<Probe>>,
    /// Where each client publishes how many calls it has done, for the
    /// progress display (threads only).
    pub progress: Option<Arc<Calls>>,
}

/// How calls ended, one count per kind: every call made has exactly one.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// A reply came (right or wrong: see `mismatched`, `duplicated`).
    pub replied: u64,
    /// No reply within the call timeout.
    pub timeout: u64,
    /// The connection was lost with the request in flight; whether it ran
    /// is unknown.
    pub disconnected: u64,
    /// Refused before it was sent (no connection, too large, no room now
    /// or within the timeout).
    pub rejected: u64,
    /// The daemon was stopping and did not run it.
    pub shutdown: u64,
}

impl Outcomes {
    /// Counts an error outcome.
    pub fn error(&mut self, e: &CallError) {
        match e {
            CallError::Timeout { .. } => self.timeout += 1,
            // No room within the timeout: refused before it was sent.
            CallError::SendTimeout { .. } => self.rejected += 1,
            CallError::Disconnected { .. } => self.disconnected += 1,
            CallError::Shutdown => self.shutdown += 1,
            // An error reply is still a reply.
            CallError::Remote { .. } | CallError::Decode(_) => self.replied += 1,
            _ => self.rejected += 1,
        }
    }

    /// Calls with an outcome.
    pub fn total(&self) -> u64 {
        self.replied + self.timeout + self.disconnected + self.rejected + self.shutdown
    }

    pub fn add(&mut self, o: &Outcomes) {
        self.replied += o.replied;
        self.timeout += o.timeout;
        self.disconnected += o.disconnected;
        self.rejected += o.rejected;
        self.shutdown += o.shutdown;
    }
}

/// Events the clients of a chaos or soak run report as they happen.
#[derive(Default, Debug)]
pub struct Probe {
    /// When a call ended as `disconnected`.
    pub disconnects: Mutex<Vec<Instant>>,
    /// When a call ended in any error (`disconnected` included).
    pub failures: Mutex<Vec<Instant>>,
    /// Set by the run when a new daemon starts (at `restarted_at`); the
    /// first call started after that which succeeds clears it and records
    /// when it ended.
    pub awaiting_success: AtomicBool,
    pub restarted_at: Mutex<Option<Instant>>,
    pub first_successes: Mutex<Vec<Instant>>,
    /// Per-minute latency histograms of every call (soak runs), merged.
    pub minutes: Mutex<Vec<Histogram<u64>>>,
    /// How long the connect of each reconnect took, in nanoseconds.
    pub reconnects: Mutex<Vec<u64>>,
}

impl Probe {
    /// Records the connect of a reconnect `client` made, if its count of
    /// reconnects went past `seen`.
    fn reconnected(&self, client: &Client, seen: &mut u64) {
        if client.reconnects() == *seen {
            return;
        }
        *seen = client.reconnects();
        if let Some(took) = client.last_reconnect_took() {
            self.reconnects.lock().expect("probe lock").push(took.as_nanos() as u64);
        }
    }

    fn success(&self, call_started: Instant) {
        if !self.awaiting_success.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        // Only a call started after the new daemon can have been served by
        // it: the old one was dead by then.
        let after = self.restarted_at.lock().expect("probe lock").is_some_and(|t| call_started >= t);
        if after && self.awaiting_success.swap(false, Ordering::AcqRel) {
            self.first_successes.lock().expect("probe lock").push(now);
        }
    }

    fn failure(&self, disconnected: bool) {
        let now = Instant::now();
        if disconnected {
            self.disconnects.lock().expect("probe lock").push(now);
        }
        self.failures.lock().expect("probe lock").push(now);
    }
}

/// The smallest payload: a u32 client id and a u64 sequence number.
pub const MIN_PAYLOAD: usize = 12;

/// The daemon's own echo service.
pub const ECHO: &str = "echo";

/// Writes the payload of call `seq` of client `client` into `buf`: the ids,
/// then bytes that depend on both, so a reply meant for another call or
/// another client cannot pass the check.
pub fn fill_payload(client: u32, seq: u64, buf: &mut [u8]) {
    buf[0..4].copy_from_slice(&client.to_le_bytes());
    buf[4..12].copy_from_slice(&seq.to_le_bytes());
    let mix = payload_mix(client, seq);
    let body = &mut buf[12..];
    // Byte i of the body is byte i % 8 of `mix` xor i (mod 256): the first
    // 256 bytes repeat, so the rest is copied at memcpy speed. Every byte
    // depends on the call, so a reply assembled from chunks of different
    // calls fails the check; the price is a pass over memory per call (for
    // 256 MiB about a tenth of a bandwidth client's CPU samples), which a
    // run over every transport pays alike.
    let block = body.len().min(PATTERN);
    // Eight bytes at a time, as the baselines fill theirs: bytes 8j..8j+7
    // xor their own indices, 8j | k for k < 8, which is one word.
    const LANES: u64 = 0x0706_0504_0302_0100;
    for (j, chunk) in body[..block].chunks_mut(8).enumerate() {
        let word = mix ^ LANES ^ (8 * j as u64).wrapping_mul(0x0101_0101_0101_0101);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    let mut filled = block;
    while filled < body.len() {
        let n = filled.min(body.len() - filled);
        body.copy_within(..n, filled);
        filled += n;
    }
}

/// The word a payload's body bytes are drawn from.
fn payload_mix(client: u32, seq: u64) -> u64 {
    u64::from(client).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The period of a payload's body after its ids.
const PATTERN: usize = 256;

/// What one client measured.
pub struct ClientOutcome {
    /// Round-trip times of the successful calls, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Time to connect (handshake included), in nanoseconds.
    pub connect_ns: u64,
    /// Calls made (including those refused before they were sent).
    pub made: u64,
    /// How the calls ended.
    pub outcomes: Outcomes,
    /// Calls whose reply matched.
    pub succeeded: u64,
    /// Replies that differed from their request but were not another
    /// request's (corrupt).
    pub mismatched: u64,
    /// Outcomes beyond one per call: a second outcome for a ticket, or a
    /// reply carrying another request's payload.
    pub duplicated: u64,
    /// Calls made that never got an outcome.
    pub lost: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// The first error counted `rejected`, for the report (what refused a
    /// call is often not the first error of a chaos run).
    pub first_rejection: Option<String>,
    /// Heap allocations this client's thread made while calling.
    pub allocations: u64,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s at 3 significant digits: every round trip fits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

impl ClientOutcome {
    pub(crate) fn new(connect_ns: u64) -> ClientOutcome {
        ClientOutcome {
            latency_ns: new_histogram(),
            connect_ns,
            made: 0,
            outcomes: Outcomes::default(),
            succeeded: 0,
            mismatched: 0,
            duplicated: 0,
            lost: 0,
            first_error: None,
            first_rejection: None,
            allocations: 0,
        }
    }

    /// Calls that did not end with their own right reply.
    pub fn failed(&self) -> u64 {
        self.made - self.succeeded
    }

    /// Records a call's reply: a success with its round trip if it is the
    /// expected bytes; a duplicate if it is another request's; else a
    /// mismatch.
    pub(crate) fn reply(
        &mut self,
        id: u32,
        seq: u64,
        started: Instant,
        reply: &[u8],
        expected: &[u8],
        probe: Option<&Probe>,
    ) {
        self.outcomes.replied += 1;
        if reply == expected {
            self.succeeded += 1;
            self.latency_ns.saturating_record((started.elapsed().as_nanos() as u64).max(1));
            if let Some(p) = probe {
                p.success(started);
            }
        } else if is_payload(reply) {
            self.duplicated += 1;
            self.first_error.get_or_insert_with(|| format!("client {id} call {seq}: got another request's reply"));
        } else {
            self.mismatched += 1;
            self.first_error.get_or_insert_with(|| format!("client {id} call {seq}: reply differs from request"));
        }
    }

    /// Records a call that ended in an error.
    pub(crate) fn error(&mut self, id: u32, seq: u64, e: &CallError, probe: Option<&Probe>) {
        let rejected = self.outcomes.rejected;
        self.outcomes.error(e);
        if self.outcomes.rejected > rejected {
            self.first_rejection.get_or_insert_with(|| format!("client {id} call {seq}: {e}"));
        }
        if let Some(p) = probe {
            p.failure(matches!(e, CallError::Disconnected { .. }));
        }
        self.first_error.get_or_insert_with(|| format!("client {id} call {seq}: {e}"));
    }

    /// A client that could not connect: its calls are made and refused.
    pub fn failed_to_connect(messages: u64, connect_ns: u64, error: String) -> ClientOutcome {
        let mut out = ClientOutcome::new(connect_ns);
        out.made = messages;
        out.outcomes.rejected = messages;
        // Its calls count as refused: the report names why with them.
        out.first_rejection = Some(error.clone());
        out.first_error = Some(error);
        out
    }
}

/// Whether `bytes` is a payload [`fill_payload`] could have written, for
/// any client and sequence number.
fn is_payload(bytes: &[u8]) -> bool {
    if bytes.len() < MIN_PAYLOAD {
        return false;
    }
    let client = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let mut expected = vec![0u8; bytes.len()];
    fill_payload(client, seq, &mut expected);
    expected == bytes
}

/// The options every client of `w` connects with.
pub fn options(w: &Workload) -> ClientOptions {
    let mut options = ClientOptions::default().fit_payload(w.payload).call_timeout(w.call_timeout);
    if let Some(spin) = w.spin {
        options = options.spin(spin);
    }
    if w.reconnect {
        options = options.reconnect(Reconnect::default());
    }
    options
}

/// Connects one client and resolves the workload's service (a provided
/// one through the daemon's broker). Returns the time both took.
pub fn connect(w: &Workload) -> (Result<(Client, Service), String>, u64) {
    let start = Instant::now();
    // With its causes: the library's errors keep them as sources.
    let result =
        Client::connect_with(w.transport.clone(), options(w)).map_err(|e| format!("{:#}", anyhow::Error::new(e)));
    let result = result.and_then(|mut client| {
        let echo = client.service(w.service).map_err(|e| e.to_string())?;
        // A payload longer than a frame goes in chunks: only the longest
        // message bounds it.
        let max = ClientOptions::default().max_message;
        if w.payload as u64 > max {
            return Err(format!("payload {} exceeds the longest message {max}", w.payload));
        }
        Ok((client, echo))
    });
    (result, start.elapsed().as_nanos() as u64)
}

/// Runs the calls of client `id`: synchronous with a window of 1, else
/// pipelined.
pub fn run_calls(client: &mut Client, echo: &Service, w: &Workload, id: u32, connect_ns: u64) -> ClientOutcome {
    let mut out = ClientOutcome::new(connect_ns);
    let mut request = vec![0u8; w.payload];
    let mut reply = Vec::with_capacity(w.payload);
    // Synchronous calls check against the request itself.
    let mut expected = if w.window > 1 { vec![0u8; w.payload] } else { Vec::new() };
    let mut in_flight: VecDeque<(Ticket, u64, Instant)> = VecDeque::with_capacity(w.window as usize);
    let before = ipc_alloc_count::thread_allocations();
    if w.window <= 1 {
        sync_calls(client, echo, w, id, &mut out, &mut request, &mut reply);
    } else {
        pipelined_calls(client, echo, w, id, &mut out, (&mut request, &mut expected, &mut reply), &mut in_flight);
    }
    out.allocations = ipc_alloc_count::thread_allocations() - before;
    out.lost = out.made.saturating_sub(out.outcomes.total());
    out
}

/// Whether a client stops calling: it lost its connection and has no
/// reconnect policy, so every later call would be refused at once. The run
/// then reports fewer calls made than planned, and, if no call of this
/// client failed, says why in its first error: its last call may have
/// been answered in the same wait that found the daemon gone.
fn gave_up(client: &Client, w: &Workload, id: u32, next: u64, out: &mut ClientOutcome) -> bool {
    let gone = !w.reconnect && !client.is_connected();
    if gone {
        out.first_error.get_or_insert_with(|| format!("client {id} stopped before call {next}: disconnected"));
    }
    gone
}

/// Whether a client should stop before its next call.
fn time_is_up(w: &Workload) -> bool {
    w.until.is_some_and(|t| Instant::now() >= t)
}

fn sync_calls(
    client: &mut Client,
    echo: &Service,
    w: &Workload,
    id: u32,
    out: &mut ClientOutcome,
    request: &mut [u8],
    reply: &mut Vec<u8>,
) {
    let probe = w.probe.as_deref();
    let soak = probe.filter(|_| w.until.is_some());
    let begin = Instant::now();
    let mut minutes: Vec<Histogram<u64>> = Vec::new();
    let mut reconnects = client.reconnects();
    for seq in 0..w.messages {
        if (w.until.is_some() && time_is_up(w)) || gave_up(client, w, id, seq, out) {
            break;
        }
        fill_payload(id, seq, request);
        out.made += 1;
        let start = Instant::now();
        match client.call_into(echo, request, reply) {
            Ok(()) => {
                out.reply(id, seq, start, reply, request, probe);
                if soak.is_some() {
                    record_minute(&mut minutes, begin, start.elapsed().as_nanos() as u64);
                }
            }
            Err(e) => out.error(id, seq, &e, probe),
        }
        if let Some(p) = probe {
            p.reconnected(client, &mut reconnects);
        }
        publish(w, id, out);
    }
    if let Some(p) = soak {
        merge_minutes(p, &minutes);
    }
}

/// Publishes the calls client `id` has done (those with an outcome) to the
/// progress display: one store to a word of its own, no lock, no
/// allocation.
pub(crate) fn publish(w: &Workload, id: u32, out: &ClientOutcome) {
    if let Some(calls) = &w.progress {
        calls.set(id, out.outcomes.total());
    }
}

/// Records a round trip in the histogram of the minute it ended in.
fn record_minute(minutes: &mut Vec<Histogram<u64>>, begin: Instant, rtt_ns: u64) {
    let minute = (begin.elapsed().as_secs() / 60) as usize;
    while minutes.len() <= minute {
        minutes.push(new_histogram());
    }
    minutes[minute].saturating_record(rtt_ns.max(1));
}

fn merge_minutes(probe: &Probe, minutes: &[Histogram<u64>]) {
    let mut all = probe.minutes.lock().expect("probe lock");
    for (i, h) in minutes.iter().enumerate() {
        while all.len() <= i {
            all.push(new_histogram());
        }
        all[i].add(h).expect("histograms share bounds");
    }
}

/// Keeps `window` requests in flight: sends until the window is full, then
/// takes one reply (in arrival order, matched by ticket) and sends again.
/// Latency is from a request's send to its reply's receipt.
fn pipelined_calls(
    client: &mut Client,
    echo: &Service,
    w: &Workload,
    id: u32,
    out: &mut ClientOutcome,
    (request, expected, reply): (&mut [u8], &mut [u8], &mut Vec<u8>),
    in_flight: &mut VecDeque<(Ticket, u64, Instant)>,
) {
    let probe = w.probe.as_deref();
    let mut next = 0u64;
    loop {
        while in_flight.len() < w.window as usize
            && next < w.messages
            && !time_is_up(w)
            && !gave_up(client, w, id, next, out)
        {
            fill_payload(id, next, request);
            out.made += 1;
            match client.send(echo, request) {
                Ok(ticket) => in_flight.push_back((ticket, next, Instant::now())),
                // Refused before it was sent: that is its outcome.
                Err(e) => out.error(id, next, &e, probe),
            }
            next += 1;
        }
        if in_flight.is_empty() {
            break;
        }
        let Received { ticket, outcome } = match client.recv_into(reply) {
            Ok(got) => got,
            Err(e @ CallError::Timeout { .. }) => {
                // Nothing came within the timeout: every request in flight
                // has timed out, and this client stops.
                for (_, seq, _) in in_flight.drain(..) {
                    out.error(id, seq, &e, probe);
                }
                break;
            }
            Err(e) => {
                // Any other error means the library has no outcome for the
                // requests still in flight: they stay uncounted (lost).
                out.first_error.get_or_insert_with(|| format!("client {id} receive: {e}"));
                break;
            }
        };
        let Some(i) = in_flight.iter().position(|(t, _, _)| *t == ticket) else {
            out.duplicated += 1;
            out.first_error.get_or_insert_with(|| format!("client {id}: second outcome for ticket {}", ticket.id()));
            continue;
        };
        let (_, seq, sent) = in_flight.remove(i).expect("index from the search");
        match outcome {
            Ok(()) => {
                fill_payload(id, seq, expected);
                out.reply(id, seq, sent, reply, expected, probe);
            }
            Err(e) => out.error(id, seq, &e, probe),
        }
        publish(w, id, out);
    }
    publish(w, id, out);
}

/// Connects and disconnects one client `n` times in a row; returns the
/// connect times in nanoseconds, or the first error.
pub fn sequential_connects(w: &Workload, n: usize) -> Result<Vec<u64>, String> {
    (0..n).map(|_| connect(w)).map(|(r, ns)| r.map(|_| ns)).collect()
}

/// Runs `clients` clients as threads of this process. All connect first;
/// the calls start together. Returns the outcomes, the duration of the
/// calling phase, and the clients (still connected, so the daemon can be
/// measured with them attached).
pub fn run_threads(w: &Workload, clients: usize) -> (Vec<ClientOutcome>, Duration, Vec<Client>) {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let w = w.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::Builder::new()
                .name(format!("client-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let (connected, connect_ns) = connect(&w);
                    barrier.wait();
                    match connected {
                        Ok((mut client, echo)) => {
                            let outcome = run_calls(&mut client, &echo, &w, id as u32, connect_ns);
                            (outcome, Some(client))
                        }
                        Err(e) => (ClientOutcome::failed_to_connect(w.messages, connect_ns, e), None),
                    }
                })
                .expect("spawn client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut outcomes = Vec::with_capacity(clients);
    let mut kept = Vec::with_capacity(clients);
    for t in threads {
        let (outcome, client) = t.join().expect("client thread panicked");
        outcomes.push(outcome);
        kept.extend(client);
    }
    (outcomes, start.elapsed(), kept)
}

/// A client process started by [`run_procs`].
struct ChildClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _registration: Registration,
}

/// Runs `clients` clients, each in its own process (this binary started
/// again with `--child-client ID`). Returns as [`run_threads`]; the
/// returned guard keeps the children connected until dropped.
///
/// With a kill plan, the chosen clients call a hundred times longer and
/// are killed with SIGKILL at the planned moments; only the survivors'
/// outcomes are returned, with the report of the kills.
pub fn run_procs(
    w: &Workload,
    clients: usize,
    exe: &Path,
    kill: Option<KillPlan>,
) -> anyhow::Result<(Vec<ClientOutcome>, Duration, ProcsGuard, Option<KillReport>)> {
    let victims = kill.map(|k| k.choose(clients)).unwrap_or_default();
    let before = match kill {
        Some(k) => {
            // The daemon opens some fds with its first session and keeps
            // them: one client in and out first puts them in the baseline.
            drop(connect(w).0);
            chaos::settled_usage(k.daemon_pid)?
        }
        None => Default::default(),
    };
    let mut children = Vec::with_capacity(clients);
    for id in 0..clients {
        let messages = if victims.iter().any(|v| v.0 == id) { w.messages.saturating_mul(100) } else { w.messages };
        let mut command = Command::new(exe);
        command.arg("--child-client").arg(id.to_string());
        match &w.transport {
            Transport::Shm(path) => command.arg("--transport").arg("shm").arg("--socket").arg(path),
            Transport::Uds(path) => command.arg("--transport").arg("uds").arg("--uds").arg(path),
            Transport::Tcp(addr) => command.arg("--transport").arg("tcp").arg("--tcp").arg(addr.to_string()),
            // A transport stress has no flag for: the child refuses the name.
            other => command.arg("--transport").arg(other.name()),
        };
        if let Some(spin) = w.spin {
            command.arg("--spin-us").arg(spin.as_micros().to_string());
        }
        command
            .arg("--window")
            .arg(w.window.to_string())
            .arg("--messages")
            .arg(messages.to_string())
            .arg("--payload")
            .arg(w.payload.to_string())
            .arg("--call-timeout-ms")
            .arg(w.call_timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let (mut child, registration) =
            started::spawn(&mut command, Stop::Kill).with_context(|| format!("cannot start client process {id}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        children.push(ChildClient { child, stdin, stdout, _registration: registration });
    }
    let mut connects = Vec::with_capacity(clients);
    for c in &mut children {
        let mut line = String::new();
        c.stdout.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("ready"), Some(ns)) => connects.push(ns.parse::<u64>()?),
            _ => bail!("client process said {line:?} instead of ready"),
        }
    }
    let connected = match kill {
        Some(k) => crate::daemon::usage(k.daemon_pid)?,
        None => Default::default(),
    };
    let start = Instant::now();
    for c in &mut children {
        c.stdin.write_all(b"go\n")?;
        c.stdin.flush()?;
    }
    let killer = kill.map(|plan| {
        let targets: Vec<(u32, Duration)> = victims.iter().map(|&(id, at)| (children[id].child.id(), at)).collect();
        std::thread::spawn(move || chaos::kill_clients(plan, targets, start, clients, before, connected))
    });
    let mut outcomes = Vec::with_capacity(clients);
    for (id, (c, connect_ns)) in children.iter_mut().zip(connects).enumerate() {
        if !victims.iter().any(|v| v.0 == id) {
            outcomes.push(read_outcome(&mut c.stdout, connect_ns)?);
        }
    }
    let elapsed = start.elapsed();
    let report = killer.map(|k| k.join().expect("killer thread panicked"));
    Ok((outcomes, elapsed, ProcsGuard { children }, report))
}

/// Keeps client processes connected; dropping it tells them to exit.
pub struct ProcsGuard {
    children: Vec<ChildClient>,
}

impl Drop for ProcsGuard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.stdin.write_all(b"quit\n");
            let _ = c.stdin.flush();
        }
        for c in &mut self.children {
            let _ = c.child.wait();
        }
    }
}

fn read_outcome(stdout: &mut BufReader<ChildStdout>, connect_ns: u64) -> anyhow::Result<ClientOutcome> {
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let ["done", ref counts @ .., hist_len] = fields[..] else {
        bail!("client process said {line:?} instead of its results");
    };
    let counts: Vec<u64> = counts.iter().map(|c| c.parse()).collect::<Result<_, _>>()?;
    let [made, replied, timeout, disconnected, rejected, shutdown, succeeded, mismatched, duplicated, lost, allocations] =
        counts[..]
    else {
        bail!("client process said {line:?} instead of its results");
    };
    let mut hist = vec![0u8; hist_len.parse()?];
    stdout.read_exact(&mut hist)?;
    let latency_ns: Histogram<u64> = Deserializer::new().deserialize(&mut &hist[..])?;
    let mut error = String::new();
    stdout.read_line(&mut error)?;
    let error = error.trim_end().strip_prefix("error ").unwrap_or("").to_string();
    Ok(ClientOutcome {
        latency_ns,
        connect_ns,
        made,
        outcomes: Outcomes { replied, timeout, disconnected, rejected, shutdown },
        succeeded,
        mismatched,
        duplicated,
        lost,
        first_error: (!error.is_empty()).then_some(error),
        first_rejection: None,
        allocations,
    })
}

/// The body of a client process: connect, say ready, wait for go, call,
/// report, wait for quit.
pub fn child_main(w: &Workload, id: u32) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    let (connected, connect_ns) = connect(w);
    writeln!(stdout, "ready {connect_ns}")?;
    stdout.flush()?;
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    let (outcome, client) = match connected {
        Ok((mut client, echo)) => (run_calls(&mut client, &echo, w, id, connect_ns), Some(client)),
        Err(e) => (ClientOutcome::failed_to_connect(w.messages, connect_ns, e), None),
    };
    let mut hist = Vec::new();
    V2Serializer::new().serialize(&outcome.latency_ns, &mut hist)?;
    let o = &outcome.outcomes;
    writeln!(
        stdout,
        "done {} {} {} {} {} {} {} {} {} {} {} {}",
        outcome.made,
        o.replied,
        o.timeout,
        o.disconnected,
        o.rejected,
        o.shutdown,
        outcome.succeeded,
        outcome.mismatched,
        outcome.duplicated,
        outcome.lost,
        outcome.allocations,
        hist.len()
    )?;
    stdout.write_all(&hist)?;
    writeln!(stdout, "error {}", outcome.first_error.unwrap_or_default().replace('\n', " "))?;
    stdout.flush()?;
    line.clear();
    stdin.lock().read_line(&mut line)?;
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_by_client_and_sequence() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill_payload(1, 2, &mut a);
        fill_payload(1, 3, &mut b);
        assert_ne!(a, b);
        fill_payload(2, 2, &mut b);
        assert_ne!(a, b);
        fill_payload(1, 2, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn the_word_fill_writes_the_bytes_of_its_definition() {
        for len in [12, 13, 19, 20, 64, 12 + PATTERN - 1, 12 + PATTERN, 12 + PATTERN + 9] {
            let mut buf = vec![0u8; len];
            fill_payload(0xABCD, 0x1234_5678_9ABC, &mut buf);
            let mix = payload_mix(0xABCD, 0x1234_5678_9ABC);
            for (i, b) in buf[12..].iter().enumerate() {
                let i = i % PATTERN;
                assert_eq!(*b, (mix >> ((i % 8) * 8)) as u8 ^ i as u8, "byte {i} of {len}");
            }
        }
    }

    #[test]
    fn long_payloads_repeat_the_pattern_of_the_byte_loop() {
        let mut long = vec![0u8; 12 + 3 * PATTERN + 5];
        fill_payload(7, 9, &mut long);
        let mut short = [0u8; 12 + PATTERN];
        fill_payload(7, 9, &mut short);
        for (i, b) in long[12..].iter().enumerate() {
            assert_eq!(*b, short[12 + i % PATTERN], "byte {i}");
        }
        assert!(is_payload(&long));
    }

    #[test]
    fn each_error_counts_as_its_kind_of_outcome() {
        let after = Duration::from_millis(5);
        let cases = [
            (CallError::Timeout { after }, Outcomes { timeout: 1, ..Outcomes::default() }),
            (CallError::SendTimeout { after, in_flight: 4 }, Outcomes { rejected: 1, ..Outcomes::default() }),
            (CallError::Full { in_flight: 4 }, Outcomes { rejected: 1, ..Outcomes::default() }),
            (CallError::NotConnected { reason: "gone".into() }, Outcomes { rejected: 1, ..Outcomes::default() }),
            (CallError::Disconnected { reason: "gone".into() }, Outcomes { disconnected: 1, ..Outcomes::default() }),
            (CallError::Shutdown, Outcomes { shutdown: 1, ..Outcomes::default() }),
            (CallError::Remote { code: None, message: "no".into() }, Outcomes { replied: 1, ..Outcomes::default() }),
        ];
        for (e, want) in cases {
            let mut got = Outcomes::default();
            got.error(&e);
            assert_eq!(got, want, "{e:?}");
        }
    }
}
