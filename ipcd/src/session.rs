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
//!
//! Calls handed off to deferred or blocking handlers are answered later,
//! in any order (the client matches replies by id). Their answers reach
//! the session through its worker ([`Session::complete`]) and go out at
//! its next serve, ahead of new requests; one that does not fit waits as a
//! reply from a handler does, and the rest queue behind it. A session with
//! [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS) calls handed
//! off takes no request until one is answered ([`Progress::Waiting`]):
//! its client is not slow, so that is no stall.

use std::time::Instant;

use ipc_core::{Consumer, Credentials, FrameHeader, Producer, PushError, SharedWords, HEADER_LEN};
use ipc_platform::{futex, EventFd, PeerCredentials, SocketBell};

use crate::deferred::{Completion, Slot};
use crate::exchange::{Exchange, Took};
use crate::limits::{Lease, Limits};
use crate::outbox::{Flush, Sink};
use crate::request::SessionContext;
use crate::service::{Serving, SHUTDOWN_REPLY_LEN};
use crate::stats::{Carrier, WorkerCounters};

/// How the daemon wakes this client.
pub(crate) enum ClientWake {
    /// Futex words in the segment.
    Futex,
    /// Our end of the client's doorbell socket.
    Pollable(SocketBell),
}

/// Since when the session has waited for its client to make room in the
/// response ring.
struct Stall {
    /// When a frame was found not to fit, or, if later, when the client was
    /// last seen to have freed space: the client has freed none since.
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
    /// The session has as many calls handed off as it may (or, on a
    /// stream whose client has stopped sending, any): it takes no request
    /// until one is answered, and the answer schedules it. Not a stall.
    Waiting,
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
    /// Its calls: what its handlers see of it, the requests it receives,
    /// the calls handed off, the streams open, what waits to go out.
    exchange: Exchange,
    /// Its place in its worker, for the answers of handed-off calls.
    pub(crate) slot: Slot,
    pub(crate) control: mio::net::UnixStream,
    /// Client to daemon doorbell; registered (edge-triggered) in the
    /// worker's poll and never read: see `ipc_platform::EventFd`.
    pub(crate) bell: EventFd,
    wake: ClientWake,
    requests: Consumer,
    responses: Producer,
    /// The segment's shared words, for its header's `closed` word.
    words: SharedWords,
    /// Set while a frame waits for room in the response ring.
    stall: Option<Stall>,
    /// The payload length of the frame that waits for room.
    waiting_len: usize,
    /// Whether the session sits in its worker's ready queue.
    pub(crate) queued: bool,
    /// Whether the session sits in its worker's idle list.
    pub(crate) idle: bool,
    /// A hold on the daemon's mapping of the segment, which the closing
    /// worker hands on to be unmapped elsewhere (see
    /// [`crate::segment_pool::Retirer`]).
    pub(crate) mapping: Option<ipc_core::Retained>,
    /// What the session is charged (memory, its uid's slot), given back
    /// when it drops; last, so that the segment is unmapped first.
    pub(crate) lease: Option<Lease>,
}

/// The response ring as the exchange writes to it, counting the bytes of
/// the frames it writes (header and payload; the ring's padding aside).
struct RingSink<'a> {
    ring: &'a mut Producer,
    sent: u64,
}

impl<'a> RingSink<'a> {
    fn new(ring: &'a mut Producer) -> RingSink<'a> {
        RingSink { ring, sent: 0 }
    }
}

impl Sink for RingSink<'_> {
    fn max_payload(&self) -> usize {
        self.ring.max_payload() as usize
    }

    fn put(&mut self, header: FrameHeader, parts: &[&[u8]]) -> Result<bool, String> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let fill = |w: &mut ipc_core::PayloadWriter<'_>| {
            let mut at = 0;
            for part in parts {
                w.write_at(at, part);
                at += part.len();
            }
        };
        match self.ring.try_push_with(header.service, header.flags, header.request_id, len, fill) {
            Ok(()) => {
                self.sent += (HEADER_LEN + len) as u64;
                Ok(true)
            }
            Err(PushError::Full) => Ok(false),
            Err(e) => Err(format!("response ring: {e}")),
        }
    }
}

impl Session {
    /// A session of the daemon's own, with the client whose credentials
    /// the kernel reported for `control`: it may call every service.
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
        let context = SessionContext::new(id, Some(peer.into()));
        Session::with_context(context, peer, control, bell, wake, requests, responses, words)
    }

    /// A session the daemon brokered to this process (a provider): `caller`
    /// is the client as the daemon reported it (`Incoming.caller`), and
    /// only the services `granted` names (`Incoming.granted`) may be
    /// called; a call to another is answered `NotPermitted`. `control` is
    /// this side's end of the liveness socket pair.
    #[allow(clippy::too_many_arguments)]
    // The provider builds its sessions with it, from the daemon's
    // `Incoming`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn brokered(
        id: u64,
        caller: Credentials,
        granted: &[u16],
        control: mio::net::UnixStream,
        bell: EventFd,
        wake: ClientWake,
        requests: Consumer,
        responses: Producer,
        words: SharedWords,
    ) -> Session {
        let context = SessionContext::brokered(id, caller.into(), granted);
        Session::with_context(context, caller, control, bell, wake, requests, responses, words)
    }

    /// Every session is made here.
    #[allow(clippy::too_many_arguments)]
    fn with_context(
        context: SessionContext,
        peer: PeerCredentials,
        control: mio::net::UnixStream,
        bell: EventFd,
        wake: ClientWake,
        requests: Consumer,
        responses: Producer,
        words: SharedWords,
    ) -> Session {
        Session {
            id: context.id,
            peer,
            exchange: Exchange::new(context),
            slot: Slot::UNPLACED,
            control,
            bell,
            wake,
            requests,
            responses,
            words,
            stall: None,
            waiting_len: 0,
            queued: false,
            idle: false,
            mapping: None,
            lease: None,
        }
    }

    /// What its handlers see of it (and its call counter).
    pub(crate) fn context(&self) -> &SessionContext {
        &self.exchange.context
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

    /// Sends what waits (the answers of handed-off calls, long replies,
    /// stream items), then serves up to `budget` frames. While `with` is
    /// shutting down, requests are answered with a shutdown error instead
    /// of being executed. With `park`, an empty request ring parks the
    /// session; without, it is left [`Progress::Idle`].
    pub(crate) fn serve(
        &mut self,
        with: &Serving<'_>,
        scratch: &mut Scratch,
        budget: usize,
        park: bool,
    ) -> Result<Progress, String> {
        let mut tally = Tally::default();
        let result = self.serve_requests(with, scratch, budget, &mut tally);
        // Counted once per batch rather than per request.
        with.counters.add(tally.taken, tally.answered, tally.errors);
        with.counters.add_bytes(Carrier::Shm, tally.received, tally.sent);
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
        let progress = result?;
        self.note_stall(progress == Progress::Stalled)?;
        match progress {
            Progress::Stalled => {
                if self.responses.prepare_wait_space(self.waiting_len).map_err(|e| format!("response ring: {e}"))? {
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

    /// Keeps the stall's start: set when a frame first waits for room, and
    /// set again whenever the client has freed some space since (it reads,
    /// slowly: not stalled).
    fn note_stall(&mut self, stalled: bool) -> Result<(), String> {
        if !stalled {
            if self.stall.take().is_some() {
                // The client made room: withdraw the wait announcement.
                self.responses.finish_wait_space();
            }
            return Ok(());
        }
        let released = self.responses.consumer_released().map_err(|e| format!("response ring: {e}"))?;
        match &mut self.stall {
            Some(stall) if stall.released == released => {}
            Some(stall) => *stall = Stall { since: Instant::now(), released },
            None => self.stall = Some(Stall { since: Instant::now(), released }),
        }
        Ok(())
    }

    /// Takes the answer to a call this session handed off, to go out at
    /// its next serve (or flush). Returns false, dropping it, if it answers
    /// no call outstanding here.
    pub(crate) fn complete(
        &mut self,
        answer: Completion,
        counters: &WorkerCounters,
        limits: &std::sync::Arc<Limits>,
    ) -> bool {
        let max = self.responses.max_payload() as usize;
        self.exchange.complete(answer, counters, limits, max)
    }

    /// Stream `id` has items or its end to send.
    pub(crate) fn stream_ready(&mut self, id: u64) {
        self.exchange.stream_ready(id);
    }

    /// Whether calls handed off have not been answered yet.
    pub(crate) fn has_calls(&self) -> bool {
        self.exchange.has_calls()
    }

    /// Answers the calls still being handled with an error (see
    /// [`Exchange::give_up_calls`]); the next flush sends what fits.
    pub(crate) fn give_up_calls(&mut self) {
        self.exchange.give_up_calls();
    }

    /// A graceful stop begins (see [`Exchange::stop`]).
    pub(crate) fn begin_stop(&mut self) {
        self.exchange.stop();
    }

    /// Whether anything waits to go out (or a stream is open).
    pub(crate) fn has_output(&self) -> bool {
        self.exchange.has_output()
    }

    /// The earliest deadline of an open stream.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.exchange.next_deadline()
    }

    /// Cuts the streams whose deadline has passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.exchange.expire(now);
    }

    /// Sends what waits, as far as it fits now, publishes it, and otherwise
    /// asks the client to ring when it frees space; takes no request. For
    /// the drain of a graceful stop.
    pub(crate) fn flush(&mut self) -> Result<(), String> {
        let flushed = self.exchange.flush(&mut RingSink::new(&mut self.responses), &mut Tally::default())?;
        if self.responses.publish() {
            self.wake_client(self.responses.peer_waiter());
        }
        if let Flush::NoRoom(len) = flushed {
            self.responses.prepare_wait_space(len).map_err(|e| format!("response ring: {e}"))?;
        }
        Ok(())
    }

    /// Records in the segment that the daemon closes this session on
    /// purpose and executes nothing after the last request it took, then
    /// wakes the client so it reads that at once. Called once nothing more
    /// will be taken, and every request taken has been answered (or given
    /// up on), just before the session is dropped.
    pub(crate) fn mark_closed(&self) {
        self.words.mark_closed(self.exchange.last_request_id());
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

    /// Since when a frame has been waiting for the client to make room in
    /// the response ring, if one is.
    pub(crate) fn stalled_since(&self) -> Option<Instant> {
        self.stall.as_ref().map(|s| s.since)
    }

    /// Whether a request is waiting (a corrupt ring counts: serving reports
    /// it).
    pub(crate) fn has_requests(&mut self) -> bool {
        self.requests.is_empty().map_or(true, |empty| !empty)
    }

    /// Sends what waits, then takes frames from the request ring until the
    /// budget, the ring or the room for answers runs out.
    fn serve_requests(
        &mut self,
        with: &Serving<'_>,
        scratch: &mut Scratch,
        budget: usize,
        tally: &mut Tally,
    ) -> Result<Progress, String> {
        let mut frames = 0;
        loop {
            let mut sink = RingSink::new(&mut self.responses);
            let flushed = self.exchange.flush(&mut sink, tally)?;
            tally.sent += sink.sent;
            if let Flush::NoRoom(len) = flushed {
                // What waits goes first; the session takes nothing more
                // until its client makes room.
                self.waiting_len = len;
                return Ok(Progress::Stalled);
            }
            if frames >= budget {
                return Ok(Progress::Busy);
            }
            // At the cap, nothing more is taken until a call is answered
            // (whose answer schedules the session). A stop takes requests
            // only to answer them, so the cap does not apply.
            if !with.shutting_down && self.exchange.outstanding_full() {
                return Ok(Progress::Waiting);
            }
            let frame = match self.requests.try_peek().map_err(|e| format!("request ring: {e}"))? {
                Some(frame) => frame,
                None => return Ok(Progress::Parked),
            };
            let header = frame.header;
            let kind = self.exchange.check(&header)?;
            // While shutting down, a request is taken only if its answer
            // fits now: a taken request's answer must reach the client
            // before the closed word says it was taken, and one left in the
            // ring is known not to have run.
            if with.shutting_down
                && kind.is_new()
                && !self.responses.has_space_for(SHUTDOWN_REPLY_LEN).map_err(|e| format!("response ring: {e}"))?
            {
                self.waiting_len = SHUTDOWN_REPLY_LEN;
                return Ok(Progress::Stalled);
            }
            self.requests.read_payload(&frame, &mut scratch.request);
            let mut sink = RingSink::new(&mut self.responses);
            let took = self.exchange.take(
                with,
                self.slot,
                kind,
                &header,
                &scratch.request,
                &mut scratch.reply,
                &mut sink,
                tally,
            )?;
            tally.sent += sink.sent;
            match took {
                Took::Taken => {
                    tally.received += (HEADER_LEN + header.len as usize) as u64;
                    self.requests.consume(&frame);
                    frames += 1;
                }
                Took::NoRoom(len) => {
                    // Left in the ring: it is taken once there is room for
                    // what it sends.
                    self.waiting_len = len;
                    return Ok(Progress::Stalled);
                }
            }
        }
    }
}

/// What one serve did, counted once for the batch.
#[derive(Default)]
pub(crate) struct Tally {
    /// Requests taken.
    pub(crate) taken: u64,
    /// Requests answered here (not handed off).
    pub(crate) answered: u64,
    /// Of those, answered with an error.
    pub(crate) errors: u64,
    /// Bytes of the frames taken (headers and payloads).
    pub(crate) received: u64,
    /// Bytes of the frames written.
    pub(crate) sent: u64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::deferred::{Responder, MAX_OUTSTANDING_CALLS};
    use crate::request::{OwnedRequest, Request};
    use crate::service::{Handler, ServiceError, ServiceTable};
    use ipc_core::{decode_error, ErrorCode, HeapMemory, Region, Segment, SegmentLayout};
    use std::sync::atomic::Ordering;
    use std::sync::mpsc::{channel, Receiver};
    use std::sync::{Arc, Mutex};

    /// An inline handler.
    fn inline(f: impl Fn(&Request<'_>, &mut Vec<u8>) -> Result<(), ServiceError> + Send + Sync + 'static) -> Handler {
        Handler::Inline(Arc::new(f))
    }

    /// A deferred handler that hands each call to the test, in order.
    pub(crate) fn deferred() -> (Handler, Receiver<(OwnedRequest, Responder)>) {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let handler = move |request, responder| tx.lock().unwrap().send((request, responder)).unwrap();
        (Handler::Deferred(Arc::new(handler)), rx)
    }

    pub(crate) use crate::test_rig::Rig;

    /// How the tests drive a shared-memory session with a [`Rig`].
    pub(crate) trait ShmRig {
        fn serve_with(&mut self, session: &mut Session, budget: usize, shutting_down: bool)
            -> Result<Progress, String>;
        fn serve(&mut self, session: &mut Session) -> Progress;
        fn deliver(&mut self, session: &mut Session) -> usize;
    }

    impl ShmRig for Rig {
        fn serve_with(
            &mut self,
            session: &mut Session,
            budget: usize,
            shutting_down: bool,
        ) -> Result<Progress, String> {
            let (with, scratch) = self.lend(shutting_down);
            session.serve(&with, scratch, budget, true)
        }

        fn serve(&mut self, session: &mut Session) -> Progress {
            self.serve_with(session, usize::MAX, false).unwrap()
        }

        /// Hands the answers that came back to `session`, as its worker
        /// does; returns how many it took.
        fn deliver(&mut self, session: &mut Session) -> usize {
            let slot = session.slot;
            let limits = self.limits();
            let mut taken = 0;
            for event in self.answers.try_iter() {
                match event {
                    crate::deferred::Event::Answer(a) if a.slot == slot => {
                        taken += usize::from(session.complete(a, &self.counters, &limits));
                    }
                    crate::deferred::Event::Stream { slot: s, id } if s == slot => session.stream_ready(id),
                    _ => {}
                }
            }
            taken
        }
    }

    /// A session over heap memory, with the client's ring ends beside it.
    pub(crate) fn new_session() -> (Session, Producer, Consumer) {
        session_with(|control, bell, wake, requests, responses, words| {
            let peer = PeerCredentials { pid: 1, uid: 0, gid: 0 };
            Session::new(1, peer, control, bell, wake, requests, responses, words)
        })
    }

    type Parts = (mio::net::UnixStream, EventFd, ClientWake, Consumer, Producer, SharedWords);

    fn session_with(
        make: impl FnOnce(mio::net::UnixStream, EventFd, ClientWake, Consumer, Producer, SharedWords) -> Session,
    ) -> (Session, Producer, Consumer) {
        let layout = SegmentLayout::new(4096).unwrap();
        let region = Region::new(HeapMemory::new(layout.segment_size()));
        let (control, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let segment = Segment::new(region, &layout);
        let parts: Parts = (
            mio::net::UnixStream::from_std(control),
            EventFd::new().unwrap(),
            ClientWake::Pollable(SocketBell::pair().unwrap().0),
            segment.request_consumer,
            segment.response_producer,
            segment.words,
        );
        let mut session = make(parts.0, parts.1, parts.2, parts.3, parts.4, parts.5);
        session.slot = Slot { key: 0, serial: 1 };
        (session, segment.request_producer, segment.response_consumer)
    }

    /// Every reply in the response ring: id, flags and body.
    fn replies(rx: &mut Consumer) -> Vec<(u64, u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut body = Vec::new();
        while let Some(h) = rx.try_pop(&mut body).unwrap() {
            out.push((h.request_id, h.flags, body.clone()));
        }
        rx.release();
        out
    }

    #[test]
    fn full_response_ring_stalls_then_resumes_without_losing_a_reply() {
        let mut services = ServiceTable::default();
        // Replies ten times larger than requests fill the response ring first.
        services
            .add(
                "big".into(),
                inline(|req, out| {
                    for _ in 0..25 {
                        out.extend_from_slice(req.payload());
                    }
                    Ok(())
                }),
            )
            .unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        const N: u64 = 100;
        for id in 1..=N {
            tx.try_push(0, 0, id, &id.to_le_bytes()).unwrap();
        }
        tx.publish();

        let mut next = 1;
        let mut reply = Vec::new();
        let mut stalls = 0;
        while next <= N {
            match rig.serve(&mut session) {
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
        assert_eq!(rig.counters.requests.load(Ordering::Relaxed), N);
        assert_eq!(rig.counters.replies.load(Ordering::Relaxed), N);
    }

    #[test]
    fn a_stall_starts_over_whenever_the_client_frees_space() {
        let mut services = ServiceTable::default();
        // Replies of the length the request names, from a buffer reserved
        // far larger than any reply.
        services
            .add(
                "sized".into(),
                inline(|req, out| {
                    let req = req.payload();
                    out.reserve(1 << 20);
                    out.resize(usize::from(u16::from_le_bytes([req[0], req[1]])), 0xAB);
                    Ok(())
                }),
            )
            .unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        let max = session.responses.max_payload() as usize;
        // 30 replies of 120 bytes fill 3600 of the 4096 bytes; the next
        // reply, of 2016, waits until the client has read five of them.
        let sizes: Vec<u16> = std::iter::repeat_n(100, 30).chain([2000]).collect();
        for (id, len) in (1..).zip(&sizes) {
            tx.try_push(0, 0, id, &len.to_le_bytes()).unwrap();
        }
        tx.publish();
        assert_eq!(rig.serve(&mut session), Progress::Stalled);
        let first = session.stalled_since().expect("stalled");
        let waiting = session.exchange.waiting();
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].0, 2000);
        assert!(waiting[0].1 <= max, "a waiting reply holds {} bytes", waiting[0].1);

        // Serving again while the client reads nothing keeps the start.
        assert_eq!(rig.serve(&mut session), Progress::Stalled);
        assert_eq!(session.stalled_since(), Some(first));

        // The client reads one reply: not room enough, but progress.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut reply = Vec::new();
        assert_eq!(rx.try_pop(&mut reply).unwrap().unwrap().request_id, 1);
        rx.release();
        assert_eq!(rig.serve(&mut session), Progress::Stalled);
        let second = session.stalled_since().expect("still stalled");
        assert!(second > first, "the stall did not start over when the client freed space");
        assert_eq!(rig.serve(&mut session), Progress::Stalled);
        assert_eq!(session.stalled_since(), Some(second), "no progress since, so no new start");

        // Reading on makes room, and the waiting reply goes out.
        let mut next = 2;
        while next <= 30 {
            let h = rx.try_pop(&mut reply).unwrap().unwrap();
            assert_eq!(h.request_id, next);
            next += 1;
        }
        rx.release();
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        assert_eq!(session.stalled_since(), None);
        let h = rx.try_pop(&mut reply).unwrap().unwrap();
        assert_eq!((h.request_id, reply.len()), (31, 2000));
    }

    #[test]
    fn request_with_response_flags_or_repeated_id_is_a_violation() {
        let mut rig = Rig::new(ServiceTable::default());

        let (mut session, mut tx, _rx) = new_session();
        tx.try_push(0, ipc_core::FLAG_ERROR, 1, b"x").unwrap();
        tx.publish();
        let err = rig.serve_with(&mut session, 64, false).unwrap_err();
        assert!(err.contains("response flags"), "{err}");

        let (mut session, mut tx, _rx) = new_session();
        tx.try_push(0, 0, 5, b"x").unwrap();
        tx.try_push(0, 0, 5, b"y").unwrap();
        tx.publish();
        let err = rig.serve_with(&mut session, 64, false).unwrap_err();
        assert!(err.contains("not above the previous 5"), "{err}");
    }

    #[test]
    fn shutdown_answers_without_running_the_handler() {
        let mut services = ServiceTable::default();
        services.add("never".into(), inline(|_, _| panic!("must not run"))).unwrap();
        let (handler, handed) = deferred();
        services.add("never-deferred".into(), handler).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        tx.try_push(0, 0, 1, b"x").unwrap();
        tx.try_push(1, 0, 2, b"x").unwrap();
        tx.publish();
        rig.serve_with(&mut session, 64, true).unwrap();
        let got = replies(&mut rx);
        assert_eq!(got.len(), 2);
        for (_, flags, body) in got {
            assert_eq!(flags, ipc_core::FLAG_ERROR);
            assert_eq!(decode_error(&body).0, ErrorCode::Shutdown);
        }
        assert!(handed.try_recv().is_err(), "a deferred handler ran while shutting down");
    }

    #[test]
    fn handlers_see_the_caller_the_session_and_the_service() {
        let mut services = ServiceTable::default();
        services.add("first".into(), inline(|_, _| Ok(()))).unwrap();
        services
            .add(
                "whoami".into(),
                inline(|req, out| {
                    let caller = req.caller().expect("a Unix session has a caller");
                    let said = format!(
                        "{} {} {} {} {} {}",
                        caller.pid,
                        caller.uid,
                        caller.gid,
                        req.session(),
                        req.service(),
                        req.id()
                    );
                    out.extend_from_slice(said.as_bytes());
                    Ok(())
                }),
            )
            .unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = session_with(|control, bell, wake, requests, responses, words| {
            let peer = PeerCredentials { pid: 4242, uid: 1000, gid: 100 };
            Session::new(77, peer, control, bell, wake, requests, responses, words)
        });
        tx.try_push(1, 0, 9, b"").unwrap();
        tx.publish();
        rig.serve(&mut session);
        assert_eq!(replies(&mut rx), [(9, 0, b"4242 1000 100 77 whoami 9".to_vec())]);
    }

    #[test]
    fn a_brokered_session_calls_only_the_services_it_was_granted() {
        let mut services = ServiceTable::default();
        services.add("echo".into(), crate::service::echo()).unwrap();
        services.add("granted".into(), crate::service::echo()).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = session_with(|control, bell, wake, requests, responses, words| {
            let caller = Credentials { pid: 5, uid: 1001, gid: 1001 };
            Session::brokered(8, caller, &[1], control, bell, wake, requests, responses, words)
        });
        // Not granted, granted, not granted (and not even a service), then
        // granted again: each refusal is that call's alone.
        for (id, service) in [(1, 0), (2, 1), (3, 9), (4, 1)] {
            tx.try_push(service, 0, id, b"hi").unwrap();
        }
        tx.publish();
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        let got = replies(&mut rx);
        let outcomes: Vec<(u64, Result<Vec<u8>, ErrorCode>)> = got
            .into_iter()
            .map(|(id, flags, body)| (id, if flags == 0 { Ok(body) } else { Err(decode_error(&body).0) }))
            .collect();
        assert_eq!(
            outcomes,
            [
                (1, Err(ErrorCode::NotPermitted)),
                (2, Ok(b"hi".to_vec())),
                (3, Err(ErrorCode::NotPermitted)),
                (4, Ok(b"hi".to_vec())),
            ]
        );
    }

    #[test]
    fn deferred_calls_are_answered_in_the_order_their_answers_come() {
        let mut services = ServiceTable::default();
        let (handler, handed) = deferred();
        services.add("later".into(), handler).unwrap();
        services.add("echo".into(), crate::service::echo()).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        for id in 1..=3 {
            tx.try_push(0, 0, id, &[id as u8]).unwrap();
        }
        // An inline call behind them is answered at once.
        tx.try_push(1, 0, 4, b"now").unwrap();
        tx.publish();
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        assert_eq!(replies(&mut rx), [(4, 0, b"now".to_vec())]);
        let mut calls: Vec<(OwnedRequest, Responder)> = handed.try_iter().collect();
        assert_eq!(calls.iter().map(|(r, _)| r.id()).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(session.has_calls());

        // The third is answered first, from another thread; then the first.
        let (third, responder) = calls.pop().unwrap();
        std::thread::spawn(move || responder.reply(third.into_payload())).join().unwrap();
        let (_, responder) = calls.remove(0);
        responder.fail(ServiceError::with_code(7, "first fails"));
        assert_eq!(rig.deliver(&mut session), 2);
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        let got = replies(&mut rx);
        assert_eq!(got[0], (3, 0, vec![3]));
        assert_eq!((got[1].0, got[1].1), (1, ipc_core::FLAG_ERROR));
        assert_eq!(decode_error(&got[1].2), (ErrorCode::Application(7), "first fails".to_string()));
        // The second's responder, dropped, answers it too.
        drop(calls);
        assert_eq!(rig.deliver(&mut session), 1);
        rig.serve(&mut session);
        let got = replies(&mut rx);
        assert_eq!((got[0].0, decode_error(&got[0].2).0), (2, ErrorCode::NoReply));
        assert!(!session.has_calls() && !session.has_output());
        assert_eq!(rig.counters.requests.load(Ordering::Relaxed), 4);
        // Answers are counted as the worker takes them, not here.
        assert_eq!(rig.counters.replies.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn at_the_cap_a_session_takes_no_request_and_is_not_stalled() {
        let mut services = ServiceTable::default();
        let (handler, handed) = deferred();
        services.add("later".into(), handler).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        let over = MAX_OUTSTANDING_CALLS as u64 + 2;
        for id in 1..=over {
            tx.try_push(0, 0, id, b"").unwrap();
        }
        tx.publish();
        assert_eq!(rig.serve(&mut session), Progress::Waiting);
        let mut calls: Vec<(OwnedRequest, Responder)> = handed.try_iter().collect();
        assert_eq!(calls.len(), MAX_OUTSTANDING_CALLS);
        assert!(session.has_requests(), "the requests past the cap stay in the ring");
        assert_eq!(session.stalled_since(), None, "waiting for handlers is no stall of the client");
        // Serving again takes nothing more.
        assert_eq!(rig.serve(&mut session), Progress::Waiting);
        assert!(handed.try_recv().is_err());

        // One answer makes room for one more call.
        let (first, responder) = calls.remove(0);
        assert_eq!(first.id(), 1);
        responder.reply(Vec::new());
        assert_eq!(rig.deliver(&mut session), 1);
        assert_eq!(rig.serve(&mut session), Progress::Waiting);
        assert_eq!(replies(&mut rx).iter().map(|r| r.0).collect::<Vec<_>>(), [1]);
        let next: Vec<u64> = handed
            .try_iter()
            .map(|(r, responder)| {
                calls.push((r.clone(), responder));
                r.id()
            })
            .collect();
        assert_eq!(next, [MAX_OUTSTANDING_CALLS as u64 + 1]);

        // Answering all lets the last in, and the ring runs empty.
        for (_, responder) in calls.drain(..) {
            responder.reply(Vec::new());
        }
        rig.deliver(&mut session);
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        let (_, last) = handed.try_recv().expect("the last call");
        last.reply(Vec::new());
        rig.deliver(&mut session);
        rig.serve(&mut session);
        let mut ids: Vec<u64> = replies(&mut rx).iter().map(|r| r.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (2..=over).collect::<Vec<_>>());
    }

    #[test]
    fn answers_that_find_the_ring_full_wait_in_order_and_stall_the_session() {
        let mut services = ServiceTable::default();
        let (handler, handed) = deferred();
        services.add("later".into(), handler).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        for id in 1..=4 {
            tx.try_push(0, 0, id, b"").unwrap();
        }
        tx.publish();
        rig.serve(&mut session);
        // Answers of 1,200 bytes: three fit the 4 KiB ring, the fourth waits.
        for (request, responder) in handed.try_iter() {
            responder.reply(vec![request.id() as u8; 1200]);
        }
        assert_eq!(rig.deliver(&mut session), 4);
        assert_eq!(rig.serve(&mut session), Progress::Stalled);
        assert!(session.stalled_since().is_some());
        assert!(session.has_output());
        let first = replies(&mut rx);
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        assert_eq!(replies(&mut rx), [(4, 0, vec![4; 1200])]);
        assert_eq!(session.stalled_since(), None);
    }

    #[test]
    fn a_stop_answers_calls_still_running_before_the_closed_word() {
        let mut services = ServiceTable::default();
        let (handler, handed) = deferred();
        services.add("later".into(), handler).unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        tx.try_push(0, 0, 1, b"").unwrap();
        tx.try_push(0, 0, 2, b"").unwrap();
        tx.publish();
        rig.serve(&mut session);
        let mut calls: Vec<(OwnedRequest, Responder)> = handed.try_iter().collect();
        // The stop: a request that comes now is answered `Shutdown`.
        tx.try_push(0, 0, 3, b"").unwrap();
        tx.publish();
        rig.serve_with(&mut session, usize::MAX, true).unwrap();
        // The first call is answered during the drain.
        calls.remove(0).1.reply(b"in time".to_vec());
        rig.deliver(&mut session);
        session.flush().unwrap();
        assert!(session.has_calls(), "the second is still running");
        // The drain gives up on the second.
        session.give_up_calls();
        session.flush().unwrap();
        session.mark_closed();
        let got = replies(&mut rx);
        let outcomes: Vec<(u64, Result<Vec<u8>, ErrorCode>)> = got
            .into_iter()
            .map(|(id, flags, body)| (id, if flags == 0 { Ok(body) } else { Err(decode_error(&body).0) }))
            .collect();
        assert_eq!(
            outcomes,
            [(3, Err(ErrorCode::Shutdown)), (1, Ok(b"in time".to_vec())), (2, Err(ErrorCode::Unfinished))]
        );
        assert_eq!(session.words.closed_after(), Some(3));
        // Its own answer, late, finds the call gone.
        calls.remove(0).1.reply(b"too late".to_vec());
        assert_eq!(rig.deliver(&mut session), 0);
    }

    #[test]
    fn blocking_handlers_run_on_the_handler_threads() {
        let mut services = ServiceTable::new(2);
        let (release_tx, release) = channel::<()>();
        let release = Mutex::new(release);
        services
            .add(
                "slow".into(),
                Handler::Blocking(Arc::new(move |req: &Request<'_>| {
                    release.lock().unwrap().recv().unwrap();
                    Ok(req.payload().to_vec())
                })),
            )
            .unwrap();
        services
            .add("fails".into(), Handler::Blocking(Arc::new(|_: &Request<'_>| Err(ServiceError::with_code(5, "no")))))
            .unwrap();
        services
            .add(
                "panics".into(),
                Handler::Blocking(Arc::new(|_: &Request<'_>| -> Result<Vec<u8>, ServiceError> { panic!("bug") })),
            )
            .unwrap();
        services.start_pool().unwrap();
        let mut rig = Rig::new(services);
        let (mut session, mut tx, mut rx) = new_session();
        tx.try_push(0, 0, 1, b"slow").unwrap();
        tx.try_push(1, 0, 2, b"").unwrap();
        tx.try_push(2, 0, 3, b"").unwrap();
        tx.publish();
        // The serve returns with the slow call still blocked on a thread.
        assert_eq!(rig.serve(&mut session), Progress::Parked);
        let mut answers = vec![rig.answer(), rig.answer()];
        release_tx.send(()).unwrap();
        answers.push(rig.answer());
        for answer in answers {
            assert!(session.complete(answer, &rig.counters, &rig.limits()));
        }
        rig.serve(&mut session);
        let got = replies(&mut rx);
        assert_eq!(got.last().unwrap(), &(1, 0, b"slow".to_vec()), "the slow call is answered last");
        let mut errors: Vec<(u64, ErrorCode)> =
            got[..2].iter().map(|(id, _, body)| (*id, decode_error(body).0)).collect();
        errors.sort_unstable_by_key(|e| e.0);
        assert_eq!(errors, [(2, ErrorCode::Application(5)), (3, ErrorCode::HandlerPanicked)]);
        rig.services.stop_pool();
    }
}
