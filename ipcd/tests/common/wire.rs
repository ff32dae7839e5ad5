//! Frames written and read by hand on any transport, for the tests of
//! chunked messages and streams: a [`Wire`] over a raw shared-memory
//! session or a raw uds/tcp connection, and [`Messages`], which reassembles
//! what the server sends the way ipc-core's spec says a client must.
//! Included by path (`#[path = "common/wire.rs"]`) by the test files that
//! use it, after `mod common`.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ipc_client::raw::RawSession;
use ipc_client::{ClientOptions, DoorbellKind, Transport};
use ipc_core::handshake::{self, LENGTH_PREFIX};
use ipc_core::message::{
    encode_chunk_prefix, encode_credit, Assembler, StreamOpen, CHUNK_PREFIX, FLAG_CANCEL, FLAG_CREDIT, FLAG_END,
    FLAG_MORE, FLAG_STREAM,
};
use ipc_core::{decode_error, ErrorCode, FrameHeader, Hello, ServerMessage, Welcome, FLAG_ERROR, HEADER_LEN};

/// How long a test waits for a frame before it fails (a watchdog, not a
/// bound).
pub const FRAME_LIMIT: Duration = Duration::from_secs(20);

/// A connection's frames, by hand.
pub struct Wire {
    welcome: Welcome,
    link: Link,
}

enum Link {
    Shm { raw: Box<RawSession>, got: VecDeque<(FrameHeader, Vec<u8>)> },
    Stream { out: Box<dyn Write + Send>, frames: Receiver<(FrameHeader, Vec<u8>)> },
}

impl Wire {
    /// Connects over `transport` with rings (or frames) of `capacity`.
    pub fn connect(transport: &Transport, capacity: u32) -> Wire {
        match transport {
            Transport::Shm(path) => {
                let options = ClientOptions::default()
                    .ring_capacity(capacity)
                    .doorbell(DoorbellKind::Futex)
                    .connect_timeout(FRAME_LIMIT);
                let raw = RawSession::connect(path, &options).unwrap_or_else(|e| panic!("raw session: {e}"));
                Wire { welcome: raw.welcome.clone(), link: Link::Shm { raw: Box::new(raw), got: VecDeque::new() } }
            }
            Transport::Uds(path) => {
                let s = UnixStream::connect(path).expect("connect to the --uds socket");
                let r = s.try_clone().unwrap();
                Wire::over_stream(Box::new(s), Box::new(r), capacity)
            }
            Transport::Tcp(addr) => {
                let s = TcpStream::connect(addr).expect("connect to the --tcp address");
                s.set_nodelay(true).unwrap();
                let r = s.try_clone().unwrap();
                Wire::over_stream(Box::new(s), Box::new(r), capacity)
            }
            other => panic!("no wire for {other:?}"),
        }
    }

    /// Handshakes on a stream, then reads its frames on a thread of their
    /// own (so a test that writes a long request never waits on its own
    /// unread replies).
    fn over_stream(mut out: Box<dyn Write + Send>, mut input: Box<dyn Read + Send>, capacity: u32) -> Wire {
        let hello = handshake::encode(&Hello::new(capacity, DoorbellKind::Futex)).unwrap();
        out.write_all(&hello).expect("send the hello");
        let mut prefix = [0u8; LENGTH_PREFIX];
        input.read_exact(&mut prefix).expect("an answer to the hello");
        let mut body = vec![0u8; handshake::body_len(prefix).expect("a length prefix")];
        input.read_exact(&mut body).expect("the whole answer");
        let welcome = match handshake::decode_server_message(&body).expect("the answer decodes") {
            ServerMessage::Welcome(w) => w,
            other => panic!("a hello answered with {other:?}"),
        };
        let (tx, frames) = mpsc::channel();
        thread::spawn(move || loop {
            let mut raw = [0u8; HEADER_LEN];
            if input.read_exact(&mut raw).is_err() {
                return;
            }
            let header = FrameHeader::decode(&raw);
            let mut body = vec![0u8; header.len as usize];
            if input.read_exact(&mut body).is_err() || tx.send((header, body)).is_err() {
                return;
            }
        });
        Wire { welcome, link: Link::Stream { out, frames } }
    }

    /// The id of the service called `name`.
    pub fn service(&self, name: &str) -> u16 {
        self.welcome.services.iter().find(|s| s.name == name).map(|s| s.id).unwrap_or_else(|| panic!("no {name:?}"))
    }

    /// The largest payload of one frame.
    pub fn max_payload(&self) -> usize {
        self.welcome.max_payload as usize
    }

    /// Writes one frame, waiting for room (reading what the server sends
    /// meanwhile, so neither side waits on the other). Returns false if the
    /// server has closed the session.
    pub fn send(&mut self, service: u16, flags: u16, id: u64, payload: &[u8]) -> bool {
        match &mut self.link {
            Link::Shm { raw, got } => {
                let deadline = Instant::now() + FRAME_LIMIT;
                loop {
                    match raw.requests.try_push(service, flags, id, payload) {
                        Ok(()) => {
                            raw.requests.publish();
                            raw.ring().expect("ring the daemon");
                            return true;
                        }
                        Err(ipc_core::PushError::Full) => {}
                        Err(e) => panic!("request ring: {e}"),
                    }
                    if raw.is_hung_up() {
                        return false;
                    }
                    // Reading makes the server's room, which makes ours.
                    Self::drain(raw, got);
                    assert!(Instant::now() < deadline, "no room in the request ring within {FRAME_LIMIT:?}");
                    thread::yield_now();
                }
            }
            Link::Stream { out, .. } => {
                let header = FrameHeader { len: payload.len() as u32, service, flags, request_id: id };
                out.write_all(&header.encode()).is_ok() && out.write_all(payload).is_ok()
            }
        }
    }

    fn drain(raw: &mut RawSession, got: &mut VecDeque<(FrameHeader, Vec<u8>)>) {
        let mut body = Vec::new();
        while let Some(h) = raw.responses.try_pop(&mut body).expect("response ring") {
            got.push_back((h, std::mem::take(&mut body)));
        }
        // A server waiting for room is rung, as a client must.
        if raw.responses.release() {
            raw.ring().expect("ring the daemon");
        }
    }

    /// The next frame from the server, if one comes within `limit`.
    pub fn recv_within(&mut self, limit: Duration) -> Option<(FrameHeader, Vec<u8>)> {
        match &mut self.link {
            Link::Shm { raw, got } => {
                let deadline = Instant::now() + limit;
                loop {
                    if let Some(frame) = got.pop_front() {
                        return Some(frame);
                    }
                    Self::drain(raw, got);
                    if got.is_empty() && (Instant::now() >= deadline || raw.is_hung_up()) {
                        return None;
                    }
                    thread::yield_now();
                }
            }
            Link::Stream { frames, .. } => frames.recv_timeout(limit).ok(),
        }
    }

    /// The next frame from the server.
    ///
    /// # Panics
    ///
    /// Panics if none comes within [`FRAME_LIMIT`].
    pub fn recv(&mut self) -> (FrameHeader, Vec<u8>) {
        self.recv_within(FRAME_LIMIT).unwrap_or_else(|| panic!("no frame from the server within {FRAME_LIMIT:?}"))
    }

    /// Whether the server closed the session (waiting up to `limit` for
    /// it, reading and dropping what it sends meanwhile).
    pub fn hung_up_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match &mut self.link {
                Link::Shm { raw, got } => {
                    if raw.is_hung_up() {
                        return true;
                    }
                    Self::drain(raw, got);
                    got.clear();
                }
                Link::Stream { frames, .. } => match frames.recv_timeout(Duration::from_millis(10)) {
                    Err(RecvTimeoutError::Disconnected) => return true,
                    Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                },
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::yield_now();
        }
    }

    /// Sends a message of `body` as request `id`: one frame if it fits,
    /// else chunks of at most `chunk` bytes after the first (whose length
    /// prefix says `announce`, the body's length unless given).
    pub fn send_message(&mut self, service: u16, id: u64, body: &[u8], announce: Option<u64>) -> bool {
        let max = self.max_payload();
        if body.len() <= max && announce.is_none() {
            return self.send(service, 0, id, body);
        }
        let first = body.len().min(max - CHUNK_PREFIX);
        let total = announce.unwrap_or(body.len() as u64);
        let head = [&encode_chunk_prefix(total)[..], &body[..first]].concat();
        let mut ok = self.send(service, FLAG_MORE, id, &head);
        let mut at = first;
        while ok && at < body.len() {
            let n = (body.len() - at).min(max);
            let flags = if at + n == body.len() { 0 } else { FLAG_MORE };
            ok = self.send(service, flags, id, &body[at..at + n]);
            at += n;
        }
        ok
    }

    /// Opens stream `id` of `service` with `credit` and `deadline_ms`.
    pub fn open(&mut self, service: u16, id: u64, credit: u32, deadline_ms: u32, request: &[u8]) -> bool {
        let payload = [&StreamOpen { credit, deadline_ms }.encode()[..], request].concat();
        self.send(service, FLAG_STREAM, id, &payload)
    }

    /// Grants stream `id` `n` more items.
    pub fn grant(&mut self, service: u16, id: u64, n: u32) -> bool {
        self.send(service, FLAG_CREDIT, id, &encode_credit(n))
    }

    /// Cancels stream (or request) `id`.
    pub fn cancel(&mut self, service: u16, id: u64) -> bool {
        self.send(service, FLAG_CANCEL, id, &[])
    }
}

/// A whole message from the server: its id, its flags (those of its last
/// frame, `FLAG_MORE` aside), its bytes, and how many frames carried it.
#[derive(Debug)]
pub struct Message {
    pub id: u64,
    pub flags: u16,
    pub body: Vec<u8>,
    pub frames: usize,
}

impl Message {
    /// Whether it is a stream's terminal frame.
    pub fn is_end(&self) -> bool {
        self.flags & FLAG_END != 0
    }

    /// Whether it is a stream's item.
    pub fn is_item(&self) -> bool {
        self.flags & FLAG_STREAM != 0 && !self.is_end()
    }

    /// The error it carries, if it is one.
    pub fn error(&self) -> Option<(ErrorCode, String)> {
        (self.flags & FLAG_ERROR != 0).then(|| {
            let (code, message) = decode_error(&self.body);
            (code, message.to_string())
        })
    }
}

/// Reassembles the server's messages, checking every frame as a client
/// must (the spec's [`Assembler`]).
pub struct Messages {
    rx: Assembler,
    partial: Vec<(u64, Vec<u8>, usize)>,
}

impl Messages {
    pub fn new() -> Messages {
        Messages { rx: Assembler::new(u64::MAX - 1), partial: Vec::new() }
    }

    /// Takes a frame; returns the message it completes, if it does.
    ///
    /// # Panics
    ///
    /// Panics on a frame that breaks the spec.
    pub fn take(&mut self, header: &FrameHeader, payload: &[u8]) -> Option<Message> {
        // An error frame of an id being assembled cuts that message short.
        if header.flags & FLAG_ERROR != 0 && self.rx.is_partial(header.request_id) {
            self.rx.drop_partial(header.request_id);
            self.partial.retain(|p| p.0 != header.request_id);
            return Some(Message { id: header.request_id, flags: header.flags, body: payload.to_vec(), frames: 1 });
        }
        let piece = self.rx.take(header, payload).unwrap_or_else(|e| panic!("the server broke the spec: {e}"));
        if piece.first && piece.last {
            return Some(Message { id: piece.id, flags: header.flags, body: piece.bytes.to_vec(), frames: 1 });
        }
        if piece.first {
            self.partial.push((piece.id, Vec::new(), 0));
        }
        let at = self.partial.iter().position(|p| p.0 == piece.id).expect("a message begun");
        self.partial[at].1.extend_from_slice(piece.bytes);
        self.partial[at].2 += 1;
        if !piece.last {
            return None;
        }
        let (id, body, frames) = self.partial.swap_remove(at);
        Some(Message { id, flags: header.flags, body, frames })
    }

    /// The next whole message from `wire`.
    pub fn next(&mut self, wire: &mut Wire) -> Message {
        loop {
            let (h, payload) = wire.recv();
            if let Some(m) = self.take(&h, &payload) {
                return m;
            }
        }
    }

    /// Messages begun and not finished.
    pub fn partial(&self) -> usize {
        self.partial.len()
    }
}

/// What the server sends for a well-formed call to `echo`-like services:
/// a message whose body is checked by the caller.
pub fn call(wire: &mut Wire, messages: &mut Messages, service: u16, id: u64, body: &[u8]) -> Message {
    assert!(wire.send_message(service, id, body, None), "the server closed the session");
    let m = messages.next(wire);
    assert_eq!(m.id, id, "replies come in order here");
    m
}

/// An io error from a closed socket, for callers that match on it.
pub fn is_closed(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset)
}
