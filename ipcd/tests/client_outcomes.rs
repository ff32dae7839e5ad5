//! The outcome the client library gives each request when things go
//! wrong around it, against the real daemon: a request that never found
//! room is not sent, and says so (on every transport); and a client
//! blocked for room in its ring when the daemon stops on purpose reads
//! every reply the daemon left before it decides the rest, so each request
//! ends with its reply or `Shutdown`, once.

mod common;

use std::collections::{HashMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    connect, join_within, json_u64, pattern, poll_until, start_with_streams, stats_json, wait_worker_in_handler,
    watchdog, EXIT_LIMIT, TEST_LIMIT,
};
use ipc_client::{CallError, Client, ClientOptions, Received, Ticket};

/// Generates, for each test function below that takes a transport name,
/// one test per transport listed: `shm::name`, `uds::name`, `tcp::name`.
macro_rules! on_transports {
    ($($transport:ident: [$($test:ident),* $(,)?]),* $(,)?) => {
        $(mod $transport {
            $(#[test] fn $test() { super::$test(stringify!($transport)) })*
        })*
    };
}

on_transports!(
    shm: [
        a_request_that_never_finds_room_is_not_sent,
        sigterm_while_blocked_for_room_gives_every_request_its_reply_or_shutdown,
        sigterm_while_small_requests_fill_the_reply_path_gives_each_its_reply_or_shutdown,
    ],
    uds: [
        a_request_that_never_finds_room_is_not_sent,
        sigterm_while_blocked_for_room_gives_every_request_its_reply_or_shutdown,
        sigterm_while_small_requests_fill_the_reply_path_gives_each_its_reply_or_shutdown,
    ],
    tcp: [
        a_request_that_never_finds_room_is_not_sent,
        sigterm_while_blocked_for_room_gives_every_request_its_reply_or_shutdown,
        sigterm_while_small_requests_fill_the_reply_path_gives_each_its_reply_or_shutdown,
    ],
);

/// How long a test waits for a reply it knows is coming.
const PATIENCE: Duration = Duration::from_secs(30);

/// `recv`, retried on timeouts (the requests stay in flight) for up to
/// [`PATIENCE`].
fn recv_patiently(client: &mut Client) -> Received {
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
    // The longest debug.sleep: the link stays full well past the two
    // refusals below, however loaded the machine.
    const HOLD_MS: u32 = 10_000;
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
        let mut waiting: HashSet<Ticket> = sent.into_iter().collect();
        while !waiting.is_empty() {
            let Received { ticket, outcome } = recv_patiently(&mut client);
            assert!(waiting.remove(&ticket), "{name}: {ticket:?} came back twice or was never sent");
            assert_eq!(outcome.as_deref(), Ok(&request[..]), "{name}: {ticket:?}");
        }
        assert_eq!(client.recv(), Err(CallError::NothingInFlight), "{name}");
    });
}

/// What the pipelining thread of the SIGTERM test saw.
struct Sent {
    /// Each ticket with its request's payload.
    tickets: Vec<(Ticket, Vec<u8>)>,
    /// The send that was refused, if one was.
    refused: Option<CallError>,
    /// Every outcome `recv` handed out afterwards, in order.
    outcomes: Vec<(Ticket, Result<Vec<u8>, CallError>)>,
}

/// One worker, which a holder client keeps busy with synchronous
/// `debug.sleep` calls; a second client pipelines echo requests into a
/// 4 KiB ring (four fill it) and so spends its time blocked for room, its
/// requests served between the holder's. The daemon gets SIGTERM: it finishes the handler it runs,
/// answers what is waiting with a shutdown error, says which request it
/// took last, and hangs up.
///
/// Every request sent ends with its own reply or `Shutdown`, exactly once:
/// none `Disconnected` (the daemon said what it ran), none lost. The send
/// blocked at the loss was not sent: `Shutdown` too. The holder's calls
/// end the same way.
///
/// Here the requests (1000 bytes) are larger than the daemon's shutdown
/// answers, so the request ring fills first.
fn sigterm_while_blocked_for_room_gives_every_request_its_reply_or_shutdown(name: &'static str) {
    sigterm_while_pipelining(name, 1000);
}

/// As above with requests (16 bytes) smaller than the shutdown answers, so
/// that the answers to what waits overflow the reply path: the daemon takes
/// a request only if its answer fits (else it is left, known not run), and
/// drains what did not fit before it says which request it took last (on a
/// stream, the last answers and the closing frame wait in its output while
/// the client reads).
fn sigterm_while_small_requests_fill_the_reply_path_gives_each_its_reply_or_shutdown(name: &'static str) {
    sigterm_while_pipelining(name, 16);
}

fn sigterm_while_pipelining(name: &'static str, payload: usize) {
    const HOLD_MS: u32 = 20;
    // Requests the daemon has answered before the SIGTERM: a hundred
    // rings' worth, the client having waited for room as often.
    const SERVED_BEFORE_SIGTERM: u64 = 400;
    let (mut daemon, ends) = start_with_streams(&["--workers", "1", "--debug-services"]);
    let transport = ends.transport(name);
    let mut client = connect(&transport, ClientOptions::default().ring_capacity(4096));
    let mut holder = connect(&ends.transport("shm"), ClientOptions::default());
    let mut observer = connect(&ends.transport("shm"), ClientOptions::default());
    let holding = thread::spawn(move || {
        let sleep = holder.service("debug.sleep").unwrap();
        let mut replied = 0;
        loop {
            match holder.call(&sleep, &HOLD_MS.to_le_bytes()) {
                Ok(_) => replied += 1,
                Err(e) => return (replied, e),
            }
        }
    });
    let pipelining = {
        thread::spawn(move || {
            let echo = client.service("echo").unwrap();
            let mut tickets = Vec::new();
            let refused = loop {
                let request = pattern(tickets.len() as u64, payload);
                match client.send(&echo, &request) {
                    Ok(ticket) => tickets.push((ticket, request)),
                    Err(e) => break Some(e),
                }
            };
            let mut outcomes = Vec::new();
            loop {
                match client.recv() {
                    Ok(got) => outcomes.push((got.ticket, got.outcome)),
                    Err(CallError::NothingInFlight) => break,
                    Err(e) => panic!("recv failed after {} outcomes: {e}", outcomes.len()),
                }
            }
            assert_eq!(client.in_flight(), 0);
            Sent { tickets, refused, outcomes }
        })
    };
    let mut served = || json_u64(&stats_json(&mut observer), "requests");
    let busy = poll_until(TEST_LIMIT, || served() >= SERVED_BEFORE_SIGTERM || pipelining.is_finished());
    assert!(busy && !pipelining.is_finished(), "{name}: the client stopped sending early");
    let status = daemon.terminate();
    assert!(status.success(), "{name}: ipcd exited with {status}");
    let limit = TEST_LIMIT - EXIT_LIMIT;
    let Sent { tickets, refused, outcomes } = join_within(pipelining, limit, "the pipelining client");
    let (held, holder_end) = join_within(holding, limit, "the holder");
    assert!(held > 0, "{name}: the holder's calls never ran");
    assert_eq!(holder_end, CallError::Shutdown, "{name}: the holder's last call");

    // A ring nobody takes from fills: the client was always refused in the
    // end, and refused as not run.
    assert_eq!(refused, Some(CallError::Shutdown), "{name}: the send blocked at the loss");
    let mut waiting: HashMap<Ticket, Vec<u8>> = tickets.into_iter().collect();
    let (mut replied, mut shutdown) = (0, 0);
    for (ticket, outcome) in &outcomes {
        let request = waiting
            .remove(ticket)
            .unwrap_or_else(|| panic!("{name}: {ticket:?} has a second outcome (or was never sent)"));
        match outcome {
            Ok(reply) if *reply == request => replied += 1,
            Err(CallError::Shutdown) => shutdown += 1,
            Ok(_) => panic!("{name}: {ticket:?} got another request's reply"),
            Err(e) => panic!("{name}: {ticket:?} ended {e:?}; replied {replied}, shutdown {shutdown} before it"),
        }
    }
    assert!(waiting.is_empty(), "{name}: {} tickets got no outcome", waiting.len());
    assert!(replied > 0, "{name}: replied {replied}, shutdown {shutdown}");
}
