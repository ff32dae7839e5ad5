//! Access control by peer credentials (`--allow-uid`, `--allow-gid`) on the
//! control socket and the `--uds` socket: a client whose uid or primary gid
//! is allowed connects and calls; anyone else gets an explicit
//! `NotPermitted` reject naming its uid, gid and pid, which the daemon logs
//! and counts; and `--tcp` with an allow list is a usage error.
//!
//! The tests with clients of other users re-run this binary as a helper
//! process under another uid and gid, which takes root; without it they
//! say "skipped" and check only what this process's own credentials allow.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::{
    die_with_parent, ipcd_command, json_u64, poll_until, start_with_uds_in, stat_eventually, stats_json, watchdog,
    Daemon, CLEANUP_LIMIT, TEST_LIMIT,
};
use ipc_client::{Client, ClientOptions, ConnectError, Reject, Transport};

/// Set in the helper's environment to `shm:PATH` or `uds:PATH`.
const HELPER_TARGET_ENV: &str = "IPCD_TEST_ACCESS_TARGET";
/// The helper "test" that the test binary re-runs as another user.
const HELPER_NAME: &str = "helper_connects_and_reports";
/// Starts the helper's one line of outcome.
const MARKER: &str = "IPCD-ACCESS ";
/// The unprivileged user the helpers run as (nobody).
const NOBODY: u32 = 65534;
/// Another uid, and a gid no real group needs to have.
const OTHER_UID: u32 = 65533;
const ALLOWED_GID: u32 = 4242;

/// What a client saw when it connected.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Welcomed, and an echo call came back.
    Admitted,
    /// Refused with `NotPermitted`, for this reason.
    NotPermitted(String),
    /// Anything else.
    Failed(String),
}

/// Connects through `transport` and makes one call.
fn try_connect(transport: &Transport) -> Outcome {
    match Client::connect_with(transport.clone(), ClientOptions::default()) {
        Ok(mut client) => {
            let echo = client.service("echo").expect("echo service");
            match client.call(&echo, b"allowed") {
                Ok(reply) if reply == b"allowed" => Outcome::Admitted,
                Ok(reply) => Outcome::Failed(format!("echo replied {reply:?}")),
                Err(e) => Outcome::Failed(format!("call failed: {e}")),
            }
        }
        Err(ConnectError::Rejected(Reject::NotPermitted { reason })) => Outcome::NotPermitted(reason),
        Err(e) => Outcome::Failed(format!("connect failed: {e}")),
    }
}

/// Not a test: the client process of the tests below, run as another user
/// with only this function selected. It connects to the target in its
/// environment and prints one line with the outcome.
#[test]
#[ignore = "helper process for the access tests; does nothing when run directly"]
fn helper_connects_and_reports() {
    let Some(target) = std::env::var_os(HELPER_TARGET_ENV) else {
        return;
    };
    let target = target.into_string().expect("target is UTF-8");
    let transport = match target.split_once(':') {
        Some(("shm", path)) => Transport::Shm(path.into()),
        Some(("uds", path)) => Transport::Uds(path.into()),
        _ => panic!("bad target {target:?}"),
    };
    let line = match try_connect(&transport) {
        Outcome::Admitted => "admitted".to_string(),
        Outcome::NotPermitted(reason) => format!("not-permitted {reason}"),
        Outcome::Failed(what) => format!("failed {what}"),
    };
    // libtest has printed the test's name without a line break, so the
    // marker starts a fresh line of its own.
    println!("\n{MARKER}{line}");
    std::io::stdout().flush().unwrap();
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs the helper as `uid`:`gid` against `transport`; returns its outcome
/// and pid, or `None` (with the reason printed) where it cannot run.
fn run_as(uid: u32, gid: u32, transport: &Transport) -> Option<(Outcome, u32)> {
    let target = match transport {
        Transport::Shm(p) => format!("shm:{}", p.display()),
        Transport::Uds(p) => format!("uds:{}", p.display()),
        _ => panic!("the helper speaks Unix sockets only"),
    };
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args([HELPER_NAME, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(HELPER_TARGET_ENV, target)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: uid {uid} cannot run {}: {e}", exe.display());
            return None;
        }
        Err(e) => panic!("cannot run the helper as {uid}:{gid}: {e}"),
    };
    let pid = child.id();
    let output = child.wait_with_output().expect("cannot wait for the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MARKER))
        .unwrap_or_else(|| panic!("the helper as {uid}:{gid} reported nothing ({}); stdout:\n{stdout}", output.status));
    let outcome = match line.split_once(' ').unwrap_or((line, "")) {
        ("admitted", _) => Outcome::Admitted,
        ("not-permitted", reason) => Outcome::NotPermitted(reason.to_string()),
        (_, what) => Outcome::Failed(what.to_string()),
    };
    Some((outcome, pid))
}

/// Asserts that `outcome` is a `NotPermitted` reject naming `uid`, `gid`
/// and `pid`.
fn assert_refused(outcome: &Outcome, uid: u32, gid: u32, pid: u32) {
    let Outcome::NotPermitted(reason) = outcome else {
        panic!("{uid}:{gid} (pid {pid}): expected a not-permitted reject, got {outcome:?}");
    };
    for part in [format!("uid {uid} "), format!("gid {gid} "), format!("pid {pid}")] {
        assert!(reason.contains(&part), "the reason does not name {part:?}: {reason}");
    }
}

/// Starts a daemon with `args` that also serves `--uds`, with both sockets
/// (and their directory) reachable by any user, and waits until both
/// listen. Returns the daemon and its two transports.
fn start(args: &[&str]) -> (Daemon, [Transport; 2]) {
    let dir = tempfile::Builder::new().prefix("ipcd-access-").tempdir().expect("cannot create a temporary directory");
    // Others may pass through, not list: the socket names are known.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let args: Vec<&str> = ["--socket-mode", "666"].into_iter().chain(args.iter().copied()).collect();
    let (daemon, uds) = start_with_uds_in(dir, &args);
    let transports = [Transport::Shm(daemon.socket().to_path_buf()), Transport::Uds(uds)];
    (daemon, transports)
}

/// This process's uid and gid, and a uid and gid that are not.
fn own_and_other() -> ((u32, u32), (u32, u32)) {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    ((uid, gid), (uid.wrapping_add(1), gid.wrapping_add(1)))
}

#[test]
fn own_credentials_outside_the_allow_lists_are_refused_with_the_reason() {
    let ((uid, gid), (other_uid, other_gid)) = own_and_other();
    let (daemon, transports) = start(&["--allow-uid", &other_uid.to_string(), "--allow-gid", &other_gid.to_string()]);
    watchdog(TEST_LIMIT, move || {
        for transport in &transports {
            let outcome = try_connect(transport);
            assert_refused(&outcome, uid, gid, std::process::id());
            // The client library reports the reject as such, with the
            // reason in its message.
            match Client::connect_with(transport.clone(), ClientOptions::default()) {
                Err(e @ ConnectError::Rejected(_)) => {
                    let text = e.to_string();
                    assert!(text.contains("not permitted") && text.contains(&format!("uid {uid}")), "{text}");
                }
                other => panic!("{}: expected a reject, got {:?}", transport.name(), other.map(|_| ())),
            }
        }
    });
    // The daemon logs each refusal (a warning: the tests run it at warn).
    let logged = poll_until(CLEANUP_LIMIT, || daemon.stderr().matches("not permitted").count() >= 4);
    assert!(logged, "refusals are not logged; stderr:\n{}", daemon.stderr());
    assert!(daemon.stderr().contains(&format!("uid {uid} gid {gid}")), "{}", daemon.stderr());
}

#[test]
fn own_uid_or_gid_in_an_allow_list_is_admitted() {
    let ((uid, gid), (other_uid, other_gid)) = own_and_other();
    let by_uid = ["--allow-uid", &other_uid.to_string(), "--allow-uid", &uid.to_string()].map(String::from);
    let by_gid = ["--allow-uid", &other_uid.to_string(), "--allow-gid", &gid.to_string()].map(String::from);
    let only_gids = ["--allow-gid", &other_gid.to_string(), "--allow-gid", &gid.to_string()].map(String::from);
    for args in [by_uid, by_gid, only_gids] {
        let (_daemon, transports) = start(&args.each_ref().map(String::as_str));
        watchdog(TEST_LIMIT, move || {
            for transport in &transports {
                assert_eq!(try_connect(transport), Outcome::Admitted, "{} with {args:?}", transport.name());
            }
            let mut client = Client::connect_with(transports[0].clone(), ClientOptions::default()).unwrap();
            // The counter only grows: one read decides.
            let json = stats_json(&mut client);
            assert_eq!(json_u64(&json, "not_permitted"), 0, "{json}");
        });
    }
}

#[test]
fn tcp_with_an_allow_list_is_a_usage_error() {
    watchdog(TEST_LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ipcd.sock");
        for list in ["--allow-uid", "--allow-gid"] {
            let output = ipcd_command()
                .arg("--socket")
                .arg(&socket)
                .args(["--tcp", "127.0.0.1:0", list, "0"])
                .stdin(Stdio::null())
                .output()
                .expect("cannot run ipcd");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{list}: {}; stderr:\n{stderr}", output.status);
            assert!(stderr.contains("--tcp") && stderr.contains("credentials"), "{list}: {stderr}");
            assert!(!socket.exists(), "{list}: the daemon bound its socket before refusing");
        }
    });
}

/// Helper processes of other users on the transport called `name`: one
/// admitted by uid, one by gid, one refused; the refusal is counted. The
/// daemon admits uid 0 (the observer that reads the counts), [`OTHER_UID`],
/// and primary gid [`ALLOWED_GID`].
fn other_users(name: &str) {
    let (other, gid) = (OTHER_UID.to_string(), ALLOWED_GID.to_string());
    let (_daemon, transports) = start(&["--allow-uid", "0", "--allow-uid", &other, "--allow-gid", &gid]);
    let transport = transports.into_iter().find(|t| t.name() == name).unwrap();
    watchdog(TEST_LIMIT, move || {
        if !is_root() {
            let ((uid, gid), _) = own_and_other();
            eprintln!("skipped: clients of other users need root to start; checking uid {uid} alone");
            let outcome = try_connect(&transport);
            if uid == 0 || uid == OTHER_UID || gid == ALLOWED_GID {
                assert_eq!(outcome, Outcome::Admitted);
            } else {
                assert_refused(&outcome, uid, gid, std::process::id());
            }
            return;
        }
        let Some((by_uid, _)) = run_as(OTHER_UID, NOBODY, &transport) else { return };
        assert_eq!(by_uid, Outcome::Admitted, "uid {OTHER_UID} is allowed");
        let Some((by_gid, _)) = run_as(NOBODY, ALLOWED_GID, &transport) else { return };
        assert_eq!(by_gid, Outcome::Admitted, "gid {ALLOWED_GID} is allowed");
        let Some((refused, pid)) = run_as(NOBODY, NOBODY, &transport) else { return };
        assert_refused(&refused, NOBODY, NOBODY, pid);

        // The observer is root, and uid 0 is allowed.
        let mut observer = Client::connect_with(transport.clone(), ClientOptions::default()).unwrap();
        let (count, json) = stat_eventually(&mut observer, "not_permitted", |n| n == 1);
        assert_eq!(count, 1, "{json}");
        let (accepted, json) = stat_eventually(&mut observer, "accepted", |n| n == 3);
        assert_eq!(accepted, 3, "two helpers and the observer: {json}");
    });
}

#[test]
fn other_users_on_the_control_socket_are_admitted_by_uid_or_gid_and_refused_otherwise() {
    other_users("shm");
}

#[test]
fn other_users_on_the_stream_socket_are_admitted_by_uid_or_gid_and_refused_otherwise() {
    other_users("uds");
}
