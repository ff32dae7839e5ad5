//! The outcome the client library gives each request when things go
//! wrong around it, against the real daemon on every transport: a request
//! that never found room is not sent, and says so.

mod common;

use std::time::{Duration, Instant};

use common::{connect, pattern, start_with_streams, wait_worker_in_handler, watchdog, TEST_LIMIT};
use ipc_client::{CallError, Client, ClientOptions, Ticket};

/// Generates, for each test function below that takes a transport name,
/// one test per transport: `shm::name`, `uds::name`, `tcp::name`.
macro_rules! on_every_transport {
    ($($test:ident),* $(,)?) => {
        mod shm {
            $(#[test] fn $test() { super::$test("shm") })*
        }
        mod uds {
            $(#[test] fn $test() { super::$test("uds") })*
        }
        mod tcp {
            $(#[test] fn $test() { super::$test("tcp") })*
        }
    };
}

on_every_transport!(a_request_that_never_finds_room_is_not_sent);

/// How long a test waits for a reply it knows is coming.
const PATIENCE: Duration = Duration::from_secs(30);

/// `recv`, retried on timeouts (the requests stay in flight) for up to
/// [`PATIENCE`].
fn recv_patiently(client: &mut Client) -> (Ticket, Result<Vec<u8>, CallError>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match client.recv() {
            Ok(got) => return got,
            Err(CallError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("{}: recv failed: {e}", client.transport()),
        }
    }
}

/// One worker, held by another client's handler: nothing this client sends
/// is taken, so its link fills and stays full. A `send` or a call that
/// finds no room in time is `SendTimeout` (not sent), never `Timeout`
/// (which means the request may still run); what was sent before is
/// answered once the worker is free.
fn a_request_that_never_finds_room_is_not_sent(name: &'static str) {
    const HOLD_MS: u32 = 3000;
    let (daemon, ends) = start_with_streams(&["--workers", "1", "--debug-services"]);
    let transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let mut holder = connect(&ends.transport("shm"), ClientOptions::default());
        let sleep = holder.service("debug.sleep").unwrap();
        let held = holder.send(&sleep, &HOLD_MS.to_le_bytes()).unwrap();
        holder.flush().unwrap();
        if !wait_worker_in_handler(daemon.pid(), Duration::from_secs(10)) {
            std::thread::sleep(Duration::from_millis(300));
        }

        let limit = Duration::from_millis(100);
        let options = ClientOptions::default().ring_capacity(4096).call_timeout(limit);
        let mut client = connect(&transport, options);
        let echo = client.service("echo").unwrap();
        let request = pattern(7, client.max_payload().min(1000));
        // Sent until one finds no room; a stream holds the socket buffers'
        // worth (megabytes over TCP).
        let mut sent = Vec::new();
        let err = loop {
            assert!(sent.len() < 100_000, "{name}: {} requests sent and the link never filled", sent.len());
            match client.send(&echo, &request) {
                Ok(ticket) => sent.push(ticket),
                Err(e) => break e,
            }
        };
        assert_eq!(err, CallError::SendTimeout { after: limit, in_flight: sent.len() }, "{name}");
        assert!(err.to_string().contains("not sent"), "{name}: {err}");
        // A call is refused the same way, and neither is in flight.
        let result = client.call(&echo, &request);
        assert_eq!(result, Err(CallError::SendTimeout { after: limit, in_flight: sent.len() }), "{name}");
        assert_eq!(client.in_flight(), sent.len(), "{name}");
        assert!(client.is_connected(), "{name}");

        // Once the worker is free, each request sent gets its reply, once.
        assert_eq!(holder.wait(held), Ok(Vec::new()));
        let mut waiting: std::collections::HashSet<Ticket> = sent.into_iter().collect();
        while !waiting.is_empty() {
            let (ticket, outcome) = recv_patiently(&mut client);
            assert!(waiting.remove(&ticket), "{name}: {ticket:?} came back twice or was never sent");
            assert_eq!(outcome.as_deref(), Ok(&request[..]), "{name}: {ticket:?}");
        }
        assert_eq!(client.recv(), Err(CallError::NothingInFlight), "{name}");
    });
}
