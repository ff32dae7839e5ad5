//! Clients that break the ring protocol on purpose, by writing into the
//! shared segment what the client library never would, or by resizing or
//! zeroing it through its memfd (ftruncate, fallocate). Each must be
//! refused or disconnected alone: the daemon keeps running (it never takes
//! SIGBUS) and a client connected before it keeps getting correct replies.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    json_u64, pattern, poll_until, raw_session, stat_eventually, stats_json, watchdog, Daemon, RawSession,
    RawSessionExt, CLEANUP_LIMIT, HANG_UP_LIMIT, TEST_LIMIT,
};
use ipc_client::Client;
use ipc_core::{DoorbellKind, FrameHeader, PushError};

/// Opens a bystander client, then a raw session that `scribble` abuses,
/// rings the daemon, and checks that only the raw session was cut off.
fn hostile_is_cut_off_alone<F>(capacity: u32, scribble: F)
where
    F: FnOnce(&mut RawSession) + Send + 'static,
{
    let mut daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut bystander = Client::connect_to(&socket).unwrap();
        let echo = bystander.service("echo").unwrap();
        assert_eq!(bystander.call(&echo, b"before").unwrap(), b"before");

        let mut hostile = raw_session(&socket, capacity, DoorbellKind::Futex);
        scribble(&mut hostile);
        hostile.ring().unwrap();
        hostile.expect_hang_up(HANG_UP_LIMIT);

        let mut reply = Vec::new();
        for i in 0..1000u64 {
            let request = pattern(i, (i % 300) as usize);
            bystander.call_into(&echo, &request, &mut reply).unwrap();
            assert!(reply == request, "bystander call {i}: reply differs");
        }
        let (violations, json) = stat_eventually(&mut bystander, "protocol_violation", |n| n >= 1);
        assert!(violations >= 1, "{json}");
        // The bystander itself is the one client left.
        let cleaned = poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut bystander), "connected_clients") == 1);
        assert!(cleaned, "{}", stats_json(&mut bystander));
    });
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}

#[test]
fn misaligned_request_index_disconnects_only_that_client() {
    hostile_is_cut_off_alone(65536, |raw| raw.store_request_head(12345));
}

#[test]
fn out_of_range_request_index_disconnects_only_that_client() {
    // Aligned, but claims far more bytes than the ring holds.
    hostile_is_cut_off_alone(65536, |raw| raw.store_request_head(1 << 40));
}

#[test]
fn oversized_frame_length_disconnects_only_that_client() {
    hostile_is_cut_off_alone(65536, |raw| {
        let header = FrameHeader { len: 0xFFFF_FFF0, service: raw.service("echo"), flags: 0, request_id: 1 };
        raw.write_request_data(0, &header.encode());
        // A correctly published index: only the frame inside is a lie.
        raw.store_request_head(16);
    });
}

#[test]
fn frame_overrunning_the_published_index_disconnects_only_that_client() {
    hostile_is_cut_off_alone(65536, |raw| {
        // A legal length, but the head covers only the header.
        let header = FrameHeader { len: 1000, service: raw.service("echo"), flags: 0, request_id: 1 };
        raw.write_request_data(0, &header.encode());
        raw.store_request_head(16);
    });
}

#[test]
fn unknown_frame_flags_disconnect_only_that_client() {
    hostile_is_cut_off_alone(65536, |raw| {
        let header = FrameHeader { len: 0, service: raw.service("ping"), flags: 0x8000, request_id: 1 };
        raw.write_request_data(0, &header.encode());
        raw.store_request_head(16);
    });
}

#[test]
fn repeated_request_id_disconnects_only_that_client() {
    hostile_is_cut_off_alone(65536, |raw| {
        let ping = raw.service("ping");
        raw.requests.try_push(ping, 0, 5, b"").unwrap();
        raw.requests.try_push(ping, 0, 5, b"").unwrap();
        raw.requests.publish();
    });
}

#[test]
fn bad_response_ring_consumer_index_disconnects_only_that_client() {
    // The daemon reads the client's consumer index only when the response
    // ring looks full, so fill it: more empty pings than 16-byte response
    // frames fit in a 4 KiB ring, without ever consuming a response.
    hostile_is_cut_off_alone(4096, |raw| {
        // Aligned, so the range check rather than the alignment check must
        // catch it.
        raw.store_response_tail(!7);
        let ping = raw.service("ping");
        let frames = raw.layout.capacity() as u64 / 16;
        let deadline = Instant::now() + HANG_UP_LIMIT;
        let mut id = 1;
        while id <= 2 * frames && !raw.is_hung_up() {
            match raw.requests.try_push(ping, 0, id, b"") {
                Ok(()) => id += 1,
                Err(PushError::Full) => {
                    // The daemon frees request space as it serves; wait
                    // for it (or for the disconnect this test expects).
                    raw.requests.publish();
                    raw.ring().unwrap();
                    assert!(Instant::now() < deadline, "the request ring never drained");
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("request ring: {e}"),
            }
        }
        raw.requests.publish();
    });
}

#[test]
fn bytes_on_the_control_socket_after_the_handshake_disconnect_the_client() {
    hostile_is_cut_off_alone(65536, |raw| {
        raw.stream.write_all(b"surprise").unwrap();
    });
}

/// Every way a client can try to change its segment's size through the
/// memfd it holds fails, for every kind of session the daemon hands out.
/// Punching holes is not stopped by these seals (only a write seal would,
/// and the daemon must write): it zeroes pages but cannot change the size,
/// so nothing the daemon touches can lie past the end and no SIGBUS is
/// possible. The daemon reads the zeros like any other bytes.
#[test]
fn received_memfd_is_sealed_against_resizing() {
    use rustix::fs::FallocateFlags;
    let mut daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut bystander = Client::connect_to(&socket).unwrap();
        let echo_id = bystander.service("echo").unwrap();
        for (capacity, doorbell) in
            [(4096, DoorbellKind::Futex), (65536, DoorbellKind::Pollable), (1 << 20, DoorbellKind::Futex)]
        {
            let mut raw = raw_session(&socket, capacity, doorbell);
            let size = raw.layout.segment_size() as u64;
            let what = format!("{size}-byte segment");
            // The session was opened only because its memfd came with every
            // seal of `SEALS`, none against writing, at this size (checked
            // as the client does).

            for new_size in [size / 2, 0, size + 4096, size * 2] {
                let err = ipc_platform::try_resize(&raw.memfd, new_size).expect_err("ftruncate of a sealed segment");
                assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{what}: ftruncate to {new_size}: {err}");
            }
            // fallocate past the end: growing, and with KEEP_SIZE (which
            // would allocate beyond the size without changing it).
            for (flags, offset, len) in [
                (FallocateFlags::empty(), size - 4096, 8192),
                (FallocateFlags::empty(), size, 4096),
                (FallocateFlags::KEEP_SIZE, size, 1 << 20),
                (FallocateFlags::KEEP_SIZE, 0, size + 1),
            ] {
                let result = rustix::fs::fallocate(&raw.memfd, flags, offset, len);
                assert_eq!(result, Err(rustix::io::Errno::PERM), "{what}: fallocate {flags:?} at {offset}+{len}");
            }
            // Within the size, fallocate changes nothing: the pages are
            // allocated already.
            rustix::fs::fallocate(&raw.memfd, FallocateFlags::empty(), 0, size).expect("fallocate within the size");
            // F_SEAL_SEAL forbids adding seals as well, so a client cannot
            // freeze the daemon's writes either.
            let added = rustix::fs::fcntl_add_seals(&raw.memfd, rustix::fs::SealFlags::WRITE);
            assert_eq!(added, Err(rustix::io::Errno::PERM), "{what}");

            // Nothing changed: same size, same header, and the session serves.
            ipc_platform::check_sealed(raw.memfd.as_fd(), size).expect("seals and size after");
            raw.words.read_header(raw.welcome.ring_capacity).unwrap();
            let echo = raw.service("echo");
            let (header, body) = raw.call(echo, 1, b"sealed");
            assert!(!header.is_error(), "{what}");
            assert_eq!(body, b"sealed", "{what}");

            // Zero the whole segment, header and ring indices included.
            let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(&raw.memfd, punch, 0, size).expect("punching holes is not sealed");
            ipc_platform::check_sealed(raw.memfd.as_fd(), size).expect("seals and size after the punch");
            // The daemon reads the zeroed indices when served: it either
            // carries on or finds a broken ring and cuts this session off.
            // Either is fine; taking the daemon down is not.
            punched_session_answers_or_hangs_up(&mut raw, echo);
        }
        let mut reply = Vec::new();
        for i in 0..200u64 {
            let request = pattern(i, 100);
            bystander.call_into(&echo_id, &request, &mut reply).unwrap();
            assert!(reply == request, "bystander call {i}: reply differs");
        }
    });
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}

/// After the client zeroed its segment: sends one more request and waits
/// for its reply (which must then be right) or for the daemon to hang up.
fn punched_session_answers_or_hangs_up(raw: &mut RawSession, echo: u16) {
    if raw.requests.try_push(echo, 0, 2, b"after the punch").is_ok() {
        raw.requests.publish();
    }
    raw.ring().expect("cannot ring the daemon");
    let mut body = Vec::new();
    let answered = poll_until(HANG_UP_LIMIT, || match raw.responses.try_pop(&mut body) {
        Ok(Some(header)) => {
            assert_eq!((header.request_id, body.as_slice()), (2, &b"after the punch"[..]), "a wrong reply");
            true
        }
        // Our own view of the zeroed response ring may be broken too.
        Ok(None) | Err(_) => raw.is_hung_up(),
    });
    assert!(answered, "neither a reply nor a hang-up after the segment was zeroed");
}

/// An fd passed by SCM_RIGHTS shares its open file, and so its O_NONBLOCK
/// flag, with the daemon's copy. A client that makes its doorbells blocking,
/// races the daemon for the eventfd's counter, saturates it, and leaves its
/// own doorbell unread must not block the worker it shares with a neighbour,
/// nor keep the daemon from stopping.
#[test]
fn doorbells_made_blocking_and_saturated_cannot_stall_a_worker() {
    let mut daemon = Daemon::start(&["--workers", "1"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut bystander = Client::connect_to(&socket).unwrap();
        let echo_id = bystander.service("echo").unwrap();
        let mut hostile = raw_session(&socket, 65536, DoorbellKind::Pollable);
        let echo = hostile.service("echo");
        rustix::fs::fcntl_setfl(&hostile.bell, rustix::fs::OFlags::empty()).unwrap();
        let bell = hostile.client_bell.take().expect("a pollable doorbell was granted");
        rustix::fs::fcntl_setfl(&bell, rustix::fs::OFlags::empty()).unwrap();
        let mut body = Vec::new();
        for id in 1..=300u64 {
            // Ask to be woken (set the response ring's data waiter: the
            // daemon then rings a doorbell we never read), send a request,
            // ring, and steal the ring back at once.
            hostile.waiters()[2].store(1, std::sync::atomic::Ordering::SeqCst);
            hostile.requests.try_push(echo, 0, id, b"x").unwrap_or_else(|e| panic!("request {id}: {e}"));
            hostile.requests.publish();
            rustix::io::write(&hostile.bell, &1u64.to_ne_bytes()).unwrap();
            let mut counter = [0u8; 8];
            rustix::io::read(&hostile.bell, &mut counter).unwrap();
            while hostile.responses.try_pop(&mut body).unwrap().is_some() {}
            hostile.responses.release();
        }
        // Saturate the eventfd: a write of the daemon's would now block.
        rustix::io::write(&hostile.bell, &0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();

        let mut reply = Vec::new();
        for i in 0..1000u64 {
            let request = pattern(i, 64);
            bystander.call_into(&echo_id, &request, &mut reply).unwrap();
            assert!(reply == request, "bystander call {i}: reply differs");
        }
        drop(bell);
    });
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
    let status = daemon.terminate();
    assert!(status.success(), "ipcd did not stop cleanly: {status}; stderr:\n{}", daemon.stderr());
}

/// A process that keeps breaking the protocol waits longer and longer for
/// its next session (its handshakes are held, not refused), while a client
/// connected before keeps being served; one that only comes and goes
/// politely is never held.
#[test]
fn repeat_offenders_wait_longer_for_their_next_session() {
    /// Violations in a row: the hold after the last is 2^(8-1) = 128 ms.
    const STRIKES: u32 = 8;
    let mut daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut bystander = Client::connect_to(&socket).unwrap();
        let echo = bystander.service("echo").unwrap();
        // Polite clients come and go: nothing is held.
        for _ in 0..3 {
            drop(raw_session(&socket, 4096, DoorbellKind::Futex));
        }
        assert_eq!(json_u64(&stats_json(&mut bystander), "held"), 0);

        // The daemon records a strike when it cuts a session off, which is
        // after it has read that session's scribble, and answers this
        // process's next hello no sooner than 2^(strikes - 1) ms after the
        // strike. So the time from a scribble to the next welcome is at
        // least that, however late the daemon gets to either: a bound
        // that a slow machine can only exceed. A hold that no longer grew,
        // or was skipped, would show as an answer too early.
        let mut scribbled: Option<Instant> = None;
        for strikes in 0..=STRIKES {
            let mut raw = raw_session(&socket, 4096, DoorbellKind::Futex);
            if let Some(at) = scribbled {
                let waited = at.elapsed();
                let hold = Duration::from_millis(1 << (strikes - 1));
                assert!(waited >= hold, "after {strikes} strikes a hello was answered {waited:?} after the scribble");
            }
            if strikes == STRIKES {
                // Held, not refused: the session works.
                let ping = raw.service("ping");
                let (header, _) = raw.call(ping, 1, b"");
                assert!(!header.is_error(), "{header:?}");
                break;
            }
            scribbled = Some(Instant::now());
            raw.store_request_head(12345);
            raw.ring().expect("cannot ring the daemon");
            raw.expect_hang_up(HANG_UP_LIMIT);
            assert_eq!(bystander.call(&echo, b"still served").unwrap(), b"still served", "strike {strikes}");
        }
        let (violations, json) = stat_eventually(&mut bystander, "protocol_violation", |n| n == u64::from(STRIKES));
        assert_eq!(violations, u64::from(STRIKES), "{json}");
        assert_eq!(bystander.call(&echo, b"after").unwrap(), b"after");
    });
    assert!(daemon.is_running(), "ipcd exited; stderr:\n{}", daemon.stderr());
}
