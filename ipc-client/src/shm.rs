//! The shared-memory link: a request ring and a response ring in a sealed
//! segment, doorbells only when the other side sleeps, and adaptive
//! spinning before sleeping.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipc_core::{Consumer, Frame, Producer, PushError, SharedWords, Spinner};
use ipc_platform::futex::{self, Wake};
use ipc_platform::{CoreGauge, Drained, EventFd, SocketBell};

use crate::error::CallError;
use crate::link::{disconnected, RequestBuf};

/// How long a sleeping wait sleeps between checks that the daemon is still
/// there. Bounds how late a daemon crash is noticed by a blocked call.
const LIVENESS_SLICE: Duration = Duration::from_millis(50);

/// How the daemon wakes us.
pub(crate) enum Bell {
    Futex,
    Pollable(SocketBell),
}

/// What a sleeping wait waits for.
#[derive(Clone, Copy)]
enum Await {
    Reply,
    Space,
}

pub(crate) struct ShmLink {
    pub(crate) control: UnixStream,
    pub(crate) requests: Producer,
    pub(crate) responses: Consumer,
    pub(crate) daemon_bell: EventFd,
    pub(crate) bell: Bell,
    pub(crate) spinner: Spinner,
    pub(crate) gauge: CoreGauge,
    /// The segment's shared words, for its header's `closed` word.
    pub(crate) words: SharedWords,
    /// Set once the daemon is found gone; replies it left are still read.
    pub(crate) gone: Option<String>,
}

impl ShmLink {
    pub(crate) fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.bell {
            Bell::Pollable(b) => Some(b.as_fd()),
            Bell::Futex => None,
        }
    }

    /// The last request the daemon took, once it closed the session on
    /// purpose (it is shutting down); see `ipc_core::layout`.
    pub(crate) fn closed_after(&self) -> Option<u64> {
        self.words.closed_after()
    }

    fn ring_daemon(&self) -> Result<(), CallError> {
        self.daemon_bell.notify().map_err(|e| disconnected(format!("cannot ring the daemon's doorbell: {e}")))
    }

    pub(crate) fn try_write<R>(
        &mut self,
        service: u16,
        id: u64,
        len: usize,
        fill: impl FnOnce(&mut RequestBuf<'_>) -> R,
    ) -> Result<Option<R>, CallError> {
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        match self.requests.try_push_with(service, 0, id, len, |w| fill(&mut RequestBuf::new(w, len))) {
            Ok(r) => Ok(Some(r)),
            Err(PushError::Full) => Ok(None),
            Err(PushError::TooLarge { len, max }) => Err(CallError::TooLarge { len, max: max as usize }),
            Err(PushError::Corrupt(e)) => Err(disconnected(format!("request ring corrupt: {e}"))),
            Err(e) => Err(disconnected(e.to_string())),
        }
    }

    pub(crate) fn flush(&mut self) -> Result<(), CallError> {
        if self.requests.publish() {
            self.ring_daemon()?;
        }
        Ok(())
    }

    /// Sleeps until a request of `len` bytes may fit, or the deadline.
    pub(crate) fn wait_writable(&mut self, len: usize, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        self.flush()?;
        match self.requests.prepare_wait_space(len) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(disconnected(format!("request ring corrupt: {e}"))),
        }
        let waited = self.sleep(Await::Space, deadline, timeout);
        self.requests.finish_wait_space();
        self.replies_first(waited)
    }

    pub(crate) fn peek(&mut self) -> Result<Option<Frame>, CallError> {
        self.responses.try_peek().map_err(|e| disconnected(format!("response ring corrupt: {e}")))
    }

    /// Consumes `frame` and hands its space back to the daemon at once: it
    /// may be waiting for it.
    pub(crate) fn consume(&mut self, frame: &Frame) -> Result<(), CallError> {
        self.responses.consume(frame);
        if self.responses.release() {
            self.ring_daemon()?;
        }
        Ok(())
    }

    /// Waits until a reply may be there: spins first if the spinner says
    /// it pays, then sleeps until the daemon rings or the deadline passes.
    pub(crate) fn wait_readable(&mut self, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        if let Some(reason) = &self.gone {
            return Err(disconnected(reason.clone()));
        }
        self.flush()?;
        let (responses, gauge) = (&mut self.responses, &mut self.gauge);
        if self.spinner.spin(|| gauge.core_free(), || !responses.is_empty().unwrap_or(true)) {
            return Ok(());
        }
        match self.responses.prepare_sleep() {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(disconnected(format!("response ring corrupt: {e}"))),
        }
        let waited = self.sleep(Await::Reply, deadline, timeout);
        self.responses.finish_sleep();
        self.replies_first(waited)
    }

    /// What a wait reports once it is over. A daemon found gone is
    /// reported by the next write or wait instead: the caller looks at the
    /// ring once more, for the replies the daemon left before it went.
    fn replies_first(&mut self, waited: Result<(), CallError>) -> Result<(), CallError> {
        match waited {
            Err(CallError::Disconnected { reason }) => {
                self.gone = Some(reason);
                Ok(())
            }
            other => other,
        }
    }

    /// Sleeps until the daemon rings, the deadline passes, or the daemon is
    /// found gone. The caller has announced the sleep in the ring.
    fn sleep(&mut self, what: Await, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        loop {
            // A daemon that closes the session on purpose says so in the
            // segment and rings: no need to wait for the hang-up.
            if self.closed_after().is_some() {
                return Err(disconnected("the daemon closed the session: it is shutting down".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Timeout { after: timeout });
            }
            let slice = (deadline - now).min(LIVENESS_SLICE);
            let woken = match &self.bell {
                Bell::Futex => {
                    let word: &AtomicU32 = match what {
                        Await::Reply => self.responses.data_waiter(),
                        Await::Space => self.requests.space_waiter(),
                    };
                    // The daemon clears the word before it wakes us.
                    if word.load(Ordering::Acquire) != 1 {
                        return Ok(());
                    }
                    match futex::wait(word, 1, Some(slice)) {
                        Ok(Wake::Woken) => true,
                        Ok(Wake::TimedOut) => false,
                        Err(e) => return Err(disconnected(format!("futex wait failed: {e}"))),
                    }
                }
                Bell::Pollable(bell) => {
                    match ipc_platform::wait_readable(&[bell.as_fd(), self.control.as_fd()], Some(slice)) {
                        Ok(ready) if ready[0] => match bell.drain() {
                            Ok(Drained::Rang) | Ok(Drained::Quiet) => true,
                            Ok(Drained::Closed) => return Err(disconnected("the daemon closed the session".into())),
                            Err(e) => return Err(disconnected(format!("doorbell read failed: {e}"))),
                        },
                        Ok(_) => false,
                        Err(e) => return Err(disconnected(format!("poll failed: {e}"))),
                    }
                }
            };
            if woken {
                return Ok(());
            }
            match ipc_platform::peer_closed(self.control.as_fd()) {
                Ok(false) => {}
                Ok(true) => return Err(disconnected("the daemon closed the session".into())),
                Err(e) => return Err(disconnected(format!("control connection failed: {e}"))),
            }
        }
    }
}
