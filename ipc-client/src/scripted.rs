//! Peers played by the client's own tests, with no daemon: a daemon that
//! hands a client its session, a broker that answers its resolves, and the
//! providers behind them. Each makes the segment and doorbells itself,
//! then writes into the rings exactly what a case needs, at exactly the
//! moment it needs it, to pin down which outcome each request gets.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipc_core::control::{Brokered, Resolution, Resolve, ResolveError, Role};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::message::{
    decode_credit, encode_chunk_prefix, Assembler, StreamOpen, CHUNK_PREFIX, FLAG_CANCEL, FLAG_CREDIT, FLAG_END,
    FLAG_MORE, FLAG_STREAM,
};
use ipc_core::{
    encode_error, stream_frame, Consumer, Credentials, DoorbellKind, ErrorCode, FrameHeader, Hello, Producer,
    PushError, Segment, SegmentLayout, ServerMessage, ServiceEntry, SharedWords, Welcome, FLAG_ERROR, HEADER_LEN,
    PROTOCOL_VERSION,
};
use ipc_platform::{EventFd, Mapping, SocketBell};

use crate::{Client, ClientOptions, Transport};

/// How long a test may wait for something that should happen at once. It
/// only turns a hang into a failure; it is not a performance bound.
pub(crate) const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Ring capacity of every scripted session: four requests of 1000 bytes
/// fill a ring.
pub(crate) const CAPACITY: u32 = 4096;

/// The id of the scripted daemon's `echo`.
pub(crate) const ECHO: u16 = 1;

/// Runs `f` on a thread of its own and returns its result, or fails the
/// test if it has none within [`HANG_LIMIT`] (the thread is left behind,
/// blocked: the test process ends with it).
pub(crate) fn within_limit<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| panic!("{what} did not return within {HANG_LIMIT:?}"))
}

/// Polls `f` until it gives a value, failing the test after [`HANG_LIMIT`].
pub(crate) fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "the scripted peer waited {HANG_LIMIT:?} in vain");
        thread::sleep(Duration::from_millis(1));
    }
}

/// As [`poll`], yielding between looks rather than sleeping: for peers
/// that move many frames.
pub(crate) fn poll_busy<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + HANG_LIMIT;
    for turn in 0u64.. {
        if let Some(v) = f() {
            return v;
        }
        if turn % 1024 == 1023 {
            assert!(Instant::now() < deadline, "the scripted peer waited {HANG_LIMIT:?} in vain");
        }
        thread::yield_now();
    }
    unreachable!()
}

/// The reply a scripted peer gives request `id`.
pub(crate) fn reply_to(id: u64) -> Vec<u8> {
    format!("reply to request {id}").into_bytes()
}

/// Options of a client of scripted peers: their ring size, and no
/// spinning, so that every wait sleeps.
pub(crate) fn options() -> ClientOptions {
    ClientOptions::default().ring_capacity(CAPACITY).spin(Duration::ZERO)
}

/// What a scripted peer hands over as the client-to-peer doorbell.
#[derive(Clone, Copy)]
pub(crate) enum PeerBell {
    /// An eventfd, as the daemon does.
    EventFd,
    /// `/dev/null` opened read-only: every ring of it fails (`EBADF`).
    Broken,
}

/// A request-direction frame as a scripted peer reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) header: FrameHeader,
    pub(crate) payload: Vec<u8>,
}

/// What a scripted peer knows of a stream it serves.
#[derive(Debug, Default)]
pub(crate) struct Served {
    /// Items sent.
    pub(crate) sent: u64,
    /// The credit granted in all (the window at the opening included).
    pub(crate) granted: u64,
    /// A cancel came.
    pub(crate) cancelled: bool,
}

/// The frames every scripted peer moves, over shared memory or a socket,
/// and what it builds on them: messages in chunks, stream items, ends,
/// credits.
pub(crate) trait Frames {
    /// The next request-direction frame, if one is there now.
    fn try_take(&mut self) -> Option<Taken>;

    /// Writes a response-direction frame if there is room now, and hands
    /// it to the client (waking it if it sleeps). Whether there was room.
    fn try_send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) -> bool;

    /// The largest payload of a frame.
    fn max_payload(&self) -> usize;

    /// The next request-direction frame, waiting for it.
    fn take(&mut self) -> Taken {
        poll_busy(|| self.try_take())
    }

    /// Writes a response-direction frame, waiting for room (the client
    /// reads meanwhile).
    fn send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) {
        poll_busy(|| self.try_send(service, flags, id, payload).then_some(()));
    }

    /// Takes a whole request, its chunks put together: its first frame's
    /// header, its bytes, and how many frames it came in.
    fn take_message(&mut self) -> (FrameHeader, Vec<u8>, usize) {
        let mut assembler = Assembler::new(u64::MAX - 1);
        let mut body = Vec::new();
        let mut first = None;
        for frames in 1.. {
            let Taken { header, payload } = self.take();
            assert_eq!(header.flags & !FLAG_MORE, 0, "a frame of a message: {header:?}");
            let piece = assembler.take(&header, &payload).expect("chunks that go together");
            body.extend_from_slice(piece.bytes);
            let first = *first.get_or_insert(header);
            assert_eq!(header.request_id, first.request_id, "chunks of another message interleaved");
            if piece.last {
                return (first, body, frames);
            }
        }
        unreachable!()
    }

    /// Sends a reply of any length: in one frame if it fits, else in
    /// chunks of the largest payload.
    fn send_message(&mut self, service: u16, id: u64, body: &[u8]) {
        let max = self.max_payload();
        if body.len() <= max {
            return self.send(service, 0, id, body);
        }
        let first = [&encode_chunk_prefix(body.len() as u64)[..], &body[..max - CHUNK_PREFIX]].concat();
        self.send(service, FLAG_MORE, id, &first);
        let mut rest = &body[max - CHUNK_PREFIX..];
        while !rest.is_empty() {
            let n = rest.len().min(max);
            self.send(service, if n == rest.len() { 0 } else { FLAG_MORE }, id, &rest[..n]);
            rest = &rest[n..];
        }
    }

    /// Takes a request in chunks and sends each straight back as a chunk
    /// of the reply, as it comes: never more than a chunk held.
    fn echo_chunk_by_chunk(&mut self) -> (FrameHeader, usize) {
        let mut frames = 0;
        loop {
            let Taken { header, payload } = self.take();
            frames += 1;
            assert_eq!(header.flags & !FLAG_MORE, 0, "a frame of a message: {header:?}");
            self.send(header.service, header.flags, header.request_id, &payload);
            if header.flags & FLAG_MORE == 0 {
                return (header, frames);
            }
        }
    }

    /// Takes a stream's opening: its header, options and request.
    fn take_open(&mut self) -> (FrameHeader, StreamOpen, Vec<u8>) {
        let Taken { header, payload } = self.take();
        assert_eq!(header.flags, FLAG_STREAM, "a stream's opening: {header:?}");
        let (open, request) = StreamOpen::decode(&payload).expect("stream options");
        (header, open, request.to_vec())
    }

    /// Serves stream `opened` (granted `open.credit` at the opening) the
    /// items `items` gives, each only within the credit granted (waiting
    /// for credit frames as needed, and asserting it has credit before
    /// each item it sends), telling `granted` each new total. Stops early
    /// at a cancel. Sends no end.
    fn serve_items(
        &mut self,
        opened: &FrameHeader,
        open: StreamOpen,
        items: impl IntoIterator<Item = Vec<u8>>,
        mut granted: impl FnMut(u64),
    ) -> Served {
        let mut served = Served { granted: u64::from(open.credit), ..Served::default() };
        granted(served.granted);
        for item in items {
            while served.sent == served.granted {
                if !self.take_control(opened, &mut served) {
                    return served;
                }
                granted(served.granted);
            }
            assert!(served.sent < served.granted, "an item without credit");
            self.send_item(opened, &item);
            served.sent += 1;
        }
        served
    }

    /// Takes a credit or a cancel for stream `opened`; `false` at a cancel.
    fn take_control(&mut self, opened: &FrameHeader, served: &mut Served) -> bool {
        let Taken { header, payload } = self.take();
        assert_eq!((header.request_id, header.service), (opened.request_id, opened.service), "{header:?}");
        match header.flags {
            FLAG_CREDIT => {
                served.granted += u64::from(decode_credit(&payload).expect("a credit"));
                true
            }
            FLAG_CANCEL => {
                assert!(payload.is_empty(), "a cancel carries nothing");
                served.cancelled = true;
                false
            }
            other => panic!("a stream's frame with flags {other:#x}"),
        }
    }

    /// Sends one item of stream `opened`: one frame if it fits, else chunks.
    fn send_item(&mut self, opened: &FrameHeader, item: &[u8]) {
        let (service, id, max) = (opened.service, opened.request_id, self.max_payload());
        if item.len() <= max {
            return self.send(service, FLAG_STREAM, id, item);
        }
        let first = [&encode_chunk_prefix(item.len() as u64)[..], &item[..max - CHUNK_PREFIX]].concat();
        self.send(service, FLAG_STREAM | FLAG_MORE, id, &first);
        let mut rest = &item[max - CHUNK_PREFIX..];
        while !rest.is_empty() {
            let n = rest.len().min(max);
            let more = if n == rest.len() { 0 } else { FLAG_MORE };
            self.send(service, FLAG_STREAM | more, id, &rest[..n]);
            rest = &rest[n..];
        }
    }

    /// Ends stream `opened`: with `Ok`, its end; else with that error.
    fn end_stream(&mut self, opened: &FrameHeader, outcome: Result<(), (ErrorCode, &str)>) {
        let (service, id) = (opened.service, opened.request_id);
        match outcome {
            Ok(()) => self.send(service, FLAG_END, id, &[]),
            Err((code, message)) => {
                let mut body = Vec::new();
                encode_error(code, message, &mut body);
                self.send(service, FLAG_END | FLAG_ERROR, id, &body);
            }
        }
    }
}

/// The peer's side of one shared-memory session: the daemon's, or a
/// provider's.
pub(crate) struct PeerSide {
    /// The control connection (a provider's: its end of the liveness
    /// pair). Dropping it hangs up.
    pub(crate) control: UnixStream,
    pub(crate) words: SharedWords,
    pub(crate) requests: Consumer,
    pub(crate) responses: Producer,
    /// The peer's end of a pollable doorbell.
    pub(crate) bell: Option<SocketBell>,
    /// The service its replies name by default.
    pub(crate) service: u16,
}

impl Frames for PeerSide {
    fn try_take(&mut self) -> Option<Taken> {
        let mut payload = Vec::new();
        let header = self.requests.try_pop(&mut payload).expect("request ring")?;
        self.release_requests();
        Some(Taken { header, payload })
    }

    fn try_send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) -> bool {
        match self.responses.try_push(service, flags, id, payload) {
            Ok(()) => {
                self.publish();
                true
            }
            Err(PushError::Full) => false,
            Err(e) => panic!("response ring: {e}"),
        }
    }

    fn max_payload(&self) -> usize {
        self.responses.max_payload() as usize
    }
}

impl PeerSide {
    /// Takes the next request, waiting for the client to publish it.
    pub(crate) fn take_request(&mut self) -> (FrameHeader, Vec<u8>) {
        let mut body = Vec::new();
        let header = poll(|| self.requests.try_pop(&mut body).expect("request ring"));
        self.release_requests();
        (header, body)
    }

    /// Hands the request space read back, waking the client if it waits
    /// for room.
    pub(crate) fn release_requests(&mut self) {
        if self.requests.release() {
            match &self.bell {
                Some(bell) => bell.ring().unwrap(),
                None => {
                    ipc_platform::futex::wake_one(self.requests.peer_waiter()).unwrap();
                }
            }
        }
    }

    /// Publishes a reply, waking the client if it sleeps.
    pub(crate) fn reply(&mut self, id: u64, flags: u16, body: &[u8]) {
        self.push_reply(id, flags, body);
        self.publish();
    }

    /// Takes the next request and answers it with [`reply_to`].
    pub(crate) fn serve_one(&mut self) -> FrameHeader {
        let (header, _) = self.take_request();
        self.reply_as(header.service, header.request_id, &reply_to(header.request_id));
        header
    }

    /// Publishes a reply under `service`, waking the client if it sleeps.
    pub(crate) fn reply_as(&mut self, service: u16, id: u64, body: &[u8]) {
        self.responses.try_push(service, 0, id, body).expect("room for the reply");
        self.publish();
    }

    /// Writes a reply, unpublished until [`PeerSide::publish`].
    pub(crate) fn push_reply(&mut self, id: u64, flags: u16, body: &[u8]) {
        self.responses.try_push(self.service, flags, id, body).expect("room for the reply");
    }

    /// Publishes the replies written, waking the client if it sleeps.
    pub(crate) fn publish(&mut self) {
        if self.responses.publish() {
            match &self.bell {
                Some(bell) => bell.ring().unwrap(),
                None => {
                    ipc_platform::futex::wake_one(self.responses.peer_waiter()).unwrap();
                }
            }
        }
    }

    /// Publishes a reply without waking anyone.
    pub(crate) fn reply_quietly(&mut self, id: u64) {
        self.responses.try_push(self.service, 0, id, &reply_to(id)).expect("room for the reply");
        // Only the client's announcement of a sleep is taken back; no wake.
        let _ = self.responses.publish();
    }

    /// Says the peer waits for room in the response ring, so the client
    /// rings it as soon as it consumes a reply.
    pub(crate) fn await_space(&self) {
        self.responses.space_waiter().store(1, Ordering::SeqCst);
    }

    /// Waits until the client sleeps for a reply (announced in the
    /// response ring).
    pub(crate) fn await_client_asleep(&self) {
        poll(|| (self.responses.peer_waiter().load(Ordering::SeqCst) == 1).then_some(()));
    }
}

/// A session's segment and doorbells as a peer makes them: the peer's
/// side (with a placeholder control connection, which the caller
/// replaces), and the fds to hand over in the order the protocol gives
/// (memfd, doorbell, [the client's liveness end], [the client's bell]).
pub(crate) fn make_session(doorbell: DoorbellKind, bell: PeerBell, liveness: bool) -> (PeerSide, Vec<OwnedFd>) {
    make_session_of(CAPACITY, doorbell, bell, liveness)
}

/// As [`make_session`], with rings of `capacity` bytes.
pub(crate) fn make_session_of(
    capacity: u32,
    doorbell: DoorbellKind,
    bell: PeerBell,
    liveness: bool,
) -> (PeerSide, Vec<OwnedFd>) {
    let layout = SegmentLayout::new(capacity).unwrap();
    let memfd = ipc_platform::create_sealed("scripted", layout.segment_size() as u64).unwrap();
    let region = Mapping::map(memfd.as_fd(), layout.segment_size()).unwrap();
    layout.write_header(&region);
    let client_to_peer: OwnedFd = match bell {
        PeerBell::EventFd => EventFd::new().unwrap().as_fd().try_clone_to_owned().unwrap(),
        PeerBell::Broken => std::fs::File::open("/dev/null").unwrap().into(),
    };
    let (control, client_control) = UnixStream::pair().unwrap();
    let mut fds = vec![memfd, client_to_peer];
    if liveness {
        fds.push(client_control.into());
    }
    let bell = match doorbell {
        DoorbellKind::Futex => None,
        DoorbellKind::Pollable => {
            let (ours, theirs) = SocketBell::pair().unwrap();
            fds.push(theirs.as_fd().try_clone_to_owned().unwrap());
            Some(ours)
        }
        other => panic!("the scripted daemon makes no {other:?} doorbell"),
    };
    // The peer's ends: it reads requests and writes replies.
    let Segment { request_consumer: requests, response_producer: responses, words, .. } = Segment::new(region, &layout);
    (PeerSide { control, words, requests, responses, bell, service: ECHO }, fds)
}

/// Reads a framed hello.
pub(crate) fn read_hello(stream: &mut UnixStream) -> Hello {
    handshake::decode_hello(&read_framed(stream)).unwrap()
}

/// Reads one framed message body.
pub(crate) fn read_framed(stream: &mut UnixStream) -> Vec<u8> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    stream.read_exact(&mut prefix).unwrap();
    let mut body = vec![0u8; handshake::body_len(prefix).unwrap()];
    stream.read_exact(&mut body).unwrap();
    body
}

/// Sends `bytes` with `fds`, all of it.
pub(crate) fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
    let fds: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
    let sent = ipc_platform::send_with_fds(stream.as_fd(), bytes, &fds).unwrap();
    (&*stream).write_all(&bytes[sent..]).unwrap();
}

/// The daemon's welcome for a scripted session.
pub(crate) fn welcome(doorbell: DoorbellKind) -> Welcome {
    welcome_of(CAPACITY, doorbell)
}

/// The daemon's welcome for a scripted session with rings of `capacity`.
pub(crate) fn welcome_of(capacity: u32, doorbell: DoorbellKind) -> Welcome {
    let layout = SegmentLayout::new(capacity).unwrap();
    Welcome {
        version: PROTOCOL_VERSION,
        session_id: 1,
        ring_capacity: capacity,
        max_payload: layout.max_payload(),
        doorbell,
        services: vec![ServiceEntry { name: "echo".into(), id: ECHO }],
    }
}

/// A daemon played by the test: it accepts one client, answers its hello
/// with a session of its own making and `bell` as the doorbell, then runs
/// `script` on its side of the session.
pub(crate) struct Scripted {
    pub(crate) path: PathBuf,
    /// The transport its clients connect with.
    wire: Wire,
    script: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The transports a scripted daemon speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wire {
    /// A shared-memory session handed over a Unix socket.
    Shm,
    /// Frames over the Unix socket itself (the daemon's `--uds`).
    Uds,
}

/// Both [`Wire`]s, for tests that run over each.
pub(crate) const WIRES: [Wire; 2] = [Wire::Shm, Wire::Uds];

/// A scripted daemon's side of a session over either transport.
pub(crate) enum Peer {
    Shm(PeerSide),
    Socket(SocketSide),
}

impl Frames for Peer {
    fn try_take(&mut self) -> Option<Taken> {
        match self {
            Peer::Shm(p) => p.try_take(),
            Peer::Socket(p) => p.try_take(),
        }
    }

    fn try_send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) -> bool {
        match self {
            Peer::Shm(p) => p.try_send(service, flags, id, payload),
            Peer::Socket(p) => p.try_send(service, flags, id, payload),
        }
    }

    fn max_payload(&self) -> usize {
        match self {
            Peer::Shm(p) => p.max_payload(),
            Peer::Socket(p) => p.max_payload(),
        }
    }
}

impl Peer {
    /// Waits until the client hangs up (or, over a socket, stops sending:
    /// a client that lost the link shuts its sending side), dropping what
    /// it still sends.
    pub(crate) fn await_hang_up(self) {
        let mut control = match self {
            Peer::Shm(p) => p.control,
            Peer::Socket(p) => p.stream,
        };
        control.set_nonblocking(false).unwrap();
        control.set_read_timeout(Some(HANG_LIMIT)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match control.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => panic!("waiting for the client to hang up: {e}"),
            }
        }
    }

    /// Closes the session on purpose, saying the last request it took was
    /// `last_taken`: the client's requests (and streams) above it were
    /// never taken. Then hangs up.
    pub(crate) fn close_after(self, last_taken: u64) {
        match self {
            Peer::Shm(p) => {
                p.words.mark_closed(last_taken);
                drop(p.control);
            }
            Peer::Socket(mut p) => {
                let closing = FrameHeader::closing(last_taken);
                assert!(p.try_send(closing.service, closing.flags, closing.request_id, &[]));
            }
        }
    }
}

impl Scripted {
    pub(crate) fn start(bell: PeerBell, script: impl FnOnce(PeerSide) + Send + 'static) -> Scripted {
        Scripted::start_of(CAPACITY, bell, script)
    }

    /// As [`Scripted::start`], with rings of `capacity` bytes (a client
    /// asks for them with `options().ring_capacity(capacity)`).
    pub(crate) fn start_of(capacity: u32, bell: PeerBell, script: impl FnOnce(PeerSide) + Send + 'static) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scripted.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let script = thread::spawn(move || {
            let (control, _) = listener.accept().unwrap();
            script(answer_session_of(capacity, control, DoorbellKind::Futex, bell));
        });
        Scripted { path, wire: Wire::Shm, script: Some(script), _dir: dir }
    }

    /// A daemon over `wire` with frames of the largest payload of rings of
    /// `capacity` bytes, running `script` on its side of the session.
    pub(crate) fn start_on(wire: Wire, capacity: u32, script: impl FnOnce(Peer) + Send + 'static) -> Scripted {
        match wire {
            Wire::Shm => Scripted::start_of(capacity, PeerBell::EventFd, |p| script(Peer::Shm(p))),
            Wire::Uds => Scripted::start_socket(capacity, |p| script(Peer::Socket(p))),
        }
    }

    /// A daemon over a Unix stream socket (the daemon's `--uds`): it
    /// accepts one client, welcomes it with frames of the largest payload
    /// of rings of `capacity`, then runs `script` on its side of the
    /// connection. A client of it connects with `Transport::Uds(path)`.
    pub(crate) fn start_socket(capacity: u32, script: impl FnOnce(SocketSide) + Send + 'static) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scripted-uds.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let script = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            assert_eq!(read_hello(&mut stream).role, Role::Session);
            let welcome = welcome_of(capacity, DoorbellKind::Futex);
            let max_payload = welcome.max_payload as usize;
            (&stream).write_all(&handshake::encode(&ServerMessage::Welcome(welcome)).unwrap()).unwrap();
            stream.set_nonblocking(true).unwrap();
            script(SocketSide { stream, input: Vec::new(), max_payload });
        });
        Scripted { path, wire: Wire::Uds, script: Some(script), _dir: dir }
    }

    /// A client of it with `options`, over its transport.
    pub(crate) fn client_with(&self, options: ClientOptions) -> Client {
        let transport = match self.wire {
            Wire::Shm => Transport::Shm(self.path.clone()),
            Wire::Uds => Transport::Uds(self.path.clone()),
        };
        Client::connect_with(transport, options).unwrap()
    }

    /// A client of it that never spins: every wait sleeps.
    pub(crate) fn client(&self) -> Client {
        self.client_with(options())
    }

    /// Waits for the script to end, passing on its panic.
    pub(crate) fn finish(mut self) {
        if let Err(panic) = self.script.take().expect("not finished yet").join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Reads a session's hello on `control` and answers it with a welcome and
/// a session of the peer's making.
pub(crate) fn answer_session(control: UnixStream, doorbell: DoorbellKind, bell: PeerBell) -> PeerSide {
    answer_session_of(CAPACITY, control, doorbell, bell)
}

fn answer_session_of(capacity: u32, mut control: UnixStream, doorbell: DoorbellKind, bell: PeerBell) -> PeerSide {
    assert_eq!(read_hello(&mut control).role, Role::Session);
    let (mut side, fds) = make_session_of(capacity, doorbell, bell, false);
    let bytes = handshake::encode(&ServerMessage::Welcome(welcome_of(capacity, doorbell))).unwrap();
    send_with_fds(&control, &bytes, &fds);
    side.control = control;
    side
}

/// The daemon's side of a stream-transport connection: frames read and
/// written without blocking.
pub(crate) struct SocketSide {
    pub(crate) stream: UnixStream,
    /// Bytes received and not yet taken as frames.
    input: Vec<u8>,
    max_payload: usize,
}

impl Frames for SocketSide {
    fn try_take(&mut self) -> Option<Taken> {
        loop {
            if let Some((header, true)) = stream_frame(&self.input) {
                let end = HEADER_LEN + header.len as usize;
                let payload = self.input[HEADER_LEN..end].to_vec();
                self.input.drain(..end);
                return Some(Taken { header, payload });
            }
            let mut buf = [0u8; 64 * 1024];
            match (&self.stream).read(&mut buf) {
                Ok(0) => panic!("the client hung up"),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
                Err(e) => panic!("receive: {e}"),
            }
        }
    }

    fn try_send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) -> bool {
        let header = FrameHeader { len: payload.len() as u32, service, flags, request_id: id };
        let frame = [&header.encode()[..], payload].concat();
        // Whole frames only, as the daemon sends: block for the rest once
        // the first bytes went.
        self.stream.set_nonblocking(false).unwrap();
        (&self.stream).write_all(&frame).unwrap();
        self.stream.set_nonblocking(true).unwrap();
        true
    }

    fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// A daemon with a broker, played by the test on one listener: the test
/// accepts each connection it expects, in order.
pub(crate) struct Rig {
    pub(crate) path: PathBuf,
    listener: UnixListener,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub(crate) fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rig.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        Rig { path, listener, _dir: dir }
    }

    /// The next connection, within the hang limit.
    pub(crate) fn accept(&self) -> UnixStream {
        let stream = poll(|| match self.listener.accept() {
            Ok((stream, _)) => Some(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("accept: {e}"),
        });
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(HANG_LIMIT)).unwrap();
        stream
    }

    /// A client connected to it with `options`, and the daemon's side of
    /// its session.
    pub(crate) fn connect(&self, options: ClientOptions) -> (Client, PeerSide) {
        let doorbell = options.doorbell;
        thread::scope(|s| {
            let daemon = s.spawn(|| answer_session(self.accept(), doorbell, PeerBell::EventFd));
            let client = Client::connect_with(&self.path, options).unwrap();
            (client, daemon.join().unwrap())
        })
    }

    /// Accepts a broker connection and answers its hello.
    pub(crate) fn broker(&self) -> BrokerSide {
        let mut stream = self.accept();
        assert_eq!(read_hello(&mut stream).role, Role::Broker);
        let accepted = ServerMessage::Accepted { version: PROTOCOL_VERSION, connection_id: 3 };
        (&stream).write_all(&handshake::encode(&accepted).unwrap()).unwrap();
        BrokerSide { stream }
    }
}

/// The broker's side of a client's broker connection.
pub(crate) struct BrokerSide {
    pub(crate) stream: UnixStream,
}

/// Who the scripted providers are.
pub(crate) const PROVIDER: Credentials = Credentials { pid: 4242, uid: 1000, gid: 1000 };

impl BrokerSide {
    /// Reads the client's next resolve.
    pub(crate) fn resolve(&mut self) -> Resolve {
        handshake::decode(&read_framed(&mut self.stream)).unwrap()
    }

    /// Answers a resolve with a session of its own making that offers
    /// `services`; returns the provider's side of it.
    pub(crate) fn grant(&mut self, resolve: &Resolve, services: &[(&str, u16)]) -> PeerSide {
        let (mut side, fds) = make_session(resolve.doorbell, PeerBell::EventFd, true);
        self.send_brokered(brokered(resolve.doorbell, services), &fds);
        side.service = services[0].1;
        side
    }

    /// Sends a `Brokered` answer with `fds`, whatever they are.
    pub(crate) fn send_brokered(&mut self, brokered: Brokered, fds: &[OwnedFd]) {
        let bytes = handshake::encode(&Resolution::Brokered(brokered)).unwrap();
        send_with_fds(&self.stream, &bytes, fds);
    }

    /// Answers a resolve with no session.
    pub(crate) fn fail(&mut self, error: ResolveError) {
        let bytes = handshake::encode(&Resolution::Failed(error)).unwrap();
        (&self.stream).write_all(&bytes).unwrap();
    }
}

/// A `Brokered` answer for a scripted session offering `services`.
pub(crate) fn brokered(doorbell: DoorbellKind, services: &[(&str, u16)]) -> Brokered {
    let layout = SegmentLayout::new(CAPACITY).unwrap();
    Brokered {
        session_id: 77,
        provider: PROVIDER,
        ring_capacity: CAPACITY,
        max_payload: layout.max_payload(),
        doorbell,
        services: services.iter().map(|&(name, id)| ServiceEntry { name: name.into(), id }).collect(),
    }
}
