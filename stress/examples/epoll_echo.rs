//! The bar for ipcd's Unix-socket transport: a minimal epoll echo server
//! and nothing else. One server thread runs a mio (epoll) loop over a Unix
//! stream listener and its connections; each client is a thread with a
//! blocking socket making synchronous calls of a fixed size. All in one
//! process.
//!
//! What it leaves out, against ipcd's Unix-socket transport: processes, the
//! hello and welcome, frame headers (every request and reply is exactly
//! `--payload` bytes, so the size is the framing), request ids and services,
//! batching replies and backpressure, and every check of what the peer
//! sent. What it keeps: non-blocking reads until the kernel has no more
//! (edge-triggered epoll), a reply only once the whole request is in, a
//! copy of the request into the server's buffer and out again, and a check
//! of every reply.
//!
//! ```text
//! cargo run --release -p stress --example epoll_echo -- --clients 100 --messages 10000
//! ```

#![forbid(unsafe_code)]

mod common;

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::{UnixListener, UnixStream as MioStream};
use mio::{Events, Interest, Poll, Token};

use common::{fail, fill_bytes, Common, Figures, Rtts};

/// A minimal epoll (mio) Unix-socket echo server on one thread, and
/// blocking clients making synchronous fixed-size calls.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: Common,

    /// Payload bytes per call, each way
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

const LISTENER: Token = Token(usize::MAX);

/// A client gives up on a reply after this long, so a bug ends the run
/// instead of hanging it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One accepted connection: the request being read, then the reply being
/// written.
struct Connection {
    stream: MioStream,
    buf: Vec<u8>,
    /// Request bytes read so far; once the request is whole, reply bytes
    /// written so far (`writing`).
    at: usize,
    writing: bool,
}

impl Connection {
    /// Reads and answers until the socket has nothing more, or would not
    /// take the rest of a reply. Returns `false` once the peer has hung up.
    fn serve(&mut self) -> io::Result<bool> {
        loop {
            if self.writing {
                match self.stream.write(&self.buf[self.at..]) {
                    Ok(n) => self.at += n,
                    // Writable again later: epoll says when.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if self.at == self.buf.len() {
                    (self.at, self.writing) = (0, false);
                }
                continue;
            }
            match self.stream.read(&mut self.buf[self.at..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // The whole request is in: the reply is the same bytes.
            if self.at == self.buf.len() {
                (self.at, self.writing) = (0, true);
            }
        }
    }
}

/// The server: accepts `clients` connections and echoes each request until
/// every one of them has hung up.
fn serve(listener: UnixListener, clients: usize, payload: usize) -> io::Result<()> {
    let mut listener = listener;
    let mut poll = Poll::new()?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut connections: Vec<Option<Connection>> = Vec::with_capacity(clients);
    let mut closed = 0;
    let mut events = Events::with_capacity(1024);
    while closed < clients {
        poll.poll(&mut events, None)?;
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let token = Token(connections.len());
                            // Both interests, edge-triggered: each event
                            // means "try again", whichever way was blocked.
                            poll.registry().register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
                            connections.push(Some(Connection { stream, buf: vec![0; payload], at: 0, writing: false }));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let slot = &mut connections[event.token().0];
            let Some(connection) = slot else { continue };
            if !connection.serve()? {
                poll.registry().deregister(&mut connection.stream)?;
                *slot = None;
                closed += 1;
            }
        }
    }
    Ok(())
}

/// Client `id`: connects, waits for the others, makes `messages`
/// synchronous calls and checks every reply byte for byte.
fn client(addr: &SocketAddr, id: u32, messages: u64, payload: usize, barrier: &Barrier) -> io::Result<Rtts> {
    let mut stream = UnixStream::connect_addr(addr)?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut request = vec![0u8; payload];
    let mut reply = vec![0u8; payload];
    let mut rtts = Rtts::new();
    barrier.wait();
    for seq in 0..messages {
        fill_bytes(id, seq, &mut request);
        let start = Instant::now();
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        rtts.record(start);
        if reply != request {
            fail(&format!("epoll_echo: client {id} call {seq}: the reply differs from the request"));
        }
    }
    Ok(rtts)
}

fn main() {
    let args = Args::parse();
    args.common.check();
    if args.payload == 0 {
        common::usage_error("--payload must be at least 1 byte");
    }
    let (clients, messages, payload) = (args.common.clients, args.common.messages, args.payload);
    // An abstract socket name: nothing in the file system to leave behind
    // if the program is killed.
    let name = format!("epoll-echo-{}-{}", std::process::id(), fastrand::u64(..));
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap_or_else(|e| fail(&format!("address: {e}")));
    let listener = UnixListener::bind_addr(&addr).unwrap_or_else(|e| fail(&format!("bind @{name}: {e}")));
    let server = std::thread::Builder::new()
        .name("server".into())
        .spawn(move || serve(listener, clients, payload))
        .expect("spawn the server thread");
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|id| {
            let (addr, barrier) = (addr.clone(), Arc::clone(&barrier));
            std::thread::Builder::new()
                .name(format!("client-{id}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    client(&addr, id as u32, messages, payload, &barrier)
                        .unwrap_or_else(|e| fail(&format!("epoll_echo: client {id}: {e}")))
                })
                .expect("spawn a client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut rtts = Rtts::new();
    for t in threads {
        rtts.add(&t.join().expect("client thread panicked"));
    }
    let elapsed = start.elapsed();
    server.join().expect("server thread panicked").unwrap_or_else(|e| fail(&format!("epoll_echo: server: {e}")));
    Figures::new("epoll_echo", &args.common, payload, elapsed, &rtts).print(args.common.json);
}
