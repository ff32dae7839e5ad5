//! stress: replays ipcd's million-message test (100 clients x 10,000
//! synchronous echo calls) against a daemon it starts itself, checks every
//! reply, and reports throughput, latency percentiles and the daemon's
//! memory.

#![forbid(unsafe_code)]

mod daemon;
mod report;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use crate::daemon::{PeakSampler, PrivateDaemon};
use crate::report::{Report, Run};
use crate::workload::{Workload, MIN_PAYLOAD};

/// Replays the million-message test against ipcd and reports what it
/// measured.
///
/// With no arguments: starts a private ipcd (the binary beside this one) on a
/// temporary socket, runs 100 clients x 10,000 synchronous echo calls of 64
/// bytes, each client with its own connection in its own thread, checks
/// every reply byte for byte, and prints throughput, round-trip latency
/// percentiles and the daemon's memory. Exits 1 if any call failed or a
/// reply did not match.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 100)]
    clients: usize,

    /// Calls per client.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,

    /// Payload bytes per call (at least 12: client id and sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,

    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Use the daemon already running on this socket instead of starting one.
    #[arg(long, conflicts_with = "daemon")]
    socket: Option<PathBuf>,

    /// The ipcd binary to start [default: ipcd beside this binary]
    #[arg(long)]
    daemon: Option<PathBuf>,

    /// Run each client in its own process instead of its own thread.
    #[arg(long)]
    procs: bool,

    /// Timeout of each call, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    call_timeout_ms: u64,

    /// Internal: run as client process number ID of a --procs run.
    #[arg(long, hide = true)]
    child_client: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = validate(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(id) = args.child_client {
        return match workload::child_main(&workload(&args, args.socket.clone().unwrap_or_default()), id) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: client process {id}: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn validate(args: &Args) -> Result<(), String> {
    if args.clients == 0 || args.messages == 0 {
        return Err("--clients and --messages must be at least 1".into());
    }
    if args.payload < MIN_PAYLOAD {
        return Err(format!("--payload must be at least {MIN_PAYLOAD} bytes (client id and sequence number)"));
    }
    if args.child_client.is_some() && args.socket.is_none() {
        return Err("--child-client needs --socket".into());
    }
    Ok(())
}

fn workload(args: &Args, socket: PathBuf) -> Workload {
    Workload {
        socket,
        messages: args.messages,
        payload: args.payload,
        call_timeout: Duration::from_millis(args.call_timeout_ms),
    }
}

/// The daemon's usage after the calls; zeros (with a warning) if it can no
/// longer be read, for example because the daemon died, so the run is still
/// reported.
fn daemon_usage(pid: i32) -> daemon::ProcessUsage {
    daemon::usage(pid).unwrap_or_else(|e| {
        eprintln!("warning: cannot read /proc/{pid} of the daemon: {e}; its figures are reported as 0");
        daemon::ProcessUsage::default()
    })
}

/// Runs the test; returns whether it passed.
fn run(args: Args) -> anyhow::Result<bool> {
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let private = match &args.socket {
        Some(_) => None,
        None => {
            let binary = args.daemon.clone().unwrap_or_else(|| exe.with_file_name("ipcd"));
            if !binary.exists() {
                bail!("{} not found; build it (cargo build --release) or pass --daemon PATH", binary.display());
            }
            Some(PrivateDaemon::start(&binary, args.clients)?)
        }
    };
    let socket = match (&args.socket, &private) {
        (Some(s), _) => s.clone(),
        (None, Some(d)) => d.socket().to_path_buf(),
        (None, None) => unreachable!("a private daemon is started when no socket is given"),
    };
    let pid = daemon::daemon_pid(&socket)?;
    let w = workload(&args, socket);
    let sampler = PeakSampler::start(pid, Duration::from_millis(20));
    let (outcomes, elapsed, usage) = if args.procs {
        let (outcomes, elapsed, guard) = workload::run_procs(&w, args.clients, &exe)?;
        let usage = daemon_usage(pid);
        drop(guard);
        (outcomes, elapsed, usage)
    } else {
        let (outcomes, elapsed, clients) = workload::run_threads(&w, args.clients);
        let usage = daemon_usage(pid);
        drop(clients);
        (outcomes, elapsed, usage)
    };
    let peak = sampler.finish();
    let run = Run::from_outcomes(&outcomes, args.messages, args.payload, elapsed, usage, peak.max(usage.rss_anon_kb));
    print!("{}", run.summary(if args.procs { "processes" } else { "threads" }));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Report { runs: std::slice::from_ref(&run) })?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(d) = private {
        d.stop()?;
    }
    Ok(run.passed())
}
