//! `stress --baselines`, CI-sized: the baseline programs run beside ipcd
//! with the scenario's clients and calls, their rows reach the JSON with
//! positive figures, and every ratio is the one their figures and ipcd's
//! give.
//!
//! The baselines are this package's examples, which `cargo test -p stress`
//! (and `cargo test --workspace`) builds beside the stress binary; a test
//! run limited to this file (`--test baselines`) does not build them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binaries, children, poll_until};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A stress run that has not ended by then is killed and the test fails.
const WATCHDOG: Duration = Duration::from_secs(300);

/// Runs `command` to its end, or kills it at the watchdog.
fn output(command: &mut Command) -> Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Drain both pipes while waiting, so a full pipe cannot stall the run.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(&mut stdout).unwrap());
    let err = std::thread::spawn(move || std::io::read_to_string(&mut stderr).unwrap());
    let deadline = Instant::now() + WATCHDOG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("stress did not finish within {WATCHDOG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().unwrap().into_bytes(), stderr: err.join().unwrap().into_bytes() }
}

/// The example programs `--baselines` runs, checked to be built.
fn examples(stress: &Path) -> PathBuf {
    let dir = stress.with_file_name("examples");
    for name in ["shm_baseline", "epoll_echo", "spin_floor", "futex_baseline"] {
        assert!(
            dir.join(name).exists(),
            "{} is missing: run the package's tests (cargo test -p stress), which build its examples",
            dir.join(name).display()
        );
    }
    dir
}

/// Runs stress with `--baselines` and `args`; returns its stdout and JSON.
fn run(args: &[&str]) -> (String, serde_json::Value) {
    let (stress, ipcd) = binaries();
    examples(&stress);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let out =
        output(Command::new(&stress).args(args).arg("--baselines").arg("--json").arg(&json).arg("--daemon").arg(&ipcd));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (stdout, serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap())
}

fn f64_of(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks each baseline row: made with the scenario's clients and calls,
/// every figure positive, and one ratio per transport ipcd ran, equal to
/// the one the two figures give.
fn check_rows(report: &serde_json::Value, scenario: &str, clients: u64, messages: u64, names: &[&str]) {
    let runs = report["runs"].as_array().unwrap();
    let rows = report["baselines"].as_array().unwrap_or_else(|| panic!("no baselines in the JSON: {report}"));
    let got: Vec<&str> = rows.iter().map(|r| r["baseline"]["name"].as_str().unwrap()).collect();
    assert_eq!(got, names, "{report}");
    for row in rows {
        let b = &row["baseline"];
        let name = b["name"].as_str().unwrap();
        assert_eq!(row["scenario"], scenario, "{row}");
        assert_eq!(row["payload_bytes"], 64, "{row}");
        assert_eq!(b["clients"], clients, "{row}");
        assert_eq!(b["messages_per_client"], messages, "{row}");
        assert_eq!(b["calls"], clients * messages, "{row}");
        let payload = if name.ends_with("floor") || name == "futex_baseline" { 0 } else { 64 };
        assert_eq!(b["payload_bytes"], payload, "{row}");
        for key in ["duration_s", "msgs_per_s", "p50_us", "p90_us", "p99_us", "max_us"] {
            assert!(f64_of(&b[key]) > 0.0, "{name} {key}: {row}");
        }
        let (p50, p99, max) = (f64_of(&b["p50_us"]), f64_of(&b["p99_us"]), f64_of(&b["max_us"]));
        assert!(p50 <= p99 && p99 <= max, "{row}");

        let latency = scenario == "latency";
        assert_eq!(row["compared"], if latency { "p50_us" } else { "msgs_per_s" }, "{row}");
        let ratios = row["ratios"].as_object().unwrap();
        let compared: Vec<&serde_json::Value> = runs.iter().filter(|r| r["scenario"] == scenario).collect();
        assert_eq!(ratios.len(), compared.len(), "one ratio per transport: {row}");
        for r in compared {
            let transport = r["transport"].as_str().unwrap();
            let want = if latency {
                p50 / f64_of(&r["latency_us"]["p50"])
            } else {
                f64_of(&r["throughput_msgs_per_s"]) / f64_of(&b["msgs_per_s"])
            };
            let ratio = f64_of(&ratios[transport]);
            assert!(ratio > 0.0 && (ratio - want).abs() <= 1e-9 * want, "{name} {transport}: {ratio} vs {want}");
        }
    }
}

#[test]
fn throughput_baselines_run_beside_every_transport() {
    let args = ["--scenario", "throughput", "--transport", "all", "--clients", "4", "--messages", "500"];
    let (stdout, report) = run(&args);
    assert!(stdout.contains("baseline shm_baseline beside throughput"), "{stdout}");
    assert!(stdout.contains("shm:base") && stdout.contains("tcp:base"), "no baseline table: {stdout}");
    check_rows(&report, "throughput", 4, 500, &["shm_baseline", "epoll_echo"]);
}

#[test]
fn one_client_latency_runs_the_floors_too() {
    let (stdout, report) = run(&["--scenario", "latency", "--transport", "shm", "--messages", "2000"]);
    assert!(stdout.contains("baseline spin_floor beside latency"), "{stdout}");
    check_rows(&report, "latency", 1, 2000, &["shm_baseline", "epoll_echo", "spin_floor", "futex_baseline"]);
}

#[test]
fn baselines_refuse_runs_they_cannot_match() {
    let (stress, _) = binaries();
    for extra in
        [&["--scenario", "pipelined"][..], &["--scenario", "throughput", "--window", "4"], &["--duration", "1"]]
    {
        let out = output(Command::new(&stress).arg("--baselines").args(extra));
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--baselines"), "{extra:?}");
    }
}

/// A stress without its examples beside it says how to build them, before
/// starting anything.
#[test]
fn missing_baselines_name_the_build_command() {
    let (stress, ipcd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("stress");
    std::fs::copy(&stress, &alone).unwrap();
    let out = output(Command::new(&alone).args(["--scenario", "latency", "--baselines", "--daemon"]).arg(&ipcd));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cargo build --release -p stress --examples"), "{stderr}");
    assert!(!stderr.contains("private ipcd started"), "{stderr}");
}

/// A baseline is one of the processes stress stops on SIGTERM: one caught
/// running (after ipcd's run, for seconds) is gone when stress has exited.
#[test]
fn sigterm_stops_a_running_baseline() {
    let (stress, ipcd) = binaries();
    examples(&stress);
    let limit = Duration::from_secs(60);
    let mut command = Command::new(&stress);
    command
        .args(["--scenario", "throughput", "--transport", "shm", "--clients", "2", "--messages", "200000"])
        .arg("--baselines")
        .arg("--daemon")
        .arg(&ipcd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Should this test die, stress dies with it.
    ipc_platform::die_with_parent(&mut command);
    let mut run = command.spawn().unwrap();
    let echo = child_named(&mut run, "epoll_echo", limit);
    kill(Pid::from_raw(run.id() as i32), Signal::SIGTERM).unwrap();
    let mut status = None;
    poll_until(limit, || {
        status = run.try_wait().unwrap();
        status.is_some()
    });
    let gone = poll_until(limit, || echo.is_gone());
    if status.is_none() || !gone {
        let _ = run.kill();
        let _ = run.wait();
        echo.kill();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(128 + Signal::SIGTERM as i32), "{status:?}");
    assert!(gone, "epoll_echo (pid {}) outlived stress", echo.pid);
}

/// `tokio_echo --server-process` serves from a child process: every call
/// is made and checked (the program fails on any wrong reply), the child
/// exits once the clients hang up, and it dies with the program if that
/// is killed.
#[test]
fn tokio_echo_serves_from_its_own_process() {
    let (stress, _) = binaries();
    let echo = stress.with_file_name("examples").join("tokio_echo");
    assert!(echo.exists(), "{} is missing: run the package's tests (cargo test -p stress)", echo.display());
    let args = ["--server-process", "--clients", "4", "--messages", "200", "--json"];
    let out = output(Command::new(&echo).args(args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["calls"], 800, "{line}");
    assert_eq!(line["server_process"], true, "{line}");

    let limit = Duration::from_secs(60);
    let mut command = Command::new(&echo);
    command.args(["--server-process", "--messages", "100000000"]).stdout(Stdio::null()).stderr(Stdio::null());
    ipc_platform::die_with_parent(&mut command);
    let mut run = command.spawn().unwrap();
    let server = child_named(&mut run, "tokio_echo", limit);
    run.kill().unwrap();
    run.wait().unwrap();
    let gone = poll_until(limit, || server.is_gone());
    if !gone {
        server.kill();
    }
    assert!(gone, "the server process (pid {}) outlived tokio_echo", server.pid);
}

/// The first child of `run` named `comm`, waited for up to `limit`; if
/// none comes, `run` is killed and the test fails.
fn child_named(run: &mut std::process::Child, comm: &str, limit: Duration) -> common::Proc {
    let mut found = Vec::new();
    let caught = poll_until(limit, || {
        found = children(run.id(), comm);
        !found.is_empty()
    });
    if !caught {
        let _ = run.kill();
        let _ = run.wait();
        panic!("process {} started no {comm} within {limit:?}", run.id());
    }
    found.swap_remove(0)
}
