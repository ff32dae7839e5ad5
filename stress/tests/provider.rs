//! The provider scenario, CI-sized, through the real binaries: stress
//! starts its own ipcd and a provider process offering `stress.echo`, runs
//! the workloads against the daemon's echo and the provider's, resolves
//! the provided name in a row, and (with --chaos) kills the provider or
//! the daemon under brokered calls. Each test reads the run's JSON.

mod common;

use std::process::Command;

use common::binaries;
use serde_json::Value;

/// Runs stress with `args` against the ipcd beside it; returns its JSON
/// report after checking that it passed.
fn stress_json(args: &[&str]) -> Value {
    let (stress, ipcd) = binaries();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let output = Command::new(&stress).args(args).arg("--json").arg(&json).arg("--daemon").arg(&ipcd).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("PASS"), "{stdout}");
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing: {v}"))
}

/// Every call made has exactly one outcome, none lost or given twice, and
/// every reply that came was the call's own.
fn check_outcomes(run: &Value) {
    let o = &run["outcomes"];
    let total: u64 = ["replied", "timeout", "disconnected", "rejected", "shutdown"].iter().map(|k| count(o, k)).sum();
    assert_eq!(total, count(run, "sent"), "every call made has one outcome: {run}");
    assert_eq!(run["lost"], 0, "{run}");
    assert_eq!(run["duplicated"], 0, "{run}");
    assert_eq!(run["mismatched"], 0, "{run}");
    assert_eq!(count(run, "succeeded"), count(o, "replied"), "{run}");
}

#[test]
fn the_providers_echo_is_measured_beside_the_daemons() {
    let report = stress_json(&["--scenario", "provider", "--clients", "4", "--messages", "2000", "--resolves", "20"]);
    let runs = report["runs"].as_array().unwrap();
    let plan: Vec<(&str, &str)> =
        runs.iter().map(|r| (r["scenario"].as_str().unwrap(), r["served_by"].as_str().unwrap())).collect();
    assert_eq!(
        plan,
        [
            ("throughput", "daemon"),
            ("throughput", "provider"),
            ("latency", "daemon"),
            ("latency", "provider"),
            ("pipelined", "daemon"),
            ("pipelined", "provider"),
        ]
    );
    for run in runs {
        check_outcomes(run);
        assert_eq!(run["transport"], "shm", "{run}");
        assert_eq!(count(run, "sent"), 4 * 2000, "{run}");
        assert_eq!(run["succeeded"], run["sent"], "{run}");
        assert_eq!(run["allocations_per_call"], 0.0, "calls through the provider allocate nothing either: {run}");
        assert!(run["throughput_msgs_per_s"].as_f64().unwrap() > 0.0, "{run}");
        // The process that served the calls was measured: its sessions'
        // segments are resident.
        assert!(count(&run["daemon"], "rss_shmem_kb") > 0, "{run}");
    }

    let provider = &report["provider"];
    assert_eq!(provider["service"], "stress.echo", "{provider}");
    assert!(count(provider, "workers") >= 1, "{provider}");
    assert_eq!(count(provider, "max_ring_size"), 16 << 20, "{provider}");
    let resolve = &provider["resolve"];
    assert_eq!(resolve["resolves"], 20, "{resolve}");
    assert_eq!(resolve["failed"], 0, "{resolve}");
    for figures in [&resolve["resolve_us"], &resolve["broker_open_us"]] {
        let (p50, p99, max) =
            (figures["p50"].as_f64().unwrap(), figures["p99"].as_f64().unwrap(), figures["max"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{resolve}");
    }
    let comparison = provider["comparison"].as_array().unwrap();
    let rows: Vec<(&str, &str)> =
        comparison.iter().map(|c| (c["scenario"].as_str().unwrap(), c["figure"].as_str().unwrap())).collect();
    assert_eq!(rows, [("throughput", "msgs_per_s"), ("latency", "p50_us"), ("pipelined", "msgs_per_s")]);
    for row in comparison {
        let (daemon, provider, ratio) =
            (row["daemon"].as_f64().unwrap(), row["provider"].as_f64().unwrap(), row["ratio"].as_f64().unwrap());
        assert!(daemon > 0.0 && provider > 0.0, "{row}");
        assert!((ratio - provider / daemon).abs() < 1e-9, "{row}");
    }
    // The throughput goal is judged in every run (a figure, not a pass
    // condition); the latency goal only for one client.
    assert!(comparison.iter().all(|row| row["runs_passed"] == true), "{provider}");
    assert_eq!(comparison[0]["goal"], ">= 0.9", "{}", comparison[0]);
    assert!(comparison[0]["met"].is_boolean(), "{}", comparison[0]);
    assert!(comparison[1].get("goal").is_none(), "{}", comparison[1]);
}

#[test]
fn callers_reach_a_killed_provider_again() {
    let report = stress_json(&[
        "--scenario",
        "provider",
        "--clients",
        "4",
        "--messages",
        "20000",
        "--chaos",
        "kill-provider:1",
        "--chaos-ms",
        "100",
        "--seed",
        "1",
    ]);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    let run = &runs[0];
    check_outcomes(run);
    assert_eq!(run["served_by"], "provider", "{run}");
    // Only calls in flight at the kill fail, and they say so; every other
    // call succeeded, through the new provider.
    let o = &run["outcomes"];
    assert_eq!(run["failed"], o["disconnected"], "{run}");
    assert_eq!(count(o, "timeout") + count(o, "rejected") + count(o, "shutdown"), 0, "{run}");
    assert_eq!(count(run, "sent"), 4 * 20_000, "{run}");
    let k = &run["kill_provider"];
    assert_eq!(k["seed"], 1, "{k}");
    let kills = k["kills"].as_array().unwrap();
    assert_eq!(kills.len(), 1, "{k}");
    let kill = &kills[0];
    assert!(kill["recovery_ms"].as_f64().unwrap() > 0.0, "{k}");
    assert!(kill["registered_ms"].as_f64().unwrap() >= kill["start_to_registered_ms"].as_f64().unwrap(), "{k}");
    assert_eq!(count(kill, "disconnected"), count(o, "disconnected"), "{k}");
    assert_eq!(k["disconnected_before_any_kill"], 0, "{k}");
}

#[test]
fn brokered_calls_go_on_while_the_daemon_restarts() {
    let report = stress_json(&[
        "--scenario",
        "provider",
        "--clients",
        "4",
        "--messages",
        "20000",
        "--chaos",
        "restart-daemon:1",
        "--chaos-ms",
        "100",
    ]);
    let run = &report["runs"][0];
    check_outcomes(run);
    assert_eq!(run["served_by"], "provider", "{run}");
    // Established sessions need nothing of the daemon: no call failed.
    assert_eq!(count(run, "sent"), 4 * 20_000, "{run}");
    assert_eq!(run["failed"], 0, "{run}");
    let r = &run["restart_daemon_brokered"];
    let restarts = r["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 1, "{r}");
    // The provider registered with the new daemon by itself.
    assert!(restarts[0]["registered_ms"].as_f64().is_some(), "{r}");
    assert_eq!(r["failed_while_down"], 0, "{r}");
    assert_eq!(r["failed_calls"], 0, "{r}");
}

#[test]
fn the_provider_scenario_refuses_options_it_cannot_honour() {
    let (stress, _) = binaries();
    let cases: [&[&str]; 5] = [
        &["--scenario", "provider", "--transport", "tcp"],
        &["--scenario", "provider", "--procs"],
        &["--scenario", "provider", "--chaos", "sigterm"],
        &["--scenario", "provider", "--socket", "/nonexistent.sock"],
        &["--scenario", "throughput", "--chaos", "kill-provider:1"],
    ];
    for args in cases {
        let out = Command::new(&stress).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("provider"), "{args:?}: {stderr}");
    }
}
