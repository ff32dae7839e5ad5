//! The async client against the real daemon, on every transport: many
//! tasks calling through one connection at once; futures dropped after a
//! random number of polls over many seeds (calls, calls into a buffer,
//! receives into a buffer), every other call still given its own reply,
//! a dropped call's buffer left as it was, and no ticket left without an
//! outcome; and the readiness protocol hammered (many tasks, 4 KiB
//! rings, the daemon not spinning) without a hang (the watchdog turns one
//! into a failure).

#[path = "common/async_rig.rs"]
mod async_rig;
#[macro_use]
mod common;

use std::sync::Arc;

use async_rig::{fastrand_like, tiny, with_async, woken, DropAfter};
use common::pattern;
use ipc_client::{AsyncClient, CallError, ClientOptions};

on_every_transport!(
    many_tasks_call_through_one_connection,
    futures_dropped_at_any_poll_leave_no_stray_outcome,
    the_readiness_protocol_survives_a_hammering,
    send_then_wait_and_recv,
    receives_into_a_buffer_dropped_at_any_poll_lose_no_outcome,
);

/// 32 tasks x 50 calls through one cloned handle: each call gets its own
/// request back.
fn many_tasks_call_through_one_connection(name: &'static str) {
    with_async(name, &[], ClientOptions::default(), |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let tasks: Vec<_> = (0..32u64)
            .map(|t| {
                let (client, echo) = (client.clone(), echo.clone());
                tokio::spawn(async move {
                    for i in 0..50u64 {
                        let request = pattern(t * 1000 + i, 1 + (i as usize * 31) % 700);
                        assert_eq!(client.call(&echo, &request).await.unwrap(), request, "task {t} call {i}");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(client.in_flight(), 0);
    });
}

/// Over 20 seeds, 8 tasks each make 40 calls whose futures are dropped
/// after 0 to 3 polls (a random choice per call), half of them `call`,
/// half `call_into` a buffer of the task's: each call that completes
/// gets its own request back (never another's), a dropped `call_into`
/// leaves its buffer holding the reply before, and once all are done no
/// ticket is left in flight; a last call and a receive show nothing
/// stray. A call not done within `WAKE_LIMIT` fails it: a dropped
/// watcher must hand its watch over.
fn futures_dropped_at_any_poll_leave_no_stray_outcome(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let (mut completed, mut dropped) = (0u64, 0u64);
        for seed in 0..20u64 {
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let (client, echo) = (client.clone(), echo.clone());
                    tokio::spawn(async move {
                        let mut rng = fastrand_like(seed * 64 + t);
                        let (mut completed, mut dropped) = (0u64, 0u64);
                        let mut buf = Vec::new();
                        for i in 0..40u64 {
                            let request = pattern(seed << 32 | t << 16 | i, 1 + (rng() % 900) as usize);
                            let polls = (rng() % 4) as u32;
                            if rng() & 1 == 0 {
                                let call = {
                                    let (client, echo, request) = (client.clone(), echo.clone(), request.clone());
                                    async move { client.call(&echo, &request).await }
                                };
                                match woken("call", DropAfter::new(call, polls)).await {
                                    Some(reply) => {
                                        assert_eq!(reply.expect("call"), request, "seed {seed} task {t} call {i}");
                                        completed += 1;
                                    }
                                    None => dropped += 1,
                                }
                                continue;
                            }
                            let before = buf.clone();
                            let call = client.call_into(&echo, &request, &mut buf);
                            let called = woken("call_into", DropAfter::new(call, polls)).await;
                            match called {
                                Some(called) => {
                                    called.expect("call_into");
                                    assert_eq!(buf, request, "seed {seed} task {t} call_into {i}");
                                    completed += 1;
                                }
                                None => {
                                    assert_eq!(buf, before, "seed {seed} task {t}: a dropped call_into wrote");
                                    dropped += 1;
                                }
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
        // The late replies of the dropped calls were dropped, not kept.
        let last = b"the last call".to_vec();
        assert_eq!(client.call(&echo, &last).await.unwrap(), last);
        assert!(matches!(client.recv().await, Err(CallError::NothingInFlight)));
    });
}

/// 64 tasks x 100 calls, 4 KiB rings (room runs out all the time), the
/// daemon and the client not spinning: every wait goes through the
/// doorbell or the socket. A lost wake-up fails it (`WAKE_LIMIT`). Odd tasks call into
/// a buffer they keep, so the connection's spare buffers change hands
/// all the time.
fn the_readiness_protocol_survives_a_hammering(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), |client, _| async move {
        let echo = Arc::new(client.service("echo").await.unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let (client, echo) = (client.clone(), echo.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for i in 0..100u64 {
                        let request = pattern(t << 20 | i, 1 + ((t + i) as usize * 97) % 1800);
                        if t & 1 == 0 {
                            assert_eq!(
                                woken("call", client.call(&echo, &request)).await.unwrap(),
                                request,
                                "task {t} call {i}"
                            );
                        } else {
                            woken("call_into", client.call_into(&echo, &request, &mut buf)).await.unwrap();
                            assert_eq!(buf, request, "task {t} call_into {i}");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(client.in_flight(), 0);
    });
}

/// Pipelining by hand: send a window, wait for some tickets out of
/// order, receive the rest; a ticket of another connection is refused.
fn send_then_wait_and_recv(name: &'static str) {
    with_async(name, &[], ClientOptions::default(), |client, transport| async move {
        let echo = client.service("echo").await.unwrap();
        let mut tickets = Vec::new();
        for i in 0..16u64 {
            tickets.push((client.send(&echo, &pattern(i, 100)).await.unwrap(), i));
        }
        for &(ticket, i) in tickets.iter().rev().take(8) {
            assert_eq!(client.wait(ticket).await.unwrap(), pattern(i, 100));
        }
        let mut rest: Vec<u64> = Vec::new();
        for _ in 0..8 {
            let got = client.recv().await.unwrap();
            let i = tickets.iter().find(|(t, _)| *t == got.ticket).unwrap().1;
            assert_eq!(got.outcome.unwrap(), pattern(i, 100));
            rest.push(i);
        }
        rest.sort();
        assert_eq!(rest, (0..8).collect::<Vec<_>>());
        assert!(matches!(client.recv().await, Err(CallError::NothingInFlight)));
        // A second connection's ticket (its ids start at 1 too) is
        // refused, not matched with this connection's request 1.
        let other = AsyncClient::connect_with(transport, ClientOptions::default()).await.unwrap();
        let other_echo = other.service("echo").await.unwrap();
        let foreign = other.send(&other_echo, b"theirs").await.unwrap();
        assert!(matches!(client.wait(foreign).await, Err(CallError::ForeignTicket { .. })));
        assert!(matches!(client.call(&other_echo, b"x").await, Err(CallError::ForeignService { .. })));
        assert_eq!(other.wait(foreign).await.unwrap(), b"theirs");
    });
}

/// Over 20 seeds: 24 requests sent, some waited for into a buffer
/// (`wait_into`, dropped after 0 to 3 polls: the ticket is given up),
/// the rest received into a buffer (`recv_into`, each dropped after 0 to
/// 3 polls, then received again): every outcome that is not given up is
/// received exactly once, with its own request, and a dropped future
/// leaves the buffer as it was.
fn receives_into_a_buffer_dropped_at_any_poll_lose_no_outcome(name: &'static str) {
    with_async(name, &["--spin-us", "0"], tiny(), |client, _| async move {
        let echo = client.service("echo").await.unwrap();
        let mut buf = Vec::new();
        for seed in 0..20u64 {
            let mut rng = fastrand_like(seed);
            let mut tickets = Vec::new();
            for i in 0..24u64 {
                let request = pattern(seed << 32 | i, 1 + (rng() % 900) as usize);
                tickets.push((client.send(&echo, &request).await.unwrap(), request));
            }
            // A few waited for by ticket, whether or not the wait is dropped.
            for (ticket, request) in tickets.drain(..6) {
                let before = buf.clone();
                let polls = (rng() % 4) as u32;
                let waited = woken("wait_into", DropAfter::new(client.wait_into(ticket, &mut buf), polls)).await;
                match waited {
                    Some(got) => {
                        got.expect("wait_into");
                        assert_eq!(buf, request, "seed {seed}: wait_into");
                    }
                    None => assert_eq!(buf, before, "seed {seed}: a dropped wait_into wrote"),
                }
            }
            while !tickets.is_empty() {
                let before = buf.clone();
                let polls = (rng() % 4) as u32;
                let received = woken("recv_into", DropAfter::new(client.recv_into(&mut buf), polls)).await;
                let Some(got) = received else {
                    assert_eq!(buf, before, "seed {seed}: a dropped recv_into wrote");
                    continue;
                };
                let got = got.expect("recv_into");
                got.outcome.expect("an echo");
                let i = tickets.iter().position(|(t, _)| *t == got.ticket).expect("a ticket of this round");
                // A second outcome for it would find no ticket left.
                let (_, request) = tickets.swap_remove(i);
                assert_eq!(buf, request, "seed {seed}: recv_into of ticket {}", got.ticket.id());
            }
            assert!(matches!(client.recv_into(&mut buf).await, Err(CallError::NothingInFlight)), "seed {seed}");
            assert_eq!(client.in_flight(), 0, "seed {seed}: a ticket left without its outcome handed out");
        }
    });
}
