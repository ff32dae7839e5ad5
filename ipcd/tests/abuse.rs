//! Abuse of the listeners before a handshake completes: hellos that carry
//! file descriptors, hellos cut short and then left silent, and hundreds of
//! connections that never finish their hello while normal clients come and
//! go. Each costs the daemon nothing it does not give back: the fds never
//! enter it, the stalled connections are closed at the handshake timeout,
//! its fd count returns to where it was, and normal clients are served
//! throughout.

mod common;

use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    exchange, fds_back_to, good_hello, json_u64, raw_connect, read_answer, settled_fd_count, start_with_uds,
    stat_eventually, stats_json, watchdog, Answer, Daemon, TEST_LIMIT,
};
use ipc_client::{Client, ClientOptions, Reject, Transport};
use ipc_core::handshake;
use ipc_core::ServerMessage;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// The name of the memfd the tests try to smuggle into the daemon.
const SMUGGLED: &str = "ipcd-test-smuggled";
/// Fds attached to one message: near the kernel's limit of 253.
const FDS_PER_MESSAGE: usize = 250;

/// Sends `bytes` with `fds` attached, all in one message.
fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)), "the fds fit the control buffer");
    let sent = rustix::net::sendmsg(stream, &[std::io::IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)
        .expect("cannot send the fds");
    assert_eq!(sent, bytes.len());
}

/// How many of `pid`'s open fds are a memfd called [`SMUGGLED`].
fn smuggled_in(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("cannot list /proc/<pid>/fd")
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(SMUGGLED)))
        .count()
}

/// Starts a daemon with `args` that also serves `--uds`; returns it and
/// both Unix listeners' paths, the control socket first.
fn start_with_both(args: &[&str]) -> (Daemon, [std::path::PathBuf; 2]) {
    let (daemon, uds) = start_with_uds(args);
    let shm = daemon.socket().to_path_buf();
    (daemon, [shm, uds])
}

/// Asserts that `answer` refuses a hello for the fds it carried (or, when
/// `may_close`, that the connection was closed without an answer).
fn assert_fds_refused(what: &str, answer: Answer, may_close: bool) {
    match answer {
        Answer::Message(ServerMessage::Reject(Reject::BadHello { reason }), fds) => {
            assert!(fds.is_empty(), "{what}: a reject carries no fds");
            assert!(reason.contains("file descriptors"), "{what}: {reason}");
        }
        Answer::Closed if may_close => {}
        other => panic!("{what}: expected the hello refused for its fds, got {other:?}"),
    }
}

#[test]
fn hellos_carrying_fds_are_refused_and_the_fds_never_enter_the_daemon() {
    let (mut daemon, sockets) = start_with_both(&[]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let mut neighbour = Client::connect_to(&sockets[0]).unwrap();
        let echo = neighbour.service("echo").unwrap();
        assert_eq!(neighbour.call(&echo, b"before").unwrap(), b"before");
        let baseline = settled_fd_count(pid);

        let memfd: OwnedFd = ipc_platform::create_sealed(SMUGGLED, 4096).unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..FDS_PER_MESSAGE).map(|_| memfd.as_fd()).collect();
        let mut refused = 0;
        for socket in &sockets {
            for round in 0..20 {
                // A valid hello with fds attached.
                let stream = raw_connect(socket);
                send_with_fds(&stream, &good_hello(), &fds);
                assert_fds_refused("valid hello with fds", read_answer(&stream), false);
                refused += 1;

                // The fds on the second half of a hello that began without.
                let mut stream = raw_connect(socket);
                let hello = good_hello();
                stream.write_all(&hello[..6]).unwrap();
                send_with_fds(&stream, &hello[6..], &fds[..4]);
                assert_fds_refused("fds on the hello's second half", read_answer(&stream), false);
                refused += 1;

                // Garbage with fds: refused for the fds or for the garbage.
                let stream = raw_connect(socket);
                send_with_fds(&stream, b"GET / HTTP/1.1\r\n\r\n", &fds);
                match read_answer(&stream) {
                    Answer::Message(ServerMessage::Reject(Reject::BadHello { .. }), got) => {
                        assert!(got.is_empty(), "a reject carries no fds");
                        refused += 1;
                    }
                    Answer::Closed => {}
                    other => panic!("garbage with fds: expected a reject or a close, got {other:?}"),
                }

                // Fds with a single byte, then a hang-up: nothing to answer.
                let stream = raw_connect(socket);
                send_with_fds(&stream, &[0x49], &fds);
                drop(stream);

                assert_eq!(
                    smuggled_in(pid),
                    0,
                    "round {round} on {}: a smuggled fd is open in the daemon",
                    socket.display()
                );
            }
        }
        drop(memfd);

        // The neighbour was served throughout, and nothing stayed behind.
        let mut reply = Vec::new();
        for i in 0..100u64 {
            let request = common::pattern(i, 200);
            neighbour.call_into(&echo, &request, &mut reply).unwrap();
            assert!(reply == request, "neighbour call {i}: reply differs");
        }
        let back = fds_back_to(pid, baseline);
        assert!(back, "the daemon holds {} fds, {baseline} before the probes", settled_fd_count(pid));
        assert_eq!(smuggled_in(pid), 0);
        let (bad, json) = stat_eventually(&mut neighbour, "bad_hello", |n| n >= refused);
        assert!(bad >= refused, "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 1, "{json}");
    });
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}

/// Connects to `socket` and sends `prefix` of a hello, then nothing.
fn stall_handshake(socket: &Path, prefix: &[u8]) -> UnixStream {
    let mut stream = raw_connect(socket);
    stream.write_all(prefix).unwrap();
    stream
}

/// What a stalled connection sends, chosen by `i`: nothing, part of the
/// length prefix, the prefix alone, or half the body.
fn stalled_prefix(i: usize) -> Vec<u8> {
    let hello = good_hello();
    let len = match i % 4 {
        0 => 0,
        1 => 2,
        2 => handshake::LENGTH_PREFIX,
        _ => handshake::LENGTH_PREFIX + (hello.len() - handshake::LENGTH_PREFIX) / 2,
    };
    hello[..len].to_vec()
}

/// Waits for the daemon to close `stream`, and returns whether it sent
/// nothing before closing.
fn closed_silently(stream: &UnixStream) -> bool {
    matches!(read_answer(stream), Answer::Closed)
}

#[test]
fn truncated_hellos_then_silence_are_closed_at_the_handshake_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let daemon = Daemon::start(&["--handshake-timeout", "500ms"]);
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let mut neighbour = Client::connect_to(&socket).unwrap();
        let baseline = settled_fd_count(pid);
        let started = Instant::now();
        let stalled: Vec<UnixStream> = (0..4).map(|i| stall_handshake(&socket, &stalled_prefix(i))).collect();
        for (i, stream) in stalled.iter().enumerate() {
            assert!(closed_silently(stream), "stalled connection {i} got an answer");
            // The deadline counts from the accept, after our connect.
            assert!(started.elapsed() >= TIMEOUT, "connection {i} closed after {:?}", started.elapsed());
        }
        let (timed_out, json) = stat_eventually(&mut neighbour, "handshake_timeout", |n| n >= 4);
        assert!(timed_out >= 4, "{json}");
        let echo = neighbour.service("echo").unwrap();
        assert_eq!(neighbour.call(&echo, b"after").unwrap(), b"after");
        drop(stalled);
        assert!(fds_back_to(pid, baseline), "fds left behind");
    });
}

#[test]
fn hundreds_of_unfinished_handshakes_do_not_keep_normal_clients_out() {
    const STALLED: usize = 500;
    const NORMAL: usize = 30;
    const TIMEOUT: Duration = Duration::from_secs(3);
    // Ours: the stalled connections, the normal clients, and the test's own.
    ipc_platform::raise_nofile_limit().expect("cannot raise the open-files limit");
    let (daemon, sockets) = start_with_both(&["--handshake-timeout", "3s"]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let mut observer = Client::connect_to(&sockets[0]).unwrap();
        let baseline = settled_fd_count(pid);

        let started = Instant::now();
        let stalled: Vec<UnixStream> =
            (0..STALLED).map(|i| stall_handshake(&sockets[i % 2], &stalled_prefix(i))).collect();
        // Normal clients on both listeners, one after another, each with a
        // call, while the stalled handshakes hold their places.
        for i in 0..NORMAL {
            let transport =
                if i % 2 == 0 { Transport::Shm(sockets[0].clone()) } else { Transport::Uds(sockets[1].clone()) };
            let mut client = Client::connect_with(transport, ClientOptions::default())
                .unwrap_or_else(|e| panic!("normal client {i} beside {STALLED} stalled handshakes: {e}"));
            let echo = client.service("echo").unwrap();
            let request = common::pattern(i as u64, 100);
            assert_eq!(client.call(&echo, &request).unwrap(), request, "normal client {i}");
        }
        let json = stats_json(&mut observer);
        if started.elapsed() < TIMEOUT {
            // Not even the first stalled handshake has reached its deadline
            // yet, so none may have been closed: the normal clients really
            // came while all of them waited.
            assert_eq!(json_u64(&json, "handshake_timeout"), 0, "{json}");
        }
        assert_eq!(json_u64(&json, "accepted"), NORMAL as u64 + 1, "{json}");

        for (i, stream) in stalled.iter().enumerate() {
            assert!(closed_silently(stream), "stalled connection {i} got an answer");
        }
        assert!(started.elapsed() >= TIMEOUT, "closed after {:?}, before the timeout", started.elapsed());
        let (timed_out, json) = stat_eventually(&mut observer, "handshake_timeout", |n| n >= STALLED as u64);
        assert!(timed_out >= STALLED as u64, "{json}");
        drop(stalled);
        assert!(fds_back_to(pid, baseline), "the daemon holds {} fds, {baseline} before", settled_fd_count(pid));
        // A hello still gets its welcome after all that.
        match exchange(&sockets[0], &good_hello()) {
            Answer::Message(ServerMessage::Welcome(w), fds) => assert_eq!(fds.len(), w.fd_count()),
            other => panic!("a hello after the stalled handshakes: expected a welcome, got {other:?}"),
        }
    });
}
