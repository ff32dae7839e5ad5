//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same functions the fuzz targets call, on stable and in every test run:
//! the seeds, and every input fuzzing found worth keeping, stay passing.
#![cfg(not(loom))]

use std::fs;
use std::path::Path;

use ipc_core::fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut replayed = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let input = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // The panic's own message is printed by the hook; name the input.
        if std::panic::catch_unwind(|| run(&input)).is_err() {
            panic!("{target} fails on {}", path.display());
        }
        replayed += 1;
    }
    assert!(replayed > 0, "the {target} corpus in {} is empty", dir.display());
}

#[test]
fn frame_decoder_corpus_passes() {
    replay("frame_decoder", fuzzing::frame_decoder);
}

#[test]
fn handshake_decoder_corpus_passes() {
    replay("handshake_decoder", fuzzing::handshake_decoder);
}

#[test]
fn message_assembler_corpus_passes() {
    replay("message_assembler", fuzzing::message_assembler);
}

#[test]
fn ring_consumer_corpus_passes() {
    replay("ring_consumer", fuzzing::ring_consumer);
}

/// Writes the hand-made seeds (`seed-*`) into the corpus directories:
/// `cargo test -p ipc-core --test fuzz_corpus -- --ignored write_seeds`.
/// Inputs fuzzing found are kept beside them, minimized (`cargo fuzz cmin`).
#[test]
#[ignore = "writes the seed files; run by hand after changing an input format"]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, seeds) in [
        ("frame_decoder", seeds::frames()),
        ("handshake_decoder", seeds::handshakes()),
        ("ring_consumer", seeds::rings()),
        ("message_assembler", seeds::messages()),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}

/// Valid and edge-case inputs for each target, built with the real encoders
/// and the real producer.
mod seeds {
    use ipc_core::handshake::{encode, HELLO_MAGIC};
    use ipc_core::sync::Ordering;
    use ipc_core::{
        encode_error, Direction, DoorbellKind, ErrorCode, FrameHeader, HeapMemory, Hello, Index, Region, Reject,
        Segment, SegmentLayout, ServerMessage, ServiceEntry, Welcome, FLAG_ERROR, PROTOCOL_VERSION,
    };

    type Seeds = Vec<(&'static str, Vec<u8>)>;

    fn frame(service: u16, flags: u16, request_id: u64, payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader { len: payload.len() as u32, service, flags, request_id };
        [&header.encode()[..], payload].concat()
    }

    /// A stream: the maximum payload (2 bytes), then frames.
    fn stream(max: u16, frames: &[Vec<u8>]) -> Vec<u8> {
        [&max.to_le_bytes()[..], &frames.concat()].concat()
    }

    pub fn frames() -> Seeds {
        let mut error = Vec::new();
        encode_error(ErrorCode::UnknownService, "no service has id 9", &mut error);
        let mut application = Vec::new();
        encode_error(ErrorCode::Application(404), "no such key", &mut application);
        let mut truncated = frame(1, 0, 1, &[7; 100]);
        truncated.truncate(60);
        vec![
            ("one-request", stream(2032, &[frame(1, 0, 1, b"ping")])),
            ("requests-back-to-back", stream(2032, &[frame(1, 0, 1, b""), frame(2, 0, 2, &[0xAB; 37])])),
            ("error-reply", stream(2032, &[frame(1, FLAG_ERROR, 1, &error)])),
            ("error-reply-short-body", stream(2032, &[frame(1, FLAG_ERROR, 1, &[3, 0])])),
            ("error-reply-bad-utf8", stream(2032, &[frame(1, FLAG_ERROR, 1, &[2, 0, 0, 0, 0xff, 0xc3])])),
            ("error-reply-application-code", stream(2032, &[frame(1, FLAG_ERROR, 1, &application)])),
            ("error-reply-application-short", stream(2032, &[frame(1, FLAG_ERROR, 1, &[6, 0, 0, 0, 1, 2])])),
            ("unknown-flags", stream(2032, &[frame(1, 0x8000, 1, b"x")])),
            ("over-the-maximum", stream(16, &[frame(1, 0, 1, &[0; 17])])),
            ("truncated-payload", stream(2032, &[truncated])),
            ("length-u32-max", stream(u16::MAX, &[[&u32::MAX.to_le_bytes()[..], &[0; 12]].concat()])),
        ]
    }

    fn framed<T: serde::Serialize>(message: &T) -> Vec<u8> {
        encode(message).unwrap()
    }

    pub fn handshakes() -> Seeds {
        let welcome = ServerMessage::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            session_id: 7,
            ring_capacity: 65536,
            max_payload: 32752,
            doorbell: DoorbellKind::Pollable,
            services: vec![ServiceEntry { name: "echo".into(), id: 0 }, ServiceEntry { name: "kv.get".into(), id: 1 }],
        });
        let mut other_version = Hello::new(4096, DoorbellKind::Futex);
        other_version.version = PROTOCOL_VERSION + 1;
        let mut trailing = framed(&Hello::new(4096, DoorbellKind::Futex));
        trailing.push(0);
        let mut bad_kind = framed(&Hello::new(4096, DoorbellKind::Futex));
        *bad_kind.last_mut().unwrap() = 2;
        let mut huge_vec = framed(&welcome);
        // The services' count, after the prefix and the variant, version,
        // session, capacity, maximum and doorbell (4 + 4 + 8 + 4 + 4 + 4).
        huge_vec[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let rejects = [
            Reject::VersionMismatch { daemon: 1, client: 2 },
            Reject::TooManyClients { max: 64 },
            Reject::NotPermitted { reason: "uid 1000 is not allowed".into() },
            Reject::BadHello { reason: "hello magic 0x00000000 is wrong".into() },
            Reject::ResourceExhausted { reason: "memfd: no space".into() },
            Reject::ShuttingDown,
        ];
        let mut seeds = vec![
            ("hello-futex", framed(&Hello::new(4096, DoorbellKind::Futex))),
            ("hello-pollable", framed(&Hello::new(1 << 20, DoorbellKind::Pollable))),
            ("hello-other-version", framed(&other_version)),
            ("hello-bad-magic", [&16u32.to_le_bytes()[..], b"GET / HTTP/1.1\r\n"].concat()),
            ("hello-short", [&4u32.to_le_bytes()[..], &HELLO_MAGIC.to_le_bytes()[..]].concat()),
            ("hello-trailing-byte", trailing),
            ("hello-bad-doorbell", bad_kind),
            ("prefix-too-long", u32::MAX.to_le_bytes().to_vec()),
            ("welcome", framed(&welcome)),
            ("welcome-huge-service-count", huge_vec),
        ];
        let names = ["reject-version", "reject-too-many", "reject-permission", "reject-bad-hello", "reject-resources"];
        for (name, reject) in names.into_iter().chain(["reject-shutdown"]).zip(rejects) {
            seeds.push((name, framed(&ServerMessage::Reject(reject))));
        }
        seeds
    }

    /// A ring input (see `ipc_core::fuzzing::ring_consumer`): the real
    /// producer pushes frames of `lens` payload bytes and publishes every
    /// `per_round`; each round carries the published index and the ring
    /// bytes written since the last round, and the consumer drains it.
    fn ring(choices: u8, lens: &[usize], per_round: usize) -> Vec<u8> {
        let ipc_core::fuzzing::RingChoices { direction, capacity, .. } =
            ipc_core::fuzzing::RingChoices::from_byte(choices);
        let layout = SegmentLayout::new(capacity).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        let segment = Segment::new(region, &layout);
        let words = segment.words;
        let (mut tx, mut rx) = match direction {
            Direction::Request => (segment.request_producer, segment.request_consumer),
            Direction::Response => (segment.response_producer, segment.response_consumer),
        };

        let mut input = vec![choices];
        input.extend_from_slice(&ipc_core::fuzzing::segment_header(&layout));
        let (mut from, mut ids, mut out) = (0u64, 0u64, Vec::new());
        for round in lens.chunks(per_round) {
            for &len in round {
                ids += 1;
                tx.try_push(1, 0, ids, &vec![ids as u8; len]).expect("the seed fits");
            }
            tx.publish();
            let head = words.index(direction, Index::Head).load(Ordering::Relaxed);
            let bytes: Vec<u8> = (from..head)
                .map(|i| {
                    let mut byte = [0u8];
                    words.read_data(direction, (i % u64::from(capacity)) as usize, &mut byte);
                    byte[0]
                })
                .collect();
            input.extend_from_slice(&head.to_le_bytes());
            input.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            input.extend_from_slice(&bytes);
            while rx.try_pop(&mut out).unwrap().is_some() {}
            rx.release();
            from = head;
        }
        input
    }

    /// Frames for `ipc_core::fuzzing::message_assembler`: `flags`, `id`,
    /// `len`, then the payload.
    fn message_frame(more: bool, id: u8, payload: &[u8]) -> Vec<u8> {
        [&[u8::from(more), id, payload.len() as u8][..], payload].concat()
    }

    pub fn messages() -> Seeds {
        let prefix = |total: u64| total.to_le_bytes().to_vec();
        let max = 16u16.to_le_bytes().to_vec();
        vec![
            ("single-frames", [max.clone(), message_frame(false, 1, b"one"), message_frame(false, 2, b"")].concat()),
            (
                "interleaved-chunks",
                [
                    max.clone(),
                    message_frame(true, 1, &[prefix(6), b"ab".to_vec()].concat()),
                    message_frame(true, 2, &[prefix(u64::MAX), b"x".to_vec()].concat()),
                    message_frame(true, 1, b"cd"),
                    message_frame(false, 2, b"yz"),
                    message_frame(false, 1, b"ef"),
                ]
                .concat(),
            ),
            ("over-length", [max.clone(), message_frame(true, 3, &[prefix(2), b"abc".to_vec()].concat())].concat()),
            (
                "stream-open",
                [max, message_frame(false, 4, &[16u32.to_le_bytes(), 0u32.to_le_bytes()].concat())].concat(),
            ),
        ]
    }

    pub fn rings() -> Seeds {
        vec![
            ("request-three-frames", ring(0, &[4, 0, 100], 3)),
            ("request-rounds-wrap-with-pads", ring(0, &[1000, 1000, 1000, 700, 1500, 2032, 8, 300], 2)),
            ("response-8k-in-place-wraps", ring(0b110 | 1, &[3000, 3000, 2500, 4000, 16, 2040], 1)),
            ("request-eight-byte-remnant", ring(0, &[2024, 2032, 100, 0], 2)),
            ("response-empty-rounds", ring(1, &[0, 0, 0], 1)),
            ("no-header", vec![0]),
        ]
    }
}
