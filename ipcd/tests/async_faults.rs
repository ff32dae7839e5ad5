//! The daemon's faults under async load, on every transport: 24 tasks
//! call through the async client, long requests (in chunks) among short
//! ones, through one shared connection or a connection each, while the
//! daemon is killed (SIGKILL), killed and restarted in its directory
//! under a reconnect policy, or stopped (SIGTERM). Every call ends once,
//! with its own reply or an explicit error of the fault (`Disconnected`
//! or `NotConnected` for a kill, `Shutdown` for a stop; under a reconnect
//! policy only the call a kill caught fails, and later calls wait for
//! the daemon to be back), none hangs (the
//! watchdog turns one into a failure; the tasks wait on conditions, never
//! on sleeps), no ticket is left in flight, and after a restart every
//! task's calls are answered again on the same handles.

#[path = "common/async_rig.rs"]
mod async_rig;
#[macro_use]
mod common;

use async_rig::runtime;
use common::{pattern, poll_until, start_with_streams, watchdog, Daemon, Endpoints, STARTUP_LIMIT, TEST_LIMIT};
use ipc_client::{AsyncClient, CallError, ClientOptions, Reconnect, Service, Transport};
use tokio::sync::{mpsc, watch};

on_every_transport!(
    sigkill_under_async_load_ends_every_call_once,
    a_restart_under_async_load_is_survived_with_a_reconnect_policy,
    sigterm_under_async_load_ends_every_call_with_its_reply_or_shutdown,
    a_call_made_while_the_daemon_is_down_waits_for_it_with_a_reconnect_policy,
);

/// Tasks calling at once.
const TASKS: u64 = 24;
/// Calls each task gets answered after a restart.
const AFTER_RESTART: u64 = 5;

/// How the tasks reach the daemon.
#[derive(Clone, Copy, Debug)]
enum Sharing {
    /// One connection, cloned into every task.
    Shared,
    /// A connection per task.
    PerTask,
}

/// The fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Restart,
    Stop,
}

/// What one task saw.
#[derive(Debug, Default)]
struct Tally {
    replied: u64,
    /// Replies after the restart.
    again: u64,
    /// Every error, in order.
    errors: Vec<CallError>,
    /// Its handle's count of outcomes not handed out, once every task
    /// is done.
    in_flight: usize,
    reconnects: u64,
}

/// Whether `e` is an outcome `fault` may give a call.
fn explicit(fault: Fault, e: &CallError) -> bool {
    match fault {
        Fault::Kill | Fault::Restart => matches!(e, CallError::Disconnected { .. } | CallError::NotConnected { .. }),
        Fault::Stop => matches!(e, CallError::Shutdown),
    }
}

/// Task `t`'s `i`th request: every fifth longer than a frame.
fn request(t: u64, i: u64, max: usize) -> Vec<u8> {
    let len = if i % 5 == 4 { 3 * max + 1 } else { 1 + (i as usize * 37) % 600 };
    pattern(t << 32 | i, len)
}

/// One task: calls until the fault ends a call; after a kill or a stop,
/// one more call, which must fail at once; after a restart, waits for it
/// (`restarted`) and calls until [`AFTER_RESTART`] are answered. Says on
/// `first` when its first reply came.
async fn caller(
    t: u64,
    client: AsyncClient,
    echo: Service,
    fault: Fault,
    first: mpsc::UnboundedSender<()>,
    mut restarted: watch::Receiver<bool>,
) -> Tally {
    let max = client.with_client(|c| c.max_payload());
    let mut tally = Tally::default();
    for i in 0.. {
        let sent = request(t, i, max);
        // Made once the daemon is back (or was never killed).
        let after_restart = *restarted.borrow();
        match client.call(&echo, &sent).await {
            Ok(reply) => {
                assert!(reply == sent, "task {t} call {i}: another reply ({} bytes for {})", reply.len(), sent.len());
                tally.replied += 1;
                if tally.replied == 1 {
                    first.send(()).expect("the test waits");
                }
                if fault == Fault::Restart && after_restart {
                    tally.again += 1;
                    if tally.again == AFTER_RESTART {
                        break;
                    }
                }
            }
            Err(e) => {
                assert!(explicit(fault, &e), "task {t} call {i}: {e:?} after {fault:?}");
                tally.errors.push(e);
                match fault {
                    // Down: no call can be answered until it is back.
                    Fault::Restart => {
                        restarted.wait_for(|&up| up).await.expect("the test restarts it");
                    }
                    _ if tally.errors.len() == 2 => break,
                    _ => {}
                }
            }
        }
    }
    tally
}

/// Runs [`caller`] in [`TASKS`] tasks over `name` with `sharing`, brings
/// `fault` on once every task has had a reply, and checks what each saw.
fn under_fault(name: &'static str, sharing: Sharing, fault: Fault) {
    let (daemon, ends) = start_with_streams(&["--workers", "2"]);
    let transport: Transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let mut daemon = Some(daemon);
        let mut options = ClientOptions::default();
        if fault == Fault::Restart {
            options = options.reconnect(Reconnect::default());
        }
        let rt = runtime();
        let tallies = rt.block_on(async move {
            let shared = AsyncClient::connect_with(transport.clone(), options.clone()).await.expect("connect");
            let (first_tx, mut first_rx) = mpsc::unbounded_channel();
            let (up_tx, up_rx) = watch::channel(false);
            let mut tasks = Vec::new();
            for t in 0..TASKS {
                let client = match sharing {
                    Sharing::Shared => shared.clone(),
                    Sharing::PerTask => {
                        AsyncClient::connect_with(transport.clone(), options.clone()).await.expect("connect")
                    }
                };
                let echo = client.service("echo").await.expect("echo");
                let task = tokio::spawn(caller(t, client.clone(), echo, fault, first_tx.clone(), up_rx.clone()));
                tasks.push((task, client));
            }
            for _ in 0..TASKS {
                first_rx.recv().await.expect("every task has a reply");
            }
            let mut d = daemon.take().expect("started");
            match fault {
                Fault::Kill => {
                    tokio::task::block_in_place(|| d.kill());
                }
                Fault::Stop => {
                    let status = tokio::task::block_in_place(|| d.terminate());
                    assert!(status.success(), "ipcd exited with {status}; stderr:\n{}", d.stderr());
                }
                Fault::Restart => {
                    let second = tokio::task::block_in_place(|| restart(d, &ends));
                    up_tx.send(true).expect("the tasks wait");
                    daemon = Some(second);
                }
            }
            let mut tallies = Vec::new();
            for (task, _) in &mut tasks {
                tallies.push(task.await.expect("a task panicked"));
            }
            for ((_, client), tally) in tasks.iter().zip(&mut tallies) {
                tally.in_flight = client.in_flight();
                tally.reconnects = client.with_client(|c| c.reconnects());
            }
            drop(daemon);
            tallies
        });
        let label = format!("{name}, {sharing:?}, {fault:?}");
        for (t, tally) in tallies.iter().enumerate() {
            assert!(tally.replied > 0, "{label}: task {t} had no reply: {tally:?}");
            // Under a reconnect policy a call made while the daemon is
            // down waits for it: only a call the kill caught fails.
            if fault != Fault::Restart {
                assert!(!tally.errors.is_empty(), "{label}: task {t} never saw the fault: {tally:?}");
            }
            assert_eq!(tally.in_flight, 0, "{label}: task {t} left outcomes: {tally:?}");
            match fault {
                Fault::Restart => {
                    assert!(
                        tally.errors.len() <= 1,
                        "{label}: task {t}: a call failed but the one the kill caught: {tally:?}"
                    );
                    assert_eq!(tally.again, AFTER_RESTART, "{label}: task {t}: {tally:?}");
                    assert_eq!(tally.reconnects, 1, "{label}: task {t}: {tally:?}");
                }
                // The call after the one the fault ended was refused, not sent.
                Fault::Kill => {
                    assert!(matches!(tally.errors[1], CallError::NotConnected { .. }), "{label}: task {t}: {tally:?}")
                }
                Fault::Stop => {}
            }
        }
    });
}

/// Starts a daemon in the directory of the killed `first`, with its
/// listeners, and waits until it listens on all of them.
fn restart(first: Daemon, ends: &Endpoints) -> Daemon {
    let mut second = Daemon::builder().dir(first.into_dir()).args(restart_args(&ends.uds, ends.tcp)).start();
    // Its stream listeners are bound after the control socket.
    let up = poll_until(STARTUP_LIMIT, || {
        !second.is_running()
            || (std::os::unix::net::UnixStream::connect(&ends.uds).is_ok()
                && std::net::TcpStream::connect(ends.tcp).is_ok())
    });
    assert!(up && second.is_running(), "the second ipcd did not listen:\n{}", second.stderr());
    second
}

/// The listeners of the daemon restarted in place of the first: its
/// `--uds` socket (in the same directory) and its `--tcp` address.
fn restart_args(uds: &std::path::Path, tcp: std::net::SocketAddr) -> Vec<String> {
    vec!["--workers".into(), "2".into(), "--uds".into(), uds.display().to_string(), "--tcp".into(), tcp.to_string()]
}

fn sigkill_under_async_load_ends_every_call_once(name: &'static str) {
    under_fault(name, Sharing::Shared, Fault::Kill);
    under_fault(name, Sharing::PerTask, Fault::Kill);
}

fn a_restart_under_async_load_is_survived_with_a_reconnect_policy(name: &'static str) {
    under_fault(name, Sharing::Shared, Fault::Restart);
    under_fault(name, Sharing::PerTask, Fault::Restart);
}

fn sigterm_under_async_load_ends_every_call_with_its_reply_or_shutdown(name: &'static str) {
    under_fault(name, Sharing::Shared, Fault::Stop);
    under_fault(name, Sharing::PerTask, Fault::Stop);
}

/// With a reconnect policy, a call made while the daemon is down waits
/// for it (connecting again off the runtime's threads, with the policy's
/// pauses), up to its call timeout, rather than failing at once: the one
/// call the kill caught ends in an error, and every call after it, made
/// at once, is answered once the daemon is back.
fn a_call_made_while_the_daemon_is_down_waits_for_it_with_a_reconnect_policy(name: &'static str) {
    let (daemon, ends) = start_with_streams(&["--workers", "2"]);
    let transport: Transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let rt = runtime();
        rt.block_on(async move {
            let options = ClientOptions::default().reconnect(Reconnect::default());
            let client = AsyncClient::connect_with(transport, options).await.expect("connect");
            let echo = client.service("echo").await.expect("echo");
            assert_eq!(client.call(&echo, b"before").await.expect("a call before the kill"), b"before");
            let mut d = daemon;
            tokio::task::block_in_place(|| d.kill());
            let (error_tx, mut error_rx) = mpsc::unbounded_channel();
            let calls = tokio::spawn({
                let client = client.clone();
                async move {
                    let (mut errors, mut replies) = (Vec::new(), 0);
                    for i in 0u64.. {
                        let sent = pattern(i, 64);
                        match client.call(&echo, &sent).await {
                            Ok(reply) => {
                                assert!(reply == sent, "call {i}: another reply");
                                replies += 1;
                                if replies == AFTER_RESTART {
                                    break;
                                }
                            }
                            Err(e) => {
                                errors.push(e);
                                error_tx.send(()).expect("the test waits");
                            }
                        }
                    }
                    errors
                }
            });
            // The call the kill caught has ended; the next one is made at
            // once, while the daemon is still down.
            error_rx.recv().await.expect("the call the kill caught ends in an error");
            let second = tokio::task::block_in_place(|| restart(d, &ends));
            let errors = calls.await.expect("the calling task panicked");
            assert_eq!(errors.len(), 1, "{name}: only the call the kill caught may fail: {errors:?}");
            assert!(explicit(Fault::Kill, &errors[0]), "{name}: {errors:?}");
            assert_eq!(client.with_client(|c| c.reconnects()), 1, "{name}");
            drop(second);
        });
    });
}
