//! Fuzz targets: everything `ipc-core` decodes from a peer, as plain
//! functions of arbitrary bytes.
//!
//! The `fuzz/` crate at the repository root hands libFuzzer's inputs to
//! these functions, and `tests/fuzz_corpus.rs` replays the checked-in corpus
//! through the same functions on stable. Each one panics only when a check
//! fails: a decoder that panics, accepts what it should refuse, reads
//! outside its ring, or does not stop.

use crate::frame::{stream_frame, FrameHeader, HEADER_LEN};
use crate::handshake::{self, HELLO_MAGIC, LENGTH_PREFIX, PROTOCOL_VERSION};
use crate::layout::SegmentLayout;
use crate::region::{HeapMemory, Region};
use crate::reply::{decode_error, encode_error};
use crate::ring::{Direction, Index};
use crate::segment::Segment;
use crate::sync::Ordering;

/// Splits `data` into frames with [`stream_frame`], as both stream
/// transports do: the first two bytes are the negotiated maximum payload,
/// then headers and payloads follow back to back. Error bodies are decoded
/// too. (The transports' own checks of flags and ids sit above this, in
/// ipcd and ipc-client.)
///
/// # Panics
///
/// Panics if a check fails: a header does not round-trip, a frame is split
/// wrongly, or an error body does not decode to what re-encodes.
pub fn frame_decoder(data: &[u8]) {
    let Some((max, mut rest)) = data.split_first_chunk::<2>() else { return };
    let max_payload = usize::from(u16::from_le_bytes(*max));
    while let Some((header, complete)) = stream_frame(rest) {
        // Every bit pattern decodes, and losslessly.
        assert_eq!(header.encode(), rest[..HEADER_LEN], "header does not round-trip");
        let len = header.len as usize;
        assert_eq!(complete, rest.len() >= HEADER_LEN + len, "frame completeness misjudged");
        if header.unknown_flags() != 0 || len > max_payload || !complete {
            // A reader refuses the stream here (or waits for more).
            return;
        }
        let (payload, after) = rest[HEADER_LEN..].split_at(len);
        if header.is_error() {
            check_error_body(payload);
        }
        rest = after;
    }
}

/// An error body decodes to a code and message that encode and decode back
/// to themselves (the message cut at a character boundary).
fn check_error_body(body: &[u8]) {
    let (code, message) = decode_error(body);
    let mut again = Vec::new();
    encode_error(code, &message, &mut again);
    let (code2, message2) = decode_error(&again);
    assert_eq!(code2, code, "error code does not round-trip");
    assert!(message.starts_with(&message2), "error message does not round-trip");
}

/// Decodes `data` as a control message, the way the daemon reads a hello
/// and a client reads the daemon's answer: a 4-byte length prefix, then the
/// body (all the rest, when the prefix does not fit the bytes).
///
/// # Panics
///
/// Panics if a check fails: an accepted hello has the wrong magic or
/// version, or an accepted message does not encode back to exactly the bytes
/// it was decoded from.
pub fn handshake_decoder(data: &[u8]) {
    let Some((prefix, rest)) = data.split_first_chunk::<LENGTH_PREFIX>() else { return };
    let body = match handshake::body_len(*prefix) {
        Ok(len) if len <= rest.len() => &rest[..len],
        _ => rest,
    };
    if let Ok(hello) = handshake::decode_hello(body) {
        assert_eq!((hello.magic, hello.version), (HELLO_MAGIC, PROTOCOL_VERSION));
        assert_canonical(&hello, body);
    }
    if let Ok(message) = handshake::decode_server_message(body) {
        assert_canonical(&message, body);
    }
    // The messages of broker and provider connections, either way.
    if let Ok(m) = handshake::decode::<crate::control::Resolve>(body) {
        assert_canonical(&m, body);
    }
    if let Ok(m) = handshake::decode::<crate::control::Resolution>(body) {
        assert_canonical(&m, body);
    }
    if let Ok(m) = handshake::decode::<crate::control::ProviderMessage>(body) {
        assert_canonical(&m, body);
    }
    if let Ok(m) = handshake::decode::<crate::control::DaemonMessage>(body) {
        assert_canonical(&m, body);
    }
    if let Ok(name) = std::str::from_utf8(body) {
        if crate::control::check_name(name).is_ok() {
            assert!(!name.is_empty() && name.len() <= crate::control::MAX_NAME, "a name out of bounds passed");
        }
    }
}

/// Feeds frames made of `data` to an [`Assembler`](crate::message::Assembler),
/// as a receiver of chunked messages does, and decodes stream options and
/// credits.
///
/// Layout: the first two bytes are the largest message taken (`u16` le,
/// times 64); then frames, each `flags u8` (bit 0: `FLAG_MORE`), `id u8`,
/// `len u8`, and `len` payload bytes.
///
/// # Panics
///
/// Panics if a check fails: the assembler panics, hands on more bytes of a
/// message than its announced length or its maximum, or keeps more partial
/// messages than [`MAX_PARTIAL`](crate::message::MAX_PARTIAL).
pub fn message_assembler(data: &[u8]) {
    use crate::message::{decode_credit, Assembler, StreamOpen, FLAG_MORE, MAX_PARTIAL};
    let Some((max, mut rest)) = data.split_first_chunk::<2>() else { return };
    let max_message = u64::from(u16::from_le_bytes(*max)) * 64;
    let mut rx = Assembler::new(max_message);
    let mut got = std::collections::HashMap::<u64, (u64, Option<u64>)>::new();
    while let Some((&[flags, id, len], after)) = rest.split_first_chunk::<3>() {
        let (payload, after) = after.split_at(after.len().min(usize::from(len)));
        rest = after;
        let _ = StreamOpen::decode(payload);
        let _ = decode_credit(payload);
        let header = FrameHeader {
            len: payload.len() as u32,
            service: 0,
            flags: if flags & 1 != 0 { FLAG_MORE } else { 0 },
            request_id: u64::from(id),
        };
        match rx.take(&header, payload) {
            Ok(piece) => {
                let entry = got.entry(piece.id).or_insert((0, piece.total));
                if piece.first {
                    *entry = (0, piece.total);
                }
                entry.0 += piece.bytes.len() as u64;
                assert!(entry.0 <= max_message, "more than the maximum handed on");
                if let Some(total) = entry.1 {
                    assert!(entry.0 <= total, "more than announced handed on");
                    assert!(!piece.last || entry.0 == total, "a message ended short of its length");
                }
                if piece.last {
                    got.remove(&piece.id);
                }
            }
            Err(_) => {
                got.remove(&u64::from(id));
            }
        }
        assert!(rx.partial() <= MAX_PARTIAL, "too many partial messages kept");
    }
}

/// Only the one encoding of a message decodes to it: no trailing bytes, no
/// alternative spelling.
fn assert_canonical<T: serde::Serialize>(message: &T, body: &[u8]) {
    let framed = handshake::encode(message).expect("a decoded message encodes");
    assert_eq!(&framed[LENGTH_PREFIX..], body, "decoded message does not encode to its bytes");
}

/// Bytes of the segment header `ring_consumer`'s input supplies.
pub const SEGMENT_HEADER: usize = 32;

/// What the first byte of `ring_consumer`'s input chooses.
#[derive(Clone, Copy, Debug)]
pub struct RingChoices {
    /// Bit 0: the response ring, not the request ring.
    pub direction: Direction,
    /// Bit 1: 8 KiB rings, not 4 KiB.
    pub capacity: u32,
    /// Bit 2: read in place (`try_peek`, `read_at`, `consume`).
    pub in_place: bool,
}

impl RingChoices {
    /// Decodes the choices byte.
    pub fn from_byte(choices: u8) -> RingChoices {
        RingChoices {
            direction: if choices & 1 == 0 { Direction::Request } else { Direction::Response },
            capacity: if choices & 2 == 0 { 4096 } else { 8192 },
            in_place: choices & 4 != 0,
        }
    }
}
/// The most rounds of "the producer writes and publishes, the consumer
/// drains" one input runs.
const MAX_ROUNDS: usize = 16;

/// Runs a consumer over a segment whose every peer-written byte comes from
/// `data`: the segment header, the ring's bytes and the producer's index,
/// over several rounds.
///
/// Layout of `data` (missing bytes read as zero, a short last round is cut):
///
/// ```text
/// choices   u8        bit 0: the response ring, not the request ring
///                     bit 1: 8 KiB rings, not 4 KiB
///                     bit 2: read in place (try_peek, read_at, consume)
/// header    32 bytes  the segment header
/// rounds, each:
///   head    u64 le    the producer index to publish
///   n       u16 le    bytes that follow
///   bytes   n bytes   written into the ring where the previous round's
///                     bytes ended (from offset 0 at first), wrapping
/// ```
///
/// After each round's publish the consumer takes frames until it finds the
/// ring empty or reports an error, releases them, and announces a sleep.
///
/// # Panics
///
/// Panics if a check fails: the consumer panics, returns a frame that lies
/// outside its ring or breaks the negotiated bounds, or takes more steps
/// than one lap of frames to report empty or an error.
pub fn ring_consumer(data: &[u8]) {
    let (&choices, rest) = data.split_first().unwrap_or((&0, &[]));
    let RingChoices { direction, capacity, in_place } = RingChoices::from_byte(choices);
    let layout = SegmentLayout::new(capacity).expect("a valid capacity");
    let region = Region::new(HeapMemory::new(layout.segment_size()));

    // The header as a client checks it: whatever it holds, the check
    // answers without panicking. (Written as bytes here, read back as the
    // header's words by the same thread: sequential, so never a race.)
    let (header, mut rest) = rest.split_at(rest.len().min(SEGMENT_HEADER));
    region.copy_in(0, header);
    let _ = SegmentLayout::read_header(&region, capacity);

    let (_, start) = layout.ring(direction);
    let capacity = capacity as usize;
    let ring = start..start + capacity;
    let segment = Segment::new(region, &layout);
    let words = segment.words;
    let mut rx = match direction {
        Direction::Request => segment.request_consumer,
        Direction::Response => segment.response_consumer,
    };
    let mut out = Vec::new();
    let mut cursor = 0;
    for _ in 0..MAX_ROUNDS {
        let Some((head, after)) = rest.split_first_chunk::<8>() else { return };
        let Some((n, after)) = after.split_first_chunk::<2>() else { return };
        let (bytes, after) = after.split_at(after.len().min(usize::from(u16::from_le_bytes(*n))));
        rest = after;
        // The producer's writes, wrapping at the end of the ring.
        for chunk in bytes.chunks(capacity) {
            let first = chunk.len().min(capacity - cursor);
            words.write_data(direction, cursor, &chunk[..first]);
            words.write_data(direction, 0, &chunk[first..]);
            cursor = (cursor + chunk.len()) % capacity;
        }
        words.index(direction, Index::Head).store(u64::from_le_bytes(*head), Ordering::Relaxed);

        // Each frame moves the consumer at least one header on, and it may
        // read at most one ring ahead of what it released: one lap of the
        // smallest frames, plus the step that finds the ring empty.
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= capacity / HEADER_LEN + 1, "the consumer does not stop");
            let frame = match rx.try_peek() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            let len = frame.len();
            assert!(len <= rx.max_payload() as usize, "payload of {len} bytes over the maximum");
            assert!(frame.header.unknown_flags() == 0 && !frame.header.is_pad(), "a pad or unknown flags let through");
            let span = frame.payload_span();
            assert!(
                ring.start + HEADER_LEN <= span.start && span.end <= ring.end,
                "frame at {span:?} outside {ring:?}"
            );
            if in_place {
                let mut last = [0u8; 1];
                if len > 0 {
                    rx.read_at(&frame, len - 1, &mut last);
                }
            } else {
                rx.read_payload(&frame, &mut out);
                assert_eq!(out.len(), len);
            }
            rx.consume(&frame);
        }
        rx.release();
        // The sleep announcement re-reads the index: it too must survive it.
        match rx.prepare_sleep() {
            Ok(true) => rx.finish_sleep(),
            Ok(false) => {}
            Err(_) => return,
        }
    }
}

/// The first [`SEGMENT_HEADER`] bytes of a segment whose header `layout`
/// wrote, as the `ring_consumer` input carries them (for building seeds).
pub fn segment_header(layout: &SegmentLayout) -> [u8; SEGMENT_HEADER] {
    let region = Region::new(HeapMemory::new(layout.segment_size()));
    layout.write_header(&region);
    let mut header = [0u8; SEGMENT_HEADER];
    region.copy_out(0, &mut header);
    header
}
