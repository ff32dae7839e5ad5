//! What a stall costs the client, beyond `stall.rs`: a session closed for
//! leaving its replies unread is a strike against the client's process, so
//! its next handshake is held like that of a client that broke the
//! protocol; and a client that keeps reading, however slowly, is not cut
//! off while a reply too large for the room it has made so far waits for
//! more, whereas one that stops reading is.

mod common;

use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    json_u64, pattern, poll_until, raw_session, stats_json, watchdog, Daemon, RawSession, RawSessionExt, HANG_UP_LIMIT,
    TEST_LIMIT,
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

        // The stall was counted as a strike against the staller's process
        // (counted before the session was closed: one read decides).
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 1, "{json}");
        assert_eq!(json_u64(&json, "strikes"), 1, "the stall was not a strike: {json}");
        assert_eq!(json_u64(&json, "protocol_violation"), 0, "{json}");
        // The same process connects again: held for the cool-down of one
        // strike (a millisecond, so whether this hello falls inside it
        // depends on the machine's load), then admitted, never refused.
        let mut again = Client::connect_to(&socket).expect("a struck process is held, not refused");
        let echo = again.service("echo").unwrap();
        assert_eq!(again.call(&echo, b"back").unwrap(), b"back");
    });
}

/// Reads one reply, hands its space back and rings the daemon if it waits
/// for that space, as the client library does. Returns the reply's id and
/// length, or `None` if none is there yet.
fn read_one(raw: &mut RawSession, body: &mut Vec<u8>) -> Option<(u64, usize)> {
    let header = raw.responses.try_pop(body).expect("response ring")?;
    if raw.responses.release() {
        raw.ring().expect("cannot ring the daemon");
    }
    Some((header.request_id, body.len()))
}

#[test]
fn a_client_that_reads_slowly_but_steadily_is_not_cut_off_and_one_that_stops_is() {
    /// Small replies ahead of the large one: 62 frames of 248 bytes fill
    /// 15,376 of the 16 KiB response ring, and the large reply (8,016
    /// bytes) fits only once the client has read 33 of them.
    const SMALL: u64 = 62;
    const SMALL_LEN: usize = 232;
    const LARGE_LEN: usize = 8000;
    /// Between two replies read: far below the stall timeout, while the
    /// reads the large reply waits for take several times the timeout.
    const READ_EVERY: Duration = Duration::from_millis(100);
    let daemon = start();
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut observer = Client::connect_to(&socket).unwrap();
        let mut raw = raw_session(&socket, 16384, DoorbellKind::Futex);
        let echo = raw.service("echo");
        for id in 1..=SMALL {
            raw.requests.try_push(echo, 0, id, &pattern(id, SMALL_LEN)).unwrap();
        }
        raw.requests.publish();
        raw.ring().unwrap();
        // The large request fits once the daemon has taken enough of the
        // small ones.
        let large = SMALL + 1;
        let pushed =
            poll_until(HANG_UP_LIMIT, || match raw.requests.try_push(echo, 0, large, &pattern(large, LARGE_LEN)) {
                Ok(()) => true,
                Err(PushError::Full) => false,
                Err(e) => panic!("request ring: {e}"),
            });
        assert!(pushed, "the daemon took none of the small requests");
        raw.requests.publish();
        raw.ring().unwrap();
        // The daemon answered the small ones and waits for room for the
        // large reply: it has announced so in the response ring.
        let waits = poll_until(HANG_UP_LIMIT, || raw.responses.peer_waiter().load(Ordering::SeqCst) == 1);
        assert!(waits, "the daemon never waited for room in the response ring");

        // Read one reply at a time, steadily: each frees a little space,
        // never enough for the large reply until many have been read.
        let stalled_from = Instant::now();
        let mut body = Vec::new();
        let mut next = 1;
        while next <= large {
            assert!(!raw.is_hung_up(), "a steady reader was cut off after {:?}", stalled_from.elapsed());
            thread::sleep(READ_EVERY);
            let Some((id, len)) = read_one(&mut raw, &mut body) else { continue };
            assert_eq!(id, next, "replies out of order or lost");
            let expected = if id == large { LARGE_LEN } else { SMALL_LEN };
            assert_eq!(len, expected, "reply {id}");
            assert!(body == pattern(id, len), "reply {id}: payload differs");
            next += 1;
        }
        // The large reply waited longer than the stall timeout, all the
        // while the client was reading.
        assert!(stalled_from.elapsed() > STALL_TIMEOUT, "the large reply waited only {:?}", stalled_from.elapsed());
        let (h, reply) = raw.call(echo, large + 1, b"still here");
        assert_eq!((h.request_id, reply.as_slice()), (large + 1, &b"still here"[..]));
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 0, "{json}");

        // Now the same client stops reading: it is cut off.
        fill_until_stalled(&mut raw, large + 2);
        raw.expect_hang_up(STALL_TIMEOUT + HANG_UP_LIMIT);
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "stalled"), 1, "{json}");
    });
}
