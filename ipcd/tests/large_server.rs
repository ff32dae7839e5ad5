//! Messages longer than a frame, driven by raw frames: requests and replies
//! one byte over a frame, an upload taken chunk by chunk, a 100 MiB echo
//! that the daemon never holds whole, `--max-message`, and the hostile
//! ways of sending chunks and stream frames, each an error for its sender
//! alone.

mod common;
#[path = "common/embedded.rs"]
mod embedded;
#[path = "common/wire.rs"]
mod wire;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{
    json_u64, poll_until, start_with_streams, stats_json, watchdog, Daemon, CLEANUP_LIMIT, HANG_UP_LIMIT, TEST_LIMIT,
};
use embedded::Embedded;
use ipc_client::Transport;
use ipc_core::message::{
    encode_chunk_prefix, Assembler, FLAG_CREDIT, FLAG_MORE, FLAG_STREAM, MAX_PARTIAL, UNKNOWN_LENGTH,
};
use ipc_core::{ErrorCode, FLAG_ERROR};
use ipcd::{Responder, ServiceError, Upload};
use wire::{call, Messages, Wire};

/// One test at a time: they measure a daemon's memory.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Byte `at` of a long request, made up as needed rather than held.
fn byte_at(at: u64) -> u8 {
    (at.wrapping_mul(31) ^ (at >> 11)) as u8
}

fn body(len: usize) -> Vec<u8> {
    (0..len as u64).map(byte_at).collect()
}

/// Counts an upload's bytes and checks them against [`byte_at`].
struct Checked {
    got: u64,
    announced: Option<u64>,
    wrong: bool,
}

impl Upload for Checked {
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), ServiceError> {
        for (i, b) in bytes.iter().enumerate() {
            self.wrong |= *b != byte_at(self.got + i as u64);
        }
        self.got += bytes.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>, responder: Responder) {
        if self.wrong {
            return responder.fail(ServiceError::with_code(9, "bytes out of order"));
        }
        let announced = self.announced.unwrap_or(u64::MAX);
        responder.reply([self.got.to_le_bytes(), announced.to_le_bytes()].concat());
    }
}

#[test]
fn requests_and_replies_one_byte_over_a_frame_and_uploads_on_every_transport() {
    let _serial = serial();
    let server = Embedded::start(|b| {
        b.service("len", |req| Ok((req.payload().len() as u64).to_le_bytes().to_vec()))
            .service("grow", |req| {
                let len = u32::from_le_bytes(req.payload().try_into().map_err(|_| ServiceError::new("a u32"))?);
                Ok(body(len as usize))
            })
            .upload_service("upload", |_, announced| Ok(Checked { got: 0, announced, wrong: false }))
    });
    let transports = server.transports();
    watchdog(TEST_LIMIT, move || {
        for transport in &transports {
            let name = transport.name();
            let mut wire = Wire::connect(transport, 64 << 10);
            let mut rx = Messages::new();
            let over = wire.max_payload() + 1;
            let (echo, len, grow, upload) =
                (wire.service("echo"), wire.service("len"), wire.service("grow"), wire.service("upload"));
            // The echo, reflected chunk by chunk.
            let m = call(&mut wire, &mut rx, echo, 1, &body(over));
            assert_eq!((m.flags, m.frames), (0, 2), "{name}");
            assert!(m.body == body(over), "{name}: echo differs");
            // A request assembled for a handler that takes it whole.
            let m = call(&mut wire, &mut rx, len, 2, &body(over));
            assert_eq!(m.body, (over as u64).to_le_bytes(), "{name}");
            // A reply one byte over a frame, in chunks.
            let m = call(&mut wire, &mut rx, grow, 3, &(over as u32).to_le_bytes());
            assert_eq!((m.flags, m.frames), (0, 2), "{name}");
            assert!(m.body == body(over), "{name}: reply differs");
            // An upload, announced and not: the handler saw every byte in
            // order, and what was announced.
            let long = 3 << 20;
            let m = call(&mut wire, &mut rx, upload, 4, &body(long));
            assert_eq!(m.body, [(long as u64).to_le_bytes(), (long as u64).to_le_bytes()].concat(), "{name}");
            assert!(wire.send_message(upload, 5, &body(long), Some(UNKNOWN_LENGTH)));
            let m = rx.next(&mut wire);
            assert_eq!(m.body, [(long as u64).to_le_bytes(), u64::MAX.to_le_bytes()].concat(), "{name}");
            // A request of one frame to an upload service is an upload of one chunk.
            let m = call(&mut wire, &mut rx, upload, 6, &body(10));
            assert_eq!(m.body, [10u64.to_le_bytes(), 10u64.to_le_bytes()].concat(), "{name}");
        }
    });
}

/// The daemon's peak resident memory, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Sends a `len`-byte echo request in chunks while reading the reply,
/// checking every reply byte as it comes; returns the reply's frames.
fn echo_through(wire: &mut Wire, id: u64, len: u64) -> usize {
    let echo = wire.service("echo");
    let max = wire.max_payload();
    let mut rx = Assembler::new(u64::MAX - 1);
    let (mut checked, mut frames) = (0u64, 0);
    let mut check = |wire: &mut Wire, checked: &mut u64, frames: &mut usize, wait: bool| {
        let limit = if wait { common::HANG_UP_LIMIT } else { Duration::ZERO };
        while let Some((h, payload)) = wire.recv_within(limit) {
            let piece = rx.take(&h, &payload).expect("a reply the spec allows");
            assert_eq!((piece.id, h.flags & FLAG_ERROR), (id, 0));
            for (i, b) in piece.bytes.iter().enumerate() {
                assert_eq!(*b, byte_at(*checked + i as u64), "reply byte {}", *checked + i as u64);
            }
            *checked += piece.bytes.len() as u64;
            *frames += 1;
            if piece.last {
                return;
            }
        }
    };
    let mut sent = 0u64;
    let mut chunk = Vec::with_capacity(max);
    while sent < len {
        chunk.clear();
        let first = sent == 0;
        if first {
            chunk.extend_from_slice(&encode_chunk_prefix(len));
        }
        let n = ((len - sent) as usize).min(max - chunk.len());
        chunk.extend((sent..sent + n as u64).map(byte_at));
        sent += n as u64;
        let flags = if sent < len { FLAG_MORE } else { 0 };
        assert!(wire.send(echo, flags, id, &chunk), "the daemon closed the session at byte {sent}");
        check(wire, &mut checked, &mut frames, false);
    }
    while checked < len {
        check(wire, &mut checked, &mut frames, true);
    }
    assert_eq!(checked, len);
    frames
}

#[test]
fn a_100_mib_echo_passes_through_the_daemon_without_being_held() {
    let _serial = serial();
    let (daemon, ends) = start_with_streams(&[]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        for transport in [Transport::Shm(ends.shm.clone()), Transport::Uds(ends.uds.clone())] {
            let name = transport.name();
            let mut wire = Wire::connect(&transport, 256 << 10);
            // Warm: the session's buffers and ring pages are in use before the
            // peak is read.
            echo_through(&mut wire, 1, 4 << 20);
            let before = peak_rss(pid);
            let len = 100 << 20;
            let frames = echo_through(&mut wire, 2, len);
            assert!(frames as u64 > len / wire.max_payload() as u64, "{name}: {frames} frames");
            let grew = peak_rss(pid).saturating_sub(before);
            // Held whole, it would be 100 MiB at least; streamed, the daemon's
            // peak moves by a few buffers at most.
            assert!(grew < 16 << 20, "{name}: the daemon's peak memory grew by {grew} bytes during a 100 MiB echo");
        }
    });
}

/// A second session that must not notice what the hostile one does.
fn bystander_works(transport: &Transport) {
    let mut wire = Wire::connect(transport, 64 << 10);
    let mut rx = Messages::new();
    let echo = wire.service("echo");
    let m = call(&mut wire, &mut rx, echo, 1, b"still here");
    assert_eq!(m.body, b"still here");
}

#[test]
fn a_request_announced_and_never_sent_costs_nothing_once_its_session_is_gone() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let shm = Transport::Shm(daemon.socket().to_path_buf());
    let mut observer = daemon.client();
    watchdog(TEST_LIMIT, move || {
        let baseline = json_u64(&stats_json(&mut observer), "memory_in_use");
        let mut hostile = Wire::connect(&shm, 64 << 10);
        let mut rx = Messages::new();
        let ping = hostile.service("ping");
        let session = json_u64(&stats_json(&mut observer), "memory_in_use");
        // 512 MiB announced to a handler that takes requests whole: a first
        // chunk, and nothing more.
        let first = [&encode_chunk_prefix(512 << 20)[..], &body(hostile.max_payload() - 8)].concat();
        assert!(hostile.send(ping, FLAG_MORE, 1, &first));
        assert!(poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut observer), "memory_in_use") > session));
        let held = json_u64(&stats_json(&mut observer), "memory_in_use") - session;
        assert!(held < 1 << 20, "an announcement is not a reservation: {held} bytes held for one chunk");
        // Past --max-message (1 GiB by default): refused at once, for that
        // call alone.
        let huge = encode_chunk_prefix(2 << 30);
        assert!(hostile.send(ping, FLAG_MORE, 2, &huge));
        let m = rx.next(&mut hostile);
        assert_eq!((m.id, m.error().map(|e| e.0)), (2, Some(ErrorCode::MessageTooLarge)), "{m:?}");
        bystander_works(&shm);
        drop(hostile);
        assert!(
            poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut observer), "memory_in_use") == baseline),
            "the memory in use went back to {baseline}: {}",
            stats_json(&mut observer)
        );
    });
}

#[test]
fn chunks_and_stream_frames_that_break_the_protocol_cut_off_their_session_alone() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        for transport in [Transport::Shm(ends.shm.clone()), Transport::Uds(ends.uds.clone())] {
            let name = transport.name();
            type Break = fn(&mut Wire);
            let cases: [(&str, Break); 6] = [
                ("more than announced", |w| {
                    let echo = w.service("echo");
                    w.send(echo, FLAG_MORE, 1, &[&encode_chunk_prefix(10)[..], &[1; 6]].concat());
                    w.send(echo, 0, 1, &[2; 5]);
                }),
                ("less than announced", |w| {
                    let ping = w.service("ping");
                    w.send(ping, FLAG_MORE, 1, &[&encode_chunk_prefix(10)[..], &[1; 6]].concat());
                    w.send(ping, 0, 1, &[2; 3]);
                }),
                ("a credit for a stream never opened", |w| {
                    let count = w.service("stream.count");
                    w.send(count, FLAG_CREDIT, 7, &5u32.to_le_bytes());
                }),
                ("a cancel for a request never sent", |w| {
                    let count = w.service("stream.count");
                    w.cancel(count, 3);
                }),
                ("an opening shorter than its stream options", |w| {
                    let count = w.service("stream.count");
                    w.send(count, FLAG_STREAM, 1, &[0; 7]);
                }),
                ("a credit of three bytes", |w| {
                    let count = w.service("stream.count");
                    w.open(count, 1, 0, 0, &[1, 0, 0, 0, 1, 0, 0, 0]);
                    w.send(count, FLAG_CREDIT, 1, &[1, 0, 0]);
                }),
            ];
            for (what, case) in cases {
                let mut wire = Wire::connect(&transport, 64 << 10);
                case(&mut wire);
                assert!(wire.hung_up_within(HANG_UP_LIMIT), "{name}: {what} did not end the session");
                bystander_works(&transport);
            }
        }
    });
}

#[test]
fn partial_requests_past_the_limit_credits_that_overflow_and_max_message_are_errors_for_one_call() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&["--max-message", "100K"]);
    watchdog(TEST_LIMIT, move || {
        for transport in [Transport::Shm(ends.shm.clone()), Transport::Uds(ends.uds.clone())] {
            let name = transport.name();
            let mut wire = Wire::connect(&transport, 64 << 10);
            let mut rx = Messages::new();
            let (ping, echo, count) = (wire.service("ping"), wire.service("echo"), wire.service("stream.count"));
            // MAX_PARTIAL requests begun at once are taken; the next is refused.
            let first = [&encode_chunk_prefix(20)[..], &[0; 10]].concat();
            for id in 1..=MAX_PARTIAL as u64 {
                assert!(wire.send(ping, FLAG_MORE, id, &first));
            }
            let past = MAX_PARTIAL as u64 + 1;
            assert!(wire.send(ping, FLAG_MORE, past, &first));
            let m = rx.next(&mut wire);
            assert_eq!((m.id, m.error().map(|e| e.0)), (past, Some(ErrorCode::TooMany)), "{name}: {m:?}");
            // Its rest is discarded as it comes; the others complete.
            assert!(wire.send(ping, 0, past, &[0; 10]));
            for id in 1..=MAX_PARTIAL as u64 {
                assert!(wire.send(ping, 0, id, &[0; 10]));
            }
            let mut answered: Vec<u64> = (0..MAX_PARTIAL)
                .map(|_| rx.next(&mut wire))
                .map(|m| {
                    assert_eq!(m.flags, 0, "{name}: {m:?}");
                    m.id
                })
                .collect();
            answered.sort_unstable();
            assert_eq!(answered, (1..=MAX_PARTIAL as u64).collect::<Vec<_>>(), "{name}");

            // Longer than --max-message: announced, or found out as it comes.
            let id = past + 1;
            assert!(wire.send(echo, FLAG_MORE, id, &encode_chunk_prefix(100 * 1024 + 1)));
            let m = rx.next(&mut wire);
            assert_eq!((m.id, m.error().map(|e| e.0)), (id, Some(ErrorCode::MessageTooLarge)), "{name}: {m:?}");
            let id = id + 1;
            assert!(wire.send_message(ping, id, &body(100 * 1024 + 1), Some(UNKNOWN_LENGTH)));
            let m = rx.next(&mut wire);
            assert_eq!((m.id, m.error().map(|e| e.0)), (id, Some(ErrorCode::MessageTooLarge)), "{name}: {m:?}");
            let m = call(&mut wire, &mut rx, echo, id + 1, &body(100 * 1024));
            assert!(m.flags == 0 && m.body == body(100 * 1024), "{name}: up to --max-message is taken");

            // Credits add up without overflowing.
            let id = id + 2;
            assert!(wire.open(count, id, u32::MAX, 0, &[&50u32.to_le_bytes()[..], &4u32.to_le_bytes()].concat()));
            assert!(wire.grant(count, id, u32::MAX) && wire.grant(count, id, u32::MAX));
            let mut items = 0;
            let end = loop {
                let m = rx.next(&mut wire);
                if m.is_end() {
                    break m;
                }
                items += 1;
            };
            assert_eq!((items, end.error()), (50, None), "{name}");
        }
    });
}
