//! Messages longer than a frame against scripted daemons, over shared
//! memory and a Unix socket alike: requests and replies in chunks, readers
//! and uploads, and a daemon whose chunks break the rules.

use std::io::{Read, Write};

use ipc_core::message::{encode_chunk_prefix, FLAG_CANCEL, FLAG_MORE, UNKNOWN_LENGTH};

use crate::scripted::{options, reply_to, Frames, Peer, Scripted, Taken, Wire, CAPACITY, WIRES};
use crate::{CallError, Client};

/// `len` bytes that tell their positions apart (and `seed` tells messages
/// apart), so that a chunk out of place shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 24) as u8)
        .collect()
}

/// The frames a sender makes of `body` with payloads of at most `max`:
/// (flags, payload) each.
fn chunks_of(body: &[u8], max: usize, announced: u64) -> Vec<(u16, Vec<u8>)> {
    if body.len() <= max {
        return vec![(0, body.to_vec())];
    }
    let mut frames = vec![(FLAG_MORE, [&encode_chunk_prefix(announced)[..], &body[..max - 8]].concat())];
    for piece in body[max - 8..].chunks(max) {
        frames.push((FLAG_MORE, piece.to_vec()));
    }
    frames.last_mut().expect("at least two").0 = 0;
    frames
}

fn start(wire: Wire, script: impl FnOnce(Peer) + Send + 'static) -> (Scripted, Client) {
    let daemon = Scripted::start_on(wire, CAPACITY, script);
    let client = daemon.client_with(options());
    (daemon, client)
}

#[test]
fn a_request_and_a_reply_one_byte_over_a_frame_go_as_two_chunks() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let (head, body, frames) = d.take_message();
            assert_eq!((frames, body == pattern(max + 1, 1)), (2, true), "one byte over: two chunks");
            d.send_message(head.service, head.request_id, &pattern(max + 1, 2));
            let (head, body, frames) = d.take_message();
            assert_eq!((frames, body.len()), (1, max), "a frame's worth: one frame");
            d.send_message(head.service, head.request_id, &body);
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        assert_eq!(client.call(&echo, &pattern(max + 1, 1)).unwrap(), pattern(max + 1, 2), "{wire:?}");
        assert_eq!(client.call(&echo, &pattern(max, 3)).unwrap(), pattern(max, 3), "{wire:?}");
        assert_eq!(client.in_flight(), 0);
        daemon.finish();
    }
}

/// A megabyte each way through 4 KiB rings: the daemon echoes each chunk
/// as it comes, so the client must take reply chunks aside while it waits
/// for room for its own.
#[test]
fn a_megabyte_each_way_through_a_small_ring_goes_without_deadlock() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let (_, frames) = d.echo_chunk_by_chunk();
            assert!(frames > 256, "{frames} chunks for a megabyte");
            // A typed call of the same size.
            let (_, frames) = d.echo_chunk_by_chunk();
            assert!(frames > 256, "{frames} chunks for a typed megabyte");
        });
        let echo = client.service("echo").unwrap();
        let big = pattern(1 << 20, 7);
        assert!(client.call(&echo, &big).unwrap() == big, "{wire:?}: the echo differs");
        let typed: Vec<u8> = client.call_typed(&echo, &big).unwrap();
        assert!(typed == big, "{wire:?}: the typed echo differs");
        daemon.finish();
    }
}

/// Replies answered out of order, their chunks interleaved with each other
/// and with a reply of one frame, each go to their own caller whole.
#[test]
fn chunks_of_two_replies_interleave() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let ids: Vec<(u16, u64)> =
                (0..3).map(|_| d.take()).map(|t| (t.header.service, t.header.request_id)).collect();
            let a = chunks_of(&pattern(3 * max, 1), max, 3 * max as u64);
            let b = chunks_of(&pattern(2 * max + 5, 2), max, UNKNOWN_LENGTH);
            let (service, _) = ids[0];
            let order = [(1, 0), (0, 0), (1, 1), (2, 0), (0, 1), (1, 2), (0, 2), (0, 3)];
            for (which, k) in order {
                let id = ids[which].1;
                match which {
                    0 => d.send(service, a[k].0, id, &a[k].1),
                    1 => d.send(service, b[k].0, id, &b[k].1),
                    _ => d.send(service, 0, id, &reply_to(id)),
                }
            }
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let tickets: Vec<_> = (0..3).map(|_| client.send(&echo, b"?").unwrap()).collect();
        assert_eq!(client.wait(tickets[1]).unwrap(), pattern(2 * max + 5, 2), "{wire:?}");
        assert_eq!(client.wait(tickets[2]).unwrap(), reply_to(tickets[2].id()), "{wire:?}");
        assert_eq!(client.wait(tickets[0]).unwrap(), pattern(3 * max, 1), "{wire:?}");
        daemon.finish();
    }
}

/// A reply of 32 MiB read through a reader: it comes chunk by chunk, and
/// the client never holds more than a chunk of it.
#[test]
fn a_reader_takes_a_long_reply_a_chunk_at_a_time() {
    const LEN: usize = 32 << 20;
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &pattern(LEN, 5));
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, b"short");
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let expected = pattern(LEN, 5);
        let mut reader = client.call_reader(&echo, b"long").unwrap();
        assert_eq!(reader.len(), Some(LEN as u64), "{wire:?}: announced");
        let (mut got, mut held, mut buf) = (0, 0, vec![0u8; 1000]);
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n] == expected[got..got + n], "{wire:?}: bytes {got}..{} differ", got + n);
            got += n;
            let id = reader.ticket.id();
            let link = reader.ticket.link();
            if let Some(p) = reader.client.slots[link].inbound.partial_mut(id) {
                held = held.max(p.body.capacity());
            }
        }
        assert_eq!(got, LEN, "{wire:?}");
        assert!(held <= 2 * max, "{wire:?}: the reader held {held} bytes of the reply at once");
        drop(reader);
        // A reply of one frame reads the same way.
        let mut short = Vec::new();
        client.call_reader(&echo, b"short").unwrap().read_to_end(&mut short).unwrap();
        assert_eq!(short, b"short");
        daemon.finish();
    }
}

/// A reader dropped half way: the rest of the reply is dropped as it
/// comes, and the next call gets its own reply.
#[test]
fn a_reader_dropped_half_way_leaves_the_link_usable() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &pattern(1 << 20, 1));
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &reply_to(head.request_id));
        });
        let echo = client.service("echo").unwrap();
        let mut reader = client.call_reader(&echo, b"long").unwrap();
        let mut head = [0u8; 10_000];
        reader.read_exact(&mut head).unwrap();
        assert!(head[..] == pattern(1 << 20, 1)[..10_000]);
        drop(reader);
        assert_eq!(client.call(&echo, b"next").unwrap(), reply_to(2), "{wire:?}");
        assert_eq!(client.in_flight(), 0);
        daemon.finish();
    }
}

/// Replies longer than the client takes are that call's error, whether
/// their first chunk says so, they pass the maximum on the way, or they
/// come in one frame; the link goes on.
#[test]
fn a_reply_longer_than_the_maximum_is_refused_and_the_link_goes_on() {
    const MAX: u64 = 10_000;
    for wire in WIRES {
        let daemon = Scripted::start_on(wire, CAPACITY, |mut d| {
            let max = d.max_payload();
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &pattern(MAX as usize + 1, 1));
            let (head, _, _) = d.take_message();
            for (flags, payload) in chunks_of(&pattern(3 * MAX as usize, 2), max, UNKNOWN_LENGTH) {
                d.send(head.service, flags, head.request_id, &payload);
            }
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &reply_to(head.request_id));
        });
        let mut client = daemon.client_with(options().max_message(MAX));
        let echo = client.service("echo").unwrap();
        let err = client.call(&echo, b"1").unwrap_err();
        assert_eq!(err, CallError::ReplyTooLarge { len: Some(MAX + 1), max: MAX }, "{wire:?}");
        let err = client.call(&echo, b"2").unwrap_err();
        assert_eq!(err, CallError::ReplyTooLarge { len: None, max: MAX }, "{wire:?}");
        assert_eq!(client.call(&echo, b"3").unwrap(), reply_to(3), "{wire:?}");
        daemon.finish();

        // One frame longer than the maximum.
        let daemon = Scripted::start_on(wire, CAPACITY, |mut d| {
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &[0; 101]);
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &[1; 100]);
        });
        let mut client = daemon.client_with(options().max_message(100));
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"1"), Err(CallError::ReplyTooLarge { len: Some(101), max: 100 }), "{wire:?}");
        assert_eq!(client.call(&echo, b"2").unwrap(), [1; 100]);
        daemon.finish();
    }
}

/// A reply in chunks cut short by an error frame of its id (a daemon that
/// echoes a request as it comes and refuses it half way): the error is
/// the call's outcome, and a reader's read fails with it after the bytes
/// that came; the link goes on.
#[test]
fn a_reply_cut_short_by_an_error_frame_is_its_calls_error() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            let max = d.max_payload();
            let mut error = Vec::new();
            ipc_core::encode_error(ipc_core::ErrorCode::MessageTooLarge, "too long", &mut error);
            for _ in 0..2 {
                let (head, _, _) = d.take_message();
                let frames = chunks_of(&pattern(3 * max, 1), max, UNKNOWN_LENGTH);
                for (flags, payload) in &frames[..2] {
                    d.send(head.service, *flags, head.request_id, payload);
                }
                d.send(head.service, ipc_core::FLAG_ERROR, head.request_id, &error);
            }
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &reply_to(head.request_id));
        });
        let echo = client.service("echo").unwrap();
        let too_long = CallError::MessageTooLarge { message: "too long".into() };
        let max = client.max_payload();
        assert_eq!(client.call(&echo, b"1"), Err(too_long.clone()), "{wire:?}");
        let mut reader = client.call_reader(&echo, b"2").unwrap();
        let mut got = Vec::new();
        let e = reader.read_to_end(&mut got).unwrap_err();
        assert_eq!(e.into_inner().and_then(|e| e.downcast_ref::<CallError>().cloned()), Some(too_long), "{wire:?}");
        assert!(!got.is_empty() && got[..] == pattern(3 * max, 1)[..got.len()], "{wire:?}: the bytes before the cut");
        drop(reader);
        assert_eq!(client.call(&echo, b"3").unwrap(), reply_to(3), "{wire:?}");
        assert_eq!(client.in_flight(), 0);
        daemon.finish();
    }
}

/// A request longer than the client sends is refused before anything
/// goes out.
#[test]
fn a_request_longer_than_the_maximum_is_not_sent() {
    for wire in WIRES {
        let daemon = Scripted::start_on(wire, CAPACITY, |mut d| {
            let (head, body, _) = d.take_message();
            assert_eq!((head.request_id, &body[..]), (1, &b"small"[..]), "the long one never came");
            d.send_message(head.service, head.request_id, b"ok");
        });
        let mut client = daemon.client_with(options().max_message(20_000));
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, &[0; 20_001]), Err(CallError::TooLarge { len: 20_001, max: 20_000 }));
        let err = client.upload(&echo, Some(20_001)).unwrap_err();
        assert_eq!(err, CallError::TooLarge { len: 20_001, max: 20_000 });
        assert_eq!(client.call(&echo, b"small").unwrap(), b"ok", "{wire:?}");
        daemon.finish();
    }
}

/// Chunks that break the rules lose the link: every call on it gets
/// `Disconnected`, and nothing panics.
#[test]
fn chunks_that_break_the_rules_lose_the_link() {
    type Script = fn(&mut Peer, &[Taken]);
    let cases: [(&str, Script); 4] = [
        ("more than announced", |d, reqs| {
            let h = reqs[0].header;
            d.send(h.service, FLAG_MORE, h.request_id, &[&encode_chunk_prefix(10)[..], &[0; 8]].concat());
            d.send(h.service, 0, h.request_id, &[0; 5]);
        }),
        ("less than announced", |d, reqs| {
            let h = reqs[0].header;
            d.send(h.service, FLAG_MORE, h.request_id, &[&encode_chunk_prefix(10)[..], &[0; 8]].concat());
            d.send(h.service, 0, h.request_id, &[0; 1]);
        }),
        ("more partials than allowed", |d, reqs| {
            for r in reqs {
                let h = r.header;
                d.send(h.service, FLAG_MORE, h.request_id, &encode_chunk_prefix(UNKNOWN_LENGTH));
            }
        }),
        ("a first chunk without its length", |d, reqs| {
            let h = reqs[0].header;
            d.send(h.service, FLAG_MORE, h.request_id, &[1, 2, 3]);
        }),
    ];
    for wire in WIRES {
        for (what, script) in cases {
            let daemon = Scripted::start_on(wire, CAPACITY, move |mut d| {
                let reqs: Vec<Taken> = (0..9).map(|_| d.take()).collect();
                script(&mut d, &reqs);
                // The session stands until the client has seen it all.
                d.await_hang_up();
            });
            let mut client = daemon.client_with(options());
            let echo = client.service("echo").unwrap();
            let tickets: Vec<_> = (0..9).map(|_| client.send(&echo, b"?").unwrap()).collect();
            for t in tickets {
                match client.wait(t) {
                    Err(CallError::Disconnected { reason }) => {
                        assert!(reason.contains("broke the protocol") || reason.contains("chunks"), "{what}: {reason}")
                    }
                    other => panic!("{wire:?}, {what}: ticket {} got {other:?}", t.id()),
                }
            }
            drop(client);
            daemon.finish();
        }
    }
}

/// An upload of known length and one of unknown length: written in odd
/// pieces, sent as chunks that announce what was said, answered once.
#[test]
fn uploads_of_known_and_unknown_length_are_chunked_as_written() {
    const LEN: usize = 100_000;
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            for announced in [LEN as u64, UNKNOWN_LENGTH] {
                let first = d.take();
                assert_eq!(first.header.flags, FLAG_MORE);
                assert_eq!(first.payload[..8], encode_chunk_prefix(announced));
                let mut body = first.payload[8..].to_vec();
                let mut frames = 1;
                loop {
                    let t = d.take();
                    assert_eq!(t.header.request_id, first.header.request_id);
                    body.extend_from_slice(&t.payload);
                    frames += 1;
                    if t.header.flags & FLAG_MORE == 0 {
                        break;
                    }
                }
                assert!(body == pattern(LEN, 9), "the upload's bytes");
                assert!(frames >= LEN / d.max_payload(), "{frames} frames");
                d.send_message(first.header.service, first.header.request_id, &(frames as u64).to_le_bytes());
            }
            // A small upload is one frame.
            let (head, body, frames) = d.take_message();
            assert_eq!((frames, &body[..]), (1, &b"tiny"[..]));
            d.send_message(head.service, head.request_id, b"got it");
        });
        let echo = client.service("echo").unwrap();
        let data = pattern(LEN, 9);
        for len in [Some(LEN as u64), None] {
            let mut upload = client.upload(&echo, len).unwrap();
            for piece in data.chunks(777) {
                upload.write_all(piece).unwrap();
            }
            assert_eq!(upload.written(), LEN as u64);
            let reply = upload.finish().unwrap();
            assert!(u64::from_le_bytes(reply.try_into().unwrap()) > 1, "{wire:?}");
        }
        let mut upload = client.upload(&echo, Some(4)).unwrap();
        upload.write_all(b"tiny").unwrap();
        assert_eq!(upload.finish().unwrap(), b"got it");
        daemon.finish();
    }
}

/// An upload given the wrong length, or dropped, after chunks went out is
/// cancelled (the daemon sees a cancel of its id); the link goes on.
#[test]
fn an_upload_given_the_wrong_length_or_dropped_is_cancelled() {
    for wire in WIRES {
        let (daemon, mut client) = start(wire, |mut d| {
            for _ in 0..2 {
                let first = d.take();
                assert_eq!(first.header.flags, FLAG_MORE, "a first chunk");
                let cancel = loop {
                    let t = d.take();
                    assert_eq!(t.header.request_id, first.header.request_id);
                    if t.header.flags & FLAG_MORE == 0 {
                        break t;
                    }
                };
                assert_eq!((cancel.header.flags, cancel.payload.len()), (FLAG_CANCEL, 0), "a cancel");
            }
            let (head, _, _) = d.take_message();
            d.send_message(head.service, head.request_id, &reply_to(head.request_id));
        });
        let echo = client.service("echo").unwrap();
        let max = client.max_payload();
        let mut upload = client.upload(&echo, Some(3 * max as u64)).unwrap();
        upload.write_all(&pattern(2 * max, 1)).unwrap();
        let err = upload.finish().unwrap_err();
        assert_eq!(err, CallError::UploadLength { announced: 3 * max as u64, written: 2 * max as u64 }, "{wire:?}");
        let mut upload = client.upload(&echo, None).unwrap();
        upload.write_all(&pattern(2 * max, 2)).unwrap();
        drop(upload);
        assert_eq!(client.call(&echo, b"then").unwrap(), reply_to(3), "{wire:?}");
        assert_eq!(client.in_flight(), 0);
        daemon.finish();
    }
}
