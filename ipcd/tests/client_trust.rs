//! Whom the client library trusts: over a Unix socket only a daemon that
//! runs as the client's user or as root, and in the fallback directory
//! `/tmp/ipcd-<uid>` only a socket whose directory is the user's and
//! writable by nobody else. Anything else is refused with
//! `ConnectError::Untrusted`, before a hello is sent.
//!
//! Daemons and clients of other users take root to start: the clients are
//! this binary run again as a helper under another uid. Without root the
//! tests say "skipped".

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{die_with_parent, ipcd_command, json_u64, poll_until, stats_json, watchdog, STARTUP_LIMIT, TEST_LIMIT};
use ipc_client::{Client, ClientOptions, ConnectError, Transport};

/// Set in the helper's environment to `shm:PATH`, `uds:PATH`, or `default`
/// (connect to the default path, with neither `$IPCD_SOCKET` nor
/// `$XDG_RUNTIME_DIR` set).
const HELPER_TARGET_ENV: &str = "IPCD_TEST_TRUST_TARGET";
/// The helper "test" that the test binary re-runs as another user.
const HELPER_NAME: &str = "helper_connects_and_reports";
/// Starts the helper's one line of outcome.
const MARKER: &str = "IPCD-TRUST ";
/// The user the daemon of another user runs as.
const OTHER_UID: u32 = 65533;

/// What a client saw when it connected.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Welcomed and served; the daemon had accepted this many handshakes.
    Admitted { accepted: u64 },
    /// Refused as untrusted, for this reason.
    Untrusted { path: PathBuf, reason: String },
    /// Anything else.
    Failed(String),
}

fn try_connect(target: Option<&Transport>) -> Outcome {
    let connected = match target {
        Some(t) => Client::connect_with(t.clone(), ClientOptions::default()),
        None => Client::connect(),
    };
    match connected {
        Ok(mut client) => {
            let echo = client.service("echo").expect("echo service");
            match client.call(&echo, b"trusted") {
                Ok(reply) if reply == b"trusted" => {
                    Outcome::Admitted { accepted: json_u64(&stats_json(&mut client), "accepted") }
                }
                Ok(reply) => Outcome::Failed(format!("echo replied {reply:?}")),
                Err(e) => Outcome::Failed(format!("call failed: {e}")),
            }
        }
        Err(ConnectError::Untrusted { path, reason }) => Outcome::Untrusted { path, reason },
        Err(e) => Outcome::Failed(format!("connect failed: {e:?}")),
    }
}

/// Not a test: the client process of the tests below, run as another user
/// with only this function selected. It connects to the target in its
/// environment and prints one line with the outcome.
#[test]
#[ignore = "helper process for the trust tests; does nothing when run directly"]
fn helper_connects_and_reports() {
    let Some(target) = std::env::var_os(HELPER_TARGET_ENV) else {
        return;
    };
    let target = target.into_string().expect("target is UTF-8");
    let transport = match target.split_once(':') {
        Some(("shm", path)) => Some(Transport::Shm(path.into())),
        Some(("uds", path)) => Some(Transport::Uds(path.into())),
        None if target == "default" => None,
        _ => panic!("bad target {target:?}"),
    };
    let line = match try_connect(transport.as_ref()) {
        Outcome::Admitted { accepted } => format!("admitted {accepted}"),
        Outcome::Untrusted { path, reason } => format!("untrusted {}|{reason}", path.display()),
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

/// Runs the helper as `uid` (and gid `uid`) against `target` (see
/// [`HELPER_TARGET_ENV`]) and returns its outcome.
fn run_as(uid: u32, target: &str) -> Outcome {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args([HELPER_NAME, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(HELPER_TARGET_ENV, target)
        .env_remove(ipc_platform::SOCKET_ENV)
        .env_remove("XDG_RUNTIME_DIR")
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {} as uid {uid}: {e}", exe.display()));
    let output = child.wait_with_output().expect("cannot wait for the helper");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MARKER))
        .unwrap_or_else(|| panic!("the helper as uid {uid} reported nothing ({}); stdout:\n{stdout}", output.status));
    match line.split_once(' ').unwrap_or((line, "")) {
        ("admitted", n) => Outcome::Admitted { accepted: n.parse().expect("a count") },
        ("untrusted", rest) => {
            let (path, reason) = rest.split_once('|').expect("path|reason");
            Outcome::Untrusted { path: path.into(), reason: reason.to_string() }
        }
        (_, what) => Outcome::Failed(what.to_string()),
    }
}

/// An ipcd running as another user, killed and reaped when dropped.
struct DaemonAs {
    child: Child,
}

impl DaemonAs {
    /// Starts ipcd as `uid` (and gid `uid`) on `socket`, with `args`
    /// besides, and waits until `socket` and every `--uds` path in `args`
    /// accept connections.
    fn start(uid: u32, socket: &Path, args: &[&str]) -> DaemonAs {
        let mut cmd = ipcd_command();
        cmd.arg("--socket")
            .arg(socket)
            .args(["--log-level", "warn", "--socket-mode", "666"])
            .args(args)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut daemon = DaemonAs { child: cmd.spawn().expect("cannot spawn ipcd") };
        let mut paths = vec![socket.to_path_buf()];
        paths.extend(args.windows(2).filter(|w| w[0] == "--uds").map(|w| PathBuf::from(w[1])));
        let up = poll_until(STARTUP_LIMIT, || {
            daemon.child.try_wait().expect("cannot poll ipcd").is_some()
                || paths.iter().all(|p| UnixStream::connect(p).is_ok())
        });
        assert!(up && daemon.child.try_wait().unwrap().is_none(), "ipcd as uid {uid} did not come up on {paths:?}");
        daemon
    }
}

impl Drop for DaemonAs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `outcome` refuses `path` for a reason that contains
/// `needle`.
fn assert_untrusted(outcome: &Outcome, path: &Path, needle: &str) {
    match outcome {
        Outcome::Untrusted { path: p, reason } => {
            assert_eq!(p, path, "{reason}");
            assert!(reason.contains(needle), "the reason does not say {needle:?}: {reason}");
        }
        other => panic!("expected {} to be refused as untrusted, got {other:?}", path.display()),
    }
}

#[test]
fn a_daemon_of_another_user_is_refused_before_the_hello() {
    if !is_root() {
        eprintln!("skipped: a daemon of another user needs root to start");
        return;
    }
    let dir = tempfile::Builder::new().prefix("ipcd-trust-").tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (shm, uds) = (dir.path().join("ipcd.sock"), dir.path().join("ipcd-stream.sock"));
    let uds_arg = uds.display().to_string();
    let _daemon = DaemonAs::start(OTHER_UID, &shm, &["--uds", &uds_arg]);
    watchdog(TEST_LIMIT, move || {
        let transports = [Transport::Shm(shm.clone()), Transport::Uds(uds.clone())];
        for transport in &transports {
            let path = match transport {
                Transport::Shm(p) | Transport::Uds(p) => p.clone(),
                _ => unreachable!("only the two Unix transports are tried"),
            };
            let outcome = try_connect(Some(transport));
            assert_untrusted(&outcome, &path, &format!("runs as uid {OTHER_UID}, neither uid 0 nor root"));
            // The message names the path and what was found.
            let err = Client::connect_with(transport.clone(), ClientOptions::default()).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()) && text.contains("uid 65533"), "{text}");
        }
        // The daemon's own user is served, and the daemon never saw a
        // hello from the refused connections: this one is its first.
        let outcome = run_as(OTHER_UID, &format!("shm:{}", shm.display()));
        assert_eq!(outcome, Outcome::Admitted { accepted: 1 });
        let outcome = run_as(OTHER_UID, &format!("uds:{}", uds.display()));
        assert_eq!(outcome, Outcome::Admitted { accepted: 2 });
    });
}

/// `/tmp/ipcd-<uid>` of a user nobody is, removed when dropped.
struct FallbackDir {
    uid: u32,
    path: PathBuf,
}

impl FallbackDir {
    fn create() -> FallbackDir {
        // Unique to this process, so parallel runs never share one.
        let uid = 200_000 + std::process::id() % 100_000;
        let path = PathBuf::from(format!("/tmp/ipcd-{uid}"));
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot clear {}: {e}", path.display()),
        }
        std::fs::create_dir(&path).unwrap();
        set_owner_and_mode(&path, uid, 0o700);
        FallbackDir { uid, path }
    }
}

fn set_owner_and_mode(dir: &Path, owner: u32, mode: u32) {
    std::os::unix::fs::chown(dir, Some(owner), Some(owner)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for FallbackDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[test]
fn a_fallback_directory_not_private_to_the_user_is_refused() {
    if !is_root() {
        eprintln!("skipped: clients of another user need root to start");
        return;
    }
    // Dropped last: the daemon in it is stopped first.
    let fallback = FallbackDir::create();
    let (uid, dir) = (fallback.uid, fallback.path.clone());
    let socket = dir.join("ipcd.sock");
    // A daemon of the user's own, listening where the default path leads:
    // only the directory can be the reason for a refusal.
    let _daemon = DaemonAs::start(uid, &socket, &[]);
    watchdog(TEST_LIMIT, move || {
        // Anyone could have made it, and put a socket in it.
        set_owner_and_mode(&dir, uid, 0o777);
        assert_untrusted(&run_as(uid, "default"), &socket, "mode 777, writable by its group or others");
        set_owner_and_mode(&dir, uid, 0o775);
        assert_untrusted(&run_as(uid, "default"), &socket, "mode 775");
        // Someone else's, however private.
        set_owner_and_mode(&dir, 0, 0o755);
        assert_untrusted(&run_as(uid, "default"), &socket, &format!("owned by uid 0, not {uid}"));
        // The same path, given explicitly, is checked the same way.
        assert_untrusted(&run_as(uid, &format!("shm:{}", socket.display())), &socket, "owned by uid 0");
        // The user's own and private: connected.
        set_owner_and_mode(&dir, uid, 0o700);
        assert_eq!(run_as(uid, "default"), Outcome::Admitted { accepted: 1 });
    });
}
