//! A session over a byte stream (the `--uds` and `--tcp` transports): the
//! same frames, services and rules as the rings, read and written in
//! batches.
//!
//! Input is read without blocking into a buffer bounded by one maximum
//! frame plus read-ahead; replies collect in an output buffer that is sent
//! once per batch. When the client stops reading and the output passes its
//! bound, the session stops reading requests until the socket drains, so a
//! slow client holds only its own buffers. That is a stall: it begins when a
//! serve ends stalled and ends whenever the client takes some of the
//! replies, and the worker holds its length against the stall timeout.
//!
//! Both buffers are bounded in capacity, not only in what they hold, and
//! [`buffer_bound`] is what a session is charged against the daemon's
//! memory budget: input up to one maximum frame plus read-ahead; output up
//! to the replies held back (a maximum frame and the read-ahead, at most
//! `OUTPUT_BUDGET`, and one more frame appended before the check), as much again of bytes sent
//! but not yet compacted away (the output is compacted once the sent part
//! is as large as the unsent one, so each byte is copied at most once), and
//! the closing frame.
//!
//! Calls handed off to deferred or blocking handlers are answered later,
//! in any order; their answers join the output at the next serve, ahead of
//! new requests, while the output is within its bound, and queue in the
//! session otherwise (at most
//! [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS) of them: at that
//! many calls handed off, the session reads no request until one is
//! answered). A client on a Unix socket that stops sending with calls
//! outstanding gets their answers before the session ends; one that hangs
//! up altogether does not wait for them. TCP cannot tell the two apart
//! (a FIN is both), so there the end of a client's input ends the session
//! without waiting for calls still running.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use ipc_core::{stream_frame, FrameHeader, HEADER_LEN};
use ipc_platform::PeerCredentials;
use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::deferred::{Completion, Slot};
use crate::exchange::{Exchange, Took};
use crate::limits::{Lease, Limits};
use crate::outbox::{Flush, Sink};
use crate::request::SessionContext;
use crate::service::Serving;
use crate::session::{Progress, Scratch, Tally};
use crate::stats::{Carrier, WorkerCounters};

/// Read-ahead beyond one maximum frame.
const READ_AHEAD: usize = 64 * 1024;
/// Bytes read per `recv` at the least (the buffer grows to a frame as
/// needed).
const MIN_READ: usize = 16 * 1024;

/// The most a stream session whose frames carry at most `max_payload`
/// bytes holds in its input and output buffers (their capacity), in bytes:
/// what the session is charged against the daemon's memory budget.
pub(crate) fn buffer_bound(max_payload: usize) -> usize {
    input_bound(max_payload) + output_bound(max_payload)
}

fn frame_bound(max_payload: usize) -> usize {
    HEADER_LEN + max_payload
}

/// The most unsent output past which a session of large frames stops
/// taking requests: a session that reflects an echo, or sends a long reply,
/// holds this and one frame (a chunk, for a long message) of it, not as
/// much as the largest frame again.
const OUTPUT_BUDGET: usize = 256 * 1024;

/// Output beyond which a session stops reading requests.
fn output_limit(max_payload: usize) -> usize {
    (frame_bound(max_payload) + READ_AHEAD).min(OUTPUT_BUDGET)
}

fn input_bound(max_payload: usize) -> usize {
    frame_bound(max_payload) + READ_AHEAD
}

/// Unsent output stays within the limit plus the one reply appended after
/// the last check; the sent prefix is compacted away before it outgrows
/// the unsent part; and the closing frame comes last.
fn output_bound(max_payload: usize) -> usize {
    2 * (output_limit(max_payload) + frame_bound(max_payload)) + HEADER_LEN
}

/// Makes room for `more` bytes in `buf`, growing it by doubling as `Vec`
/// does but never past `bound` bytes of capacity.
fn reserve_within(buf: &mut Vec<u8>, more: usize, bound: usize) {
    let needed = buf.len() + more;
    if needed > buf.capacity() {
        let grown = buf.capacity().saturating_mul(2).clamp(needed, bound.max(needed));
        buf.reserve_exact(grown - buf.len());
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(mio::net::UnixStream),
    Tcp(mio::net::TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    /// Sends the end of the stream after what was written (a FIN on TCP).
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.register(registry, token, interests),
            Stream::Tcp(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.reregister(registry, token, interests),
            Stream::Tcp(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.deregister(registry),
            Stream::Tcp(s) => s.deregister(registry),
        }
    }
}

/// Who is at the other end, for logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    Unix(PeerCredentials),
    Tcp(SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix(c) => write!(f, "pid {} uid {}", c.pid, c.uid),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

pub(crate) struct StreamSession {
    pub(crate) id: u64,
    pub(crate) peer: Peer,
    /// Its calls: what its handlers see of it, the requests it receives,
    /// the calls handed off, the streams open, what waits to go out.
    exchange: Exchange,
    /// Its place in its worker, for the answers of handed-off calls.
    pub(crate) slot: Slot,
    pub(crate) stream: Stream,
    max_payload: usize,
    /// Received bytes are `input[start..end]`; the vector grows up to one
    /// maximum frame plus read-ahead.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Frames not yet sent.
    output: Output,
    /// The client closed its sending side: serve what is buffered, send the
    /// replies, then end.
    read_closed: bool,
    /// The poll reported the hang-up: read until end of input even after a
    /// short read (with an edge-triggered poll no second event comes).
    pub(crate) hangup_seen: bool,
    /// The client can no longer receive (EPIPE, ECONNRESET, or the poll
    /// reported its end closed both ways): end now.
    peer_gone: bool,
    /// The daemon closes the session on purpose: once the output is out,
    /// the sending side is shut, and the socket is closed when the client
    /// closes its end (or the drain ends): closing a socket with unread
    /// input resets the connection, and a TCP reset can cost the client the
    /// last frames it has not read yet.
    closing: bool,
    /// The closing frame is in the output: it goes after the answers of
    /// every call taken, so only once none is outstanding.
    closing_frame: bool,
    /// The sending side is shut (after the closing frame).
    write_shut: bool,
    /// Since when the session has waited, stalled, for the client to take
    /// replies; reset by every send that moves bytes.
    stalled_since: Option<Instant>,
    pub(crate) queued: bool,
    /// What the session is charged (memory, its uid's slot), given back
    /// when it drops.
    pub(crate) lease: Option<Lease>,
}

/// A stream session's frames not yet sent: `buf[sent..]`, in a buffer
/// bounded in capacity (see [`output_bound`]).
struct Output {
    buf: Vec<u8>,
    sent: usize,
    max_payload: usize,
    /// Bytes of the frames taken since the session last counted them.
    counted: u64,
}

impl Output {
    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Output beyond which the session stops reading requests and writing
    /// frames.
    fn limit(&self) -> usize {
        output_limit(self.max_payload)
    }

    /// Appends `bytes`, within the buffer's bound.
    fn push(&mut self, bytes: &[u8]) {
        reserve_within(&mut self.buf, bytes.len(), output_bound(self.max_payload));
        self.buf.extend_from_slice(bytes);
    }
}

impl Sink for Output {
    fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Takes a frame while the output is within its limit (so it may pass
    /// it by one frame, as the bound allows).
    fn put(&mut self, mut header: FrameHeader, parts: &[&[u8]]) -> Result<bool, String> {
        if self.pending() > self.limit() {
            return Ok(false);
        }
        header.len = parts.iter().map(|p| p.len()).sum::<usize>() as u32;
        self.counted += (HEADER_LEN + header.len as usize) as u64;
        self.push(&header.encode());
        for part in parts {
            self.push(part);
        }
        Ok(true)
    }
}

impl StreamSession {
    pub(crate) fn new(id: u64, peer: Peer, stream: Stream, max_payload: usize) -> StreamSession {
        let caller = match peer {
            Peer::Unix(cred) => Some(cred.into()),
            Peer::Tcp(_) => None,
        };
        StreamSession {
            id,
            peer,
            exchange: Exchange::new(SessionContext::new(id, caller)),
            slot: Slot::UNPLACED,
            stream,
            max_payload,
            input: Vec::new(),
            start: 0,
            end: 0,
            output: Output { buf: Vec::new(), sent: 0, max_payload, counted: 0 },
            read_closed: false,
            hangup_seen: false,
            peer_gone: false,
            closing: false,
            closing_frame: false,
            write_shut: false,
            stalled_since: None,
            queued: false,
            lease: None,
        }
    }

    /// What its handlers see of it (and its call counter).
    pub(crate) fn context(&self) -> &SessionContext {
        &self.exchange.context
    }

    fn pending_output(&self) -> usize {
        self.output.pending()
    }

    /// Since when the session has been stalled on replies the client does
    /// not take, if it is.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// Sends what the socket takes without blocking.
    fn send(&mut self) -> Result<(), String> {
        let out = &mut self.output;
        while out.sent < out.buf.len() {
            match self.stream.write(&out.buf[out.sent..]) {
                Ok(0) => return Err("the connection accepts no more bytes".into()),
                Ok(n) => {
                    out.sent += n;
                    // The client took some: whatever stall this was is over.
                    self.stalled_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                    // A hang-up, not a violation: its replies have nowhere to go.
                    self.peer_gone = true;
                    out.buf.clear();
                    out.sent = 0;
                    return Ok(());
                }
                Err(e) => return Err(format!("send failed: {e}")),
            }
        }
        if out.sent == out.buf.len() {
            out.buf.clear();
            out.sent = 0;
        } else if out.sent >= out.pending() {
            // Copies no more than was just sent: each byte moves at most
            // once, and what was sent never outgrows what was not.
            out.buf.drain(..out.sent);
            out.sent = 0;
        }
        Ok(())
    }

    /// Reads once without blocking. Returns whether the socket may hold more
    /// (the read filled the space it was given).
    fn receive(&mut self) -> Result<bool, String> {
        if self.start > 0 && self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let frame = HEADER_LEN + self.max_payload;
        if self.input.len() - self.end < MIN_READ {
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let wanted = (self.end + MIN_READ).clamp(MIN_READ, frame + READ_AHEAD);
            if self.input.len() < wanted {
                // Exactly: the capacity is what the session is charged for.
                self.input.reserve_exact(wanted - self.input.len());
                self.input.resize(wanted, 0);
            }
        }
        if self.end == self.input.len() {
            // A whole frame plus read-ahead is buffered: serve before reading.
            return Ok(true);
        }
        loop {
            match self.stream.read(&mut self.input[self.end..]) {
                Ok(0) => {
                    self.read_closed = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(self.end == self.input.len() || self.hangup_seen);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.read_closed = true;
                    return Ok(false);
                }
                Err(e) => return Err(format!("receive failed: {e}")),
            }
        }
    }

    /// The header of the next complete frame in the input, if one is
    /// (checked for its length: no frame is longer than the maximum).
    fn next_frame(&self) -> Result<Option<FrameHeader>, String> {
        let Some((header, complete)) = stream_frame(&self.input[self.start..self.end]) else {
            return Ok(None);
        };
        if header.len as usize > self.max_payload {
            return Err(format!("request of {} bytes exceeds the negotiated maximum {}", header.len, self.max_payload));
        }
        Ok(complete.then_some(header))
    }

    /// Takes the answer to a call this session handed off, to go out at
    /// its next serve (or flush). Returns false, dropping it, if it answers
    /// no call outstanding here.
    pub(crate) fn complete(
        &mut self,
        answer: Completion,
        counters: &WorkerCounters,
        limits: &std::sync::Arc<Limits>,
    ) -> bool {
        self.exchange.complete(answer, counters, limits, self.max_payload)
    }

    /// Stream `id` has items or its end to send.
    pub(crate) fn stream_ready(&mut self, id: u64) {
        self.exchange.stream_ready(id);
    }

    /// Whether calls handed off have not been answered yet.
    pub(crate) fn has_calls(&self) -> bool {
        self.exchange.has_calls()
    }

    /// Answers the calls still being handled with an error (see
    /// [`Exchange::give_up_calls`]); the next flush sends what fits.
    pub(crate) fn give_up_calls(&mut self) {
        self.exchange.give_up_calls();
    }

    /// A graceful stop begins (see [`Exchange::stop`]).
    pub(crate) fn begin_stop(&mut self) {
        self.exchange.stop();
    }

    /// The earliest deadline of an open stream.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.exchange.next_deadline()
    }

    /// Cuts the streams whose deadline has passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.exchange.expire(now);
    }

    /// The poll says the client's end is closed both ways: nothing sent
    /// reaches it any more, so the session ends without waiting for the
    /// answers of calls outstanding.
    pub(crate) fn hung_up(&mut self) {
        self.peer_gone = true;
    }

    /// Reads, serves up to `budget` frames and sends the replies, with
    /// what waits to go out (the answers of handed-off calls, long
    /// replies, stream items).
    pub(crate) fn serve(
        &mut self,
        with: &Serving<'_>,
        scratch: &mut Scratch,
        budget: usize,
    ) -> Result<Progress, String> {
        self.send()?;
        if self.peer_gone {
            return Ok(Progress::Closed);
        }
        let mut tally = Tally::default();
        let mut frames = 0;
        let mut more_to_read = true;
        let result = loop {
            match self.exchange.flush(&mut self.output, &mut tally) {
                Ok(Flush::NoRoom(_)) => break Ok(Progress::Stalled),
                Ok(Flush::Clear) => {}
                Err(e) => break Err(e),
            }
            if frames >= budget {
                break Ok(Progress::Busy);
            }
            if !with.shutting_down && self.exchange.outstanding_full() {
                break Ok(Progress::Waiting);
            }
            let header = match self.next_frame() {
                Ok(Some(h)) => h,
                Ok(None) if more_to_read && !self.read_closed => match self.receive() {
                    Ok(more) => {
                        more_to_read = more;
                        continue;
                    }
                    Err(e) => break Err(e),
                },
                // Closed once every reply is out; until then, wait to write,
                // or for the answers of calls outstanding and the streams.
                Ok(None) if self.read_closed && self.pending_output() > 0 => break Ok(Progress::Stalled),
                // A Unix socket tells a client that only stopped sending
                // (it may still read) from one that hung up (the poll's
                // `hung_up`); TCP does not, so there the end of its input
                // ends the session rather than hold it for answers that
                // may find no one.
                Ok(None) if self.read_closed && self.exchange.owes() => match self.stream {
                    Stream::Unix(_) => break Ok(Progress::Waiting),
                    Stream::Tcp(_) => break Ok(Progress::Closed),
                },
                Ok(None) if self.read_closed => break Ok(Progress::Closed),
                Ok(None) => break Ok(Progress::Parked),
                Err(e) => break Err(e),
            };
            let kind = match self.exchange.check(&header) {
                Ok(kind) => kind,
                Err(e) => break Err(e),
            };
            let body = self.start + HEADER_LEN;
            let payload = &self.input[body..body + header.len as usize];
            let took = self.exchange.take(
                with,
                self.slot,
                kind,
                &header,
                payload,
                &mut scratch.reply,
                &mut self.output,
                &mut tally,
            );
            match took {
                Ok(Took::Taken) => {
                    self.start = body + header.len as usize;
                    tally.received += (HEADER_LEN + header.len as usize) as u64;
                    frames += 1;
                }
                // Left in the input: taken once there is room for what it
                // sends.
                Ok(Took::NoRoom(_)) => break Ok(Progress::Stalled),
                Err(e) => break Err(e),
            }
        };
        with.counters.add(tally.taken, tally.answered, tally.errors);
        let carrier = match self.stream {
            Stream::Unix(_) => Carrier::Uds,
            Stream::Tcp(_) => Carrier::Tcp,
        };
        with.counters.add_bytes(carrier, tally.received, std::mem::take(&mut self.output.counted));
        // Replies to what was served go out even when the batch ended in a
        // violation.
        let sent = self.send();
        if self.peer_gone {
            return Ok(Progress::Closed);
        }
        let progress = result?;
        sent?;
        if progress == Progress::Stalled && self.pending_output() == 0 {
            // The last send drained it all: no writable edge will come (one
            // comes whenever bytes stay unsent, since the send stopped at
            // WouldBlock), so go on.
            return Ok(Progress::Busy);
        }
        if progress == Progress::Stalled {
            self.stalled_since.get_or_insert_with(Instant::now);
        } else {
            self.stalled_since = None;
        }
        Ok(progress)
    }

    /// Ends the output with the closing frame, which tells the client the
    /// last request taken, for a session the daemon closes on purpose
    /// (once the calls outstanding are answered: it comes after their
    /// answers), and sends what the socket takes now; the worker then
    /// drains the rest for a bounded time ([`StreamSession::flush`]).
    pub(crate) fn close_on_purpose(&mut self) {
        self.closing = true;
        let _ = self.flush();
    }

    /// Whether frames (or the closing frame) wait to be sent, calls
    /// outstanding wait for their answers, streams are open, or, closing
    /// on purpose, the client has yet to close its end.
    pub(crate) fn has_output(&self) -> bool {
        let open = !(self.hangup_seen || self.read_closed);
        !self.peer_gone && (self.pending_output() > 0 || self.exchange.owes() || (self.closing && open))
    }

    /// Sends what the socket takes without blocking, what waits to go out
    /// with it; takes no request. Closing on purpose, once nothing is owed
    /// (no call outstanding, no frame waiting, no stream open), appends the
    /// closing frame, and once everything is sent, shuts the sending side:
    /// the client reads its last frames and the end of the stream, and
    /// closes (its poll reports that as `hangup_seen`). For the drain of a
    /// graceful stop.
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        self.exchange.flush(&mut self.output, &mut Tally::default())?;
        if self.closing && !self.closing_frame && !self.exchange.owes() {
            self.output.push(&FrameHeader::closing(self.exchange.last_request_id()).encode());
            self.closing_frame = true;
        }
        self.send()?;
        if self.closing_frame && !self.write_shut && !self.peer_gone && self.pending_output() == 0 {
            self.write_shut = true;
            if self.stream.shutdown_write().is_err() {
                self.peer_gone = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::deferred::Responder;
    use crate::request::OwnedRequest;
    use crate::service::{Handler, ServiceTable};
    use ipc_core::{decode_error, ErrorCode, FLAG_CLOSED, FLAG_ERROR};
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::{Arc, Mutex};

    pub(crate) use crate::test_rig::Rig;

    /// How the tests drive a stream session with a [`Rig`].
    pub(crate) trait StreamRig {
        fn serve_with(
            &mut self,
            session: &mut StreamSession,
            budget: usize,
            shutting_down: bool,
        ) -> Result<Progress, String>;
        fn serve(&mut self, session: &mut StreamSession, budget: usize) -> Result<Progress, String>;
        fn deliver(&mut self, session: &mut StreamSession) -> usize;
    }

    impl StreamRig for Rig {
        fn serve_with(
            &mut self,
            session: &mut StreamSession,
            budget: usize,
            shutting_down: bool,
        ) -> Result<Progress, String> {
            let (with, scratch) = self.lend(shutting_down);
            session.serve(&with, scratch, budget)
        }

        fn serve(&mut self, session: &mut StreamSession, budget: usize) -> Result<Progress, String> {
            self.serve_with(session, budget, false)
        }

        /// Hands the answers that came back to `session`, as its worker
        /// does.
        fn deliver(&mut self, session: &mut StreamSession) -> usize {
            let limits = self.limits();
            let mut taken = 0;
            for event in self.answers.try_iter() {
                match event {
                    crate::deferred::Event::Answer(a) => {
                        taken += usize::from(session.complete(a, &self.counters, &limits))
                    }
                    crate::deferred::Event::Stream { id, .. } => session.stream_ready(id),
                }
            }
            taken
        }
    }

    /// Echo as service 0, and a deferred service 1 that hands each call to
    /// the test.
    pub(crate) fn with_deferred() -> (ServiceTable, Receiver<(OwnedRequest, Responder)>) {
        let mut t = services();
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let handler = move |request, responder| tx.lock().unwrap().send((request, responder)).unwrap();
        t.add("later".into(), Handler::Deferred(Arc::new(handler))).unwrap();
        (t, rx)
    }

    /// Reads frames from the client's end until the end of the stream:
    /// id, flags and body of each.
    fn read_to_end(client: &mut std::os::unix::net::UnixStream) -> Vec<(u64, u16, Vec<u8>)> {
        use std::io::Read;
        // A watchdog, not a bound: a session that never ends its stream
        // fails the test rather than hanging it.
        client.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).unwrap();
        let mut frames = Vec::new();
        let mut rest = &wire[..];
        while let Some((h, true)) = stream_frame(rest) {
            let body = rest[HEADER_LEN..HEADER_LEN + h.len as usize].to_vec();
            rest = &rest[HEADER_LEN + h.len as usize..];
            frames.push((h.request_id, h.flags, body));
        }
        assert!(rest.is_empty(), "{} bytes of a frame left over", rest.len());
        frames
    }

    pub(crate) fn request(service: u16, id: u64) -> Vec<u8> {
        FrameHeader { len: 0, service, flags: 0, request_id: id }.encode().to_vec()
    }

    pub(crate) fn pair() -> (StreamSession, std::os::unix::net::UnixStream) {
        pair_of(1024)
    }

    /// A session whose frames carry at most `max_payload` bytes, and its
    /// client's end.
    fn pair_of(max_payload: usize) -> (StreamSession, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let peer = Peer::Unix(PeerCredentials { pid: 1, uid: 0, gid: 0 });
        (StreamSession::new(7, peer, Stream::Unix(mio::net::UnixStream::from_std(ours)), max_payload), theirs)
    }

    fn services() -> ServiceTable {
        let mut t = ServiceTable::default();
        t.add("echo".into(), crate::service::echo()).unwrap();
        t
    }

    fn frame(id: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = FrameHeader { len: payload.len() as u32, service: 0, flags: 0, request_id: id }.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frames_split_anywhere_are_served_in_order() {
        use std::io::{Read, Write};
        let (mut session, mut client) = pair();
        let mut rig = Rig::new(services());
        let wire: Vec<u8> = (1..=50u64).flat_map(|id| frame(id, &id.to_le_bytes().repeat(id as usize % 7))).collect();
        // Deliver in awkward pieces: a request is served only once whole.
        for piece in wire.chunks(13) {
            client.write_all(piece).unwrap();
            let p = rig.serve(&mut session, 64).unwrap();
            assert_eq!(p, Progress::Parked);
        }
        let expected: Vec<u8> =
            (1..=50u64).flat_map(|id| frame(id, &id.to_le_bytes().repeat(id as usize % 7))).collect();
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, expected);
        drop(client);
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Closed);
    }

    #[test]
    fn oversized_and_out_of_order_requests_are_violations() {
        use std::io::Write;
        let mut rig = Rig::new(services());
        let (mut session, mut client) = pair();
        let mut big = FrameHeader { len: 5000, service: 0, flags: 0, request_id: 1 }.encode().to_vec();
        big.extend_from_slice(&[0; 100]);
        client.write_all(&big).unwrap();
        let err = rig.serve(&mut session, 64).unwrap_err();
        assert!(err.contains("exceeds the negotiated maximum"), "{err}");

        let (mut session, mut client) = pair();
        client.write_all(&[frame(5, b"a"), frame(5, b"b")].concat()).unwrap();
        let err = rig.serve(&mut session, 64).unwrap_err();
        assert!(err.contains("not above the previous 5"), "{err}");
    }

    #[test]
    fn buffers_stay_within_their_bound_while_the_client_lags_behind() {
        use std::io::{Read, Write};
        let mut rig = Rig::new(services());
        let (mut session, mut client) = pair();
        client.set_nonblocking(true).unwrap();
        let bound = (input_bound(1024), output_bound(1024));
        let mut id = 0;
        let mut request = frame(0, &[0; 1000]);
        let mut sink = [0u8; 1000];
        let mut read = 0;
        // The client keeps its requests coming and reads less than the
        // replies it asks for, so the daemon always has replies left unsent
        // and sends them a little at a time, for far more bytes in all than
        // the bound.
        while read < 40 * bound.1 {
            loop {
                let next = FrameHeader { len: 1000, service: 0, flags: 0, request_id: id + 1 };
                request[..HEADER_LEN].copy_from_slice(&next.encode());
                match client.write(&request) {
                    Ok(n) if n == request.len() => id += 1,
                    Ok(n) => {
                        // Finish the frame so the stream stays in step.
                        client.set_nonblocking(false).unwrap();
                        client.write_all(&request[n..]).unwrap();
                        client.set_nonblocking(true).unwrap();
                        id += 1;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            rig.serve(&mut session, usize::MAX).unwrap();
            assert!(session.input.capacity() <= bound.0, "input holds {}", session.input.capacity());
            assert!(
                session.output.buf.capacity() <= bound.1,
                "output holds {} of {}",
                session.output.buf.capacity(),
                bound.1
            );
            match client.read(&mut sink) {
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(buffer_bound(1024), bound.0 + bound.1);
    }

    #[test]
    fn a_long_echo_over_large_frames_holds_about_a_chunk_while_the_client_reads_slowly() {
        use ipc_core::message::{encode_chunk_prefix, CHUNK_LEN, FLAG_MORE};
        use std::io::{Read, Write};
        let max = 8 << 20;
        let len = 32 << 20;
        let mut rig = Rig::new(services());
        let (mut session, mut client) = pair_of(max);
        client.set_nonblocking(true).unwrap();
        // The request as the client library sends it: chunks of CHUNK_LEN,
        // though a frame could carry 8 MiB.
        let mut wire = Vec::with_capacity(len + len / CHUNK_LEN * 64);
        let mut sent = 0;
        while sent < len {
            let mut payload = if sent == 0 { encode_chunk_prefix(len as u64).to_vec() } else { Vec::new() };
            let n = (len - sent).min(CHUNK_LEN - payload.len());
            payload.extend((sent..sent + n).map(|i| i as u8));
            sent += n;
            let flags = if sent < len { FLAG_MORE } else { 0 };
            let h = FrameHeader { len: payload.len() as u32, service: 0, flags, request_id: 1 };
            wire.extend_from_slice(&h.encode());
            wire.extend_from_slice(&payload);
        }
        let (mut written, mut read, mut most) = (0, 0, 0);
        let mut piece = vec![0u8; 64 << 10];
        // The reflected reply is its request, prefix and headers alike.
        while read < wire.len() {
            match client.write(&wire[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            rig.serve(&mut session, usize::MAX).unwrap();
            most = most.max(session.input.capacity() + session.output.buf.capacity());
            // A slow reader: a little at a time.
            match client.read(&mut piece) {
                Ok(n) => {
                    assert_eq!(piece[..n], wire[read..read + n], "reply bytes at {read}");
                    read += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        // A chunk in, the budget and a chunk out, and as much again not
        // yet compacted away: never a frame of 8 MiB.
        let held = 2 * (OUTPUT_BUDGET + CHUNK_LEN + HEADER_LEN) + CHUNK_LEN + HEADER_LEN + READ_AHEAD;
        assert!(most <= held, "the session held {most} bytes of buffers, more than {held}");
    }

    #[test]
    fn a_client_that_does_not_read_stalls_only_its_session() {
        use std::io::Write;
        let mut rig = Rig::new(services());
        let (mut session, mut client) = pair();
        client.set_nonblocking(true).unwrap();
        let mut id = 0;
        let mut stalled = false;
        // The client writes and never reads: the session must stop reading
        // (Stalled) with bounded output, never block.
        for _ in 0..10_000 {
            id += 1;
            if client.write_all(&frame(id, &[1; 1000])).is_err() {
                break;
            }
            if rig.serve(&mut session, usize::MAX).unwrap() == Progress::Stalled {
                stalled = true;
                break;
            }
        }
        assert!(stalled, "a session whose client does not read must stall");
        assert!(session.pending_output() <= session.output.limit() + HEADER_LEN + 1024);
        let since = session.stalled_since().expect("a stalled session says since when");
        // Serving again without the client reading keeps the stall's start.
        let _ = rig.serve(&mut session, usize::MAX).unwrap();
        assert_eq!(session.stalled_since(), Some(since));
        // The client taking some replies ends that stall.
        use std::io::Read;
        let mut sink = vec![0u8; 64 * 1024];
        let n = client.read(&mut sink).unwrap();
        assert!(n > 0);
        let _ = rig.serve(&mut session, usize::MAX).unwrap();
        assert_ne!(session.stalled_since(), Some(since), "the client read, so the stall began anew or ended");
    }

    #[test]
    fn a_stop_sends_the_closing_frame_after_the_answers_of_calls_outstanding() {
        use std::io::Write;
        let (services, handed) = with_deferred();
        let mut rig = Rig::new(services);
        let (mut session, mut client) = pair();
        client.write_all(&[request(1, 1), request(1, 2), request(0, 3)].concat()).unwrap();
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Parked);
        let mut calls: Vec<(OwnedRequest, Responder)> = handed.try_iter().collect();
        assert_eq!(calls.len(), 2);
        // The stop: the closing frame waits for the two calls.
        rig.serve_with(&mut session, usize::MAX, true).unwrap();
        session.close_on_purpose();
        assert!(session.has_output());
        // The second is answered first, then the stop gives up on the first.
        calls.pop().unwrap().1.reply(b"second".to_vec());
        rig.deliver(&mut session);
        session.flush().unwrap();
        assert!(session.has_calls());
        session.give_up_calls();
        session.flush().unwrap();
        let frames = read_to_end(&mut client);
        let kinds: Vec<(u64, u16)> = frames.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(kinds, [(3, 0), (2, 0), (1, FLAG_ERROR), (3, FLAG_CLOSED)]);
        assert_eq!(frames[1].2, b"second");
        assert_eq!(decode_error(&frames[2].2).0, ErrorCode::Unfinished);
    }

    #[test]
    fn a_client_that_stops_sending_gets_its_answers_and_one_gone_does_not_wait() {
        use std::io::Write;
        let (services, handed) = with_deferred();
        let mut rig = Rig::new(services);
        let (mut session, mut client) = pair();
        client.write_all(&request(1, 1)).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        session.hangup_seen = true;
        // The client has stopped sending, and may still read.
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Waiting);
        assert_eq!(session.stalled_since(), None);
        let (_, responder) = handed.try_recv().unwrap();
        responder.reply(b"late".to_vec());
        rig.deliver(&mut session);
        // The answer goes out (the worker serves a busy session again),
        // then the session ends.
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Busy);
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Closed);
        // The worker closes a closed session.
        drop(session);
        assert_eq!(read_to_end(&mut client), [(1, 0, b"late".to_vec())]);

        // A client gone altogether: the session ends with a call running.
        let (mut session, mut client) = pair();
        client.write_all(&request(1, 1)).unwrap();
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Parked);
        let (_, responder) = handed.try_recv().unwrap();
        drop(client);
        session.hung_up();
        assert_eq!(rig.serve(&mut session, 64).unwrap(), Progress::Closed);
        drop(session);
        responder.reply(b"nobody".to_vec());
    }
}
