//! Telling a service manager how the daemon is doing (`sd_notify(3)`):
//! ready, stopping, and alive (the watchdog).
//!
//! Each notification is one datagram to the socket named by
//! `NOTIFY_SOCKET`, sent by `sd-notify`; without the variable nothing is
//! sent and every call succeeds, so a daemon started by hand behaves as
//! before. The watchdog is on when the manager sets `WATCHDOG_USEC` (and
//! `WATCHDOG_PID`, if set, is this process): the daemon must then send
//! `WATCHDOG=1` more often than that, or be restarted.

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;

/// What the daemon tells its service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceState<'a> {
    /// `READY=1`, with a `STATUS=` line: it serves.
    Ready {
        /// A line for `systemctl status`.
        status: &'a str,
    },
    /// `STOPPING=1`: it has begun to stop.
    Stopping,
    /// `WATCHDOG=1`: it is alive.
    Watchdog,
}

/// Sends `state` to the service manager, if there is one
/// (`NOTIFY_SOCKET`); does nothing otherwise.
///
/// # Errors
///
/// The socket's error, if the datagram cannot be sent.
pub fn notify(state: ServiceState<'_>) -> io::Result<()> {
    match state {
        ServiceState::Ready { status } => sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]),
        ServiceState::Stopping => sd_notify::notify(&[NotifyState::Stopping]),
        ServiceState::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
    }
}

/// The watchdog's interval (`WATCHDOG_USEC`), if the manager set one for
/// this process: `WATCHDOG=1` must come more often than that. `None`
/// without a watchdog, and for an interval of zero.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
