//! A hostile provider and the real client: the "provider" here speaks the
//! provider protocol by hand (registers, takes each `Incoming`, maps the
//! segment) and then breaks the session in one way per session: a
//! scribbled segment header or a closed liveness end before it accepts, a
//! response index past the ring, frames of bad lengths or flags, replies
//! to requests nobody sent or under another service, or no reply at all.
//! Each gives the caller an error (`BadResolution`, `Disconnected`,
//! `Timeout`), never a panic or a hang, and the client's other links go
//! on.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ipc_client::{CallError, Client, ClientOptions};
use ipc_core::control::{DaemonMessage, Incoming, ProviderMessage, Register};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::{
    Direction, FrameHeader, Hello, Index, Role, Segment, SegmentLayout, ServerMessage, ServiceEntry, Waiter, HEADER_LEN,
};
use ipc_platform::Mapping;

/// How long the hostile provider waits for the daemon or the client.
const LIMIT: Duration = Duration::from_secs(60);

/// The ways the hostile provider breaks a session, one per session.
#[derive(Clone, Copy, Debug)]
enum Breach {
    /// Overwrites the segment's magic number before accepting.
    ScribbledHeader,
    /// Closes its liveness end before accepting.
    ClosedLiveness,
    /// Publishes a response index three rings ahead.
    IndexPastTheRing,
    /// A frame longer than the largest payload.
    FrameTooLong,
    /// A frame longer than what it published.
    FrameOverrun,
    /// A frame with flags no version defines.
    UnknownFlags,
    /// A reply to a request nobody sent.
    ReplyToNobody,
    /// The reply, under another service's id.
    WrongService,
    /// Takes the request and never answers.
    Silent,
}

/// The provider's connection to the daemon, spoken by hand.
struct HostileProvider {
    stream: UnixStream,
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
        let (n, got) = ipc_platform::recv_with_fds(stream.as_fd(), &mut chunk).expect("read from the daemon");
        assert!(n > 0, "the daemon hung up");
        fds.extend(got);
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl HostileProvider {
    /// Connects as a provider and registers `name` (service id 1).
    fn register(socket: &Path, name: &str) -> HostileProvider {
        let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        stream.write_all(&handshake::encode(&Hello::for_role(Role::Provider)).unwrap()).unwrap();
        let (answer, _) = read_framed(&stream);
        match handshake::decode::<ServerMessage>(&answer).unwrap() {
            ServerMessage::Accepted { .. } => {}
            other => panic!("a provider's hello answered with {other:?}"),
        }
        let mut provider = HostileProvider { stream };
        provider.send(&ProviderMessage::Register(Register {
            services: vec![
                ServiceEntry { name: name.into(), id: 1 },
                ServiceEntry { name: "test.other".into(), id: 2 },
            ],
            pooled: false,
            max_ring_capacity: 1 << 16,
            sessions: 0,
        }));
        match provider.next() {
            (DaemonMessage::Registered { .. }, _) => provider,
            (other, _) => panic!("the registration answered with {other:?}"),
        }
    }

    fn send(&mut self, message: &ProviderMessage) {
        self.stream.write_all(&handshake::encode(message).unwrap()).expect("write to the daemon");
    }

    fn next(&mut self) -> (DaemonMessage, Vec<OwnedFd>) {
        let (body, fds) = read_framed(&self.stream);
        (handshake::decode::<DaemonMessage>(&body).unwrap(), fds)
    }

    fn incoming(&mut self) -> (Incoming, Vec<OwnedFd>) {
        match self.next() {
            (DaemonMessage::Incoming(incoming), fds) => {
                assert_eq!(fds.len(), incoming.fd_count());
                (incoming, fds)
            }
            (other, _) => panic!("expected a session, got {other:?}"),
        }
    }

    /// Takes the next session and breaks it as `breach` says. Returns what
    /// must stay open for the breach alone to be what the client sees
    /// (its liveness end above all).
    fn serve(&mut self, breach: Breach) -> Kept {
        let (incoming, fds) = self.incoming();
        let layout = SegmentLayout::new(incoming.ring_capacity).unwrap();
        let accept = ProviderMessage::Accept { session_id: incoming.session_id };
        let mut fds = fds.into_iter();
        let (memfd, bell, liveness) = (fds.next().unwrap(), fds.next().unwrap(), fds.next().unwrap());
        match breach {
            Breach::ScribbledHeader => {
                File::from(memfd.try_clone().unwrap()).write_all_at(b"NOTMAGIC", 0).unwrap();
                self.send(&accept);
                return Kept { _fds: vec![memfd, bell, liveness], _segment: None };
            }
            Breach::ClosedLiveness => {
                drop(liveness);
                self.send(&accept);
                return Kept { _fds: vec![memfd, bell], _segment: None };
            }
            _ => {}
        }
        let region = Mapping::map(memfd.as_fd(), layout.segment_size()).unwrap();
        let mut seg = Segment::new(region, &layout);
        self.send(&accept);
        // The client's request.
        let mut body = Vec::new();
        let deadline = Instant::now() + LIMIT;
        let request = loop {
            if let Some(header) = seg.request_consumer.try_pop(&mut body).expect("the client's ring is sound") {
                seg.request_consumer.release();
                break header;
            }
            assert!(Instant::now() < deadline, "no request within {LIMIT:?}");
            thread::sleep(Duration::from_millis(1));
        };
        let head = seg.words.index(Direction::Response, Index::Head);
        let raw = |header: FrameHeader, published: usize| {
            seg.words.write_data(Direction::Response, 0, &header.encode());
            head.store(published as u64, Ordering::Release);
        };
        let reply = FrameHeader { len: 0, ..request };
        match breach {
            Breach::ScribbledHeader | Breach::ClosedLiveness => unreachable!("handled above"),
            Breach::IndexPastTheRing => head.store(3 * u64::from(layout.capacity()), Ordering::Release),
            Breach::FrameTooLong => raw(FrameHeader { len: u32::MAX / 2, ..reply }, HEADER_LEN + 8),
            Breach::FrameOverrun => raw(FrameHeader { len: 1000, ..reply }, HEADER_LEN + 8),
            Breach::UnknownFlags => raw(FrameHeader { flags: 0x4000, ..reply }, HEADER_LEN),
            Breach::ReplyToNobody => raw(FrameHeader { request_id: request.request_id + 1000, ..reply }, HEADER_LEN),
            Breach::WrongService => raw(FrameHeader { service: 2, ..reply }, HEADER_LEN),
            Breach::Silent => {}
        }
        // Wake the client if it sleeps, as an honest provider does.
        let waiter = seg.words.waiter(Direction::Response, Waiter::Data);
        waiter.store(0, Ordering::SeqCst);
        let _ = ipc_platform::futex::wake_one(waiter);
        Kept { _fds: vec![bell, liveness], _segment: Some(seg) }
    }
}

/// What the hostile provider keeps of a session it broke.
struct Kept {
    _fds: Vec<OwnedFd>,
    _segment: Option<Segment>,
}

/// Runs a hostile provider of `test.evil` on a thread: it breaks one
/// session in each of `breaches`' ways, in order, then keeps them all
/// until told to finish.
fn hostile(socket: &Path, breaches: Vec<Breach>) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
    let mut provider = HostileProvider::register(socket, "test.evil");
    let (finish, finished) = mpsc::channel::<()>();
    let thread = thread::spawn(move || {
        let kept: Vec<Kept> = breaches.into_iter().map(|b| provider.serve(b)).collect();
        let _ = finished.recv();
        drop(kept);
    });
    (finish, thread)
}

#[test]
fn a_provider_that_breaks_its_sessions_gives_its_caller_errors_never_a_panic_or_a_hang() {
    watchdog(TEST_LIMIT, || {
        let daemon = Daemon::start(&[]);
        let breaches = vec![
            Breach::ScribbledHeader,
            Breach::ClosedLiveness,
            Breach::IndexPastTheRing,
            Breach::FrameTooLong,
            Breach::FrameOverrun,
            Breach::UnknownFlags,
            Breach::ReplyToNobody,
            Breach::WrongService,
            Breach::Silent,
        ];
        let (finish, provider) = hostile(daemon.socket(), breaches.clone());
        let options = ClientOptions::default().call_timeout(LIMIT).connect_timeout(HANG_UP_LIMIT);
        let mut client = Client::connect_with(daemon.socket(), options).expect("connect");
        let echo = client.service("echo").unwrap();
        for breach in breaches {
            let outcome = match client.service("test.evil") {
                Err(e) => Err(e),
                Ok(evil) if matches!(breach, Breach::Silent) => {
                    client.call_timeout(&evil, b"anyone?", Duration::from_millis(200))
                }
                Ok(evil) => client.call(&evil, b"hello"),
            };
            let error = match outcome {
                Ok(reply) => panic!("{breach:?}: the call succeeded with {reply:?}"),
                Err(e) => e,
            };
            // Each breach is told as what it is: not as the provider's
            // death, since its liveness end stays open (but for the one
            // that closes it, which looks like a provider gone as it
            // accepted: worth resolving again).
            let told = match (&breach, &error) {
                (Breach::ScribbledHeader, CallError::BadResolution { reason, .. }) => reason.contains("header"),
                (Breach::ClosedLiveness, CallError::Unavailable { reason, .. }) => reason.contains("went away"),
                (
                    Breach::IndexPastTheRing | Breach::FrameTooLong | Breach::FrameOverrun | Breach::UnknownFlags,
                    CallError::Disconnected { reason },
                ) => reason.contains("response ring corrupt"),
                (Breach::ReplyToNobody, CallError::Disconnected { reason }) => reason.contains("not in flight"),
                (Breach::WrongService, CallError::Disconnected { reason }) => reason.contains("as service"),
                (Breach::Silent, CallError::Timeout { .. }) => true,
                _ => false,
            };
            assert!(told, "{breach:?} gave {error:?}");
            // The daemon link goes on.
            assert_eq!(client.call(&echo, b"still here").unwrap(), b"still here", "after {breach:?}");
        }
        finish.send(()).unwrap();
        join_within(provider, TEST_LIMIT, "the hostile provider");
    });
}
