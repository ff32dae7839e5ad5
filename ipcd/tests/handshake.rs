//! The control-socket handshake against the real daemon: version and
//! capacity rejects, the handshake deadline, and connections that send
//! garbage. None of them may disturb a well-behaved client.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;

use common::{
    exchange, good_hello, json_u64, poll_until, raw_connect, read_answer, stat_eventually, unread_by_peer, watchdog,
    Answer, Daemon, CLEANUP_LIMIT, HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::{Client, ConnectError, Reject};
use ipc_core::handshake::{self, HELLO_MAGIC};
use ipc_core::{DoorbellKind, Hello, ServerMessage, PROTOCOL_VERSION};

#[test]
fn wrong_protocol_version_is_rejected_naming_both_versions() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut hello = Hello::new(65536, DoorbellKind::Futex);
        hello.version = 99;
        let (msg, fds) = exchange(&socket, &handshake::encode(&hello).unwrap()).message();
        assert!(fds.is_empty(), "a reject carries no fds");
        let reject = match msg {
            ServerMessage::Reject(r) => r,
            other => panic!("expected a reject, got {other:?}"),
        };
        assert_eq!(reject, Reject::VersionMismatch { daemon: PROTOCOL_VERSION, client: 99 });
        let text = reject.to_string();
        assert!(
            text.contains(&format!("daemon speaks {PROTOCOL_VERSION}")) && text.contains("client speaks 99"),
            "{text}"
        );
        let mut client = Client::connect_to(&socket).unwrap();
        let (rejected, json) = stat_eventually(&mut client, "version_mismatch", |n| n == 1);
        assert_eq!(rejected, 1, "{json}");
    });
}

#[test]
fn client_beyond_max_clients_is_rejected_until_one_leaves() {
    let daemon = Daemon::start(&["--max-clients", "2"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let first = Client::connect_to(&socket).unwrap();
        let mut second = Client::connect_to(&socket).unwrap();
        match Client::connect_to(&socket) {
            Err(ConnectError::Rejected(reject)) => {
                assert_eq!(reject, Reject::TooManyClients { max: 2 });
                assert!(reject.to_string().contains('2'), "{reject}");
            }
            other => panic!("third client: expected a reject, got {other:?}"),
        }
        // Being full does not disturb the clients already served.
        let echo = second.service("echo").unwrap();
        assert_eq!(second.call(&echo, b"full").unwrap(), b"full");

        drop(first);
        // The worker notices the hang-up asynchronously, so the slot frees
        // a little later; until then a reject is the right answer.
        let mut last = None;
        let admitted = poll_until(CLEANUP_LIMIT, || match Client::connect_to(&socket) {
            Ok(c) => {
                last = Some(Ok(c));
                true
            }
            Err(ConnectError::Rejected(Reject::TooManyClients { max: 2 })) => false,
            Err(e) => {
                last = Some(Err(e));
                true
            }
        });
        assert!(admitted, "no slot freed within {CLEANUP_LIMIT:?}");
        let mut third = match last.unwrap() {
            Ok(c) => c,
            Err(e) => panic!("third client after a slot freed: {e}"),
        };
        let echo = third.service("echo").unwrap();
        assert_eq!(third.call(&echo, b"admitted").unwrap(), b"admitted");
        let (rejected, json) = stat_eventually(&mut third, "too_many_clients", |n| n >= 1);
        assert!(rejected >= 1, "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 2, "{json}");
    });
}

#[test]
fn silent_connection_is_closed_after_the_handshake_timeout() {
    let daemon = Daemon::start(&["--handshake-timeout", "300ms"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut silent = raw_connect(&socket);

        // The silent connection must not hold up anyone else. A normal
        // client sends its hello at once, but on a loaded machine the
        // client thread can be descheduled past the short deadline too, so
        // that alone is retried.
        let mut client = None;
        for _ in 0..5 {
            match Client::connect_to(&socket) {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(ConnectError::Closed) => {}
                Err(e) => panic!("normal client during a silent handshake: {e}"),
            }
        }
        let mut client = client.expect("a normal client connects");
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"meanwhile").unwrap(), b"meanwhile");

        silent.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
        let mut byte = [0u8; 1];
        match silent.read(&mut byte) {
            Ok(0) => {}
            Ok(n) => panic!("the daemon sent {n} bytes to a silent connection"),
            Err(e) => panic!("silent connection still open after {HANG_UP_LIMIT:?}: {e}"),
        }

        let (timed_out, json) = stat_eventually(&mut client, "handshake_timeout", |n| n >= 1);
        assert!(timed_out >= 1, "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 1, "{json}");
    });
}

/// Asserts that `answer` is a bad-hello reject, or (when `may_close`) that
/// the connection was closed without one. Returns whether it was a reject.
fn assert_bad_hello(what: &str, answer: Answer, may_close: bool) -> bool {
    match answer {
        Answer::Message(ServerMessage::Reject(Reject::BadHello { reason }), fds) => {
            assert!(fds.is_empty(), "{what}: a reject carries no fds");
            assert!(!reason.is_empty(), "{what}: the reject says why");
            true
        }
        Answer::Closed if may_close => false,
        other => panic!("{what}: expected a bad-hello reject, got {other:?}"),
    }
}

#[test]
fn garbage_on_the_control_socket_is_rejected_without_harm() {
    let mut daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    let rejects = watchdog(TEST_LIMIT, move || {
        let mut rejects = 0;
        let mut probe = |what: &str, bytes: &[u8], may_close: bool| {
            if assert_bad_hello(what, exchange(&socket, bytes), may_close) {
                rejects += 1;
            }
        };

        // "GET " read as a length is half a gigabyte.
        probe("http request", b"GET / HTTP/1.1\r\n\r\n", true);
        probe("length u32::MAX", &u32::MAX.to_le_bytes(), true);
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0xEE; 100]);
        probe("length u32::MAX with a body", &huge, true);

        // Well-framed bodies are read in full and then refused.
        probe("empty body", &0u32.to_le_bytes(), false);
        let mut bad_magic = good_hello();
        bad_magic[4..8].copy_from_slice(b"XXXX");
        probe("bad magic", &bad_magic, false);
        let mut bad_kind = good_hello();
        let last = bad_kind.len() - 1;
        bad_kind[last] = 9;
        probe("unknown doorbell kind", &bad_kind, false);
        let mut trailing = good_hello();
        let len = u32::from_le_bytes(trailing[..4].try_into().unwrap()) + 1;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        trailing.push(0);
        probe("trailing byte inside the body", &trailing, false);
        let mut after = good_hello();
        after.extend_from_slice(b"extra");
        probe("bytes after the hello", &after, false);

        // A flood: the daemon stops reading after a bounded amount and
        // closes, so our writes may fail; only the daemon's survival counts.
        {
            let mut stream = raw_connect(&socket);
            let mut flood = HELLO_MAGIC.to_le_bytes().to_vec();
            flood.resize(1 << 20, 0x41);
            let _ = stream.write_all(&flood);
            let _ = read_answer_lenient(&stream);
        }

        // A hello cut short, then a hang-up.
        {
            let mut stream = raw_connect(&socket);
            stream.write_all(&good_hello()[..10]).unwrap();
            stream.shutdown(Shutdown::Both).unwrap();
        }
        // A connection that hangs up before saying anything.
        drop(raw_connect(&socket));

        // A hello cut short, followed by the rest later, still counts: the
        // daemon reassembles it (within the deadline). The rest is written
        // only once the daemon has read the first part (nothing we sent is
        // left unread), so the two cannot arrive as one read.
        {
            let mut stream = raw_connect(&socket);
            let hello = good_hello();
            stream.write_all(&hello[..3]).unwrap();
            let read = poll_until(HANG_UP_LIMIT, || unread_by_peer(&stream) == 0);
            assert!(read, "the daemon did not read the first 3 bytes of a hello");
            stream.write_all(&hello[3..]).unwrap();
            match read_answer(&stream) {
                Answer::Message(ServerMessage::Welcome(w), fds) => {
                    assert_eq!(fds.len(), w.fd_count());
                }
                other => panic!("hello in two pieces: expected a welcome, got {other:?}"),
            }
        }

        let mut client = Client::connect_to(&socket).unwrap();
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"alive").unwrap(), b"alive");
        let (bad, json) = stat_eventually(&mut client, "bad_hello", |n| n >= rejects);
        assert!(bad >= rejects, "{json}");
        let (hung_up, json) = stat_eventually(&mut client, "hung_up", |n| n >= 2);
        assert!(hung_up >= 2, "{json}");
        rejects
    });
    assert!(rejects >= 5, "only {rejects} probes were answered with a reject");
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}

/// Reads whatever the daemon answers to a flood, tolerating a reset.
fn read_answer_lenient(stream: &std::os::unix::net::UnixStream) -> Option<ServerMessage> {
    let mut buf = Vec::new();
    let mut s = stream;
    let _ = s.read_to_end(&mut buf);
    if buf.len() < 4 {
        return None;
    }
    handshake::decode_server_message(&buf[4..]).ok()
}

#[test]
fn requested_ring_capacity_is_rounded_and_clamped() {
    let daemon = Daemon::start(&["--max-ring-size", "65536"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        // (asked, granted): up to a power of two, at least 4 KiB, at most
        // the daemon's maximum.
        for (asked, granted) in [(0u32, 4096u32), (5000, 8192), (65536, 65536), (1 << 20, 65536), (u32::MAX, 65536)] {
            let options = ipc_client::ClientOptions::default().ring_capacity(asked);
            let mut client = Client::connect_with(&socket, options).unwrap();
            assert_eq!(client.max_payload(), granted as usize / 2 - 16, "asked for {asked}");
            let echo = client.service("echo").unwrap();
            let biggest = common::pattern(u64::from(asked), client.max_payload());
            assert!(client.call(&echo, &biggest).unwrap() == biggest, "asked for {asked}: reply differs");
        }
    });
}
