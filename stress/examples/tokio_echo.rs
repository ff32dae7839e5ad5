//! The ecosystem baseline of `stress --client async`: what a tokio user
//! gets without ipcd. A minimal tokio echo server over a Unix socket and
//! tokio clients, all on one multi-thread runtime in one process: each
//! client is a task with its own `tokio::net::UnixStream`, making calls
//! of a fixed size, one at a time or with `--window` requests in flight.
//!
//! The protocol is length-prefixed: a little-endian u32 length, then that
//! many bytes; the reply is the same frame. The server reads what the
//! socket has into a buffer, answers every whole frame in it with one
//! write, and keeps the rest for the next read. Each client writes a
//! request (prefix and body in one write) and reads the reply with
//! `read_exact`, checking every byte (replies come in order, so a
//! windowed client knows which request each one answers).
//!
//! With `--server-process` the server runs in a child process of its
//! own (this program again, on a runtime of the same size), as a tokio
//! user calling another service would have it. Without it, one runtime
//! serves both ends, and one client's round trip is usually done by one
//! worker thread that never sleeps: it writes the request, finds the
//! server's read ready in its next poll of the reactor, and so on, with
//! no wake-up across threads (a handful of context switches in 20,000
//! calls). That measures tokio's in-process hand-off, not two processes.
//!
//! ```text
//! cargo run --release -p stress --example tokio_echo -- --clients 100 --messages 10000
//! cargo run --release -p stress --example tokio_echo -- --messages 20000 --server-process
//! ```

#![forbid(unsafe_code)]

mod common;

use std::collections::VecDeque;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener as StdListener, UnixStream as StdStream};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use common::{fail, fill_bytes, Common, Figures, Rtts};

/// A minimal tokio Unix-socket echo server and tokio client tasks making
/// length-prefixed calls of a fixed size.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: Common,

    /// Payload bytes per call, each way (after the 4-byte length)
    #[arg(long, default_value_t = 64)]
    payload: usize,

    /// Requests in flight per client (1: synchronous calls)
    #[arg(long, default_value_t = 1)]
    window: usize,

    /// Worker threads of the runtime [default: the number of cores]
    #[arg(long)]
    workers: Option<usize>,

    /// Runs the server in a child process, with a runtime of its own of
    /// --workers threads, instead of on the clients' runtime
    #[arg(long)]
    server_process: bool,

    /// (Internal: what the child of --server-process runs.) Serves
    /// --clients connections on the abstract socket NAME, then exits
    #[arg(long, value_name = "NAME", hide = true)]
    serve_at: Option<String>,
}

/// A client gives up on a reply after this long, so a bug ends the run
/// instead of hanging it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The length prefix of every frame.
const PREFIX: usize = 4;

/// Echoes every whole frame the connection sends until it hangs up.
async fn serve(mut stream: UnixStream, payload: usize) -> io::Result<()> {
    let mut buf = vec![0u8; (64 * 1024).max(2 * (PREFIX + payload))];
    // Bytes in `buf` not yet answered (a frame's beginning).
    let mut kept = 0;
    loop {
        let n = stream.read(&mut buf[kept..]).await?;
        if n == 0 {
            return Ok(());
        }
        let filled = kept + n;
        let mut at = 0;
        while filled - at >= PREFIX {
            let len = u32::from_le_bytes(buf[at..at + PREFIX].try_into().expect("4 bytes")) as usize;
            if PREFIX + len > buf.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
            }
            if filled - at < PREFIX + len {
                break;
            }
            at += PREFIX + len;
        }
        // Every whole frame, prefix and all, is its own reply.
        stream.write_all(&buf[..at]).await?;
        buf.copy_within(at..filled, 0);
        kept = filled - at;
    }
}

/// Client `id`: `messages` calls with up to `window` in flight, every
/// reply checked.
async fn client(mut stream: UnixStream, id: u32, messages: u64, payload: usize, window: usize) -> Result<Rtts, String> {
    let mut request = vec![0u8; PREFIX + payload];
    request[..PREFIX].copy_from_slice(&(payload as u32).to_le_bytes());
    let mut reply = vec![0u8; PREFIX + payload];
    let mut expected = vec![0u8; payload];
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(window);
    let mut rtts = Rtts::new();
    let mut next = 0u64;
    let io = |e: io::Error| format!("client {id}: {e}");
    while next < messages || !in_flight.is_empty() {
        while in_flight.len() < window && next < messages {
            fill_bytes(id, next, &mut request[PREFIX..]);
            let start = Instant::now();
            stream.write_all(&request).await.map_err(io)?;
            in_flight.push_back((next, start));
            next += 1;
        }
        let (seq, start) = in_flight.pop_front().expect("a request in flight");
        match tokio::time::timeout(REPLY_TIMEOUT, stream.read_exact(&mut reply)).await {
            Ok(read) => read.map_err(io)?,
            Err(_) => return Err(format!("client {id} call {seq}: no reply within {REPLY_TIMEOUT:?}")),
        };
        rtts.record(start);
        fill_bytes(id, seq, &mut expected);
        if reply[..PREFIX] != request[..PREFIX] || reply[PREFIX..] != expected[..] {
            return Err(format!("client {id} call {seq}: the reply differs from the request"));
        }
    }
    Ok(rtts)
}

/// Accepts `clients` connections on `listener` and echoes on each until
/// it hangs up.
async fn serve_all(listener: UnixListener, clients: usize, payload: usize) -> io::Result<()> {
    let mut served = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (stream, _) = listener.accept().await?;
        served.push(tokio::spawn(serve(stream, payload)));
    }
    for s in served {
        s.await.map_err(io::Error::other)??;
    }
    Ok(())
}

/// Binds the abstract socket `name` for a tokio listener.
fn listen(name: &str) -> UnixListener {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap_or_else(|e| fail(&format!("address: {e}")));
    let listener = StdListener::bind_addr(&addr).unwrap_or_else(|e| fail(&format!("bind @{name}: {e}")));
    listener.set_nonblocking(true).unwrap_or_else(|e| fail(&format!("listener: {e}")));
    UnixListener::from_std(listener).unwrap_or_else(|e| fail(&format!("listener: {e}")))
}

/// Where the clients' server runs.
enum Server {
    /// A task on the clients' runtime.
    Task(tokio::task::JoinHandle<io::Result<()>>),
    /// A child process, which exits once every client has hung up.
    Process(std::process::Child),
}

/// Starts this program again as the server at `name`, and returns once
/// it listens (it says so on its stdout).
fn spawn_server(name: &str, args: &Args, workers: usize) -> std::process::Child {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(&format!("tokio_echo: own path: {e}")));
    let mut command = std::process::Command::new(exe);
    command
        .arg("--serve-at")
        .arg(name)
        .arg("--clients")
        .arg(args.common.clients.to_string())
        .arg("--payload")
        .arg(args.payload.to_string())
        .arg("--workers")
        .arg(workers.to_string())
        .stdout(std::process::Stdio::piped());
    // The server dies with this program, however it ends.
    ipc_platform::die_with_parent(&mut command);
    let mut child = command.spawn().unwrap_or_else(|e| fail(&format!("tokio_echo: server process: {e}")));
    let mut line = String::new();
    let out = child.stdout.take().expect("piped");
    match std::io::BufReader::new(out).read_line(&mut line) {
        Ok(_) if line == "listening\n" => child,
        Ok(_) => fail(&format!("tokio_echo: the server process said {line:?}, not that it listens")),
        Err(e) => fail(&format!("tokio_echo: the server process: {e}")),
    }
}

/// The child of `--server-process`: serves `clients` connections at
/// `name` and exits.
fn serve_at(name: &str, clients: usize, payload: usize, runtime: &tokio::runtime::Runtime) {
    runtime.block_on(async move {
        let listener = listen(name);
        println!("listening");
        if let Err(e) = serve_all(listener, clients, payload).await {
            fail(&format!("tokio_echo: server: {e}"));
        }
    });
}

fn main() {
    let args = Args::parse();
    args.common.check();
    if args.payload == 0 || args.window == 0 || args.workers == Some(0) {
        common::usage_error("--payload, --window and --workers must be at least 1");
    }
    let (clients, messages, payload, window) = (args.common.clients, args.common.messages, args.payload, args.window);
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("tokio_echo: runtime: {e}")));
    if let Some(name) = &args.serve_at {
        serve_at(name, clients, payload, &runtime);
        return;
    }
    // An abstract socket name: nothing in the file system to leave behind
    // if the program is killed.
    let name = format!("tokio-echo-{}-{}", std::process::id(), fastrand::u64(..));
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap_or_else(|e| fail(&format!("address: {e}")));
    let mut server = if args.server_process { Some(spawn_server(&name, &args, workers)) } else { None };
    let (elapsed, rtts) = runtime.block_on(async {
        let server = match server.take() {
            Some(child) => Server::Process(child),
            None => {
                let listener = listen(&name);
                Server::Task(tokio::spawn(serve_all(listener, clients, payload)))
            }
        };
        // Every client connected before the clock starts.
        let mut streams = Vec::with_capacity(clients);
        for _ in 0..clients {
            let stream = StdStream::connect_addr(&addr).unwrap_or_else(|e| fail(&format!("connect: {e}")));
            stream.set_nonblocking(true).unwrap_or_else(|e| fail(&format!("connect: {e}")));
            streams.push(UnixStream::from_std(stream).unwrap_or_else(|e| fail(&format!("connect: {e}"))));
        }
        let start = Instant::now();
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(id, s)| tokio::spawn(client(s, id as u32, messages, payload, window)))
            .collect();
        let mut rtts = Rtts::new();
        for t in tasks {
            match t.await {
                Ok(Ok(r)) => rtts.add(&r),
                Ok(Err(e)) => fail(&format!("tokio_echo: {e}")),
                Err(e) => fail(&format!("tokio_echo: a client task: {e}")),
            }
        }
        let elapsed = start.elapsed();
        match server {
            Server::Task(task) => match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fail(&format!("tokio_echo: server: {e}")),
                Err(e) => fail(&format!("tokio_echo: the server task: {e}")),
            },
            // The clients' streams are dropped with their tasks: the
            // server sees every hang-up and exits.
            Server::Process(mut child) => match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => fail(&format!("tokio_echo: the server process ended with {status}")),
                Err(e) => fail(&format!("tokio_echo: the server process: {e}")),
            },
        }
        (elapsed, rtts)
    });
    Figures::new("tokio_echo", &args.common, payload, elapsed, &rtts)
        .note("window", window)
        .note("workers", workers)
        .note("server_process", args.server_process)
        .print(args.common.json);
}
