//! Server streams, driven by raw frames: the daemon's built-in
//! `stream.count` and an embedded server's stream services, over shared
//! memory and the stream transports. Items come in order and within the
//! caller's credit, then exactly one terminal frame; a handler's error, a
//! cancel, a deadline, the cap on open streams and a stop each end a
//! stream with their own error, and the handler learns of it.

mod common;
#[path = "common/embedded.rs"]
mod embedded;
#[path = "common/wire.rs"]
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use common::{count_item, start_with_streams, stream_count as count, watchdog, TEST_LIMIT};
use embedded::Embedded;
use ipc_client::Transport;
use ipc_core::ErrorCode;
use ipcd::{SendError, ServiceError, TrySendError, MAX_OPEN_STREAMS};
use wire::{Message, Messages, Wire, FRAME_LIMIT};

/// One test at a time: they start servers with threads of their own.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads stream `id` to its end, granting `step` items each time the
/// items granted have all come; checks that no item comes beyond the
/// credit. Returns the items and the terminal message.
fn read_stream(
    wire: &mut Wire,
    rx: &mut Messages,
    service: u16,
    id: u64,
    credit: u32,
    step: u32,
) -> (Vec<Vec<u8>>, Message) {
    let mut granted = u64::from(credit);
    let mut items = Vec::new();
    loop {
        let m = rx.next(wire);
        assert_eq!(m.id, id, "a frame of another id");
        if m.is_end() {
            return (items, m);
        }
        assert!(m.is_item(), "neither an item nor an end: flags {:#x}", m.flags);
        items.push(m.body);
        assert!(items.len() as u64 <= granted, "item {} came with {granted} granted", items.len());
        if items.len() as u64 == granted && step > 0 {
            granted += u64::from(step);
            assert!(wire.grant(service, id, step));
        }
    }
}

/// After a stream's end, nothing more of it comes: the next frame is the
/// reply to a ping sent now.
fn nothing_more(wire: &mut Wire, rx: &mut Messages, id: u64) {
    let ping = wire.service("ping");
    assert!(wire.send(ping, 0, id, b""));
    let m = rx.next(wire);
    assert_eq!((m.id, m.flags), (id, 0), "a stray frame after the end: {m:?}");
}

#[test]
fn the_daemons_stream_count_comes_in_order_within_the_credit_on_every_transport() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut wire = Wire::connect(&transport, 64 << 10);
            let mut rx = Messages::new();
            let svc = wire.service("stream.count");
            assert!(wire.open(svc, 1, 8, 0, &count(300, 16)));
            let (items, end) = read_stream(&mut wire, &mut rx, svc, 1, 8, 5);
            assert_eq!(end.flags, ipc_core::message::FLAG_END, "{name}: a plain end, not an error: {:?}", end.error());
            assert!(end.body.is_empty());
            assert_eq!(items.len(), 300, "{name}");
            for (i, item) in items.iter().enumerate() {
                assert_eq!(item, &count_item(i as u32, 16), "{name}: item {i}");
            }
            // Items longer than a frame come in chunks, and a stream may be
            // read without ever granting more than it opened with.
            let size = wire.max_payload() as u32 * 2 + 3;
            assert!(wire.open(svc, 2, 3, 0, &count(3, size)));
            let mut chunked = 0;
            for i in 0..3 {
                let m = rx.next(&mut wire);
                assert!(m.is_item() && m.id == 2, "{name}");
                chunked += usize::from(m.frames > 1);
                assert_eq!(m.body, count_item(i, size), "{name}: chunked item {i}");
            }
            assert_eq!(chunked, 3, "{name}: every item longer than a frame is chunked");
            let end = rx.next(&mut wire);
            assert!(end.is_end() && end.error().is_none(), "{name}: {end:?}");
            // A malformed request ends its stream with the handler's error.
            assert!(wire.open(svc, 3, 1, 0, b"short"));
            let end = rx.next(&mut wire);
            assert!(end.is_end(), "{name}");
            assert!(end.error().expect("an error").1.contains("two u32s"), "{name}: {end:?}");
            nothing_more(&mut wire, &mut rx, 4);
        }
    });
}

/// What an embedded server's stream handlers report to the test.
#[derive(Debug, PartialEq)]
enum Report {
    /// A send failed, why.
    Cut(SendError),
    /// `is_cancelled` after the failed send.
    Cancelled(bool),
    /// `try_send` with no credit.
    TryFull,
}

/// An embedded server with stream services:
/// - `items`: `n` (a `u32`) items `item-i`, then the end (or, for `n` above
///   1000, the error 42 after 3 items);
/// - `forever`: items until a send fails, reported with `is_cancelled`;
/// - `counted`: 10,000 items, counting each send that returned;
/// - `try`: reports that `try_send` without credit is full, then sends and
///   ends.
fn server(reports: Sender<Report>, sent: Arc<AtomicU64>) -> Embedded {
    let forever_reports = Mutex::new(reports.clone());
    let try_reports = Mutex::new(reports);
    Embedded::start(move |b| {
        b.stream_service("items", |request, mut items| {
            let n = u32::from_le_bytes(request.payload().try_into().unwrap());
            if n > 1000 {
                for i in 0..3 {
                    let _ = items.send(format!("item-{i}").into_bytes());
                }
                return items.fail(ServiceError::with_code(42, "the handler gave up"));
            }
            for i in 0..n {
                if items.send(format!("item-{i}").into_bytes()).is_err() {
                    return;
                }
            }
            items.end();
        })
        .stream_service("forever", move |_, mut items| {
            let reports = forever_reports.lock().unwrap().clone();
            let mut i = 0u64;
            loop {
                if let Err(e) = items.send(i.to_le_bytes().to_vec()) {
                    let _ = reports.send(Report::Cut(e));
                    let _ = reports.send(Report::Cancelled(items.is_cancelled()));
                    return;
                }
                i += 1;
            }
        })
        .stream_service("counted", move |_, mut items| {
            for i in 0..10_000u32 {
                if items.send(i.to_le_bytes().to_vec()).is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            items.end();
        })
        .stream_service("try", move |_, mut items| {
            let reports = try_reports.lock().unwrap().clone();
            if let Err(TrySendError::Full(item)) = items.try_send(b"first".to_vec()) {
                let _ = reports.send(Report::TryFull);
                if items.send(item).is_ok() {
                    items.end();
                }
            }
        })
    })
}

fn n(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

#[test]
fn handlers_end_fail_and_are_cut_by_cancel_deadline_and_the_cap_on_every_transport() {
    let _serial = serial();
    let (tx, reports) = channel();
    let server = server(tx, Arc::new(AtomicU64::new(0)));
    let transports = server.transports();
    watchdog(TEST_LIMIT, move || {
        let report = || reports.recv_timeout(FRAME_LIMIT).expect("a report from the handler");
        for transport in &transports {
            let name = transport.name();
            let mut wire = Wire::connect(transport, 64 << 10);
            let mut rx = Messages::new();
            let (items, forever) = (wire.service("items"), wire.service("forever"));

            // The items, in order, then the end.
            assert!(wire.open(items, 1, 100, 0, &n(5)));
            let (got, end) = read_stream(&mut wire, &mut rx, items, 1, 100, 0);
            let want: Vec<Vec<u8>> = (0..5).map(|i| format!("item-{i}").into_bytes()).collect();
            assert_eq!(got, want, "{name}");
            assert!(end.is_end() && end.error().is_none(), "{name}");

            // The handler's error, after the items it sent.
            assert!(wire.open(items, 2, 100, 0, &n(5000)));
            let (got, end) = read_stream(&mut wire, &mut rx, items, 2, 100, 0);
            assert_eq!(got.len(), 3, "{name}");
            assert_eq!(end.error(), Some((ErrorCode::Application(42), "the handler gave up".into())), "{name}");

            // A cancel: the end says so, and the handler's next send fails.
            assert!(wire.open(forever, 3, 4, 0, b""));
            for _ in 0..4 {
                assert!(rx.next(&mut wire).is_item());
            }
            assert!(wire.cancel(forever, 3));
            let end = rx.next(&mut wire);
            assert_eq!(end.error().map(|e| e.0), Some(ErrorCode::Cancelled), "{name}: {end:?}");
            assert_eq!(report(), Report::Cut(SendError::Cancelled), "{name}");
            assert_eq!(report(), Report::Cancelled(true), "{name}");

            // A deadline: a handler waiting for credit is cut with Timeout.
            assert!(wire.open(forever, 4, 0, 50, b""));
            let end = rx.next(&mut wire);
            assert_eq!((end.id, end.error().map(|e| e.0)), (4, Some(ErrorCode::Timeout)), "{name}: {end:?}");
            assert_eq!(report(), Report::Cut(SendError::Timeout), "{name}");
            assert_eq!(report(), Report::Cancelled(true), "{name}");

            // The cap: streams past it are refused, the open ones go on.
            let first = 10;
            for id in first..first + MAX_OPEN_STREAMS as u64 {
                assert!(wire.open(forever, id, 0, 0, b""));
            }
            let past = first + MAX_OPEN_STREAMS as u64;
            assert!(wire.open(forever, past, 0, 0, b""));
            let refused = rx.next(&mut wire);
            assert_eq!((refused.id, refused.error().map(|e| e.0)), (past, Some(ErrorCode::TooMany)), "{name}");
            assert!(refused.is_end(), "{name}: a refused opening gets its terminal frame");
            for id in first..past {
                assert!(wire.cancel(forever, id));
            }
            let mut ended: Vec<u64> = (first..past)
                .map(|_| rx.next(&mut wire))
                .map(|m| {
                    assert_eq!(m.error().map(|e| e.0), Some(ErrorCode::Cancelled), "{name}");
                    m.id
                })
                .collect();
            ended.sort_unstable();
            assert_eq!(ended, (first..past).collect::<Vec<_>>(), "{name}: one end per stream");
            // The handlers' threads report in any order between them.
            let mut cut = (0, 0);
            for _ in first..past {
                for _ in 0..2 {
                    match report() {
                        Report::Cut(SendError::Cancelled) => cut.0 += 1,
                        Report::Cancelled(true) => cut.1 += 1,
                        other => panic!("{name}: {other:?}"),
                    }
                }
            }
            assert_eq!(cut, (MAX_OPEN_STREAMS, MAX_OPEN_STREAMS), "{name}");
            // A cancel (or credit) for a stream that has ended is no error.
            assert!(wire.cancel(forever, 3) && wire.grant(forever, 3, 5));
            // Under the cap again.
            assert!(wire.open(items, past + 1, 1, 0, &n(1)));
            let (got, end) = read_stream(&mut wire, &mut rx, items, past + 1, 1, 0);
            assert!(got.len() == 1 && end.error().is_none(), "{name}");

            // try_send is full without credit; send waits for it.
            let try_svc = wire.service("try");
            assert!(wire.open(try_svc, past + 2, 0, 0, b""));
            assert_eq!(report(), Report::TryFull, "{name}");
            assert!(wire.grant(try_svc, past + 2, 1));
            let (got, end) = read_stream(&mut wire, &mut rx, try_svc, past + 2, 1, 0);
            assert!(got == [b"first".to_vec()] && end.error().is_none(), "{name}");
            nothing_more(&mut wire, &mut rx, past + 3);
        }
    });
}

#[test]
fn a_handler_writing_ten_thousand_items_to_a_slow_reader_stays_within_the_credit() {
    let _serial = serial();
    let (tx, _reports) = channel();
    let sent = Arc::new(AtomicU64::new(0));
    let server = server(tx, Arc::clone(&sent));
    let transports = server.transports();
    watchdog(TEST_LIMIT, move || {
        for transport in &transports[..2] {
            sent.store(0, Ordering::SeqCst);
            let name = transport.name();
            let mut wire = Wire::connect(transport, 64 << 10);
            let mut rx = Messages::new();
            let svc = wire.service("counted");
            let (credit, step) = (16u64, 7u32);
            assert!(wire.open(svc, 1, credit as u32, 0, b""));
            let (mut granted, mut got) = (credit, 0u64);
            let mut most_ahead = 0;
            loop {
                let m = rx.next(&mut wire);
                if m.is_end() {
                    assert!(m.error().is_none(), "{name}: {m:?}");
                    break;
                }
                assert_eq!(m.body, (got as u32).to_le_bytes(), "{name}: item {got}");
                got += 1;
                // What the handler has sent never runs ahead of what was
                // granted, whenever the test looks.
                let sent_now = sent.load(Ordering::SeqCst);
                assert!(sent_now <= granted, "{name}: {sent_now} sent with {granted} granted");
                assert!(got <= granted, "{name}: {got} received with {granted} granted");
                most_ahead = most_ahead.max(sent_now - got.min(sent_now));
                if got == granted {
                    granted += u64::from(step);
                    assert!(wire.grant(svc, 1, step));
                }
            }
            assert_eq!((got, sent.load(Ordering::SeqCst)), (10_000, 10_000), "{name}");
            assert!(most_ahead <= credit, "{name}: the handler ran {most_ahead} items ahead of the reader");
        }
    });
}

#[test]
fn a_stop_ends_open_streams_with_shutdown() {
    let _serial = serial();
    let (tx, reports) = channel();
    let mut server = server(tx, Arc::new(AtomicU64::new(0)));
    let shm = server.transports()[0].clone();
    let uds = server.transports()[1].clone();
    let mut wires: Vec<(Wire, Messages)> = [shm, uds]
        .iter()
        .map(|t: &Transport| {
            let mut wire = Wire::connect(t, 64 << 10);
            let forever = wire.service("forever");
            assert!(wire.open(forever, 1, 0, 0, b""));
            (wire, Messages::new())
        })
        .collect();
    // Both handlers wait for credit; a ping on each session proves both
    // streams are open before the stop.
    for (wire, rx) in &mut wires {
        nothing_more(wire, rx, 2);
    }
    server.begin_stop();
    watchdog(TEST_LIMIT, move || {
        for (wire, rx) in &mut wires {
            let end = rx.next(wire);
            assert!(end.is_end(), "{end:?}");
            assert_eq!(end.error().map(|e| e.0), Some(ErrorCode::Shutdown), "{end:?}");
        }
        let mut got: Vec<Report> = (0..4).map(|_| reports.recv_timeout(FRAME_LIMIT).unwrap()).collect();
        got.sort_by_key(|r| matches!(r, Report::Cancelled(_)));
        assert_eq!(
            got,
            [
                Report::Cut(SendError::Shutdown),
                Report::Cut(SendError::Shutdown),
                Report::Cancelled(true),
                Report::Cancelled(true)
            ]
        );
        server.stop().expect("the server stops");
    });
}
