//! What a client talks through: shared-memory rings or a byte stream. The
//! client's call logic is the same above either.

use std::os::fd::BorrowedFd;

use ipc_core::{Frame, FrameHeader, PayloadWriter};

use crate::error::CallError;
use crate::shm::{Peer, ShmLink};
use crate::stream::{Buffered, StreamLink};

pub(crate) fn disconnected(reason: String) -> CallError {
    CallError::Disconnected { reason }
}

pub(crate) enum Link {
    Shm(ShmLink),
    Stream(StreamLink),
}

/// A reply found by [`Link::peek`], not yet consumed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ReplyRef {
    Ring(Frame),
    Stream(Buffered),
}

impl ReplyRef {
    pub(crate) fn header(&self) -> FrameHeader {
        match self {
            ReplyRef::Ring(f) => f.header,
            ReplyRef::Stream(b) => b.header,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.header().len as usize
    }
}

impl Link {
    /// Appends a request-direction frame of `len` bytes that `fill` writes
    /// in place. `None`: no room now (nothing was written, `fill` was not
    /// called).
    pub(crate) fn try_write<R>(
        &mut self,
        service: u16,
        flags: u16,
        id: u64,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
    ) -> Result<Option<R>, CallError> {
        match self {
            Link::Shm(l) => l.try_write(service, flags, id, len, fill),
            Link::Stream(l) => l.try_write(service, flags, id, len, fill),
        }
    }

    /// Copies a reply's payload to the end of `out`.
    pub(crate) fn read_append(&self, reply: &ReplyRef, out: &mut Vec<u8>) {
        match (self, reply) {
            (Link::Shm(l), ReplyRef::Ring(f)) => {
                let at = out.len();
                out.resize(at + f.len(), 0);
                l.responses.read_at(f, 0, &mut out[at..]);
            }
            (Link::Stream(l), ReplyRef::Stream(b)) => l.read_append(b, out),
            _ => unreachable!("a reply is read from the link that found it"),
        }
    }

    /// Makes the requests written so far visible to the peer (and rings
    /// it if it sleeps).
    pub(crate) fn flush(&mut self) -> Result<(), CallError> {
        match self {
            Link::Shm(l) => l.flush(),
            Link::Stream(l) => l.flush(),
        }
    }

    /// After a loss, takes what a stream's socket still holds into its
    /// buffer, without blocking; returns whether anything came (a ring has
    /// nothing beyond what `peek` sees).
    pub(crate) fn receive_left(&mut self) -> bool {
        match self {
            Link::Shm(_) => false,
            Link::Stream(l) => l.receive_left(),
        }
    }

    pub(crate) fn peek(&mut self) -> Result<Option<ReplyRef>, CallError> {
        Ok(match self {
            Link::Shm(l) => l.peek()?.map(ReplyRef::Ring),
            Link::Stream(l) => l.peek()?.map(ReplyRef::Stream),
        })
    }

    /// Copies part of a reply's payload.
    pub(crate) fn read_at(&self, reply: &ReplyRef, offset: usize, dst: &mut [u8]) {
        match (self, reply) {
            (Link::Shm(l), ReplyRef::Ring(f)) => l.responses.read_at(f, offset, dst),
            (Link::Stream(l), ReplyRef::Stream(b)) => l.read_at(b, offset, dst),
            _ => unreachable!("a reply is read from the link that found it"),
        }
    }

    /// Copies a reply's payload into `out`, replacing its contents.
    pub(crate) fn read_all(&self, reply: &ReplyRef, out: &mut Vec<u8>) {
        match (self, reply) {
            (Link::Shm(l), ReplyRef::Ring(f)) => l.responses.read_payload(f, out),
            (Link::Stream(l), ReplyRef::Stream(b)) => l.read_all(b, out),
            _ => unreachable!("a reply is read from the link that found it"),
        }
    }

    pub(crate) fn consume(&mut self, reply: &ReplyRef) -> Result<(), CallError> {
        match (self, reply) {
            (Link::Shm(l), ReplyRef::Ring(f)) => l.consume(f),
            (Link::Stream(l), ReplyRef::Stream(b)) => {
                l.consume(b);
                Ok(())
            }
            _ => unreachable!("a reply is consumed on the link that found it"),
        }
    }

    /// Who is at the other end, for messages.
    pub(crate) fn peer_name(&self) -> &'static str {
        match self {
            Link::Shm(l) => l.peer.name(),
            Link::Stream(_) => Peer::Daemon.name(),
        }
    }

    /// Why the link's peer was found gone, if it was (its replies may
    /// still be read).
    pub(crate) fn gone(&self) -> Option<&str> {
        match self {
            Link::Shm(l) => l.gone.as_deref(),
            Link::Stream(l) => l.gone(),
        }
    }

    /// Records that the peer is gone (the first reason stands).
    pub(crate) fn mark_gone(&mut self, reason: String) {
        match self {
            Link::Shm(l) => {
                l.gone.get_or_insert(reason);
            }
            Link::Stream(l) => l.mark_gone(reason),
        }
    }

    /// The last request the peer took, if it closed the link on purpose:
    /// from the segment header, or from a stream's closing frame.
    pub(crate) fn closed_after(&self) -> Option<u64> {
        match self {
            Link::Shm(l) => l.closed_after(),
            Link::Stream(l) => l.closed_after,
        }
    }

    pub(crate) fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Link::Shm(l) => l.doorbell_fd(),
            Link::Stream(_) => None,
        }
    }
}

/// Where a request's bytes go: the ring or an output buffer.
pub(crate) trait Sink {
    fn write_at(&mut self, offset: usize, src: &[u8]);
}

impl Sink for PayloadWriter<'_> {
    fn write_at(&mut self, offset: usize, src: &[u8]) {
        PayloadWriter::write_at(self, offset, src);
    }
}

/// A request payload being written in place, by [`crate::Client::call_with`]
/// or [`crate::Client::send_with`]: straight into the shared ring (or the
/// socket's output buffer), with no intermediate copy.
///
/// Its length is fixed when the request is started. Write with
/// [`RequestBuf::write_at`] or sequentially through [`std::io::Write`] (for
/// example as the writer of a serializer). Bytes left unwritten are
/// unspecified: they keep whatever the buffer held before.
pub struct RequestBuf<'a> {
    sink: &'a mut dyn Sink,
    len: usize,
    pos: usize,
}

impl<'a> RequestBuf<'a> {
    pub(crate) fn new(sink: &'a mut dyn Sink, len: usize) -> RequestBuf<'a> {
        RequestBuf { sink, len, pos: 0 }
    }

    /// The payload's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to `offset` within the payload.
    ///
    /// # Panics
    ///
    /// Panics if the range is past the payload's end.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) {
        assert!(
            offset.checked_add(src.len()).is_some_and(|end| end <= self.len),
            "write of {} bytes at {offset} past a request of {} bytes",
            src.len(),
            self.len
        );
        self.sink.write_at(offset, src);
    }
}

/// Sequential writes from the start; a write past the end is cut short.
impl std::io::Write for RequestBuf<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.len - self.pos);
        self.write_at(self.pos, &buf[..n]);
        self.pos += n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
