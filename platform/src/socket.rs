//! Control-socket helpers: connecting with a timeout, peer credentials,
//! liveness, readiness.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};

/// Connects a Unix stream socket (close-on-exec) to the listener at `path`,
/// waiting at most `timeout` for it: a `TimedOut` error once that passes.
///
/// A listener whose backlog is full (a stopped daemon's, say) makes a
/// plain `connect` sleep until it accepts, which may be never. A Unix
/// connect is never left in progress, so the usual remedy, a non-blocking
/// connect and a poll for writability, does not apply: non-blocking, it
/// fails at once with `EAGAIN`, and nothing becomes ready later. The kernel
/// bounds that sleep by the socket's send timeout instead, so the connect
/// blocks with `SO_SNDTIMEO` set to what is left of `timeout`, and wakes as
/// soon as the listener makes room. The send timeout stays set on the
/// stream returned.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let started = Instant::now();
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    let addr = SocketAddrUnix::new(path)?;
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        // Zero would mean no timeout at all.
        sockopt::set_socket_timeout(&fd, Timeout::Send, Some(left.max(Duration::from_micros(1))))?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            // The backlog stayed full for the whole send timeout.
            Err(Errno::AGAIN) => break,
            // A signal cut the wait short; the socket is still unconnected.
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{} accepted no connection within {timeout:?}", path.display()),
    ))
}

/// The credentials of the process at the other end of a Unix socket, as the
/// kernel recorded them at `connect()` (pid 0 when the peer lives in a pid
/// namespace this process cannot see): the same type the broker passes on.
pub type PeerCredentials = ipc_core::Credentials;

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

/// Raises this process's open-files limit (soft and hard) to at least
/// `want`: beyond the hard limit only a privileged process may (and at
/// most to `/proc/sys/fs/nr_open`). Returns the soft limit now; fails
/// when the hard limit is below `want` and cannot be raised. Processes
/// started afterwards inherit the limits.
pub fn raise_nofile_limit_to(want: u64) -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (current, maximum) = (limit.current.unwrap_or(u64::MAX), limit.maximum.unwrap_or(u64::MAX));
    if current >= want {
        return Ok(current);
    }
    let maximum = maximum.max(want);
    setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: Some(maximum) })?;
    Ok(want)
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
    fn connect_to_a_full_backlog_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        // Backlog 0: one connection waits to be accepted, the next finds
        // the queue full. Nobody ever accepts.
        let listener = crate::bind_control_socket(&path, 0o600, 0).unwrap();
        let short = Duration::from_millis(50);
        let mut queued = Vec::new();
        let err = loop {
            assert!(queued.len() < 64, "a backlog of 0 took {} connections", queued.len());
            match connect_unix(&path, short) {
                Ok(stream) => queued.push(stream),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("full.sock"), "{err}");
        assert!(!queued.is_empty(), "not even the first connection was queued");
        // Nothing listens any more: refused at once, not a timeout.
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let err = connect_unix(&path, short).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
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
