//! Brokered services against a broker and providers played by the test
//! (`crate::scripted`): resolving and calling, several links at once,
//! providers that go away, a broker connection that is lost, and answers
//! that break the protocol.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::thread;
use std::time::Duration;

use ipc_core::control::{Resolve, ResolveError, Role};
use ipc_core::{DoorbellKind, FrameHeader, ServerMessage};

use crate::scripted::*;
use crate::{CallError, Client, Received, Reconnect, Service, Ticket, Transport};

/// Resolves the first provided name of a client: the broker connection is
/// opened then. Returns the service, the broker's side, the resolve it
/// read, and the provider's side of the session it granted.
fn first_resolve(
    rig: &Rig,
    client: &mut Client,
    name: &str,
    services: &[(&str, u16)],
) -> (Service, BrokerSide, Resolve, PeerSide) {
    thread::scope(|s| {
        let broker = s.spawn(|| {
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            let provider = broker.grant(&resolve, services);
            (broker, resolve, provider)
        });
        let service = client.service(name);
        let (broker, resolve, provider) = broker.join().unwrap();
        (service.unwrap(), broker, resolve, provider)
    })
}

/// Resolves another provided name over the open broker connection.
fn resolve(client: &mut Client, broker: &mut BrokerSide, name: &str, services: &[(&str, u16)]) -> (Service, PeerSide) {
    thread::scope(|s| {
        let provider = s.spawn(|| {
            let resolve = broker.resolve();
            assert_eq!(resolve.name, name);
            broker.grant(&resolve, services)
        });
        let service = client.service(name);
        (service.unwrap(), provider.join().unwrap())
    })
}

/// Calls `service` while `peer` serves the request; the reply and the
/// request's header as the peer saw it.
fn call(client: &mut Client, service: &Service, peer: &mut PeerSide) -> (Result<Vec<u8>, CallError>, FrameHeader) {
    thread::scope(|s| {
        let served = s.spawn(|| peer.serve_one());
        let reply = client.call(service, b"call");
        (reply, served.join().unwrap())
    })
}

/// Every outcome `recv` hands out until nothing is in flight, by ticket.
fn recv_all(client: &mut Client) -> HashMap<Ticket, Result<Vec<u8>, CallError>> {
    let mut got = HashMap::new();
    loop {
        match client.recv() {
            Ok(Received { ticket, outcome }) => {
                assert!(got.insert(ticket, outcome).is_none(), "{ticket:?} handed out twice")
            }
            Err(CallError::NothingInFlight) => return got,
            Err(e) => panic!("recv failed after {got:?}: {e}"),
        }
    }
}

fn disconnected(outcome: &Result<Vec<u8>, CallError>) -> bool {
    matches!(outcome, Err(CallError::Disconnected { .. }))
}

#[test]
fn a_provided_name_is_resolved_through_the_broker_and_called_directly() {
    let rig = Rig::new();
    let (mut client, mut daemon) = rig.connect(options());
    let granted = [("search", 7), ("search.suggest", 8)];
    let (search, _broker, resolve, mut provider) = first_resolve(&rig, &mut client, "search", &granted);
    let asked = Resolve { name: "search".into(), ring_capacity: CAPACITY, doorbell: DoorbellKind::Futex, wait_ms: 0 };
    assert_eq!(resolve, asked);
    assert_eq!((search.name(), search.id()), ("search", 7));
    assert_eq!(client.provider(&search), Some(PROVIDER));
    // The session lists it: found without asking the broker, which reads
    // nothing more (asking would fail, after the connect timeout).
    let suggest = client.service("search.suggest").unwrap();
    assert_eq!(suggest.id(), 8);
    let echo = client.service("echo").unwrap();
    assert_eq!(client.provider(&echo), None);

    let (reply, seen) = call(&mut client, &search, &mut provider);
    assert_eq!((reply, seen.service, seen.request_id), (Ok(reply_to(1)), 7, 1));
    let (reply, seen) = call(&mut client, &suggest, &mut provider);
    assert_eq!((reply, seen.service, seen.request_id), (Ok(reply_to(2)), 8, 2));
    // Each link numbers its own requests.
    let (reply, seen) = call(&mut client, &echo, &mut daemon);
    assert_eq!((reply, seen.service, seen.request_id), (Ok(reply_to(1)), ECHO, 1));
    assert_eq!(client.in_flight(), 0);
}

/// Requests in flight on two brokered links and the daemon link; the
/// peers answer one at a time in an order of their own, and each `recv`
/// hands out the reply just published, whichever link it is on.
#[test]
fn recv_takes_the_replies_of_every_link_in_any_order() {
    let rig = Rig::new();
    let (mut client, mut daemon) = rig.connect(options());
    let (alpha, mut broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let (beta, mut pb) = resolve(&mut client, &mut broker, "beta", &[("beta", 4)]);
    let echo = client.service("echo").unwrap();
    let ta = [client.send(&alpha, b"a").unwrap(), client.send(&alpha, b"a").unwrap()];
    let tb = client.send(&beta, b"b").unwrap();
    let td = client.send(&echo, b"d").unwrap();
    assert_eq!([ta[0].id(), ta[1].id(), tb.id(), td.id()], [1, 2, 1, 1]);
    assert_eq!(client.in_flight(), 4);
    client.flush().unwrap();
    let (ha, hb, hd) = ([pa.take_request().0, pa.take_request().0], pb.take_request().0, daemon.take_request().0);

    pb.reply_as(hb.service, hb.request_id, b"beta 1");
    assert_eq!(client.recv(), Ok(Received { ticket: tb, outcome: Ok(b"beta 1".to_vec()) }));
    pa.reply_as(ha[1].service, ha[1].request_id, b"alpha 2");
    assert_eq!(client.recv(), Ok(Received { ticket: ta[1], outcome: Ok(b"alpha 2".to_vec()) }));
    daemon.reply_as(hd.service, hd.request_id, b"daemon 1");
    assert_eq!(client.recv(), Ok(Received { ticket: td, outcome: Ok(b"daemon 1".to_vec()) }));
    pa.reply_as(ha[0].service, ha[0].request_id, b"alpha 1");
    assert_eq!(client.recv(), Ok(Received { ticket: ta[0], outcome: Ok(b"alpha 1".to_vec()) }));
    assert_eq!(client.recv(), Err(CallError::NothingInFlight));
}

/// A `recv` asleep with requests in flight on three links has announced
/// its sleep on every one of them, and a reply on any wakes it.
fn a_sleeping_recv_is_woken_by_a_reply_on_any_link(doorbell: DoorbellKind) {
    let rig = Rig::new();
    let (mut client, mut daemon) = rig.connect(options().doorbell(doorbell));
    let (alpha, mut broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let (beta, mut pb) = resolve(&mut client, &mut broker, "beta", &[("beta", 4)]);
    let echo = client.service("echo").unwrap();
    let mut expected = HashMap::new();
    for (service, peer) in [(&alpha, &mut pa), (&beta, &mut pb), (&echo, &mut daemon)] {
        let ticket = client.send(service, b"x").unwrap();
        client.flush().unwrap();
        let (header, _) = peer.take_request();
        expected.insert(ticket, (header, service.name().to_string()));
    }
    for peer in [&mut pb, &mut daemon, &mut pa] {
        let Received { ticket, outcome } = thread::scope(|s| {
            let received = s.spawn(|| client.recv());
            // The client sleeps, and said so in this peer's ring too.
            peer.await_client_asleep();
            let header = peer.take_request_header_of(&expected);
            peer.reply_as(header.service, header.request_id, b"woken");
            received.join().unwrap().unwrap()
        });
        assert_eq!(outcome, Ok(b"woken".to_vec()), "{ticket:?}");
        assert!(expected.remove(&ticket).is_some(), "{ticket:?}: not one of the tickets, or handed out twice");
    }
    assert!(expected.is_empty());
}

impl PeerSide {
    /// The header of the one request of `expected` that went to this
    /// peer's service.
    fn take_request_header_of(&self, expected: &HashMap<Ticket, (FrameHeader, String)>) -> FrameHeader {
        let mut mine = expected.values().filter(|(h, _)| h.service == self.service).map(|(h, _)| *h);
        let header = mine.next().expect("a request to this peer");
        assert!(mine.next().is_none());
        header
    }
}

#[test]
fn a_sleeping_recv_is_woken_by_a_reply_on_any_link_with_futexes() {
    a_sleeping_recv_is_woken_by_a_reply_on_any_link(DoorbellKind::Futex);
}

#[test]
fn a_sleeping_recv_is_woken_by_a_reply_on_any_link_with_pollable_doorbells() {
    a_sleeping_recv_is_woken_by_a_reply_on_any_link(DoorbellKind::Pollable);
}

#[test]
fn tickets_and_services_of_another_client_are_refused() {
    let rig = Rig::new();
    let (mut a, mut daemon_a) = rig.connect(options());
    let (mut b, _daemon_b) = rig.connect(options());
    let echo_a = a.service("echo").unwrap();
    let echo_b = b.service("echo").unwrap();
    assert_eq!(echo_a.id(), echo_b.id());
    let ticket = a.send(&echo_a, b"a's").unwrap();
    // The same id, the same link place, another client: never b's.
    let own = b.send(&echo_b, b"b's").unwrap();
    assert_eq!((ticket.id(), own.id()), (1, 1));
    assert_ne!(ticket, own);
    assert_eq!(b.wait(ticket), Err(CallError::ForeignTicket { id: 1 }));
    assert_eq!(b.call(&echo_a, b"x"), Err(CallError::ForeignService { name: "echo".into() }));
    assert_eq!(b.send(&echo_a, b"x"), Err(CallError::ForeignService { name: "echo".into() }));
    let (search, _broker, _, _provider) = first_resolve(&rig, &mut a, "search", &[("search", 7)]);
    assert_eq!(b.call(&search, b"x"), Err(CallError::ForeignService { name: "search".into() }));
    assert_eq!(b.max_payload_of(&search), Err(CallError::ForeignService { name: "search".into() }));
    assert_eq!(b.provider(&search), None);
    assert_eq!(b.in_flight(), 1, "nothing of a's went out on b");
    // a's ticket still gets its outcome, from a.
    a.flush().unwrap();
    daemon_a.serve_one();
    assert_eq!(a.wait(ticket), Ok(reply_to(1)));
}

/// A provider that dies (its liveness end closes) ends every call in
/// flight on its link with `Disconnected`; the other links go on, and its
/// services are not connected any more.
#[test]
fn a_provider_that_dies_disconnects_its_calls_alone() {
    let rig = Rig::new();
    let (mut client, mut daemon) = rig.connect(options());
    let (alpha, mut broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let (beta, mut pb) = resolve(&mut client, &mut broker, "beta", &[("beta", 4)]);
    let lost = [client.send(&alpha, b"a").unwrap(), client.send(&alpha, b"a").unwrap()];
    let answered = client.send(&beta, b"b").unwrap();
    client.flush().unwrap();
    let (first, _) = pa.take_request();
    assert_eq!(first.request_id, 1);
    // It dies while the client sleeps for the first of its replies (and
    // for beta's): the liveness check finds it gone.
    let outcome = thread::scope(|s| {
        let waited = s.spawn(|| client.wait(lost[0]));
        pa.await_client_asleep();
        drop(pa);
        waited.join().unwrap()
    });
    assert!(disconnected(&outcome), "{outcome:?}");
    pb.serve_one();
    let got = recv_all(&mut client);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(disconnected(&got[&lost[1]]), "{got:?}");
    assert_eq!(got[&answered], Ok(reply_to(1)));
    // Not re-sent, and no new request goes out on the lost link.
    assert!(matches!(client.call(&alpha, b"again"), Err(CallError::NotConnected { .. })));
    assert_eq!(call(&mut client, &beta, &mut pb).0, Ok(reply_to(2)));
    let echo = client.service("echo").unwrap();
    assert_eq!(call(&mut client, &echo, &mut daemon).0, Ok(reply_to(1)));
    assert!(client.is_connected());
}

/// A provider that stops on purpose says in the segment which request it
/// took last: the later ones end `Shutdown` (never run), its reply before
/// that is still read, and a later call is `Shutdown` too.
#[test]
fn a_provider_that_closes_on_purpose_gives_shutdown_for_what_it_never_took() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let (alpha, _broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let tickets = [0; 3].map(|_| client.send(&alpha, b"a").unwrap());
    client.flush().unwrap();
    pa.serve_one();
    pa.words.mark_closed(1);
    drop(pa);
    let got = recv_all(&mut client);
    assert_eq!(got[&tickets[0]], Ok(reply_to(1)));
    assert_eq!(got[&tickets[1]], Err(CallError::Shutdown));
    assert_eq!(got[&tickets[2]], Err(CallError::Shutdown));
    assert_eq!(client.call(&alpha, b"after"), Err(CallError::Shutdown));
}

/// The broker connection is lost (the daemon restarted, and with it the
/// daemon link): the brokered link does not notice, and the next resolve
/// opens a new broker connection.
#[test]
fn a_lost_broker_connection_is_opened_again_and_established_links_go_on() {
    let rig = Rig::new();
    let (mut client, daemon) = rig.connect(options());
    let (alpha, broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    drop((broker, daemon));
    assert_eq!(call(&mut client, &alpha, &mut pa).0, Ok(reply_to(1)));
    // The daemon link finds the daemon gone: a call on it was sent, and its
    // outcome is unknown; the next is not sent.
    let echo = client.service("echo").unwrap();
    assert!(matches!(client.call(&echo, b"x"), Err(CallError::Disconnected { .. })));
    assert!(matches!(client.call(&echo, b"x"), Err(CallError::NotConnected { .. })));
    assert!(!client.is_connected());
    let (beta, _broker, _, mut pb) = first_resolve(&rig, &mut client, "beta", &[("beta", 4)]);
    assert_eq!(call(&mut client, &beta, &mut pb).0, Ok(reply_to(1)));
    assert_eq!(call(&mut client, &alpha, &mut pa).0, Ok(reply_to(2)));
}

/// A kept broker connection that the daemon closes after reading a resolve
/// (it died meanwhile) is replaced once, and the resolve asked again.
#[test]
fn a_resolve_lost_on_a_kept_connection_is_asked_again_on_a_new_one() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let (_alpha, broker, _, _pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let rig = &rig;
    let (beta, _broker, mut pb) = thread::scope(|s| {
        let second = s.spawn(move || {
            let mut broker = broker;
            assert_eq!(broker.resolve().name, "beta");
            drop(broker);
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            assert_eq!(resolve.name, "beta");
            let provider = broker.grant(&resolve, &[("beta", 4)]);
            (broker, provider)
        });
        let beta = client.service("beta");
        let (broker, provider) = second.join().unwrap();
        (beta, broker, provider)
    });
    assert_eq!(call(&mut client, &beta.unwrap(), &mut pb).0, Ok(reply_to(1)));
}

/// `wait_for_service` resolves with a wait, and asks again while the
/// daemon has no provider yet or is restarting, until one is there.
#[test]
fn wait_for_service_waits_for_a_provider_and_for_the_daemon() {
    let rig = Rig::new();
    let options = options().reconnect(Reconnect::new(Duration::from_millis(1), Duration::from_millis(1)));
    let (mut client, _daemon) = rig.connect(options);
    let (late, _broker, mut provider) = thread::scope(|s| {
        let broker = s.spawn(|| {
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            assert!(resolve.wait_ms > 0 && u128::from(resolve.wait_ms) <= HANG_LIMIT.as_millis(), "{resolve:?}");
            // The daemon's wait passed with no provider.
            broker.fail(ResolveError::UnknownService { name: "late".into() });
            assert_eq!(broker.resolve().name, "late");
            broker.fail(ResolveError::ShuttingDown);
            // The daemon restarts: this connection closes unanswered.
            assert_eq!(broker.resolve().name, "late");
            drop(broker);
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            assert!(resolve.wait_ms > 0, "{resolve:?}");
            let provider = broker.grant(&resolve, &[("late", 5)]);
            (broker, provider)
        });
        let late = client.wait_for_service("late", HANG_LIMIT);
        let (broker, provider) = broker.join().unwrap();
        (late, broker, provider)
    });
    let late = late.unwrap();
    assert_eq!(call(&mut client, &late, &mut provider).0, Ok(reply_to(1)));
    // Found at once now; and a daemon's own service needs no broker.
    assert_eq!(client.wait_for_service("late", Duration::ZERO), Ok(late));
    assert!(client.wait_for_service("echo", Duration::ZERO).is_ok());
}

/// What a refusal says becomes a clear error; `wait_for_service` gives up
/// at once on one that waiting cannot cure.
#[test]
fn refusals_are_clear_errors() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let refusals = [
        (ResolveError::UnknownService { name: "x".into() }, CallError::UnknownService { name: "x".into() }),
        (
            ResolveError::BadName { name: "x".into(), reason: "rule".into() },
            CallError::BadName { name: "x".into(), reason: "rule".into() },
        ),
        (
            ResolveError::NotPermitted { reason: "uid 7".into() },
            CallError::NotPermitted { name: "x".into(), reason: "uid 7".into() },
        ),
        (
            ResolveError::Unavailable { reason: "declined".into() },
            CallError::Unavailable { name: "x".into(), reason: "declined".into() },
        ),
        (
            ResolveError::LimitReached { reason: "64 sessions".into() },
            CallError::Unavailable { name: "x".into(), reason: "limit reached: 64 sessions".into() },
        ),
    ];
    thread::scope(|s| {
        let broker = s.spawn(|| {
            let mut broker = rig.broker();
            for (refusal, _) in &refusals {
                broker.resolve();
                broker.fail(refusal.clone());
            }
            broker.resolve();
            broker.fail(ResolveError::NotPermitted { reason: "uid 7".into() });
        });
        for (_, expected) in &refusals {
            assert_eq!(client.service("x").as_ref(), Err(expected));
        }
        let waited = client.wait_for_service("x", HANG_LIMIT);
        assert_eq!(waited, Err(CallError::NotPermitted { name: "x".into(), reason: "uid 7".into() }));
        broker.join().unwrap();
    });
    assert!(client.is_connected());
}

/// Over a stream transport a provided name cannot be reached: the error
/// says so, and the daemon's own services still resolve.
#[test]
fn a_stream_transport_cannot_reach_provided_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    thread::scope(|s| {
        let daemon = s.spawn(|| {
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_hello(&mut stream).role, Role::Session);
            let welcome = ipc_core::handshake::encode(&ServerMessage::Welcome(welcome(DoorbellKind::Futex))).unwrap();
            stream.write_all(&welcome).unwrap();
            stream
        });
        let mut client = Client::connect_with(Transport::Uds(path.clone()), options()).unwrap();
        let _stream = daemon.join().unwrap();
        assert_eq!(client.service("search"), Err(CallError::NoBroker { name: "search".into(), transport: "uds" }));
        let message = client.service("search").unwrap_err().to_string();
        assert!(message.contains("cannot be reached over uds"), "{message}");
        assert!(client.service("echo").is_ok());
    });
}

/// How a broken answer is sent: by hand, on a broker side that has read the
/// resolve.
type BadAnswer = fn(&mut BrokerSide, &Resolve);

/// Answers that break the protocol: each is a clear error naming what was
/// wrong, never a panic or a hang, and the client goes on.
#[test]
fn answers_that_break_the_protocol_are_clear_errors() {
    let cases: [(&str, BadAnswer, &str); 10] = [
        ("garbage", |b, _| frame(b, &[0xff; 8]), "undecodable answer"),
        ("an oversized length", |b, _| raw(b, &u32::MAX.to_le_bytes()), "exceeds the maximum"),
        ("too few fds", |b, r| with_fds(b, r, |mut fds| fds.drain(..2).collect()), "2 fds, expected 3"),
        (
            "fds out of order",
            |b, r| {
                with_fds(b, r, |mut fds| {
                    fds.swap(0, 1);
                    fds
                })
            },
            "segment memfd",
        ),
        (
            "an unsealed memfd",
            |b, r| {
                with_fds(b, r, |mut fds| {
                    fds[0] = unsealed();
                    fds
                })
            },
            "seals",
        ),
        (
            "a liveness fd that is no socket",
            |b, r| {
                with_fds(b, r, |mut fds| {
                    fds[2] = event_fd();
                    fds
                })
            },
            "not a connected socket",
        ),
        (
            "another doorbell",
            |b, r| {
                let (_, fds) = make_session(DoorbellKind::Pollable, PeerBell::EventFd, true);
                b.send_brokered(brokered(DoorbellKind::Pollable, &[("x", 1)]), &fds);
                let _ = r;
            },
            "doorbell",
        ),
        (
            "a session without the name",
            |b, r| {
                let (_, fds) = make_session(r.doorbell, PeerBell::EventFd, true);
                b.send_brokered(brokered(r.doorbell, &[("other", 1)]), &fds);
            },
            "does not offer \"x\"",
        ),
        (
            "a payload that does not match the rings",
            |b, r| {
                let (_, fds) = make_session(r.doorbell, PeerBell::EventFd, true);
                let mut answer = brokered(r.doorbell, &[("x", 1)]);
                answer.max_payload += 8;
                b.send_brokered(answer, &fds);
            },
            "does not match ring capacity",
        ),
        (
            "a refusal with fds",
            |b, _| {
                let bytes =
                    ipc_core::handshake::encode(&ipc_core::control::Resolution::Failed(ResolveError::ShuttingDown))
                        .unwrap();
                send_with_fds(&b.stream, &bytes, &[event_fd()]);
            },
            "a refusal came with 1 fds",
        ),
    ];
    for (what, answer, says) in cases {
        let rig = Rig::new();
        let (mut client, mut daemon) = rig.connect(options());
        let error = thread::scope(|s| {
            let broker = s.spawn(|| {
                let mut broker = rig.broker();
                let resolve = broker.resolve();
                answer(&mut broker, &resolve);
                broker
            });
            let error = client.service("x").unwrap_err();
            drop(broker.join().unwrap());
            error
        });
        match &error {
            CallError::BadResolution { name, reason } => {
                assert_eq!(name, "x", "{what}");
                assert!(reason.contains(says), "{what}: {reason:?} does not say {says:?}");
            }
            other => panic!("{what}: {other:?}"),
        }
        let echo = client.service("echo").unwrap();
        assert_eq!(call(&mut client, &echo, &mut daemon).0, Ok(reply_to(1)), "{what}: the client goes on");
        assert_eq!(client.in_flight(), 0, "{what}");
    }
}

/// A provider that died as its session was handed over (its end of the
/// liveness socket closed before the client took the session) is no
/// broken answer: the service is unavailable, and `wait_for_service`
/// resolves again and gets the next session.
#[test]
fn a_session_whose_provider_is_gone_already_is_unavailable_and_waited_past() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let gone = |broker: &mut BrokerSide, resolve: &Resolve| {
        let (provider, fds) = make_session(resolve.doorbell, PeerBell::EventFd, true);
        drop(provider);
        broker.send_brokered(brokered(resolve.doorbell, &[("x", 1)]), &fds);
    };
    let error = thread::scope(|s| {
        s.spawn(|| {
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            gone(&mut broker, &resolve);
        });
        client.service("x").unwrap_err()
    });
    assert!(matches!(&error, CallError::Unavailable { reason, .. } if reason.contains("went away")), "{error:?}");
    let (x, _provider) = thread::scope(|s| {
        let broker = s.spawn(|| {
            let mut broker = rig.broker();
            let resolve = broker.resolve();
            gone(&mut broker, &resolve);
            let resolve = broker.resolve();
            let (provider, fds) = make_session(resolve.doorbell, PeerBell::EventFd, true);
            broker.send_brokered(brokered(resolve.doorbell, &[("x", 1)]), &fds);
            (broker, provider)
        });
        let x = client.wait_for_service("x", HANG_LIMIT).expect("the second session is taken");
        let (_broker, provider) = broker.join().unwrap();
        (x, provider)
    });
    assert!(client.provider(&x).is_some());
}

/// A daemon that closes a new broker connection without answering is an
/// error; one that answers the broker's hello as a session's has no
/// broker (it predates brokering), so it knows no provided name, and
/// waiting for one is no use.
#[test]
fn a_broker_that_hangs_up_or_answers_wrong_is_an_error() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let error = thread::scope(|s| {
        s.spawn(|| {
            let mut broker = rig.broker();
            broker.resolve();
        });
        client.service("x").unwrap_err()
    });
    assert!(matches!(&error, CallError::Unavailable { reason, .. } if reason.contains("lost")), "{error:?}");

    for _ in 0..2 {
        let error = thread::scope(|s| {
            s.spawn(|| {
                let mut stream = rig.accept();
                assert_eq!(read_hello(&mut stream).role, Role::Broker);
                let (_, fds) = make_session(DoorbellKind::Futex, PeerBell::EventFd, false);
                let bytes = ipc_core::handshake::encode(&ServerMessage::Welcome(welcome(DoorbellKind::Futex))).unwrap();
                send_with_fds(&stream, &bytes, &fds);
            });
            client.wait_for_service("x", HANG_LIMIT).unwrap_err()
        });
        assert_eq!(error, CallError::UnknownService { name: "x".into() });
    }
}

/// Sends `body` framed.
fn frame(broker: &mut BrokerSide, body: &[u8]) {
    let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(body);
    raw(broker, &bytes);
}

fn raw(broker: &mut BrokerSide, bytes: &[u8]) {
    (&broker.stream).write_all(bytes).unwrap();
}

/// A well-formed `Brokered` answer whose fds `change` alters.
fn with_fds(broker: &mut BrokerSide, resolve: &Resolve, change: impl FnOnce(Vec<OwnedFd>) -> Vec<OwnedFd>) {
    let (_, fds) = make_session(resolve.doorbell, PeerBell::EventFd, true);
    broker.send_brokered(brokered(resolve.doorbell, &[("x", 1)]), &change(fds));
}

/// A memfd of a segment's size, without seals.
fn unsealed() -> OwnedFd {
    let fd = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let size = ipc_core::SegmentLayout::new(CAPACITY).unwrap().segment_size();
    rustix::fs::ftruncate(&fd, size as u64).unwrap();
    fd
}

fn event_fd() -> OwnedFd {
    use std::os::fd::AsFd;
    ipc_platform::EventFd::new().unwrap().as_fd().try_clone_to_owned().unwrap()
}

/// With a reconnect policy, the next call to a service of a lost provider
/// resolves its name again and reaches a restarted provider; every handle
/// of the old session works on the new one. Requests in flight at the
/// loss are not sent again.
#[test]
fn a_lost_provider_is_resolved_again_by_the_next_call_with_a_reconnect_policy() {
    let rig = Rig::new();
    let policy = Reconnect::new(Duration::from_millis(1), Duration::from_millis(1));
    let (mut client, _daemon) = rig.connect(options().reconnect(policy));
    let granted = [("alpha", 3), ("alpha.admin", 9)];
    let (alpha, mut broker, _, mut provider) = first_resolve(&rig, &mut client, "alpha", &granted);
    let admin = client.service("alpha.admin").unwrap();
    let in_flight = client.send(&alpha, b"lost").unwrap();
    client.flush().unwrap();
    provider.take_request();
    drop(provider);
    assert!(disconnected(&client.wait(in_flight)));

    let (reply, asked, seen, mut provider) = thread::scope(|s| {
        let restarted = s.spawn(|| {
            let resolve = broker.resolve();
            let mut provider = broker.grant(&resolve, &granted);
            let seen = provider.serve_one();
            (resolve, seen, provider)
        });
        let reply = client.call(&admin, b"again");
        let (resolve, seen, provider) = restarted.join().unwrap();
        (reply, resolve, seen, provider)
    });
    assert_eq!(asked.name, "alpha.admin", "the called service's name is resolved");
    assert!(asked.wait_ms > 0, "the daemon may wait for the provider to come back: {asked:?}");
    // Its first request is the new call: ids go on, the lost one is gone.
    assert_eq!((reply, seen.request_id, seen.service), (Ok(reply_to(2)), 2, 9));
    assert_eq!(call(&mut client, &alpha, &mut provider).0, Ok(reply_to(3)));

    // A provider reached again with other ids cannot take the old
    // handles' calls; resolving the name again gives a new handle.
    drop(provider);
    assert!(disconnected(&client.call(&alpha, b"sent, then lost")));
    let refused = thread::scope(|s| {
        let other = s.spawn(|| {
            let resolve = broker.resolve();
            broker.grant(&resolve, &[("alpha", 30)])
        });
        let refused = client.call(&alpha, b"not sent");
        drop(other.join().unwrap());
        refused
    });
    assert!(
        matches!(&refused, Err(CallError::NotConnected { reason }) if reason.contains("other services")),
        "{refused:?}"
    );
    let (alpha, mut provider) = resolve(&mut client, &mut broker, "alpha", &[("alpha", 30)]);
    assert_eq!(alpha.id(), 30);
    assert_eq!(call(&mut client, &alpha, &mut provider).0, Ok(reply_to(1)));
}

/// While the client waits for one link's reply, the replies that come on
/// its other links are read aside: a provider that waits for its reply to
/// be taken (here: one that answers only after that) is not left stalled
/// behind the wait.
#[test]
fn a_wait_on_one_link_takes_the_replies_of_the_others_aside() {
    let rig = Rig::new();
    let (mut client, _daemon) = rig.connect(options());
    let (alpha, mut broker, _, mut pa) = first_resolve(&rig, &mut client, "alpha", &[("alpha", 3)]);
    let (beta, mut pb) = resolve(&mut client, &mut broker, "beta", &[("beta", 4)]);
    let ta = client.send(&alpha, b"a").unwrap();
    let tb = client.send(&beta, b"b").unwrap();
    client.flush().unwrap();
    pb.serve_one();
    let waited = thread::scope(|s| {
        s.spawn(|| {
            // Alpha answers once beta's reply has been taken.
            poll(|| (pb.responses.consumer_released().unwrap() > 0).then_some(()));
            pa.serve_one();
        });
        client.wait(ta)
    });
    assert_eq!(waited, Ok(reply_to(1)));
    assert_eq!(client.in_flight(), 1, "beta's reply is kept for its ticket");
    assert_eq!(client.wait(tb), Ok(reply_to(1)));
}
