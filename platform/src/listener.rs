//! Listening sockets the daemon did not bind itself (a service manager's,
//! or an embedder's): what they must be before they are served.
//!
//! A socket passed in is only a number until checked: it might be a
//! datagram socket, an Internet socket where a Unix one was meant, or one
//! that was bound but never listened on (`accept` would fail on every
//! event). [`prepare_listener`] checks the type, the family and
//! `SO_ACCEPTCONN`, and sets what the daemon's loops rely on: non-blocking
//! and close-on-exec. [`unix_listener_path`] says where a Unix listener
//! is, and refuses one without a path: an abstract socket has no file
//! permissions, so anyone who knows its name could connect.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::io::FdFlags;
use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketType};

/// Which family a listener must be of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerFamily {
    /// A Unix stream socket (the control socket, `--uds`).
    Unix,
    /// A TCP socket, IPv4 or IPv6 (`--tcp`).
    Inet,
}

impl ListenerFamily {
    fn name(self) -> &'static str {
        match self {
            ListenerFamily::Unix => "AF_UNIX",
            ListenerFamily::Inet => "AF_INET or AF_INET6",
        }
    }
}

fn invalid(fd: BorrowedFd<'_>, what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("fd {} {what}", fd.as_raw_fd()))
}

/// Checks that `fd` is a stream socket of `family` that listens
/// (`SO_TYPE`, the bound address's family, `SO_ACCEPTCONN`), then makes it
/// non-blocking and close-on-exec.
///
/// Non-blocking is a flag of the open file, which the process that passed
/// the socket shares; a service manager's sockets are non-blocking
/// already, and one that polls its copy (as systemd does while the daemon
/// is stopped) never blocks on it either way.
pub fn prepare_listener(fd: BorrowedFd<'_>, family: ListenerFamily) -> io::Result<()> {
    let kind = sockopt::socket_type(fd).map_err(|e| match e {
        rustix::io::Errno::NOTSOCK => invalid(fd, "is not a socket".into()),
        e => e.into(),
    })?;
    if kind != SocketType::STREAM {
        return Err(invalid(fd, format!("is a socket of type {}, not a stream socket", kind.as_raw())));
    }
    let found = rustix::net::getsockname(fd)?.address_family();
    let expected = match family {
        ListenerFamily::Unix => found == AddressFamily::UNIX,
        ListenerFamily::Inet => found == AddressFamily::INET || found == AddressFamily::INET6,
    };
    if !expected {
        return Err(invalid(fd, format!("is of address family {}, not {}", found.as_raw(), family.name())));
    }
    if !sockopt::socket_acceptconn(fd)? {
        return Err(invalid(fd, "is a stream socket that does not listen (SO_ACCEPTCONN is 0)".into()));
    }
    rustix::io::ioctl_fionbio(fd, true)?;
    let flags = rustix::io::fcntl_getfd(fd)?;
    if !flags.contains(FdFlags::CLOEXEC) {
        rustix::io::fcntl_setfd(fd, flags | FdFlags::CLOEXEC)?;
    }
    Ok(())
}

/// The file a Unix listener is bound to. A socket bound to an abstract
/// name, or to none, is an error: abstract sockets have no permissions,
/// and clients find the daemon by path.
pub fn unix_listener_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    let addr = SocketAddrUnix::try_from(rustix::net::getsockname(fd)?)
        .map_err(|_| invalid(fd, "is not a Unix socket".into()))?;
    if let Some(path) = addr.path_bytes().filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(OsStr::from_bytes(path)));
    }
    // (An unbound socket's address may read as an empty abstract name.)
    if let Some(name) = addr.abstract_name().filter(|n| !n.is_empty()) {
        return Err(invalid(
            fd,
            format!(
                "listens on the abstract address @{}, which has no file permissions (anyone could connect): \
                 listen on a path",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    Err(invalid(fd, "is a Unix socket bound to no path".into()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::net::SocketFlags;

    use super::*;

    #[test]
    fn a_listening_unix_socket_is_prepared_and_says_where_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        prepare_listener(listener.as_fd(), ListenerFamily::Unix).unwrap();
        let flags = rustix::fs::fcntl_getfl(&listener).unwrap();
        assert!(flags.contains(rustix::fs::OFlags::NONBLOCK), "{flags:?}");
        assert!(rustix::io::fcntl_getfd(&listener).unwrap().contains(FdFlags::CLOEXEC));
        assert_eq!(unix_listener_path(listener.as_fd()).unwrap(), path);
        // A Unix listener is not what TCP needs.
        let err = prepare_listener(listener.as_fd(), ListenerFamily::Inet).unwrap_err();
        assert!(err.to_string().contains("not AF_INET or AF_INET6"), "{err}");
    }

    #[test]
    fn sockets_that_cannot_be_served_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        // Bound, never listened on.
        let bound =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        rustix::net::bind(&bound, &SocketAddrUnix::new(dir.path().join("b.sock")).unwrap()).unwrap();
        let err = prepare_listener(bound.as_fd(), ListenerFamily::Unix).unwrap_err();
        assert!(err.to_string().contains("does not listen"), "{err}");

        let datagram = std::os::unix::net::UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        let err = prepare_listener(datagram.as_fd(), ListenerFamily::Unix).unwrap_err();
        assert!(err.to_string().contains("not a stream socket"), "{err}");

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        prepare_listener(tcp.as_fd(), ListenerFamily::Inet).unwrap();
        let err = prepare_listener(tcp.as_fd(), ListenerFamily::Unix).unwrap_err();
        assert!(err.to_string().contains("not AF_UNIX"), "{err}");

        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let err = prepare_listener(file.as_fd(), ListenerFamily::Unix).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
    }

    #[test]
    fn an_abstract_or_unnamed_unix_listener_has_no_path() {
        let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        let name = format!("ipcd-listener-test-{}", std::process::id());
        rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes()).unwrap()).unwrap();
        rustix::net::listen(&fd, 1).unwrap();
        let err = unix_listener_path(fd.as_fd()).unwrap_err();
        assert!(err.to_string().contains(&format!("abstract address @{name}")), "{err}");

        let unnamed =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None).unwrap();
        let err = unix_listener_path(unnamed.as_fd()).unwrap_err();
        assert!(err.to_string().contains("bound to no path"), "{err}");
    }
}
