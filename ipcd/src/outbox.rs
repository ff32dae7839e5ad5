//! What a session sends beyond the reply it writes at once: replies that
//! wait for room, replies longer than a frame (sent in chunks), and the
//! items and ends of its streams, interleaved as room frees.
//!
//! A frame goes to a [`Sink`]: the response ring, or a stream session's
//! output. What does not fit waits here, in *lanes*: one per reply, one per
//! open stream. Each turn of [`Outbox::flush`] gives every lane one frame,
//! so a long reply's chunks interleave with the other replies, and the
//! first frame that finds no room stops the flush (the session then waits
//! for its client to read, as for any reply that does not fit).
//!
//! # Chunks
//!
//! A message longer than the sink's largest payload goes out as
//! `ipc_core::message` says: frames of its id, each but the last with
//! `FLAG_MORE`, the first beginning with the message's length, each of at
//! most `CHUNK_LEN` bytes (less than a frame of a large ring). The bytes
//! are sent from the message's own buffer, never copied whole again. The
//! client assembles at most [`MAX_PARTIAL`] messages at once, so no more
//! than that many chunked messages (replies, stream items, and the echo's
//! reflected replies, which the session counts here too) are begun and
//! not finished at once; a lane whose next message would pass that waits
//! its turn, and the lanes behind it go on.
//!
//! # Streams
//!
//! A stream's lane takes its items from the stream's shared state
//! ([`crate::streaming`]) one at a time, in order, and after the last one
//! writes its terminal frame, exactly once; then the lane ends. A lane with
//! nothing to send is parked until its stream says it has something
//! ([`Outbox::wake`]), so a flush costs nothing for streams that wait on
//! their handler.

use std::collections::VecDeque;
use std::time::Instant;

use ipc_core::message::{encode_chunk_prefix, CHUNK_LEN, FLAG_MORE, MAX_PARTIAL};
use ipc_core::FrameHeader;

use crate::limits::Charge;
use crate::session::Tally;
use crate::streaming::{Next, StreamLane, Written};

/// Where a session's frames go: its response ring, or its stream's output.
pub(crate) trait Sink {
    /// The largest payload of one frame.
    fn max_payload(&self) -> usize;

    /// Writes a frame with `header`'s id, service and flags whose payload
    /// is `parts` one after the other, if it fits now; `Ok(false)` (and
    /// nothing written) if not. `header.len` is not looked at.
    fn put(&mut self, header: FrameHeader, parts: &[&[u8]]) -> Result<bool, String>;
}

/// A message on its way out: one frame, or chunks.
pub(crate) struct Message {
    id: u64,
    service: u16,
    /// The flags of every frame (`FLAG_MORE` aside): 0, `FLAG_ERROR`,
    /// `FLAG_STREAM`, or a stream's `FLAG_END` (with `FLAG_ERROR`).
    flags: u16,
    body: Vec<u8>,
    /// Body bytes sent.
    sent: usize,
    /// Whether its first frame has gone out.
    started: bool,
    /// Whether writing it ends a chunked message the client is assembling
    /// (the error that cuts the echo's reflected reply short).
    ends_partial: bool,
    /// What the body is charged against the memory budget, if anything.
    _charge: Option<Charge>,
}

/// What one lane did with its turn.
enum Step {
    /// It wrote a frame; `true` once it has nothing more to send.
    Sent(bool),
    /// Its next frame does not fit (the frame's payload length).
    NoRoom(usize),
    /// Its next message would begin one chunked message too many.
    Capped,
    /// It has nothing to send now (a stream waiting on its handler).
    Idle,
}

impl Message {
    /// A message of `body` for request `id` of `service`.
    pub(crate) fn new(id: u64, service: u16, flags: u16, body: Vec<u8>, charge: Option<Charge>) -> Message {
        Message { id, service, flags, body, sent: 0, started: false, ends_partial: false, _charge: charge }
    }

    /// An error frame that ends the chunked message the client assembles
    /// for `id` (a reflected reply cut short).
    pub(crate) fn cut(id: u64, service: u16, body: Vec<u8>) -> Message {
        Message { ends_partial: true, ..Message::new(id, service, ipc_core::FLAG_ERROR, body, None) }
    }

    /// The body's length.
    pub(crate) fn len(&self) -> usize {
        self.body.len()
    }

    /// Its frames' flags (`FLAG_MORE` aside).
    pub(crate) fn flags(&self) -> u16 {
        self.flags
    }

    /// Whether it goes out in chunks through `sink`.
    fn is_chunked(&self, max_payload: usize) -> bool {
        self.body.len() > max_payload
    }

    /// Writes its next frame if it fits (and, for a chunked message not yet
    /// begun, if fewer than [`MAX_PARTIAL`] are begun).
    fn put_next(&mut self, sink: &mut dyn Sink, partials: &mut usize) -> Result<Step, String> {
        let max = sink.max_payload();
        let header = |flags| FrameHeader { len: 0, service: self.service, flags, request_id: self.id };
        if !self.is_chunked(max) {
            if !sink.put(header(self.flags), &[&self.body])? {
                return Ok(Step::NoRoom(self.body.len()));
            }
            if self.ends_partial {
                *partials -= 1;
            }
            self.started = true;
            return Ok(Step::Sent(true));
        }
        // Chunks of `CHUNK_LEN` at most, whatever a frame could carry: the
        // client holds about one chunk, not one frame, of a message at once.
        let chunk = max.min(CHUNK_LEN);
        let total = self.body.len();
        if !self.started {
            if *partials >= MAX_PARTIAL {
                return Ok(Step::Capped);
            }
            // The first chunk: the length, then as much as fits after it.
            let n = chunk - ipc_core::message::CHUNK_PREFIX;
            let prefix = encode_chunk_prefix(total as u64);
            if !sink.put(header(self.flags | FLAG_MORE), &[&prefix, &self.body[..n]])? {
                return Ok(Step::NoRoom(chunk));
            }
            *partials += 1;
            self.started = true;
            self.sent = n;
            return Ok(Step::Sent(false));
        }
        let n = (total - self.sent).min(chunk);
        let last = self.sent + n == total;
        let flags = if last { self.flags } else { self.flags | FLAG_MORE };
        if !sink.put(header(flags), &[&self.body[self.sent..self.sent + n]])? {
            return Ok(Step::NoRoom(n));
        }
        self.sent += n;
        if last {
            *partials -= 1;
        }
        Ok(Step::Sent(last))
    }
}

/// A reply, or a stream, waiting to go out.
enum Lane {
    Reply(Message),
    Stream(StreamLane),
}

/// What a flush left.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// Everything that can go now has gone.
    Clear,
    /// A frame with a payload of this length does not fit: the session
    /// waits for its client to make room.
    NoRoom(usize),
}

/// A session's output beyond the reply it writes at once; see the module
/// docs.
#[derive(Default)]
pub(crate) struct Outbox {
    /// Lanes with something to send, in turn order.
    lanes: VecDeque<Lane>,
    /// Stream lanes waiting on their handler.
    parked: Vec<StreamLane>,
    /// Chunked messages begun and not finished, toward the client (with the
    /// echo's reflected replies).
    partials: usize,
}

impl Outbox {
    /// Whether nothing waits to go out and no stream is open.
    pub(crate) fn is_empty(&self) -> bool {
        self.lanes.is_empty() && self.parked.is_empty()
    }

    /// Whether a lane has something to send (a stream parked on its
    /// handler has not).
    pub(crate) fn has_ready(&self) -> bool {
        !self.lanes.is_empty()
    }

    /// The length and capacity of each reply waiting.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> Vec<(usize, usize)> {
        let replies = self.lanes.iter().filter_map(|l| match l {
            Lane::Reply(m) => Some((m.body.len(), m.body.capacity())),
            Lane::Stream(_) => None,
        });
        replies.collect()
    }

    /// Queues a reply (of one frame or many) behind the others.
    pub(crate) fn push(&mut self, message: Message) {
        self.lanes.push_back(Lane::Reply(message));
    }

    /// Begins a chunked message that the session writes itself (the
    /// echo's reflected reply), if fewer than [`MAX_PARTIAL`] are begun.
    pub(crate) fn begin_partial(&mut self) -> bool {
        let room = self.partials < MAX_PARTIAL;
        self.partials += usize::from(room);
        room
    }

    /// Ends a chunked message the session wrote itself.
    pub(crate) fn end_partial(&mut self) {
        self.partials -= 1;
    }

    /// Adds an open stream's lane; it is parked until its stream has
    /// something to send.
    pub(crate) fn add_stream(&mut self, lane: StreamLane) {
        self.parked.push(lane);
    }

    /// Open streams: those whose terminal frame has not gone out.
    pub(crate) fn streams(&self) -> usize {
        self.parked.len() + self.lanes.iter().filter(|l| matches!(l, Lane::Stream(_))).count()
    }

    /// The open stream `id`, wherever its lane is.
    pub(crate) fn stream(&mut self, id: u64) -> Option<&mut StreamLane> {
        let parked = self.parked.iter_mut();
        let lanes = self.lanes.iter_mut().filter_map(|l| match l {
            Lane::Stream(s) => Some(s),
            Lane::Reply(_) => None,
        });
        parked.chain(lanes).find(|s| s.id() == id)
    }

    /// Every open stream.
    pub(crate) fn each_stream(&mut self, mut f: impl FnMut(&mut StreamLane)) {
        self.parked.iter_mut().for_each(&mut f);
        for lane in &mut self.lanes {
            if let Lane::Stream(s) = lane {
                f(s);
            }
        }
    }

    /// Puts stream `id`'s lane back in turn, if it was parked: its stream
    /// has something to send.
    pub(crate) fn wake(&mut self, id: u64) {
        if let Some(i) = self.parked.iter().position(|s| s.id() == id) {
            let lane = self.parked.swap_remove(i);
            self.lanes.push_back(Lane::Stream(lane));
        }
    }

    /// Puts every parked stream back in turn (each looks at its stream
    /// once and parks again if it has nothing).
    pub(crate) fn wake_all(&mut self) {
        self.lanes.extend(self.parked.drain(..).map(Lane::Stream));
    }

    /// The earliest deadline of an open stream.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let lanes = self.lanes.iter().filter_map(|l| match l {
            Lane::Stream(s) => s.deadline(),
            Lane::Reply(_) => None,
        });
        self.parked.iter().filter_map(StreamLane::deadline).chain(lanes).min()
    }

    /// Sends what waits, a frame per lane per turn, until everything that
    /// can go has gone or a frame finds no room. Stream ends are counted in
    /// `tally` as answers.
    pub(crate) fn flush(&mut self, sink: &mut dyn Sink, tally: &mut Tally) -> Result<Flush, String> {
        loop {
            let mut sent = false;
            for _ in 0..self.lanes.len() {
                let Some(mut lane) = self.lanes.pop_front() else { break };
                let step = match &mut lane {
                    Lane::Reply(message) => message.put_next(sink, &mut self.partials)?,
                    Lane::Stream(stream) => Self::stream_step(stream, sink, &mut self.partials, tally)?,
                };
                match step {
                    Step::Sent(done) => {
                        sent = true;
                        if !done {
                            self.lanes.push_back(lane);
                        }
                    }
                    Step::NoRoom(len) => {
                        self.lanes.push_front(lane);
                        return Ok(Flush::NoRoom(len));
                    }
                    Step::Capped => self.lanes.push_back(lane),
                    Step::Idle => match lane {
                        Lane::Stream(stream) => self.parked.push(stream),
                        Lane::Reply(_) => unreachable!("a reply always has a frame to send"),
                    },
                }
            }
            if !sent {
                return Ok(Flush::Clear);
            }
        }
    }

    /// One turn of a stream's lane: a frame of its current message, or the
    /// next item or its end taken from the stream.
    fn stream_step(
        stream: &mut StreamLane,
        sink: &mut dyn Sink,
        partials: &mut usize,
        tally: &mut Tally,
    ) -> Result<Step, String> {
        if stream.current().is_none() {
            let may_chunk = *partials < MAX_PARTIAL;
            match stream.take_next(sink.max_payload(), may_chunk) {
                Next::Message => {}
                Next::Capped => return Ok(Step::Capped),
                Next::Idle => return Ok(Step::Idle),
            }
        }
        let Some(message) = stream.current() else { return Ok(Step::Idle) };
        let step = message.put_next(sink, partials)?;
        if let Step::Sent(true) = step {
            return Ok(match stream.written() {
                Written::Item => Step::Sent(false),
                Written::End(error) => {
                    tally.answered += 1;
                    tally.errors += u64::from(error);
                    Step::Sent(true)
                }
            });
        }
        Ok(step)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ipc_core::message::{Assembler, CHUNK_PREFIX};
    use ipc_core::FLAG_ERROR;

    /// A sink that takes frames while it has room for their payloads.
    pub(crate) struct Frames {
        pub(crate) max: usize,
        pub(crate) room: usize,
        pub(crate) frames: Vec<(FrameHeader, Vec<u8>)>,
    }

    impl Sink for Frames {
        fn max_payload(&self) -> usize {
            self.max
        }

        fn put(&mut self, mut header: FrameHeader, parts: &[&[u8]]) -> Result<bool, String> {
            let payload = parts.concat();
            assert!(payload.len() <= self.max, "a frame of {} bytes over the maximum {}", payload.len(), self.max);
            if payload.len() > self.room {
                return Ok(false);
            }
            self.room -= payload.len();
            header.len = payload.len() as u32;
            self.frames.push((header, payload));
            Ok(true)
        }
    }

    /// Reassembles what a client would: each message by id, through the
    /// spec's assembler.
    fn assemble(frames: &[(FrameHeader, Vec<u8>)]) -> Vec<(u64, Vec<u8>)> {
        let mut rx = Assembler::new(1 << 30);
        let mut partial: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut done = Vec::new();
        for (h, payload) in frames {
            let piece = rx.take(h, payload).expect("frames a client accepts");
            if piece.first {
                partial.push((piece.id, Vec::new()));
            }
            let at = partial.iter().position(|p| p.0 == piece.id).unwrap();
            partial[at].1.extend_from_slice(piece.bytes);
            if piece.last {
                done.push(partial.remove(at));
            }
        }
        assert!(partial.is_empty());
        done
    }

    #[test]
    fn long_replies_go_in_chunks_interleaved_with_short_ones() {
        let mut outbox = Outbox::default();
        let long: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        outbox.push(Message::new(1, 3, 0, long.clone(), None));
        outbox.push(Message::new(2, 3, 0, b"short".to_vec(), None));
        outbox.push(Message::new(3, 3, FLAG_ERROR, b"err".to_vec(), None));
        let mut sink = Frames { max: 100, room: usize::MAX, frames: Vec::new() };
        assert_eq!(outbox.flush(&mut sink, &mut Tally::default()), Ok(Flush::Clear));
        assert!(outbox.is_empty());
        // The short replies go between the first chunks of the long one.
        let ids: Vec<u64> = sink.frames.iter().map(|f| f.0.request_id).collect();
        assert_eq!(&ids[..3], [1, 2, 3]);
        assert_eq!(sink.frames[0].1.len(), 100);
        assert_eq!(&sink.frames[0].1[..CHUNK_PREFIX], 1000u64.to_le_bytes());
        let got = assemble(&sink.frames);
        assert_eq!(got, [(2, b"short".to_vec()), (3, b"err".to_vec()), (1, long)]);
        assert_eq!(outbox.partials, 0);
    }

    #[test]
    fn a_frame_that_finds_no_room_stops_the_flush_and_goes_first_next_time() {
        let mut outbox = Outbox::default();
        outbox.push(Message::new(1, 0, 0, vec![1; 250], None));
        outbox.push(Message::new(2, 0, 0, vec![2; 10], None));
        let mut sink = Frames { max: 100, room: 150, frames: Vec::new() };
        let mut tally = Tally::default();
        // 100 (first chunk), 10 (the short one), then 92 does not fit in 40.
        assert_eq!(outbox.flush(&mut sink, &mut tally), Ok(Flush::NoRoom(100)));
        assert_eq!(sink.frames.len(), 2);
        sink.room = usize::MAX;
        assert_eq!(outbox.flush(&mut sink, &mut tally), Ok(Flush::Clear));
        assert_eq!(assemble(&sink.frames), [(2, vec![2; 10]), (1, vec![1; 250])]);
    }

    #[test]
    fn no_more_than_max_partial_chunked_replies_are_begun_at_once() {
        let mut outbox = Outbox::default();
        for id in 1..=MAX_PARTIAL as u64 + 3 {
            outbox.push(Message::new(id, 0, 0, vec![id as u8; 300], None));
        }
        outbox.push(Message::new(99, 0, 0, b"small".to_vec(), None));
        // The echo holds one begun message of its own.
        assert!(outbox.begin_partial());
        let mut sink = Frames { max: 100, room: usize::MAX, frames: Vec::new() };
        outbox.flush(&mut sink, &mut Tally::default()).unwrap();
        let mut open = std::collections::HashSet::new();
        let mut most = 0;
        for (h, _) in &sink.frames {
            if h.flags & FLAG_MORE != 0 {
                open.insert(h.request_id);
            } else {
                open.remove(&h.request_id);
            }
            most = most.max(open.len());
        }
        assert_eq!(most, MAX_PARTIAL - 1, "with the echo's one, at most MAX_PARTIAL at once");
        assert_eq!(assemble(&sink.frames).len(), MAX_PARTIAL + 4);
        outbox.end_partial();
        assert_eq!(outbox.partials, 0);
    }
}
