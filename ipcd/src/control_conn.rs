//! A control connection after its handshake: framed messages both ways
//! over a non-blocking Unix stream socket, with fds on the messages that
//! carry them. The daemon's broker uses it for callers and providers; a
//! provider for its connection to the daemon.
//!
//! Messages are framed as the handshake is (a `u32` length, then bincode;
//! see `ipc_core::handshake`). Input is read without blocking into a
//! bounded buffer; a message is taken only when whole. Received fds queue
//! in arrival order: the kernel delivers a message's fds with its first
//! bytes, so the message that carries them finds them at the front once
//! it is whole. Output a socket does not take at once waits in a buffer
//! (fds go only with a message sent while nothing waits, so they can never
//! be attached to another message's bytes).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ipc_core::handshake::{self, LENGTH_PREFIX, MAX_CONTROL_MESSAGE};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most bytes read ahead of the message being taken.
const INPUT_LIMIT: usize = 2 * (LENGTH_PREFIX + MAX_CONTROL_MESSAGE);
/// The most unsent bytes kept for a peer that reads slowly; past it the
/// peer is not reading its control connection.
const OUTPUT_LIMIT: usize = 4 * (LENGTH_PREFIX + MAX_CONTROL_MESSAGE);
/// The most received fds kept ahead of the messages that take them. Reading
/// pauses before one more read could pass it (the kernel hands over at most
/// one message's fds, [`ipc_platform::MAX_FDS`], per read), and goes on once
/// the messages that carry them are taken.
const FD_LIMIT: usize = 16;

/// Whether the connection takes fds from its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fds {
    /// Refused: the kernel discards any before they enter this process, and
    /// sending some breaks the protocol (the daemon's side).
    Refuse,
    /// Taken and queued for the messages that carry them (a provider's side
    /// of its daemon connection).
    Accept,
}

/// See the module docs.
pub(crate) struct ControlConn {
    pub(crate) stream: mio::net::UnixStream,
    fds: Fds,
    input: Vec<u8>,
    received: VecDeque<OwnedFd>,
    output: Vec<u8>,
    sent: usize,
    /// The peer closed its end (input may still hold whole messages).
    pub(crate) closed: bool,
}

impl ControlConn {
    pub(crate) fn new(stream: mio::net::UnixStream, fds: Fds) -> ControlConn {
        ControlConn {
            stream,
            fds,
            input: Vec::new(),
            received: VecDeque::new(),
            output: Vec::new(),
            sent: 0,
            closed: false,
        }
    }

    /// Reads what the socket holds, up to the input limit and the fd limit,
    /// without blocking. Returns whether it stopped at a limit (so the
    /// socket may hold more: take the whole messages, then receive again).
    /// An error is a broken protocol or a failed socket: the connection is
    /// done.
    pub(crate) fn receive(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 8192];
        if self.received.len() + ipc_platform::MAX_FDS > FD_LIMIT && !self.has_whole_message() {
            return Err(format!(
                "the peer sent more than {} file descriptors ahead of its messages",
                self.received.len()
            ));
        }
        loop {
            if self.closed {
                return Ok(false);
            }
            if self.input.len() >= INPUT_LIMIT || self.received.len() + ipc_platform::MAX_FDS > FD_LIMIT {
                return Ok(true);
            }
            let room = (INPUT_LIMIT - self.input.len()).min(chunk.len());
            let read = match self.fds {
                Fds::Refuse => {
                    ipc_platform::recv_refusing_fds(self.stream.as_fd(), &mut chunk[..room]).and_then(|(n, dropped)| {
                        if dropped {
                            return Err(io::Error::other("the peer sent file descriptors; none are accepted"));
                        }
                        Ok(n)
                    })
                }
                Fds::Accept => ipc_platform::recv_with_fds(self.stream.as_fd(), &mut chunk[..room]).map(|(n, fds)| {
                    self.received.extend(fds);
                    n
                }),
            };
            match read {
                Ok(0) => self.closed = true,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.closed = true,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Bytes read and not yet taken as messages.
    pub(crate) fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Whether the input holds a whole message (whose length prefix may
    /// still be bad: [`ControlConn::next`] says).
    fn has_whole_message(&self) -> bool {
        let Some(prefix) = self.input.first_chunk::<LENGTH_PREFIX>() else { return false };
        match handshake::body_len(*prefix) {
            Ok(len) => self.input.len() >= LENGTH_PREFIX + len,
            Err(_) => true,
        }
    }

    /// The next whole message, decoded, if one is in the input.
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, String> {
        if self.input.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let prefix = [self.input[0], self.input[1], self.input[2], self.input[3]];
        let len = handshake::body_len(prefix).map_err(|e| e.to_string())?;
        if self.input.len() < LENGTH_PREFIX + len {
            return Ok(None);
        }
        let message = handshake::decode(&self.input[LENGTH_PREFIX..LENGTH_PREFIX + len]).map_err(|e| e.to_string());
        self.input.drain(..LENGTH_PREFIX + len);
        message.map(Some)
    }

    /// Whether input is left that is not a whole message (a peer that
    /// closed mid-message).
    #[cfg(test)]
    fn has_partial_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// Takes the `n` fds that came with the message just taken.
    pub(crate) fn take_fds(&mut self, n: usize) -> Result<Vec<OwnedFd>, String> {
        if self.received.len() < n {
            return Err(format!("a message that carries {n} file descriptors came with {}", self.received.len()));
        }
        Ok(self.received.drain(..n).collect())
    }

    /// Sends `message` with `fds`. What the socket does not take now waits
    /// for [`ControlConn::flush`]. An error means the peer does not read
    /// its connection (or is gone).
    pub(crate) fn send<T: Serialize>(&mut self, message: &T, fds: &[BorrowedFd<'_>]) -> Result<(), String> {
        let bytes = handshake::encode(message).map_err(|e| e.to_string())?;
        self.flush()?;
        if self.pending() > 0 {
            if !fds.is_empty() {
                return Err("the peer leaves earlier messages unread; no file descriptors are sent".into());
            }
            return self.queue(&bytes);
        }
        let n = match ipc_platform::send_with_fds(self.stream.as_fd(), &bytes, fds) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && fds.is_empty() => 0,
            Err(e) => return Err(format!("send failed: {e}")),
        };
        self.queue(&bytes[n..])
    }

    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    fn queue(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.pending() + bytes.len() > OUTPUT_LIMIT {
            return Err(format!("the peer leaves more than {OUTPUT_LIMIT} bytes of messages unread"));
        }
        self.output.extend_from_slice(bytes);
        Ok(())
    }

    /// Sends what waits, without blocking.
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        while self.sent < self.output.len() {
            match ipc_platform::stream::send(self.stream.as_fd(), &self.output[self.sent..], false) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("send failed: {e}")),
            }
        }
        if self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_core::control::ProviderMessage;

    fn pair(fds: Fds) -> (ControlConn, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (ControlConn::new(mio::net::UnixStream::from_std(ours), fds), theirs)
    }

    #[test]
    fn messages_split_anywhere_are_taken_whole() {
        use std::io::Write;
        let (mut conn, mut peer) = pair(Fds::Refuse);
        let a = handshake::encode(&ProviderMessage::Accept { session_id: 7 }).unwrap();
        let b = handshake::encode(&ProviderMessage::Closed { session_id: 8 }).unwrap();
        let wire = [a, b].concat();
        let mut got = Vec::new();
        for piece in wire.chunks(3) {
            peer.write_all(piece).unwrap();
            conn.receive().unwrap();
            while let Some(m) = conn.next::<ProviderMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, [ProviderMessage::Accept { session_id: 7 }, ProviderMessage::Closed { session_id: 8 }]);
        drop(peer);
        conn.receive().unwrap();
        assert!(conn.closed && !conn.has_partial_input());
    }

    #[test]
    fn a_peer_that_sends_fds_where_none_are_taken_breaks_the_protocol() {
        let (mut conn, peer) = pair(Fds::Refuse);
        let e = ipc_platform::EventFd::new().unwrap();
        ipc_platform::send_with_fds(peer.as_fd(), b"\x01\x00\x00\x00x", &[e.as_fd()]).unwrap();
        let err = conn.receive().unwrap_err();
        assert!(err.contains("file descriptors"), "{err}");
    }

    #[test]
    fn garbage_and_oversized_frames_are_errors() {
        use std::io::Write;
        let (mut conn, mut peer) = pair(Fds::Refuse);
        peer.write_all(&u32::MAX.to_le_bytes()).unwrap();
        conn.receive().unwrap();
        assert!(conn.next::<ProviderMessage>().is_err());
        let (mut conn, mut peer) = pair(Fds::Refuse);
        peer.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
        conn.receive().unwrap();
        assert!(conn.next::<ProviderMessage>().is_err());
    }

    #[test]
    fn fds_come_with_their_message() {
        let (mut conn, peer) = pair(Fds::Accept);
        let e = ipc_platform::EventFd::new().unwrap();
        let bytes = handshake::encode(&ProviderMessage::Accept { session_id: 1 }).unwrap();
        ipc_platform::send_with_fds(peer.as_fd(), &bytes, &[e.as_fd(), e.as_fd()]).unwrap();
        conn.receive().unwrap();
        assert!(conn.next::<ProviderMessage>().unwrap().is_some());
        assert_eq!(conn.take_fds(2).unwrap().len(), 2);
        assert!(conn.take_fds(1).is_err());
    }

    #[test]
    fn many_messages_with_fds_are_all_taken_a_limit_at_a_time() {
        let (mut conn, peer) = pair(Fds::Accept);
        let e = ipc_platform::EventFd::new().unwrap();
        let count = 3 * FD_LIMIT;
        for id in 0..count as u64 {
            let bytes = handshake::encode(&ProviderMessage::Accept { session_id: id }).unwrap();
            ipc_platform::send_with_fds(peer.as_fd(), &bytes, &[e.as_fd(); ipc_platform::MAX_FDS]).unwrap();
        }
        let mut taken = Vec::new();
        let mut passes = 0;
        loop {
            let more = conn.receive().unwrap();
            passes += 1;
            assert!(conn.received.len() <= FD_LIMIT);
            while let Some(ProviderMessage::Accept { session_id }) = conn.next::<ProviderMessage>().unwrap() {
                assert_eq!(conn.take_fds(ipc_platform::MAX_FDS).unwrap().len(), ipc_platform::MAX_FDS);
                taken.push(session_id);
            }
            if !more {
                break;
            }
        }
        assert_eq!(taken, (0..count as u64).collect::<Vec<_>>());
        assert!(passes > 1, "the fd limit paused reading at least once");
    }

    #[test]
    fn fds_that_no_message_takes_break_the_protocol() {
        let (mut conn, peer) = pair(Fds::Accept);
        let e = ipc_platform::EventFd::new().unwrap();
        for _ in 0..FD_LIMIT {
            let bytes = handshake::encode(&ProviderMessage::Accept { session_id: 1 }).unwrap();
            ipc_platform::send_with_fds(peer.as_fd(), &bytes, &[e.as_fd(); ipc_platform::MAX_FDS]).unwrap();
        }
        let err = loop {
            match conn.receive() {
                // Messages taken, their fds not: what a peer declaring fewer fds than it sent causes.
                Ok(_) => while conn.next::<ProviderMessage>().unwrap().is_some() {},
                Err(e) => break e,
            }
        };
        assert!(err.contains("file descriptors ahead"), "{err}");
    }
}
