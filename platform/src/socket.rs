//! Control-socket helpers: peer credentials, liveness, readiness.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::RecvFlags;

/// The credentials of the process at the other end of a Unix socket, as the
/// kernel recorded them at `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id; 0 when the peer lives in a pid namespace this process
    /// cannot see.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED`.
///
/// Through nix rather than rustix: rustix's `UCred` holds the pid as a
/// non-zero type, and the kernel reports pid 0 for a peer in another pid
/// namespace.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(PeerCredentials { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

/// Whether the peer of a connected stream socket has hung up, without
/// consuming anything and without blocking.
pub fn peer_closed(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    match rustix::net::recv(sock, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        Ok((0, _)) => Ok(true),
        Ok(_) | Err(Errno::AGAIN) => Ok(false),
        Err(Errno::CONNRESET) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Waits until one of `fds` is readable (or hung up), for at most
/// `timeout`. Returns which were ready.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut polls: Vec<PollFd<'_>> = fds.iter().map(|fd| PollFd::new(fd, PollFlags::IN)).collect();
    let ts = timeout.map(crate::futex::timespec);
    match rustix::event::poll(&mut polls, ts.as_ref()) {
        Ok(_) | Err(Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(polls.iter().map(|p| !p.revents().is_empty()).collect())
}

/// Raises the soft open-files limit to the hard limit. Returns the new soft
/// limit (`None`: unlimited).
pub fn raise_nofile_limit() -> io::Result<Option<u64>> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })?;
    }
    Ok(limit.maximum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn credentials_are_ours() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_credentials(a.as_fd()).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        assert_eq!(cred.uid, rustix::process::getuid().as_raw());
    }

    #[test]
    fn hang_up_is_seen() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_closed(a.as_fd()).unwrap());
        drop(b);
        assert!(peer_closed(a.as_fd()).unwrap());
        assert_eq!(wait_readable(&[a.as_fd()], Some(Duration::from_secs(5))).unwrap(), vec![true]);
    }
}
