//! Passing file descriptors over Unix sockets with `SCM_RIGHTS`.
//!
//! Received fds are close-on-exec (`MSG_CMSG_CLOEXEC`). A truncated control
//! message (`MSG_CTRUNC`: the kernel dropped fds, because the buffer was
//! too small or the fd limit was hit) is an error, never silently fewer fds;
//! the fds that did arrive are closed. Where no fds are expected,
//! [`recv_refusing_fds`] gives the kernel no room for any, so a peer's fds
//! are dropped before they reach this process, and says whether there were
//! some.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

/// The most fds one message may carry.
pub const MAX_FDS: usize = 4;

/// Sends `bytes` with `fds` attached to them. Returns the bytes sent (the
/// fds travel with the first byte).
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} fds per message");
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("fds do not fit the control buffer"));
    }
    Ok(rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?)
}

/// Receives into `buf`, collecting any fds that came with the bytes.
/// Returns `(bytes, fds)`; 0 bytes and no fds means the peer hung up.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let ret = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if ret.flags.contains(ReturnFlags::CTRUNC) {
        // Dropping `fds` closes what did arrive.
        return Err(io::Error::other(format!("control message truncated: fds were dropped ({} arrived)", fds.len())));
    }
    Ok((ret.bytes, fds))
}

/// Receives into `buf` where no fds are expected: any the peer attached
/// are discarded by the kernel (the message has no room for control data,
/// so `MSG_CTRUNC` is set) and never enter this process. Returns `(bytes,
/// whether control data, such as fds, was discarded)`; 0 bytes and `false`
/// means the peer hung up. (Nothing here enables `SO_PASSCRED`, so the only
/// control data a peer can attach is fds.)
pub fn recv_refusing_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut control = RecvAncillaryBuffer::default();
    let ret = rustix::net::recvmsg(sock, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::empty())?;
    Ok((ret.bytes, ret.flags.contains(ReturnFlags::CTRUNC)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_and_are_cloexec() {
        let (a, b) = UnixStream::pair().unwrap();
        let e = crate::EventFd::new().unwrap();
        assert_eq!(send_with_fds(a.as_fd(), b"hi", &[e.as_fd()]).unwrap(), 2);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (2, 1));
        let flags = rustix::io::fcntl_getfd(&fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // The received fd is the same eventfd.
        let got = crate::EventFd::from_fd(fds.into_iter().next().unwrap()).unwrap();
        e.notify().unwrap();
        let mut counter = [0u8; 8];
        rustix::io::read(&got, &mut counter).unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 1);
    }

    #[test]
    fn truncated_control_message_is_an_error() {
        // Send more fds than the receiver makes room for: the kernel drops
        // the rest and sets MSG_CTRUNC, which must not pass silently.
        let (a, b) = UnixStream::pair().unwrap();
        let fds: Vec<crate::EventFd> = (0..MAX_FDS + 4).map(|_| crate::EventFd::new().unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
        rustix::net::sendmsg(a.as_fd(), &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();
        let mut buf = [0u8; 8];
        let err = recv_with_fds(b.as_fd(), &mut buf).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn refused_fds_are_reported_and_never_received() {
        const NAME: &str = "fdpass-refused-probe";
        // Other tests open and close fds meanwhile, so look for this one
        // memfd by name rather than counting.
        let open_copies = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(NAME)))
                .count()
        };
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = crate::create_sealed(NAME, 4096).unwrap();
        send_with_fds(a.as_fd(), b"with", &[memfd.as_fd(), memfd.as_fd()]).unwrap();
        send_with_fds(a.as_fd(), b"bare", &[]).unwrap();
        drop(memfd);
        let mut buf = [0u8; 16];
        // A message with fds is read up to its end alone.
        assert_eq!(recv_refusing_fds(b.as_fd(), &mut buf).unwrap(), (4, true));
        assert_eq!(&buf[..4], b"with");
        assert_eq!(recv_refusing_fds(b.as_fd(), &mut buf).unwrap(), (4, false));
        assert_eq!(&buf[..4], b"bare");
        assert_eq!(open_copies(), 0, "a refused fd entered the process");
    }

    #[test]
    fn hang_up_reads_zero() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }
}
