//! What a stall costs the client, beyond `stall.rs`: a session closed for
//! leaving its replies unread is a strike against the client's process, so
//! its next handshake is held like that of a client that broke the
//! protocol; and a client that keeps reading, however slowly, is not cut
//! off while a reply too large for the room it has made so far waits for
//! more, whereas one that stops reading is.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{
    json_u64, raw_session, stats_json, watchdog, Daemon, RawSession, RawSessionExt, HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::Client;
use ipc_core::{DoorbellKind, PushError};

/// The stall timeout of these tests.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the request ring must stay full for the daemon to count as
/// stalled on our replies.
const NO_PROGRESS: Duration = Duration::from_millis(100);

fn start() -> Daemon {
    let timeout = format!("{}ms", STALL_TIMEOUT.as_millis());
    Daemon::start(&["--workers", "1", "--stall-timeout", &timeout])
}

/// Sends 200-byte echo requests from `next_id` on and reads no reply, until
/// the daemon has taken none for [`NO_PROGRESS`]: its response ring is full
/// and it waits for us. Returns the id after the last one sent.
fn fill_until_stalled(raw: &mut RawSession, mut next_id: u64) -> u64 {
    let echo = raw.service("echo");
    let mut last_progress = Instant::now();
    loop {
        match raw.requests.try_push(echo, 0, next_id, &[7; 200]) {
            Ok(()) => {
                next_id += 1;
                last_progress = Instant::now();
            }
            Err(PushError::Full) => {
                raw.requests.publish();
                raw.ring().expect("cannot ring the daemon");
                if last_progress.elapsed() >= NO_PROGRESS {
                    return next_id;
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("request ring: {e}"),
        }
    }
}

#[test]
fn a_stall_that_runs_out_holds_the_next_handshake() {
    let daemon = start();
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut observer = Client::connect_to(&socket).unwrap();
        let mut staller = raw_session(&socket, 4096, DoorbellKind::Futex);
        fill_until_stalled(&mut staller, 1);
        staller.expect_hang_up(STALL_TIMEOUT + HANG_UP_LIMIT);

        // The same process connects again: its hello is held for the
        // cool-down of one strike (a millisecond), then admitted.
        let mut again = Client::connect_to(&socket).expect("a struck process is held, not refused");
        let echo = again.service("echo").unwrap();
        assert_eq!(again.call(&echo, b"back").unwrap(), b"back");
        // Counted before the hello was admitted: one read decides.
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 1, "{json}");
        assert_eq!(json_u64(&json, "held"), 1, "the stall was not a strike: {json}");
        assert_eq!(json_u64(&json, "protocol_violation"), 0, "{json}");
    });
}
