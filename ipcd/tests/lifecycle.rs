//! The daemon's and its clients' lives: a client process killed mid-session,
//! SIGTERM and SIGINT with calls in flight (every call gets exactly one
//! outcome), the daemon killed under a client and restarted, and who owns
//! the socket path.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{
    blocked_in_syscall, die_with_parent, expect_worker_in_handler, fd_count, ipcd_command, join_within, json_u64,
    mapping_count, pattern, poll_until, sleeping_syscalls, stat_eventually, stats_json, watchdog, Daemon,
    CLEANUP_LIMIT, EXIT_LIMIT, HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::{CallError, Client, ClientOptions, ConnectError, DoorbellKind, Received, Reconnect, Ticket};
use nix::sys::signal::Signal;

/// Set in the environment of the helper process to the socket it uses.
const HELPER_SOCKET_ENV: &str = "IPCD_TEST_HELPER_SOCKET";
/// The helper "test" that the test binary re-runs as a client process.
const HELPER_NAME: &str = "helper_client_loops_on_echo";
/// What the helper prints once its session works.
const HELPER_READY: &str = "IPCD-HELPER-READY";
/// The name the daemon gives its segments, as seen in /proc/<pid>/maps.
const SEGMENT_NAME: &str = "ipcd-session";

/// Not a test: the client process of `killed_client_process_is_cleaned_up`,
/// which runs this binary again with only this function selected. It
/// connects, prints [`HELPER_READY`], and calls echo until it is killed.
#[test]
#[ignore = "helper process for killed_client_process_is_cleaned_up; does nothing when run directly"]
fn helper_client_loops_on_echo() {
    let Some(socket) = std::env::var_os(HELPER_SOCKET_ENV) else {
        return;
    };
    let mut client = Client::connect_to(&socket).expect("helper cannot connect");
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"first").unwrap(), b"first");
    println!("{HELPER_READY}");
    std::io::stdout().flush().unwrap();
    let mut reply = Vec::new();
    for i in 0.. {
        let request = pattern(i, 64);
        // The daemon going away ends the helper; nothing else should.
        if client.call_into(&echo, &request, &mut reply).is_err() {
            return;
        }
        assert_eq!(reply, request);
    }
}

/// Starts the helper client process against `socket` and waits until it
/// has a working session.
fn spawn_helper_client(socket: &std::path::Path) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([HELPER_NAME, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(HELPER_SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("cannot re-run the test binary");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // Read in a thread so a helper that never gets ready cannot hang us.
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                // libtest prints the test's name without a line break
                // before running it, so the marker ends a line.
                Ok(l) if l.trim_end().ends_with(HELPER_READY) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the helper client never reported it was ready");
    }
    child
}

#[test]
fn killed_client_process_is_cleaned_up() {
    // Without ready segments, every segment mapped is a session's, and the
    // fds counted are the sessions' alone.
    let daemon = Daemon::start(&["--segment-pool", "0"]);
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        // One observer stays connected throughout to read the stats, so
        // every count below includes its session and nothing else.
        let mut observer = Client::connect_to(&socket).unwrap();
        let connected = |observer: &mut Client| json_u64(&stats_json(observer), "connected_clients");

        // A first session opens whatever the daemon opens lazily.
        {
            let mut warm_up = Client::connect_to(&socket).unwrap();
            let echo = warm_up.service("echo").unwrap();
            warm_up.call(&echo, b"warm").unwrap();
        }
        assert!(poll_until(CLEANUP_LIMIT, || connected(&mut observer) == 1), "warm-up client not cleaned up");
        // The count drops just before the session's fds are closed, so wait
        // for the fd count to settle too.
        let baseline_fds = common::settled_fd_count(pid);
        let baseline_maps = mapping_count(pid, SEGMENT_NAME);
        assert_eq!(baseline_maps, 1, "only the observer's segment is mapped");

        let mut helper = spawn_helper_client(&socket);
        assert_eq!(connected(&mut observer), 2);
        // A session holds at least its control socket and doorbell.
        assert!(fd_count(pid) >= baseline_fds + 2, "the helper's session holds no fds?");
        assert_eq!(mapping_count(pid, SEGMENT_NAME), 2);

        helper.kill().unwrap();
        let status = helper.wait().unwrap();
        assert!(!status.success(), "the helper was killed, not finished: {status}");

        // Clean-up is asynchronous; the assertions after the wait report
        // the values found if it never completes.
        poll_until(CLEANUP_LIMIT, || {
            fd_count(pid) == baseline_fds && mapping_count(pid, SEGMENT_NAME) == baseline_maps
        });
        assert_eq!(fd_count(pid), baseline_fds, "fds of the killed client's session were not closed");
        assert_eq!(mapping_count(pid, SEGMENT_NAME), baseline_maps, "its segment is still mapped");
        // Only the observer is left.
        let (hang_ups, json) = stat_eventually(&mut observer, "client_hangup", |n| n >= 2);
        assert!(hang_ups >= 2, "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 1, "{json}");
    });
}

#[test]
fn sigterm_fails_blocked_calls_and_removes_the_socket() {
    let mut daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
    let socket = daemon.socket().to_path_buf();
    let mut a = daemon.client();
    let mut b = daemon.client();
    // Both sessions are adopted and parked before the race below begins,
    // so B's request can only be seen after A's handler returns.
    let a_ping = a.service("ping").unwrap();
    let b_ping = b.service("ping").unwrap();
    a.call(&a_ping, b"").unwrap();
    b.call(&b_ping, b"").unwrap();

    // A's handler runs long enough for the daemon to notice the stop
    // while it runs, even on a loaded machine.
    let sleep = a.service("debug.sleep").unwrap();
    let a_call = thread::spawn(move || a.call(&sleep, &3000u32.to_le_bytes()));
    expect_worker_in_handler(daemon.pid());
    // B's request is in its ring (published, the daemon rung if it waits)
    // before the signal, and the only worker is busy with A's: it is still
    // there, untaken, when the worker stops.
    let echo = b.service("echo").unwrap();
    let b_ticket = b.send(&echo, b"queued behind a sleeper").unwrap();
    b.flush().unwrap();

    let status = daemon.terminate();
    assert!(status.success(), "ipcd exited with {status}; stderr:\n{}", daemon.stderr());
    // B's request was never executed, and the daemon said so (a shutdown
    // error in its place), so it ends as `Shutdown`, not with an unknown
    // outcome.
    let b_result = watchdog(Duration::from_secs(10), move || b.wait(b_ticket));
    assert!(matches!(b_result, Err(CallError::Shutdown)), "the call queued at shutdown returned {b_result:?}");
    // A's handler ran to its end before the worker stopped, and its reply
    // went out before the session closed.
    let a_result = join_within(a_call, Duration::from_secs(10), "the sleeping call");
    assert!(a_result.is_ok(), "the call running at shutdown returned {a_result:?}");
    assert!(!socket.exists(), "the socket file is left behind");
    assert!(matches!(Client::connect_to(&socket), Err(ConnectError::NotRunning { .. })));
}

#[test]
fn sigint_stops_an_idle_daemon_and_idle_clients_see_it() {
    let mut daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"up").unwrap(), b"up");
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "ipcd exited with {status}; stderr:\n{}", daemon.stderr());
    assert!(!socket.exists(), "the socket file is left behind");
    // The daemon marked the session closed after the last request it took,
    // so a request written afterwards is known not to have run.
    let result = watchdog(Duration::from_secs(10), move || client.call(&echo, b"down"));
    assert!(matches!(result, Err(CallError::Shutdown)), "{result:?}");
}

#[test]
fn daemon_killed_mid_call_is_a_disconnect_not_a_hang() {
    let mut daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
    let mut client = daemon.client();
    let sleep = client.service("debug.sleep").unwrap();
    let call = thread::spawn(move || {
        let result = client.call(&sleep, &3000u32.to_le_bytes());
        // Later calls are not sent, and fail at once rather than waiting
        // for their timeout.
        let ping = client.service("ping").unwrap();
        (result, client.call(&ping, b""))
    });
    // The worker has taken the request: the daemon dies mid-call.
    expect_worker_in_handler(daemon.pid());
    daemon.kill();
    let (result, after) = join_within(call, Duration::from_secs(10), "the call to a dead daemon");
    assert!(matches!(result, Err(CallError::Disconnected { .. })), "{result:?}");
    assert!(matches!(after, Err(CallError::NotConnected { .. })), "{after:?}");
}

/// A call asleep in its wait (a futex wait, or a poll with the pollable
/// doorbell) when the daemon is SIGKILLed ends `Disconnected`, long
/// before its timeout: the liveness watcher (or the poll) sees the
/// control connection hang up and wakes it; a sleep that only ended at
/// its timeout would make the call `Timeout`. The delay is printed.
#[test]
fn a_call_asleep_in_its_wait_is_woken_by_the_daemons_death() {
    for (kind, sleeps_in) in
        [(DoorbellKind::Futex, sleeping_syscalls::FUTEX), (DoorbellKind::Pollable, sleeping_syscalls::POLL)]
    {
        let mut daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
        let options =
            ClientOptions::default().doorbell(kind).spin(Duration::ZERO).call_timeout(Duration::from_secs(60));
        let mut client = Client::connect_with(daemon.socket(), options).expect("cannot connect");
        let sleep = client.service("debug.sleep").unwrap();
        let (tid_tx, tid_rx) = mpsc::channel();
        let call = thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
            let result = client.call(&sleep, &10_000u32.to_le_bytes());
            (result, std::time::Instant::now())
        });
        let tid = tid_rx.recv().unwrap();
        expect_worker_in_handler(daemon.pid());
        let asleep = poll_until(HANG_UP_LIMIT, || {
            blocked_in_syscall(std::process::id(), tid).is_some_and(|n| sleeps_in.contains(&n))
        });
        assert!(asleep, "{kind:?}: the caller never went to sleep in its wait");
        let killed = std::time::Instant::now();
        daemon.kill();
        let (result, ended) = join_within(call, Duration::from_secs(30), "the call to a killed daemon");
        assert!(matches!(result, Err(CallError::Disconnected { .. })), "{kind:?}: {result:?}");
        println!("{kind:?}: the sleeping call ended {:?} after the SIGKILL", ended.saturating_duration_since(killed));
    }
}

/// 32 clients of one process, each asleep on its futex words in a call
/// the daemon is not answering (its one worker is in a handler), all end
/// `Disconnected` when the daemon is SIGKILLed: the liveness watcher
/// raises every alarm it finds and wakes them all by one round
/// (`liveness.rs`); with `futex_waitv` nothing else wakes them, so a
/// sleeper the round missed would sleep to its 60 s timeout. The slowest
/// delay is printed.
#[test]
fn many_calls_asleep_are_all_woken_by_one_round_at_the_daemons_death() {
    let mut daemon = Daemon::start(&["--workers", "1", "--debug-services"]);
    let options = ClientOptions::default().spin(Duration::ZERO).call_timeout(Duration::from_secs(60));
    // The first client's call holds the worker; the others' wait behind it.
    let (tids_tx, tids_rx) = mpsc::channel();
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let mut client = Client::connect_with(daemon.socket(), options.clone()).expect("cannot connect");
            let sleep = client.service("debug.sleep").unwrap();
            let tids_tx = tids_tx.clone();
            let call = thread::spawn(move || {
                tids_tx.send(nix::unistd::gettid().as_raw() as u32).unwrap();
                let result = client.call(&sleep, &10_000u32.to_le_bytes());
                (result, std::time::Instant::now())
            });
            if i == 0 {
                expect_worker_in_handler(daemon.pid());
            }
            call
        })
        .collect();
    let tids: Vec<u32> = (0..32).map(|_| tids_rx.recv().unwrap()).collect();
    let asleep = poll_until(HANG_UP_LIMIT, || {
        tids.iter().all(|&tid| {
            blocked_in_syscall(std::process::id(), tid).is_some_and(|n| sleeping_syscalls::FUTEX.contains(&n))
        })
    });
    assert!(asleep, "not every caller went to sleep in its wait");
    let killed = std::time::Instant::now();
    daemon.kill();
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (result, ended) = join_within(call, Duration::from_secs(30), "a call to a killed daemon");
        assert!(matches!(result, Err(CallError::Disconnected { .. })), "{result:?}");
        slowest = slowest.max(ended.saturating_duration_since(killed));
    }
    println!("the slowest of 32 sleeping calls ended {slowest:?} after the SIGKILL");
}

/// Runs a second ipcd on `socket` and returns its exit code and stderr.
fn run_second_daemon(socket: &std::path::Path) -> (Option<i32>, String) {
    let mut cmd = ipcd_command();
    cmd.arg("--socket").arg(socket).args(["--log-level", "warn"]).stdin(Stdio::null()).stdout(Stdio::null());
    let out = watchdog(EXIT_LIMIT, move || cmd.output().expect("cannot run ipcd"));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn second_daemon_on_a_live_socket_exits_with_an_error() {
    let mut daemon = Daemon::start(&[]);
    let (code, stderr) = run_second_daemon(daemon.socket());
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("another ipcd") || stderr.contains("live daemon"), "stderr:\n{stderr}");
    assert!(stderr.contains(&daemon.socket().display().to_string()), "the message names the path:\n{stderr}");

    // The first daemon keeps its socket and keeps serving.
    assert!(daemon.is_running());
    assert!(daemon.socket().exists());
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"still mine").unwrap(), b"still mine");
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipcd.sock");
    // A listener dropped without unlinking leaves a socket nobody answers.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(UnixStream::connect(&path).is_err());

    let daemon = Daemon::builder().dir(dir).start();
    assert_eq!(daemon.socket(), path);
    let mut client = daemon.client();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"fresh").unwrap(), b"fresh");
}

#[test]
fn restart_after_a_crash_takes_over_the_socket() {
    let first = Daemon::start(&[]);
    let path = first.socket().to_path_buf();
    // SIGKILL leaves the socket file (and the lock file) behind.
    let dir = first.into_dir();
    assert!(path.exists(), "a killed daemon cannot remove its socket");

    let second = Daemon::builder().dir(dir).start();
    let mut client = second.client();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"restarted").unwrap(), b"restarted");
}

#[test]
fn path_that_is_not_a_socket_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipcd.sock");
    std::fs::write(&path, b"precious").unwrap();
    let (code, stderr) = run_second_daemon(&path);
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("not a socket"), "stderr:\n{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn socket_file_has_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    for (args, mode) in [(&[][..], 0o600), (&["--socket-mode", "660"][..], 0o660)] {
        let daemon = Daemon::start(args);
        let found = std::fs::metadata(daemon.socket()).unwrap().permissions().mode() & 0o777;
        assert_eq!(found, mode, "{args:?}: socket mode {found:o}");
    }
}

/// Runs ipcd with `args` (and a socket in a fresh directory) to its exit.
/// Returns the exit code, stderr, and whether the socket file exists.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipcd.sock");
    let mut cmd = ipcd_command();
    cmd.arg("--socket").arg(&socket).args(args).stdin(Stdio::null()).stdout(Stdio::null());
    let out = watchdog(EXIT_LIMIT, move || cmd.output().expect("cannot run ipcd"));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned(), socket.exists())
}

#[test]
fn malformed_arguments_are_usage_errors() {
    for (args, names) in [
        (&["--handshake-timeout", "0s"][..], "--handshake-timeout"),
        (&["--handshake-timeout", "soon"][..], "--handshake-timeout"),
        (&["--socket-mode", "999"][..], "--socket-mode"),
        (&["--max-clients", "lots"][..], "--max-clients"),
        (&["--no-such-flag"][..], "--no-such-flag"),
    ] {
        let (code, stderr, socket_exists) = run_to_exit(args);
        assert_eq!(code, Some(2), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.contains(names), "{args:?}: the message names {names}:\n{stderr}");
        assert!(!socket_exists, "{args:?}: a socket was bound before the arguments were checked");
    }
}

#[test]
fn zero_workers_or_clients_are_usage_errors() {
    for args in [&["--workers", "0"][..], &["--max-clients", "0"][..]] {
        let (code, stderr, socket_exists) = run_to_exit(args);
        assert_eq!(code, Some(2), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: the message names the flag:\n{stderr}");
        assert!(!socket_exists, "{args:?}");
    }
}

/// What one pipelining client saw of a graceful stop.
#[derive(Default, Debug)]
struct Outcomes {
    replied: u64,
    shutdown: u64,
    other: Vec<String>,
    duplicated: u64,
    sent: u64,
}

#[test]
fn sigterm_under_load_gives_every_call_exactly_one_outcome() {
    let mut daemon = Daemon::start(&["--workers", "2"]);
    let clients: Vec<Client> = (0..6).map(|_| daemon.client()).collect();
    let started = std::sync::Arc::new(std::sync::Barrier::new(clients.len() + 1));
    // Clients that have had a reply: the stop comes once all have.
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            let started = std::sync::Arc::clone(&started);
            let answered = std::sync::Arc::clone(&answered);
            thread::spawn(move || {
                let echo = client.service("echo").unwrap();
                let mut out = Outcomes::default();
                let mut open = std::collections::HashMap::<Ticket, Vec<u8>>::new();
                let mut seq = 0u64;
                let mut first = true;
                loop {
                    // Keep 16 requests in flight until the connection is lost.
                    while client.is_connected() && open.len() < 16 {
                        let payload = pattern(n as u64 * 1_000_000 + seq, 48);
                        seq += 1;
                        match client.send(&echo, &payload) {
                            Ok(t) => {
                                out.sent += 1;
                                open.insert(t, payload);
                            }
                            // Refused before it was sent: not a request.
                            Err(CallError::Shutdown | CallError::NotConnected { .. }) => break,
                            Err(e) => out.other.push(format!("send: {e}")),
                        }
                    }
                    if first {
                        first = false;
                        started.wait();
                    }
                    let Received { ticket, outcome } = match client.recv() {
                        Ok(got) => got,
                        Err(CallError::NothingInFlight) if !client.is_connected() => break,
                        Err(e) => {
                            out.other.push(format!("recv: {e}"));
                            break;
                        }
                    };
                    let Some(sent) = open.remove(&ticket) else {
                        out.duplicated += 1;
                        continue;
                    };
                    match outcome {
                        Ok(reply) if reply == sent => {
                            if out.replied == 0 {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            out.replied += 1
                        }
                        Ok(_) => out.other.push(format!("ticket {}: wrong reply", ticket.id())),
                        Err(CallError::Shutdown) => out.shutdown += 1,
                        Err(e) => out.other.push(format!("ticket {}: {e}", ticket.id())),
                    }
                }
                assert!(open.is_empty(), "{} tickets never got an outcome", open.len());
                out
            })
        })
        .collect();
    started.wait();
    let clients = threads.len();
    let running = poll_until(TEST_LIMIT, || answered.load(Ordering::Relaxed) == clients);
    assert!(
        running,
        "only {} of {clients} clients had a reply; stderr:\n{}",
        answered.load(Ordering::Relaxed),
        daemon.stderr()
    );
    let status = daemon.terminate();
    assert!(status.success(), "ipcd exited with {status}; stderr:\n{}", daemon.stderr());
    let results: Vec<Outcomes> = common::join_all(threads);
    let (mut replied, mut shutdown) = (0, 0);
    for out in &results {
        assert!(out.other.is_empty(), "outcomes other than a reply or shutdown: {:?}", out.other);
        assert_eq!(out.duplicated, 0, "{out:?}");
        assert_eq!(out.replied + out.shutdown, out.sent, "{out:?}");
        replied += out.replied;
        shutdown += out.shutdown;
    }
    assert!(replied > 0, "no call was answered before the stop");
    // Every client had its calls answered and 16 requests in flight when
    // the stop came.
    assert!(shutdown > 0, "no call was answered with shutdown: {results:?}");
}

#[test]
fn reconnecting_client_gets_through_a_daemon_restart() {
    let first = Daemon::start(&[]);
    let path = first.socket().to_path_buf();
    let options = ClientOptions::default().reconnect(Reconnect::default());
    let mut client = Client::connect_with(&path, options).unwrap();
    let echo = client.service("echo").unwrap();
    assert_eq!(client.call(&echo, b"before").unwrap(), b"before");

    // Killed: the socket file stays, and nothing listens.
    let dir = first.into_dir();
    let lost = client.call(&echo, b"lost");
    assert!(matches!(lost, Err(CallError::Disconnected { .. })), "{lost:?}");
    // Down for the whole timeout (a short one, since it is spent in full):
    // the request is not sent, and says so.
    let down = client.call_timeout(&echo, b"down", Duration::from_millis(500));
    assert!(matches!(down, Err(CallError::NotConnected { .. })), "{down:?}");
    assert!(!client.is_connected());

    let second = Daemon::builder().dir(dir).start();
    assert_eq!(client.call(&echo, b"after").unwrap(), b"after", "stderr:\n{}", second.stderr());
    assert_eq!(client.reconnects(), 1);
    assert!(client.is_connected());
}

#[test]
fn reconnect_gives_up_on_a_daemon_that_refuses_for_good() {
    let daemon = Daemon::start(&[]);
    let path = daemon.socket().to_path_buf();
    let options = ClientOptions::default().reconnect(Reconnect::default()).call_timeout(Duration::from_secs(5));
    let mut client = Client::connect_with(&path, options).unwrap();
    let echo = client.service("echo").unwrap();
    let dir = daemon.into_dir();
    assert!(client.call(&echo, b"lost").is_err());
    // Another daemon with other services takes the path: the resolved
    // service ids may mean something else there, so the client does not
    // reconnect to it.
    let other = Daemon::builder().dir(dir).arg("--debug-services").start();
    let result = client.call(&echo, b"elsewhere");
    assert!(
        matches!(&result, Err(CallError::NotConnected { reason }) if reason.contains("other services")),
        "{result:?}"
    );
    // It gave up at once rather than retry until the timeout: the other
    // daemon welcomed it once, and then only the observer.
    let mut observer = other.client();
    let json = stats_json(&mut observer);
    assert_eq!(json_u64(&json, "accepted"), 2, "{json}");
}
