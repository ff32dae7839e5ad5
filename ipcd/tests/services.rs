//! The built-in services through the real daemon and the client library:
//! what each returns, how errors and size limits surface, both doorbell
//! kinds, and many clients at once.

mod common;

use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    join_all, json_u64, pattern, poll_until, raw_session, sleeping_syscalls, stats_json, watchdog, Daemon, RawSession,
    RawSessionExt, HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::{CallError, Client, ClientOptions, DoorbellKind};
use ipc_core::ErrorCode;
use ipc_platform::futex::Wake;
use ipc_platform::Drained;
use serde::{Deserialize, Serialize};

#[test]
fn echo_ping_and_stats_answer() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut client = Client::connect_to(&socket).unwrap();
        let mut names: Vec<&str> = client.service_names().collect();
        names.sort_unstable();
        assert_eq!(names, ["echo", "ipcd.clients", "ipcd.services", "ipcd.status", "ping", "stats", "stream.count"]);

        let echo = client.service("echo").unwrap();
        let bytes = pattern(1, 1000);
        assert_eq!(client.call(&echo, &bytes).unwrap(), bytes);
        assert_eq!(client.call(&echo, b"").unwrap(), b"");

        let ping = client.service("ping").unwrap();
        assert_eq!(client.call(&ping, b"ignored").unwrap(), b"");

        // The three calls above are counted; the stats call itself may or
        // may not be yet (counters are added when a batch ends).
        let json = stats_json(&mut client);
        assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 1, "{json}");
        assert!((3..=4).contains(&json_u64(&json, "requests")), "{json}");
        assert!((3..=4).contains(&json_u64(&json, "replies")), "{json}");
        assert_eq!(json_u64(&json, "errors"), 0, "{json}");
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
fn call_typed_round_trips_through_echo() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut client = Client::connect_to(&socket).unwrap();
        let echo = client.service("echo").unwrap();
        let order =
            Order { id: u64::MAX - 7, customer: "Zoë".into(), lines: vec![(1, -5), (70_000, i64::MIN)], note: None };
        let back: Order = client.call_typed(&echo, &order).unwrap();
        assert_eq!(back, order);
        // A reply that is not the requested type is a decode error, not
        // garbage: the empty ping reply cannot hold an Order.
        let ping = client.service("ping").unwrap();
        let err = client.call_typed::<_, Order>(&ping, &order).unwrap_err();
        assert!(matches!(err, CallError::Decode(_)), "{err:?}");
    });
}

#[test]
fn unknown_service_name_is_an_error() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut client = Client::connect_to(&socket).unwrap();
        assert_eq!(client.service("nope").unwrap_err(), CallError::UnknownService { name: "nope".into() });
        // The debug services exist only with --debug-services.
        assert!(matches!(client.service("debug.sleep"), Err(CallError::UnknownService { .. })));
    });
}

#[test]
fn unknown_service_id_gets_an_error_reply() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        // The client library only calls ids the welcome listed, so an
        // unlisted id needs a hand-made request.
        let mut raw = raw_session(&socket, 65536, DoorbellKind::Futex);
        let unused = raw.welcome.services.iter().map(|s| s.id).max().unwrap() + 1;
        let (header, body) = raw.call(unused, 7, b"anything");
        assert_eq!(header.request_id, 7);
        assert!(header.is_error(), "{header:?}");
        let (code, message) = ipc_core::decode_error(&body);
        assert_eq!(code, ErrorCode::UnknownService, "{message}");
        assert!(message.contains(&unused.to_string()), "{message}");
        // The session survives its mistake.
        let echo = raw.service("echo");
        let (header, body) = raw.call(echo, 8, b"still here");
        assert!(!header.is_error());
        assert_eq!(body, b"still here");
    });
}

#[test]
fn handler_error_is_a_remote_error_for_that_call_only() {
    let daemon = Daemon::start(&["--debug-services"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut client = Client::connect_to(&socket).unwrap();
        let fail = client.service("debug.fail").unwrap();
        match client.call(&fail, b"abc") {
            Err(CallError::Remote { message, .. }) => {
                assert!(message.contains("debug.fail"), "{message}");
                assert!(message.contains('3'), "{message}");
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"after").unwrap(), b"after");
        let json = stats_json(&mut client);
        assert_eq!(json_u64(&json, "errors"), 1, "{json}");
    });
}

#[test]
fn oversized_request_is_refused_and_maximum_size_round_trips() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        for capacity in [4096u32, 65536] {
            let options = ClientOptions::default().ring_capacity(capacity);
            let mut client = Client::connect_with(&socket, options).unwrap();
            // Half the ring minus the 16-byte frame header.
            let max = capacity as usize / 2 - 16;
            assert_eq!(client.max_payload(), max);
            let echo = client.service("echo").unwrap();

            let too_big = vec![0xA5; max + 1];
            assert_eq!(client.try_send(&echo, &too_big).unwrap_err(), CallError::TooLarge { len: max + 1, max });
            // `call` sends it in chunks, and the echo answers in chunks.
            assert!(client.call(&echo, &too_big).unwrap() == too_big, "chunked echo differs");
            // Several maximum frames in a row make the ring wrap and pad.
            for seed in 0..5 {
                let biggest = pattern(seed, max);
                let reply = client.call(&echo, &biggest).unwrap();
                assert!(reply == biggest, "maximum-size echo {seed} differs");
            }
            // The refused call did not break the client.
            assert_eq!(client.call(&echo, b"small").unwrap(), b"small");
        }
    });
}

/// A call timeout far beyond what a call takes even on a loaded machine,
/// yet short enough that a lost wake-up fails its test quickly.
const WAKE_LIMIT: Duration = Duration::from_secs(5);

/// Both doorbell kinds through the client library, with spinning off on
/// both sides, so that no call is found by a spin: each request is left
/// for a worker that has parked the session, which reads the ring only
/// once the client rings its eventfd, and each reply for a client that
/// went to sleep (unless the reply beat it there), which only the
/// daemon's wake gets out of its wait. A lost ring of the eventfd leaves
/// the worker asleep, and the call ends in `Timeout` after
/// [`WAKE_LIMIT`]; so does a lost wake of the pollable doorbell, whose
/// waits look at nothing else. A lost futex wake would cost the call only
/// the client's 50 ms liveness check: the raw test below catches that one.
#[test]
fn both_doorbells_serve_calls_when_neither_side_spins() {
    let daemon = Daemon::start(&["--spin-us", "0"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        for kind in [DoorbellKind::Pollable, DoorbellKind::Futex] {
            let options = ClientOptions::default().doorbell(kind).spin(Duration::ZERO).call_timeout(WAKE_LIMIT);
            let mut client = Client::connect_with(&socket, options).unwrap();
            // Only the pollable doorbell has an fd.
            assert_eq!(client.doorbell_fd().is_some(), kind == DoorbellKind::Pollable, "{kind:?}");
            let echo = client.service("echo").unwrap();
            let mut reply = Vec::new();
            for i in 0..2000u64 {
                let request = pattern(i, (i % 700) as usize);
                client.call_into(&echo, &request, &mut reply).unwrap_or_else(|e| panic!("{kind:?} call {i}: {e}"));
                assert!(reply == request, "{kind:?} call {i}: reply differs");
            }
        }
    });
}

/// Each doorbell kind, rung while the other side is known to sleep. The
/// worker never spins, and a request is written only once the worker has
/// parked the session (announced its sleep, and gone back to its epoll
/// wait) and this thread sleeps on the response ring: on the futex, or in
/// a poll of the pollable doorbell. So the worker sees the request only
/// through the eventfd, and this thread wakes only through the daemon's
/// doorbell: the futex wait returns woken with the reply published, or
/// the pollable doorbell's fd becomes readable. Either wake lost, and the
/// wait times out after [`HANG_UP_LIMIT`].
#[test]
fn each_doorbell_wakes_a_sleeping_client_and_a_parked_worker() {
    use std::sync::atomic::Ordering;
    const ROUNDS: u64 = 10;
    let daemon = Daemon::start(&["--workers", "1", "--spin-us", "0"]);
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let worker = common::worker_thread(pid);
        let me = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let own = std::process::id();
        for kind in [DoorbellKind::Futex, DoorbellKind::Pollable] {
            let mut raw = raw_session(&socket, 65536, kind);
            let echo = raw.service("echo");
            let mut body = Vec::new();
            for id in 1..=ROUNDS {
                let request = pattern(id, 100);
                // The worker announces its sleep on the request ring, then
                // re-checks the ring, then sleeps in epoll: announced and
                // asleep means the check is done.
                let parked = poll_until(HANG_UP_LIMIT, || {
                    raw.waiters()[0].load(Ordering::SeqCst) == 1
                        && common::blocked_in_syscall(pid, worker)
                            .is_some_and(|n| sleeping_syscalls::EPOLL.contains(&n))
                });
                assert!(parked, "{kind:?} round {id}: the worker did not park the session");
                assert!(raw.responses.prepare_sleep().unwrap(), "{kind:?} round {id}: a reply before any request");
                let sleeps_in =
                    if kind == DoorbellKind::Futex { sleeping_syscalls::FUTEX } else { sleeping_syscalls::POLL };
                let RawSession { requests, bell, responses, client_bell, .. } = &mut raw;
                let woken = thread::scope(|scope| {
                    scope.spawn(|| {
                        let asleep = poll_until(HANG_UP_LIMIT, || {
                            common::blocked_in_syscall(own, me).is_some_and(|n| sleeps_in.contains(&n))
                        });
                        assert!(asleep, "{kind:?} round {id}: the test thread never went to sleep");
                        requests.try_push(echo, 0, id, &request).unwrap();
                        assert!(requests.publish(), "{kind:?} round {id}: the parked worker asks for no ring");
                        bell.notify().unwrap();
                    });
                    match client_bell {
                        None => {
                            // Woken early for another reason, it sleeps again
                            // while the word says the reply is not out.
                            let word = responses.data_waiter();
                            let deadline = Instant::now() + HANG_UP_LIMIT;
                            while word.load(Ordering::SeqCst) == 1 {
                                let left = deadline.saturating_duration_since(Instant::now());
                                if ipc_platform::futex::wait(word, 1, Some(left)).unwrap() == Wake::TimedOut {
                                    return false;
                                }
                            }
                            true
                        }
                        Some(bell) => {
                            let ready = ipc_platform::wait_readable(&[bell.as_fd()], Some(HANG_UP_LIMIT)).unwrap();
                            if ready[0] {
                                assert_eq!(bell.drain().unwrap(), Drained::Rang, "{kind:?} round {id}");
                            }
                            ready[0]
                        }
                    }
                });
                assert!(woken, "{kind:?} round {id}: not woken within {HANG_UP_LIMIT:?}");
                raw.responses.finish_sleep();
                let header = raw.responses.try_pop(&mut body).unwrap().expect("the reply that woke us");
                raw.responses.release();
                assert_eq!((header.request_id, header.flags), (id, 0), "{kind:?}");
                assert!(body == request, "{kind:?} round {id}: reply differs");
            }
        }
    });
}

#[test]
fn eight_clients_in_parallel_get_their_own_replies() {
    const CLIENTS: u32 = 8;
    const CALLS: u32 = 2000;
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let threads: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let socket = socket.clone();
                thread::spawn(move || {
                    let mut client = Client::connect_to(&socket).unwrap();
                    let echo = client.service("echo").unwrap();
                    let mut reply = Vec::new();
                    for seq in 0..CALLS {
                        // Who sent it and which call it was, then a
                        // length that varies so the rings wrap at odd
                        // places.
                        let mut request = Vec::new();
                        request.extend_from_slice(&id.to_le_bytes());
                        request.extend_from_slice(&seq.to_le_bytes());
                        let seed = u64::from(id) << 32 | u64::from(seq);
                        request.extend(pattern(seed, (seq as usize * 7) % 1500));
                        client.call_into(&echo, &request, &mut reply).unwrap();
                        assert!(reply == request, "client {id} call {seq}: reply differs");
                    }
                })
            })
            .collect();
        join_all(threads);
        let mut client = Client::connect_to(&socket).unwrap();
        let json = stats_json(&mut client);
        assert!(json_u64(&json, "replies") >= u64::from(CLIENTS * CALLS), "{json}");
        assert_eq!(json_u64(&json, "errors"), 0, "{json}");
    });
}

/// Starts a client on its own thread that keeps the daemon's only worker
/// inside debug.sleep for `ms`, and returns once the worker is seen there.
fn block_the_worker(daemon: &Daemon, ms: u32) -> thread::JoinHandle<Result<Vec<u8>, CallError>> {
    let mut blocker = daemon.client();
    let sleep = blocker.service("debug.sleep").unwrap();
    let handle = thread::spawn(move || blocker.call(&sleep, &ms.to_le_bytes()));
    common::expect_worker_in_handler(daemon.pid());
    handle
}

#[test]
fn timed_out_call_is_reported_and_its_late_reply_is_discarded() {
    let daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"warm").unwrap(), b"warm");
    let blocker = block_the_worker(&daemon, 2000);

    let limit = Duration::from_millis(100);
    assert_eq!(client.call_timeout(&echo, b"late", limit), Err(CallError::Timeout { after: limit }));
    common::join_within(blocker, Duration::from_secs(20), "the blocking call").unwrap();
    // The next call gets its own reply, not the late one of the call above.
    let reply = watchdog(TEST_LIMIT, move || client.call(&echo, b"on time").unwrap());
    assert_eq!(reply, b"on time");
}

#[test]
fn late_replies_that_fill_the_response_ring_do_not_wedge_the_client() {
    let daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
    // A 4 KiB ring holds two replies of 2000 bytes; the third needs the
    // space of the first two back.
    let options = ClientOptions::default().ring_capacity(4096);
    let mut client = Client::connect_with(daemon.socket(), options).unwrap();
    let echo = client.service("echo").unwrap();
    let blocker = block_the_worker(&daemon, 2000);

    let limit = Duration::from_millis(100);
    for seed in 0..2 {
        let result = client.call_timeout(&echo, &pattern(seed, 2000), limit);
        assert_eq!(result, Err(CallError::Timeout { after: limit }), "call {seed} while the worker is blocked");
    }
    common::join_within(blocker, Duration::from_secs(20), "the blocking call").unwrap();
    // Each of these first skips the late replies in front of its own.
    let results = watchdog(TEST_LIMIT, move || {
        (2..5)
            .map(|seed| {
                let request = pattern(seed, 2000);
                let result = client.call_timeout(&echo, &request, Duration::from_secs(5));
                (result.as_deref() == Ok(&request[..]), result.map(|r| r.len()))
            })
            .collect::<Vec<_>>()
    });
    for (i, (same, result)) in results.into_iter().enumerate() {
        assert!(same, "call {} after the late replies: {result:?}", i + 2);
    }
}
