//! Telling a service manager how the daemon is doing (`sd_notify(3)`):
//! ready, stopping, and alive (the watchdog).
//!
//! Each notification is one datagram to the socket named by
//! `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); without
//! the variable nothing is sent and every call succeeds, so a daemon
//! started by hand behaves as before. The watchdog is on when the manager
//! sets `WATCHDOG_USEC` (and `WATCHDOG_PID`, if set, is this process): the
//! daemon must then send `WATCHDOG=1` more often than that, or be
//! restarted.
//!
//! The messages and the watchdog's variables come from `sd-notify`; the
//! send is ours, because `sd_notify::notify` blocks for as long as the
//! manager's queue is full (a Unix datagram socket queues only a few
//! datagrams unread), and a daemon must not wait on its manager to stop:
//! here a send gives up after a second.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;

/// The longest a notification waits for room in the manager's queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// What the daemon tells its service manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
/// The socket's error if the datagram cannot be sent (`WouldBlock` when the
/// manager's queue stayed full for a second).
pub fn notify(state: ServiceState<'_>) -> io::Result<()> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let message = match state {
        ServiceState::Ready { status } => format!("{}\n{}\n", NotifyState::Ready, NotifyState::Status(status)),
        ServiceState::Stopping => format!("{}\n", NotifyState::Stopping),
        ServiceState::Watchdog => format!("{}\n", NotifyState::Watchdog),
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.set_write_timeout(Some(SEND_TIMEOUT))?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(socket.as_os_str());
    match bytes.strip_prefix(b"@") {
        Some(name) => datagram.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => datagram.connect(&socket)?,
    }
    let sent = datagram.send(message.as_bytes())?;
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("notification cut short: {sent} of {} bytes sent", message.len()),
        ));
    }
    Ok(())
}

/// The watchdog's interval (`WATCHDOG_USEC`), if the manager set one for
/// this process: `WATCHDOG=1` must come more often than that. `None`
/// without a watchdog, and for an interval of zero.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test changes `NOTIFY_SOCKET` for this test binary: no other test
    /// in it reads the variable.
    #[test]
    fn a_notification_is_one_datagram_and_a_full_queue_does_not_block_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify(ServiceState::Ready { status: "serving" }).unwrap();
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving\n");
        notify(ServiceState::Watchdog).unwrap();
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");

        // A manager that reads nothing: its queue fills, and then a send
        // fails after the timeout instead of waiting for good.
        let mut sent = 0;
        let err = loop {
            match notify(ServiceState::Stopping) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 100_000, "the queue never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");

        // An abstract socket is named with a leading @.
        let name = format!("ipcd-notify-test-{}", std::process::id());
        let manager = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        notify(ServiceState::Stopping).unwrap();
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        std::env::remove_var("NOTIFY_SOCKET");
        notify(ServiceState::Stopping).unwrap();
    }
}
