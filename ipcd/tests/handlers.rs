//! Handlers that take their time, on an embedded server with one worker:
//! blocking handlers on the handler threads and deferred ones answered
//! through a responder, over every transport. A slow call holds up no one
//! else; every call gets one outcome whatever its handler does with its
//! responder; error codes reach the caller; a session has a bounded number
//! of calls handed off; a graceful stop answers the calls outstanding
//! before it says the session is closed; a client that hangs up with calls
//! outstanding costs nothing once it is gone.
//!
//! The slow handlers block on channels the test releases, so what is
//! asserted while one runs is certain, not timed. The tests run one at a
//! time (they count this process's fds).

mod common;
#[path = "common/embedded.rs"]
mod embedded;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use common::{fd_count, join_within, poll_until, watchdog, CLEANUP_LIMIT, TEST_LIMIT};
use embedded::Embedded;
use ipc_client::{CallError, Received};
use ipcd::{OwnedRequest, Request, Responder, ServiceError, MAX_OUTSTANDING_CALLS};

/// How long a test waits for a handler to be called (a watchdog).
const HANDED_LIMIT: Duration = Duration::from_secs(30);

/// One test at a time: they count this process's fds.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A deferred service's calls, as the test receives them.
type Handed = Receiver<(OwnedRequest, Responder)>;

/// A deferred handler that hands each call, with its responder, to the
/// test.
fn handing() -> (impl Fn(OwnedRequest, Responder) + Send + Sync + 'static, Handed) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let handler = move |request: OwnedRequest, responder: Responder| {
        // A test that stopped listening drops the responder, which answers.
        let _ = tx.lock().unwrap().send((request, responder));
    };
    (handler, rx)
}

/// The next call handed to the test.
fn next_call(handed: &Handed) -> (OwnedRequest, Responder) {
    handed.recv_timeout(HANDED_LIMIT).expect("the deferred handler was not called")
}

/// A blocking handler that says it started (with the request's id), waits
/// until the test releases it, then echoes.
type Gated = (Receiver<u64>, Sender<()>);

fn gated() -> (impl Fn(&Request<'_>) -> Result<Vec<u8>, ServiceError> + Send + Sync + 'static, Gated) {
    let (started_tx, started) = channel();
    let (release, gate) = channel::<()>();
    let (started_tx, gate) = (Mutex::new(started_tx), Mutex::new(gate));
    let handler = move |req: &Request<'_>| {
        started_tx.lock().unwrap().send(req.id()).unwrap();
        // A test that is gone releases it by hanging up.
        let _ = gate.lock().unwrap().recv();
        Ok(req.payload().to_vec())
    };
    (handler, (started, release))
}

fn echo(req: &Request<'_>) -> Result<Vec<u8>, ServiceError> {
    Ok(req.payload().to_vec())
}

/// The measurement, made certain: with one worker, a fast call
/// beside a slow one (200 ms there, here until released) no longer waits
/// for it, on any transport, from another client or the same one.
#[test]
fn a_fast_call_does_not_wait_for_a_slow_blocking_one() {
    let _serial = serial();
    let (slow, (started, release)) = gated();
    let server = Embedded::start(move |b| b.blocking_service("slow", slow).service("fast", echo));
    for transport in server.transports() {
        let name = transport.name();
        let mut slow_client = server.client(&transport);
        let mut fast_client = server.client(&transport);
        let slow = slow_client.service("slow").unwrap();
        let slow_call = thread::spawn(move || (slow_client.call(&slow, b"slow"), slow_client));
        started.recv_timeout(HANDED_LIMIT).expect("the slow handler did not start");
        // The slow handler runs (it waits for the release below), and the
        // one worker serves another client meanwhile.
        let fast = fast_client.service("fast").unwrap();
        let fast_client = watchdog(TEST_LIMIT, move || {
            for i in 0..100u32 {
                assert_eq!(fast_client.call(&fast, &i.to_le_bytes()).unwrap(), i.to_le_bytes(), "{name}");
            }
            fast_client
        });
        assert!(!slow_call.is_finished(), "{name}: the slow call ended before it was released");

        // On the slow call's own session, a fast call sent after it is
        // answered first.
        let mut same = fast_client;
        let (slow_svc, fast) = (same.service("slow").unwrap(), same.service("fast").unwrap());
        let slow_ticket = same.send(&slow_svc, b"slow too").unwrap();
        let fast_ticket = same.send(&fast, b"quick").unwrap();
        let (first, same) = watchdog(TEST_LIMIT, move || (same.recv(), same));
        let Received { ticket, outcome: reply } = first.unwrap();
        assert_eq!((ticket, reply), (fast_ticket, Ok(b"quick".to_vec())), "{name}");
        let mut same = same;
        assert_eq!(started.recv_timeout(HANDED_LIMIT).unwrap(), slow_ticket.id());

        release.send(()).unwrap();
        release.send(()).unwrap();
        let (result, _slow_client) = join_within(slow_call, TEST_LIMIT, "the slow call");
        assert_eq!(result.unwrap(), b"slow", "{name}");
        let reply = watchdog(TEST_LIMIT, move || same.wait(slow_ticket));
        assert_eq!(reply.unwrap(), b"slow too", "{name}");
    }
}

#[test]
fn error_codes_reach_the_caller_from_every_kind_of_handler() {
    let _serial = serial();
    let (deferred, handed) = handing();
    let server = Embedded::start(move |b| {
        b.service("inline", |_| Err(ServiceError::with_code(404, "no such key")))
            .service("plain", |_| Err(ServiceError::new("no code")))
            .blocking_service("blocking", |_| Err(ServiceError::with_code(u32::MAX, "blocked")))
            .deferred_service("deferred", deferred)
    });
    let answerer = thread::spawn(move || {
        for (request, responder) in handed {
            let code = u32::from_le_bytes(request.payload().try_into().unwrap());
            responder.fail(ServiceError::with_code(code, format!("deferred {code}")));
        }
    });
    for transport in server.transports() {
        let name = transport.name();
        let mut client = server.client(&transport);
        let expect = [
            ("inline", Some(404), "no such key"),
            ("plain", None, "no code"),
            ("blocking", Some(u32::MAX), "blocked"),
            ("deferred", Some(0), "deferred 0"),
            ("deferred", Some(7), "deferred 7"),
        ];
        for (service, code, message) in expect {
            let svc = client.service(service).unwrap();
            let got = client.call(&svc, &code.unwrap_or(0).to_le_bytes());
            assert_eq!(got, Err(CallError::Remote { code, message: message.into() }), "{name} {service}");
        }
    }
    drop(server);
    join_within(answerer, TEST_LIMIT, "the answering thread");
}

#[test]
fn every_handed_off_call_gets_one_outcome_whatever_becomes_of_its_responder() {
    let _serial = serial();
    let (deferred, handed) = handing();
    let server = Embedded::start(move |b| {
        b.deferred_service("deferred", deferred)
            .deferred_service("drops", |_, responder| drop(responder))
            .deferred_service("panics", |_, _| panic!("a deferred handler bug"))
            .blocking_service("blocking-panics", |_| -> Result<Vec<u8>, ServiceError> { panic!("a blocking bug") })
            .blocking_service("too-large", |_| Ok(vec![0; 1 << 20]))
            // Below the too-large reply, which is then refused (one within it
            // but longer than a frame would go in chunks).
            .max_message(512 << 10)
    });
    for transport in server.transports() {
        let name = transport.name();
        let mut client = server.client(&transport);
        for (service, says) in [
            ("drops", "dropped its responder"),
            ("panics", "panicked"),
            ("blocking-panics", "panicked"),
            ("too-large", "exceeds the largest message"),
        ] {
            let svc = client.service(service).unwrap();
            match client.call(&svc, b"x") {
                Err(CallError::Remote { code: None, message }) => {
                    assert!(message.contains(says), "{name} {service}: {message}")
                }
                other => panic!("{name} {service}: expected a remote error, got {:?}", other.map(|r| r.len())),
            }
        }
        // A responder answered from another thread, and one dropped on
        // another thread: each call gets its one outcome, and nothing more
        // comes (a second reply would break the client's connection).
        let svc = client.service("deferred").unwrap();
        let answered = client.send(&svc, b"answer me").unwrap();
        let dropped = client.send(&svc, b"drop me").unwrap();
        client.flush().unwrap();
        let calls = [next_call(&handed), next_call(&handed)];
        let answering = thread::spawn(move || {
            for (request, responder) in calls {
                if request.payload() == b"answer me" {
                    responder.reply(request.into_payload());
                }
            }
        });
        join_within(answering, TEST_LIMIT, "the answering thread");
        assert_eq!(client.wait(answered).unwrap(), b"answer me", "{name}");
        match client.wait(dropped) {
            Err(CallError::Remote { code: None, message }) => assert!(message.contains("dropped"), "{name}: {message}"),
            other => panic!("{name}: expected a remote error, got {other:?}"),
        }
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"still here").unwrap(), b"still here", "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
        assert!(client.is_connected(), "{name}");
    }
}

#[test]
fn replies_come_in_the_order_their_answers_do() {
    let _serial = serial();
    let (deferred, handed) = handing();
    let server = Embedded::start(move |b| b.deferred_service("deferred", deferred));
    for transport in server.transports() {
        let name = transport.name();
        let mut client = server.client(&transport);
        let svc = client.service("deferred").unwrap();
        let tickets: Vec<_> = (0..3u8).map(|i| client.send(&svc, &[i]).unwrap()).collect();
        client.flush().unwrap();
        let mut calls: Vec<_> = (0..3).map(|_| next_call(&handed)).collect();
        let ids: Vec<u64> = calls.iter().map(|(r, _)| r.id()).collect();
        assert_eq!(ids, tickets.iter().map(|t| t.id()).collect::<Vec<_>>(), "{name}");
        // Answered last first, then first, then the middle one; each reply
        // is received as its answer comes (the client's call timeout is
        // the watchdog).
        for (i, ticket) in [(2, tickets[2]), (0, tickets[0]), (0, tickets[1])] {
            let (request, responder) = calls.remove(i);
            responder.reply(request.into_payload());
            let Received { ticket: got, outcome: reply } = client.recv().unwrap();
            assert_eq!(got, ticket, "{name}");
            assert_eq!(reply.unwrap(), [tickets.iter().position(|t| *t == ticket).unwrap() as u8], "{name}");
        }
    }
}

/// A session with as many calls handed off as it may takes no more until
/// one is answered, and then one more; all of them complete.
///
/// Certain, not timed: once the cap's worth of calls has come to the
/// handler, a round trip of another session through the same worker
/// proves the worker has served the capped session again (it was ahead
/// in the worker's queue), so without the cap every call would have come
/// by then.
#[test]
fn a_session_at_the_cap_takes_one_call_per_answer() {
    let _serial = serial();
    let (deferred, handed) = handing();
    let server = Embedded::start(move |b| b.deferred_service("deferred", deferred));
    let total = MAX_OUTSTANDING_CALLS + 20;
    for transport in server.transports() {
        let name = transport.name();
        let mut client = server.client(&transport);
        let mut other = server.client(&transport);
        let svc = client.service("deferred").unwrap();
        let tickets: Vec<_> = (0..total).map(|i| client.send(&svc, &(i as u32).to_le_bytes()).unwrap()).collect();
        client.flush().unwrap();
        let mut held: std::collections::VecDeque<_> = (0..MAX_OUTSTANDING_CALLS).map(|_| next_call(&handed)).collect();
        let other_echo = other.service("echo").unwrap();
        let mut took_one_more = || {
            assert_eq!(other.call(&other_echo, b"round trip").unwrap(), b"round trip", "{name}");
            handed.try_recv().ok()
        };
        assert!(took_one_more().is_none(), "{name}: a call past the cap came to the handler");
        for next in &tickets[MAX_OUTSTANDING_CALLS..] {
            let (request, responder) = held.pop_front().unwrap();
            responder.reply(request.into_payload());
            let (request, responder) = next_call(&handed);
            assert_eq!(request.id(), next.id(), "{name}");
            held.push_back((request, responder));
            assert!(took_one_more().is_none(), "{name}: one answer let two calls in");
        }
        for (request, responder) in held {
            responder.reply(request.into_payload());
        }
        for (i, ticket) in tickets.into_iter().enumerate() {
            assert_eq!(client.wait(ticket).unwrap(), (i as u32).to_le_bytes(), "{name}");
        }
    }
}

/// The message of the answer to a call still running when the stop gave
/// up on it.
const UNFINISHED: &str = "stopped before the handler finished";

/// A graceful stop with calls outstanding: one answered as the stop
/// begins gets its reply, one whose responder is held past the stop, and
/// one whose blocking handler still runs, get an error reply saying the
/// outcome is unknown; every one of them before the session says it is
/// closed, after which a call is `Shutdown` (not executed).
#[test]
fn a_stop_answers_the_calls_outstanding_before_it_says_the_session_closed() {
    let _serial = serial();
    let transports: Vec<_> = Embedded::start(|b| b).transports().into_iter().map(|t| t.name()).collect();
    for name in transports {
        let (deferred, handed) = handing();
        let (slow, (started, release)) = gated();
        let mut server =
            Embedded::start(move |b| b.deferred_service("deferred", deferred).blocking_service("slow", slow));
        let transport = server.transports().into_iter().find(|t| t.name() == name).unwrap();
        let mut client = server.client(&transport);
        let (svc, slow) = (client.service("deferred").unwrap(), client.service("slow").unwrap());
        let answered = client.send(&svc, b"in time").unwrap();
        let held = client.send(&svc, b"held").unwrap();
        let running = client.send(&slow, b"running").unwrap();
        client.flush().unwrap();
        let calls = [next_call(&handed), next_call(&handed)];
        assert_eq!(started.recv_timeout(HANDED_LIMIT).unwrap(), running.id());

        server.begin_stop();
        let [(request, responder), (_held_request, held_responder)] = calls;
        responder.reply(request.into_payload());
        assert_eq!(client.wait(answered).unwrap(), b"in time", "{name}");
        // The drain waits for the other two, then answers them.
        for ticket in [held, running] {
            match client.wait(ticket) {
                Err(CallError::Remote { code: None, message }) => {
                    assert!(message.contains(UNFINISHED), "{name}: {message}")
                }
                other => panic!("{name}: the call outstanding at the stop ended {other:?}"),
            }
        }
        // Answered, and marked closed, while the blocking handler still
        // runs: the stop then waits for the handler threads.
        assert!(!server.has_stopped(), "{name}: the stop did not wait for the handler it gave up on");
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"after"), Err(CallError::Shutdown), "{name}");
        release.send(()).unwrap();
        server.stop().unwrap();
        // Too late: the session is gone, and so is the server.
        held_responder.reply(b"late".to_vec());
    }
}

/// A client that hangs up with calls outstanding: its session closes at
/// once (its fds are back before any call is answered), the late answers
/// are dropped (even where a new session has taken its place, with calls
/// of the same ids), and the server goes on.
#[test]
fn a_client_that_hangs_up_with_calls_outstanding_costs_nothing_once_gone() {
    let _serial = serial();
    let (deferred, handed) = handing();
    let (slow, (started, release)) = gated();
    // No segment pool: its refills open fds of their own at any moment,
    // and this test counts the process's fds exactly.
    let server = Embedded::start(move |b| {
        b.segment_pool(0).deferred_service("deferred", deferred).blocking_service("slow", slow)
    });
    let pid = std::process::id();
    for transport in server.transports() {
        let name = transport.name();
        let mut probe = server.client(&transport);
        let echo = probe.service("echo").unwrap();
        assert_eq!(probe.call(&echo, b"up").unwrap(), b"up");
        let baseline = fd_count(pid);

        let mut client = server.client(&transport);
        let (svc, slow) = (client.service("deferred").unwrap(), client.service("slow").unwrap());
        for i in 0..3u8 {
            let _ = client.send(&svc, &[i]).unwrap();
        }
        let _ = client.send(&slow, b"slow").unwrap();
        client.flush().unwrap();
        let calls: Vec<_> = (0..3).map(|_| next_call(&handed)).collect();
        started.recv_timeout(HANDED_LIMIT).expect("the slow handler did not start");
        drop(client);
        let back = poll_until(CLEANUP_LIMIT, || fd_count(pid) == baseline);
        assert!(back, "{name}: {} fds open, {baseline} before the client came", fd_count(pid));

        // A new session takes the closed one's place in the worker, and
        // its calls the same ids. The old answers, coming now, reach no
        // one: not the session in that place, not the calls of those ids.
        let mut next = server.client(&transport);
        let svc = next.service("deferred").unwrap();
        let tickets: Vec<_> = (10..13u8).map(|i| next.send(&svc, &[i]).unwrap()).collect();
        next.flush().unwrap();
        let new_calls: Vec<_> = (0..3).map(|_| next_call(&handed)).collect();
        for ((old, _), (new, _)) in calls.iter().zip(&new_calls) {
            assert_eq!(old.id(), new.id(), "{name}: the ids are the same");
        }
        for (request, responder) in calls {
            responder.reply(request.into_payload());
        }
        release.send(()).unwrap();
        for (request, responder) in new_calls {
            responder.reply(request.into_payload());
        }
        for (ticket, i) in tickets.into_iter().zip(10..13u8) {
            assert_eq!(next.wait(ticket).unwrap(), [i], "{name}: an old answer reached the new session");
        }
        for i in 0..10u8 {
            assert_eq!(probe.call(&echo, &[i]).unwrap(), [i], "{name}");
        }
    }
}
