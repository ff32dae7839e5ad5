//! A second SIGTERM or SIGINT while the graceful stop waits for a handler:
//! the daemon exits at once, says so, and exits with a failure status,
//! instead of waiting for the handler to finish.

mod common;

use std::thread;
use std::time::Duration;

use common::{join_within, poll_until, wait_worker_in_handler, watchdog, Daemon, HANG_UP_LIMIT, TEST_LIMIT};
use ipc_client::{CallError, Client};
use nix::sys::signal::Signal;

/// How long the handler sleeps: the longest `debug.sleep` takes, far longer
/// than the daemon takes to exit on the second signal.
const HANDLER_MS: u32 = 10_000;

/// Generous: the daemon exits at once, yet a loaded machine may take a
/// while to let it; and well above the handler's sleep, so that a daemon
/// that waited for the handler would be seen exiting, with status 0.
const EXIT_WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_second_signal_stops_the_daemon_while_a_handler_blocks() {
    let mut daemon = Daemon::start(&["--debug-services", "--workers", "1"]);
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    let (status, caller) = watchdog(TEST_LIMIT, move || {
        let caller = thread::spawn(move || {
            let mut client = Client::connect_to(&socket).unwrap();
            let sleep = client.service("debug.sleep").unwrap();
            client.call(&sleep, &HANDLER_MS.to_le_bytes())
        });
        if !wait_worker_in_handler(pid, HANG_UP_LIMIT) {
            eprintln!("skipped: cannot see where the worker thread waits on this machine");
            daemon.kill();
            let _ = caller.join();
            return (None, None);
        }
        // The first signal starts the graceful stop: the socket file goes,
        // and the acceptor waits for the worker, which sleeps in the
        // handler.
        daemon.signal(Signal::SIGTERM);
        let socket = daemon.socket().to_path_buf();
        assert!(poll_until(HANG_UP_LIMIT, || !socket.exists()), "the first signal did not start the stop");
        assert!(daemon.is_running(), "the graceful stop did not wait for the handler");
        // The second stops it now.
        daemon.signal(Signal::SIGINT);
        let status = daemon.wait_exit(EXIT_WAIT);
        let caller = join_within(caller, HANG_UP_LIMIT, "the caller");
        (Some((status, daemon.stderr())), Some(caller))
    });
    let (Some((status, stderr)), Some(caller)) = (status, caller) else { return };
    assert_eq!(status.code(), Some(1), "exited with {status}; stderr:\n{stderr}");
    assert!(stderr.contains("second signal"), "the exit is not logged; stderr:\n{stderr}");
    // The call was taken and not finished: its outcome is unknown.
    assert!(matches!(caller, Err(CallError::Disconnected { .. })), "{caller:?}");
}
