//! Pipelined calls through the client library against the real daemon, on
//! every transport: a window of requests in flight comes back once each,
//! in any order the caller asks for; a full link is reported or waited out
//! without deadlock; replies read in place release their space; a ticket
//! given up on stays given up; a flush alone delivers what was queued; and
//! a daemon that dies mid-window ends every ticket.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{
    connect, json_u64, pattern, poll_until, start_with_streams, stats_json, watchdog, CLEANUP_LIMIT, TEST_LIMIT,
};
use ipc_client::{CallError, Client, ClientOptions, Received, Ticket};

on_every_transport!(
    window_of_32_comes_back_once_each_through_recv,
    wait_in_reverse_order_then_again,
    try_send_reports_full_and_recv_makes_room,
    send_far_beyond_the_ring_does_not_deadlock,
    call_with_writes_and_reads_in_place,
    call_with_releases_each_reply_when_the_guard_drops,
    timed_out_wait_abandons_its_ticket,
    flush_hands_queued_requests_to_the_daemon,
    daemon_gone_mid_window_ends_every_ticket,
);

/// Starts a daemon with `args` and runs `body` under the watchdog with a
/// client over transport `name`.
fn with_client<F>(name: &'static str, args: &[&str], options: ClientOptions, body: F)
where
    F: FnOnce(&mut Client) + Send + 'static,
{
    let (_daemon, ends) = start_with_streams(args);
    let transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, options);
        body(&mut client);
    });
}

/// Receives until every ticket in `expected` has come back once with its
/// payload, then checks that nothing else is in flight.
fn recv_all(client: &mut Client, mut expected: HashMap<Ticket, Vec<u8>>) {
    let name = client.transport();
    while !expected.is_empty() {
        let Received { ticket, outcome } = client.recv().unwrap_or_else(|e| panic!("{name}: recv failed: {e}"));
        let want = expected.remove(&ticket).unwrap_or_else(|| panic!("{name}: {ticket:?} came back twice or unasked"));
        let reply = outcome.unwrap_or_else(|e| panic!("{name}: {ticket:?} failed: {e}"));
        assert!(reply == want, "{name}: {ticket:?} got another request's reply");
    }
    assert_eq!(client.in_flight(), 0, "{name}");
    assert_eq!(client.recv().unwrap_err(), CallError::NothingInFlight, "{name}");
}

fn window_of_32_comes_back_once_each_through_recv(name: &'static str) {
    with_client(name, &[], ClientOptions::default(), move |client| {
        let echo = client.service("echo").unwrap();
        let mut expected = HashMap::new();
        for i in 0..32u64 {
            let request = pattern(i, 64 + i as usize * 13);
            let ticket = client.send(&echo, &request).unwrap();
            assert!(expected.insert(ticket, request).is_none(), "{name}: ticket {ticket:?} handed out twice");
            assert_eq!(client.in_flight(), i as usize + 1, "{name}");
        }
        recv_all(client, expected);

        // The same with requests written in place, and through recv_into.
        let mut expected = HashMap::new();
        for i in 0..32u64 {
            let request = pattern(100 + i, 200);
            let ticket = client.send_with(&echo, request.len(), |buf| buf.write_at(0, &request)).unwrap();
            expected.insert(ticket, request);
        }
        let mut reply = Vec::new();
        while !expected.is_empty() {
            let Received { ticket, outcome } = client.recv_into(&mut reply).unwrap();
            outcome.unwrap();
            assert!(expected.remove(&ticket).is_some_and(|want| want == reply), "{name}: {ticket:?}");
        }
        assert_eq!(client.recv_into(&mut reply).unwrap_err(), CallError::NothingInFlight, "{name}");
    });
}

fn wait_in_reverse_order_then_again(name: &'static str) {
    with_client(name, &["--debug-services"], ClientOptions::default(), move |client| {
        let echo = client.service("echo").unwrap();
        let fail = client.service("debug.fail").unwrap();
        let mut sent = Vec::new();
        for i in 0..32u64 {
            let request = pattern(i, 300);
            sent.push((client.send(&echo, &request).unwrap(), request));
        }
        // An error in the middle of the window, kept aside like the rest.
        let failing = client.send(&fail, b"xyz").unwrap();
        // Waiting for the last first leaves every other reply kept aside.
        let mut reply = Vec::new();
        for (ticket, request) in sent.iter().rev() {
            client.wait_into(*ticket, &mut reply).unwrap();
            assert!(reply == *request, "{name}: {ticket:?} got another request's reply");
        }
        assert!(matches!(client.wait(failing), Err(CallError::Remote { .. })), "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
        for (ticket, _) in sent.iter().chain([(failing, Vec::new())].iter()) {
            assert_eq!(client.wait(*ticket), Err(CallError::UnknownTicket { id: ticket.id() }), "{name}");
        }
        assert_eq!(client.recv().unwrap_err(), CallError::NothingInFlight, "{name}");
        assert_eq!(client.call(&echo, b"then a call").unwrap(), b"then a call", "{name}");
    });
}

fn try_send_reports_full_and_recv_makes_room(name: &'static str) {
    // Enough sends after the first Full that room must have been made
    // several times over.
    const AFTER_FULL: usize = 64;
    // On TCP the kernel buffers hold megabytes before a send is refused.
    const LIMIT: usize = 200_000;
    let options = ClientOptions::default().ring_capacity(4096);
    with_client(name, &[], options, move |client| {
        let echo = client.service("echo").unwrap();
        let mut expected = HashMap::new();
        let (mut attempts, mut fulls, mut sent_after_full, mut received) = (0u64, 0, 0, 0);
        while sent_after_full < AFTER_FULL {
            assert!(expected.len() + received < LIMIT, "{name}: {LIMIT} requests and try_send never said Full");
            attempts += 1;
            let request = pattern(attempts, 1000);
            match client.try_send(&echo, &request) {
                Ok(ticket) => {
                    assert!(expected.insert(ticket, request).is_none(), "{name}: ticket {ticket:?} handed out twice");
                    if fulls > 0 {
                        sent_after_full += 1;
                    }
                }
                Err(CallError::Full { in_flight }) => {
                    fulls += 1;
                    assert_eq!(in_flight, expected.len(), "{name}: Full counts another number in flight");
                    assert_eq!(in_flight, client.in_flight(), "{name}");
                    // Take one reply; the daemon can then move on.
                    let Received { ticket, outcome } = client.recv().unwrap();
                    let want = expected.remove(&ticket).unwrap_or_else(|| panic!("{name}: {ticket:?} came back twice"));
                    assert!(outcome.unwrap() == want, "{name}: {ticket:?} got another request's reply");
                    received += 1;
                }
                Err(e) => panic!("{name}: try_send failed: {e}"),
            }
        }
        assert!(fulls > 0, "{name}");
        recv_all(client, expected);
    });
}

fn send_far_beyond_the_ring_does_not_deadlock(name: &'static str) {
    // Shared memory: 50 rings' worth. Streams: beyond the socket buffers
    // too (a few hundred KiB for a Unix socket), so the daemon's replies
    // back up while the client is still sending.
    let requests: u64 = if name == "shm" { 200 } else { 2000 };
    // Never spinning, on either side, so every wait goes to sleep.
    let options = ClientOptions::default().ring_capacity(4096).spin(Duration::ZERO);
    with_client(name, &["--spin-us", "0"], options, move |client| {
        let echo = client.service("echo").unwrap();
        let mut expected = HashMap::new();
        for i in 0..requests {
            let request = pattern(i, 1000);
            let ticket = client.send(&echo, &request).unwrap_or_else(|e| panic!("{name}: send {i} failed: {e}"));
            expected.insert(ticket, request);
        }
        assert_eq!(client.in_flight(), requests as usize, "{name}");
        recv_all(client, expected);
    });
}

fn call_with_writes_and_reads_in_place(name: &'static str) {
    with_client(name, &["--debug-services"], ClientOptions::default(), move |client| {
        let echo = client.service("echo").unwrap();

        // Out of order with write_at, read back with read_at.
        let reply = client
            .call_with(&echo, 16, |buf| {
                assert_eq!(buf.len(), 16);
                buf.write_at(8, &0xFEED_u64.to_le_bytes());
                buf.write_at(0, &0xBEEF_u64.to_le_bytes());
            })
            .unwrap();
        assert_eq!(reply.len(), 16, "{name}");
        let (mut first, mut second) = ([0u8; 8], [0u8; 8]);
        reply.read_at(0, &mut first);
        reply.read_at(8, &mut second);
        assert_eq!((u64::from_le_bytes(first), u64::from_le_bytes(second)), (0xBEEF, 0xFEED), "{name}");
        drop(reply);

        // Sequentially through io::Write, read back through io::Read.
        let text = format!("written through io::Write over {name}");
        let len = text.len() + 8;
        let mut reply = client
            .call_with(&echo, len, |buf| {
                write!(buf, "{text}").unwrap();
                buf.write_all(&7u64.to_le_bytes()).unwrap();
                // Past the end a write is cut short.
                assert_eq!(buf.write(b"overflow").unwrap(), 0);
            })
            .unwrap();
        let mut back = Vec::new();
        reply.read_to_end(&mut back).unwrap();
        assert_eq!(&back[..text.len()], text.as_bytes(), "{name}");
        assert_eq!(back[text.len()..], 7u64.to_le_bytes(), "{name}");
        assert_eq!(reply.read(&mut [0u8; 4]).unwrap(), 0, "{name}: read past the end");
        assert_eq!(reply.to_vec(), back, "{name}");
        let mut copy = vec![1, 2, 3];
        reply.copy_into(&mut copy);
        assert_eq!(copy, back, "{name}");
        drop(reply);

        // An empty reply.
        let ping = client.service("ping").unwrap();
        let reply = client.call_with(&ping, 3, |buf| buf.write_at(0, b"abc")).unwrap();
        assert!(reply.is_empty(), "{name}");
        assert_eq!(reply.len(), 0, "{name}");
        drop(reply);

        // An error reply is the call's error, and leaves nothing held.
        let fail = client.service("debug.fail").unwrap();
        let err = client.call_with(&fail, 5, |buf| buf.write_at(0, b"fails")).unwrap_err();
        assert!(matches!(&err, CallError::Remote { message, .. } if message.contains("debug.fail")), "{name}: {err:?}");
        let reply = client.call_with(&echo, 5, |buf| buf.write_at(0, b"works")).unwrap();
        assert_eq!(reply.to_vec(), b"works", "{name}");
        drop(reply);

        // With other requests in flight, their replies are kept for later.
        let queued = client.send(&echo, b"queued before").unwrap();
        let reply = client.call_with(&echo, 6, |buf| buf.write_at(0, b"inside")).unwrap();
        assert_eq!(reply.to_vec(), b"inside", "{name}");
        drop(reply);
        assert_eq!(client.wait(queued).unwrap(), b"queued before", "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
    });
}

fn call_with_releases_each_reply_when_the_guard_drops(name: &'static str) {
    const CALLS: u64 = 10_000;
    const LEN: usize = 1500;
    // Two replies of 1500 bytes fill a 4 KiB ring: each call needs the
    // space of the replies before it back.
    let options = ClientOptions::default().ring_capacity(4096);
    with_client(name, &[], options, move |client| {
        let echo = client.service("echo").unwrap();
        let mut word = [0u8; 8];
        for i in 0..CALLS {
            let reply = client
                .call_with(&echo, LEN, |buf| {
                    buf.write_at(0, &i.to_le_bytes());
                    buf.write_at(LEN - 8, &(!i).to_le_bytes());
                })
                .unwrap_or_else(|e| panic!("{name}: call {i} failed: {e}"));
            assert_eq!(reply.len(), LEN, "{name}: call {i}");
            reply.read_at(0, &mut word);
            assert_eq!(u64::from_le_bytes(word), i, "{name}: call {i}: another call's reply");
            reply.read_at(LEN - 8, &mut word);
            assert_eq!(u64::from_le_bytes(word), !i, "{name}: call {i}: another call's reply");
        }
    });
}

fn timed_out_wait_abandons_its_ticket(name: &'static str) {
    let limit = Duration::from_millis(100);
    let options = ClientOptions::default().call_timeout(limit);
    with_client(name, &["--debug-services"], options, move |client| {
        let sleep = client.service("debug.sleep").unwrap();
        let echo = client.service("echo").unwrap();
        // The session serves in order: the echo waits behind the sleep.
        let slow = 400u32.to_le_bytes();

        // The slow request is given up on; the one behind it is not.
        let given_up = client.send(&sleep, &slow).unwrap();
        let behind = client.send(&echo, b"behind").unwrap();
        assert_eq!(client.wait(given_up), Err(CallError::Timeout { after: limit }), "{name}");
        assert_eq!(client.in_flight(), 1, "{name}");
        assert_eq!(client.wait(given_up), Err(CallError::UnknownTicket { id: given_up.id() }), "{name}");
        let Received { ticket, outcome } = recv_patiently(client);
        assert_eq!((ticket, outcome), (behind, Ok(b"behind".to_vec())), "{name}");
        assert_eq!(client.recv().unwrap_err(), CallError::NothingInFlight, "{name}");

        // Now the one behind is given up on: its late reply comes after the
        // slow one's and must not be taken for a later call's.
        let slow_ticket = client.send(&sleep, &slow).unwrap();
        let given_up = client.send(&echo, b"given up").unwrap();
        assert_eq!(client.wait(given_up), Err(CallError::Timeout { after: limit }), "{name}");
        let Received { ticket, outcome } = recv_patiently(client);
        assert_eq!((ticket, outcome), (slow_ticket, Ok(Vec::new())), "{name}");
        assert_eq!(client.recv().unwrap_err(), CallError::NothingInFlight, "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
        let reply = client.call_timeout(&echo, b"fresh", Duration::from_secs(10));
        assert_eq!(reply.as_deref(), Ok(&b"fresh"[..]), "{name}");
        let reply = client.call_timeout(&echo, b"fresh again", Duration::from_secs(10));
        assert_eq!(reply.as_deref(), Ok(&b"fresh again"[..]), "{name}");
    });
}

/// `recv` with a short call timeout, retried on timeouts (the requests stay
/// in flight) for up to ten seconds.
fn recv_patiently(client: &mut Client) -> Received {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.recv() {
            Ok(got) => return got,
            Err(CallError::Timeout { .. }) if Instant::now() < deadline => {}
            Err(e) => panic!("{}: recv failed: {e}", client.transport()),
        }
    }
}

fn flush_hands_queued_requests_to_the_daemon(name: &'static str) {
    const REQUESTS: u64 = 32;
    let (_daemon, ends) = start_with_streams(&["--debug-services"]);
    let transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, ClientOptions::default());
        let mut observer = connect(&ends.transport("shm"), ClientOptions::default());
        // Each debug.fail request bumps the error count, which the
        // observer's own stats calls never do.
        let errors = |observer: &mut Client| json_u64(&stats_json(observer), "errors");
        assert_eq!(errors(&mut observer), 0);
        let fail = client.service("debug.fail").unwrap();
        let tickets: Vec<Ticket> = (0..REQUESTS).map(|i| client.send(&fail, &pattern(i, 100)).unwrap()).collect();
        client.flush().unwrap();
        // Nothing is waited for or received: the flush alone must deliver.
        let delivered = poll_until(CLEANUP_LIMIT, || errors(&mut observer) == REQUESTS);
        assert!(delivered, "{name}: after the flush: {}", stats_json(&mut observer));
        for ticket in tickets {
            let err = client.wait(ticket).unwrap_err();
            assert!(
                matches!(&err, CallError::Remote { message, .. } if message.contains("100 bytes")),
                "{name}: {err:?}"
            );
        }
        assert_eq!(client.in_flight(), 0, "{name}");
    });
}

fn daemon_gone_mid_window_ends_every_ticket(name: &'static str) {
    let (mut daemon, ends) = start_with_streams(&["--workers", "1", "--debug-services"]);
    let transport = ends.transport(name);
    let mut client = connect(&transport, ClientOptions::default());
    let sleep = client.service("debug.sleep").unwrap();
    let echo = client.service("echo").unwrap();
    // The sleep holds the only worker, so nothing after it is answered.
    let mut tickets = vec![client.send(&sleep, &5000u32.to_le_bytes()).unwrap()];
    tickets.extend((0..8u64).map(|i| client.send(&echo, &pattern(i, 50)).unwrap()));
    client.flush().unwrap();
    common::expect_worker_in_handler(daemon.pid());
    daemon.kill();
    watchdog(TEST_LIMIT, move || {
        // Every ticket gets exactly one outcome, in order: disconnected,
        // since the daemon died without saying what it ran.
        for &ticket in &tickets {
            let Received { ticket: got, outcome } = client.recv().unwrap_or_else(|e| panic!("{name}: recv gave {e:?}"));
            assert_eq!(got, ticket, "{name}");
            assert!(matches!(outcome, Err(CallError::Disconnected { .. })), "{name}: recv gave {outcome:?}");
        }
        assert!(matches!(client.recv(), Err(CallError::NothingInFlight)), "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
        // A second wait has no outcome left to give.
        for ticket in tickets {
            let result = client.wait(ticket);
            assert!(matches!(result, Err(CallError::UnknownTicket { .. })), "{name}: wait gave {result:?}");
        }
        // A broken client without a reconnect policy sends nothing more,
        // and says so at once.
        assert!(!client.is_connected(), "{name}");
        let result = client.call(&echo, b"after");
        assert!(matches!(result, Err(CallError::NotConnected { .. })), "{name}: call gave {result:?}");
        let result = client.try_send(&echo, b"after");
        assert!(matches!(result, Err(CallError::NotConnected { .. })), "{name}: try_send gave {result:?}");
    });
}
