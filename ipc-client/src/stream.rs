//! The byte-stream link, over a Unix stream socket or TCP: the same frames
//! as the rings (a 16-byte header, then the payload), written in batches
//! and read in batches.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ipc_core::message::{FLAG_END, FLAG_MORE, FLAG_STREAM};
use ipc_core::{stream_frame, FrameHeader, FLAG_ERROR, HEADER_LEN};
use ipc_platform::stream;

use crate::error::CallError;
use crate::link::{disconnected, RequestBuf};

/// Read-ahead beyond one maximum frame, so one `recv` can take many
/// replies.
const READ_AHEAD: usize = 64 * 1024;
/// Unsent output past which no further frame is taken (one frame is,
/// whatever its length, when nothing waits).
const OUTPUT_BUDGET: usize = 256 * 1024;
/// How much longer than asked a blocking receive may wait before its
/// timeout is set again (setting it costs a system call).
const TIMEOUT_SLACK: Duration = Duration::from_millis(1);
/// The flags a response frame may carry; how they combine is the client's
/// to judge.
const RESPONSE_FLAGS: u16 = FLAG_ERROR | FLAG_MORE | FLAG_STREAM | FLAG_END;

pub(crate) enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Unix(s) => s.as_fd(),
            Socket::Tcp(s) => s.as_fd(),
        }
    }
}

impl Socket {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Socket::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_write_timeout(timeout),
            Socket::Tcp(s) => s.set_write_timeout(timeout),
        }
    }
}

/// Where a reply sits in the input buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buffered {
    pub(crate) header: FrameHeader,
    payload: usize,
}

impl Buffered {
    pub(crate) fn len(&self) -> usize {
        self.header.len as usize
    }
}

pub(crate) struct StreamLink {
    socket: Socket,
    max_payload: usize,
    /// Received bytes live in `input[start..end]`; its length is fixed.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// Frames not yet sent: `output[sent..]`.
    output: Vec<u8>,
    sent: usize,
    /// Unsent bytes beyond which a non-blocking send reports full.
    output_limit: usize,
    /// The receive timeout in effect on the socket.
    recv_timeout: Option<Duration>,
    gone: Option<String>,
    /// The last request the daemon took, from its closing frame.
    pub(crate) closed_after: Option<u64>,
    /// Why a send failed, if one did: nothing more is sent, and what is
    /// left is read.
    send_failed: Option<String>,
}

impl StreamLink {
    pub(crate) fn new(socket: Socket, max_payload: usize) -> StreamLink {
        let frame = HEADER_LEN + max_payload;
        StreamLink {
            socket,
            max_payload,
            input: vec![0; frame + READ_AHEAD],
            start: 0,
            end: 0,
            // Sized for a maximum frame up front, so calls allocate nothing.
            output: Vec::with_capacity(frame),
            sent: 0,
            // A frame goes whenever nothing waits; behind others, only
            // within the budget, so a long request's chunks wait in the
            // socket rather than here.
            output_limit: frame.clamp(READ_AHEAD, OUTPUT_BUDGET),
            recv_timeout: None,
            gone: None,
            closed_after: None,
            send_failed: None,
        }
    }

    /// Why the link was found lost, if it was.
    pub(crate) fn gone(&self) -> Option<&str> {
        self.gone.as_deref()
    }

    /// Records that the daemon is gone (the first reason stands), as a
    /// failed receive would.
    pub(crate) fn mark_gone(&mut self, reason: String) {
        if self.gone.is_none() {
            let _ = self.broken(reason);
        }
    }

    fn pending_output(&self) -> usize {
        self.output.len() - self.sent
    }

    fn broken(&mut self, reason: String) -> CallError {
        self.gone = Some(reason.clone());
        // Nothing more will be sent: say so, so that a daemon closing on
        // purpose, waiting for our end, closes at once. What it sent is
        // still read.
        let _ = self.socket.shutdown_write();
        disconnected(reason)
    }

    pub(crate) fn try_write<R>(
        &mut self,
        service: u16,
        flags: u16,
        id: u64,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
    ) -> Result<Option<R>, CallError> {
        if len > self.max_payload {
            return Err(CallError::TooLarge { len, max: self.max_payload });
        }
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        if let Some(reason) = self.send_failed.clone() {
            // The request would be dropped unsent: the link is lost (the
            // client then reads what the daemon sent before it went).
            return Err(self.broken(reason));
        }
        let needed = HEADER_LEN + len;
        if self.pending_output() > 0 && self.pending_output() + needed > self.output_limit {
            self.send_pending()?;
            if self.pending_output() > 0 && self.pending_output() + needed > self.output_limit {
                return Ok(None);
            }
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        } else if self.sent >= self.pending_output() {
            // A socket that always takes part of the output never empties
            // it: what was sent goes, before it outgrows what was not (each
            // byte is moved at most once), or the buffer would grow with
            // every byte of a long request.
            self.output.drain(..self.sent);
            self.sent = 0;
        }
        let header = FrameHeader { len: len as u32, service, flags, request_id: id };
        self.output.extend_from_slice(&header.encode());
        let at = self.output.len();
        self.output.resize(at + len, 0);
        Ok(Some(fill(&mut RequestBuf::new(&mut SliceSink(&mut self.output[at..]), len))))
    }

    /// Sends what it can of the pending frames without blocking.
    ///
    /// A failed send does not end the link at once: replies (and the
    /// daemon's closing frame) may still wait to be read, so the failure
    /// shows when reading runs dry. Unsent requests are dropped; their
    /// outcome comes with the disconnection.
    fn send_pending(&mut self) -> Result<(), CallError> {
        while self.sent < self.output.len() && self.send_failed.is_none() {
            match stream::send(self.socket.as_fd(), &self.output[self.sent..], false) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => self.send_failed = Some(format!("send failed: {e}")),
            }
        }
        if self.send_failed.is_some() {
            self.sent = self.output.len();
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), CallError> {
        self.send_pending()
    }

    /// Waits until more output can be sent or input has arrived, and moves
    /// what it can either way.
    pub(crate) fn wait_writable(&mut self, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        self.send_pending()?;
        let remaining = remaining(deadline, timeout)?;
        let ready = stream::wait_ready(self.socket.as_fd(), self.pending_output() > 0, Some(remaining))
            .map_err(|e| self.broken(format!("poll failed: {e}")))?;
        if ready.writable {
            self.send_pending()?;
        }
        if ready.readable {
            self.receive(false)?;
        }
        Ok(())
    }

    /// The next complete reply in the input buffer, validated.
    pub(crate) fn peek(&mut self) -> Result<Option<Buffered>, CallError> {
        let Some((header, complete)) = stream_frame(&self.input[self.start..self.end]) else {
            return Ok(None);
        };
        if header.is_closing() && self.closed_after.is_none() {
            self.closed_after = Some(header.request_id);
            return Err(self.broken("the daemon closed the session: it is shutting down".into()));
        }
        if header.flags & !RESPONSE_FLAGS != 0 {
            return Err(self.broken(format!("the daemon sent a reply with flags {:#x}", header.flags)));
        }
        if header.len as usize > self.max_payload {
            return Err(self.broken(format!(
                "the daemon sent a reply of {} bytes, over the maximum {}",
                header.len, self.max_payload
            )));
        }
        if !complete {
            return Ok(None);
        }
        Ok(Some(Buffered { header, payload: self.start + HEADER_LEN }))
    }

    pub(crate) fn read_at(&self, reply: &Buffered, offset: usize, dst: &mut [u8]) {
        assert!(offset.checked_add(dst.len()).is_some_and(|end| end <= reply.len()), "read past the reply");
        dst.copy_from_slice(&self.input[reply.payload + offset..reply.payload + offset + dst.len()]);
    }

    pub(crate) fn read_all(&self, reply: &Buffered, out: &mut Vec<u8>) {
        out.clear();
        self.read_append(reply, out);
    }

    pub(crate) fn read_append(&self, reply: &Buffered, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.input[reply.payload..reply.payload + reply.len()]);
    }

    pub(crate) fn consume(&mut self, reply: &Buffered) {
        self.start = reply.payload + reply.len();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Receives once into the input buffer: blocking (up to the socket's
    /// receive timeout) or not.
    fn receive(&mut self, wait: bool) -> Result<(), CallError> {
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        if self.start > 0 && self.input.len() - self.end < HEADER_LEN + self.max_payload {
            // Move the partial frame to the front so the whole frame fits.
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match stream::recv(self.socket.as_fd(), &mut self.input[self.end..], wait) {
            Ok(0) => Err(self.broken("the daemon closed the connection".into())),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(self.broken(format!("receive failed: {e}"))),
        }
    }

    /// Reads what the socket holds without blocking, even once the link is
    /// known to be lost: the replies (and the closing frame) the daemon
    /// sent before it went. Returns whether any bytes came.
    pub(crate) fn receive_left(&mut self) -> bool {
        if self.start > 0 {
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.input.len() {
            return false;
        }
        match stream::recv(self.socket.as_fd(), &mut self.input[self.end..], false) {
            Ok(n) if n > 0 => {
                self.end += n;
                true
            }
            _ => false,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The socket, for a poll loop of the caller's own.
    pub(crate) fn socket_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Whether frames wait to be sent (a poll loop then waits for the
    /// socket to be writable too).
    pub(crate) fn wants_write(&self) -> bool {
        self.pending_output() > 0 && self.send_failed.is_none() && self.gone.is_none()
    }

    /// Without blocking: sends what the socket takes, then receives until
    /// a receive finds nothing (or the input buffer is full). Whether a
    /// receive came back empty, which is when a reactor may forget that
    /// the socket was readable; an error once the link is lost.
    pub(crate) fn try_receive(&mut self) -> Result<bool, CallError> {
        self.send_pending()?;
        loop {
            if let Some(reason) = &self.gone {
                return Err(disconnected(reason.clone()));
            }
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.input.len() {
                return Ok(false);
            }
            match stream::recv(self.socket.as_fd(), &mut self.input[self.end..], false) {
                Ok(0) => return Err(self.broken("the daemon closed the connection".into())),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(self.broken(format!("receive failed: {e}"))),
            }
        }
    }

    /// Waits until more input has arrived or the deadline passes, sending
    /// pending output meanwhile.
    pub(crate) fn wait_readable(&mut self, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        self.send_pending()?;
        if self.pending_output() > 0 {
            // Both directions matter: poll rather than block in recv.
            return self.wait_writable(deadline, timeout);
        }
        let remaining = remaining(deadline, timeout)?;
        let current = self.recv_timeout.unwrap_or(Duration::MAX);
        if current < remaining || current > remaining + TIMEOUT_SLACK {
            stream::set_recv_timeout(self.socket.as_fd(), Some(remaining))
                .map_err(|e| self.broken(format!("cannot set the receive timeout: {e}")))?;
            self.recv_timeout = Some(remaining);
        }
        self.receive(true)
    }
}

fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, CallError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(CallError::Timeout { after: timeout });
    }
    Ok(deadline - now)
}

/// A request being written into the output buffer.
struct SliceSink<'a>(&'a mut [u8]);

impl crate::link::Sink for SliceSink<'_> {
    fn write_at(&mut self, offset: usize, src: &[u8]) {
        self.0[offset..offset + src.len()].copy_from_slice(src);
    }
}
