//! Streams end to end: the real client (`ipc_client::Client`, its
//! `Stream`) against the daemon's own `stream.count`, an embedded
//! server's stream services and a provider's (on a thread of the test,
//! or in a process of its own that a test kills), over shared memory, a
//! Unix socket and TCP. Every item is checked; each way a stream ends
//! (its end, the handler's error, a cancel by `cancel()` and by drop, a
//! deadline, the cap on open streams, a killed peer, a stop) is checked
//! on the client and, where the handler is the test's, by what the
//! handler saw. The same streams driven by raw frames are in
//! `streams_server.rs`; hostile servers in ipc-client's scripted tests.

mod common;
#[path = "common/embedded.rs"]
mod embedded;
#[path = "common/in_process.rs"]
mod in_process;
mod procs;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    connect, count_item, poll_until, start_with_streams, stream_count as count, watchdog, Daemon, TEST_LIMIT,
};
use embedded::Embedded;
use in_process::InProcess;
use ipc_client::{CallError, Client, ClientOptions, Service, Stream, StreamOptions, Transport};
use ipcd::{SendError, ServiceError, MAX_OPEN_STREAMS};
use nix::sys::signal::Signal;
use procs::HelperBuilder;

/// Not a test: the helper processes of the tests below (see `procs`).
#[test]
#[ignore = "helper process for the provider tests; does nothing when run directly"]
fn helper_process() {
    procs::helper_main();
}

/// One test at a time: each starts servers and handler threads of its
/// own, on a machine of two cores.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a handler may take to report, or a condition to come true:
/// generous for a loaded machine; only a hang reaches it.
const LIMIT: Duration = Duration::from_secs(30);

/// Options for every client: calls wait long enough for a loaded machine.
fn options() -> ClientOptions {
    ClientOptions::default().call_timeout(Duration::from_secs(60)).connect_timeout(Duration::from_secs(10))
}

fn window(items: u32) -> StreamOptions {
    StreamOptions::default().window(items)
}

/// What a stream handler saw when its stream was cut: the error of the
/// send that failed, and `is_cancelled` after it.
#[derive(Debug, PartialEq)]
struct Cut {
    why: SendError,
    cancelled: bool,
}

/// What the test's stream handlers report through.
struct Probe {
    cuts: Sender<Cut>,
    /// Sends of `t.counted` that returned.
    sent: AtomicU64,
}

impl Probe {
    fn new() -> (Arc<Probe>, Receiver<Cut>) {
        let (cuts, rx) = channel();
        (Arc::new(Probe { cuts, sent: AtomicU64::new(0) }), rx)
    }
}

/// Item `i` of `t.items`: its own length and bytes, so that a lost,
/// repeated or reordered item shows.
fn item(i: u32) -> Vec<u8> {
    let mut bytes = format!("item-{i}-").into_bytes();
    bytes.resize(bytes.len() + (i % 61) as usize, i as u8);
    bytes
}

/// A `t.items` request: `n` items, then the end, or (`code` not 0) the
/// handler's error with that code.
fn items_request(n: u32, code: u32) -> Vec<u8> {
    [n.to_le_bytes(), code.to_le_bytes()].concat()
}

/// Adds the test's services to a `ServerBuilder` or a `ProviderBuilder`
/// (the same methods, not a shared trait):
/// - `t.upper`: a plain call, upper-cased;
/// - `t.items`: see [`items_request`];
/// - `t.forever`: item `i` is `i` as a little-endian `u64`, until a send
///   fails, which it reports to the probe;
/// - `t.counted`: 10,000 items (`i` as a little-endian `u32`), counting in
///   the probe each send that returned.
macro_rules! stream_services {
    ($builder:expr, $probe:expr) => {{
        let (forever, counted) = (Arc::clone(&$probe), Arc::clone(&$probe));
        $builder
            .service("t.upper", |req| Ok::<_, ServiceError>(req.payload().to_ascii_uppercase()))
            .stream_service("t.items", |request, mut items| {
                let Ok(bytes) = <[u8; 8]>::try_from(request.payload()) else {
                    return items.fail(ServiceError::new("t.items takes two u32s"));
                };
                let n = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                let code = u32::from_le_bytes(bytes[4..].try_into().unwrap());
                for i in 0..n {
                    if items.send(item(i)).is_err() {
                        return;
                    }
                }
                match code {
                    0 => items.end(),
                    code => items.fail(ServiceError::with_code(code, format!("gave up after {n} items"))),
                }
            })
            .stream_service("t.forever", move |_, mut items| {
                let mut i = 0u64;
                loop {
                    if let Err(why) = items.send(i.to_le_bytes().to_vec()) {
                        let _ = forever.cuts.send(Cut { why, cancelled: items.is_cancelled() });
                        return;
                    }
                    i += 1;
                }
            })
            .stream_service("t.counted", move |_, mut items| {
                for i in 0..10_000u32 {
                    if items.send(i.to_le_bytes().to_vec()).is_err() {
                        return;
                    }
                    counted.sent.fetch_add(1, Ordering::SeqCst);
                }
                items.end();
            })
    }};
}

fn embedded(probe: &Arc<Probe>) -> Embedded {
    let probe = Arc::clone(probe);
    Embedded::start(move |b| stream_services!(b, probe))
}

fn provider(socket: &std::path::Path, probe: &Arc<Probe>) -> InProcess {
    let probe = Arc::clone(probe);
    InProcess::start(socket, move |b| stream_services!(b, probe))
}

/// The next cut a handler reports.
fn cut(cuts: &Receiver<Cut>, what: &str) -> Cut {
    cuts.recv_timeout(LIMIT).unwrap_or_else(|e| panic!("{what}: no report from the handler: {e}"))
}

/// Takes items of a `t.forever` stream (counting on from `next`) until
/// its terminal outcome, which it returns; at most `window` come after
/// the handler was cut.
fn forever_end(client: &mut Client, stream: &mut Stream, mut next: u64, window: u64, what: &str) -> CallError {
    let first = next;
    loop {
        match stream.next(client) {
            Ok(Some(got)) => {
                assert_eq!(got, next.to_le_bytes(), "{what}: item {next}");
                next += 1;
                assert!(
                    next - first <= window,
                    "{what}: {} items after the cut, with a window of {window}",
                    next - first
                );
            }
            Ok(None) => panic!("{what}: the stream ended without an error"),
            Err(e) => return e,
        }
    }
}

/// Calls `ping` (on `other`) until the client has no stream open: every
/// stream's server has sent its terminal frame.
fn until_no_stream_open(client: &mut Client, other: &Service, what: &str) {
    let closed = poll_until(LIMIT, || {
        client.call(other, b"").unwrap_or_else(|e| panic!("{what}: a call while streams close: {e}"));
        client.open_streams() == 0
    });
    assert!(closed, "{what}: {} streams still open", client.open_streams());
}

/// Every way a stream of the test's handlers ends, checked on the client
/// and by what the handler saw. `other` is a plain service to call
/// meanwhile (on the same link as the streams, or on another).
fn handlers_end_to_end(client: &mut Client, other: &Service, cuts: &Receiver<Cut>, what: &str) {
    let items = client.service("t.items").unwrap();
    let forever = client.service("t.forever").unwrap();
    let upper = client.service("t.upper").unwrap();

    // Every item, in order, then the end, once.
    let mut s = client.stream_with(&items, &items_request(500, 0), window(8)).unwrap();
    for i in 0..500 {
        assert_eq!(s.next(client).unwrap(), Some(item(i)), "{what}: item {i}");
    }
    assert_eq!(s.next(client).unwrap(), None, "{what}: the end");
    assert!(s.is_finished());
    assert!(matches!(s.next(client), Err(CallError::UnknownTicket { .. })), "{what}: after the end");

    // The handler's error, with its code, after its items.
    let mut s = client.stream(&items, &items_request(3, 42)).unwrap();
    for i in 0..3 {
        assert_eq!(s.next(client).unwrap(), Some(item(i)), "{what}: item {i} before the error");
    }
    match s.next(client) {
        Err(CallError::Remote { code: Some(42), message }) => assert_eq!(message, "gave up after 3 items", "{what}"),
        other => panic!("{what}: the handler's error came as {other:?}"),
    }

    // Two streams open, and calls between their items, all in order.
    let mut a = client.stream_with(&items, &items_request(100, 0), window(4)).unwrap();
    let mut b = client.stream_with(&forever, b"", window(3)).unwrap();
    for i in 0..100u32 {
        assert_eq!(a.next(client).unwrap(), Some(item(i)), "{what}: a's item {i}");
        let request = format!("call {i} between items");
        assert_eq!(client.call(&upper, request.as_bytes()).unwrap(), request.to_uppercase().into_bytes(), "{what}");
        assert_eq!(b.next(client).unwrap(), Some(u64::from(i).to_le_bytes().to_vec()), "{what}: b's item {i}");
        client.call(other, b"").unwrap_or_else(|e| panic!("{what}: a call on the other service: {e}"));
    }
    assert_eq!(a.next(client).unwrap(), None, "{what}");

    // cancel(): the client's outcome is Cancelled, and the handler's next
    // send fails saying so.
    b.cancel(client);
    assert_eq!(b.next(client), Err(CallError::Cancelled), "{what}");
    assert_eq!(cut(cuts, what), Cut { why: SendError::Cancelled, cancelled: true }, "{what}: cancel()");
    assert!(matches!(b.next(client), Err(CallError::UnknownTicket { .. })), "{what}: after the cancel");

    // A dropped handle: its cancel goes out with the next operation, a
    // call on `other`.
    let mut c = client.stream_with(&forever, b"", window(2)).unwrap();
    assert_eq!(c.next(client).unwrap(), Some(0u64.to_le_bytes().to_vec()), "{what}");
    drop(c);
    client.call(other, b"").unwrap();
    assert_eq!(cut(cuts, what), Cut { why: SendError::Cancelled, cancelled: true }, "{what}: a dropped stream");

    // A deadline the server keeps: the handler, out of credit, is cut
    // with Timeout; the client, which took nothing meanwhile, gets the
    // item that was sent, then Timeout.
    let deadline = Duration::from_millis(150);
    let mut d = client.stream_with(&forever, b"", window(1).deadline(deadline)).unwrap();
    assert_eq!(cut(cuts, what), Cut { why: SendError::Timeout, cancelled: true }, "{what}: the deadline");
    match forever_end(client, &mut d, 0, 1, what) {
        CallError::Timeout { after } => assert_eq!(after, deadline, "{what}"),
        other => panic!("{what}: a stream past its deadline ended with {other:?}"),
    }

    // The cap: MAX_OPEN_STREAMS streams run, the next is refused with
    // TooMany, and the open ones go on.
    let mut open: Vec<Stream> =
        (0..MAX_OPEN_STREAMS).map(|_| client.stream_with(&forever, b"", window(1)).unwrap()).collect();
    for s in &mut open {
        assert_eq!(s.next(client).unwrap(), Some(0u64.to_le_bytes().to_vec()), "{what}");
    }
    let mut past = client.stream(&forever, b"").unwrap();
    assert!(matches!(past.next(client), Err(CallError::TooMany { .. })), "{what}: one past the cap");
    for s in &mut open {
        assert_eq!(s.next(client).unwrap(), Some(1u64.to_le_bytes().to_vec()), "{what}: the open ones go on");
    }
    drop(open);
    until_no_stream_open(client, other, what);
    for _ in 0..MAX_OPEN_STREAMS {
        assert_eq!(cut(cuts, what), Cut { why: SendError::Cancelled, cancelled: true }, "{what}: dropped at the cap");
    }
    // Under the cap again.
    let mut s = client.stream(&items, &items_request(1, 0)).unwrap();
    assert_eq!((s.next(client).unwrap(), s.next(client).unwrap()), (Some(item(0)), None), "{what}");
    assert!(cuts.try_recv().is_err(), "{what}: a handler reported a cut nobody made");
}

#[test]
fn the_daemons_stream_count_ends_fails_is_cancelled_times_out_and_is_capped_on_every_transport() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options());
            let svc = client.service("stream.count").unwrap();
            let echo = client.service("echo").unwrap();
            let ping = client.service("ping").unwrap();

            // Every item in order, then the end; items longer than a frame too.
            let mut s = client.stream_with(&svc, &count(1000, 24), window(8)).unwrap();
            for i in 0..1000 {
                assert_eq!(s.next(&mut client).unwrap(), Some(count_item(i, 24)), "{name}: item {i}");
            }
            assert_eq!(s.next(&mut client).unwrap(), None, "{name}");
            let size = client.max_payload() as u32 * 2 + 3;
            let mut s = client.stream_with(&svc, &count(3, size), window(2)).unwrap();
            for i in 0..3 {
                assert_eq!(s.next(&mut client).unwrap(), Some(count_item(i, size)), "{name}: long item {i}");
            }
            assert_eq!(s.next(&mut client).unwrap(), None, "{name}");

            // The handler's error.
            let mut s = client.stream(&svc, b"short").unwrap();
            match s.next(&mut client) {
                Err(CallError::Remote { code: None, message }) => {
                    assert!(message.contains("two u32s"), "{name}: {message}")
                }
                other => panic!("{name}: a malformed request ended with {other:?}"),
            }

            // A stream of a service that is not a stream service, and a
            // plain call to one: refused, and nothing else is hurt.
            let mut s = client.stream(&echo, b"not a stream").unwrap();
            assert!(matches!(s.next(&mut client), Err(CallError::UnknownService { .. })), "{name}: a stream of echo");
            match client.call(&svc, &count(1, 8)) {
                Err(CallError::UnknownService { name: said }) => assert!(said.contains("stream"), "{name}: {said}"),
                other => panic!("{name}: a plain call to stream.count: {other:?}"),
            }

            // Calls between the items of an open stream.
            let mut s = client.stream_with(&svc, &count(200, 8), window(4)).unwrap();
            for i in 0..200 {
                assert_eq!(s.next(&mut client).unwrap(), Some(count_item(i, 8)), "{name}");
                let request = format!("echo {i}");
                assert_eq!(client.call(&echo, request.as_bytes()).unwrap(), request.as_bytes(), "{name}");
            }
            assert_eq!(s.next(&mut client).unwrap(), None, "{name}");

            // cancel(), and a dropped handle: the daemon ends both (their
            // terminal frames retire them), and calls go on.
            let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(4)).unwrap();
            assert_eq!(s.next(&mut client).unwrap(), Some(count_item(0, 8)), "{name}");
            s.cancel(&mut client);
            assert_eq!(s.next(&mut client), Err(CallError::Cancelled), "{name}");
            let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(4)).unwrap();
            assert_eq!(s.next(&mut client).unwrap(), Some(count_item(0, 8)), "{name}");
            drop(s);
            until_no_stream_open(&mut client, &ping, name);

            // A deadline: past it, at most the window's items, then Timeout.
            let deadline = Duration::from_millis(100);
            let opened = Instant::now();
            let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(2).deadline(deadline)).unwrap();
            assert!(poll_until(LIMIT, || opened.elapsed() > deadline));
            let mut taken = 0;
            let end = loop {
                match s.next(&mut client) {
                    Ok(Some(got)) => {
                        assert_eq!(got, count_item(taken, 8), "{name}");
                        taken += 1;
                    }
                    other => break other,
                }
            };
            assert!(taken <= 2, "{name}: {taken} items past the deadline with a window of 2");
            assert_eq!(end, Err(CallError::Timeout { after: deadline }), "{name}");

            // The cap.
            let mut open: Vec<Stream> = (0..MAX_OPEN_STREAMS)
                .map(|_| client.stream_with(&svc, &count(u32::MAX, 8), window(1)).unwrap())
                .collect();
            for s in &mut open {
                assert_eq!(s.next(&mut client).unwrap(), Some(count_item(0, 8)), "{name}");
            }
            let mut past = client.stream(&svc, &count(1, 8)).unwrap();
            assert!(matches!(past.next(&mut client), Err(CallError::TooMany { .. })), "{name}: past the cap");
            for s in &mut open {
                assert_eq!(s.next(&mut client).unwrap(), Some(count_item(1, 8)), "{name}: the open ones go on");
            }
            drop(open);
            until_no_stream_open(&mut client, &ping, name);
            let mut s = client.stream(&svc, &count(1, 8)).unwrap();
            assert_eq!((s.next(&mut client).unwrap(), s.next(&mut client).unwrap()), (Some(count_item(0, 8)), None));
        }
    });
}

#[test]
fn an_embedded_servers_stream_handlers_end_to_end_on_every_transport() {
    let _serial = serial();
    let (probe, cuts) = Probe::new();
    let server = embedded(&probe);
    let transports = server.transports();
    watchdog(TEST_LIMIT, move || {
        for transport in &transports {
            let mut client = connect(transport, options());
            let ping = client.service("ping").unwrap();
            handlers_end_to_end(&mut client, &ping, &cuts, transport.name());
        }
    });
    drop(server);
}

#[test]
fn a_providers_stream_handlers_end_to_end_with_calls_to_the_daemon_between() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let (probe, cuts) = Probe::new();
    let provider = provider(daemon.socket(), &probe);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&Transport::Shm(socket), options());
        // The daemon's own `ping` is on another link than the provider's
        // streams: a dropped stream's cancel still goes out with a call
        // to it.
        let ping = client.service("ping").unwrap();
        handlers_end_to_end(&mut client, &ping, &cuts, "provider");
        // And the same with a call on the provider's own link.
        let upper = client.service("t.upper").unwrap();
        handlers_end_to_end(&mut client, &upper, &cuts, "provider, same link");
    });
    drop(provider);
}

/// Reads `t.counted` slowly: every 1,000 items it lets the handler run as
/// far as the credit lets it before taking more. Whenever it looks, the
/// handler has sent no more than the items taken plus the window.
fn slow_reader(client: &mut Client, probe: &Probe, what: &str) {
    const WINDOW: u64 = 16;
    probe.sent.store(0, Ordering::SeqCst);
    let counted = client.service("t.counted").unwrap();
    let mut s = client.stream_with(&counted, b"", window(WINDOW as u32)).unwrap();
    let mut taken = 0u64;
    let mut most_ahead = 0;
    while let Some(got) = s.next(client).unwrap() {
        assert_eq!(got, (taken as u32).to_le_bytes(), "{what}: item {taken}");
        taken += 1;
        let sent = probe.sent.load(Ordering::SeqCst);
        assert!(sent <= taken + WINDOW, "{what}: {sent} sent with {taken} taken, a window of {WINDOW}");
        most_ahead = most_ahead.max(sent.saturating_sub(taken));
        if taken.is_multiple_of(1000) {
            // The credit granted is more than half a window ahead of the
            // items taken: the handler gets that far, and no further.
            let far = (taken + WINDOW / 2).min(10_000);
            assert!(
                poll_until(LIMIT, || probe.sent.load(Ordering::SeqCst) >= far),
                "{what}: the handler stopped short"
            );
            let sent = probe.sent.load(Ordering::SeqCst);
            assert!(sent <= taken + WINDOW, "{what}: {sent} sent with {taken} taken, a window of {WINDOW}");
            most_ahead = most_ahead.max(sent - taken);
        }
    }
    assert_eq!((taken, probe.sent.load(Ordering::SeqCst)), (10_000, 10_000), "{what}");
    assert!(most_ahead >= WINDOW / 2, "{what}: the handler never ran ahead ({most_ahead}): the check saw nothing");
}

#[test]
fn a_handler_writing_ten_thousand_items_to_a_slow_reader_stays_within_the_window() {
    let _serial = serial();
    let (probe, _cuts) = Probe::new();
    let server = embedded(&probe);
    let daemon = Daemon::start(&[]);
    let provider = provider(daemon.socket(), &probe);
    let mut transports = server.transports().to_vec();
    transports.push(Transport::Shm(daemon.socket().to_path_buf()));
    watchdog(TEST_LIMIT, move || {
        for (i, transport) in transports.iter().enumerate() {
            let what = if i < 3 { transport.name() } else { "provider" };
            let mut client = connect(transport, options());
            slow_reader(&mut client, &probe, what);
        }
    });
    drop((provider, server));
}

/// Opens a `stream.count` of no end on every transport of `ends` and takes
/// its first item.
fn endless_counts(ends: &common::Endpoints) -> Vec<(Client, Stream)> {
    ends.all()
        .iter()
        .map(|transport| {
            let mut client = connect(transport, options());
            let svc = client.service("stream.count").unwrap();
            let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(4)).unwrap();
            assert_eq!(s.next(&mut client).unwrap(), Some(count_item(0, 8)), "{}", transport.name());
            (client, s)
        })
        .collect()
}

/// Takes the rest of an endless `stream.count` (from item 1) and returns
/// its terminal outcome. With `within_window`, the server is gone already
/// and at most the window it was granted comes; else (a stop, which the
/// server's handler sees only when its worker does) items may go on, each
/// credited, until the stream is cut.
fn count_end(client: &mut Client, s: &mut Stream, what: &str, within_window: bool) -> CallError {
    let mut next = 1;
    loop {
        match s.next(client) {
            Ok(Some(got)) => {
                assert_eq!(got, count_item(next, 8), "{what}");
                next += 1;
                assert!(!within_window || next <= 1 + 4 + 1, "{what}: {next} items past a window of 4");
            }
            Ok(None) => panic!("{what}: an endless stream ended"),
            Err(e) => return e,
        }
    }
}

#[test]
fn the_daemons_streams_end_disconnected_when_it_is_killed_and_shutdown_when_it_stops() {
    let _serial = serial();
    watchdog(TEST_LIMIT, || {
        let (mut daemon, ends) = start_with_streams(&[]);
        let mut streams = endless_counts(&ends);
        daemon.kill();
        for (client, s) in &mut streams {
            let name = client.transport();
            let e = count_end(client, s, name, true);
            assert!(matches!(e, CallError::Disconnected { .. }), "{name}: a killed daemon's stream ended with {e:?}");
        }

        let (mut daemon, ends) = start_with_streams(&[]);
        let mut streams = endless_counts(&ends);
        daemon.signal(Signal::SIGTERM);
        for (client, s) in &mut streams {
            let name = client.transport();
            let e = count_end(client, s, name, false);
            assert_eq!(e, CallError::Shutdown, "{name}: a stopping daemon's stream");
        }
        assert!(daemon.wait_exit(common::EXIT_LIMIT).success(), "the daemon stops cleanly");
    });
}

#[test]
fn an_embedded_servers_and_a_providers_streams_end_shutdown_when_they_stop() {
    let _serial = serial();
    let (probe, cuts) = Probe::new();
    let mut server = embedded(&probe);
    let daemon = Daemon::start(&[]);
    let mut provider = provider(daemon.socket(), &probe);
    let socket = daemon.socket().to_path_buf();
    let transports = server.transports();
    watchdog(TEST_LIMIT, move || {
        let open = |transport: &Transport| {
            let mut client = connect(transport, options());
            let forever = client.service("t.forever").unwrap();
            let mut s = client.stream_with(&forever, b"", window(2)).unwrap();
            assert_eq!(s.next(&mut client).unwrap(), Some(0u64.to_le_bytes().to_vec()));
            (client, s)
        };
        let mut streams: Vec<(Client, Stream)> = transports.iter().map(open).collect();
        server.begin_stop();
        for (client, s) in &mut streams {
            let name = client.transport();
            assert_eq!(forever_end(client, s, 1, 2, name), CallError::Shutdown, "{name}: a stopping server's stream");
        }
        for _ in &streams {
            assert_eq!(cut(&cuts, "embedded"), Cut { why: SendError::Shutdown, cancelled: true });
        }
        server.stop().expect("the server stops");

        let (mut client, mut s) = open(&Transport::Shm(socket));
        provider.begin_stop();
        assert_eq!(
            forever_end(&mut client, &mut s, 1, 2, "provider"),
            CallError::Shutdown,
            "a stopping provider's stream"
        );
        assert_eq!(cut(&cuts, "provider"), Cut { why: SendError::Shutdown, cancelled: true });
        provider.stop().expect("the provider stops");
        // The daemon's own services on the same client go on.
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"still here").unwrap(), b"still here");
    });
}

#[test]
fn a_provider_process_killed_ends_its_stream_disconnected_and_one_stopped_by_sigterm_shutdown() {
    let _serial = serial();
    watchdog(TEST_LIMIT, || {
        let daemon = procs::start_daemon(None, &[]);
        let mut client = connect(&Transport::Shm(daemon.socket().to_path_buf()), options());
        let echo = client.service("echo").unwrap();
        for (signal, name) in [(Signal::SIGKILL, "t.killed.stream"), (Signal::SIGTERM, "t.stopped.stream")] {
            let mut helper = HelperBuilder::provider(daemon.socket(), &[name]).spawn();
            helper.expect("registered");
            let svc = client.service(name).unwrap();
            let mut s = client.stream_with(&svc, b"", window(4)).unwrap();
            assert_eq!(s.next(&mut client).unwrap(), Some(0u64.to_le_bytes().to_vec()));
            helper.expect("streaming");
            let e = if signal == Signal::SIGKILL {
                helper.kill();
                forever_end(&mut client, &mut s, 1, 4, "killed")
            } else {
                helper.signal(Signal::SIGTERM);
                helper.expect("stopping");
                let e = forever_end(&mut client, &mut s, 1, 4, "stopped");
                helper.expect("stopped");
                assert!(helper.wait_exit().success());
                e
            };
            match (signal, &e) {
                (Signal::SIGKILL, CallError::Disconnected { .. }) | (Signal::SIGTERM, CallError::Shutdown) => {}
                _ => panic!("a provider's stream ended with {e:?} after {signal}"),
            }
            // The client's other link, to the daemon, goes on.
            assert_eq!(client.call(&echo, b"after").unwrap(), b"after", "after {signal}");
        }
    });
}
