//! `ipcctl` against a real daemon: its read commands agree with the calls
//! made, `call` takes its request from an argument, a file or stdin and
//! exits 1 on a failed call and 2 on a usage error, `monitor` prints one
//! line per sample off a terminal, and another uid sees only its own
//! sessions (run as nobody, which takes root; without root that part says
//! "skipped").

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{watchdog, Daemon, TEST_LIMIT};
use ipcd::introspect::{Sees, ServedBy, ServiceList, SessionList, Status, Transport};

const IPCCTL: &str = env!("CARGO_BIN_EXE_ipcctl");
/// The unprivileged user the other-uid checks run as (nobody).
const NOBODY: u32 = 65534;

fn ipcctl(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(IPCCTL);
    cmd.arg("--socket").arg(socket).args(args).stdin(Stdio::null());
    cmd
}

fn run(socket: &Path, args: &[&str]) -> Output {
    ipcctl(socket, args).output().expect("cannot run ipcctl")
}

/// Runs ipcctl and parses its stdout as JSON, checking it exited 0.
fn json<T: serde::de::DeserializeOwned>(socket: &Path, args: &[&str]) -> T {
    let out = run(socket, args);
    assert!(out.status.success(), "ipcctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_read_commands_count_the_calls_made_and_name_the_session_that_made_them() {
    let daemon = Daemon::start(&["--debug-services"]);
    let socket = daemon.socket().to_path_buf();
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        let mut client = ipc_client::Client::connect_to(&socket).unwrap();
        let echo = client.service("echo").unwrap();
        let fail = client.service("debug.fail").unwrap();
        for i in 0..7u8 {
            assert_eq!(client.call(&echo, &[i]).unwrap(), [i]);
        }
        for _ in 0..3 {
            assert!(client.call(&fail, b"x").is_err());
        }

        let services: ServiceList = json(&socket, &["services", "--json"]);
        let find = |name: &str| services.services.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("{name}"));
        assert_eq!((find("echo").calls, find("echo").errors), (Some(7), Some(0)));
        assert_eq!((find("debug.fail").calls, find("debug.fail").errors), (Some(3), Some(3)));
        assert_eq!(find("ipcd.status").served_by, ServedBy::Daemon);
        assert_eq!(services.viewer.sees, Sees::All);

        let clients: SessionList = json(&socket, &["clients", "--json"]);
        let ours = clients.sessions.iter().find(|s| s.id == client.session_id()).expect("our session is listed");
        assert_eq!(ours.transport, Transport::Shm);
        assert_eq!(ours.pid, Some(std::process::id() as i32));
        assert_eq!(ours.calls, Some(10));
        assert_eq!(ours.ring_size, Some(64 << 10));

        let status: Status = json(&socket, &["status", "--json"]);
        assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(status.pid, pid);
        assert!(status.clients.connected >= 2, "ours and ipcctl's: {status:?}");
        assert!(status.calls.requests >= 10 && status.calls.errors >= 3, "{:?}", status.calls);
        assert!(status.limits.sessions_per_uid.iter().any(|u| u.uid == 0 && u.sessions >= 2), "{status:?}");
        assert_eq!(status.listeners[0].kind, "control");
        assert!(status.access.is_some(), "root sees the access rules");

        // The plain text says the same.
        let text = String::from_utf8(run(&socket, &["services"]).stdout).unwrap();
        let line = text.lines().find(|l| l.starts_with("echo ")).expect("an echo line");
        assert_eq!(line.split_whitespace().take(4).collect::<Vec<_>>(), ["echo", "built-in", "7", "0"], "{text}");
        let text = String::from_utf8(run(&socket, &["status"]).stdout).unwrap();
        assert!(text.starts_with(&format!("ipcd {}", env!("CARGO_PKG_VERSION"))), "{text}");
    });
}

#[test]
fn call_takes_its_request_from_an_argument_a_file_or_stdin() {
    let daemon = Daemon::start(&["--debug-services"]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let out = run(&socket, &["call", "echo", "from an argument"]);
        assert!(out.status.success());
        assert_eq!(out.stdout, b"from an argument", "piped: exactly the reply");

        let file = tempfile::NamedTempFile::new().unwrap();
        let bytes = common::pattern(3, 5000);
        std::fs::write(file.path(), &bytes).unwrap();
        let out = run(&socket, &["call", "echo", "--file", file.path().to_str().unwrap()]);
        assert!(out.status.success());
        assert_eq!(out.stdout, bytes);

        let mut child =
            ipcctl(&socket, &["call", "echo"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(b"from stdin").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"from stdin");

        // A failed call is a runtime failure (1), with the reason.
        let out = run(&socket, &["call", "debug.fail", "abc"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("debug.fail asked to fail (3 bytes)"), "{out:?}");
        let out = run(&socket, &["call", "no.such.name"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no.such.name"), "{out:?}");

        // --timeout bounds the wait: debug.sleep for 3 s, waited for 100 ms.
        std::fs::write(file.path(), 3000u32.to_le_bytes()).unwrap();
        let out = run(&socket, &["--timeout", "100ms", "call", "debug.sleep", "--file", file.path().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no reply within 100ms"), "{out:?}");

        // Usage errors are 2.
        assert_eq!(run(&socket, &["call"]).status.code(), Some(2));
        assert_eq!(run(&socket, &["frobnicate"]).status.code(), Some(2));
        assert_eq!(run(&socket, &["call", "echo", "x", "--file", "y"]).status.code(), Some(2));
        // No daemon there: 1.
        let out = run(&socket.with_extension("absent"), &["status"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"), "{out:?}");
    });
}

#[test]
fn monitor_prints_a_line_per_sample_off_a_terminal() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let out = run(&socket, &["monitor", "--count", "3", "--interval", "50ms"]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in lines {
            assert!(line.starts_with("t=") && line.contains("sessions=1 "), "{line}");
            // The monitor's own calls are what the daemon served.
            assert!(line.contains("ipcd.status="), "{line}");
        }
        assert!(!text.contains('\x1b'), "no terminal codes in a pipe");
    });
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line() {
    let out = Command::new(IPCCTL).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("ipcctl") && script.contains("monitor") && script.contains("--json"), "{script}");
    let out = Command::new(IPCCTL).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH ipcctl") && page.contains("status"), "{page}");
    assert_eq!(Command::new(IPCCTL).args(["completions", "tcsh"]).output().unwrap().status.code(), Some(2));
}

#[test]
fn another_uid_sees_only_its_own_sessions_and_no_access_rules() {
    let dir = tempfile::Builder::new().prefix("ipcd-ipcctl-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let daemon = Daemon::builder().dir(dir).args(["--socket-mode", "666"]).start();
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let mut root_client = ipc_client::Client::connect_to(&socket).unwrap();
        let echo = root_client.service("echo").unwrap();
        root_client.call(&echo, b"root").unwrap();
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: another uid needs root");
            return;
        }
        let as_nobody = |args: &[&str]| {
            let mut cmd = ipcctl(&socket, args);
            cmd.uid(NOBODY).gid(NOBODY);
            cmd.output()
        };
        let out = match as_nobody(&["clients", "--json"]) {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: uid {NOBODY} cannot run {IPCCTL}: {e}");
                return;
            }
            Err(e) => panic!("cannot run ipcctl as uid {NOBODY}: {e}"),
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let clients: SessionList = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(clients.viewer.sees, Sees::Own);
        assert_eq!(clients.viewer.caller.map(|c| c.uid), Some(NOBODY));
        assert!(!clients.sessions.is_empty(), "its own session (ipcctl's) is listed");
        assert!(clients.sessions.iter().all(|s| s.uid == Some(NOBODY)), "only its own: {:?}", clients.sessions);

        let out = as_nobody(&["status", "--json"]).unwrap();
        let status: Status = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status.access, None, "no allow lists or rules for another uid");
        assert!(status.limits.sessions_per_uid.iter().all(|u| u.uid == NOBODY), "{:?}", status.limits);
        assert!(status.clients.connected >= 2, "the daemon-wide counts still show every session");

        // Root, asking the same, sees both uids' sessions.
        let clients: SessionList = json(&socket, &["clients", "--json"]);
        assert!(clients.sessions.iter().any(|s| s.id == root_client.session_id()));
        assert_eq!(clients.viewer.sees, Sees::All);
    });
}
