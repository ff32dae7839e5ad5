//! The broker seen from the wire: providers (`ipcd::Provider`, in this
//! process) register names on a real daemon, and a caller speaking the
//! broker protocol by hand resolves them, receives the session's fds, and
//! calls through the rings itself. What the client library does with the
//! same messages is tested in the client's own tests and end to end in
//! `providers.rs`.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Instant;

use common::*;
use ipc_core::control::{Brokered, RegisterError, Resolution, Resolve, ResolveError};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{
    Consumer, Direction, DoorbellKind, Hello, Index, Producer, Role, Segment, SegmentLayout, ServerMessage, SharedWords,
};
use ipc_platform::{EventFd, Mapping};
use ipcd::{Provider, ProviderError, ServiceError, ShutdownHandle};

/// A caller's broker connection, spoken by hand.
struct Caller {
    stream: UnixStream,
}

impl Caller {
    fn connect(socket: &Path) -> Caller {
        let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
        stream.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
        stream.write_all(&handshake::encode(&Hello::for_role(Role::Broker)).unwrap()).unwrap();
        let (answer, fds) = read_framed(&stream);
        assert!(fds.is_empty());
        match handshake::decode::<ServerMessage>(&answer).unwrap() {
            ServerMessage::Accepted { .. } => {}
            other => panic!("a broker hello answered with {other:?}"),
        }
        Caller { stream }
    }

    fn resolve(&mut self, name: &str, wait_ms: u32) -> (Resolution, Vec<OwnedFd>) {
        let resolve = Resolve { name: name.into(), ring_capacity: 4096, doorbell: DoorbellKind::Futex, wait_ms };
        self.stream.write_all(&handshake::encode(&resolve).unwrap()).unwrap();
        let (body, fds) = read_framed(&self.stream);
        (handshake::decode::<Resolution>(&body).unwrap(), fds)
    }

    fn session(&mut self, name: &str) -> (Brokered, Rings) {
        match self.resolve(name, 0) {
            (Resolution::Brokered(b), fds) => {
                assert_eq!(fds.len(), b.fd_count());
                let rings = Rings::new(&b, fds);
                (b, rings)
            }
            (Resolution::Failed(e), _) => panic!("resolving {name}: {e}"),
        }
    }
}

/// Reads one framed message and the fds that came with it.
fn read_framed(stream: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= LENGTH_PREFIX {
            let len = handshake::body_len([buf[0], buf[1], buf[2], buf[3]]).unwrap();
            if buf.len() >= LENGTH_PREFIX + len {
                assert_eq!(buf.len(), LENGTH_PREFIX + len, "stray bytes after a message");
                return (buf.split_off(LENGTH_PREFIX), fds);
            }
        }
        let (n, got) = ipc_platform::recv_with_fds(stream.as_fd(), &mut chunk).expect("read an answer");
        assert!(n > 0, "the daemon hung up");
        fds.extend(got);
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The caller's side of a brokered session, driven by hand.
struct Rings {
    requests: Producer,
    responses: Consumer,
    words: SharedWords,
    bell: EventFd,
    liveness: UnixStream,
    next_id: u64,
}

impl Rings {
    fn new(b: &Brokered, fds: Vec<OwnedFd>) -> Rings {
        let layout = SegmentLayout::new(b.ring_capacity).unwrap();
        let mut fds = fds.into_iter();
        let (memfd, bell, liveness) = (fds.next().unwrap(), fds.next().unwrap(), fds.next().unwrap());
        ipc_platform::check_sealed(memfd.as_fd(), layout.segment_size() as u64).expect("a sealed segment");
        let region = Mapping::map(memfd.as_fd(), layout.segment_size()).unwrap();
        SegmentLayout::read_header(&region, b.ring_capacity).expect("the daemon wrote the header");
        let Segment { request_producer, response_consumer, words, .. } = Segment::new(region, &layout);
        Rings {
            requests: request_producer,
            responses: response_consumer,
            words,
            bell: EventFd::from_fd(bell).unwrap(),
            liveness: UnixStream::from(liveness),
            next_id: 1,
        }
    }

    /// One call: push, publish, ring, then poll for the reply (the test
    /// waits on the reply itself, within a deadline).
    fn call(&mut self, service: u16, payload: &[u8]) -> (u16, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.try_push(service, 0, id, payload).expect("room in an idle ring");
        self.requests.publish();
        self.bell.notify().unwrap();
        let mut body = Vec::new();
        let deadline = Instant::now() + HANG_UP_LIMIT;
        loop {
            if let Some(h) = self.responses.try_pop(&mut body).unwrap() {
                self.responses.release();
                assert_eq!(h.request_id, id);
                return (h.flags, body);
            }
            assert!(Instant::now() < deadline, "no reply within {HANG_UP_LIMIT:?}");
            thread::yield_now();
        }
    }
}

impl Rings {
    /// Writes one frame of any kind, and rings the provider.
    fn push(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) {
        self.requests.try_push(service, flags, id, payload).expect("room in the ring");
        self.requests.publish();
        self.bell.notify().unwrap();
    }

    /// The next frame from the provider (a provider waiting for room is
    /// rung once this one is read).
    fn pop(&mut self) -> (ipc_core::FrameHeader, Vec<u8>) {
        let mut body = Vec::new();
        let deadline = Instant::now() + HANG_UP_LIMIT;
        loop {
            if let Some(h) = self.responses.try_pop(&mut body).unwrap() {
                if self.responses.release() {
                    self.bell.notify().unwrap();
                }
                return (h, body);
            }
            assert!(Instant::now() < deadline, "no frame within {HANG_UP_LIMIT:?}");
            thread::yield_now();
        }
    }

    /// The next whole message (reassembled as the spec says): its flags
    /// and bytes, and the frames that carried it.
    fn message(&mut self, rx: &mut ipc_core::message::Assembler) -> (u16, Vec<u8>, usize) {
        let (mut bytes, mut frames) = (Vec::new(), 0);
        loop {
            let (h, payload) = self.pop();
            let piece = rx.take(&h, &payload).expect("frames the spec allows");
            bytes.extend_from_slice(piece.bytes);
            frames += 1;
            if piece.last {
                return (h.flags, bytes, frames);
            }
        }
    }
}

/// A provider of `names` (each an upper-casing echo) on `socket`, served
/// on a thread of this process.
fn provide(
    socket: &Path,
    names: &[&str],
    pooled: bool,
) -> Result<(ShutdownHandle, thread::JoinHandle<()>), ProviderError> {
    let mut builder = Provider::builder().socket(socket).workers(1).pooled(pooled);
    for name in names {
        builder = builder.service(*name, |req| Ok::<_, ServiceError>(req.payload().to_ascii_uppercase()));
    }
    let provider = builder.connect()?;
    let stop = provider.shutdown_handle();
    let thread = thread::spawn(move || provider.run().expect("the provider runs"));
    Ok((stop, thread))
}

fn stop(provider: (ShutdownHandle, thread::JoinHandle<()>)) {
    provider.0.shutdown();
    join_within(provider.1, TEST_LIMIT, "the provider");
}

#[test]
fn a_provided_name_is_resolved_and_called_directly() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = provide(&socket, &["test.upper", "test.other"], false).expect("register");
        let mut caller = Caller::connect(&socket);
        let (brokered, mut rings) = caller.session("test.upper");
        assert_eq!(brokered.provider.pid, std::process::id() as i32, "the provider is this process");
        let names: Vec<&str> = brokered.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["test.upper", "test.other"], "every service the caller may call is granted");
        let id = brokered.services[0].id;
        assert_eq!(rings.call(id, b"hello"), (0, b"HELLO".to_vec()));
        assert_eq!(rings.call(id, b"again"), (0, b"AGAIN".to_vec()));
        // The session does not depend on the caller's broker connection.
        drop(caller);
        assert_eq!(rings.call(id, b"still"), (0, b"STILL".to_vec()));
        stop(provider);
        // A provider that stops hangs up the session's liveness socket.
        let mut byte = [0u8; 1];
        rings.liveness.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
        assert_eq!(rings.liveness.read(&mut byte).unwrap(), 0);
    });
}

#[test]
fn names_nobody_holds_are_unknown_and_an_exclusive_name_is_refused_naming_its_holder() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut caller = Caller::connect(&socket);
        assert!(matches!(
            caller.resolve("nobody.here", 0),
            (Resolution::Failed(ResolveError::UnknownService { .. }), fds) if fds.is_empty()
        ));
        assert!(matches!(caller.resolve("bad..name", 0), (Resolution::Failed(ResolveError::BadName { .. }), _)));
        let first = provide(&socket, &["test.excl"], false).expect("register");
        match provide(&socket, &["test.excl"], false) {
            Err(ProviderError::Refused(RegisterError::Taken { name, holder })) => {
                assert_eq!(name, "test.excl");
                assert_eq!(holder.pid, std::process::id() as i32);
            }
            other => panic!("a second exclusive provider: {:?}", other.map(|_| ())),
        }
        match provide(&socket, &["echo"], false) {
            Err(ProviderError::Refused(RegisterError::Reserved { .. })) => {}
            other => panic!("a built-in name: {:?}", other.map(|_| ())),
        }
        // Its hang-up frees the name at once.
        stop(first);
        let again = provide(&socket, &["test.excl"], false).expect("the name is free again");
        stop(again);
    });
}

#[test]
fn a_resolve_waits_for_a_provider_that_registers_later() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let waiting = {
            let socket = socket.clone();
            thread::spawn(move || {
                let mut caller = Caller::connect(&socket);
                let (answer, fds) = caller.resolve("test.late", 30_000);
                (answer, fds.len())
            })
        };
        // Registered only once the daemon says the resolve waits.
        let mut observer = ipc_client::Client::connect_to(&socket).unwrap();
        let (waits, json) = stat_eventually(&mut observer, "waiting_resolves", |n| n == 1);
        assert_eq!(waits, 1, "{json}");
        let provider = provide(&socket, &["test.late"], false).expect("register");
        let (answer, fds) = join_within(waiting, TEST_LIMIT, "the waiting resolve");
        assert!(matches!(answer, Resolution::Brokered(_)), "{answer:?}");
        assert_eq!(fds, 3);
        stop(provider);
    });
}

#[test]
fn pooled_providers_share_new_sessions() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let a = provide(&socket, &["test.pool"], true).expect("register a");
        let b = provide(&socket, &["test.pool"], true).expect("register b");
        let mut caller = Caller::connect(&socket);
        let sessions: Vec<_> = (0..4).map(|_| caller.session("test.pool")).collect();
        let mut client = ipc_client::Client::connect_to(&socket).unwrap();
        let json = stats_json(&mut client);
        let counts: Vec<u64> = json_array(&json, "sessions");
        assert_eq!(counts, [2, 2], "four sessions over two pooled providers: {json}");
        drop(sessions);
        stop(a);
        stop(b);
    });
}

/// The numbers under `key` everywhere in `json`, in order (a crude reader:
/// the stats JSON is flat enough).
fn json_array(json: &str, key: &str) -> Vec<u64> {
    let needle = format!("\"{key}\":");
    json.match_indices(&needle)
        .filter_map(|(at, _)| {
            let rest = &json[at + needle.len()..];
            let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

/// The tests of this file run one at a time: their providers live in this
/// process, and one test counts the process's fds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open fds of this process (the providers of these tests run in it).
fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn a_caller_that_goes_frees_its_session_in_the_provider_and_the_daemon() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = provide(&socket, &["test.free"], false).expect("register");
        let mut observer = ipc_client::Client::connect_to(&socket).unwrap();
        let mut caller = Caller::connect(&socket);
        // A first session, gone again, shows the provider serving (its
        // workers started): then the fds are settled.
        let (b, mut warm) = caller.session("test.free");
        assert_eq!(warm.call(b.services[0].id, b"w"), (0, b"W".to_vec()));
        drop(warm);
        assert_eq!(stat_eventually(&mut observer, "sessions_handed_over", |n| n == 0).0, 0);
        let baseline = own_fds();
        let (b, mut rings) = caller.session("test.free");
        assert_eq!(rings.call(b.services[0].id, b"x"), (0, b"X".to_vec()));
        assert_eq!(stat_eventually(&mut observer, "sessions_handed_over", |n| n == 1).0, 1);
        drop(rings);
        // The provider sees the liveness end close, drops the session and
        // tells the daemon, which forgets it: fds back where they were.
        let (left, json) = stat_eventually(&mut observer, "sessions_handed_over", |n| n == 0);
        assert_eq!(left, 0, "{json}");
        assert!(poll_until(CLEANUP_LIMIT, || own_fds() == baseline), "fds {} against {baseline}", own_fds());
        stop(provider);
    });
}

#[test]
fn a_provider_that_stops_marks_the_calls_it_never_took() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = provide(&socket, &["test.stop"], false).expect("register");
        let mut caller = Caller::connect(&socket);
        let (b, mut rings) = caller.session("test.stop");
        let id = b.services[0].id;
        assert_eq!(rings.call(id, b"a"), (0, b"A".to_vec()));
        stop(provider);
        // The graceful stop said which request it took last: the first.
        assert!(poll_until(HANG_UP_LIMIT, || rings.words.closed_after().is_some()), "the closed word was not set");
        assert_eq!(rings.words.closed_after(), Some(1));
    });
}

#[test]
fn a_caller_that_breaks_its_ring_is_dropped_by_the_provider_and_struck_by_the_daemon() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = provide(&socket, &["test.hostile"], false).expect("register");
        let mut observer = ipc_client::Client::connect_to(&socket).unwrap();
        let mut good = Caller::connect(&socket);
        let (b, mut kept) = good.session("test.hostile");
        let mut bad = Caller::connect(&socket);
        let (_, mut broken) = bad.session("test.hostile");
        // An index no honest producer can publish.
        broken.words.index(Direction::Request, Index::Head).store(12345, std::sync::atomic::Ordering::Release);
        broken.bell.notify().unwrap();
        let mut byte = [0u8; 1];
        broken.liveness.set_read_timeout(Some(HANG_UP_LIMIT)).unwrap();
        assert_eq!(broken.liveness.read(&mut byte).unwrap(), 0, "the provider hangs up on the scribbler");
        let (reported, json) = stat_eventually(&mut observer, "strikes_reported", |n| n == 1);
        assert_eq!(reported, 1, "{json}");
        // The other caller of the same provider goes on.
        assert_eq!(kept.call(b.services[0].id, b"fine"), (0, b"FINE".to_vec()));
        stop(provider);
    });
}

#[test]
fn a_daemon_that_dies_leaves_brokered_sessions_alone_and_providers_register_again() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::builder().dir(dir).start();
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut daemon = daemon;
        let provider = provide(&socket, &["test.restart"], false).expect("register");
        let mut caller = Caller::connect(&socket);
        let (b, mut rings) = caller.session("test.restart");
        let id = b.services[0].id;
        assert_eq!(rings.call(id, b"before"), (0, b"BEFORE".to_vec()));
        daemon.kill();
        // Calls go on with no daemon at all.
        for i in 0..100u32 {
            let payload = format!("during {i}");
            assert_eq!(rings.call(id, payload.as_bytes()), (0, payload.to_uppercase().into_bytes()));
        }
        let daemon = Daemon::builder().dir(daemon.into_dir()).start();
        // The provider registers again by itself, and a new caller reaches it.
        let mut fresh = None;
        assert!(
            poll_until(HANG_UP_LIMIT, || {
                let mut caller = Caller::connect(daemon.socket());
                match caller.resolve("test.restart", 0) {
                    (Resolution::Brokered(b), fds) => {
                        fresh = Some(Rings::new(&b, fds));
                        true
                    }
                    _ => false,
                }
            }),
            "the provider did not register with the new daemon"
        );
        let mut fresh = fresh.unwrap();
        assert_eq!(fresh.call(id, b"new"), (0, b"NEW".to_vec()));
        assert_eq!(rings.call(id, b"after"), (0, b"AFTER".to_vec()), "the old session still works");
        // The new daemon counts the old session (reported at registration)
        // and the new one; the old one's end lowers the count.
        let mut observer = ipc_client::Client::connect_to(daemon.socket()).unwrap();
        assert_eq!(json_array(&stats_json(&mut observer), "sessions"), [2]);
        drop(rings);
        let mut counts = Vec::new();
        let settled = poll_until(CLEANUP_LIMIT, || {
            counts = json_array(&stats_json(&mut observer), "sessions");
            counts == [1]
        });
        assert!(settled, "the provider's sessions as the new daemon counts them: {counts:?}");
        stop(provider);
    });
}

#[test]
fn a_provider_streams_items_and_sends_replies_longer_than_a_frame() {
    use ipc_core::message::{encode_credit, Assembler, StreamOpen, FLAG_CREDIT, FLAG_END, FLAG_STREAM};
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = Provider::builder()
            .socket(&socket)
            .workers(1)
            .service("test.big", |req| {
                let len = u32::from_le_bytes(req.payload().try_into().map_err(|_| ServiceError::new("a u32"))?);
                Ok(vec![7; len as usize])
            })
            .stream_service("test.items", |req, mut items| {
                let len = u32::from_le_bytes(req.payload().try_into().unwrap()) as usize;
                for i in 0..3u8 {
                    if items.send(vec![i; len]).is_err() {
                        return;
                    }
                }
                items.end();
            })
            .connect()
            .expect("register");
        let stop = provider.shutdown_handle();
        let running = thread::spawn(move || provider.run().expect("the provider runs"));
        let mut caller = Caller::connect(&socket);
        let (brokered, mut rings) = caller.session("test.big");
        let id_of = |name: &str| brokered.services.iter().find(|s| s.name == name).unwrap().id;
        let (big, items) = (id_of("test.big"), id_of("test.items"));
        let over = rings.requests.max_payload() + 1;
        let mut rx = Assembler::new(u64::MAX - 1);
        // A reply one byte over a frame comes in chunks.
        rings.push(big, 0, 1, &over.to_le_bytes());
        let (flags, bytes, frames) = rings.message(&mut rx);
        assert_eq!((flags, bytes.len(), frames), (0, over as usize, 2));
        assert!(bytes.iter().all(|&b| b == 7));
        // A stream whose items are longer than a frame, granted one by one.
        let open = [&StreamOpen { credit: 1, deadline_ms: 0 }.encode()[..], &over.to_le_bytes()].concat();
        rings.push(items, FLAG_STREAM, 2, &open);
        for i in 0..3u8 {
            let (flags, bytes, frames) = rings.message(&mut rx);
            assert_eq!((flags, frames), (FLAG_STREAM, 2), "item {i}");
            assert!(bytes.len() == over as usize && bytes.iter().all(|&b| b == i), "item {i}");
            rings.push(items, FLAG_CREDIT, 2, &encode_credit(1));
        }
        let (flags, bytes, _) = rings.message(&mut rx);
        assert_eq!((flags, bytes.len()), (FLAG_END, 0), "a plain end");
        stop.shutdown();
        join_within(running, TEST_LIMIT, "the provider");
    });
}
