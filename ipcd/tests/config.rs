//! The configuration file: `--check-config` on good and bad files, a
//! `SIGHUP` reload that tightens the allow list (the next new client of
//! the uid it drops is refused, its session already open goes on), a
//! reload of a bad file that changes nothing, and `--log-format json`.
//! The other uid is nobody, which takes root; without root that test says
//! "skipped".

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{poll_until, watchdog, Daemon, CLEANUP_LIMIT, IPCD, TEST_LIMIT};
use ipcd::introspect::Status;
use nix::sys::signal::Signal;

const IPCCTL: &str = env!("CARGO_BIN_EXE_ipcctl");
const NOBODY: u32 = 65534;

fn check(path: &Path) -> std::process::Output {
    Command::new(IPCD).arg("--check-config").arg(path).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn check_config_says_ok_to_a_good_file_and_names_the_mistake_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ipcd.toml");
    let socket = dir.path().join("never.sock");
    std::fs::write(
        &file,
        format!(
            "socket = {:?}\nmax-clients = 64\nstall-timeout = \"3s\"\nmax-shm = \"256M\"\nallow-gid = [0]\n\n\
             [[access]]\npattern = \"search.*\"\ncall = {{ uids = [1000] }}\n",
            socket.display().to_string()
        ),
    )
    .unwrap();
    let out = check(&file);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
    assert!(!socket.exists(), "a check starts nothing");

    // The shipped example is a good file too.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/ipcd.toml");
    assert_eq!(check(&example).status.code(), Some(0), "{}", String::from_utf8_lossy(&check(&example).stderr));

    for (text, named) in [
        ("max-clinets = 3\n", "max-clinets"),
        ("stall-timeout = \"soon\"\n", "stall-timeout"),
        ("max-sessions-per-uid = 0\n", "max-sessions-per-uid"),
        ("[[access]]\npattern = \"a..b\"\n", "access rule 1"),
        ("tcp = \"127.0.0.1:9\"\nallow-uid = [0]\n", "TCP"),
        ("not toml at all", "in "),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = check(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(named), "{text:?}: {stderr}");
    }
    let out = check(&dir.path().join("absent.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

fn status(socket: &Path) -> Status {
    let out = Command::new(IPCCTL).arg("--socket").arg(socket).args(["status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn as_nobody(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(IPCCTL);
    cmd.arg("--socket").arg(socket).args(args).uid(NOBODY).gid(NOBODY).stdin(Stdio::null());
    cmd
}

#[test]
fn a_reload_that_drops_a_uid_refuses_its_next_client_and_keeps_its_open_session() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: another uid needs root");
        return;
    }
    let dir = tempfile::Builder::new().prefix("ipcd-reload-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let file = dir.path().join("ipcd.toml");
    std::fs::write(&file, format!("allow-uid = [0, {NOBODY}]\nmax-clients = 100\n")).unwrap();
    let mut daemon =
        Daemon::builder().dir(dir).args(["--socket-mode", "666", "--log-level", "info", "--config"]).arg(&file).start();
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        // Nobody's session: a monitor that calls the daemon every 20 ms and
        // prints a line each time.
        let mut monitor = match as_nobody(&socket, &["monitor", "--interval", "20ms"]).stdout(Stdio::piped()).spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: uid {NOBODY} cannot run {IPCCTL}: {e}");
                return;
            }
            Err(e) => panic!("cannot run ipcctl as uid {NOBODY}: {e}"),
        };
        let mut lines = BufReader::new(monitor.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the monitor's first line").unwrap();
        assert!(first.starts_with("t="), "{first}");
        assert_eq!(as_nobody(&socket, &["status"]).output().unwrap().status.code(), Some(0), "admitted before");

        std::fs::write(&file, "allow-uid = [0]\nmax-clients = 50\n").unwrap();
        daemon.signal(Signal::SIGHUP);
        assert!(poll_until(CLEANUP_LIMIT, || status(&socket).reloads == 1), "{}", daemon.stderr());
        let s = status(&socket);
        assert_eq!(s.access.as_ref().unwrap().allow_uids, [0]);
        assert_eq!(s.clients.max, 50);
        assert!(
            daemon.stderr().contains("configuration reloaded: allow-uid [0, 65534] -> [0]; max-clients 100 -> 50"),
            "what changed is logged: {}",
            daemon.stderr()
        );

        // A new client of nobody's is refused, naming why...
        let out = as_nobody(&socket, &["status"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not permitted"), "{out:?}");
        // ...while its session open before goes on answering.
        for _ in 0..3 {
            let line = lines.next().expect("the monitor goes on").unwrap();
            assert!(line.starts_with("t="), "{line}");
        }
        assert!(monitor.try_wait().unwrap().is_none(), "the monitor still runs");

        // A file that does not check is logged and changes nothing.
        std::fs::write(&file, "allow-uid = [0]\nmax-clients = 0\n").unwrap();
        daemon.signal(Signal::SIGHUP);
        assert!(
            poll_until(CLEANUP_LIMIT, || daemon.stderr().contains("reload ignored")),
            "the bad reload is logged: {}",
            daemon.stderr()
        );
        assert!(daemon.stderr().contains("max-clients"), "{}", daemon.stderr());
        let s = status(&socket);
        assert_eq!((s.reloads, s.clients.max), (1, 50), "nothing applied");

        // Loosened again, nobody is admitted again.
        std::fs::write(&file, format!("allow-uid = [0, {NOBODY}]\n")).unwrap();
        daemon.signal(Signal::SIGHUP);
        assert!(poll_until(CLEANUP_LIMIT, || status(&socket).reloads == 2), "{}", daemon.stderr());
        assert_eq!(as_nobody(&socket, &["status"]).output().unwrap().status.code(), Some(0));

        monitor.kill().unwrap();
        monitor.wait().unwrap();
    });
}

#[test]
fn json_logs_are_one_object_a_line() {
    let mut daemon = Daemon::start(&["--log-level", "info", "--log-format", "json"]);
    watchdog(TEST_LIMIT, move || {
        daemon.signal(Signal::SIGHUP);
        assert!(poll_until(CLEANUP_LIMIT, || daemon.stderr().contains("no --config file")), "{}", daemon.stderr());
        let stderr = daemon.stderr();
        let mut messages = Vec::new();
        for line in stderr.lines() {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value["level"].is_string() && value["timestamp"].is_string(), "{line}");
            messages.push(value["fields"]["message"].as_str().unwrap_or_default().to_string());
        }
        assert!(messages.iter().any(|m| m == "ipcd listening"), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("no --config file")), "{messages:?}");
    });
}
