//! The requests a session is receiving in chunks, and the checks of their
//! lengths.
//!
//! A request longer than a frame comes as chunks (`ipc_core::message`);
//! chunks of different requests may interleave. The session keeps one
//! entry per request being received, by id, and what it does with the
//! bytes: it assembles them for a handler that takes the whole request,
//! hands them to an upload as they come, reflects them (the built-in
//! echo), or discards them (a request already answered with an error,
//! whose sender goes on sending it). At most
//! [`MAX_PARTIAL`] requests are received at once, and at most as many
//! again are discarded: a sender past both breaks the protocol.
//!
//! Every chunk is checked against the length its first one announced: a
//! sender that sends more, or at its last chunk less, breaks the protocol
//! and is cut off. A request of unknown length that passes the largest
//! message is refused (`MessageTooLarge`) and discarded from there on.

use ipc_core::message::MAX_PARTIAL;

use crate::limits::Charge;
use crate::upload::Upload;

/// What the session does with a request's bytes as they come.
pub(crate) enum Receiving {
    /// Collects them for a handler that takes the whole request; the
    /// buffer is charged against the memory budget as it grows.
    Assemble { bytes: Vec<u8>, charge: Charge },
    /// Hands them to an upload.
    Upload(Box<dyn Upload>),
    /// Sends each chunk back as it comes (the built-in echo).
    Reflect,
    /// Drops them: the request has been answered already.
    Discard,
}

/// A request being received.
pub(crate) struct Incoming {
    pub(crate) id: u64,
    pub(crate) service: u16,
    /// The length announced, if it was.
    pub(crate) total: Option<u64>,
    /// The bytes received so far.
    pub(crate) got: u64,
    pub(crate) receiving: Receiving,
}

/// What a chunk's length says about its request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Length {
    /// Within what was announced (or the largest message).
    Fits,
    /// A request of unknown length passes the largest message with it.
    TooLong,
}

impl Incoming {
    /// Checks a chunk of `len` bytes (the last one if `last`) against the
    /// announced length and `max_message`, without taking it. An error is a
    /// violation: more than announced, or at the last chunk less.
    pub(crate) fn check(&self, len: usize, last: bool, max_message: u64) -> Result<Length, String> {
        let got = self.got.saturating_add(len as u64);
        match self.total {
            Some(total) if got > total || (last && got != total) => {
                Err(format!("request {} announced {total} bytes and carried {got}", self.id))
            }
            Some(_) => Ok(Length::Fits),
            None if got > max_message && !matches!(self.receiving, Receiving::Discard) => Ok(Length::TooLong),
            None => Ok(Length::Fits),
        }
    }

    /// Whether it is received rather than discarded.
    fn is_live(&self) -> bool {
        !matches!(self.receiving, Receiving::Discard)
    }
}

/// The requests a session is receiving; see the module docs.
#[derive(Default)]
pub(crate) struct Inbox {
    entries: Vec<Incoming>,
}

impl Inbox {
    /// The request `id`, if it is being received.
    pub(crate) fn get(&self, id: u64) -> Option<&Incoming> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The request `id`, if it is being received.
    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Incoming> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    /// Whether another request may begin to be received (rather than
    /// discarded).
    pub(crate) fn has_room(&self) -> bool {
        self.entries.iter().filter(|e| e.is_live()).count() < MAX_PARTIAL
    }

    /// Whether another refused request may be discarded as it comes.
    pub(crate) fn has_room_to_discard(&self) -> bool {
        self.entries.iter().filter(|e| !e.is_live()).count() < MAX_PARTIAL
    }

    pub(crate) fn insert(&mut self, entry: Incoming) {
        self.entries.push(entry);
    }

    /// Takes request `id` out.
    pub(crate) fn remove(&mut self, id: u64) -> Option<Incoming> {
        let i = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.swap_remove(i))
    }

    /// Every request received (not discarded), taken out, for a session
    /// that stops.
    pub(crate) fn take_live(&mut self) -> Vec<Incoming> {
        let (live, discarded) = std::mem::take(&mut self.entries).into_iter().partition(Incoming::is_live);
        self.entries = discarded;
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(total: Option<u64>, got: u64, receiving: Receiving) -> Incoming {
        Incoming { id: 7, service: 0, total, got, receiving }
    }

    #[test]
    fn chunks_are_held_to_the_announced_length() {
        let e = entry(Some(10), 6, Receiving::Reflect);
        assert_eq!(e.check(4, false, 100), Ok(Length::Fits));
        assert_eq!(e.check(4, true, 100), Ok(Length::Fits));
        assert!(e.check(5, false, 100).unwrap_err().contains("announced 10 bytes and carried 11"));
        assert!(e.check(3, true, 100).unwrap_err().contains("announced 10 bytes and carried 9"));
        // Unknown lengths are held to the largest message; a discarded one
        // to nothing.
        let e = entry(None, 90, Receiving::Reflect);
        assert_eq!(e.check(10, false, 100), Ok(Length::Fits));
        assert_eq!(e.check(11, false, 100), Ok(Length::TooLong));
        let e = entry(None, u64::MAX - 1, Receiving::Discard);
        assert_eq!(e.check(usize::MAX, true, 100), Ok(Length::Fits));
    }

    #[test]
    fn at_most_max_partial_are_received_and_as_many_discarded() {
        let mut inbox = Inbox::default();
        for id in 0..MAX_PARTIAL as u64 {
            assert!(inbox.has_room());
            inbox.insert(Incoming { id, ..entry(None, 0, Receiving::Reflect) });
        }
        assert!(!inbox.has_room());
        for id in 100..100 + MAX_PARTIAL as u64 {
            assert!(inbox.has_room_to_discard());
            inbox.insert(Incoming { id, ..entry(None, 0, Receiving::Discard) });
        }
        assert!(!inbox.has_room_to_discard());
        assert_eq!(inbox.take_live().len(), MAX_PARTIAL);
        assert!(inbox.has_room() && inbox.take_live().is_empty());
        assert!(inbox.remove(100).is_some() && inbox.get(100).is_none());
    }
}
