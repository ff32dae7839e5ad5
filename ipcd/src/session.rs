//! One client's session: its shared rings, its doorbells, and the loop that
//! serves its requests.
//!
//! Everything read from the segment comes through `ipc_core`'s ring ends,
//! which validate every index and header; request payloads are copied into a
//! private buffer before a handler sees them. A protocol violation ends this
//! session only.
//!
//! A reply that does not fit the response ring waits in the session, and
//! the session stalls (serves no further request) until the client makes
//! room. The stall starts when the reply begins waiting, and starts over
//! whenever the client has freed some space since the session last looked
//! (a client reading a long run of replies ahead of a large one is slow,
//! not stalled); the worker holds its start against the stall timeout. The
//! waiting reply is kept on the heap in a buffer of at most the ring's
//! maximum payload, which is what the session is charged for it.

use std::time::Instant;

use ipc_core::{Consumer, FrameHeader, Producer, PushError, SharedWords};
use ipc_platform::{futex, EventFd, PeerCredentials, SocketBell};

use crate::limits::Lease;
use crate::service::{check_request, dispatch, ServiceTable, SHUTDOWN_REPLY_LEN};
use crate::stats::WorkerCounters;

/// How the daemon wakes this client.
pub(crate) enum ClientWake {
    /// Futex words in the segment.
    Futex,
    /// Our end of the client's doorbell socket.
    Pollable(SocketBell),
}

/// A reply that did not fit the response ring yet.
struct PendingReply {
    header: FrameHeader,
    /// At most the ring's maximum payload, in length and capacity.
    body: Vec<u8>,
    /// When it was found not to fit, or, if later, when the client was last
    /// seen to have freed space: the client has freed none since.
    since: Instant,
    /// The client's released total (its ring index) as of `since`.
    released: u64,
}

/// What [`Session::serve`] left behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The budget ran out with requests left: serve again soon.
    Busy,
    /// The request ring is empty and the client was told to ring the
    /// doorbell for the next request.
    Parked,
    /// The request ring is empty and the client was not told to ring: the
    /// worker watches the ring (spins) for a while, then calls
    /// [`Session::park`].
    Idle,
    /// The client hung up (stream transports; shared-memory hang-ups come
    /// from the control connection).
    Closed,
    /// The response ring is full and the client was told to ring the
    /// doorbell once it frees space.
    Stalled,
}

/// Buffers a worker reuses across requests and sessions.
#[derive(Default)]
pub(crate) struct Scratch {
    request: Vec<u8>,
    pub(crate) reply: Vec<u8>,
}

pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) peer: PeerCredentials,
    pub(crate) control: mio::net::UnixStream,
    /// Client to daemon doorbell; registered (edge-triggered) in the
    /// worker's poll and never read: see `ipc_platform::EventFd`.
    pub(crate) bell: EventFd,
    wake: ClientWake,
    requests: Consumer,
    responses: Producer,
    /// The segment's shared words, for its header's `closed` word.
    words: SharedWords,
    last_request_id: u64,
    pending: Option<PendingReply>,
    /// Whether the session sits in its worker's ready queue.
    pub(crate) queued: bool,
    /// Whether the session sits in its worker's idle list.
    pub(crate) idle: bool,
    /// What the session is charged (memory, its uid's slot), given back
    /// when it drops; last, so that the segment is unmapped first.
    pub(crate) lease: Option<Lease>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        peer: PeerCredentials,
        control: mio::net::UnixStream,
        bell: EventFd,
        wake: ClientWake,
        requests: Consumer,
        responses: Producer,
        words: SharedWords,
    ) -> Session {
        Session {
            id,
            peer,
            control,
            bell,
            wake,
            requests,
            responses,
            words,
            last_request_id: 0,
            pending: None,
            queued: false,
            idle: false,
            lease: None,
        }
    }

    fn wake_client(&self, word: &std::sync::atomic::AtomicU32) {
        let result = match &self.wake {
            ClientWake::Futex => futex::wake_one(word).map(drop),
            ClientWake::Pollable(bell) => bell.ring(),
        };
        if let Err(e) = result {
            tracing::warn!(session = self.id, "cannot wake client: {e}");
        }
    }

    /// Serves up to `budget` requests. With `shutting_down`, requests are
    /// answered with a shutdown error instead of being executed. With
    /// `park`, an empty request ring parks the session; without, it is left
    /// [`Progress::Idle`].
    pub(crate) fn serve(
        &mut self,
        services: &ServiceTable,
        counters: &WorkerCounters,
        scratch: &mut Scratch,
        budget: usize,
        shutting_down: bool,
        park: bool,
    ) -> Result<Progress, String> {
        let (mut served, mut errors) = (0u64, 0u64);
        let result = match self.flush_pending() {
            Ok(true) => self.serve_requests(services, scratch, budget, shutting_down, &mut served, &mut errors),
            Ok(false) => Ok(Progress::Stalled),
            Err(e) => Err(e),
        };
        // Counted once per batch rather than per request.
        counters.add_batch(served, errors);
        // Hand back what was read, then publish whatever was answered, even
        // when the batch ended in a violation (the error is reported after).
        // In that order: a client that sees a reply then sees its request's
        // space released as well (the release's index store precedes the
        // publish's Release store), so a client short of room can wait for
        // its next reply rather than for room, and never finds the ring
        // full with nothing in flight.
        if self.requests.release() {
            self.wake_client(self.requests.peer_waiter());
        }
        if self.responses.publish() {
            self.wake_client(self.responses.peer_waiter());
        }
        match result? {
            Progress::Busy => Ok(Progress::Busy),
            Progress::Stalled => {
                let len = self.pending.as_ref().map_or(0, |p| p.body.len());
                if self.responses.prepare_wait_space(len).map_err(|e| format!("response ring: {e}"))? {
                    Ok(Progress::Stalled)
                } else {
                    Ok(Progress::Busy)
                }
            }
            Progress::Parked if !park => Ok(Progress::Idle),
            Progress::Parked => self.park(),
            other => Ok(other),
        }
    }

    /// Whether a reply waits for room in the response ring.
    pub(crate) fn has_output(&self) -> bool {
        self.pending.is_some()
    }

    /// Pushes the reply that waits for room, if it fits now, publishes it,
    /// and otherwise asks the client to ring when it frees space; takes no
    /// request. For the drain of a graceful stop.
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        let flushed = self.flush_pending()?;
        if self.responses.publish() {
            self.wake_client(self.responses.peer_waiter());
        }
        if !flushed {
            let len = self.pending.as_ref().map_or(0, |p| p.body.len());
            self.responses.prepare_wait_space(len).map_err(|e| format!("response ring: {e}"))?;
        }
        Ok(())
    }

    /// Records in the segment that the daemon closes this session on
    /// purpose and executes nothing after the last request it took, then
    /// wakes the client so it reads that at once. Called once nothing more
    /// will be taken, just before the session is dropped.
    pub(crate) fn mark_closed(&self) {
        self.words.mark_closed(self.last_request_id);
        self.wake_client(self.responses.peer_waiter());
        self.wake_client(self.requests.peer_waiter());
    }

    /// Tells the client to ring for its next request: [`Progress::Parked`],
    /// or [`Progress::Busy`] if a request arrived meanwhile.
    pub(crate) fn park(&mut self) -> Result<Progress, String> {
        if self.requests.prepare_sleep().map_err(|e| format!("request ring: {e}"))? {
            Ok(Progress::Parked)
        } else {
            Ok(Progress::Busy)
        }
    }

    /// Since when a reply has been waiting for the client to make room in
    /// the response ring, if one is.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.since)
    }

    /// Whether a request is waiting (a corrupt ring counts: serving reports
    /// it).
    pub(crate) fn has_requests(&mut self) -> bool {
        self.requests.is_empty().map_or(true, |empty| !empty)
    }

    /// Pushes the reply left over from a stall. Returns whether nothing is
    /// pending any more.
    fn flush_pending(&mut self) -> Result<bool, String> {
        let Some(pending) = self.pending.take() else { return Ok(true) };
        let h = pending.header;
        match self.responses.try_push(h.service, h.flags, h.request_id, &pending.body) {
            Ok(()) => {
                // The client freed space: withdraw the wait announcement.
                self.responses.finish_wait_space();
                Ok(true)
            }
            Err(PushError::Full) => {
                let mut pending = pending;
                let released = self.responses.consumer_released().map_err(|e| format!("response ring: {e}"))?;
                if released != pending.released {
                    // Not enough room yet, but the client is reading: the
                    // stall starts over.
                    pending.released = released;
                    pending.since = Instant::now();
                }
                self.pending = Some(pending);
                Ok(false)
            }
            Err(e) => Err(format!("response ring: {e}")),
        }
    }

    fn serve_requests(
        &mut self,
        services: &ServiceTable,
        scratch: &mut Scratch,
        budget: usize,
        shutting_down: bool,
        served: &mut u64,
        errors: &mut u64,
    ) -> Result<Progress, String> {
        while (*served as usize) < budget {
            let frame = match self.requests.try_peek().map_err(|e| format!("request ring: {e}"))? {
                Some(frame) => frame,
                None => return Ok(Progress::Parked),
            };
            // While shutting down, a request is taken only if its answer
            // fits now: a taken request's answer must reach the client
            // before the closed word says it was taken, and one left in the
            // ring is known not to have run.
            if shutting_down
                && !self.responses.has_space_for(SHUTDOWN_REPLY_LEN).map_err(|e| format!("response ring: {e}"))?
            {
                return Ok(Progress::Stalled);
            }
            let header = frame.header;
            self.last_request_id = check_request(&header, self.last_request_id)?;
            self.requests.read_payload(&frame, &mut scratch.request);
            self.requests.consume(&frame);
            let max = self.responses.max_payload() as usize;
            let flags = dispatch(services, &header, &scratch.request, &mut scratch.reply, max, shutting_down, self.id);
            *errors += u64::from(flags != 0);
            *served += 1;
            match self.responses.try_push(header.service, flags, header.request_id, &scratch.reply) {
                Ok(()) => {}
                Err(PushError::Full) => {
                    let released = self.responses.consumer_released().map_err(|e| format!("response ring: {e}"))?;
                    let mut body = std::mem::take(&mut scratch.reply);
                    // The handler may have left the buffer larger than the
                    // reply; what waits is held to what the session is
                    // charged for.
                    body.shrink_to(max);
                    self.pending = Some(PendingReply {
                        header: FrameHeader { flags, ..header },
                        body,
                        since: Instant::now(),
                        released,
                    });
                    return Ok(Progress::Stalled);
                }
                Err(e) => return Err(format!("response ring: {e}")),
            }
        }
        Ok(Progress::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::WorkerCounters;
    use ipc_core::{HeapMemory, Region, Segment, SegmentLayout};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// A session over heap memory, with the client's ring ends beside it.
    fn new_session() -> (Session, Producer, Consumer) {
        let layout = SegmentLayout::new(4096).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        let (control, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let segment = Segment::new(region, &layout);
        let session = Session::new(
            1,
            PeerCredentials { pid: 1, uid: 0, gid: 0 },
            mio::net::UnixStream::from_std(control),
            EventFd::new().unwrap(),
            ClientWake::Pollable(SocketBell::pair().unwrap().0),
            segment.request_consumer,
            segment.response_producer,
            segment.words,
        );
        (session, segment.request_producer, segment.response_consumer)
    }

    #[test]
    fn full_response_ring_stalls_then_resumes_without_losing_a_reply() {
        let mut services = ServiceTable::default();
        // Replies ten times larger than requests fill the response ring first.
        services
            .add(
                "big".into(),
                Arc::new(|req: &[u8], out: &mut Vec<u8>| {
                    for _ in 0..25 {
                        out.extend_from_slice(req);
                    }
                    Ok(())
                }),
            )
            .unwrap();
        let (mut session, mut tx, mut rx) = new_session();
        let counters = WorkerCounters::default();
        let mut scratch = Scratch::default();
        const N: u64 = 100;
        for id in 1..=N {
            tx.try_push(0, 0, id, &id.to_le_bytes()).unwrap();
        }
        tx.publish();

        let mut next = 1;
        let mut reply = Vec::new();
        let mut stalls = 0;
        while next <= N {
            match session.serve(&services, &counters, &mut scratch, usize::MAX, false, true).unwrap() {
                Progress::Stalled => {
                    assert!(session.stalled_since().is_some(), "a stalled session says since when");
                    stalls += 1
                }
                Progress::Parked => assert_eq!(session.stalled_since(), None),
                Progress::Busy => continue,
                other => panic!("a parking serve returned {other:?}"),
            }
            // Drain what was answered, as a client would, and see whether the
            // daemon asked to be told about the freed space.
            while let Some(h) = rx.try_pop(&mut reply).unwrap() {
                assert_eq!(h.request_id, next);
                assert_eq!(reply, next.to_le_bytes().repeat(25));
                next += 1;
            }
            let daemon_waits = rx.release();
            if next <= N {
                assert!(daemon_waits, "a stalled daemon must have announced its wait");
            }
        }
        assert!(stalls > 0, "the test must exercise the stall path");
        assert_eq!(counters.requests.load(Ordering::Relaxed), N);
        assert_eq!(counters.replies.load(Ordering::Relaxed), N);
    }

    #[test]
    fn a_stall_starts_over_whenever_the_client_frees_space() {
        let mut services = ServiceTable::default();
        // Replies of the length the request names, from a buffer reserved
        // far larger than any reply.
        services
            .add(
                "sized".into(),
                Arc::new(|req: &[u8], out: &mut Vec<u8>| {
                    out.reserve(1 << 20);
                    out.resize(usize::from(u16::from_le_bytes([req[0], req[1]])), 0xAB);
                    Ok(())
                }),
            )
            .unwrap();
        let (mut session, mut tx, mut rx) = new_session();
        let counters = WorkerCounters::default();
        let mut scratch = Scratch::default();
        let max = session.responses.max_payload() as usize;
        // 30 replies of 120 bytes fill 3600 of the 4096 bytes; the next
        // reply, of 2016, waits until the client has read five of them.
        let sizes: Vec<u16> = std::iter::repeat_n(100, 30).chain([2000]).collect();
        for (id, len) in (1..).zip(&sizes) {
            tx.try_push(0, 0, id, &len.to_le_bytes()).unwrap();
        }
        tx.publish();
        let mut serve =
            |session: &mut Session| session.serve(&services, &counters, &mut scratch, usize::MAX, false, true).unwrap();
        assert_eq!(serve(&mut session), Progress::Stalled);
        let first = session.stalled_since().expect("stalled");
        let waiting = session.pending.as_ref().unwrap();
        assert_eq!(waiting.body.len(), 2000);
        assert!(waiting.body.capacity() <= max, "a waiting reply holds {} bytes", waiting.body.capacity());

        // Serving again while the client reads nothing keeps the start.
        assert_eq!(serve(&mut session), Progress::Stalled);
        assert_eq!(session.stalled_since(), Some(first));

        // The client reads one reply: not room enough, but progress.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut reply = Vec::new();
        assert_eq!(rx.try_pop(&mut reply).unwrap().unwrap().request_id, 1);
        rx.release();
        assert_eq!(serve(&mut session), Progress::Stalled);
        let second = session.stalled_since().expect("still stalled");
        assert!(second > first, "the stall did not start over when the client freed space");
        assert_eq!(serve(&mut session), Progress::Stalled);
        assert_eq!(session.stalled_since(), Some(second), "no progress since, so no new start");

        // Reading on makes room, and the waiting reply goes out.
        let mut next = 2;
        while next <= 30 {
            let h = rx.try_pop(&mut reply).unwrap().unwrap();
            assert_eq!(h.request_id, next);
            next += 1;
        }
        rx.release();
        assert_eq!(serve(&mut session), Progress::Parked);
        assert_eq!(session.stalled_since(), None);
        let h = rx.try_pop(&mut reply).unwrap().unwrap();
        assert_eq!((h.request_id, reply.len()), (31, 2000));
    }

    #[test]
    fn request_with_response_flags_or_repeated_id_is_a_violation() {
        let services = ServiceTable::default();
        let counters = WorkerCounters::default();
        let mut scratch = Scratch::default();

        let (mut session, mut tx, _rx) = new_session();
        tx.try_push(0, ipc_core::FLAG_ERROR, 1, b"x").unwrap();
        tx.publish();
        let err = session.serve(&services, &counters, &mut scratch, 64, false, true).unwrap_err();
        assert!(err.contains("response flags"), "{err}");

        let (mut session, mut tx, _rx) = new_session();
        tx.try_push(0, 0, 5, b"x").unwrap();
        tx.try_push(0, 0, 5, b"y").unwrap();
        tx.publish();
        let err = session.serve(&services, &counters, &mut scratch, 64, false, true).unwrap_err();
        assert!(err.contains("not above the previous 5"), "{err}");
    }

    #[test]
    fn shutdown_answers_without_running_the_handler() {
        let mut services = ServiceTable::default();
        services.add("never".into(), Arc::new(|_: &[u8], _: &mut Vec<u8>| panic!("must not run"))).unwrap();
        let counters = WorkerCounters::default();
        let mut scratch = Scratch::default();
        let (mut session, mut tx, mut rx) = new_session();
        tx.try_push(0, 0, 1, b"x").unwrap();
        tx.publish();
        session.serve(&services, &counters, &mut scratch, 64, true, true).unwrap();
        let mut body = Vec::new();
        let h = rx.try_pop(&mut body).unwrap().unwrap();
        assert!(h.is_error());
        assert_eq!(ipc_core::decode_error(&body).0, ipc_core::ErrorCode::Shutdown);
    }
}
