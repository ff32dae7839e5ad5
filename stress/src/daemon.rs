//! The daemon under test: a private one started for the run, or a running
//! one found by its socket; and what /proc says about its memory and fds.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::started::{self, PrivateDir, Registration, Stop};

/// An ipcd started by stress on a temporary socket, stopped on drop (and
/// by [`crate::started`] if stress is stopped by a signal).
pub struct PrivateDaemon {
    child: Child,
    /// Keeps `child` on the list of what a signal stops.
    _registration: Registration,
    /// How it was started, to start it again after a crash.
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    socket: PathBuf,
    uds: PathBuf,
    tcp: std::net::SocketAddr,
    dir: PrivateDir,
}

impl PrivateDaemon {
    /// Starts `binary` on a fresh control socket, a Unix stream socket and
    /// a loopback TCP port, and waits until it accepts on all three.
    pub fn start(binary: &Path, max_clients: usize, spin: Option<Duration>) -> anyhow::Result<PrivateDaemon> {
        PrivateDaemon::start_with(binary, max_clients, spin, &[])
    }

    /// As [`PrivateDaemon::start`], passing `extra` arguments after the
    /// others. ipcd takes each flag once: `extra` may give `--log-level`
    /// (default `warn`), but no flag set here.
    pub fn start_with(
        binary: &Path,
        max_clients: usize,
        spin: Option<Duration>,
        extra: &[String],
    ) -> anyhow::Result<PrivateDaemon> {
        let dir = PrivateDir::new("ipcd-stress-")?;
        let socket = dir.path().join("ipcd.sock");
        let uds = dir.path().join("ipcd-stream.sock");
        // A port the kernel just handed out and took back: free unless
        // another process grabs it in between (the start then fails
        // clearly).
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        if let Some(spin) = spin {
            args.extend(["--spin-us".into(), spin.as_micros().to_string().into()]);
        }
        args.extend([
            "--uds".into(),
            uds.clone().into(),
            "--tcp".into(),
            tcp.to_string().into(),
            "--socket".into(),
            socket.clone().into(),
            "--max-clients".into(),
            (max_clients + 16).to_string().into(),
        ]);
        if !extra.iter().any(|a| a == "--log-level") {
            args.extend(["--log-level".into(), "warn".into()]);
        }
        args.extend(extra.iter().map(Into::into));
        let (child, registration) = spawn(binary, &args)?;
        let mut daemon = PrivateDaemon {
            child,
            _registration: registration,
            binary: binary.to_path_buf(),
            args,
            socket,
            uds,
            tcp,
            dir,
        };
        daemon.wait_ready(Duration::from_millis(10))?;
        daemon.announce("started");
        Ok(daemon)
    }

    /// Waits until it accepts on all three listeners, checking every
    /// `every`.
    fn wait_ready(&mut self, every: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && std::os::unix::net::UnixStream::connect(&self.uds).is_ok()
                && std::net::TcpStream::connect(self.tcp).is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status} before accepting connections", self.binary.display());
            }
            if Instant::now() > deadline {
                bail!("{} did not accept connections within 10 s", self.binary.display());
            }
            std::thread::sleep(every);
        }
    }

    /// Stops it with SIGTERM and waits for it to exit (at most 10 s), then
    /// starts it again. Returns when SIGTERM was sent, when it exited, and
    /// its exit code.
    pub fn stop_and_restart(&mut self) -> anyhow::Result<(Instant, Instant, Option<i32>)> {
        let sent = Instant::now();
        let status = self.terminate()?;
        let exited = Instant::now();
        self.start_again()?;
        Ok((sent, exited, status.code()))
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit.
    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("ipcd did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts the daemon again with the same arguments, after it exited,
    /// and waits until it accepts.
    fn start_again(&mut self) -> anyhow::Result<()> {
        (self.child, self._registration) = spawn(&self.binary, &self.args)?;
        self.wait_ready(Duration::from_millis(1))?;
        self.announce("restarted");
        Ok(())
    }

    /// Says which process and directory the daemon is, on stderr: for
    /// whoever watches or has to clean up after a run.
    fn announce(&self, what: &str) {
        crate::progress::suspend(|| {
            eprintln!("stress: private ipcd {what}, pid {}, sockets in {}", self.pid(), self.dir.path().display());
        });
    }

    /// Kills it with SIGKILL (reaping it), then starts it again on the same
    /// socket paths and port. Returns when it was killed, when the new one
    /// was started, and when it accepted on all three listeners.
    pub fn crash_and_restart(&mut self) -> anyhow::Result<(Instant, Instant, Instant)> {
        // The moment is taken before the signal: the daemon may be gone
        // (and its clients told) before kill() returns here.
        let killed = Instant::now();
        kill(Pid::from_raw(self.pid()), Signal::SIGKILL)?;
        self.child.wait()?;
        let started = Instant::now();
        self.start_again()?;
        Ok((killed, started, Instant::now()))
    }

    /// Its control socket (shared-memory clients).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its Unix stream socket.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// Its TCP address.
    pub fn tcp(&self) -> std::net::SocketAddr {
        self.tcp
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How it exited, if it no longer runs (reaping it).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it with SIGTERM and checks that it exits 0.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let status = self.terminate()?;
        if !status.success() {
            bail!("ipcd exited with {status} after SIGTERM");
        }
        Ok(())
    }
}

fn spawn(binary: &Path, args: &[std::ffi::OsString]) -> anyhow::Result<(Child, Registration)> {
    let mut command = Command::new(binary);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    started::spawn(&mut command, Stop::Terminate).with_context(|| format!("cannot start {}", binary.display()))
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pid of the daemon listening on `socket`, from the kernel's record of
/// the peer (SO_PEERCRED): works for a private daemon and a running one.
pub fn daemon_pid(socket: &Path) -> anyhow::Result<i32> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    Ok(ipc_platform::peer_credentials(stream.as_fd())?.pid)
}

/// Memory and fds of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcessUsage {
    /// Resident anonymous memory, kB.
    pub rss_anon_kb: u64,
    /// Resident shared memory (the session segments), kB.
    pub rss_shmem_kb: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Reads `/proc/<pid>/status` and counts `/proc/<pid>/fd`.
pub fn usage(pid: i32) -> anyhow::Result<ProcessUsage> {
    let (rss_anon_kb, rss_shmem_kb) = resident(pid)?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(ProcessUsage { rss_anon_kb, rss_shmem_kb, fds })
}

/// A process's resident anonymous and shared memory, in kB, from
/// `/proc/<pid>/status` alone: cheap enough to sample during a run, where
/// listing `/proc/<pid>/fd` (two entries per session) is not. In a
/// throughput run of 1,000 clients (`perf record -a`), stress's threads
/// other than the clients had 4.9% of all CPU samples while the sampler
/// listed the fds every 20 ms, and 0.7% once it read the status alone.
fn resident(pid: i32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((field("RssAnon:"), field("RssShmem:")))
}

/// CPU time (user and system) used so far by `/proc/<task>`: a pid, or
/// `thread-self` for the calling thread. `None` if it cannot be read.
pub fn cpu_seconds(task: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{task}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // from the last ')'. utime and stime are fields 14 and 15, in clock
    // ticks of 1/100 s (USER_HZ, fixed for /proc).
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Samples a process's anonymous RSS while a run lasts and keeps the peak.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PeakSampler {
    /// Starts sampling `pid` every `every`.
    pub fn start(pid: i32, every: Duration) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (Arc::clone(&stop), Arc::clone(&peak));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((anon, _)) = resident(pid) {
                    p.fetch_max(anon, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        PeakSampler { stop, peak, thread: Some(thread) }
    }

    /// Stops sampling and returns the peak seen, in kB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// A process's peak resident set (`VmHWM`) and resident set now
/// (`VmRSS`), in kB, from `/proc/<pid>/status`.
pub fn high_water(pid: i32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    };
    match (field("VmHWM:"), field("VmRSS:")) {
        (Some(hwm), Some(rss)) => Ok((hwm, rss)),
        _ => bail!("/proc/{pid}/status has no VmHWM or VmRSS"),
    }
}

/// Resets a process's `VmHWM` to its resident set now (writing 5 to
/// `/proc/<pid>/clear_refs`: allowed for a process of the same user).
pub fn reset_high_water(pid: i32) -> anyhow::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").with_context(|| format!("cannot reset the VmHWM of {pid}"))
}
