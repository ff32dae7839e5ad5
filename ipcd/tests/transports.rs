//! The stream transports (`--uds`, `--tcp`) beside shared memory, through
//! the real daemon: every transport gives the same replies and the same
//! errors through the same client API, many stream clients share a daemon,
//! a client that breaks the frame protocol or stops reading holds back no
//! one but itself, and SIGTERM ends blocked calls on every transport.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{
    connect, expect_worker_in_handler, fd_count, frame, join_all, join_within, json_u64, pattern, poll_until,
    settled_fd_count, start_with_streams, stat_eventually, stats_json, watchdog, Endpoints, CLEANUP_LIMIT,
    HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::{CallError, Client, ClientOptions, ConnectError, DoorbellKind, Transport};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{ErrorCode, FrameHeader, Hello, ServerMessage, Welcome, FLAG_ERROR, FLAG_PAD, HEADER_LEN};
use serde::{Deserialize, Serialize};

/// The socket under a [`RawStream`].
enum RawSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for RawSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RawSocket::Unix(s) => s.read(buf),
            RawSocket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for RawSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            RawSocket::Unix(s) => s.write(buf),
            RawSocket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream-transport connection driven by hand: the handshake as the
/// client library does it, then whatever frames a test chooses to write.
struct RawStream {
    socket: RawSocket,
    welcome: Welcome,
}

impl RawStream {
    /// Connects to a stream listener and handshakes for `capacity`. Reads
    /// and writes give up after [`HANG_UP_LIMIT`].
    fn connect(transport: &Transport, capacity: u32) -> RawStream {
        let mut socket = match transport {
            Transport::Uds(path) => {
                let s = UnixStream::connect(path).expect("cannot connect to the --uds socket");
                s.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
                s.set_write_timeout(Some(HANG_UP_LIMIT)).unwrap();
                RawSocket::Unix(s)
            }
            Transport::Tcp(addr) => {
                let s = TcpStream::connect(addr).expect("cannot connect to the --tcp address");
                s.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
                s.set_write_timeout(Some(HANG_UP_LIMIT)).unwrap();
                s.set_nodelay(true).unwrap();
                RawSocket::Tcp(s)
            }
            Transport::Shm(_) => panic!("a raw stream needs a stream transport"),
            other => panic!("no raw stream over {other:?}"),
        };
        let hello = handshake::encode(&Hello::new(capacity, DoorbellKind::Futex)).unwrap();
        socket.write_all(&hello).expect("cannot send the hello");
        // Exactly the length-prefixed welcome: frames follow it on the
        // same connection.
        let mut prefix = [0u8; LENGTH_PREFIX];
        socket.read_exact(&mut prefix).expect("no answer to the hello");
        let mut body = vec![0u8; handshake::body_len(prefix).expect("answer length prefix")];
        socket.read_exact(&mut body).expect("answer cut short");
        let welcome = match handshake::decode_server_message(&body).expect("answer decodes") {
            ServerMessage::Welcome(w) => w,
            ServerMessage::Reject(r) => panic!("hello rejected: {r}"),
            other => panic!("a session's hello answered with {other:?}"),
        };
        RawStream { socket, welcome }
    }

    /// The id of the service called `name`.
    fn service(&self, name: &str) -> u16 {
        common::service_id(&self.welcome, name)
    }

    fn max_payload(&self) -> usize {
        self.welcome.max_payload as usize
    }

    /// Makes writes give up (with `WouldBlock` or `TimedOut`) after `limit`.
    fn set_write_timeout(&self, limit: Duration) {
        match &self.socket {
            RawSocket::Unix(s) => s.set_write_timeout(Some(limit)).unwrap(),
            RawSocket::Tcp(s) => s.set_write_timeout(Some(limit)).unwrap(),
        }
    }

    /// Writes `bytes` as they are.
    fn send_raw(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).expect("cannot write to the daemon");
    }

    /// The next frame from the daemon, or `None` once it has closed the
    /// connection.
    ///
    /// # Panics
    ///
    /// Panics if neither comes within [`HANG_UP_LIMIT`], or if a frame is
    /// cut short.
    fn read_frame(&mut self) -> Option<(FrameHeader, Vec<u8>)> {
        let mut raw = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.socket.read(&mut raw[got..]) {
                Ok(0) => {
                    assert_eq!(got, 0, "a reply header cut short by the hang-up");
                    return None;
                }
                Ok(n) => got += n,
                // The daemon closed with bytes of ours unread.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && got == 0 => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("neither a frame nor a hang-up from the daemon within {HANG_UP_LIMIT:?}: {e}"),
            }
        }
        let header = FrameHeader::decode(&raw);
        let mut body = vec![0u8; header.len as usize];
        self.socket.read_exact(&mut body).expect("a reply body cut short");
        Some((header, body))
    }

    /// The frames the daemon sends until it closes the connection.
    fn frames_until_hang_up(&mut self) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut frames = Vec::new();
        while let Some(frame) = self.read_frame() {
            frames.push(frame);
        }
        frames
    }
}

/// The stream transports of `ends`.
fn streams(ends: &Endpoints) -> [Transport; 2] {
    [Transport::Uds(ends.uds.clone()), Transport::Tcp(ends.tcp)]
}

#[test]
fn echo_round_trips_payloads_of_every_size_on_every_transport() {
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        let sizes = [
            (0, ClientOptions::default()),
            (1, ClientOptions::default()),
            (4095, ClientOptions::default()),
            (65_000, ClientOptions::default().fit_payload(65_000)),
            (1 << 20, ClientOptions::default().fit_payload(1 << 20)),
        ];
        for transport in ends.all() {
            let name = transport.name();
            for (len, options) in sizes.clone() {
                let mut client = connect(&transport, options);
                assert!(client.max_payload() >= len, "{name}: maximum {} for {len} bytes", client.max_payload());
                let echo = client.service("echo").unwrap();
                let mut reply = Vec::new();
                // Twice, so the second goes through rings and buffers the
                // first has already moved along.
                for seed in 0..2 {
                    let request = pattern(len as u64 + seed, len);
                    client.call_into(&echo, &request, &mut reply).unwrap();
                    assert!(reply == request, "{name}: echo {seed} of {len} bytes differs");
                }
            }
        }
    });
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<(u32, i64)>,
    note: Option<String>,
}

#[test]
fn typed_calls_and_errors_are_the_same_on_every_transport() {
    let (_daemon, ends) = start_with_streams(&["--debug-services"]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, ClientOptions::default());
            let echo = client.service("echo").unwrap();

            let order = Order {
                id: u64::MAX - 3,
                customer: format!("Zoë over {name}"),
                lines: vec![(1, -5), (70_000, i64::MIN)],
                note: Some("fragile".into()),
            };
            let back: Order = client.call_typed(&echo, &order).unwrap();
            assert_eq!(back, order, "{name}");

            // A name the daemon does not serve may be a provider's, which only
            // shared memory reaches: the stream transports say so.
            let unknown = match name {
                "shm" => CallError::UnknownService { name: "nope".into() },
                transport => CallError::NoBroker { name: "nope".into(), transport },
            };
            assert_eq!(client.service("nope"), Err(unknown), "{name}");

            let fail = client.service("debug.fail").unwrap();
            match client.call(&fail, b"abcd") {
                Err(CallError::Remote { message, .. }) => assert!(message.contains("debug.fail"), "{name}: {message}"),
                other => panic!("{name}: debug.fail gave {other:?}"),
            }

            let max = client.max_payload();
            let too_big = vec![0x5A; max + 1];
            let expected = CallError::TooLarge { len: max + 1, max };
            // One frame over the maximum goes as chunks with `call` and
            // `send`; the one-frame entry points refuse it.
            assert_eq!(client.call(&echo, &too_big).as_deref(), Ok(&too_big[..]), "{name}: call in chunks");
            let ticket = client.send(&echo, &too_big).unwrap();
            assert_eq!(client.wait(ticket).as_deref(), Ok(&too_big[..]), "{name}: send in chunks");
            assert_eq!(client.try_send(&echo, &too_big).unwrap_err(), expected, "{name}: try_send");
            assert_eq!(client.call_with(&echo, max + 1, |_| {}).unwrap_err(), expected, "{name}: call_with");
            assert_eq!(client.in_flight(), 0, "{name}: a refused request is not in flight");

            // A maximum-size request still fits, and the errors above left
            // the connection usable.
            let biggest = pattern(max as u64, max);
            assert!(client.call(&echo, &biggest).unwrap() == biggest, "{name}: maximum-size echo differs");
            assert_eq!(client.call(&echo, b"after the errors").unwrap(), b"after the errors", "{name}");
        }
    });
}

#[test]
fn unknown_service_id_is_an_error_for_that_call_on_every_transport() {
    // The library only calls services a welcome listed, on the client that
    // resolved them: a service resolved on a daemon with the debug services
    // is refused by a client of one without them, and never sent.
    let (_with_debug, debug_ends) = start_with_streams(&["--debug-services"]);
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        let foreign = connect(&debug_ends.all()[0], ClientOptions::default()).service("debug.fail").unwrap();
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, ClientOptions::default());
            assert!(client.service_names().all(|s| s != "debug.fail"), "{name}");
            let expected = CallError::ForeignService { name: "debug.fail".into() };
            assert_eq!(client.call(&foreign, b"anything"), Err(expected), "{name}");
            assert_eq!(client.in_flight(), 0, "{name}");
            let echo = client.service("echo").unwrap();
            assert_eq!(client.call(&echo, b"still here").unwrap(), b"still here", "{name}");
        }

        // What travels on the wire: an error frame for that request alone.
        for transport in streams(&ends) {
            let name = transport.name();
            let mut raw = RawStream::connect(&transport, 65536);
            let unused = raw.welcome.services.iter().map(|s| s.id).max().unwrap() + 1;
            raw.send_raw(&frame(unused, 0, 1, b"anything"));
            let (header, body) = raw.read_frame().expect("a reply to the unknown id");
            assert_eq!((header.request_id, header.service), (1, unused), "{name}");
            assert!(header.is_error(), "{name}: {header:?}");
            let (code, message) = ipc_core::decode_error(&body);
            assert_eq!(code, ErrorCode::UnknownService, "{name}: {message}");
            assert!(message.contains(&unused.to_string()), "{name}: {message}");
            // The session survives its mistake.
            let echo = raw.service("echo");
            raw.send_raw(&frame(echo, 0, 2, b"still here"));
            let (header, body) = raw.read_frame().expect("a reply to the echo");
            assert_eq!((header.request_id, header.flags), (2, 0), "{name}");
            assert_eq!(body, b"still here", "{name}");
        }
    });
}

#[test]
fn timed_out_call_leaves_the_connection_usable_on_every_transport() {
    let (_daemon, ends) = start_with_streams(&["--debug-services"]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, ClientOptions::default());
            let sleep = client.service("debug.sleep").unwrap();
            let echo = client.service("echo").unwrap();
            // The handler outlasts the timeout by far, so that its reply
            // cannot be there yet when the call gives up, even if this
            // thread runs late.
            let limit = Duration::from_millis(50);
            let result = client.call_timeout(&sleep, &1000u32.to_le_bytes(), limit);
            assert_eq!(result, Err(CallError::Timeout { after: limit }), "{name}");
            assert_eq!(client.in_flight(), 0, "{name}: the timed-out call still counts as in flight");
            // The session serves in order, so the late empty reply comes
            // first; it must be dropped, not taken for this call's.
            assert_eq!(client.call(&echo, b"next").unwrap(), b"next", "{name}");
            assert_eq!(client.call(&echo, b"and the next").unwrap(), b"and the next", "{name}");
        }
    });
}

#[test]
fn many_clients_in_parallel_on_uds_and_tcp_get_their_own_replies() {
    const CLIENTS: u32 = 16;
    const CALLS: u32 = 500;
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        let threads: Vec<_> = streams(&ends)
            .into_iter()
            .flat_map(|transport| (0..CLIENTS).map(move |id| (transport.clone(), id)))
            .map(|(transport, id)| {
                thread::spawn(move || {
                    let name = transport.name();
                    let mut client = connect(&transport, ClientOptions::default());
                    let echo = client.service("echo").unwrap();
                    let mut reply = Vec::new();
                    for seq in 0..CALLS {
                        // Who sent it and which call it was, then a length
                        // that varies so frames split at odd places.
                        let mut request = format!("{name}/{id}/{seq}/").into_bytes();
                        let seed = u64::from(id) << 32 | u64::from(seq);
                        request.extend(pattern(seed, (seq as usize * 37) % 3000));
                        client.call_into(&echo, &request, &mut reply).unwrap();
                        assert!(reply == request, "{name} client {id} call {seq}: reply differs");
                    }
                })
            })
            .collect();
        join_all(threads);
        let mut observer = connect(&Transport::Shm(ends.shm.clone()), ClientOptions::default());
        let json = stats_json(&mut observer);
        assert!(json_u64(&json, "replies") >= u64::from(2 * CLIENTS * CALLS), "{json}");
        assert_eq!(json_u64(&json, "errors"), 0, "{json}");
    });
}

/// A way of breaking the frame protocol: the bytes a hostile client writes,
/// and the replies it gets before the daemon hangs up.
struct Violation {
    what: &'static str,
    bytes: Vec<u8>,
    replies: Vec<(u64, Vec<u8>)>,
}

/// Every violation case, for a session whose echo service has id `echo`
/// and whose maximum payload is `max`.
fn violations(echo: u16, max: usize) -> Vec<Violation> {
    // Random bytes: check that the header they make is one the daemon must
    // refuse, so the case does not depend on luck.
    let garbage = pattern(0xBAD, 256);
    let header = FrameHeader::decode(&garbage[..HEADER_LEN].try_into().unwrap());
    assert!(header.len as usize > max || header.flags != 0, "the garbage makes a valid header: {header:?}");
    let mut oversized = FrameHeader { len: max as u32 + 1, service: echo, flags: 0, request_id: 1 }.encode().to_vec();
    oversized.extend_from_slice(&[7; 100]);
    vec![
        Violation { what: "garbage", bytes: garbage, replies: vec![] },
        Violation { what: "a length over the negotiated maximum", bytes: oversized, replies: vec![] },
        Violation {
            what: "a repeated request id",
            bytes: [frame(echo, 0, 5, b"first"), frame(echo, 0, 5, b"again")].concat(),
            replies: vec![(5, b"first".to_vec())],
        },
        Violation {
            what: "a request id going back",
            bytes: [frame(echo, 0, 10, b"ten"), frame(echo, 0, 9, b"nine")].concat(),
            replies: vec![(10, b"ten".to_vec())],
        },
        Violation { what: "request id zero", bytes: frame(echo, 0, 0, b"zero"), replies: vec![] },
        Violation { what: "the error flag", bytes: frame(echo, FLAG_ERROR, 1, b"e"), replies: vec![] },
        Violation { what: "the pad flag", bytes: frame(echo, FLAG_PAD, 1, b"p"), replies: vec![] },
        Violation { what: "an unknown flag", bytes: frame(echo, 0x8000, 1, b"u"), replies: vec![] },
    ]
}

#[test]
fn stream_clients_that_break_the_frame_protocol_are_cut_off_alone() {
    // One worker, so the hostile sessions share it with the neighbour.
    let (mut daemon, ends) = start_with_streams(&["--workers", "1"]);
    let cases = watchdog(TEST_LIMIT, move || {
        let uds = Transport::Uds(ends.uds.clone());
        let hostile_done = Arc::new(AtomicBool::new(false));
        let client = connect(&uds, ClientOptions::default());
        let neighbour = {
            let hostile_done = Arc::clone(&hostile_done);
            thread::spawn(move || {
                let mut neighbour = client;
                let echo = neighbour.service("echo").unwrap();
                let mut reply = Vec::new();
                // At least 1000 calls, and on until every hostile client
                // has been dealt with, so the two overlap.
                let mut calls = 0u64;
                while calls < 1000 || !hostile_done.load(Ordering::Acquire) {
                    let request = pattern(calls, (calls % 500) as usize);
                    neighbour.call_into(&echo, &request, &mut reply).unwrap();
                    assert!(reply == request, "neighbour call {calls}: reply differs");
                    calls += 1;
                }
                (neighbour, calls)
            })
        };

        let mut cases = 0u64;
        for transport in streams(&ends) {
            let name = transport.name();
            let probe = RawStream::connect(&transport, 65536);
            let all = violations(probe.service("echo"), probe.max_payload());
            drop(probe);
            for case in all {
                let mut raw = RawStream::connect(&transport, 65536);
                raw.send_raw(&case.bytes);
                let got: Vec<(u64, Vec<u8>)> = raw
                    .frames_until_hang_up()
                    .into_iter()
                    .map(|(h, body)| {
                        assert_eq!(h.flags, 0, "{name}, {}: an error reply {h:?}", case.what);
                        (h.request_id, body)
                    })
                    .collect();
                assert_eq!(got, case.replies, "{name}, {}: the replies before the hang-up", case.what);
                cases += 1;
            }
        }
        hostile_done.store(true, Ordering::Release);
        let (mut neighbour, calls) = join_within(neighbour, TEST_LIMIT, "the neighbour");
        assert!(calls >= 1000);

        let (violations, json) = stat_eventually(&mut neighbour, "protocol_violation", |n| n >= cases);
        assert_eq!(violations, cases, "{json}");
        // The neighbour is the one client left (the probes that counted
        // the cases hung up on their own).
        let alone = poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut neighbour), "connected_clients") == 1);
        assert!(alone, "{}", stats_json(&mut neighbour));
        cases
    });
    assert!(cases >= 16);
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}

/// Writes echo requests without reading a reply until the socket takes no
/// more for a while, and returns how many went whole. The daemon must stop
/// reading once its output for this client is full, so the writes must end
/// up blocked.
fn flood_without_reading(transport: &Transport) -> (RawStream, u64) {
    const LIMIT: usize = 256 << 20;
    let mut raw = RawStream::connect(transport, 65536);
    raw.set_write_timeout(Duration::from_millis(200));
    let echo = raw.service("echo");
    let mut written = 0;
    for id in 1.. {
        assert!(written < LIMIT, "{} MiB written and the daemon still reads them", written >> 20);
        let request = frame(echo, 0, id, &pattern(id, 1000));
        match raw.socket.write_all(&request) {
            Ok(()) => written += request.len(),
            // Possibly cut off mid-frame: that request never goes whole,
            // and that is fine.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return (raw, id - 1),
            Err(e) => panic!("writing to the daemon failed: {e}"),
        }
    }
    unreachable!("the loop ends by returning")
}

#[test]
fn stream_client_that_never_reads_replies_holds_back_only_itself() {
    // One worker: the flooding sessions and the neighbours share it. No
    // segment pool: its refills would move the fd count this test checks.
    let (daemon, ends) = start_with_streams(&["--workers", "1", "--segment-pool", "0"]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let mut shm = connect(&Transport::Shm(ends.shm.clone()), ClientOptions::default());
        let mut uds = connect(&Transport::Uds(ends.uds.clone()), ClientOptions::default());
        let calls = |client: &mut Client, n: u64, seed: u64| {
            let echo = client.service("echo").unwrap();
            let mut reply = Vec::new();
            for i in 0..n {
                let request = pattern(seed + i, 700);
                client.call_into(&echo, &request, &mut reply).unwrap();
                assert!(reply == request, "{} call {i}: reply differs", client.transport());
            }
        };
        calls(&mut shm, 10, 0);
        calls(&mut uds, 10, 0);
        // A stream session opened and closed first, so whatever the daemon
        // opens lazily for one is in the baseline.
        {
            let mut warm_up = connect(&Transport::Tcp(ends.tcp), ClientOptions::default());
            calls(&mut warm_up, 1, 0);
        }
        let connected = |client: &mut Client| json_u64(&stats_json(client), "connected_clients");
        assert!(poll_until(CLEANUP_LIMIT, || connected(&mut shm) == 2), "the warm-up client is not cleaned up");
        let baseline = settled_fd_count(pid);

        let floods: Vec<(RawStream, u64)> = streams(&ends).iter().map(flood_without_reading).collect();
        for (raw, sent) in &floods {
            assert!(*sent > 0, "{:?}: nothing was sent", raw.welcome.session_id);
        }
        // The count goes up just after the welcome is sent.
        assert!(poll_until(CLEANUP_LIMIT, || connected(&mut shm) == 4), "the flooding clients are not counted");
        assert!(fd_count(pid) >= baseline + 2, "the flooding sessions hold no fds?");
        // The worker serving the floods still serves its neighbours.
        calls(&mut shm, 500, 1000);
        calls(&mut uds, 500, 2000);

        drop(floods);
        let cleaned = poll_until(CLEANUP_LIMIT, || connected(&mut shm) == 2 && fd_count(pid) == baseline);
        assert!(cleaned, "after the floods: {} fds (baseline {baseline}); {}", fd_count(pid), stats_json(&mut shm));
        calls(&mut uds, 10, 3000);
    });
}

#[test]
fn sigterm_ends_blocked_stream_calls_and_removes_the_uds_socket() {
    // One worker: the first sleeper holds it, so the other calls wait in
    // their sockets when the signal comes.
    let (mut daemon, ends) = start_with_streams(&["--workers", "1", "--debug-services"]);
    let uds = Transport::Uds(ends.uds.clone());
    let tcp = Transport::Tcp(ends.tcp);
    let mut sleeper = connect(&tcp, ClientOptions::default());
    let mut waiters = [connect(&uds, ClientOptions::default()), connect(&tcp, ClientOptions::default())];
    // Every session is adopted and idle before the race below begins.
    for client in std::iter::once(&mut sleeper).chain(waiters.iter_mut()) {
        let ping = client.service("ping").unwrap();
        client.call(&ping, b"").unwrap();
    }

    // The sleeper's handler runs long enough for the daemon to notice the
    // stop while it runs, even on a loaded machine.
    let sleep = sleeper.service("debug.sleep").unwrap();
    let sleeping = thread::spawn(move || sleeper.call(&sleep, &3000u32.to_le_bytes()));
    expect_worker_in_handler(daemon.pid());
    // Each waiter's request is on its socket before the signal, and the
    // only worker is busy: the daemon has not read it when it stops. Read
    // at shutdown, it gets a shutdown error; still unread, it is past the
    // last request the closing frame names. Either way, `Shutdown`.
    let waiting: Vec<_> = waiters
        .into_iter()
        .map(|mut client| {
            let sleep = client.service("debug.sleep").unwrap();
            let ticket = client.send(&sleep, &1000u32.to_le_bytes()).unwrap();
            client.flush().unwrap();
            (client, ticket)
        })
        .collect();

    let status = daemon.terminate();
    assert!(status.success(), "ipcd exited with {status}; stderr:\n{}", daemon.stderr());
    for (mut client, ticket) in waiting {
        let name = client.transport();
        let result = watchdog(Duration::from_secs(10), move || client.wait(ticket));
        assert!(matches!(result, Err(CallError::Shutdown)), "{name}: the call waiting at shutdown returned {result:?}");
    }
    // The sleeping handler ran to its end before the worker stopped, and
    // its reply went out before the session closed.
    let result = join_within(sleeping, Duration::from_secs(10), "the sleeping call");
    assert!(matches!(result, Ok(ref r) if r.is_empty()), "the sleeping call returned {result:?}");
    assert!(!ends.uds.exists(), "the --uds socket file is left behind");
    assert!(!ends.shm.exists(), "the control socket file is left behind");
    for transport in [uds, tcp] {
        let result = Client::connect_with(transport.clone(), ClientOptions::default());
        assert!(
            matches!(result, Err(ConnectError::NotRunning { .. })),
            "{}: connecting after the exit gave {result:?}",
            transport.name()
        );
    }
}

/// Closes the sending side of `raw`'s connection: no more requests, but
/// replies may still come.
fn shut_down_writing(socket: &RawSocket) {
    match socket {
        RawSocket::Unix(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
        RawSocket::Tcp(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
    }
}

#[test]
fn stream_client_that_half_closes_gets_every_reply() {
    /// Requests sent at a time: their replies (16 KiB) are far below the
    /// daemon's output limit (about 96 KiB here).
    const GROUP: u64 = 16;
    const PAYLOAD: usize = 1000;
    /// The bytes of one reply on the wire.
    const REPLY: usize = HEADER_LEN + PAYLOAD;
    // One worker that never spins: it learns of anything only from its
    // poll, in the order things happened (see below).
    let (_daemon, ends) = start_with_streams(&["--workers", "1", "--spin-us", "0"]);
    watchdog(TEST_LIMIT, move || {
        let mut observer = connect(&Transport::Shm(ends.shm.clone()), ClientOptions::default());
        // The echo requests the daemon has served. The stats count the
        // observer's earlier stats calls too (each once its batch ends,
        // before its reply), but not the one being answered.
        let mut stats_calls = 0;
        let mut served = move |observer: &mut Client| {
            let requests = json_u64(&stats_json(observer), "requests");
            stats_calls += 1;
            requests - (stats_calls - 1)
        };
        let mut raw = RawStream::connect(&Transport::Uds(ends.uds.clone()), 65536);
        let RawSocket::Unix(socket) = &raw.socket else { unreachable!("a --uds connection") };
        let socket = socket.try_clone().unwrap();
        let echo = raw.service("echo");
        // Requests go out a group at a time, each group once the daemon has
        // served the one before, until the daemon holds replies our socket
        // did not take: how much a Unix socket takes depends on how the
        // daemon's sends were cut up. Each group adds less than the output
        // limit, so the daemon never stops reading, and every request is
        // served before the end of the requests comes, on its own.
        let mut sent = 0;
        loop {
            let wire: Vec<u8> =
                (sent + 1..=sent + GROUP).flat_map(|id| frame(echo, 0, id, &pattern(id, PAYLOAD))).collect();
            raw.send_raw(&wire);
            sent += GROUP;
            let all = poll_until(TEST_LIMIT, || served(&mut observer) == sent);
            assert!(all, "the daemon did not serve {sent} requests: {}", stats_json(&mut observer));
            let in_socket = rustix::io::ioctl_fionread(&socket).unwrap();
            if in_socket < (sent as usize * REPLY) as u64 {
                break;
            }
        }
        shut_down_writing(&raw.socket);
        // Replies are read only once the daemon has seen the end. The end
        // of the stream is on the worker's poll before the observer's next
        // request is (its session is parked: only its doorbell, rung after
        // the end came, brings the worker to it), and the worker takes its
        // poll's events before it serves: so once the observer has its
        // reply, the worker has taken the end of the stream, with replies
        // still to send.
        stats_json(&mut observer);
        let mut ids = Vec::new();
        while (ids.len() as u64) < sent {
            let Some((header, body)) = raw.read_frame() else { break };
            assert!(body == pattern(header.request_id, PAYLOAD), "reply {} differs", header.request_id);
            ids.push(header.request_id);
        }
        assert_eq!(ids.len() as u64, sent, "replies before the hang-up, the last {:?}", ids.last());
        assert_eq!(ids, (1..=sent).collect::<Vec<_>>());
        assert!(raw.read_frame().is_none(), "a frame after the last reply");
    });
}

#[test]
fn stream_client_that_half_closes_is_hung_up_on_after_its_last_reply() {
    let (daemon, ends) = start_with_streams(&["--workers", "1", "--debug-services"]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        for transport in streams(&ends) {
            let name = transport.name();
            let mut raw = RawStream::connect(&transport, 65536);
            let echo = raw.service("echo");
            // A first round trip: the session is adopted and idle.
            raw.send_raw(&frame(echo, 0, 1, b"first"));
            assert_eq!(raw.read_frame().map(|(h, _)| h.request_id), Some(1), "{name}");
            // Hold the only worker, so that the last request and the end of
            // the stream are both waiting when the session is next read.
            let mut sleeper = connect(&Transport::Shm(ends.shm.clone()), ClientOptions::default());
            let sleep = sleeper.service("debug.sleep").unwrap();
            let sleeping = thread::spawn(move || sleeper.call(&sleep, &300u32.to_le_bytes()));
            expect_worker_in_handler(pid);
            raw.send_raw(&frame(echo, 0, 2, b"last"));
            shut_down_writing(&raw.socket);
            let last = raw.read_frame().map(|(h, body)| (h.request_id, body));
            assert_eq!(last, Some((2, b"last".to_vec())), "{name}: the last reply");
            // Then the hang-up (read_frame panics if it does not come).
            assert!(raw.read_frame().is_none(), "{name}: a frame after the last reply");
            join_within(sleeping, Duration::from_secs(10), "the sleeper").unwrap();
        }
    });
}

#[test]
fn stream_client_hanging_up_with_replies_unread_counts_as_a_hang_up() {
    let (_daemon, ends) = start_with_streams(&["--workers", "1"]);
    watchdog(TEST_LIMIT, move || {
        let mut observer = connect(&Transport::Shm(ends.shm.clone()), ClientOptions::default());
        for transport in streams(&ends) {
            drop(flood_without_reading(&transport));
        }
        let (hang_ups, json) = stat_eventually(&mut observer, "client_hangup", |n| n >= 2);
        assert_eq!(hang_ups, 2, "{json}");
        assert_eq!(json_u64(&json, "protocol_violation"), 0, "{json}");
    });
}
