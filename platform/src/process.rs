//! Child processes that cannot outlive their parent, and handles on a child
//! that stay valid after it is reaped.
//!
//! # Safety
//!
//! One `unsafe` block, in [`die_with_parent`]: a closure given to
//! `Command::pre_exec`, which runs in the child between `fork` and `exec`.
//! Another thread of the parent may have held a lock (the allocator's, for
//! one) at the fork, so the closure may only do what is async-signal-safe:
//! it makes two system calls through rustix (`prctl`, `getppid`), which
//! issue them directly, and compares two integers. It allocates nothing,
//! takes no lock and touches no memory shared with the parent's other
//! threads; its one capture is the parent's pid, copied before the fork.
//!
//! # Which thread spawns
//!
//! The kernel sends the parent-death signal when the *thread* that forked
//! the child exits, not when its process does: a child spawned by a
//! short-lived thread is killed as soon as that thread ends, though the
//! parent lives on. Spawn a child made with [`die_with_parent`] only from a
//! thread that lives at least as long as the child should, such as the main
//! thread of a program, or a test's own thread for a child of that test.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal};

/// Makes the child of `command` receive SIGKILL when its parent dies, so it
/// can never outlive it, even when the parent is killed with SIGKILL.
///
/// The signal comes when the thread that spawns the child exits: see the
/// module's rule on which thread spawns. If the parent died between the
/// fork and the child's request for the signal (which would then never
/// come), the child exits at once without running the program, and the
/// spawn fails with `ESRCH`.
///
/// ```
/// use std::process::Command;
///
/// let mut command = Command::new("true");
/// ipc_platform::die_with_parent(&mut command);
/// assert!(command.status().unwrap().success());
/// ```
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec and does
    // only what is async-signal-safe there (see the module's `# Safety`):
    // two direct system calls and a comparison of the copied `parent` pid;
    // its errors are `Errno` values, which convert to `io::Error` without
    // allocating.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // A parent that died before the prctl gave this child to
            // another process, and the signal will never be sent.
            if rustix::process::getppid() != Some(parent) {
                return Err(Errno::SRCH.into());
            }
            Ok(())
        })
    }
}

/// A handle on a child process (a pidfd) that names that process alone:
/// once the child has been reaped, a signal sent through the handle fails
/// rather than reach another process that took the pid since. Any thread
/// may signal and wait through it while the `Child`'s owner reaps the
/// process as it likes.
#[derive(Debug)]
pub struct ProcessHandle {
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Opens a handle on `child`, which must not have been reaped yet
    /// (waited for): until then its pid cannot be reused.
    pub fn open(child: &Child) -> io::Result<ProcessHandle> {
        let pid = Pid::from_child(child);
        Ok(ProcessHandle { fd: rustix::process::pidfd_open(pid, PidfdFlags::empty())? })
    }

    /// Sends SIGTERM, unless the process has already been reaped.
    pub fn terminate(&self) -> io::Result<()> {
        self.send(Signal::TERM)
    }

    /// Sends SIGKILL, unless the process has already been reaped.
    pub fn kill(&self) -> io::Result<()> {
        self.send(Signal::KILL)
    }

    fn send(&self, signal: Signal) -> io::Result<()> {
        match rustix::process::pidfd_send_signal(&self.fd, signal) {
            // Reaped: it has exited, which is what any signal sent here is
            // for.
            Ok(()) | Err(Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until the process has exited (a zombie counts: it has closed
    /// its files and released its memory), for at most `timeout`. Returns
    /// whether it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut polls = [PollFd::new(&self.fd, PollFlags::IN)];
            let left = deadline.saturating_duration_since(Instant::now());
            match rustix::event::poll(&mut polls, Some(&crate::futex::timespec(left))) {
                Ok(_) if !polls[0].revents().is_empty() => return Ok(true),
                Ok(_) => return Ok(false),
                // A signal handler ran on this thread: wait out the rest.
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn sleeper() -> Child {
        Command::new("sleep").arg("600").stdin(Stdio::null()).spawn().expect("cannot start sleep")
    }

    #[test]
    fn a_handle_stops_and_awaits_its_process() {
        let mut child = sleeper();
        let handle = ProcessHandle::open(&child).unwrap();
        assert!(!handle.wait_exit(Duration::from_millis(20)).unwrap());
        handle.terminate().unwrap();
        assert!(handle.wait_exit(Duration::from_secs(60)).unwrap(), "sleep outlived SIGTERM");
        // Exited but not yet reaped: the handle still names it.
        handle.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(rustix::process::Signal::TERM.as_raw())
        );
        // Reaped: signalling it is a no-op, not an error, and it counts as
        // exited.
        handle.kill().unwrap();
        assert!(handle.wait_exit(Duration::ZERO).unwrap());
    }

    #[test]
    fn a_child_dies_with_the_thread_that_spawned_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut command = Command::new("sleep");
            command.arg("600").stdin(Stdio::null());
            die_with_parent(&mut command);
            let child = command.spawn().expect("cannot start sleep");
            let handle = ProcessHandle::open(&child).unwrap();
            tx.send((child, handle)).unwrap();
        })
        .join()
        .unwrap();
        let (mut child, handle) = rx.recv().unwrap();
        let exited = handle.wait_exit(Duration::from_secs(60)).unwrap();
        if !exited {
            let _ = child.kill();
        }
        let status = child.wait().unwrap();
        assert!(exited, "the child outlived the thread that spawned it");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(rustix::process::Signal::KILL.as_raw())
        );
    }
}
