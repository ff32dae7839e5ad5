//! Messages longer than a frame through the async client
//! (`AsyncClient::call`, `send`) against the real daemon, on every
//! transport: requests and replies below, at, one byte over and far
//! above a frame and the ring (sent and assembled in chunks); many tasks
//! sending long requests through one connection at once (more than a
//! link carries in chunks at a time, so some wait for a lane); calls
//! dropped after a random number of polls, mid-message, over many seeds,
//! every other call still given its own reply, no ticket left without
//! its outcome and the connection still the same session; and the two
//! maximums (the client's `TooLarge`, the daemon's `MessageTooLarge`),
//! after which the connection goes on. Uploads (`AsyncClient::upload`, a
//! `tokio::io::AsyncWrite`) of unknown and announced length, of the
//! wrong length, and dropped half way.

#[path = "common/async_rig.rs"]
mod async_rig;
#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use async_rig::{fastrand_like, tiny, with_async, DropAfter};
use common::pattern;
use ipc_client::{CallError, ClientOptions};
use tokio::io::AsyncWriteExt;

on_every_transport!(
    sizes_below_at_and_far_above_the_ring_come_back_whole,
    many_tasks_send_long_requests_through_one_connection,
    calls_dropped_mid_message_leave_no_stray_outcome,
    past_either_maximum_a_call_fails_alone,
    uploads_are_written_as_async_writes,
);

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// With 4 KiB rings and with the default ones: each size comes back
/// whole, one frame, one byte over, a ring's worth and far beyond it
/// (3 MiB: thousands of chunks in the small ring, several chunks of the
/// longest a chunk may be in the default one).
fn sizes_below_at_and_far_above_the_ring_come_back_whole(name: &'static str) {
    for options in [tiny(), ClientOptions::default()] {
        with_async(name, &[], options, move |client, _| async move {
            let echo = client.service("echo").await.unwrap();
            let max = client.with_client(|c| c.max_payload());
            for (i, len) in
                [0, 1, max - 1, max, max + 1, 4 * KIB, 2 * max + 7, 64 * KIB, 3 * MIB].into_iter().enumerate()
            {
                let request = pattern(i as u64, len);
                let reply = client.call(&echo, &request).await.unwrap_or_else(|e| panic!("{name}: {len} bytes: {e}"));
                assert!(reply == request, "{name}: {len} bytes came back as {} other bytes", reply.len());
            }
            // By hand: sent whole in chunks before the ticket, then waited.
            let request = pattern(99, 5 * max);
            let ticket = client.send(&echo, &request).await.unwrap();
            assert_eq!(client.wait(ticket).await.unwrap(), request, "{name}");
            assert_eq!(client.in_flight(), 0, "{name}");
            assert_eq!(client.with_client(|c| c.reconnects()), 0, "{name}");
        });
    }
}

/// 16 tasks (four times the lanes of a link) x 12 calls, long and short
/// mixed, through one connection with 4 KiB rings and no spinning: each
/// gets its own request back.
fn many_tasks_send_long_requests_through_one_connection(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), move |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let max = client.with_client(|c| c.max_payload());
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let (client, echo) = (client.clone(), echo.clone());
                tokio::spawn(async move {
                    for i in 0..12u64 {
                        let len = match (t + i) % 4 {
                            0 => 100,
                            1 => max + 1,
                            2 => 9 * max + 3,
                            _ => 40 * KIB,
                        };
                        let request = pattern(t << 20 | i, len);
                        let reply =
                            client.call(&echo, &request).await.unwrap_or_else(|e| panic!("task {t} call {i}: {e}"));
                        assert!(reply == request, "task {t} call {i}: {len} bytes came back as {}", reply.len());
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(client.in_flight(), 0);
        assert!(client.with_client(|c| c.is_connected()), "{name}: the daemon cut the session off");
    });
}

/// Over 16 seeds, 8 tasks each make 12 calls of up to 20 frames whose
/// futures are dropped after 0 to 29 polls (a random choice per call):
/// many drops fall mid-message, with chunks of the request out and of its
/// reply in. Each call that completes gets its own request back; once
/// all are done no ticket is left in flight; a last call, a receive and
/// the reconnection count show nothing stray and the same session.
fn calls_dropped_mid_message_leave_no_stray_outcome(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), move |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let max = client.with_client(|c| c.max_payload()) as u64;
        let (mut completed, mut dropped) = (0u64, 0u64);
        for seed in 0..16u64 {
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let (client, echo) = (client.clone(), echo.clone());
                    tokio::spawn(async move {
                        let mut rng = fastrand_like(seed * 64 + t + 1);
                        let (mut completed, mut dropped) = (0u64, 0u64);
                        for i in 0..12u64 {
                            let len = 1 + (rng() % (20 * max)) as usize;
                            let request = pattern(seed << 32 | t << 16 | i, len);
                            let polls = (rng() % 30) as u32;
                            let call = {
                                let (client, echo, request) = (client.clone(), echo.clone(), request.clone());
                                async move { client.call(&echo, &request).await }
                            };
                            match DropAfter::new(call, polls).await {
                                Some(reply) => {
                                    let reply = reply.unwrap_or_else(|e| panic!("seed {seed} task {t} call {i}: {e}"));
                                    assert!(reply == request, "seed {seed} task {t} call {i}: another reply");
                                    completed += 1;
                                }
                                None => dropped += 1,
                            }
                        }
                        (completed, dropped)
                    })
                })
                .collect();
            for task in tasks {
                let (c, d) = task.await.unwrap();
                completed += c;
                dropped += d;
            }
            assert_eq!(client.in_flight(), 0, "seed {seed}: a ticket left without its outcome handed out");
        }
        assert!(completed > 0 && dropped > 0, "{completed} completed, {dropped} dropped: both must happen");
        // The cancelled requests' answers were dropped, not kept, and the
        // daemon never cut the session off.
        let last = pattern(7, 3 * max as usize);
        assert_eq!(client.call(&echo, &last).await.unwrap(), last);
        assert!(matches!(client.recv().await, Err(CallError::NothingInFlight)));
        assert_eq!(client.with_client(|c| c.reconnects()), 0);
        assert!(client.with_client(|c| c.is_connected()));
    });
}

/// A request past the client's `max_message` is `TooLarge`, not sent; one
/// past the daemon's `--max-message` is `MessageTooLarge` (refused after
/// its first chunk: the rest is cancelled); a call after each works.
fn past_either_maximum_a_call_fails_alone(name: &'static str) {
    let options = ClientOptions::default().max_message(2 * MIB as u64).call_timeout(Duration::from_secs(60));
    with_async(name, &["--max-message", "1M"], options, move |client, _| async move {
        let echo = client.service("echo").await.unwrap();
        let over_mine = pattern(1, 2 * MIB + 1);
        assert!(
            matches!(client.call(&echo, &over_mine).await, Err(CallError::TooLarge { .. })),
            "{name}: past the client's maximum"
        );
        let over_theirs = pattern(2, MIB + 1);
        match client.call(&echo, &over_theirs).await {
            Err(CallError::MessageTooLarge { .. }) => {}
            other => panic!("{name}: past the daemon's maximum: {:?}", other.map(|r| r.len())),
        }
        let fits = pattern(3, MIB);
        assert_eq!(client.call(&echo, &fits).await.unwrap(), fits, "{name}");
        assert_eq!(client.call(&echo, b"after").await.unwrap(), b"after", "{name}");
        assert_eq!(client.in_flight(), 0, "{name}");
    });
}

/// Uploads through 4 KiB rings, the echo sending each back: of unknown
/// length, written in uneven pieces, while other tasks call; of an
/// announced length; one that fits a frame; one written past its length
/// and one finished short of it (`UploadLength`, cancelled); one dropped
/// half way (cancelled). The connection goes on, nothing left in flight.
fn uploads_are_written_as_async_writes(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), move |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let max = client.with_client(|c| c.max_payload());
        let callers: Vec<_> = (0..4u64)
            .map(|t| {
                let (client, echo) = (client.clone(), echo.clone());
                tokio::spawn(async move {
                    for i in 0..20u64 {
                        let request = pattern(t << 16 | i, 1 + (i as usize * 131) % (3 * max));
                        assert_eq!(client.call(&echo, &request).await.unwrap(), request, "task {t} call {i}");
                    }
                })
            })
            .collect();
        let body = pattern(1, 200 * KIB + 3);
        let mut upload = client.upload(&echo, None).unwrap();
        for piece in body.chunks(7 * KIB + 1) {
            upload.write_all(piece).await.unwrap();
        }
        assert_eq!(upload.written(), body.len() as u64);
        assert!(upload.ticket().is_some(), "{name}: chunks went out as it was written");
        assert!(upload.finish().await.unwrap() == body, "{name}: unknown length");

        let mut upload = client.upload(&echo, Some(body.len() as u64)).unwrap();
        upload.write_all(&body).await.unwrap();
        assert!(upload.finish().await.unwrap() == body, "{name}: announced length");

        let mut upload = client.upload(&echo, None).unwrap();
        upload.write_all(b"one frame").await.unwrap();
        assert!(upload.ticket().is_none(), "{name}: nothing sent before the finish");
        assert_eq!(upload.finish().await.unwrap(), b"one frame", "{name}");

        let mut upload = client.upload(&echo, Some(10 * max as u64)).unwrap();
        upload.write_all(&body[..5 * max]).await.unwrap();
        let past = upload.write_all(&body[..6 * max]).await.unwrap_err();
        let past = past.get_ref().and_then(|e| e.downcast_ref::<CallError>()).cloned();
        assert!(matches!(past, Some(CallError::UploadLength { .. })), "{name}: {past:?}");
        assert!(matches!(upload.finish().await, Err(CallError::UploadLength { .. })), "{name}");

        let mut upload = client.upload(&echo, Some(10 * max as u64)).unwrap();
        upload.write_all(&body[..5 * max]).await.unwrap();
        assert!(matches!(upload.finish().await, Err(CallError::UploadLength { .. })), "{name}: short");

        let mut upload = client.upload(&echo, None).unwrap();
        upload.write_all(&body[..6 * max]).await.unwrap();
        assert!(upload.ticket().is_some(), "{name}");
        drop(upload);

        for task in callers {
            task.await.unwrap();
        }
        assert_eq!(client.call(&echo, &body).await.unwrap(), body, "{name}: after");
        assert_eq!(client.in_flight(), 0, "{name}");
        assert_eq!(client.with_client(|c| c.reconnects()), 0, "{name}");
    });
}
