//! Streams against scripted daemons, over shared memory and a Unix socket
//! alike: items in order within the credit, and each terminal outcome
//! (end, handler error, refusal, cancel, drop, deadline, loss, shutdown).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc_core::message::FLAG_STREAM;
use ipc_core::{ErrorCode, FrameHeader};

use crate::scripted::{options, reply_to, Frames, Peer, Scripted, Served, Wire, CAPACITY, WIRES};
use crate::{CallError, Client, StreamOptions};

/// Item `seq` of a stream: every fifth is longer than a frame (it comes in
/// chunks); its bytes say which it is.
fn item(seq: u64, max: usize) -> Vec<u8> {
    let len = if seq % 5 == 4 { 2 * max + 3 } else { 8 };
    (0..len as u64).map(|i| (i.wrapping_mul(31).wrapping_add(seq.wrapping_mul(7))) as u8).collect()
}

fn start(wire: Wire, script: impl FnOnce(Peer) + Send + 'static) -> (Scripted, Client) {
    let daemon = Scripted::start_on(wire, CAPACITY, script);
    let client = daemon.client_with(options());
    (daemon, client)
}

/// Takes the next request (one frame) and answers it with [`reply_to`].
fn serve_call(d: &mut Peer) {
    let (head, _, _) = d.take_message();
    d.send_message(head.service, head.request_id, &reply_to(head.request_id));
}

/// Forty items, some in chunks, with a window of four: they come in
/// order, the daemon never has more credit than the items taken plus the
/// window, and the end comes once.
#[test]
fn items_come_in_order_within_the_window_then_the_end_once() {
    const ITEMS: u64 = 40;
    const WINDOW: u32 = 4;
    for wire in WIRES {
        let granted = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&granted);
        let (daemon, mut client) = start(wire, move |mut d| {
            let max = d.max_payload();
            let (opened, open, request) = d.take_open();
            assert_eq!((open.credit, open.deadline_ms, &request[..]), (WINDOW, 0, &b"count"[..]));
            let items = (0..ITEMS).map(|seq| item(seq, max));
            let served = d.serve_items(&opened, open, items, |g| seen.store(g, Ordering::SeqCst));
            assert_eq!((served.sent, served.cancelled), (ITEMS, false));
            d.end_stream(&opened, Ok(()));
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut stream = client.stream_with(&echo, b"count", StreamOptions::default().window(WINDOW)).unwrap();
        let mut taken = 0;
        while let Some(got) = stream.next(&mut client).unwrap() {
            assert!(got == item(taken, max), "{wire:?}: item {taken} differs");
            taken += 1;
            let credit = granted.load(Ordering::SeqCst);
            assert!(credit <= taken + u64::from(WINDOW), "{wire:?}: credit {credit} after {taken} items taken");
            let outstanding = client.calls.outstanding_credit(stream.key);
            assert!(outstanding.is_none_or(|n| n <= u64::from(WINDOW)), "{wire:?}: {outstanding:?} outstanding");
        }
        assert_eq!(taken, ITEMS, "{wire:?}");
        assert!(stream.is_finished());
        assert_eq!(stream.next(&mut client), Err(CallError::UnknownTicket { id: stream.id() }), "after the end");
        assert_eq!(client.open_streams(), 0);
        daemon.finish();
    }
}

/// Items that come while the caller makes another call are read aside and
/// grant no credit: credit follows what the caller takes. The call is
/// answered meanwhile.
#[test]
fn items_read_aside_grant_no_credit_and_calls_go_on() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let (opened, open, _) = d.take_open();
            assert_eq!(open.credit, 2);
            d.send_item(&opened, &item(0, max));
            d.send_item(&opened, &item(1, max));
            // No credit before the call: the items were not taken yet.
            let call = d.take();
            assert_eq!(call.header.flags, 0, "the call's request, not a credit: {:?}", call.header);
            d.send_message(call.header.service, call.header.request_id, &reply_to(call.header.request_id));
            let mut served = Served { sent: 2, granted: 2, cancelled: false };
            while served.granted < 4 {
                assert!(d.take_control(&opened, &mut served), "a credit, not a cancel");
            }
            assert_eq!(served.granted, 4, "credit for the two items taken");
            d.send_item(&opened, &item(2, max));
            d.send_item(&opened, &item(3, max));
            d.end_stream(&opened, Ok(()));
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut stream = client.stream_with(&echo, b"", StreamOptions::default().window(2)).unwrap();
        assert_eq!(client.call(&echo, b"meanwhile").unwrap(), reply_to(2), "{wire:?}");
        for seq in 0..4 {
            assert_eq!(stream.next(&mut client).unwrap(), Some(item(seq, max)), "{wire:?}");
        }
        assert_eq!(stream.next(&mut client), Ok(None));
        daemon.finish();
    }
}

/// A handler's error ends a stream after its items; a daemon at its cap
/// refuses one (`TooMany`), with a terminal frame or a plain error reply;
/// the client's own cap refuses one before anything is sent.
#[test]
fn errors_and_refusals_are_the_terminal_outcome() {
    for wire in WIRES {
        let daemon = Scripted::start_on(wire, CAPACITY, |mut d| {
            let max = d.max_payload();
            let (a, _, _) = d.take_open();
            let (b, _, _) = d.take_open();
            for seq in 0..3 {
                d.send_item(&a, &item(seq, max));
            }
            d.end_stream(&a, Err((ErrorCode::Application(7), "no more")));
            d.end_stream(&b, Err((ErrorCode::TooMany, "64 streams open")));
            // A refusal as a plain error reply, as to any request.
            let (c, _, _) = d.take_open();
            let mut body = Vec::new();
            ipc_core::encode_error(ErrorCode::TooMany, "busy", &mut body);
            d.send(c.service, ipc_core::FLAG_ERROR, c.request_id, &body);
            serve_call(&mut d);
        });
        let mut client = daemon.client_with(options().max_streams(2));
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut a = client.stream(&echo, b"a").unwrap();
        let mut b = client.stream(&echo, b"b").unwrap();
        assert_eq!(client.stream(&echo, b"c").unwrap_err(), CallError::TooManyStreams { max: 2 }, "{wire:?}");
        for seq in 0..3 {
            assert_eq!(a.next(&mut client).unwrap(), Some(item(seq, max)), "{wire:?}");
        }
        assert_eq!(a.next(&mut client), Err(CallError::Remote { code: Some(7), message: "no more".into() }));
        assert_eq!(b.next(&mut client), Err(CallError::TooMany { message: "64 streams open".into() }));
        let mut c = client.stream(&echo, b"c").unwrap();
        assert_eq!(c.next(&mut client), Err(CallError::TooMany { message: "busy".into() }), "{wire:?}");
        assert_eq!(client.open_streams(), 0);
        assert_eq!(client.call(&echo, b"then").unwrap(), reply_to(4), "{wire:?}");
        daemon.finish();
    }
}

/// The daemon's side of a stream the caller gives up on: items until the
/// cancel comes (none beyond the credit), then the end it owes, then a
/// call.
fn serve_until_cancelled(d: &mut Peer) {
    let max = d.max_payload();
    let (opened, open, _) = d.take_open();
    let served = d.serve_items(&opened, open, (0..10_000).map(|seq| item(seq, max)), |_| {});
    assert!(served.cancelled, "the stream was cancelled after {} items", served.sent);
    d.end_stream(&opened, Err((ErrorCode::Cancelled, "cancelled")));
    serve_call(d);
}

#[test]
fn a_cancel_ends_the_stream_and_what_comes_after_is_dropped() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| serve_until_cancelled(&mut d));
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut stream = client.stream_with(&echo, b"", StreamOptions::default().window(4)).unwrap();
        for seq in 0..3 {
            assert_eq!(stream.next(&mut client).unwrap(), Some(item(seq, max)), "{wire:?}");
        }
        stream.cancel(&mut client);
        assert_eq!(stream.next(&mut client), Err(CallError::Cancelled), "{wire:?}");
        assert_eq!(stream.next(&mut client), Err(CallError::UnknownTicket { id: 1 }));
        assert_eq!(client.call(&echo, b"then").unwrap(), reply_to(2), "{wire:?}");
        assert_eq!(client.open_streams(), 0, "{wire:?}: the daemon's end retired it");
        daemon.finish();
    }
}

#[test]
fn a_dropped_stream_is_cancelled_before_the_next_request() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| serve_until_cancelled(&mut d));
        let echo = client.service("echo").unwrap();
        let mut stream = client.stream(&echo, b"").unwrap();
        assert!(stream.next(&mut client).unwrap().is_some());
        drop(stream);
        assert_eq!(client.call(&echo, b"then").unwrap(), reply_to(2), "{wire:?}");
        assert_eq!(client.open_streams(), 0, "{wire:?}");
        daemon.finish();
    }
}

/// A deadline the client sees pass ends the stream with `Timeout` and
/// cancels it; a deadline the daemon reports ends it the same way.
#[test]
fn a_deadline_ends_the_stream_with_a_timeout() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let (opened, open, _) = d.take_open();
            assert_eq!(open.deadline_ms, 200);
            d.send_item(&opened, &item(0, max));
            let mut served = Served::default();
            assert!(!d.take_control(&opened, &mut served), "a cancel at the deadline");
            d.end_stream(&opened, Err((ErrorCode::Cancelled, "cancelled")));
            let (opened, open, _) = d.take_open();
            assert_eq!(open.deadline_ms, 60_000);
            d.end_stream(&opened, Err((ErrorCode::Timeout, "deadline passed")));
            serve_call(&mut d);
        });
        let echo = client.service("echo").unwrap();
        let short = Duration::from_millis(200);
        let mut stream = client.stream_with(&echo, b"", StreamOptions::default().deadline(short)).unwrap();
        assert!(stream.next(&mut client).unwrap().is_some());
        assert_eq!(stream.next(&mut client), Err(CallError::Timeout { after: short }), "{wire:?}");
        let long = Duration::from_secs(60);
        let mut stream = client.stream_with(&echo, b"", StreamOptions::default().deadline(long)).unwrap();
        assert_eq!(stream.next(&mut client), Err(CallError::Timeout { after: long }), "{wire:?}");
        assert_eq!(client.call(&echo, b"then").unwrap(), reply_to(3), "{wire:?}");
        assert_eq!(client.open_streams(), 0);
        daemon.finish();
    }
}

/// A daemon that dies mid-stream: the items it sent are handed out, then
/// `Disconnected`; a daemon that closes on purpose before taking a stream:
/// `Shutdown`.
#[test]
fn a_lost_link_ends_its_streams_after_their_items() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let (opened, _, _) = d.take_open();
            d.send_item(&opened, &item(0, max));
            d.send_item(&opened, &item(4, max));
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut stream = client.stream(&echo, b"").unwrap();
        assert_eq!(stream.next(&mut client).unwrap(), Some(item(0, max)), "{wire:?}");
        assert_eq!(stream.next(&mut client).unwrap(), Some(item(4, max)), "{wire:?}");
        assert!(matches!(stream.next(&mut client), Err(CallError::Disconnected { .. })), "{wire:?}");
        daemon.finish();

        let (daemon, mut client) = start(wire, |mut d| {
            let _ = d.take_open();
            d.close_after(0);
        });
        let echo = client.service("echo").unwrap();
        let mut stream = client.stream(&echo, b"").unwrap();
        assert_eq!(stream.next(&mut client), Err(CallError::Shutdown), "{wire:?}");
        assert_eq!(client.open_streams(), 0);
        daemon.finish();
    }
}

/// An item beyond the credit breaks the protocol: the link is lost, the
/// stream ends `Disconnected` after the items within its credit, and so
/// does a call in flight beside it.
#[test]
fn an_item_beyond_the_credit_loses_the_link() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let (opened, _, _) = d.take_open();
            let call: FrameHeader = d.take().header;
            assert_eq!(call.flags & FLAG_STREAM, 0);
            d.send_item(&opened, b"within");
            d.send_item(&opened, b"beyond");
            d.await_hang_up();
        });
        let echo = client.service("echo").unwrap();
        let mut stream = client.stream_with(&echo, b"", StreamOptions::default().window(1)).unwrap();
        let ticket = client.send(&echo, b"beside").unwrap();
        // The wait reads both items aside (taking none: no credit is
        // granted), and the second breaks the protocol.
        match client.wait(ticket) {
            Err(CallError::Disconnected { reason }) => assert!(reason.contains("beyond"), "{wire:?}: {reason}"),
            other => panic!("{wire:?}: {other:?}"),
        }
        assert_eq!(stream.next(&mut client).unwrap(), Some(b"within".to_vec()), "{wire:?}");
        assert!(matches!(stream.next(&mut client), Err(CallError::Disconnected { .. })), "{wire:?}");
        drop(client);
        daemon.finish();
    }
}
