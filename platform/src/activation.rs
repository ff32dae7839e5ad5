//! Sockets passed by a service manager (systemd socket activation,
//! `sd_listen_fds(3)`).
//!
//! The manager binds and listens on the sockets itself, and starts the
//! daemon with them open as fds 3, 4, ... and three variables saying so:
//! `LISTEN_PID` (the process they are for: a child that inherited the
//! variables must not take them), `LISTEN_FDS` (how many) and
//! `LISTEN_FDNAMES` (their `FileDescriptorName=`s, colon-separated).
//! [`take_passed_sockets`] reads them with `sd-notify`, which also sets
//! each fd close-on-exec, and removes the variables, as
//! `sd_listen_fds(unset_environment = 1)` does.
//!
//! # Safety
//!
//! One `unsafe` block, in [`take_passed_sockets`]: `OwnedFd::from_raw_fd`
//! on each passed fd number, which is sound when the number is open and
//! nothing else in the process owns it. Open: `sd-notify` has just set
//! `FD_CLOEXEC` on each with `fcntl`, which fails on a closed fd. Owned by
//! nothing else: the manager opened them for this process (`LISTEN_PID`
//! is its pid) before it started, and an inherited fd stays unowned until
//! code claims it by number, which only `unsafe` code can do; this module
//! claims them at most once per process (a static flag, taken before the
//! claim, and the variables removed), so it never makes two owners of one
//! fd. The sockets are only checked afterwards
//! ([`crate::prepare_listener`]), as owned fds, and closed if unfit.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`take_passed_sockets`] has claimed the passed fds (`Relaxed`:
/// the swap itself is the one decision, and orders nothing else).
static TAKEN: AtomicBool = AtomicBool::new(false);

/// One socket a service manager passed: its name and the fd, not yet
/// checked (see [`crate::prepare_listener`]).
#[derive(Debug)]
pub struct PassedSocket {
    /// Its `FileDescriptorName=` (`LISTEN_FDNAMES`): `"unknown"` when the
    /// manager names none, the socket unit's name when a unit sets none.
    pub name: String,
    /// The fd, owned from here on.
    pub fd: OwnedFd,
}

/// Takes the sockets the service manager passed to this process, in
/// order, and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from
/// the environment. Empty when the variables are missing or name another
/// process, and on every call after the first.
///
/// Call it at the start of `main`, before any other thread runs: removing
/// environment variables races with any thread that reads them.
///
/// # Errors
///
/// `InvalidInput` when the variables are malformed (`LISTEN_FDS` not a
/// number, `LISTEN_FDNAMES` naming more or fewer fds than it counts), or
/// the error of the `fcntl` on a passed fd that is not open.
pub fn take_passed_sockets() -> io::Result<Vec<PassedSocket>> {
    let passed = sd_notify::listen_fds_with_names().map(|fds| fds.collect::<Vec<_>>());
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let passed = passed.map_err(|e| io::Error::new(e.kind(), format!("the sockets passed in are unusable: {e}")))?;
    if passed.is_empty() || TAKEN.swap(true, Ordering::Relaxed) {
        return Ok(Vec::new());
    }
    Ok(passed
        .into_iter()
        .map(|(raw, name)| {
            // SAFETY: `raw` is open (sd-notify's fcntl on it succeeded) and
            // was passed to this process by its manager (`LISTEN_PID` is
            // ours); `TAKEN` was false, so no earlier call claimed it, and
            // it is claimed here once (see the module's `# Safety`).
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            PassedSocket { name, fd }
        })
        .collect())
}
