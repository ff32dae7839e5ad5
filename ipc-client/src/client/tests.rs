//! The client's own tests, with no daemon: connecting to listeners that
//! misbehave, and a daemon played by the test itself (a scripted peer that
//! makes the segment and doorbells, then writes into the rings exactly
//! what a case needs, at exactly the moment it needs it), to pin down
//! which outcome each request gets when the connection fails around it.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use ipc_core::{encode_error, Consumer, Producer, ServiceEntry, SharedWords, FLAG_ERROR};

use super::*;

/// How long a test may wait for something that should happen at once. It
/// only turns a hang into a failure; it is not a performance bound.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` on a thread of its own and returns its result, or fails the
/// test if it has none within [`HANG_LIMIT`] (the thread is left behind,
/// blocked: the test process ends with it).
fn within_limit<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| panic!("{what} did not return within {HANG_LIMIT:?}"))
}

#[test]
fn client_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Client>();
}

#[test]
fn missing_socket_is_not_running() {
    let err = Client::connect_to("/nonexistent/ipcd.sock").unwrap_err();
    assert!(matches!(err, ConnectError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ipcd.sock"));
}

/// A listener that never accepts, as a stopped daemon's: its backlog of 0
/// holds one connection and then nothing more.
#[test]
fn connect_to_a_full_backlog_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stopped.sock");
    let listener = ipc_platform::bind_control_socket(&path, 0o600, 0).unwrap();
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 64, "a backlog of 0 took {} connections", queued.len());
        match ipc_platform::connect_unix(&path, Duration::from_millis(50)) {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
    }
    let limit = Duration::from_millis(200);
    for transport in [Transport::Shm(path.clone()), Transport::Uds(path.clone())] {
        let options = ClientOptions::default().connect_timeout(limit);
        let name = transport.name();
        let result = within_limit("connect", move || Client::connect_with(transport, options).map(drop));
        match result {
            Err(ConnectError::Timeout { after }) => assert_eq!(after, limit, "{name}"),
            other => panic!("{name}: expected a timeout, got {other:?}"),
        }
    }
    drop((listener, queued));
}

/// The service ids the scripted daemon offers.
const ECHO: u16 = 1;

/// The reply the scripted daemon gives request `id`.
fn reply_to(id: u64) -> Vec<u8> {
    format!("reply to request {id}").into_bytes()
}

/// What the scripted daemon hands over as the client-to-daemon doorbell.
#[derive(Clone, Copy)]
enum DaemonBell {
    /// An eventfd, as the daemon does.
    EventFd,
    /// `/dev/null` opened read-only: every ring of it fails (`EBADF`).
    Broken,
}

/// The scripted daemon's side of one session.
struct DaemonSide {
    control: UnixStream,
    words: SharedWords,
    requests: Consumer,
    responses: Producer,
}

impl DaemonSide {
    /// Takes the next request, waiting for the client to publish it.
    fn take_request(&mut self) -> (FrameHeader, Vec<u8>) {
        let mut body = Vec::new();
        let header = poll(|| self.requests.try_pop(&mut body).expect("request ring"));
        self.requests.release();
        (header, body)
    }

    /// Publishes a reply, waking the client if it sleeps.
    fn reply(&mut self, id: u64, flags: u16, body: &[u8]) {
        self.responses.try_push(ECHO, flags, id, body).expect("room for the reply");
        if self.responses.publish() {
            ipc_platform::futex::wake_one(self.responses.peer_waiter()).unwrap();
        }
    }

    /// Writes a reply, unpublished until [`DaemonSide::publish`].
    fn push_reply(&mut self, id: u64, flags: u16, body: &[u8]) {
        self.responses.try_push(ECHO, flags, id, body).expect("room for the reply");
    }

    /// Publishes the replies written, waking the client if it sleeps.
    fn publish(&mut self) {
        if self.responses.publish() {
            ipc_platform::futex::wake_one(self.responses.peer_waiter()).unwrap();
        }
    }

    /// Publishes a reply without waking anyone.
    fn reply_quietly(&mut self, id: u64) {
        self.responses.try_push(ECHO, 0, id, &reply_to(id)).expect("room for the reply");
        // Only the client's announcement of a sleep is taken back; no wake.
        let _ = self.responses.publish();
    }

    /// Says the daemon waits for room in the response ring, so the client
    /// rings it as soon as it consumes a reply.
    fn await_space(&self) {
        self.responses.space_waiter().store(1, Ordering::SeqCst);
    }

    /// Waits until the client, blocked for room in the request ring with
    /// requests in flight, sleeps for the reply that would bring it.
    fn await_client_blocked(&self) {
        poll(|| (self.responses.peer_waiter().load(Ordering::SeqCst) == 1).then_some(()));
    }
}

/// Polls `f` until it gives a value, failing the test after [`HANG_LIMIT`].
fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "the scripted daemon waited {HANG_LIMIT:?} in vain");
        thread::sleep(Duration::from_millis(1));
    }
}

/// A daemon played by the test: it accepts one client, answers its hello
/// with 4 KiB rings in a segment of its own making and `bell` as the
/// doorbell, then runs `script` on its side of the session.
struct Scripted {
    path: PathBuf,
    script: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Scripted {
    const CAPACITY: u32 = 4096;

    fn start(bell: DaemonBell, script: impl FnOnce(DaemonSide) + Send + 'static) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scripted.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let script = thread::spawn(move || {
            let (mut control, _) = listener.accept().unwrap();
            let mut prefix = [0u8; LENGTH_PREFIX];
            control.read_exact(&mut prefix).unwrap();
            let mut hello = vec![0u8; handshake::body_len(prefix).unwrap()];
            control.read_exact(&mut hello).unwrap();
            handshake::decode_hello(&hello).unwrap();

            let layout = SegmentLayout::new(Scripted::CAPACITY).unwrap();
            let memfd = ipc_platform::create_sealed("scripted", layout.segment_size() as u64).unwrap();
            let region = Mapping::map(memfd.as_fd(), layout.segment_size()).unwrap();
            layout.write_header(&region);
            let bell: OwnedFd = match bell {
                DaemonBell::EventFd => EventFd::new().unwrap().as_fd().try_clone_to_owned().unwrap(),
                DaemonBell::Broken => std::fs::File::open("/dev/null").unwrap().into(),
            };
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                session_id: 1,
                ring_capacity: Scripted::CAPACITY,
                max_payload: layout.max_payload(),
                doorbell: DoorbellKind::Futex,
                services: vec![ServiceEntry { name: "echo".into(), id: ECHO }],
            };
            let bytes = handshake::encode(&ServerMessage::Welcome(welcome)).unwrap();
            let sent = ipc_platform::send_with_fds(control.as_fd(), &bytes, &[memfd.as_fd(), bell.as_fd()]).unwrap();
            assert_eq!(sent, bytes.len());
            // The daemon's ends: it reads requests and writes replies.
            let Rings { request_consumer: requests, response_producer: responses, words, .. } =
                Rings::new(region, &layout);
            script(DaemonSide { control, words, requests, responses });
        });
        Scripted { path, script: Some(script), _dir: dir }
    }

    /// A client of it that never spins: every wait sleeps.
    fn client(&self) -> Client {
        let options = ClientOptions::default().ring_capacity(Scripted::CAPACITY).spin(Duration::ZERO);
        Client::connect_with(&self.path, options).unwrap()
    }

    /// Waits for the script to end, passing on its panic.
    fn finish(mut self) {
        if let Err(panic) = self.script.take().expect("not finished yet").join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Sends requests of 1000 bytes (four fill a 4 KiB ring) until one does
/// not return `Ok`: the tickets sent, and how that one ended.
fn send_until_refused(client: &mut Client) -> (Vec<Ticket>, CallError) {
    let echo = client.service("echo").unwrap();
    let mut tickets = Vec::new();
    loop {
        assert!(tickets.len() < 5, "a 4 KiB ring took {} requests of 1000 bytes", tickets.len());
        match client.send(&echo, &[7u8; 1000]) {
            Ok(t) => tickets.push(t),
            Err(e) => return (tickets, e),
        }
    }
}

/// [`send_until_refused`] under the hang limit, handing the client back.
fn blocked_sends(mut client: Client) -> (Vec<Ticket>, CallError, Client) {
    within_limit("a send blocked for room", move || {
        let (tickets, refused) = send_until_refused(&mut client);
        (tickets, refused, client)
    })
}

/// Every outcome `recv` hands out until nothing is in flight.
fn recv_all(client: &mut Client) -> Vec<(u64, Result<Vec<u8>, CallError>)> {
    let mut got = Vec::new();
    loop {
        match client.recv() {
            Ok((ticket, outcome)) => got.push((ticket.id(), outcome)),
            Err(CallError::NothingInFlight) => return got,
            Err(e) => panic!("recv failed after {got:?}: {e}"),
        }
    }
}

/// The daemon answers the first two requests and stops on purpose, saying
/// it took no more, while the client is blocked for room in a full request
/// ring; it wakes nobody and hangs up. The two replies in the ring are
/// their requests' outcomes; the other two were not run (`Shutdown`), nor
/// was the blocked one.
#[test]
fn replies_in_the_ring_outlive_a_shutdown_seen_while_waiting_for_room() {
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d| {
        d.await_client_blocked();
        d.reply_quietly(1);
        d.reply_quietly(2);
        d.words.mark_closed(2);
        drop(d.control);
    });
    let (tickets, refused, mut client) = blocked_sends(daemon.client());
    assert_eq!(tickets.iter().map(Ticket::id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let got = recv_all(&mut client);
    let shutdown = || Err(CallError::Shutdown);
    assert_eq!(
        (refused, got),
        (CallError::Shutdown, vec![(1, Ok(reply_to(1))), (2, Ok(reply_to(2))), (3, shutdown()), (4, shutdown())]),
        "(the blocked send, then every ticket's outcome)"
    );
    assert_eq!(client.in_flight(), 0);
    daemon.finish();
}

/// As above, but the daemon dies instead (no word on what it took): the
/// replies in the ring are still outcomes; the rest are unknown.
#[test]
fn replies_in_the_ring_outlive_a_crash_seen_while_waiting_for_room() {
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d| {
        d.await_client_blocked();
        d.reply_quietly(1);
        d.reply_quietly(2);
        drop(d.control);
    });
    let (tickets, refused, mut client) = blocked_sends(daemon.client());
    assert_eq!(tickets.len(), 4);
    let got = recv_all(&mut client);
    let lost = |outcome: &Result<Vec<u8>, CallError>| matches!(outcome, Err(CallError::Disconnected { .. }));
    assert!(matches!(refused, CallError::NotConnected { .. }), "the blocked send: {refused:?}; then {got:?}");
    assert_eq!(got[..2], [(1, Ok(reply_to(1))), (2, Ok(reply_to(2)))], "{got:?}");
    assert!(got.len() == 4 && got[2].0 == 3 && lost(&got[2].1) && got[3].0 == 4 && lost(&got[3].1), "{got:?}");
    daemon.finish();
}

/// The scripted daemon itself: it serves a call, then closes on purpose
/// right after answering a second one; that reply is still read, and a
/// call after the close is known not to have run.
#[test]
fn the_scripted_daemon_serves_calls_and_closes() {
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d| {
        for id in 1..=2 {
            let (header, _) = d.take_request();
            assert_eq!(header.request_id, id);
            d.reply(id, 0, &reply_to(id));
        }
        d.words.mark_closed(2);
        drop(d.control);
    });
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    let outcomes = within_limit("calls", move || [1, 2, 3].map(|_| client.call(&echo, b"call")));
    assert_eq!(outcomes, [Ok(reply_to(1)), Ok(reply_to(2)), Err(CallError::Shutdown)]);
    daemon.finish();
}

/// A daemon whose doorbell cannot be rung, waiting for room in the
/// response ring: consuming any reply tries to ring it and fails, which
/// breaks the connection right after a reply was claimed.
fn ring_fails_after(replies: &'static [(u64, bool)]) -> Scripted {
    Scripted::start(DaemonBell::Broken, move |mut d| {
        // Every request first, then every reply in one publish: the client
        // finds them all at once, whichever it consumes first (the consume
        // whose ring fails must not race with a later reply).
        let mut bodies = Vec::new();
        for &(id, _) in replies {
            let (header, body) = d.take_request();
            assert_eq!(header.request_id, id);
            bodies.push(body);
        }
        d.await_space();
        for (&(id, failed), body) in replies.iter().zip(bodies) {
            if failed {
                let mut error = Vec::new();
                encode_error(ErrorCode::Handler, "it failed", &mut error);
                d.push_reply(id, FLAG_ERROR, &error);
            } else {
                d.push_reply(id, 0, &body);
            }
        }
        d.publish();
        // Wait for the hang-up, so the client outlives nothing it needs.
        let _ = d.control.read(&mut [0u8; 1]);
    })
}

/// `recv` claims the reply, then fails to hand its space back: the reply
/// was read, and it is its ticket's outcome.
#[test]
fn a_reply_received_before_a_failed_consume_is_its_outcome() {
    let daemon = ring_fails_after(&[(1, false)]);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    let ticket = client.send(&echo, b"one").unwrap();
    let got = within_limit("recv", move || (client.recv(), client.recv(), client));
    let (first, second, client) = got;
    assert_eq!((first, second), (Ok((ticket, Ok(b"one".to_vec()))), Err(CallError::NothingInFlight)));
    assert!(!client.is_connected(), "the failed ring breaks the connection");
    assert_eq!(client.in_flight(), 0);
    drop(client);
    daemon.finish();
}

/// The same through `wait`, a call, and an error reply: each gets the
/// outcome it read, once.
#[test]
fn a_reply_waited_for_before_a_failed_consume_is_its_outcome() {
    let daemon = ring_fails_after(&[(1, false)]);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    let ticket = client.send(&echo, b"one").unwrap();
    let (outcome, client) = within_limit("wait", move || (client.wait(ticket), client));
    assert_eq!(outcome, Ok(b"one".to_vec()));
    assert_eq!(client.in_flight(), 0);
    drop(client);
    daemon.finish();

    let daemon = ring_fails_after(&[(1, false)]);
    let mut client = daemon.client();
    let (outcome, client) = within_limit("call", move || (client.call(&echo, b"called"), client));
    assert_eq!(outcome, Ok(b"called".to_vec()));
    drop(client);
    daemon.finish();

    let daemon = ring_fails_after(&[(1, true)]);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    let ticket = client.send(&echo, b"fails").unwrap();
    let (outcome, mut client) = within_limit("wait", move || (client.wait(ticket), client));
    assert_eq!(outcome, Err(CallError::Remote { code: None, message: "it failed".into() }));
    assert_eq!(client.recv(), Err(CallError::NothingInFlight));
    drop(client);
    daemon.finish();
}

/// Waiting for the second reply, the client keeps the first aside and
/// fails to hand its space back. Each ticket gets one outcome, its reply:
/// the loss reads the second off the ring too.
#[test]
fn a_reply_kept_aside_before_a_failed_consume_gives_each_ticket_one_outcome() {
    let daemon = ring_fails_after(&[(1, false), (2, false)]);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    let first = client.send(&echo, b"first").unwrap();
    let second = client.send(&echo, b"second").unwrap();
    let (outcome, mut client) = within_limit("wait", move || (client.wait(second), client));
    assert_eq!(outcome, Ok(b"second".to_vec()));
    assert_eq!(client.wait(second), Err(CallError::UnknownTicket { id: second.id() }));
    assert_eq!(recv_all(&mut client), [(first.id(), Ok(b"first".to_vec()))]);
    drop(client);
    daemon.finish();
}
