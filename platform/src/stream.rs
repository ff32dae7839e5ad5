//! Byte-stream I/O for the Unix-socket and TCP transports: sends and
//! receives that block or not per call, receive timeouts, and readiness.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

/// Sends from `buf` on a connected stream socket. With `wait` false the
/// call never blocks (`WouldBlock` when the send buffer is full). Never
/// raises SIGPIPE: a closed peer is `BrokenPipe`.
pub fn send(sock: BorrowedFd<'_>, buf: &[u8], wait: bool) -> io::Result<usize> {
    let flags = if wait { SendFlags::NOSIGNAL } else { SendFlags::NOSIGNAL | SendFlags::DONTWAIT };
    loop {
        match rustix::net::send(sock, buf, flags) {
            Ok(n) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives into `buf`; `Ok(0)` is the peer's orderly close. With `wait`
/// false the call never blocks (`WouldBlock` when nothing is there); with
/// `wait` true it blocks up to the socket's receive timeout
/// (`WouldBlock` when it passes).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], wait: bool) -> io::Result<usize> {
    let flags = if wait { RecvFlags::empty() } else { RecvFlags::DONTWAIT };
    loop {
        match rustix::net::recv(sock, &mut *buf, flags) {
            Ok((n, _)) => return Ok(n),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets how long a blocking [`recv`] waits (`None`: forever). Durations
/// under a microsecond are raised to one, since zero would mean forever.
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let timeout = timeout.map(|t| t.max(Duration::from_micros(1)));
    rustix::net::sockopt::set_socket_timeout(sock, rustix::net::sockopt::Timeout::Recv, timeout)?;
    Ok(())
}

/// Readiness found by [`wait_ready`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Readable, or hung up, or in error (a read will not block).
    pub readable: bool,
    /// Writable, or in error (a write will not block).
    pub writable: bool,
}

/// Waits until `sock` is readable, or writable when `want_write`, for at
/// most `timeout`.
pub fn wait_ready(sock: BorrowedFd<'_>, want_write: bool, timeout: Option<Duration>) -> io::Result<Ready> {
    let flags = if want_write { PollFlags::IN | PollFlags::OUT } else { PollFlags::IN };
    let mut polls = [PollFd::new(&sock, flags)];
    let ts = timeout.map(crate::futex::timespec);
    match rustix::event::poll(&mut polls, ts.as_ref()) {
        Ok(_) | Err(Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    let got = polls[0].revents();
    let failed = got.intersects(PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL);
    Ok(Ready { readable: got.contains(PollFlags::IN) || failed, writable: got.contains(PollFlags::OUT) || failed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn non_blocking_calls_report_would_block_and_close() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 16];
        let err = recv(a.as_fd(), &mut buf, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(send(b.as_fd(), b"hello", false).unwrap(), 5);
        assert!(wait_ready(a.as_fd(), false, Some(Duration::from_secs(5))).unwrap().readable);
        assert_eq!(recv(a.as_fd(), &mut buf, true).unwrap(), 5);
        // A full send buffer: non-blocking sends stop with WouldBlock.
        let chunk = vec![0u8; 65536];
        let blocked = (0..10_000).find_map(|_| send(b.as_fd(), &chunk, false).err()).unwrap();
        assert_eq!(blocked.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(send(b.as_fd(), b"x", false).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn blocking_recv_honours_the_timeout() {
        let (a, _b) = UnixStream::pair().unwrap();
        set_recv_timeout(a.as_fd(), Some(Duration::from_millis(20))).unwrap();
        let started = std::time::Instant::now();
        let err = recv(a.as_fd(), &mut [0u8; 4], true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= Duration::from_millis(15));
        let ready = wait_ready(a.as_fd(), true, Some(Duration::ZERO)).unwrap();
        assert_eq!(ready, Ready { readable: false, writable: true });
    }
}
