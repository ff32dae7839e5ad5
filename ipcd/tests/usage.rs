//! Usage errors of the binary: a value it cannot honour is refused before
//! anything is bound, with a clap-style message naming the flag, and exit
//! status 2.

mod common;

use std::process::Stdio;

use common::{ipcd_command, watchdog, TEST_LIMIT};

/// Runs ipcd with `args` on a socket in a fresh directory; returns its exit
/// code and stderr, and whether it created the socket.
fn run(args: &[&str]) -> (Option<i32>, String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipcd.sock");
    let output =
        ipcd_command().arg("--socket").arg(&socket).args(args).stdin(Stdio::null()).output().expect("cannot run ipcd");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned(), socket.exists())
}

#[test]
fn an_unknown_log_level_is_a_usage_error() {
    watchdog(TEST_LIMIT, || {
        for level in ["bogus", "ipcd=loud", "debug,"] {
            let (code, stderr, bound) = run(&["--log-level", level]);
            assert_eq!(code, Some(2), "--log-level {level:?}: stderr:\n{stderr}");
            assert!(stderr.contains("invalid value") && stderr.contains("--log-level"), "{level:?}: {stderr}");
            assert!(stderr.contains("names no level"), "{level:?}: {stderr}");
            assert!(!bound, "--log-level {level:?}: the daemon bound its socket before refusing");
        }
    });
}

#[test]
fn limits_out_of_range_are_usage_errors() {
    watchdog(TEST_LIMIT, || {
        for args in [
            ["--max-shm", "lots"],
            ["--max-sessions-per-uid", "0"],
            ["--max-pending-handshakes", "0"],
            ["--max-pending-handshakes", "many"],
        ] {
            let (code, stderr, bound) = run(&args);
            assert_eq!(code, Some(2), "{args:?}: stderr:\n{stderr}");
            assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
            assert!(!bound, "{args:?}: the daemon bound its socket before refusing");
        }
        // A budget below the smallest session is refused with the rest of
        // the configuration, before anything starts: a usage error naming
        // it (as `--check-config` says of the same value in a file).
        let (code, stderr, bound) = run(&["--max-shm", "4K"]);
        assert_eq!(code, Some(2), "stderr:\n{stderr}");
        assert!(stderr.contains("smallest session"), "{stderr}");
        assert!(!bound);
    });
}
