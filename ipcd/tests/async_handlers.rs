//! Async handlers (`async_service`, the `tokio` feature) on an embedded
//! server with one worker, over shared memory and the Unix stream socket,
//! and on a provider (over shared memory): calls complete in the order their futures end;
//! errors keep their codes; a panic in the future, or in the handler that
//! makes it, answers the call; a session has no more futures spawned than
//! its cap on calls handed off; a stop answers the futures still running
//! and cancels them; a runtime that shuts down answers its calls.
//!
//! The slow futures wait on gates the test opens, so what is asserted
//! while one runs is certain, not timed.

mod common;
#[path = "common/embedded.rs"]
mod embedded;
#[path = "common/in_process.rs"]
mod in_process;

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use common::{connect, start_with_streams, watchdog, TEST_LIMIT};
use embedded::Embedded;
use in_process::InProcess;
use ipc_client::{CallError, Client, ClientOptions, Received, Transport};
use ipcd::{OwnedRequest, ServiceError, MAX_OUTSTANDING_CALLS};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

/// How long a test waits for a handler to be called or a future to be
/// dropped (a watchdog).
const HANDED_LIMIT: Duration = Duration::from_secs(30);

/// The future an async handler of these tests returns.
type Reply = Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>>;

/// The application's runtime.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A call of a gated service as the test holds it: its payload, and the
/// gate whose value ends its future.
type Gate = (Vec<u8>, oneshot::Sender<Result<Vec<u8>, ServiceError>>);

/// An async handler whose every call is handed to the test (when the
/// handler is called, just before its future is spawned), and whose future
/// ends with what the test puts through the call's gate.
fn gated() -> (impl Fn(OwnedRequest) -> Reply + Send + Sync + 'static, Receiver<Gate>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let handler = move |request: OwnedRequest| -> Reply {
        let (gate, opened) = oneshot::channel();
        // A test that stopped listening drops the gate, which answers.
        let _ = tx.lock().unwrap().send((request.payload().to_vec(), gate));
        Box::pin(async move { opened.await.unwrap_or_else(|_| Err(ServiceError::new("the test dropped the gate"))) })
    };
    (handler, rx)
}

/// The next call handed to the test.
fn next_gate(gates: &Receiver<Gate>) -> Gate {
    gates.recv_timeout(HANDED_LIMIT).expect("the async handler was not called")
}

/// An async handler that answers by its request, after an await point:
/// `ok`, `coded` (code 404), `plain` (no code), `panic` (the future
/// panics); `panic now` panics in the handler, before any future.
fn fallible(request: OwnedRequest) -> Reply {
    if request.payload() == b"panic now" {
        panic!("a handler bug before its future");
    }
    Box::pin(async move {
        tokio::task::yield_now().await;
        match request.payload() {
            b"ok" => Ok(b"fine".to_vec()),
            b"coded" => Err(ServiceError::with_code(404, "no such key")),
            b"plain" => Err(ServiceError::new("plain failure")),
            b"panic" => panic!("a handler bug in its future"),
            other => Err(ServiceError::new(format!("unexpected request of {} bytes", other.len()))),
        }
    })
}

/// Sends on its channel when dropped: a future that holds it has been
/// dropped.
struct Dropped(Sender<()>);

impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// An async handler whose futures never end: each says it started, and
/// says so again when it is dropped.
fn endless() -> (impl Fn(OwnedRequest) -> Reply + Send + Sync + 'static, Receiver<()>, Receiver<()>) {
    let (started_tx, started) = channel();
    let (dropped_tx, dropped) = channel();
    let (started_tx, dropped_tx) = (Mutex::new(started_tx), Mutex::new(dropped_tx));
    let handler = move |_: OwnedRequest| -> Reply {
        let started = started_tx.lock().unwrap().clone();
        let guard = Dropped(dropped_tx.lock().unwrap().clone());
        Box::pin(async move {
            let _guard = guard;
            let _ = started.send(());
            std::future::pending().await
        })
    };
    (handler, started, dropped)
}

/// Two calls from one client, the second's future ending first: its reply
/// comes first, then the first's, each to its own ticket.
fn out_of_order(client: &mut Client, gates: &Receiver<Gate>, service: &str, name: &str) {
    let svc = client.service(service).unwrap();
    let first = client.send(&svc, b"first").unwrap();
    let second = client.send(&svc, b"second").unwrap();
    client.flush().unwrap();
    let (mut a, mut b) = (next_gate(gates), next_gate(gates));
    if a.0 != b"first" {
        std::mem::swap(&mut a, &mut b);
    }
    assert_eq!((a.0.as_slice(), b.0.as_slice()), (&b"first"[..], &b"second"[..]), "{name}");
    b.1.send(Ok(b"second done".to_vec())).unwrap();
    let Received { ticket, outcome: reply } = client.recv().unwrap();
    assert_eq!((ticket, reply.unwrap()), (second, b"second done".to_vec()), "{name}");
    a.1.send(Ok(b"first done".to_vec())).unwrap();
    let Received { ticket, outcome: reply } = client.recv().unwrap();
    assert_eq!((ticket, reply.unwrap()), (first, b"first done".to_vec()), "{name}");
}

#[test]
fn async_calls_complete_in_the_order_their_futures_end() {
    watchdog(TEST_LIMIT, || {
        let rt = runtime();
        let (handler, gates) = gated();
        let server = Embedded::start(|b| b.async_service("gated", rt.handle().clone(), handler));
        for transport in &server.transports()[..2] {
            out_of_order(&mut server.client(transport), &gates, "gated", transport.name());
        }
    });
}

#[test]
fn async_errors_keep_their_codes_and_panics_are_answered() {
    watchdog(TEST_LIMIT, || {
        let rt = runtime();
        let server = Embedded::start(|b| b.async_service("fallible", rt.handle().clone(), fallible));
        for transport in &server.transports()[..2] {
            let name = transport.name();
            let mut client = server.client(transport);
            let svc = client.service("fallible").unwrap();
            let remote = |code, message: &str| Err(CallError::Remote { code, message: message.into() });
            assert_eq!(client.call(&svc, b"ok"), Ok(b"fine".to_vec()), "{name}");
            assert_eq!(client.call(&svc, b"coded"), remote(Some(404), "no such key"), "{name}");
            assert_eq!(client.call(&svc, b"plain"), remote(None, "plain failure"), "{name}");
            for panicking in [&b"panic"[..], b"panic now"] {
                assert_eq!(client.call(&svc, panicking), remote(None, "service handler panicked"), "{name}");
            }
            // The panics cost the session and the runtime nothing.
            assert_eq!(client.call(&svc, b"ok"), Ok(b"fine".to_vec()), "{name}: after the panics");
        }
    });
}

/// A session with the cap's worth of async calls running has no further
/// future spawned until one ends, and then one more.
///
/// Certain, not timed: once the cap's worth of calls has come to the
/// handler, a round trip of another session through the same worker
/// proves the worker has served the capped session again (it was ahead in
/// the worker's queue), so without the cap the next call would have come.
#[test]
fn a_session_at_the_cap_has_no_more_futures_spawned() {
    watchdog(TEST_LIMIT, || {
        let rt = runtime();
        let (handler, gates) = gated();
        let server = Embedded::start(|b| b.async_service("gated", rt.handle().clone(), handler));
        let total = MAX_OUTSTANDING_CALLS + 3;
        for transport in &server.transports()[..2] {
            let name = transport.name();
            let (mut client, mut other) = (server.client(transport), server.client(transport));
            let svc = client.service("gated").unwrap();
            let tickets: Vec<_> = (0..total).map(|i| client.send(&svc, &(i as u32).to_le_bytes()).unwrap()).collect();
            client.flush().unwrap();
            let mut held: std::collections::VecDeque<Gate> =
                (0..MAX_OUTSTANDING_CALLS).map(|_| next_gate(&gates)).collect();
            let echo = other.service("echo").unwrap();
            let mut spawned_one_more = || {
                assert_eq!(other.call(&echo, b"round trip").unwrap(), b"round trip", "{name}");
                gates.try_recv().ok()
            };
            assert!(spawned_one_more().is_none(), "{name}: a future past the cap was spawned");
            for _ in MAX_OUTSTANDING_CALLS..total {
                let (payload, gate) = held.pop_front().unwrap();
                gate.send(Ok(payload)).unwrap();
                held.push_back(next_gate(&gates));
                assert!(spawned_one_more().is_none(), "{name}: one answer let two futures be spawned");
            }
            for (payload, gate) in held {
                gate.send(Ok(payload)).unwrap();
            }
            for (i, ticket) in tickets.into_iter().enumerate() {
                assert_eq!(client.wait(ticket).unwrap(), (i as u32).to_le_bytes(), "{name}");
            }
        }
    });
}

/// The message of the answer to a call still running when the stop gave
/// up on it.
const UNFINISHED: &str = "stopped before the handler finished";

#[test]
fn a_stop_answers_running_futures_as_unfinished_and_cancels_them() {
    watchdog(TEST_LIMIT, || {
        let rt = runtime();
        let (handler, started, dropped) = endless();
        let mut server = Embedded::start(|b| b.async_service("endless", rt.handle().clone(), handler));
        let mut calls: Vec<_> = server.transports()[..2]
            .iter()
            .map(|transport| {
                let mut client = server.client(transport);
                let svc = client.service("endless").unwrap();
                let ticket = client.send(&svc, b"").unwrap();
                client.flush().unwrap();
                started.recv_timeout(HANDED_LIMIT).expect("the future did not start");
                (transport.name(), client, ticket)
            })
            .collect();
        server.begin_stop();
        for (name, mut client, ticket) in calls.drain(..) {
            match client.wait(ticket) {
                Err(CallError::Remote { code: None, message }) => {
                    assert!(message.contains(UNFINISHED), "{name}: {message}")
                }
                other => panic!("{name}: a call whose future never ended got {other:?}"),
            }
            drop(client);
        }
        server.stop().expect("the server ran");
        for _ in 0..2 {
            dropped.recv_timeout(HANDED_LIMIT).expect("a future outlived the server");
        }
    });
}

#[test]
fn a_runtime_that_shuts_down_answers_its_calls_as_unfinished() {
    watchdog(TEST_LIMIT, || {
        let rt = runtime();
        let (handler, started, dropped) = endless();
        let server = Embedded::start(|b| b.async_service("endless", rt.handle().clone(), handler));
        let mut client = server.client(&server.transports()[0]);
        let svc = client.service("endless").unwrap();
        let running = client.send(&svc, b"").unwrap();
        client.flush().unwrap();
        started.recv_timeout(HANDED_LIMIT).expect("the future did not start");
        rt.shutdown_background();
        dropped.recv_timeout(HANDED_LIMIT).expect("the runtime's shutdown did not drop the future");
        let unfinished = |got: Result<Vec<u8>, CallError>, what: &str| match got {
            Err(CallError::Remote { code: None, message }) => {
                assert!(message.contains("dropped before it finished"), "{what}: {message}")
            }
            other => panic!("{what}: got {other:?}"),
        };
        unfinished(client.wait(running), "the call running as the runtime shut down");
        // Spawned onto a runtime that is gone, a future is dropped unrun.
        unfinished(client.call(&svc, b""), "a call after the runtime shut down");
        dropped.recv_timeout(HANDED_LIMIT).expect("the unrun future was not dropped");
    });
}

#[test]
fn a_provider_serves_async_calls_out_of_order_with_their_errors() {
    let (daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        let rt = runtime();
        let (handler, gates) = gated();
        let handle: Handle = rt.handle().clone();
        let _provider = InProcess::start(daemon.socket(), |b| {
            b.async_service("p.gated", handle.clone(), handler).async_service("p.fallible", handle, fallible)
        });
        // A provider's services are reached through the daemon's shared
        // memory (the daemon brokers no stream client to a provider).
        {
            let transport = Transport::Shm(ends.shm.clone());
            let name = transport.name();
            let mut client = connect(&transport, ClientOptions::default());
            out_of_order(&mut client, &gates, "p.gated", name);
            let svc = client.service("p.fallible").unwrap();
            assert_eq!(client.call(&svc, b"ok"), Ok(b"fine".to_vec()), "{name}");
            assert_eq!(
                client.call(&svc, b"coded"),
                Err(CallError::Remote { code: Some(404), message: "no such key".into() }),
                "{name}"
            );
            assert_eq!(
                client.call(&svc, b"panic"),
                Err(CallError::Remote { code: None, message: "service handler panicked".into() }),
                "{name}"
            );
        }
        drop(daemon);
    });
}
