//! A pollable doorbell from the daemon to a client: one end of a Unix
//! socket pair.
//!
//! Why not an eventfd: an fd passed by `SCM_RIGHTS` shares its open file
//! with the sender, and `O_NONBLOCK` belongs to the open file. A client could
//! clear it and saturate the counter, and the daemon's next write would
//! block its worker for good. Each end of a socket pair is its own open
//! file, and every send and receive here passes `MSG_DONTWAIT`, so nothing a
//! client does to its end can make the daemon block.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// One end of a doorbell socket pair.
#[derive(Debug)]
pub struct SocketBell {
    fd: OwnedFd,
}

/// What [`SocketBell::drain`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// The bell had rung at least once.
    Rang,
    /// Nothing was waiting.
    Quiet,
    /// The other end is closed.
    Closed,
}

impl SocketBell {
    /// A connected pair: the daemon keeps the first, the client gets the
    /// second.
    pub fn pair() -> io::Result<(SocketBell, SocketBell)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        Ok((SocketBell { fd: a }, SocketBell { fd: b }))
    }

    /// Adopts a received end.
    pub fn from_fd(fd: OwnedFd) -> SocketBell {
        SocketBell { fd }
    }

    /// Rings: sends one byte without ever blocking. A full buffer means the
    /// other side has unread rings already, and a closed peer will be noticed
    /// through its control connection, so neither is an error.
    pub fn ring(&self) -> io::Result<()> {
        match rustix::net::send(&self.fd, &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) | Err(Errno::AGAIN) | Err(Errno::PIPE) | Err(Errno::CONNRESET) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads every pending ring without blocking.
    pub fn drain(&self) -> io::Result<Drained> {
        let mut buf = [0u8; 64];
        let mut rang = false;
        loop {
            match rustix::net::recv(&self.fd, &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => return Ok(Drained::Closed),
                Ok(_) => rang = true,
                Err(Errno::AGAIN) => return Ok(if rang { Drained::Rang } else { Drained::Quiet }),
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => return Ok(Drained::Closed),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl From<SocketBell> for OwnedFd {
    fn from(bell: SocketBell) -> OwnedFd {
        bell.fd
    }
}

impl AsFd for SocketBell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_drain_and_close_are_seen() {
        let (daemon, client) = SocketBell::pair().unwrap();
        assert_eq!(client.drain().unwrap(), Drained::Quiet);
        daemon.ring().unwrap();
        daemon.ring().unwrap();
        assert_eq!(client.drain().unwrap(), Drained::Rang);
        assert_eq!(client.drain().unwrap(), Drained::Quiet);
        drop(daemon);
        assert_eq!(client.drain().unwrap(), Drained::Closed);
    }

    #[test]
    fn ringing_never_blocks_even_if_the_peer_clears_nonblock_and_never_reads() {
        let (daemon, client) = SocketBell::pair().unwrap();
        // What a hostile client can do to its own end: it does not reach ours.
        rustix::fs::fcntl_setfl(&client, rustix::fs::OFlags::empty()).unwrap();
        for _ in 0..100_000 {
            daemon.ring().unwrap();
        }
        drop(client);
        daemon.ring().unwrap();
    }
}
