//! `HangupWatch`: one epoll set that reports when sockets become readable
//! or hang up, each by a key of the caller's, once per registration.
//!
//! It watches sockets whose peer never writes (a client's control
//! connections): readable there means closed, or a peer that breaks the
//! protocol. Registrations are one-shot (`EPOLLONESHOT`): a socket found
//! ready is reported once and then stays silent until it is removed, so a
//! hung-up socket the owner has not yet dropped cannot keep the waiter
//! spinning. The watch never owns the sockets: their owner removes each
//! before closing it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::epoll::{self, CreateFlags, Event, EventData, EventFlags};
use rustix::io::Errno;

/// An epoll set of sockets watched for hang-up; see the module docs.
#[derive(Debug)]
pub struct HangupWatch {
    epoll: OwnedFd,
}

impl HangupWatch {
    /// An empty set (close-on-exec).
    pub fn new() -> io::Result<HangupWatch> {
        Ok(HangupWatch { epoll: epoll::create(CreateFlags::CLOEXEC)? })
    }

    /// Starts watching `socket` under `key`, until it is reported once or
    /// removed.
    pub fn add(&self, socket: BorrowedFd<'_>, key: u64) -> io::Result<()> {
        let flags = EventFlags::IN | EventFlags::RDHUP | EventFlags::ONESHOT;
        epoll::add(&self.epoll, socket, EventData::new_u64(key), flags)?;
        Ok(())
    }

    /// Stops watching `socket` (harmless if it was never added). Must be
    /// called before `socket` is closed: the kernel keeps a registration
    /// for as long as the open file lives, which a copy of the fd
    /// elsewhere prolongs.
    pub fn remove(&self, socket: BorrowedFd<'_>) {
        // ENOENT (never added) and EBADF cannot harm: nothing stays
        // registered either way.
        let _ = epoll::delete(&self.epoll, socket);
    }

    /// Waits until a watched socket is ready, or `timeout` passes (none:
    /// forever), and appends the keys of those found ready to `keys`.
    /// An interrupted wait returns with none.
    pub fn wait(&self, keys: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        // A dead peer hangs up many connections at once: take them in
        // few waits.
        let mut events: Vec<Event> = Vec::with_capacity(1024);
        let ts = timeout.map(crate::futex::timespec);
        match epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut events), ts.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        keys.extend(events.iter().map(|e| e.data.u64()));
        Ok(())
    }
}

impl AsFd for HangupWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_hang_up_is_reported_once_by_its_key() {
        let watch = HangupWatch::new().unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        watch.add(a.as_fd(), 7).unwrap();
        watch.add(c.as_fd(), 8).unwrap();
        let mut keys = Vec::new();
        watch.wait(&mut keys, Some(Duration::ZERO)).unwrap();
        assert!(keys.is_empty(), "nothing is ready while both peers are there");
        drop(b);
        watch.wait(&mut keys, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(keys, [7]);
        keys.clear();
        watch.wait(&mut keys, Some(Duration::ZERO)).unwrap();
        assert!(keys.is_empty(), "a registration is reported once");
        watch.remove(a.as_fd());
        watch.remove(c.as_fd());
    }
}
