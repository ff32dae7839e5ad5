//! Clients that stop reading their replies (`--stall-timeout`), on shared
//! memory and on the `--uds` stream, with one worker so that every session
//! shares it: the stalled session holds back no one, a neighbour keeps
//! completing calls, and once the stall has lasted the timeout the session
//! is closed, counted as `stalled`, and its fds are gone. A client that
//! reads slowly, stalling again and again but each time for less than the
//! timeout, is never cut off and gets every reply once, in order.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    fds_back_to, frame, good_hello, join_within, json_u64, pattern, poll_until, raw_connect, raw_session, read_answer,
    service_id, settled_fd_count, start_with_uds, stats_json, watchdog, RawSession, RawSessionExt, CLEANUP_LIMIT,
    HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::{Client, ClientOptions, Transport};
use ipc_core::{DoorbellKind, FrameHeader, PushError, ServerMessage, Welcome, HEADER_LEN};

/// The stall timeout of the tests that wait for a disconnect: short, yet
/// long enough that the neighbour gets calls in while the stall lasts on a
/// loaded machine.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the slow reader leaves its replies unread each time: well
/// under [`STALL_TIMEOUT`], while all its pauses together exceed it.
const PAUSE: Duration = Duration::from_millis(500);
/// How long a stream's writes must make no progress for the daemon to
/// count as stalled on our replies (a stream session's stall shows in
/// nothing else a client can see).
const NO_PROGRESS: Duration = Duration::from_millis(100);
/// The echo payload of the stalling clients.
const PAYLOAD: usize = 200;
/// Calls the neighbour makes while a client is stalled.
const NEIGHBOUR_CALLS: u64 = 20;

/// Starts a daemon with one worker, the stall timeout, and `--uds`.
fn start() -> (common::Daemon, Transport, Transport) {
    let timeout = format!("{}ms", STALL_TIMEOUT.as_millis());
    let (daemon, uds) = start_with_uds(&["--workers", "1", "--stall-timeout", &timeout]);
    let shm = Transport::Shm(daemon.socket().to_path_buf());
    (daemon, shm, Transport::Uds(uds))
}

/// Sends echo requests from `next_id` on and reads no reply, until the
/// request ring is full and the daemon waits for us: a reply did not fit
/// the response ring, and the daemon announced that it waits for room
/// (the response ring's space waiter). Rings the doorbell while it waits,
/// which must not count as reading. Returns the id after the last one
/// sent.
fn fill_until_stalled(raw: &mut RawSession, mut next_id: u64) -> u64 {
    let echo = raw.service("echo");
    let deadline = Instant::now() + HANG_UP_LIMIT;
    loop {
        match raw.requests.try_push(echo, 0, next_id, &pattern(next_id, PAYLOAD)) {
            Ok(()) => next_id += 1,
            Err(PushError::Full) => {
                raw.requests.publish();
                raw.ring().expect("cannot ring the daemon");
                if raw.waiters()[3].load(Ordering::SeqCst) == 1 {
                    return next_id;
                }
                assert!(Instant::now() < deadline, "the daemon did not stall on {} unread replies", next_id - 1);
                // Polls for the daemon to take requests or stall.
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("request ring: {e}"),
        }
    }
}

/// Calls echo on `neighbour` up to [`NEIGHBOUR_CALLS`] times while
/// `stalled_open` holds, checking each reply; returns how many calls
/// completed while it held. The neighbour then goes quiet, so that nothing
/// but the worker's stall timer can wake the worker to close the staller.
fn calls_while(neighbour: &mut Client, mut stalled_open: impl FnMut() -> bool) -> u64 {
    let echo = neighbour.service("echo").unwrap();
    let mut reply = Vec::new();
    for i in 0..NEIGHBOUR_CALLS {
        if !stalled_open() {
            return i;
        }
        let request = pattern(i, 300);
        neighbour.call_into(&echo, &request, &mut reply).unwrap();
        assert!(reply == request, "neighbour call {i}: reply differs");
    }
    NEIGHBOUR_CALLS
}

/// The daemon's fd count once `client` is the only client left.
fn fds_with_one_client(client: &mut Client, pid: u32) -> usize {
    let alone = poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(client), "connected_clients") == 1);
    assert!(alone, "{}", stats_json(client));
    settled_fd_count(pid)
}

#[test]
fn shm_client_that_stops_reading_is_disconnected_after_the_stall_timeout() {
    let (daemon, shm, _) = start();
    let pid = daemon.pid();
    let session = watchdog(TEST_LIMIT, move || {
        let Transport::Shm(socket) = &shm else { unreachable!() };
        let mut neighbour = common::connect(&shm, ClientOptions::default());
        // A raw session opened and closed first, so that whatever the
        // daemon opens lazily for one is in the baseline.
        drop(raw_session(socket, 4096, DoorbellKind::Futex));
        let baseline = fds_with_one_client(&mut neighbour, pid);

        let started = Instant::now();
        let mut staller = raw_session(socket, 4096, DoorbellKind::Futex);
        let sent = fill_until_stalled(&mut staller, 1) - 1;
        // More requests than the response ring holds replies.
        assert!(sent as usize * (HEADER_LEN + PAYLOAD) > 4096, "only {sent} requests went out");

        let during = calls_while(&mut neighbour, || !staller.is_hung_up());
        assert!(during > 0, "the neighbour completed no call while the staller was stalled");
        staller.expect_hang_up(STALL_TIMEOUT + HANG_UP_LIMIT);
        // The stall began after `started`, and lasted the timeout.
        assert!(started.elapsed() >= STALL_TIMEOUT, "disconnected after {:?}", started.elapsed());

        let json = stats_json(&mut neighbour);
        assert_eq!(json_u64(&json, "stalled"), 1, "{json}");
        assert_eq!(json_u64(&json, "protocol_violation"), 0, "{json}");
        assert!(
            fds_back_to(pid, baseline),
            "the daemon holds {} fds, {baseline} before the staller",
            settled_fd_count(pid)
        );
        staller.welcome.session_id
    });
    // The daemon says which session it closed, whose, and after how long.
    let stderr = daemon.stderr();
    let line =
        stderr.lines().find(|l| l.contains("replies unread")).unwrap_or_else(|| panic!("no log line:\n{stderr}"));
    for part in [format!("session={session} "), format!("pid {}", std::process::id()), "stalled_ms=".to_string()] {
        assert!(line.contains(&part), "{part:?} missing from {line:?}");
    }
}

/// Connects to a stream listener by hand and handshakes.
fn raw_stream(path: &Path) -> (UnixStream, Welcome) {
    let mut stream = raw_connect(path);
    stream.write_all(&good_hello()).unwrap();
    // Nothing follows the welcome until a request is sent, so reading it
    // cannot swallow a reply.
    match read_answer(&stream).message() {
        (ServerMessage::Welcome(w), _) => (stream, w),
        (other, _) => panic!("expected a welcome, got {other:?}"),
    }
}

/// Waits up to `limit` for the daemon to close `stream`, without reading
/// from it (reading would make room, and end the stall).
fn hung_up(stream: &UnixStream, limit: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let timeout = rustix::event::Timespec::try_from(limit).unwrap();
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => panic!("poll: {e}"),
    }
    fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP)
}

/// One echo request on the wire.
fn echo_frame(echo: u16, id: u64) -> Vec<u8> {
    frame(echo, 0, id, &pattern(id, PAYLOAD))
}

/// Reads one reply frame and checks it answers request `id`.
fn read_echo_reply(stream: &mut UnixStream, id: u64) {
    let mut raw = [0u8; HEADER_LEN];
    stream.read_exact(&mut raw).unwrap_or_else(|e| panic!("reply {id}: {e}"));
    let header = FrameHeader::decode(&raw);
    assert_eq!((header.request_id, header.flags), (id, 0), "reply {id}");
    let mut body = vec![0u8; header.len as usize];
    stream.read_exact(&mut body).unwrap_or_else(|e| panic!("reply body {id}: {e}"));
    assert!(body == pattern(id, PAYLOAD), "reply {id}: payload differs");
}

#[test]
fn stream_client_that_stops_reading_is_disconnected_after_the_stall_timeout() {
    let (daemon, shm, uds) = start();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let Transport::Uds(path) = &uds else { unreachable!() };
        let mut neighbour = common::connect(&shm, ClientOptions::default());
        let mut stream_neighbour = common::connect(&uds, ClientOptions::default());
        drop(raw_stream(path));
        let alone = poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut neighbour), "connected_clients") == 2);
        assert!(alone, "{}", stats_json(&mut neighbour));
        let baseline = settled_fd_count(pid);

        let started = Instant::now();
        let (mut staller, welcome) = raw_stream(path);
        let echo = service_id(&welcome, "echo");
        // Write until the daemon stops reading: its unsent replies have
        // passed their bound and it waits for us.
        staller.set_write_timeout(Some(NO_PROGRESS)).unwrap();
        let mut id = 1;
        loop {
            match staller.write_all(&echo_frame(echo, id)) {
                Ok(()) => id += 1,
                // Possibly cut off mid-frame: the session is given up on.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                Err(e) => panic!("writing to the daemon failed: {e}"),
            }
        }
        assert!(id > 100, "the daemon stopped reading after {id} requests");

        // Both neighbours share the stalled session's worker.
        let during = calls_while(&mut neighbour, || !hung_up(&staller, Duration::ZERO));
        assert!(during > 0, "the neighbour completed no call while the staller was stalled");
        let during = calls_while(&mut stream_neighbour, || !hung_up(&staller, Duration::ZERO));
        assert!(during > 0, "the stream neighbour completed no call while the staller was stalled");
        assert!(hung_up(&staller, STALL_TIMEOUT + HANG_UP_LIMIT), "the staller is still connected");
        assert!(started.elapsed() >= STALL_TIMEOUT, "disconnected after {:?}", started.elapsed());

        // What was sent before the close can still be read, then the end.
        staller.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
        let mut sink = [0u8; 65536];
        loop {
            match staller.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the stalled stream is still open: {e}"),
            }
        }
        let json = stats_json(&mut neighbour);
        assert_eq!(json_u64(&json, "stalled"), 1, "{json}");
        assert!(
            fds_back_to(pid, baseline),
            "the daemon holds {} fds, {baseline} before the staller",
            settled_fd_count(pid)
        );
    });
}

#[test]
fn shm_client_that_reads_slowly_is_not_disconnected() {
    let (_daemon, shm, _) = start();
    watchdog(TEST_LIMIT, move || {
        let Transport::Shm(socket) = &shm else { unreachable!() };
        let mut raw = raw_session(socket, 4096, DoorbellKind::Futex);
        let mut next_id = 1;
        let mut expected = 1;
        let mut body = Vec::new();
        let started = Instant::now();
        let mut rounds = 0;
        // Stalls, each shorter than the timeout, adding up to more.
        while started.elapsed() < STALL_TIMEOUT + PAUSE {
            next_id = fill_until_stalled(&mut raw, next_id);
            // The slow reading itself, on purpose: the replies stay unread
            // for a while (the daemon stalled on them). Not a wait for the
            // daemon: nothing below depends on what it does meanwhile.
            thread::sleep(PAUSE);
            // Read every reply sent so far, telling the daemon about the
            // room made whenever it waits for some.
            while expected < next_id {
                assert!(!raw.is_hung_up(), "a slow reader was disconnected after {:?}", started.elapsed());
                match raw.responses.try_pop(&mut body).expect("response ring") {
                    Some(h) => {
                        assert_eq!(h.request_id, expected, "replies out of order or lost");
                        assert!(body == pattern(expected, PAYLOAD), "reply {expected}: payload differs");
                        expected += 1;
                    }
                    None => {
                        if raw.responses.release() {
                            raw.ring().expect("cannot ring the daemon");
                        }
                        // Polls for the next reply (the watchdog bounds it).
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            if raw.responses.release() {
                raw.ring().expect("cannot ring the daemon");
            }
            rounds += 1;
        }
        assert!(rounds >= 3, "only {rounds} stalls");
        let echo = raw.service("echo");
        let (h, reply) = raw.call(echo, next_id, b"still here");
        assert_eq!((h.request_id, reply.as_slice()), (next_id, &b"still here"[..]));

        let mut observer = Client::connect_to(socket).unwrap();
        // The counter only grows: one read decides.
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 0, "{json}");
    });
}

#[test]
fn stream_client_that_reads_slowly_is_not_disconnected() {
    const REQUESTS: u64 = 10_000;
    /// Replies read after each pause: about what the socket buffers hold,
    /// so that the daemon stalls again in the next pause.
    const BURST: u64 = 1000;
    let (_daemon, shm, uds) = start();
    watchdog(TEST_LIMIT, move || {
        let Transport::Uds(path) = &uds else { unreachable!() };
        let (mut reader, welcome) = raw_stream(path);
        let echo = service_id(&welcome, "echo");
        // The writer sends everything and blocks whenever the daemon stops
        // reading, which it does only while its replies to us wait.
        let mut writer = reader.try_clone().unwrap();
        writer.set_write_timeout(None).unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let progress = Arc::clone(&written);
        let writer = thread::spawn(move || {
            for id in 1..=REQUESTS {
                writer.write_all(&echo_frame(echo, id)).expect("the slow reader was cut off");
                progress.store(id, Ordering::Relaxed);
            }
        });

        let mut stalls = 0u32;
        let mut id = 1;
        while id <= REQUESTS {
            // Pause without reading, on purpose: the slow reading is the
            // scenario. The daemon stalled on us if the writer made no
            // progress over the end of the pause (this only counts stalls).
            thread::sleep(PAUSE - NO_PROGRESS);
            let before = written.load(Ordering::Relaxed);
            thread::sleep(NO_PROGRESS);
            if written.load(Ordering::Relaxed) == before && before < REQUESTS {
                stalls += 1;
            }
            // Then read a burst.
            for _ in 0..BURST.min(REQUESTS + 1 - id) {
                read_echo_reply(&mut reader, id);
                id += 1;
            }
        }
        join_within(writer, HANG_UP_LIMIT, "the writer");
        assert!(stalls * PAUSE > STALL_TIMEOUT, "only {stalls} stalls, not adding up to the timeout");

        let mut observer = common::connect(&shm, ClientOptions::default());
        // The counter only grows: one read decides.
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 0, "{json}");
    });
}
