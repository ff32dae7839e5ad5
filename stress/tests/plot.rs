//! `--plot DIR`: a CI-sized run of every scenario, and a short soak, draw
//! the charts they should, each a well-formed SVG naming the transports it
//! compares.

mod common;

use std::path::Path;
use std::process::Command;

use common::binaries;

/// Runs stress with `args` and `--plot DIR`; returns the names of the files
/// in DIR, sorted, after checking the run passed and said where they are.
fn plot(args: &[&str], dir: &Path) -> Vec<String> {
    let (stress, ipcd) = binaries();
    let output = Command::new(&stress).args(args).arg("--plot").arg(dir).arg("--daemon").arg(&ipcd).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stress failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("plots in {}: ", dir.display())), "{stdout}");
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The text of each `<text>` element of an SVG, trimmed.
fn texts(svg: &str) -> Vec<&str> {
    svg.split("<text").skip(1).filter_map(|t| Some(t[t.find('>')? + 1..t.find("</text>")?].trim())).collect()
}

/// Checks that `path` is a whole SVG document (one root element, opened
/// first and closed last, every text element closed) drawing one line or
/// bar per transport, with a label starting with each transport's name.
fn check_svg(path: &Path, transports: &[&str]) {
    let svg = std::fs::read_to_string(path).unwrap();
    let name = path.display();
    let start = svg.trim_start();
    assert!(start.starts_with("<svg") || start.starts_with("<?xml"), "{name} does not open an SVG: {start:.80}");
    assert!(svg.trim_end().ends_with("</svg>"), "{name} is cut short");
    assert_eq!(svg.matches("<svg").count(), 1, "{name}");
    assert_eq!(svg.matches("</svg>").count(), 1, "{name}");
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count(), "{name}");
    let labels = texts(&svg);
    for t in transports {
        assert!(labels.iter().any(|l| l.starts_with(t)), "{name} names no {t}: {labels:?}");
    }
}

#[test]
fn every_scenario_is_drawn_per_transport() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let names = plot(&["--clients", "4", "--messages", "200", "--payload", "256"], &out);
    let mut want: Vec<String> = ["throughput", "latency", "pipelined", "bandwidth"]
        .iter()
        .map(|s| format!("latency-{s}-256B.svg"))
        .chain(["throughput", "latency", "pipelined"].iter().map(|s| format!("msgs-per-s-{s}-256B.svg")))
        .chain(["gb-per-s-bandwidth-256B.svg".to_string()])
        .collect();
    want.sort();
    assert_eq!(names, want);
    for n in &names {
        check_svg(&out.join(n), &["shm", "uds", "tcp"]);
    }
    // The latency chart's x axis: HdrHistogram's percentiles.
    let svg = std::fs::read_to_string(out.join("latency-throughput-256B.svg")).unwrap();
    let labels = texts(&svg);
    for p in ["0%", "90%", "99%", "99.9%"] {
        assert!(labels.contains(&p), "no {p} on the x axis: {labels:?}");
    }
}

#[test]
fn a_soak_draws_the_daemon_over_time() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--scenario", "throughput", "--transport", "shm", "--clients", "2", "--duration", "2"];
    let names = plot(&args, dir.path());
    assert_eq!(names, ["latency-throughput-64B.svg", "msgs-per-s-throughput-64B.svg", "soak-throughput-64B.svg"]);
    for n in &names {
        check_svg(&dir.path().join(n), &["shm"]);
    }
    let svg = std::fs::read_to_string(dir.path().join("soak-throughput-64B.svg")).unwrap();
    let labels = texts(&svg);
    for panel in ["daemon rss_anon (kB)", "daemon fds", "p99 of each minute (us)"] {
        assert!(labels.contains(&panel), "no {panel} panel: {labels:?}");
    }
}

#[test]
fn plot_refuses_the_hostile_scenario() {
    let (stress, _) = binaries();
    let out = Command::new(stress).args(["--scenario", "hostile", "--plot", "/nonexistent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--plot"));
}
