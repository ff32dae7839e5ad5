//! Messages larger than a frame, and streams of many replies: what frames
//! carry beyond one request and its one reply.
//!
//! # Chunks
//!
//! A message longer than one frame's largest payload travels as chunks:
//! frames of one `request_id`, in one direction, each but the last with
//! [`FLAG_MORE`]. The first chunk's payload begins with an 8-byte
//! little-endian length: the message's length in bytes (the chunks' bytes
//! after that prefix, all together), or [`UNKNOWN_LENGTH`] when the sender
//! produces the message as it goes (an upload). A receiver refuses a
//! message longer than its `max_message`, and one whose chunks add up to
//! more, or at the last chunk to less, than the length announced: either
//! breaks the protocol.
//!
//! A reply in chunks may be cut short by a frame of its id with
//! [`FLAG_ERROR`](crate::FLAG_ERROR) alone (no [`FLAG_MORE`]) and an error
//! body: the message ends there, and its request's outcome is that error.
//! A server that sends a reply back as its request comes (an echo) and
//! then refuses the request (too long, a stop) ends the reply so.
//!
//! A sender cuts a message longer than a frame into chunks of at most
//! [`CHUNK_LEN`] bytes, even where its frames could carry more: what holds
//! a message in passing (the daemon reflecting an echo, a socket session's
//! buffers, a reader) holds about one chunk of it, not one frame of the
//! largest ring. A receiver takes chunks of any length up to a frame.
//!
//! Chunks of different messages may interleave (the replies of calls
//! answered out of order, say); a receiver keeps the messages it is
//! assembling by id, at most [`MAX_PARTIAL`] at once. A message short
//! enough for one frame may be chunked too; receivers take it either way.
//!
//! # Streams
//!
//! - A request with [`FLAG_STREAM`] opens a stream: its payload begins with
//!   a [`StreamOpen`] (8 bytes: the items the caller lets the server send
//!   before it grants more, and its deadline in milliseconds, 0 for none),
//!   then the request's bytes. An opening request is one frame (not
//!   chunked).
//! - The server answers with any number of items, frames with
//!   [`FLAG_STREAM`] (each may be chunked), then exactly one terminal frame
//!   with [`FLAG_END`]: an empty payload for the stream's end, or with
//!   [`FLAG_ERROR`](crate::FLAG_ERROR) an error body (the handler's error,
//!   the deadline, a cancel, a shutdown). It sends an item only within the
//!   credit granted.
//! - The caller grants more with [`FLAG_CREDIT`] frames on the request
//!   direction (payload: a `u32` count of further items) and cancels with
//!   [`FLAG_CANCEL`] (empty); the server ends a cancelled stream with an
//!   error `Cancelled` unless it had ended already.
//!
//! Every stream ends with exactly one terminal outcome: its `FLAG_END`
//! frame, or the loss of the link (`Disconnected`, or `Shutdown` for a
//! stream the server never took). A new request (a single frame, a first
//! chunk, or an opening) carries an id above every earlier one; chunks that
//! go on, credits and cancels name an id already open.
//!
//! Nothing here makes a system call or allocates per frame: an
//! [`Assembler`] checks chunks and hands their bytes on; what is done with
//! them is the receiver's.

use crate::frame::FrameHeader;

/// The frame is a chunk of a message that goes on in a later frame of the
/// same id and direction.
pub const FLAG_MORE: u16 = 1 << 3;
/// A request: opens a stream. A response: one item of a stream.
pub const FLAG_STREAM: u16 = 1 << 4;
/// A response: a stream's terminal frame.
pub const FLAG_END: u16 = 1 << 5;
/// A request-direction frame: grants a stream more items (`u32` payload).
pub const FLAG_CREDIT: u16 = 1 << 6;
/// A request-direction frame: cancels a stream (empty payload).
pub const FLAG_CANCEL: u16 = 1 << 7;

/// The announced length of a message whose sender does not know it yet.
pub const UNKNOWN_LENGTH: u64 = u64::MAX;
/// The most payload a sender puts in one chunk of a message longer than a
/// frame (the prefix included), whatever its frames could carry.
pub const CHUNK_LEN: usize = 1 << 20;
/// Bytes of the length that begins a first chunk.
pub const CHUNK_PREFIX: usize = 8;
/// The most messages one receiver assembles at once, per session and
/// direction.
pub const MAX_PARTIAL: usize = 8;

/// What opens a stream: the first 8 bytes of its request's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOpen {
    /// Items the server may send before the caller grants more.
    pub credit: u32,
    /// The stream's deadline from its opening, in milliseconds (0: none).
    pub deadline_ms: u32,
}

impl StreamOpen {
    /// Bytes of the encoding.
    pub const LEN: usize = 8;

    /// The 8 bytes that begin the opening request's payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&self.credit.to_le_bytes());
        out[4..].copy_from_slice(&self.deadline_ms.to_le_bytes());
        out
    }

    /// Splits an opening request's payload into its `StreamOpen` and the
    /// request's bytes.
    pub fn decode(payload: &[u8]) -> Result<(StreamOpen, &[u8]), MessageError> {
        let Some((head, rest)) = payload.split_first_chunk::<{ Self::LEN }>() else {
            return Err(MessageError::ShortOpen { len: payload.len() });
        };
        let credit = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let deadline_ms = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        Ok((StreamOpen { credit, deadline_ms }, rest))
    }
}

/// The payload of a credit frame: `n` more items.
pub fn encode_credit(n: u32) -> [u8; 4] {
    n.to_le_bytes()
}

/// The items a credit frame grants.
pub fn decode_credit(payload: &[u8]) -> Result<u32, MessageError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| MessageError::BadCredit { len: payload.len() })?;
    Ok(u32::from_le_bytes(bytes))
}

/// The prefix of a first chunk: the message's length.
pub fn encode_chunk_prefix(total: u64) -> [u8; CHUNK_PREFIX] {
    total.to_le_bytes()
}

/// A frame's part in a message, as [`Assembler::take`] found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece<'p> {
    /// The message's id.
    pub id: u64,
    /// The message's bytes this frame carries (after a first chunk's
    /// prefix).
    pub bytes: &'p [u8],
    /// Whether this frame begins the message.
    pub first: bool,
    /// Whether this frame ends the message.
    pub last: bool,
    /// The length announced by its first chunk (`None`: not announced, or a
    /// message of one frame).
    pub total: Option<u64>,
}

/// A message being assembled.
#[derive(Clone, Copy, Debug)]
struct Partial {
    id: u64,
    total: Option<u64>,
    got: u64,
}

/// Why chunks or stream frames break the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A first chunk shorter than its length prefix.
    #[error("a first chunk of {len} bytes holds no length prefix")]
    ShortPrefix {
        /// The chunk's payload length.
        len: usize,
    },
    /// A message announced longer than the receiver takes.
    #[error("message {id} of {total} bytes exceeds the maximum {max}")]
    TooLong {
        /// The message.
        id: u64,
        /// The length announced (or reached).
        total: u64,
        /// The receiver's maximum.
        max: u64,
    },
    /// Chunks that add up to more than was announced, or at the last to
    /// less.
    #[error("message {id} announced {total} bytes and carried {got}")]
    WrongLength {
        /// The message.
        id: u64,
        /// The length announced.
        total: u64,
        /// The bytes its chunks carried.
        got: u64,
    },
    /// More messages being assembled at once than the receiver keeps.
    #[error("more than {max} messages are being assembled at once")]
    TooManyPartial {
        /// The receiver's maximum.
        max: usize,
    },
    /// A stream's opening request shorter than its [`StreamOpen`].
    #[error("a stream's opening request of {len} bytes holds no stream options")]
    ShortOpen {
        /// The payload length.
        len: usize,
    },
    /// A credit frame whose payload is not a `u32`.
    #[error("a credit frame of {len} bytes is not a 4-byte count")]
    BadCredit {
        /// The payload length.
        len: usize,
    },
}

/// The receiver's side of chunked messages: checks each frame against the
/// messages it is assembling and says what part of which message it is.
///
/// ```
/// use ipc_core::message::{encode_chunk_prefix, Assembler, FLAG_MORE};
/// use ipc_core::FrameHeader;
///
/// let mut rx = Assembler::new(1 << 20);
/// let first = [&encode_chunk_prefix(5)[..], b"hel"].concat();
/// let head = FrameHeader { len: first.len() as u32, service: 0, flags: FLAG_MORE, request_id: 9 };
/// let piece = rx.take(&head, &first).unwrap();
/// assert_eq!((piece.bytes, piece.first, piece.last), (&b"hel"[..], true, false));
/// let tail = FrameHeader { len: 2, service: 0, flags: 0, request_id: 9 };
/// let piece = rx.take(&tail, b"lo").unwrap();
/// assert_eq!((piece.bytes, piece.first, piece.last), (&b"lo"[..], false, true));
/// ```
#[derive(Debug)]
pub struct Assembler {
    max_message: u64,
    partials: Vec<Partial>,
}

impl Assembler {
    /// An assembler that refuses messages longer than `max_message` bytes.
    pub fn new(max_message: u64) -> Assembler {
        Assembler { max_message, partials: Vec::with_capacity(MAX_PARTIAL) }
    }

    /// Whether message `id` is being assembled (a frame of that id without
    /// [`FLAG_MORE`] then ends it, rather than being a message of its own).
    pub fn is_partial(&self, id: u64) -> bool {
        self.partials.iter().any(|p| p.id == id)
    }

    /// Messages being assembled.
    pub fn partial(&self) -> usize {
        self.partials.len()
    }

    /// Takes a frame (its header and its private copy of the payload) and
    /// says what part of which message it is. A frame of an id not being
    /// assembled begins a message (of one frame, or with [`FLAG_MORE`] the
    /// first chunk); a frame of an id being assembled goes on with it, and
    /// without `FLAG_MORE` ends it. The caller checks the id's order and
    /// the other flags.
    pub fn take<'p>(&mut self, header: &FrameHeader, payload: &'p [u8]) -> Result<Piece<'p>, MessageError> {
        let id = header.request_id;
        let more = header.flags & FLAG_MORE != 0;
        match self.partials.iter().position(|p| p.id == id) {
            None if !more => {
                let total = payload.len() as u64;
                if total > self.max_message {
                    return Err(MessageError::TooLong { id, total, max: self.max_message });
                }
                Ok(Piece { id, bytes: payload, first: true, last: true, total: None })
            }
            None => {
                let Some((prefix, bytes)) = payload.split_first_chunk::<CHUNK_PREFIX>() else {
                    return Err(MessageError::ShortPrefix { len: payload.len() });
                };
                let total = u64::from_le_bytes(*prefix);
                let total = (total != UNKNOWN_LENGTH).then_some(total);
                if let Some(total) = total.filter(|&t| t > self.max_message) {
                    return Err(MessageError::TooLong { id, total, max: self.max_message });
                }
                if self.partials.len() >= MAX_PARTIAL {
                    return Err(MessageError::TooManyPartial { max: MAX_PARTIAL });
                }
                let partial = Partial { id, total, got: 0 };
                self.partials.push(partial);
                self.go_on(self.partials.len() - 1, bytes, false)?;
                Ok(Piece { id, bytes, first: true, last: false, total })
            }
            Some(i) => {
                let total = self.partials[i].total;
                self.go_on(i, payload, !more)?;
                if !more {
                    self.partials.swap_remove(i);
                }
                Ok(Piece { id, bytes: payload, first: false, last: !more, total })
            }
        }
    }

    /// Adds `bytes` to partial `i`, checking them against its length (and,
    /// if `last`, that the message is complete).
    fn go_on(&mut self, i: usize, bytes: &[u8], last: bool) -> Result<(), MessageError> {
        let p = &mut self.partials[i];
        p.got = p.got.saturating_add(bytes.len() as u64);
        let (id, got) = (p.id, p.got);
        let wrong = match p.total {
            Some(total) if got > total || (last && got != total) => Some(MessageError::WrongLength { id, total, got }),
            None if got > self.max_message => Some(MessageError::TooLong { id, total: got, max: self.max_message }),
            _ => None,
        };
        match wrong {
            Some(e) => {
                self.partials.swap_remove(i);
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Forgets message `id` (its sender gave it up, or the receiver did).
    pub fn drop_partial(&mut self, id: u64) {
        self.partials.retain(|p| p.id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64, flags: u16, payload: &[u8]) -> FrameHeader {
        FrameHeader { len: payload.len() as u32, service: 0, flags, request_id: id }
    }

    fn first(total: u64, bytes: &[u8]) -> Vec<u8> {
        [&encode_chunk_prefix(total)[..], bytes].concat()
    }

    #[test]
    fn single_frames_pass_and_long_ones_are_refused() {
        let mut rx = Assembler::new(4);
        let p = rx.take(&frame(1, 0, b"abcd"), b"abcd").unwrap();
        assert_eq!((p.first, p.last, p.total), (true, true, None));
        assert_eq!(rx.take(&frame(2, 0, b"abcde"), b"abcde"), Err(MessageError::TooLong { id: 2, total: 5, max: 4 }));
    }

    #[test]
    fn interleaved_chunks_are_told_apart_and_counted() {
        let mut rx = Assembler::new(100);
        let a = first(6, b"ab");
        let b = first(UNKNOWN_LENGTH, b"x");
        assert!(rx.take(&frame(1, FLAG_MORE, &a), &a).unwrap().first);
        assert!(rx.take(&frame(2, FLAG_MORE, &b), &b).unwrap().first);
        assert_eq!(rx.partial(), 2);
        assert!(!rx.take(&frame(1, FLAG_MORE, b"cd"), b"cd").unwrap().last);
        let end = rx.take(&frame(2, 0, b"yz"), b"yz").unwrap();
        assert!(end.last && end.total.is_none());
        assert!(rx.take(&frame(1, 0, b"ef"), b"ef").unwrap().last);
        assert_eq!(rx.partial(), 0);
    }

    #[test]
    fn wrong_lengths_and_too_many_partials_break_the_protocol() {
        let mut rx = Assembler::new(100);
        let a = first(3, b"ab");
        rx.take(&frame(1, FLAG_MORE, &a), &a).unwrap();
        assert_eq!(
            rx.take(&frame(1, FLAG_MORE, b"cd"), b"cd"),
            Err(MessageError::WrongLength { id: 1, total: 3, got: 4 })
        );
        let a = first(3, b"ab");
        rx.take(&frame(2, FLAG_MORE, &a), &a).unwrap();
        assert_eq!(rx.take(&frame(2, 0, b""), b""), Err(MessageError::WrongLength { id: 2, total: 3, got: 2 }));
        let big = first(101, b"");
        assert!(matches!(rx.take(&frame(3, FLAG_MORE, &big), &big), Err(MessageError::TooLong { .. })));
        let unknown = first(UNKNOWN_LENGTH, &[0; 60]);
        rx.take(&frame(4, FLAG_MORE, &unknown), &unknown).unwrap();
        assert!(matches!(rx.take(&frame(4, FLAG_MORE, &[0; 60]), &[0; 60]), Err(MessageError::TooLong { .. })));
        assert_eq!(rx.take(&frame(5, FLAG_MORE, b"1234567"), b"1234567"), Err(MessageError::ShortPrefix { len: 7 }));
        for id in 10..10 + MAX_PARTIAL as u64 {
            let a = first(UNKNOWN_LENGTH, b"");
            rx.take(&frame(id, FLAG_MORE, &a), &a).unwrap();
        }
        let a = first(UNKNOWN_LENGTH, b"");
        assert_eq!(rx.take(&frame(99, FLAG_MORE, &a), &a), Err(MessageError::TooManyPartial { max: MAX_PARTIAL }));
    }

    #[test]
    fn stream_options_and_credits_round_trip() {
        let open = StreamOpen { credit: 16, deadline_ms: 2500 };
        let payload = [&open.encode()[..], b"query"].concat();
        assert_eq!(StreamOpen::decode(&payload), Ok((open, &b"query"[..])));
        assert!(StreamOpen::decode(b"short").is_err());
        assert_eq!(decode_credit(&encode_credit(7)), Ok(7));
        assert!(decode_credit(b"12345").is_err());
    }
}
