//! The client's own tests: connecting to listeners that misbehave, no
//! daemon needed.

use std::sync::mpsc;
use std::thread;

use super::*;

/// How long a test may wait for something that should happen at once. It
/// only turns a hang into a failure; it is not a performance bound.
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// Runs `f` on a thread of its own and returns its result, or fails the
/// test if it has none within [`HANG_LIMIT`] (the thread is left behind,
/// blocked: the test process ends with it).
fn within_limit<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| panic!("{what} did not return within {HANG_LIMIT:?}"))
}

#[test]
fn client_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Client>();
}

#[test]
fn missing_socket_is_not_running() {
    let err = Client::connect_to("/nonexistent/ipcd.sock").unwrap_err();
    assert!(matches!(err, ConnectError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/ipcd.sock"));
}

/// A listener that never accepts, as a stopped daemon's: its backlog of 0
/// holds one connection and then nothing more.
#[test]
fn connect_to_a_full_backlog_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stopped.sock");
    let listener = ipc_platform::bind_control_socket(&path, 0o600, 0).unwrap();
    let mut queued = Vec::new();
    loop {
        assert!(queued.len() < 64, "a backlog of 0 took {} connections", queued.len());
        match ipc_platform::connect_unix(&path, Duration::from_millis(50)) {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
    }
    let limit = Duration::from_millis(200);
    for transport in [Transport::Shm(path.clone()), Transport::Uds(path.clone())] {
        let options = ClientOptions::default().connect_timeout(limit);
        let name = transport.name();
        let result = within_limit("connect", move || Client::connect_with(transport, options).map(drop));
        match result {
            Err(ConnectError::Timeout { after }) => assert_eq!(after, limit, "{name}"),
            other => panic!("{name}: expected a timeout, got {other:?}"),
        }
    }
    drop((listener, queued));
}
