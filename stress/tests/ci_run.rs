//! CI-sized replays of the stress test through the real binaries: the
//! stress binary starts its own ipcd (built beside it by `cargo test`), runs
//! 8 clients x 2,000 verified echo calls (and every scenario over every
//! transport, smaller), and must report all of them succeeded in its JSON.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{binaries, poll_until};
use ipc_client::Client;

fn run(extra: &[&str]) -> serde_json::Value {
    let report =
        run_all(&["--scenario", "throughput", "--transport", "shm", "--clients", "8", "--messages", "2000"], extra);
    report["runs"][0].clone()
}

/// Runs stress with `args` and `extra`; returns its JSON report.
fn run_all(args: &[&str], extra: &[&str]) -> serde_json::Value {
    let (stress, ipcd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let output = Command::new(&stress)
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--daemon")
        .arg(&ipcd)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("PASS"), "{stdout}");
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn check(run: &serde_json::Value) {
    assert_eq!(run["scenario"], "throughput");
    assert_eq!(run["transport"], "shm");
    assert_eq!(run["clients"], 8);
    assert_eq!(run["messages_per_client"], 2000);
    assert_eq!(run["payload_bytes"], 64);
    assert_eq!(run["window"], 1);
    assert_eq!(run["sent"], 16_000);
    assert_eq!(run["succeeded"], 16_000);
    assert_eq!(run["failed"], 0);
    assert_eq!(run["mismatched"], 0);
    assert!(run["throughput_msgs_per_s"].as_f64().unwrap() > 0.0);
    let lat = &run["latency_us"];
    let (p50, p99, max) = (lat["p50"].as_f64().unwrap(), lat["p99"].as_f64().unwrap(), lat["max"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{lat}");
    for key in ["p90", "p999", "mean"] {
        assert!(lat[key].as_f64().unwrap() > 0.0, "latency {key} missing: {lat}");
    }
    assert!(run["connect_us"]["p50"].as_f64().unwrap() > 0.0);
    // call_into after connecting allocates nothing on the client side.
    assert_eq!(run["allocations_per_call"], 0.0, "{run}");
    // The daemon was read from /proc with 8 sessions attached: each holds at
    // least its control socket and doorbell, and its segment is resident.
    assert!(run["daemon"]["fds"].as_u64().unwrap() >= 16, "{}", run["daemon"]);
    assert!(run["daemon"]["rss_shmem_kb"].as_u64().unwrap() > 0, "{}", run["daemon"]);
    assert!(run["daemon"]["rss_anon_kb"].as_u64().unwrap() > 0, "{}", run["daemon"]);
    assert!(run["peak_rss_anon_kb"].as_u64().unwrap() >= run["daemon"]["rss_anon_kb"].as_u64().unwrap());
}

#[test]
fn threads_replay_passes_and_reports_every_figure() {
    check(&run(&[]));
}

#[test]
fn process_replay_passes() {
    check(&run(&["--procs"]));
}

#[test]
fn every_scenario_runs_over_every_transport_and_is_compared() {
    let (stress, ipcd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("all.json");
    let output = Command::new(&stress)
        .args(["--clients", "4", "--messages", "200", "--payload", "256", "--json"])
        .arg(&json)
        .arg("--daemon")
        .arg(&ipcd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("shm:uds") && stdout.contains("shm:tcp"), "no comparison table: {stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 12, "4 scenarios x 3 transports");
    for scenario in ["throughput", "latency", "pipelined", "bandwidth"] {
        for transport in ["shm", "uds", "tcp"] {
            let r = runs
                .iter()
                .find(|r| r["scenario"] == scenario && r["transport"] == transport)
                .unwrap_or_else(|| panic!("no {scenario} run over {transport}"));
            assert_eq!(r["succeeded"], r["sent"], "{r}");
            assert_eq!(r["sent"].as_u64().unwrap(), 4 * 200, "{r}");
            assert_eq!(r["failed"], 0);
            assert_eq!(r["mismatched"], 0);
            assert_eq!(r["allocations_per_call"], 0.0, "{scenario} over {transport} allocated: {r}");
            assert_eq!(r["window"], if scenario == "pipelined" { 32 } else { 1 });
            assert_eq!(r["bytes_per_s"].is_f64(), scenario == "bandwidth", "{r}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    let (stress, _) = binaries();
    let out = Command::new(stress).args(["--payload", "4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--payload"));
}

/// A run whose daemon dies counts the failed calls, still writes its
/// report, and exits 1: the pass/fail check can fail.
#[test]
fn failed_calls_are_counted_and_exit_1() {
    let (stress, ipcd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipcd.sock");
    let json = dir.path().join("run.json");
    // Both children die with this test's thread if it fails on the way.
    let mut daemon = Command::new(&ipcd);
    daemon.arg("--socket").arg(&socket).args(["--log-level", "error"]).stderr(std::process::Stdio::null());
    ipc_platform::die_with_parent(&mut daemon);
    let mut daemon = daemon.spawn().unwrap();
    let up = poll_until(Duration::from_secs(10), || std::os::unix::net::UnixStream::connect(&socket).is_ok());
    assert!(up, "ipcd did not start");
    // Reads the daemon's stats for the test: a third client.
    let mut observer = Client::connect_to(&socket).unwrap();
    let stats = observer.service("stats").unwrap();
    // Far more calls than can finish before the daemon is killed.
    let mut run = Command::new(&stress);
    run.args(["--scenario", "throughput", "--transport", "shm", "--clients", "2", "--messages", "100000000", "--json"])
        .arg(&json)
        .arg("--socket")
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    ipc_platform::die_with_parent(&mut run);
    let mut run = run.spawn().unwrap();
    // The daemon dies once both clients have connected and had calls
    // answered: each then has one call in flight, is about to send one
    // into the dead session, or has its last reply in hand as it finds
    // the daemon gone (and stops).
    // (The replies counted include the observer's earlier stats calls.)
    let mut stats_calls = 0;
    let calling = poll_until(Duration::from_secs(60), || {
        let reply = observer.call(&stats, b"").expect("stats call");
        let stats: serde_json::Value = serde_json::from_slice(&reply).unwrap();
        stats_calls += 1;
        stats["connected_clients"] == 3 && stats["replies"].as_u64().unwrap() > stats_calls + 1000
    });
    assert!(calling, "the stress clients did not connect and call");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    // The clients stop calling once disconnected (they have no reconnect
    // policy), so the run ends quickly; the limit is a backstop.
    let mut status = None;
    poll_until(Duration::from_secs(120), || {
        status = run.try_wait().unwrap();
        status.is_some()
    });
    let Some(status) = status else {
        run.kill().unwrap();
        panic!("stress did not finish after its daemon died");
    };
    assert_eq!(status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let run = &report["runs"][0];
    let (sent, ok, failed) =
        (run["sent"].as_u64().unwrap(), run["succeeded"].as_u64().unwrap(), run["failed"].as_u64().unwrap());
    // A client's call in flight at the crash ends as disconnected (at most
    // one per client); no call is lost or counted twice, the rest are never
    // made, and the report says why the run stopped short.
    let o = &run["outcomes"];
    let disconnected = o["disconnected"].as_u64().unwrap();
    assert!(disconnected <= 2, "{run}");
    assert_eq!(failed, disconnected, "{run}");
    assert!(sent < 200_000_000, "{run}");
    assert_eq!(ok + failed, sent, "{run}");
    assert_eq!(o["replied"].as_u64().unwrap() + disconnected, sent, "{run}");
    let why = run["first_error"].as_str().unwrap_or_else(|| panic!("no first error: {run}"));
    assert!(why.contains("disconnected"), "{run}");
    assert_eq!(run["lost"], 0, "{run}");
    assert_eq!(run["duplicated"], 0, "{run}");
}

/// Runs a fault-injection or soak run small, over every transport; returns
/// its RUNs after checking the outcome accounting of each.
fn chaos_runs(extra: &[&str]) -> Vec<serde_json::Value> {
    let report = run_all(&["--scenario", "throughput", "--transport", "all"], extra);
    let runs = report["runs"].as_array().unwrap().clone();
    assert_eq!(runs.len(), 3);
    for run in &runs {
        let o = &run["outcomes"];
        let total: u64 =
            ["replied", "timeout", "disconnected", "rejected", "shutdown"].iter().map(|k| o[k].as_u64().unwrap()).sum();
        assert_eq!(total, run["sent"].as_u64().unwrap(), "every call made has one outcome: {run}");
        assert_eq!(run["lost"], 0, "{run}");
        assert_eq!(run["duplicated"], 0, "{run}");
        assert_eq!(run["mismatched"], 0, "{run}");
    }
    runs
}

#[test]
fn killed_client_processes_leave_survivors_unharmed() {
    let runs = chaos_runs(&[
        "--procs",
        "--clients",
        "6",
        "--messages",
        "3000",
        "--chaos",
        "kill-clients:2",
        "--chaos-ms",
        "100",
    ]);
    for run in runs {
        // Only the survivors' calls are the run's, and all succeeded.
        assert_eq!(run["clients"], 4, "{run}");
        assert_eq!(run["failed"], 0, "{run}");
        let k = &run["kill_clients"];
        assert_eq!(k["killed"], 2, "{run}");
        assert!(k["cleanup_ms"].as_f64().unwrap() <= 1000.0, "{run}");
        assert!(k["daemon_after"]["fds"].as_u64().unwrap() <= k["daemon_before"]["fds"].as_u64().unwrap(), "{run}");
    }
}

#[test]
fn restarted_daemon_is_reconnected_to() {
    let runs =
        chaos_runs(&["--clients", "4", "--messages", "20000", "--chaos", "restart-daemon:2", "--chaos-ms", "100"]);
    for run in runs {
        let r = &run["restart_daemon"];
        assert_eq!(r["restarts"].as_array().unwrap().len(), 2, "{run}");
        for restart in r["restarts"].as_array().unwrap() {
            assert!(restart["recovery_ms"].as_f64().is_some(), "{run}");
        }
        // Only calls in flight at a crash fail, and they say so.
        let o = &run["outcomes"];
        assert_eq!(run["failed"], o["disconnected"], "{run}");
        assert_eq!(o["timeout"].as_u64().unwrap() + o["rejected"].as_u64().unwrap(), 0, "{run}");
    }
}

#[test]
fn sigterm_under_load_answers_shutdown_and_loses_nothing() {
    let runs = chaos_runs(&["--clients", "4", "--window", "8", "--chaos", "sigterm", "--chaos-ms", "150"]);
    for run in runs {
        let o = &run["outcomes"];
        assert!(o["shutdown"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(o["disconnected"], 0, "{run}");
        assert_eq!(run["sigterm"]["exit_code"], 0, "{run}");
    }
}

#[test]
fn soak_samples_the_daemon_every_second() {
    let report = run_all(&["--scenario", "throughput", "--transport", "shm", "--clients", "4", "--duration", "3"], &[]);
    let run = &report["runs"][0];
    let samples = run["samples"].as_array().unwrap();
    assert!((3..=5).contains(&samples.len()), "{run}");
    assert!(samples.iter().all(|s| s["rss_anon_kb"].as_u64().unwrap() > 0 && s["fds"].as_u64().unwrap() > 0));
    assert_eq!(run["soak"]["p99_us_per_minute"].as_array().unwrap().len(), 1, "{run}");
    assert_eq!(run["failed"], 0);
    assert!(run["duration_s"].as_f64().unwrap() >= 2.9, "{run}");
}

/// The hostile scenario, small: 4 clients make 2,000 verified calls alone,
/// then again while 4 hostile clients scribble over their segments and
/// flood their doorbells; the same against a provider's echo, the hostile
/// clients abusing sessions the daemon brokered with it; then 50 clients
/// connect in a row without and with 100 connections stalled in the
/// handshake.
#[test]
fn hostile_clients_and_stalled_handshakes_leave_normal_clients_unharmed() {
    let args = [
        "--scenario",
        "hostile",
        "--hostile",
        "4",
        "--clients",
        "4",
        "--messages",
        "2000",
        "--flood",
        "100",
        "--flood-connects",
        "50",
        "--handshake-timeout-ms",
        "500",
        "--seed",
        "1",
    ];
    // run_all requires the scenario's PASS: every normal call succeeded and
    // was made, the daemon lived, and every stalled connection was closed
    // at the handshake timeout (not before) without an answer.
    let report = run_all(&args, &[]);
    let runs = report["runs"].as_array().unwrap();
    let phases: Vec<(&str, &str, &str)> = runs
        .iter()
        .map(|r| {
            let phase = r["hostile"]["phase"].as_str().or(r["handshake_flood"]["phase"].as_str());
            let target = r["hostile"]["target"].as_str().unwrap_or("daemon");
            (r["scenario"].as_str().unwrap(), phase.unwrap_or("none"), target)
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("hostile", "baseline", "daemon"),
            ("hostile", "attack", "daemon"),
            ("hostile", "baseline", "provider"),
            ("hostile", "attack", "provider"),
            ("handshake-flood", "without", "daemon"),
            ("handshake-flood", "with", "daemon"),
        ]
    );

    let attack = &runs[1]["hostile"];
    assert!(attack["sessions_opened"].as_u64().unwrap() >= 4, "{attack}");
    assert!(attack["sessions_disconnected"].as_u64().unwrap() > 0, "{attack}");
    assert!(attack["daemon_disconnects"]["protocol_violation"].as_u64().unwrap() > 0, "{attack}");

    // The provider dropped the hostile callers' sessions (its normal
    // callers' calls all succeeded: run_all saw PASS) and reported each
    // to the daemon as a strike.
    assert_eq!(runs[3]["served_by"], "provider", "{}", runs[3]);
    let attack = &runs[3]["hostile"];
    assert!(attack["sessions_opened"].as_u64().unwrap() >= 4, "{attack}");
    let dropped = attack["sessions_disconnected"].as_u64().unwrap();
    assert!(dropped > 0, "{attack}");
    assert!(attack["strikes_reported"].as_u64().unwrap() > 0, "{attack}");

    // The daemon, not just our watch, saw each stalled handshake time out.
    let flood = &runs[5]["handshake_flood"];
    assert_eq!(flood["daemon_handshake_timeouts"], 100, "{flood}");
}

#[test]
fn hostile_scenario_refuses_options_it_cannot_honour() {
    let (stress, _) = binaries();
    for extra in [&["--socket", "/nonexistent.sock"][..], &["--procs"], &["--transport", "tcp"]] {
        let out = Command::new(&stress).args(["--scenario", "hostile"]).args(extra).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        // Refused by the scenario's own check, not by the argument parser.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--scenario hostile"), "{extra:?}: {stderr}");
    }
}

/// The stream scenario, small, over every transport: each client's
/// streams of stream.count end once each, after every item in order.
#[test]
fn stream_scenario_checks_every_item_and_one_terminal_per_stream() {
    let args = [
        "--scenario",
        "stream",
        "--clients",
        "4",
        "--streams",
        "3",
        "--messages",
        "200",
        "--payload",
        "64",
        "--window",
        "16",
    ];
    let report = run_all(&args, &[]);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "one run per transport");
    for r in runs {
        assert_eq!(r["scenario"], "stream", "{r}");
        assert_eq!(r["streams"], 12, "{r}");
        assert_eq!(r["outcomes"]["replied"], 12, "every stream ended: {r}");
        assert_eq!(r["terminals_duplicated"], 0, "{r}");
        assert_eq!(r["streams_lost"], 0, "{r}");
        let items = &r["items"];
        assert_eq!(items["expected"], 4 * 3 * 200, "{r}");
        assert_eq!(items["verified"], items["expected"], "{r}");
        for k in ["mismatched", "duplicated", "lost", "failed"] {
            assert_eq!(items[k], 0, "{k}: {r}");
        }
        assert!(r["items_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let l = &r["item_latency_us"];
        assert!(l["p50"].as_f64().unwrap() <= l["max"].as_f64().unwrap(), "{r}");
        assert!(r["first_item_us"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    }
    let goals = report["stream_goals"].as_array().unwrap();
    assert_eq!(goals.len(), 1);
    // 64 B items carry the goal, judged since the shm run passed.
    assert!(goals[0]["met"].is_boolean(), "{}", goals[0]);
}

/// Bandwidth beyond the ring, small: calls of 16 MiB go in chunks over
/// every transport, each verified, with the goals table and the heap check
/// of one call.
#[test]
fn bandwidth_beyond_the_ring_is_verified_and_heap_checked() {
    let args = ["--scenario", "bandwidth", "--clients", "2", "--messages", "2", "--payload", "16777216"];
    let report = run_all(&args, &[]);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "one run per transport");
    for r in runs {
        assert_eq!(r["succeeded"], 4, "{r}");
        assert_eq!(r["mismatched"], 0, "{r}");
        assert!(r["bytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let h = &r["heap_check"];
        assert_eq!(h["payload_bytes"], 16 << 20, "{r}");
        assert_eq!(h["verified"], true, "{r}");
        assert!(h["daemon_goal_met"].is_boolean(), "{r}");
        // The reply buffer is the caller's; the reader's growth is what the
        // library held of the reply.
        assert!(h["client_call_into_growth_kb"].is_i64(), "{r}");
        assert!(h["client_reader_growth_kb"].is_i64(), "{r}");
    }
    let goals = report["bandwidth_goals"].as_array().unwrap();
    assert_eq!(goals.len(), 1);
    assert!(goals[0]["shm_ge_uds"].is_boolean(), "judged: both runs passed: {}", goals[0]);
    assert!(goals[0]["shm_ge_goal"].is_boolean(), "{}", goals[0]);
}

/// Checks the calls of one run of `report`: all made, all right.
fn all_right(run: &serde_json::Value, calls: u64) {
    for (key, want) in [("sent", calls), ("succeeded", calls), ("failed", 0), ("mismatched", 0), ("lost", 0)] {
        assert_eq!(run[key], want, "{key}: {run}");
    }
    assert_eq!(run["duplicated"], 0, "{run}");
    assert!(run["throughput_msgs_per_s"].as_f64().unwrap() > 0.0, "{run}");
}

/// `--client async`, CI-sized: each run made by the blocking client, then
/// by the async client (a connection per task, then 4 tasks per
/// connection), with tokio_echo beside them and the goals judged. The
/// tokio_echo example is built by `cargo test -p stress` (not by a run
/// limited to this file).
#[test]
fn async_client_runs_beside_the_blocking_client_and_tokio_echo() {
    let args = ["--scenario", "throughput", "--transport", "shm", "--clients", "8", "--messages", "500"];
    let report = run_all(&args, &["--client", "async", "--async-share", "1,4"]);
    let runs = report["runs"].as_array().unwrap();
    let layout: Vec<(&str, Option<u64>)> =
        runs.iter().map(|r| (r["client"].as_str().unwrap(), r["tasks_per_connection"].as_u64())).collect();
    assert_eq!(layout, [("sync", None), ("async", Some(1)), ("async", Some(4))]);
    for run in runs {
        all_right(run, 4000);
    }
    assert_eq!(
        runs[1]["runtime_workers"].as_u64().unwrap() as usize,
        std::thread::available_parallelism().unwrap().get()
    );
    let baselines = report["baselines"].as_array().unwrap();
    let tokio: Vec<_> = baselines.iter().filter(|b| b["baseline"]["name"] == "tokio_echo").collect();
    assert_eq!(tokio.len(), 1, "{baselines:?}");
    assert_eq!(tokio[0]["baseline"]["calls"], 4000);
    // Per async run over shm: against the blocking client, against
    // tokio_echo, allocations; each judged, as both runs passed.
    let goals = report["async_goals"].as_array().unwrap();
    assert_eq!(goals.len(), 6, "{goals:?}");
    for g in goals {
        assert!(g["verdict"] == "met" || g["verdict"] == "MISSED", "{g}");
        assert!(g["measured"].as_f64().is_some(), "{g}");
    }

    // A window over a Unix socket, 2 tasks per connection, 2 workers.
    let args = ["--scenario", "pipelined", "--transport", "uds", "--clients", "4", "--messages", "1000"];
    let report = run_all(&args, &["--client", "async", "--async-share", "2", "--async-workers", "2"]);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        assert_eq!(run["window"], 32);
        all_right(run, 4000);
    }
    assert_eq!(runs[1]["client"], "async");
    assert_eq!(runs[1]["runtime_workers"], 2);
    let tokio = &report["baselines"][0]["baseline"];
    assert_eq!(
        (tokio["name"].as_str(), tokio["calls"].as_u64(), tokio["window"].as_u64()),
        (Some("tokio_echo"), Some(4000), Some(32))
    );
}

/// The idle scenario with one of its passes: 16 clients blocked in calls
/// their stopped daemon never answers, every one told `Disconnected` at
/// its SIGKILL; `--liveness watcher` runs the watcher's pass alone.
#[test]
fn idle_runs_the_watchers_pass_alone() {
    let (stress, ipcd) = binaries();
    let output = Command::new(&stress)
        .args(["--scenario", "idle", "--clients", "16", "--duration", "1", "--liveness", "watcher", "--daemon"])
        .arg(&ipcd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let rows: Vec<_> = stdout.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| liveness")).collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(rows[0].starts_with("| watcher thread |") && rows[0].ends_with("| 16 of 16 |"), "{stdout}");
    // The choice belongs to the idle scenario alone.
    let refused = Command::new(&stress).args(["--scenario", "throughput", "--liveness", "checks"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", String::from_utf8_lossy(&refused.stderr));
}
