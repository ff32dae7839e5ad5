//! The provider process: this binary again (`--child-provider WORKERS`),
//! offering [`SERVICE`], an echo, through the private daemon with the
//! daemon's own engine settings (workers, spin limit, largest ring, stall
//! timeout), as a program that provides a service would; and its handle in
//! stress, which starts it, kills it and starts it again.
//!
//! The process says on stdout when its registration is done: `registered
//! ID NS`, the daemon's id for it and the moment its `connect()` returned,
//! read from the monotonic clock, which `Instant` reads too, so stress
//! takes the moment as it was in the provider rather than when it got to
//! read the line. It serves until its stdin closes, then stops as a
//! provider stops (answering what waits with a shutdown error).

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipcd::{Provider, ProviderError, Request, ServiceError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::started::{self, Registration, Stop};

/// The name the provider offers: an echo, as the daemon's `echo`.
pub const SERVICE: &str = "stress.echo";

/// The largest ring both the private daemon (`--max-ring-size`) and the
/// provider accept: the daemon's default.
pub const MAX_RING_SIZE: u32 = 16 << 20;

/// How long a provider process keeps trying to register: a provider just
/// killed may still hold the name until the daemon has seen it hang up.
const REGISTER_PATIENCE: Duration = Duration::from_secs(10);

/// The body of the provider process: registers [`SERVICE`] with the daemon
/// at `socket`, says so, and serves until stdin closes.
pub fn child_main(socket: &Path, workers: usize, spin: Option<Duration>) -> anyhow::Result<()> {
    let deadline = Instant::now() + REGISTER_PATIENCE;
    let provider = loop {
        let mut builder = Provider::builder()
            .socket(socket)
            .workers(workers)
            .max_ring_capacity(MAX_RING_SIZE)
            .stall_timeout(ipcd::DEFAULT_STALL_TIMEOUT)
            // The daemon's own echo, inline on the worker as its is.
            .service_into(SERVICE, |request: &Request<'_>, reply: &mut Vec<u8>| {
                reply.extend_from_slice(request.payload());
                Ok::<(), ServiceError>(())
            });
        if let Some(spin) = spin {
            builder = builder.spin(spin);
        }
        match builder.connect() {
            Ok(provider) => break provider,
            // Taken: the daemon has not yet seen the killed provider hang
            // up; unreachable: a daemon restarting.
            Err(ProviderError::Refused(_) | ProviderError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot register {SERVICE}"))),
        }
    };
    let registered = monotonic_ns();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "registered {} {registered}", provider.provider_id())?;
    stdout.flush()?;
    drop(stdout);
    let stop = provider.shutdown_handle();
    std::thread::Builder::new()
        .name("provider-stdin".into())
        .spawn(move || {
            // Anything, or the end of stdin (stress gone or done), stops it.
            let mut byte = [0u8; 1];
            let _ = std::io::stdin().lock().read(&mut byte);
            stop.shutdown();
        })
        .context("cannot start the stdin thread")?;
    provider.run().context("the provider failed")?;
    Ok(())
}

/// The monotonic clock in nanoseconds: what `Instant` reads on Linux.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("the monotonic clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The `Instant` of a moment another process read as `ns` from the
/// monotonic clock.
fn instant_of(ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    match now_ns.checked_sub(ns) {
        Some(ago) => now.checked_sub(Duration::from_nanos(ago)).unwrap_or(now),
        None => now + Duration::from_nanos(ns - now_ns),
    }
}

/// The engine settings a provider process runs with: the daemon's.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Worker threads (the daemon's `--workers`).
    pub workers: usize,
    /// The spin limit (the daemon's `--spin-us`); `None`: the library's.
    pub spin: Option<Duration>,
}

/// A provider process stress started, serving [`SERVICE`].
pub struct ProviderProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    _registration: Registration,
    exe: PathBuf,
    args: Vec<OsString>,
    provider_id: u64,
    registered: Instant,
}

/// One kill of a provider process and its replacement, as
/// [`ProviderProcess::kill`] and [`ProviderProcess::start_again`] saw it.
#[derive(Clone, Copy, Debug)]
pub struct Replaced {
    /// Just before SIGKILL was sent.
    pub killed: Instant,
    /// When the killed process had been reaped: it serves nothing after.
    pub reaped: Instant,
    /// When the new process was started.
    pub started: Instant,
    /// When the new process's registration was done (its own clock).
    pub registered: Instant,
}

impl ProviderProcess {
    /// Starts the provider process on the daemon at `socket` and waits for
    /// its registration.
    pub fn start(exe: &Path, socket: &Path, settings: Settings) -> anyhow::Result<ProviderProcess> {
        let mut args: Vec<OsString> =
            vec!["--child-provider".into(), settings.workers.to_string().into(), "--socket".into(), socket.into()];
        if let Some(spin) = settings.spin {
            args.extend(["--spin-us".into(), spin.as_micros().to_string().into()]);
        }
        let (child, registration, stdin, stdout) = spawn(exe, &args)?;
        let mut p = ProviderProcess {
            child,
            stdin: Some(stdin),
            stdout,
            _registration: registration,
            exe: exe.to_path_buf(),
            args,
            provider_id: 0,
            registered: Instant::now(),
        };
        p.await_registration()?;
        p.announce("started");
        Ok(p)
    }

    /// Reads the process's `registered` line.
    fn await_registration(&mut self) -> anyhow::Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).context("reading the provider process's stdout")?;
        let mut words = line.split_whitespace();
        let (Some("registered"), Some(id), Some(ns)) = (words.next(), words.next(), words.next()) else {
            let status = self.child.wait().ok();
            bail!("the provider process said {line:?} instead of registered (exit {status:?})");
        };
        self.provider_id = id.parse().context("the provider id")?;
        self.registered = instant_of(ns.parse().context("the registration time")?);
        Ok(())
    }

    fn announce(&self, what: &str) {
        crate::progress::suspend(|| {
            eprintln!("stress: provider of {SERVICE} {what}, pid {}, provider id {}", self.pid(), self.provider_id);
        });
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Kills it with SIGKILL and reaps it; returns when the signal was
    /// sent and when it had been reaped.
    pub fn kill(&mut self) -> anyhow::Result<(Instant, Instant)> {
        // Taken before the signal: its clients may see it gone before
        // kill() returns here.
        let killed = Instant::now();
        kill(Pid::from_raw(self.pid()), Signal::SIGKILL)?;
        self.child.wait()?;
        Ok((killed, Instant::now()))
    }

    /// Starts it again, after [`ProviderProcess::kill`], and waits for its
    /// registration; returns when it started and when it registered.
    pub fn start_again(&mut self) -> anyhow::Result<(Instant, Instant)> {
        let started = Instant::now();
        let (child, registration, stdin, stdout) = spawn(&self.exe, &self.args)?;
        (self.child, self._registration, self.stdin, self.stdout) = (child, registration, Some(stdin), stdout);
        self.await_registration()?;
        self.announce("restarted");
        Ok((started, self.registered))
    }

    /// How it exited, if it no longer runs (reaping it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it (closing its stdin) and checks that it exits 0 within 10 s.
    pub fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the provider process exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the provider process did not stop within 10 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

type Spawned = (Child, Registration, ChildStdin, BufReader<ChildStdout>);

fn spawn(exe: &Path, args: &[OsString]) -> anyhow::Result<Spawned> {
    let mut command = Command::new(exe);
    command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
    let (mut child, registration) =
        started::spawn(&mut command, Stop::Kill).context("cannot start the provider process")?;
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    Ok((child, registration, stdin, stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moment_read_from_the_clock_becomes_the_same_instant() {
        let before = Instant::now();
        let ns = monotonic_ns();
        let after = Instant::now();
        let at = instant_of(ns);
        // Instant reads the same clock: the moment falls between the two
        // reads around it (to within the conversion's rounding).
        let slack = Duration::from_micros(1);
        assert!(at + slack >= before && at <= after + slack, "{before:?} {at:?} {after:?}");
    }
}
