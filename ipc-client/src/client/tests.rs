//! The client's own tests, with no daemon: connecting to listeners that
//! misbehave, and a daemon played by the test itself (a scripted peer that
//! makes the segment and doorbells, then writes into the rings exactly
//! what a case needs, at exactly the moment it needs it), to pin down
//! which outcome each request gets when the connection fails around it.

use std::io::{self, Read};

use ipc_core::{encode_error, FLAG_ERROR};

use super::*;
use crate::scripted::{reply_to, within_limit, PeerBell as DaemonBell, PeerSide, Scripted};
use crate::ConnectError;

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
            Ok(Received { ticket, outcome }) => got.push((ticket.id(), outcome)),
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
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d: PeerSide| {
        d.await_client_asleep();
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
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d: PeerSide| {
        d.await_client_asleep();
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
    let daemon = Scripted::start(DaemonBell::EventFd, |mut d: PeerSide| {
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
    Scripted::start(DaemonBell::Broken, move |mut d: PeerSide| {
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
    assert_eq!(
        (first, second),
        (Ok(Received { ticket, outcome: Ok(b"one".to_vec()) }), Err(CallError::NothingInFlight))
    );
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
    let echo = client.service("echo").unwrap();
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

/// A daemon that dies as a reconnecting client's hello arrives closes the
/// connection without an answer: that attempt is tried again (within the
/// request's timeout), not taken for a broken protocol.
#[test]
fn a_reconnect_closed_during_its_handshake_is_tried_again() {
    use crate::scripted::{answer_session, options, Rig};
    let rig = Rig::new();
    let policy = crate::Reconnect::new(Duration::from_millis(1), Duration::from_millis(1));
    let (mut client, daemon) = rig.connect(options().reconnect(policy));
    let echo = client.service("echo").unwrap();
    drop(daemon);
    assert!(matches!(client.call(&echo, b"lost"), Err(CallError::Disconnected { .. })));
    let daemon = std::thread::scope(|s| {
        let daemon = s.spawn(|| {
            // The first attempt meets a daemon that goes away mid-handshake:
            // it takes the hello, then closes without an answer.
            let mut dying = rig.accept();
            crate::scripted::read_hello(&mut dying);
            drop(dying);
            answer_session(rig.accept(), options().doorbell, DaemonBell::EventFd)
        });
        let sent = client.send(&echo, b"again");
        assert!(sent.is_ok(), "the request after a closed handshake: {sent:?}");
        daemon.join().unwrap()
    });
    drop(daemon);
}
