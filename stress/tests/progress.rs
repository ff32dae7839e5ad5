//! Progress while a run runs: a bar on a terminal, plain lines (and never
//! an escape code) otherwise; stdout holds the same summaries either way.
//! `TERM` is set for every run here, so that only whether stderr is a
//! terminal decides.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::binaries;

/// How long a reader waits for the end of what stress wrote to the
/// terminal once stress has exited: only a failing test waits this long.
const LIMIT: Duration = Duration::from_secs(60);

/// A soak of `seconds` over shared memory, its progress a line every
/// 5 seconds when not on a terminal.
fn soak(seconds: &str) -> Command {
    let (stress, ipcd) = binaries();
    let mut command = Command::new(stress);
    command
        .args(["--scenario", "throughput", "--transport", "shm", "--clients", "2", "--duration", seconds])
        .arg("--daemon")
        .arg(ipcd)
        .env("TERM", "xterm")
        .stdin(Stdio::null());
    ipc_platform::die_with_parent(&mut command);
    command
}

fn check_summary(stdout: &str) {
    assert!(stdout.starts_with("throughput over shm: 2 clients x "), "{stdout}");
    assert!(stdout.contains("\n  result      PASS\n"), "{stdout}");
    assert!(!stdout.contains('\x1b') && !stdout.contains('\r'), "stdout is not plain: {stdout:?}");
}

#[test]
fn piped_output_has_plain_progress_lines_and_no_escape_codes() {
    // Past the first line's 5 seconds.
    let out = soak("6").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stress failed: {stdout}\n{stderr}");
    check_summary(&stdout);
    assert!(!stderr.contains("\x1b["), "escape codes on a pipe: {stderr:?}");
    assert!(!stderr.contains('\r'), "carriage returns on a pipe: {stderr:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("stress: throughput over shm (64 B): ")).collect();
    assert!(!lines.is_empty(), "no progress line by 6 s: {stderr}");
    assert!(lines[0].contains(" of 6 s, ") && lines[0].contains(" calls/s, "), "{}", lines[0]);
}

#[test]
fn a_terminal_gets_a_bar_and_stdout_stays_plain() {
    let size = nix::pty::Winsize { ws_row: 30, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(&size, None).unwrap();
    let mut child = {
        // The command holds the terminal's other end: dropped once spawned,
        // so the reader sees the end when stress (and what it started)
        // has gone.
        let mut command = soak("2");
        command.stdout(Stdio::piped()).stderr(Stdio::from(pty.slave));
        command.spawn().unwrap()
    };
    let mut terminal = std::fs::File::from(pty.master);
    let (sent, screen) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        // EIO once no one holds the other end.
        while let Ok(n @ 1..) = terminal.read(&mut chunk) {
            seen.extend_from_slice(&chunk[..n]);
        }
        let _ = sent.send(seen);
    });
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    let status = child.wait().unwrap();
    let seen = screen.recv_timeout(LIMIT).expect("the terminal was never closed");
    let seen = String::from_utf8_lossy(&seen);
    assert!(status.success(), "stress failed: {stdout}\n{seen}");
    check_summary(&stdout);
    // The bar, redrawn in place, with how far, how fast and how long.
    assert!(seen.contains("throughput over shm (64 B) ["), "no bar: {seen:?}");
    assert!(seen.contains(" of 2 s, ") && seen.contains(" calls/s, ") && seen.contains(" left"), "{seen:?}");
    assert!(seen.contains("\x1b["), "the bar was not redrawn in place: {seen:?}");
    // Not the lines meant for logs.
    assert!(!seen.contains("stress: throughput over shm"), "{seen:?}");
}
