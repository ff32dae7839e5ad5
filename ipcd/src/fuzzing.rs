//! Entry points for the fuzz targets (`fuzz/fuzz_targets/exchange.rs`) and
//! for replaying their corpus on stable (`ipcd/tests/fuzz_corpus.rs`). Not
//! part of the API.
//!
//! [`exchange`] feeds a session's exchange (`crate::exchange::Exchange`) every request-direction frame
//! a peer could send (new requests, chunks, openings, credits, cancels, any
//! flags, any lengths), with a sink whose room the input decides, and
//! checks what a client relies on: nothing panics, every frame sent back
//! is one a client's [`Assembler`] accepts and fits a frame, and once the
//! session is gone nothing stays charged against the memory budget.

use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;

use ipc_core::message::{Assembler, FLAG_CANCEL, FLAG_CREDIT, FLAG_MORE, FLAG_STREAM};
use ipc_core::FrameHeader;

use crate::deferred::{Completions, Event, Slot};
use crate::exchange::{Exchange, Took};
use crate::limits::Limits;
use crate::outbox::Sink;
use crate::request::SessionContext;
use crate::service::{self, Handler, ServiceTable, Serving};
use crate::session::Tally;
use crate::stats::WorkerCounters;
use crate::upload::Upload;
use crate::Responder;

/// The largest payload of a frame in the fuzzed session: small, so that
/// chunks are many, and above the longest error body (which goes in one
/// frame; the smallest real frame is kilobytes).
const MAX_PAYLOAD: usize = 256;

/// A sink with the room the input gives it, checking each frame as a
/// client would.
struct Checked {
    room: usize,
    client: Assembler,
}

impl Sink for Checked {
    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }

    fn put(&mut self, mut header: FrameHeader, parts: &[&[u8]]) -> Result<bool, String> {
        let payload = parts.concat();
        assert!(payload.len() <= MAX_PAYLOAD, "a frame of {} bytes", payload.len());
        if payload.len() > self.room {
            return Ok(false);
        }
        self.room -= payload.len();
        header.len = payload.len() as u32;
        // An error frame of an id being assembled cuts that message short
        // (the echo's reflected reply, at a refusal): the client drops it.
        if header.flags & ipc_core::FLAG_ERROR != 0 && self.client.is_partial(header.request_id) {
            self.client.drop_partial(header.request_id);
            return Ok(true);
        }
        // Terminal and item frames of streams are messages too; the client
        // takes every frame the same way.
        self.client.take(&header, &payload).unwrap_or_else(|e| panic!("a frame no client accepts: {e}"));
        Ok(true)
    }
}

/// Counts an upload.
struct Count(u64);

impl Upload for Count {
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), crate::ServiceError> {
        self.0 += bytes.len() as u64;
        if bytes.first() == Some(&0xEE) {
            return Err(crate::ServiceError::new("refused"));
        }
        Ok(())
    }

    fn finish(self: Box<Self>, responder: Responder) {
        responder.reply(self.0.to_le_bytes().to_vec());
    }
}

/// The services of the fuzzed session: echo (reflected), ping (assembled),
/// an upload, and an inline handler whose reply length the request says.
fn services() -> ServiceTable {
    let mut table = ServiceTable::new(1);
    table.add("echo".into(), service::echo()).unwrap();
    table.add("ping".into(), service::ping()).unwrap();
    let upload: Arc<crate::upload::UploadFn> = Arc::new(|_, _| Ok(Box::new(Count(0)) as Box<dyn Upload>));
    table.add("upload".into(), Handler::Upload(upload)).unwrap();
    let grow = |req: &crate::Request<'_>, reply: &mut Vec<u8>| {
        reply.resize(usize::from(req.payload().first().copied().unwrap_or(0)) * 4, 7);
        Ok(())
    };
    table.add("grow".into(), Handler::Inline(Arc::new(grow))).unwrap();
    table
}

/// One fuzz input: frames of `[kind, id, service, len, room]` and `len`
/// payload bytes each; see the module docs.
pub fn exchange(data: &[u8]) {
    let poll = mio::Poll::new().expect("a poll");
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("a waker"));
    let (tx, events): (_, Receiver<Event>) = channel();
    let completions = Completions::new(tx, waker);
    let services = services();
    let counters = WorkerCounters::default();
    let limits = Arc::new(Limits::new(4096, usize::MAX));
    let with = Serving {
        services: &services,
        counters: &counters,
        completions: &completions,
        limits: &limits,
        max_message: 2000,
        shutting_down: false,
    };
    let mut exchange = Exchange::new(SessionContext::new(1, None));
    let mut sink = Checked { room: 0, client: Assembler::new(2000) };
    let (mut reply, mut tally) = (Vec::new(), Tally::default());
    let slot = Slot::UNPLACED;
    let mut rest = data;
    while let Some((&[kind, id, service, len, room], after)) = rest.split_first_chunk::<5>() {
        let (payload, after) = after.split_at(after.len().min(usize::from(len)));
        rest = after;
        let flags = match kind % 8 {
            0 | 1 => 0,
            2 | 3 => FLAG_MORE,
            4 => FLAG_STREAM,
            5 => FLAG_CREDIT,
            6 => FLAG_CANCEL,
            _ => u16::from(kind) << 3,
        };
        let header = FrameHeader {
            len: payload.len() as u32,
            service: u16::from(service % 5),
            flags,
            request_id: u64::from(id),
        };
        sink.room = usize::from(room);
        let Ok(kind) = exchange.check(&header) else { break };
        match exchange.take(&with, slot, kind, &header, payload, &mut reply, &mut sink, &mut tally) {
            Ok(Took::Taken) => {}
            // As a transport does: the frame stays, the client reads, and the
            // frame is offered again.
            Ok(Took::NoRoom(_)) => {
                sink.room = usize::MAX;
                if exchange.flush(&mut sink, &mut tally).is_err() {
                    break;
                }
                match exchange.take(&with, slot, kind, &header, payload, &mut reply, &mut sink, &mut tally) {
                    Ok(Took::Taken) => {}
                    // Room that never comes: the session would stall out.
                    Ok(Took::NoRoom(_)) | Err(_) => break,
                }
            }
            Err(_) => break,
        }
        for event in events.try_iter() {
            if let Event::Answer(answer) = event {
                exchange.complete(answer, &counters, &limits, MAX_PAYLOAD);
            }
        }
        sink.room = usize::MAX;
        if exchange.flush(&mut sink, &mut tally).is_err() {
            break;
        }
    }
    drop(exchange);
    assert_eq!(limits.in_use(), 0, "charges outlived their session");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_few_sessions_pass() {
        // A chunked echo, an assembled ping, an upload, a long reply, a
        // refused opening, a credit and a cancel, then garbage.
        let mut input = Vec::new();
        let mut frame = |kind: u8, id: u8, service: u8, room: u8, payload: &[u8]| {
            input.extend_from_slice(&[kind, id, service, payload.len() as u8, room]);
            input.extend_from_slice(payload);
        };
        frame(2, 1, 0, 0, &[&600u64.to_le_bytes()[..], &[1; 250]].concat());
        frame(2, 1, 0, 255, &[2; 250]);
        frame(0, 1, 0, 255, &[3; 98]);
        frame(2, 2, 1, 255, &[&30u64.to_le_bytes()[..], &[1; 20]].concat());
        frame(0, 2, 1, 255, &[2; 10]);
        frame(2, 3, 2, 255, &[&u64::MAX.to_le_bytes()[..], &[1; 20]].concat());
        frame(0, 3, 2, 255, &[2; 10]);
        frame(0, 4, 3, 255, &[200]);
        frame(4, 5, 1, 255, &[0; 8]);
        frame(5, 5, 1, 255, &[1, 0, 0, 0]);
        frame(6, 5, 1, 255, &[]);
        frame(7, 9, 1, 255, &[9; 9]);
        super::exchange(&input);
        // Pseudo-random inputs.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            super::exchange(&bytes);
        }
    }
}
