//! What one user may take from the daemon: live sessions per uid
//! (`--max-sessions-per-uid`) and the memory all sessions together are
//! charged (`--max-shm`). One uid opens sessions, over the control socket
//! and `--uds` in turn, until it is refused with an explicit reject naming
//! the limit and the numbers, while another uid's client keeps working and
//! getting its replies. And unfinished handshakes
//! (`--max-pending-handshakes`): past the cap one uid's next connection is
//! closed with a reject, while another uid's takes the place of the first
//! uid's oldest.
//!
//! The user that opens sessions is a helper process: this test binary run
//! again under another uid, which takes root; without root the tests say
//! "skipped" and check what one uid can.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::{
    die_with_parent, json_u64, poll_until, raw_connect, read_answer, start_with_uds_in, stat_eventually, stats_json,
    watchdog, Daemon, CLEANUP_LIMIT, TEST_LIMIT,
};
use ipc_client::{Client, ClientOptions, ConnectError, Reject, Transport};
use ipc_core::{SegmentLayout, ServerMessage};

/// Set in the helper's environment: the control socket and the `--uds`
/// socket, separated by a newline.
const HELPER_SOCKETS_ENV: &str = "IPCD_TEST_LIMITS_SOCKETS";
/// Set in the helper's environment: the ring capacity it asks for.
const HELPER_RING_ENV: &str = "IPCD_TEST_LIMITS_RING";
/// Set in the helper's environment: the most sessions it opens.
const HELPER_MOST_ENV: &str = "IPCD_TEST_LIMITS_MOST";
/// The helper "test" that the test binary re-runs as another user.
const HELPER_NAME: &str = "helper_opens_sessions_until_refused";
/// Starts each line the helper reports on.
const MARKER: &str = "IPCD-LIMITS ";
/// The unprivileged user the helper runs as (nobody).
const NOBODY: u32 = 65534;
/// More sessions than any test's limit lets one uid open.
const MOST_ATTEMPTS: usize = 1000;

/// Connects through `transport` with rings of `ring` bytes and makes one
/// call.
fn open(transport: &Transport, ring: u32) -> Result<Client, ConnectError> {
    let mut client = Client::connect_with(transport.clone(), ClientOptions::default().ring_capacity(ring))?;
    let echo = client.service("echo").expect("echo service");
    assert_eq!(client.call(&echo, b"opened").expect("a call on a new session"), b"opened");
    Ok(client)
}

/// Not a test: the process of another user in the tests below, run with
/// only this function selected. It opens sessions, alternating between the
/// control socket and the `--uds` socket in its environment, until one is
/// refused or it has opened as many as it was told; reports how many it
/// opened and the refusal; then holds them until its stdin closes.
#[test]
#[ignore = "helper process for the limits tests; does nothing when run directly"]
fn helper_opens_sessions_until_refused() {
    let Some(sockets) = std::env::var_os(HELPER_SOCKETS_ENV) else {
        return;
    };
    let sockets = sockets.into_string().expect("paths are UTF-8");
    let (shm, uds) = sockets.split_once('\n').expect("two sockets");
    let transports = [Transport::Shm(shm.into()), Transport::Uds(uds.into())];
    let ring: u32 = std::env::var(HELPER_RING_ENV).expect("ring size").parse().expect("ring size");
    let most: usize = std::env::var(HELPER_MOST_ENV).expect("most sessions").parse().expect("most sessions");
    let mut held = Vec::new();
    let outcome = loop {
        if held.len() == most {
            break format!("opened {}", held.len());
        }
        match open(&transports[held.len() % 2], ring) {
            Ok(client) => held.push(client),
            Err(ConnectError::Rejected(reject)) => break format!("refused {} {reject:?}", held.len()),
            Err(e) => break format!("failed {} {e}", held.len()),
        }
    };
    // libtest has printed the test's name without a line break, so the
    // marker starts a fresh line of its own.
    println!("\n{MARKER}{outcome}");
    std::io::stdout().flush().unwrap();
    // Holds the sessions, still working, until told to go.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    for client in &mut held {
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"held").unwrap(), b"held");
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The helper running as another user, holding its sessions.
struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    /// Runs the helper as `uid` against the daemon's two Unix sockets, with
    /// rings of `ring` bytes, to open at most `most` sessions; `None` (with
    /// the reason printed) where it cannot run.
    fn start(uid: u32, sockets: (&Path, &Path), ring: u32, most: usize) -> Option<Helper> {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(&exe);
        cmd.args([HELPER_NAME, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(HELPER_SOCKETS_ENV, format!("{}\n{}", sockets.0.display(), sockets.1.display()))
            .env(HELPER_RING_ENV, ring.to_string())
            .env(HELPER_MOST_ENV, most.to_string())
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: uid {uid} cannot run {}: {e}", exe.display());
                return None;
            }
            Err(e) => panic!("cannot run the helper as uid {uid}: {e}"),
        };
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Some(Helper { child, stdin, stdout })
    }

    /// The helper's report: how many sessions it opened, and the reject
    /// (its `Debug` form) that stopped it.
    fn outcome(&mut self) -> (usize, String) {
        let (kind, count, reject) = self.report();
        assert_eq!(kind, "refused", "the helper was not refused: {kind} {count} {reject}");
        (count, reject)
    }

    /// The helper's report: `refused` or `opened` (all it was told to),
    /// how many sessions it opened, and the reject if one stopped it.
    fn report(&mut self) -> (String, usize, String) {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("reading the helper's output");
            assert!(n > 0, "the helper ended without reporting ({:?})", self.child.try_wait());
            if let Some(report) = line.trim_end().strip_prefix(MARKER) {
                let mut words = report.splitn(3, ' ');
                let (kind, count, rest) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap_or(""));
                let count = count.parse().unwrap_or_else(|_| panic!("the helper failed: {report}"));
                return (kind.to_string(), count, rest.to_string());
            }
        }
    }

    /// Lets the helper check its sessions still work and go; returns
    /// whether it succeeded.
    fn finish(mut self) -> bool {
        drop(self.stdin.take());
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        self.child.wait().expect("cannot wait for the helper").success()
    }
}

/// Starts a daemon with `args` that also serves `--uds`, both sockets (and
/// their directory) reachable by any user. Returns the daemon and the two
/// socket paths.
fn start(args: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new().prefix("ipcd-limits-").tempdir().expect("cannot create a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let args: Vec<&str> = ["--socket-mode", "666"].into_iter().chain(args.iter().copied()).collect();
    let (daemon, uds) = start_with_uds_in(dir, &args);
    let shm = daemon.socket().to_path_buf();
    (daemon, shm, uds)
}

/// Calls echo on `client` and checks the reply.
fn still_works(client: &mut Client, what: &str) {
    let echo = client.service("echo").unwrap();
    let request = common::pattern(7, 1000);
    assert!(client.call(&echo, &request).unwrap_or_else(|e| panic!("{what}: {e}")) == request, "{what}");
}

/// What a shared-memory session with rings of `ring` bytes is charged.
fn shm_charge(ring: u32) -> u64 {
    let layout = SegmentLayout::new(ring).unwrap();
    layout.segment_size() as u64 + u64::from(layout.max_payload())
}

#[test]
fn a_uid_is_refused_past_its_sessions_while_another_uid_goes_on() {
    const MAX: usize = 3;
    let (_daemon, shm, uds) = start(&["--max-sessions-per-uid", &MAX.to_string()]);
    watchdog(TEST_LIMIT, move || {
        let shm_t = Transport::Shm(shm.clone());
        let uds_t = Transport::Uds(uds.clone());
        // This process (root, or whoever runs the tests) is the other user.
        let mut ours = open(&shm_t, 4096).unwrap();
        if !is_root() {
            eprintln!("skipped: another uid needs root; checking this uid's limit alone");
            let mut more: Vec<Client> = (1..MAX).map(|i| open([&shm_t, &uds_t][i % 2], 4096).unwrap()).collect();
            match open(&uds_t, 4096) {
                Err(ConnectError::Rejected(Reject::TooManySessionsForUid { max, .. })) => assert_eq!(max as usize, MAX),
                other => panic!("expected a per-uid reject, got {:?}", other.map(|_| ())),
            }
            still_works(&mut more[0], "a session within the limit");
            return;
        }
        let Some(mut helper) = Helper::start(NOBODY, (&shm, &uds), 4096, MOST_ATTEMPTS) else { return };
        let (opened, reject) = helper.outcome();
        assert_eq!(opened, MAX, "the helper opened {opened} sessions before its reject {reject}");
        assert_eq!(reject, format!("TooManySessionsForUid {{ uid: {NOBODY}, max: {MAX} }}"));
        let text = Reject::TooManySessionsForUid { uid: NOBODY, max: MAX as u32 }.to_string();
        assert!(text.contains(&format!("uid {NOBODY}")) && text.contains(&format!("{MAX} sessions")), "{text}");

        // The other uid is not held back: its session goes on, and it opens
        // its own full share, on both sockets.
        still_works(&mut ours, "the other uid's session");
        let mut more: Vec<Client> = (1..MAX).map(|i| open([&shm_t, &uds_t][i % 2], 4096).unwrap()).collect();
        for client in &mut more {
            still_works(client, "another session of the other uid");
        }
        let json = stats_json(&mut ours);
        assert_eq!(json_u64(&json, "uid_session_limit"), 1, "{json}");
        assert_eq!(json_u64(&json, "connected_clients"), 2 * MAX as u64, "{json}");

        // The helper's sessions still work, then go, and its slots with them.
        assert!(helper.finish(), "the helper's sessions stopped working");
        let (left, json) = stat_eventually(&mut ours, "connected_clients", |n| n == MAX as u64);
        assert_eq!(left, MAX as u64, "{json}");
    });
}

#[test]
fn connects_and_drops_in_a_row_are_never_refused_by_the_uid_limit() {
    // A client that drops its session and connects again at once may
    // reach the acceptor before the worker has seen the hang-up: the
    // slot it gave back must count as free all the same.
    const MAX: usize = 2;
    const CYCLES: usize = 2000;
    let (_daemon, shm, uds) = start(&["--max-sessions-per-uid", &MAX.to_string()]);
    watchdog(TEST_LIMIT, move || {
        let transports = [Transport::Shm(shm), Transport::Uds(uds)];
        // One session held throughout, so that every cycle runs at the
        // limit's edge.
        let mut held = open(&transports[0], 4096).unwrap();
        for i in 0..CYCLES {
            let options = ClientOptions::default().ring_capacity(4096);
            match Client::connect_with(transports[i % 2].clone(), options) {
                Ok(client) => drop(client),
                Err(e) => panic!("connect {i} of {CYCLES}, with one other session open: {e}"),
            }
        }
        still_works(&mut held, "the session held throughout");
    });
}

#[test]
fn sessions_past_the_memory_budget_are_refused_while_sessions_within_it_go_on() {
    /// Room for this uid's small session and three of the helper's (two
    /// on shared memory, one stream) but not a fourth.
    const BUDGET: u64 = 1_000_000;
    let (_daemon, shm, uds) = start(&["--max-shm", &BUDGET.to_string()]);
    watchdog(TEST_LIMIT, move || {
        let shm_t = Transport::Shm(shm.clone());
        let mut ours = open(&shm_t, 4096).unwrap();
        let (in_use, json) = stat_eventually(&mut ours, "memory_in_use", |n| n == shm_charge(4096));
        assert_eq!(in_use, shm_charge(4096), "a session is charged its segment and one payload: {json}");
        assert_eq!(json_u64(&json, "memory_budget"), BUDGET, "{json}");
        if !is_root() {
            eprintln!("skipped: another uid needs root; checking this uid against the budget alone");
            let big = (1 << 20) as u32;
            match open(&shm_t, big) {
                Err(ConnectError::Rejected(Reject::OverMemoryBudget { needed, in_use, budget })) => {
                    assert_eq!((needed, in_use, budget), (shm_charge(big), shm_charge(4096), BUDGET));
                }
                other => panic!("expected a memory reject, got {:?}", other.map(|_| ())),
            }
            still_works(&mut ours, "a session within the budget");
            return;
        }
        let Some(mut helper) = Helper::start(NOBODY, (&shm, &uds), 65536, MOST_ATTEMPTS) else { return };
        let (opened, reject) = helper.outcome();
        assert_eq!(opened, 3, "the helper opened {opened} sessions before its reject {reject}");
        // OverMemoryBudget { needed: N, in_use: N, budget: N }
        let numbers: Vec<u64> = reject
            .strip_prefix("OverMemoryBudget { ")
            .unwrap_or_else(|| panic!("expected a memory reject, got {reject}"))
            .trim_end_matches(" }")
            .split(", ")
            .map(|field| field.split_once(": ").unwrap().1.parse().unwrap())
            .collect();
        let [needed, in_use, budget] = numbers[..] else { panic!("{reject}") };
        assert_eq!(budget, BUDGET, "{reject}");
        assert!(in_use <= budget && in_use + needed > budget, "{reject}");
        // Two shared-memory sessions of the helper and ours are in use,
        // with its stream session.
        assert!(in_use > shm_charge(4096) + 2 * shm_charge(65536), "{reject}");

        // The sessions already open go on; a session small enough for the
        // room left is still admitted.
        still_works(&mut ours, "the other uid's session");
        let mut small = open(&shm_t, 4096).expect("a session that fits the budget");
        still_works(&mut small, "a small session opened at the budget");
        let json = stats_json(&mut ours);
        assert_eq!(json_u64(&json, "over_memory_budget"), 1, "{json}");
        assert_eq!(json_u64(&json, "memory_in_use"), in_use + shm_charge(4096), "{json}");

        // The helper's sessions still work, then go, and their charge with
        // them.
        assert!(helper.finish(), "the helper's sessions stopped working");
        drop(small);
        let back = poll_until(CLEANUP_LIMIT, || json_u64(&stats_json(&mut ours), "memory_in_use") == shm_charge(4096));
        assert!(back, "the charges are not given back: {}", stats_json(&mut ours));
    });
}

/// Whether the daemon has closed `stream` (without reading from it).
fn closed_by_daemon(stream: &UnixStream) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => panic!("poll: {e}"),
    }
    fds[0].revents().intersects(PollFlags::RDHUP | PollFlags::HUP)
}

#[test]
fn past_the_pending_handshake_cap_a_user_is_refused_and_another_user_gets_in() {
    const MAX: usize = 8;
    // Long enough that no stalled handshake times out during the test.
    let (_daemon, shm, uds) = start(&["--max-pending-handshakes", &MAX.to_string(), "--handshake-timeout", "120s"]);
    watchdog(TEST_LIMIT, move || {
        let mut observer = Client::connect_to(&shm).unwrap();
        // This uid fills the cap with connections that never say hello.
        let stalled: Vec<UnixStream> = (0..MAX).map(|_| raw_connect(&shm)).collect();
        let (pending, json) = stat_eventually(&mut observer, "pending_handshakes", |n| n == MAX as u64);
        assert_eq!(pending, MAX as u64, "{json}");

        // Its next connection is closed at once, with a reject saying why.
        let refused = raw_connect(&shm);
        match read_answer(&refused).message() {
            (ServerMessage::Reject(reject), _) => {
                assert_eq!(reject, Reject::TooManyPendingHandshakes { max: MAX as u32 });
                assert!(reject.to_string().contains(&format!("maximum {MAX}")), "{reject}");
            }
            (other, _) => panic!("expected a reject, got {other:?}"),
        }
        assert!(Client::connect_to(&shm).is_err(), "this uid is past the cap");
        let (limited, json) = stat_eventually(&mut observer, "pending_handshake_limit", |n| n >= 2);
        assert!(limited >= 2, "{json}");
        assert_eq!(json_u64(&json, "pending_handshakes"), MAX as u64, "{json}");
        still_works(&mut observer, "a session opened before the flood");

        if !is_root() {
            eprintln!("skipped: another uid needs root");
            return;
        }
        // Another uid connects: it takes the place of this uid's oldest
        // unfinished handshake, and its session works.
        let Some(mut helper) = Helper::start(NOBODY, (&shm, &uds), 4096, 1) else { return };
        let (kind, opened, reject) = helper.report();
        assert_eq!((kind.as_str(), opened), ("opened", 1), "another uid was kept out: {reject}");
        assert!(helper.finish(), "the other uid's session stopped working");
        let closed: Vec<usize> = (0..MAX).filter(|&i| closed_by_daemon(&stalled[i])).collect();
        assert_eq!(closed, [0], "the oldest unfinished handshake makes room, and only it");
        let json = stats_json(&mut observer);
        assert_eq!(json_u64(&json, "pending_handshake_evicted"), 1, "{json}");
        assert_eq!(json_u64(&json, "pending_handshakes"), (MAX - 1) as u64, "{json}");
    });
}
