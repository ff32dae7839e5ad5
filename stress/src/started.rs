//! What stress starts that must not outlive it: private daemons, the client
//! processes of `--procs`, the hostile process, and the daemons' temporary
//! directories; and stopping all of them when stress gets SIGTERM or
//! SIGINT.
//!
//! Each of these is on one list from its start until its owner has stopped
//! or removed it. On the first SIGTERM or SIGINT a thread of its own takes
//! the list's lock, stops every process on it (a daemon with SIGTERM, then
//! SIGKILL if it has not exited within [`TERM_GRACE`]; a client or hostile
//! process with SIGKILL), waits until they have exited, removes the
//! directories, says so on stderr and exits with 128 + the signal's
//! number. It keeps the lock until the exit, so nothing starts, and nothing
//! is taken off the list, in the meantime: a thread that tries waits on the
//! lock until stress has exited.
//!
//! A list rather than telling the run to stop, because the run may be
//! waiting anywhere (a client thread in a call for up to the call timeout,
//! a client process's pipe, a restart, a phase of the hostile scenario),
//! and each of those waits would have to learn to give up; the things that
//! must not be left behind are few and known when they start.
//!
//! Processes are held through pidfds ([`ProcessHandle`]): their owners reap
//! them as before, and a signal sent from here can never reach a process
//! that took the pid of one already reaped.
//!
//! SIGKILL cannot be caught: every process started here gets the
//! parent-death signal ([`ipc_platform::die_with_parent`]), so it dies with
//! stress all the same; only the temporary directories are then left
//! behind. A second SIGTERM or SIGINT while the first is being handled ends
//! stress at once the same way.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipc_platform::ProcessHandle;
use signal_hook::consts::{SIGINT, SIGTERM};

/// How long a daemon has to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// How long a killed process may take to finish exiting (the kernel tears
/// down its memory first, which a loaded machine can take a while over).
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How a process is stopped when stress is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, then SIGKILL after [`TERM_GRACE`]: a daemon, which then
    /// tells its clients, closes its sessions and removes its sockets.
    Terminate,
    /// SIGKILL: a client or hostile process, which holds nothing that
    /// outlives it.
    Kill,
}

struct Process {
    id: u64,
    pid: u32,
    handle: ProcessHandle,
    stop: Stop,
}

struct Dir {
    id: u64,
    path: PathBuf,
}

struct List {
    next_id: u64,
    processes: Vec<Process>,
    dirs: Vec<Dir>,
}

impl List {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

static LIST: Mutex<List> = Mutex::new(List { next_id: 0, processes: Vec::new(), dirs: Vec::new() });

/// Set by the signal handler itself, the moment a signal arrives: from then
/// on how stress ends is the signal thread's to decide.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// The list, even if a thread panicked holding it: every change to it is a
/// single push or retain, which leaves it whole.
fn list() -> MutexGuard<'static, List> {
    LIST.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps a started process on the list until dropped. Drop it only once
/// the process has exited or is sure to (its owner waited for it, or it was
/// told to quit).
#[must_use = "the process is taken off the list when this is dropped"]
pub struct Registration {
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        list().processes.retain(|p| p.id != self.id);
    }
}

/// Starts `command` as a process that cannot outlive stress: it gets the
/// parent-death signal, and is stopped by `stop` if stress is stopped by a
/// signal. Keep the [`Registration`] as long as the `Child`.
///
/// # Panics
///
/// Panics if called from a thread other than the main one. The
/// parent-death signal comes when the thread that spawned the child exits,
/// and only the main thread lasts as long as stress: a daemon restarted by
/// a short-lived thread would be killed as soon as that thread ended.
pub fn spawn(command: &mut Command, stop: Stop) -> io::Result<(Child, Registration)> {
    assert_eq!(std::thread::current().name(), Some("main"), "stress starts processes from its main thread only");
    ipc_platform::die_with_parent(command);
    // Spawned under the lock: a stop either finds this process on the list
    // or has already ended stress before it could start.
    let mut list = list();
    let mut child = command.spawn()?;
    let handle = match ProcessHandle::open(&child) {
        Ok(handle) => handle,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let id = list.next_id();
    list.processes.push(Process { id, pid: child.id(), handle, stop });
    Ok((child, Registration { id }))
}

/// A temporary directory on the list: removed when dropped, or by a stop.
pub struct PrivateDir {
    /// `None` only while being dropped.
    dir: Option<tempfile::TempDir>,
    id: u64,
}

impl PrivateDir {
    /// Creates a directory named `prefix` and random characters in the
    /// system's temporary directory.
    pub fn new(prefix: &str) -> io::Result<PrivateDir> {
        let mut list = list();
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let id = list.next_id();
        list.dirs.push(Dir { id, path: dir.path().to_path_buf() });
        Ok(PrivateDir { dir: Some(dir), id })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until dropped").path()
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Removed under the lock: a stop finds the directory on the list or
        // gone, never taken off the list and still there.
        let mut list = list();
        list.dirs.retain(|d| d.id != self.id);
        drop(self.dir.take());
    }
}

/// Installs the handlers of SIGTERM and SIGINT and starts the thread that
/// stops everything on the list when one arrives (see the module's doc).
/// Call it before starting anything.
pub fn stop_on_signals() -> anyhow::Result<()> {
    for signal in [SIGTERM, SIGINT] {
        // Registered before the flag's own handler, so that the first
        // signal finds the flag clear and only a second one acts.
        signal_hook::flag::register_conditional_default(signal, &STOPPING)
            .context("cannot install the second-signal handler")?;
        signal_hook::flag::register(signal, &STOPPING).context("cannot install a signal handler")?;
    }
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("stress-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                stop_and_exit(signal);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Returns at once unless a signal is stopping stress; then waits for the
/// signal thread to end the process. The run's end, when a signal came, is
/// not its own to report: it may well have failed because of the stop (a
/// client process killed by the terminal's SIGINT, say).
pub fn defer_to_stop() {
    if STOPPING.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// Stops everything on the list, removes the directories and exits with
/// 128 + `signal`.
fn stop_and_exit(signal: i32) -> ! {
    let name = signal_hook::low_level::signal_name(signal).unwrap_or("a signal");
    // A progress bar would be left half drawn in front of what follows.
    crate::progress::clear();
    // Held until the exit: nothing starts or leaves the list from now on.
    let list = list();
    // stderr may be closed or a full pipe: nothing here may fail on it.
    let mut err = io::stderr();
    for p in &list.processes {
        let sent = match p.stop {
            Stop::Terminate => p.handle.terminate(),
            Stop::Kill => p.handle.kill(),
        };
        if let Err(e) = sent {
            let _ = writeln!(err, "stress: cannot signal process {}: {e}", p.pid);
        }
    }
    let deadline = Instant::now() + TERM_GRACE;
    for p in list.processes.iter().filter(|p| p.stop == Stop::Terminate) {
        if !exited_by(p, deadline) {
            let _ = writeln!(err, "stress: ipcd {} did not exit within {TERM_GRACE:?} of SIGTERM; killing it", p.pid);
            let _ = p.handle.kill();
        }
    }
    let deadline = Instant::now() + KILL_GRACE;
    for p in &list.processes {
        if !exited_by(p, deadline) {
            let _ = writeln!(err, "stress: process {} was killed but has not exited", p.pid);
        }
    }
    for d in &list.dirs {
        if let Err(e) = std::fs::remove_dir_all(&d.path) {
            if e.kind() != io::ErrorKind::NotFound {
                let _ = writeln!(err, "stress: cannot remove {}: {e}", d.path.display());
            }
        }
    }
    let _ = writeln!(err, "stress: stopped by {name}");
    std::process::exit(128 + signal)
}

/// Whether `p` has exited by `deadline`.
fn exited_by(p: &Process, deadline: Instant) -> bool {
    p.handle.wait_exit(deadline.saturating_duration_since(Instant::now())).unwrap_or(false)
}
