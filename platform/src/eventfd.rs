//! Non-blocking eventfds: the client-to-daemon doorbell.
//!
//! The daemon registers the eventfd in its epoll (edge-triggered) and never
//! reads or writes it: the client shares the open file and could clear
//! `O_NONBLOCK` on it, which would make any read or write of the daemon's
//! block. Edge-triggered epoll reports every write whether or not the
//! counter is read back, so no read is needed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use mio::event::Source;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use rustix::event::EventfdFlags;
use rustix::io::Errno;

/// An eventfd counter: `notify` adds one, `drain` reads and resets it.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd with a zero counter.
    pub fn new() -> io::Result<EventFd> {
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(EventFd { fd })
    }

    /// Adopts a received eventfd and makes sure it is non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<EventFd> {
        let flags = rustix::fs::fcntl_getfl(&fd)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(EventFd { fd })
    }

    /// Adds one to the counter, waking whoever polls it. The client rings
    /// the daemon this way; the daemon never calls it. A counter at its
    /// maximum already signals readiness, so `EAGAIN` counts as success.
    pub fn notify(&self) -> io::Result<()> {
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl From<EventFd> for OwnedFd {
    fn from(bell: EventFd) -> OwnedFd {
        bell.fd
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Source for EventFd {
    fn register(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).register(registry, token, interests)
    }

    fn reregister(&mut self, registry: &Registry, token: Token, interests: Interest) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).reregister(registry, token, interests)
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        SourceFd(&self.fd.as_raw_fd()).deregister(registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_adds_one_each_time() {
        let e = EventFd::new().unwrap();
        e.notify().unwrap();
        e.notify().unwrap();
        let mut counter = [0u8; 8];
        assert_eq!(rustix::io::read(&e, &mut counter).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(counter), 2);
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use mio::{Events, Interest, Poll, Token};
    use std::time::Duration;

    /// The daemon never reads a client's eventfd (a read could block if the
    /// client clears O_NONBLOCK on the shared open file). That is only
    /// sound if edge-triggered epoll reports every write, even when the
    /// counter was never read back to zero.
    #[test]
    fn edge_triggered_poll_reports_every_write_without_a_read() {
        let mut poll = Poll::new().unwrap();
        let mut bell = EventFd::new().unwrap();
        poll.registry().register(&mut bell, Token(7), Interest::READABLE).unwrap();
        let mut events = Events::with_capacity(4);
        for round in 0..5 {
            bell.notify().unwrap();
            poll.poll(&mut events, Some(Duration::from_secs(5))).unwrap();
            assert_eq!(events.iter().count(), 1, "round {round}: one write, one event");
            // Without a new write there is no new event.
            poll.poll(&mut events, Some(Duration::from_millis(1))).unwrap();
            assert_eq!(events.iter().count(), 0, "round {round}: no write, no event");
        }
    }
}
