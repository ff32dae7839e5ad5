//! A new session's shared parts: the sealed segment with its header
//! written, the client-to-server eventfd, and with a pollable doorbell the
//! server-to-client socket pair. Made by the daemon for its own sessions
//! and for the sessions it brokers between a client and a provider.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use ipc_core::{DoorbellKind, Region, SegmentLayout};
use ipc_platform::{EventFd, Mapping, SocketBell};

/// See the module docs.
pub(crate) struct NewSegment {
    pub(crate) layout: SegmentLayout,
    /// The segment's memfd, sealed, allocated, its header written.
    pub(crate) memfd: OwnedFd,
    /// The daemon's mapping of it.
    pub(crate) region: Region,
    /// The client rings it; the server watches it.
    pub(crate) bell: EventFd,
    /// With a pollable doorbell: the server's end, then the client's.
    pub(crate) wake: Option<(SocketBell, SocketBell)>,
}

impl NewSegment {
    /// Creates the parts of a session with rings of `capacity` bytes (a
    /// valid capacity: the caller fitted it) and the `doorbell` asked for.
    pub(crate) fn create(capacity: u32, doorbell: DoorbellKind) -> io::Result<NewSegment> {
        let layout = SegmentLayout::new(capacity).map_err(io::Error::other)?;
        let size = layout.segment_size();
        let memfd = ipc_platform::create_sealed("ipcd-session", size as u64)?;
        let region = Mapping::map(memfd.as_fd(), size).map_err(io::Error::other)?;
        layout.write_header(&region);
        let bell = EventFd::new()?;
        NewSegment { layout, memfd, region, bell, wake: None }.with_doorbell(doorbell)
    }

    /// Gives a segment made with a futex doorbell (a pooled one) the
    /// `doorbell` a client asks for: with a pollable one, its socket pair.
    pub(crate) fn with_doorbell(mut self, doorbell: DoorbellKind) -> io::Result<NewSegment> {
        match doorbell {
            DoorbellKind::Pollable if self.wake.is_none() => self.wake = Some(SocketBell::pair()?),
            DoorbellKind::Pollable | DoorbellKind::Futex => {}
            other => return Err(io::Error::other(format!("doorbell {other:?} is not one this daemon makes"))),
        }
        Ok(self)
    }
}
