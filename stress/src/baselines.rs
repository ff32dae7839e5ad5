//! `--baselines`: the programs in `stress/examples` that bound what ipcd
//! can do, run beside its throughput and latency runs with the same
//! clients, calls and payload, so each comparison is a ratio measured in
//! one run.
//!
//! Each baseline is its own process (the example binary cargo places in
//! `examples/` beside stress), started through [`crate::started`] so it
//! cannot outlive stress, and prints one JSON line of figures
//! ([`BaselineFigures`]). Which run beside which scenario:
//!
//! - throughput: `shm_baseline` (the bar for shm) and `epoll_echo` (for
//!   uds and tcp);
//! - latency: the same two, and with one client the floors `spin_floor`
//!   (two threads busy-polling a word each way: against shm, which spins)
//!   and `futex_baseline` (two threads ping-ponging a futex word: against
//!   shm with `--spin-us 0`, which sleeps);
//! - with `--client async`, beside throughput, latency and pipelined:
//!   `tokio_echo` (tokio's `UnixStream` against a tokio echo server, with
//!   the scenario's window and the async runs' worker threads), the peer
//!   of the async client.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::report::{BaselineFigures, Spec};
use crate::started::{self, Stop};

/// Which baselines run: those of `--baselines`, that of `--client async`.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub classic: bool,
    pub tokio: bool,
}

/// The baselines of a scenario's runs, in the order they run.
pub fn for_spec(spec: &Spec, wanted: Wanted) -> Vec<&'static str> {
    let mut names = match spec.scenario {
        _ if !wanted.classic => Vec::new(),
        "throughput" => vec!["shm_baseline", "epoll_echo"],
        "latency" if spec.clients == 1 => vec!["shm_baseline", "epoll_echo", "spin_floor", "futex_baseline"],
        "latency" => vec!["shm_baseline", "epoll_echo"],
        _ => Vec::new(),
    };
    if wanted.tokio && matches!(spec.scenario, "throughput" | "latency" | "pipelined") {
        names.push("tokio_echo");
    }
    names
}

/// Where cargo puts example `name` of the build `exe` belongs to:
/// `target/<profile>/examples/<name>`.
fn binary(exe: &Path, name: &str) -> PathBuf {
    exe.with_file_name("examples").join(name)
}

/// Checks, before anything runs, that every baseline `specs` need is built.
pub fn check_built(exe: &Path, specs: &[Spec], wanted: Wanted) -> anyhow::Result<()> {
    for spec in specs {
        for name in for_spec(spec, wanted) {
            let path = binary(exe, name);
            if !path.exists() {
                bail!(
                    "{} not found: --baselines runs the example programs built beside stress; build them with \
                     `cargo build --release -p stress --examples` (without --release for a debug stress)",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Runs baseline `name` with `spec`'s clients, calls and payload (and the
/// spin limit ipcd was given; for tokio_echo, the window and the runtime's
/// `workers`), and returns what it printed.
pub fn run(
    exe: &Path,
    name: &str,
    spec: &Spec,
    spin: Option<Duration>,
    workers: usize,
) -> anyhow::Result<BaselineFigures> {
    let path = binary(exe, name);
    let mut command = Command::new(&path);
    command.arg("--clients").arg(spec.clients.to_string()).arg("--messages").arg(spec.messages.to_string());
    // The floors carry no payload and never spin by choice.
    if matches!(name, "shm_baseline" | "epoll_echo" | "tokio_echo") {
        command.arg("--payload").arg(spec.payload.to_string());
    }
    if name == "tokio_echo" {
        command.arg("--window").arg(spec.window.to_string()).arg("--workers").arg(workers.to_string());
    }
    if let (Some(spin), "shm_baseline") = (spin, name) {
        command.arg("--spin-us").arg(spin.as_micros().to_string());
    }
    command.arg("--json").stdin(Stdio::null()).stdout(Stdio::piped());
    let (mut child, registration) =
        started::spawn(&mut command, Stop::Kill).with_context(|| format!("cannot start {}", path.display()))?;
    let mut out = String::new();
    let read = child.stdout.take().expect("piped stdout").read_to_string(&mut out);
    let status = child.wait().with_context(|| format!("waiting for {name}"))?;
    drop(registration);
    read.with_context(|| format!("reading what {name} printed"))?;
    if !status.success() {
        bail!("baseline {name} failed ({status}); its error is above");
    }
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let figures: BaselineFigures =
        serde_json::from_str(line).with_context(|| format!("baseline {name} printed {line:?}, not its figures"))?;
    let planned = spec.clients as u64 * spec.messages;
    if figures.calls != planned {
        bail!("baseline {name} made {} calls instead of {planned}", figures.calls);
    }
    Ok(figures)
}
