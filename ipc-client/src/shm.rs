//! The shared-memory link: a request ring and a response ring in a sealed
//! segment, a doorbell each way used only when the other side sleeps, and
//! the control connection whose hang-up means the peer is gone. The peer
//! is the daemon (its welcome's session) or a provider (a brokered
//! session, whose control connection is the liveness socket). How a
//! client spins and sleeps on one link or several is in `wait.rs`, built
//! on the steps here.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU32;

use ipc_core::{Consumer, Frame, Producer, PushError, SharedWords};
use ipc_platform::{Drained, EventFd, SocketBell};

use crate::error::CallError;
use crate::link::{disconnected, RequestBuf};
use crate::liveness::Watch;

/// How the peer wakes us.
pub(crate) enum Bell {
    Futex,
    Pollable(SocketBell),
}

/// Who is at the other end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The daemon, for its own services.
    Daemon,
    /// A provider, in a session the daemon brokered.
    Provider,
}

impl Peer {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Daemon => "the daemon",
            Peer::Provider => "the provider",
        }
    }
}

/// What a sleeping wait on a link waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sleep {
    /// A reply in the response ring.
    Reply,
    /// Room for a request of this many bytes in the request ring.
    Space(usize),
    /// Either: a frame in the response ring, or room for this many bytes
    /// in the request ring (both announced, both words slept on).
    Either(usize),
}

pub(crate) struct ShmLink {
    pub(crate) control: UnixStream,
    pub(crate) requests: Producer,
    pub(crate) responses: Consumer,
    /// The client-to-peer doorbell.
    pub(crate) peer_bell: EventFd,
    pub(crate) bell: Bell,
    /// The segment's shared words, for its header's `closed` word.
    pub(crate) words: SharedWords,
    pub(crate) peer: Peer,
    /// Set once the peer is found gone; replies it left are still read.
    pub(crate) gone: Option<String>,
    /// The liveness watcher's registration of `control` (futex doorbells
    /// only; see `liveness.rs`).
    pub(crate) watch: Option<Watch>,
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        // Before `control` closes: the watch borrows its fd.
        if let Some(watch) = self.watch.take() {
            watch.release(self.control.as_fd());
        }
    }
}

impl ShmLink {
    pub(crate) fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.bell {
            Bell::Pollable(b) => Some(b.as_fd()),
            Bell::Futex => None,
        }
    }

    /// Whether a sleeping wait on this link is told at once that its peer
    /// hung up: by the poll on its control connection (a pollable
    /// doorbell) or by the liveness watcher. Else the wait must look
    /// every slice.
    pub(crate) fn is_watched(&self) -> bool {
        match &self.bell {
            Bell::Pollable(_) => true,
            Bell::Futex => self.watch.as_ref().is_some_and(Watch::is_watched),
        }
    }

    /// After the announcement (see `liveness.rs`): settles the link if the
    /// liveness watcher found its control connection hung up. Whether it
    /// is gone now.
    pub(crate) fn check_alarm(&mut self) -> bool {
        if self.gone.is_none() && self.watch.as_ref().is_some_and(Watch::rung) {
            self.gone = Some(
                self.peer_gone().unwrap_or_else(|| format!("{} sent data on the control connection", self.peer.name())),
            );
        }
        self.gone.is_some()
    }

    /// The last request the peer took, once it closed the session on
    /// purpose (it is stopping); see `ipc_core::layout`.
    pub(crate) fn closed_after(&self) -> Option<u64> {
        self.words.closed_after()
    }

    fn ring_peer(&self) -> Result<(), CallError> {
        self.peer_bell.notify().map_err(|e| disconnected(format!("cannot ring {}'s doorbell: {e}", self.peer.name())))
    }

    pub(crate) fn try_write<R>(
        &mut self,
        service: u16,
        flags: u16,
        id: u64,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
    ) -> Result<Option<R>, CallError> {
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        match self.requests.try_push_with(service, flags, id, len, |w| fill(&mut RequestBuf::new(w, len))) {
            Ok(r) => Ok(Some(r)),
            Err(PushError::Full) => Ok(None),
            Err(PushError::TooLarge { len, max }) => Err(CallError::TooLarge { len, max: max as usize }),
            Err(PushError::Corrupt(e)) => Err(disconnected(format!("request ring corrupt: {e}"))),
            Err(e) => Err(disconnected(e.to_string())),
        }
    }

    pub(crate) fn flush(&mut self) -> Result<(), CallError> {
        if self.requests.publish() {
            self.ring_peer()?;
        }
        Ok(())
    }

    pub(crate) fn peek(&mut self) -> Result<Option<Frame>, CallError> {
        self.responses.try_peek().map_err(|e| disconnected(format!("response ring corrupt: {e}")))
    }

    /// Consumes `frame` and hands its space back to the peer at once: it
    /// may be waiting for it.
    pub(crate) fn consume(&mut self, frame: &Frame) -> Result<(), CallError> {
        self.responses.consume(frame);
        if self.responses.release() {
            self.ring_peer()?;
        }
        Ok(())
    }

    /// Whether what a wait waits for is there now (for spinning). A ring
    /// that breaks the rules counts as ready: reading it reports that.
    pub(crate) fn ready(&mut self, what: Sleep) -> bool {
        match what {
            Sleep::Reply => !self.responses.is_empty().unwrap_or(true),
            Sleep::Space(len) => self.requests.has_space_for(len).unwrap_or(true),
            Sleep::Either(len) => self.ready(Sleep::Reply) || self.ready(Sleep::Space(len)),
        }
    }

    /// Announces a sleep for `what` in the ring (the sleep handshake of
    /// `ipc_core::ring`): `false` if it is there already, and nothing is
    /// announced; the reason if the ring breaks the rules.
    pub(crate) fn announce(&mut self, what: Sleep) -> Result<bool, String> {
        match what {
            Sleep::Reply => self.responses.prepare_sleep().map_err(|e| format!("response ring corrupt: {e}")),
            Sleep::Space(len) => {
                self.requests.prepare_wait_space(len).map_err(|e| format!("request ring corrupt: {e}"))
            }
            // Each ring's handshake on its own: once both stand, the peer
            // wakes us for either.
            Sleep::Either(len) => {
                if !self.announce(Sleep::Reply)? {
                    return Ok(false);
                }
                let announced = self.announce(Sleep::Space(len));
                if !matches!(announced, Ok(true)) {
                    self.withdraw(Sleep::Reply);
                }
                announced
            }
        }
    }

    /// Withdraws an announcement (harmless where none stands).
    pub(crate) fn withdraw(&self, what: Sleep) {
        match what {
            Sleep::Reply => self.responses.finish_sleep(),
            Sleep::Space(_) => self.requests.finish_wait_space(),
            Sleep::Either(_) => {
                self.responses.finish_sleep();
                self.requests.finish_wait_space();
            }
        }
    }

    /// The futex words a sleep for `what` waits on (one or two): each
    /// holds 1 while its announcement stands, and the peer clears it
    /// before it wakes us.
    pub(crate) fn words(&self, what: Sleep) -> [Option<&AtomicU32>; 2] {
        match what {
            Sleep::Reply => [Some(self.responses.data_waiter()), None],
            Sleep::Space(_) => [Some(self.requests.space_waiter()), None],
            Sleep::Either(_) => [Some(self.responses.data_waiter()), Some(self.requests.space_waiter())],
        }
    }

    /// Why the peer is gone, if it is, found without waiting: it closed
    /// the session on purpose (the `closed` word), or its end of the
    /// control connection is closed.
    pub(crate) fn peer_gone(&self) -> Option<String> {
        // A peer that closes the session on purpose says so in the segment
        // and rings: no need to wait for the hang-up.
        if self.closed_after().is_some() {
            return Some(format!("{} closed the session: it is stopping", self.peer.name()));
        }
        match ipc_platform::peer_closed(self.control.as_fd()) {
            Ok(false) => None,
            Ok(true) => Some(format!("{} closed the session", self.peer.name())),
            Err(e) => Some(format!("control connection failed: {e}")),
        }
    }

    /// Empties the pollable doorbell after a poll found it readable; the
    /// reason if its other end is closed.
    pub(crate) fn drain_bell(&self) -> Result<(), String> {
        let Bell::Pollable(bell) = &self.bell else { return Ok(()) };
        match bell.drain() {
            Ok(Drained::Rang) | Ok(Drained::Quiet) => Ok(()),
            Ok(Drained::Closed) => Err(format!("{} closed the session", self.peer.name())),
            Err(e) => Err(format!("doorbell read failed: {e}")),
        }
    }
}
