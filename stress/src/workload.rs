//! The workload of one run: each client makes echo calls whose payload
//! names the client and the sequence number, one at a time or with a window
//! of requests in flight, and checks every reply byte for byte.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use ipc_client::{CallError, Client, ClientOptions, Service, Ticket, Transport};

/// What every client of a run does.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How clients reach the daemon.
    pub transport: Transport,
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
}

/// The smallest payload: a u32 client id and a u64 sequence number.
pub const MIN_PAYLOAD: usize = 12;

/// Writes the payload of call `seq` of client `client` into `buf`: the ids,
/// then bytes that depend on both, so a reply meant for another call or
/// another client cannot pass the check.
pub fn fill_payload(client: u32, seq: u64, buf: &mut [u8]) {
    buf[0..4].copy_from_slice(&client.to_le_bytes());
    buf[4..12].copy_from_slice(&seq.to_le_bytes());
    let mix = u64::from(client).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for (i, b) in buf[12..].iter_mut().enumerate() {
        *b = (mix >> ((i % 8) * 8)) as u8 ^ i as u8;
    }
}

/// What one client measured.
pub struct ClientOutcome {
    /// Round-trip times of the successful calls, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Time to connect (handshake included), in nanoseconds.
    pub connect_ns: u64,
    /// Calls whose reply matched.
    pub succeeded: u64,
    /// Calls that returned an error, or never ran because the client could
    /// not connect or was disconnected.
    pub failed: u64,
    /// Calls whose reply differed from the request.
    pub mismatched: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Heap allocations this client's thread made while calling.
    pub allocations: u64,
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns to 100 s at 3 significant digits: every round trip fits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

impl ClientOutcome {
    /// Records a call's reply: a success with its round trip if it is the
    /// expected bytes, else a mismatch.
    fn reply(&mut self, id: u32, seq: u64, rtt_ns: u64, matches: bool) {
        if matches {
            self.succeeded += 1;
            self.latency_ns.saturating_record(rtt_ns.max(1));
        } else {
            self.mismatched += 1;
            self.first_error.get_or_insert_with(|| format!("client {id} call {seq}: reply differs from request"));
        }
    }

    /// Records a call that ended in an error.
    fn error(&mut self, id: u32, seq: u64, e: &CallError) {
        self.failed += 1;
        self.first_error.get_or_insert_with(|| format!("client {id} call {seq}: {e}"));
    }

    /// The outcome of a client that could not connect: all its calls
    /// failed without being made.
    pub fn failed_to_connect(messages: u64, connect_ns: u64, error: String) -> ClientOutcome {
        ClientOutcome {
            latency_ns: new_histogram(),
            connect_ns,
            succeeded: 0,
            failed: messages,
            mismatched: 0,
            first_error: Some(error),
            allocations: 0,
        }
    }
}

/// Connects one client and resolves `echo`. Returns the time it took.
pub fn connect(w: &Workload) -> (Result<(Client, Service), String>, u64) {
    let start = Instant::now();
    let mut options = ClientOptions::default().fit_payload(w.payload).call_timeout(w.call_timeout);
    if let Some(spin) = w.spin {
        options = options.spin(spin);
    }
    let result = Client::connect_with(w.transport.clone(), options).map_err(|e| e.to_string()).and_then(|client| {
        if w.payload > client.max_payload() {
            return Err(format!("payload {} exceeds the daemon's maximum {}", w.payload, client.max_payload()));
        }
        let echo = client.service("echo").map_err(|e| e.to_string())?;
        Ok((client, echo))
    });
    (result, start.elapsed().as_nanos() as u64)
}

/// Runs the calls of client `id`: synchronous with a window of 1, else
/// pipelined.
pub fn run_calls(client: &mut Client, echo: &Service, w: &Workload, id: u32, connect_ns: u64) -> ClientOutcome {
    let mut out = ClientOutcome {
        latency_ns: new_histogram(),
        connect_ns,
        succeeded: 0,
        failed: 0,
        mismatched: 0,
        first_error: None,
        allocations: 0,
    };
    let mut request = vec![0u8; w.payload];
    let mut reply = Vec::with_capacity(w.payload);
    let mut expected = vec![0u8; w.payload];
    let mut in_flight: VecDeque<(Ticket, u64, Instant)> = VecDeque::with_capacity(w.window as usize);
    let before = ipc_platform::thread_allocations();
    if w.window <= 1 {
        sync_calls(client, echo, w, id, &mut out, &mut request, &mut reply);
    } else {
        pipelined_calls(client, echo, w, id, &mut out, (&mut request, &mut expected, &mut reply), &mut in_flight);
    }
    out.allocations = ipc_platform::thread_allocations() - before;
    out
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
    for seq in 0..w.messages {
        fill_payload(id, seq, request);
        let start = Instant::now();
        match client.call_into(echo, request, reply) {
            Ok(()) => out.reply(id, seq, start.elapsed().as_nanos() as u64, reply[..] == request[..]),
            Err(e) => {
                out.error(id, seq, &e);
                if matches!(e, CallError::Disconnected { .. }) {
                    // Every later call of this client would fail the same
                    // way at once: count them without making them.
                    out.failed += w.messages - seq - 1;
                    break;
                }
            }
        }
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
    let mut next = 0u64;
    let mut done = 0u64;
    while done < w.messages {
        while in_flight.len() < w.window as usize && next < w.messages {
            fill_payload(id, next, request);
            match client.send(echo, request) {
                Ok(ticket) => in_flight.push_back((ticket, next, Instant::now())),
                Err(e) => {
                    out.first_error.get_or_insert_with(|| format!("client {id} send {next}: {e}"));
                    out.failed += w.messages - done;
                    return;
                }
            }
            next += 1;
        }
        let (ticket, outcome) = match client.recv_into(reply) {
            Ok(got) => got,
            Err(e) => {
                out.first_error.get_or_insert_with(|| format!("client {id} receive: {e}"));
                out.failed += w.messages - done;
                return;
            }
        };
        done += 1;
        let Some(i) = in_flight.iter().position(|(t, _, _)| *t == ticket) else {
            out.mismatched += 1;
            out.first_error.get_or_insert_with(|| format!("client {id}: reply to unknown ticket {}", ticket.id()));
            continue;
        };
        let (_, seq, sent) = in_flight.remove(i).expect("index from the search");
        match outcome {
            Ok(()) => {
                let rtt = sent.elapsed().as_nanos() as u64;
                fill_payload(id, seq, expected);
                out.reply(id, seq, rtt, reply[..] == expected[..]);
            }
            Err(e) => out.error(id, seq, &e),
        }
    }
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
}

/// Runs `clients` clients, each in its own process (this binary started
/// again with `--child-client ID`). Returns as [`run_threads`]; the
/// returned guard keeps the children connected until dropped.
pub fn run_procs(
    w: &Workload,
    clients: usize,
    exe: &Path,
) -> anyhow::Result<(Vec<ClientOutcome>, Duration, ProcsGuard)> {
    let mut children = Vec::with_capacity(clients);
    for id in 0..clients {
        let mut command = Command::new(exe);
        command.arg("--child-client").arg(id.to_string());
        match &w.transport {
            Transport::Shm(path) => command.arg("--transport").arg("shm").arg("--socket").arg(path),
            Transport::Uds(path) => command.arg("--transport").arg("uds").arg("--uds").arg(path),
            Transport::Tcp(addr) => command.arg("--transport").arg("tcp").arg("--tcp").arg(addr.to_string()),
        };
        if let Some(spin) = w.spin {
            command.arg("--spin-us").arg(spin.as_micros().to_string());
        }
        let mut child = command
            .arg("--window")
            .arg(w.window.to_string())
            .arg("--messages")
            .arg(w.messages.to_string())
            .arg("--payload")
            .arg(w.payload.to_string())
            .arg("--call-timeout-ms")
            .arg(w.call_timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start client process {id}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        children.push(ChildClient { child, stdin, stdout });
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
    let start = Instant::now();
    for c in &mut children {
        c.stdin.write_all(b"go\n")?;
        c.stdin.flush()?;
    }
    let mut outcomes = Vec::with_capacity(clients);
    for (c, connect_ns) in children.iter_mut().zip(connects) {
        outcomes.push(read_outcome(&mut c.stdout, connect_ns)?);
    }
    let elapsed = start.elapsed();
    Ok((outcomes, elapsed, ProcsGuard { children }))
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
    let [tag, succeeded, failed, mismatched, allocations, hist_len] = fields[..] else {
        bail!("client process said {line:?} instead of its results");
    };
    if tag != "done" {
        bail!("client process said {line:?} instead of its results");
    }
    let mut hist = vec![0u8; hist_len.parse()?];
    stdout.read_exact(&mut hist)?;
    let latency_ns: Histogram<u64> = Deserializer::new().deserialize(&mut &hist[..])?;
    let mut error = String::new();
    stdout.read_line(&mut error)?;
    let error = error.trim_end().strip_prefix("error ").unwrap_or("").to_string();
    Ok(ClientOutcome {
        latency_ns,
        connect_ns,
        succeeded: succeeded.parse()?,
        failed: failed.parse()?,
        mismatched: mismatched.parse()?,
        first_error: (!error.is_empty()).then_some(error),
        allocations: allocations.parse()?,
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
    writeln!(
        stdout,
        "done {} {} {} {} {}",
        outcome.succeeded,
        outcome.failed,
        outcome.mismatched,
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
}
