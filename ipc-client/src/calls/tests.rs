//! The state machine alone: a few cases spelled out, then a property test
//! that drives it as the client does, over several links whose peers
//! answer in any order, stream items within (and beyond) their credit,
//! break the protocol and go away, and checks that every request sent
//! gets exactly one outcome, and every stream its items in order and one
//! terminal outcome.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn header(id: u64, service: u16) -> FrameHeader {
    FrameHeader { len: 0, service, flags: 0, request_id: id }
}

fn lost(reason: &str) -> CallError {
    CallError::Disconnected { reason: reason.into() }
}

#[test]
fn ids_increase_per_link_and_go_on_after_a_loss() {
    let mut calls = Calls::new(1);
    let (a, b) = (calls.add_link(), calls.add_link());
    let ids = |calls: &mut Calls, link| [0; 3].map(|_| calls.sent(link, 0).id());
    assert_eq!(ids(&mut calls, a), [1, 2, 3]);
    assert_eq!(ids(&mut calls, b), [1, 2, 3]);
    calls.lose(a, "gone".into(), None);
    calls.revive(a);
    assert_eq!(ids(&mut calls, a), [4, 5, 6], "a new link in the place goes on from the old one's ids");
}

#[test]
fn a_reply_is_delivered_to_its_waiter_and_kept_for_others() {
    let mut calls = Calls::new(1);
    let (a, b) = (calls.add_link(), calls.add_link());
    let (t1, t2, u1) = (calls.sent(a, 0), calls.sent(a, 0), calls.sent(b, 0));
    assert_eq!(calls.begin_wait(t2), Ok(None));
    // Waiting for t2, t1's reply comes first: kept.
    assert_eq!(calls.arrived(a, &header(1, 0), Awaiting::Ticket(t2)), Ok(Arrival::Keep(t1)));
    calls.keep(t1, header(1, 0), b"one".to_vec());
    assert_eq!(calls.arrived(a, &header(2, 0), Awaiting::Ticket(t2)), Ok(Arrival::Deliver(t2)));
    // The same id on another link is another request.
    assert_eq!(calls.arrived(b, &header(1, 0), Awaiting::Any), Ok(Arrival::Deliver(u1)));
    assert_eq!(calls.outstanding(), 1);
    assert_eq!(calls.begin_wait(t1), Ok(Some(Settled::Reply { header: header(1, 0), body: b"one".to_vec() })));
    assert_eq!(calls.begin_wait(t1), Err(CallError::UnknownTicket { id: 1 }));
    assert_eq!(calls.begin_recv(), Err(CallError::NothingInFlight));
}

#[test]
fn violations_are_named() {
    let mut calls = Calls::new(1);
    let a = calls.add_link();
    let _ = calls.sent(a, 3);
    assert_eq!(calls.arrived(a, &header(7, 3), Awaiting::Any), Err(Violation::NotInFlight { id: 7 }));
    let wrong = calls.arrived(a, &header(1, 4), Awaiting::Any).unwrap_err();
    assert_eq!(wrong, Violation::WrongService { id: 1, sent: 3, answered: 4 });
    assert_eq!(wrong.describe("the provider"), "the provider answered request 1 of service 3 as service 4");
    // A violation claims nothing: the request is still in flight.
    assert_eq!(calls.outstanding(), 1);
}

#[test]
fn a_timeout_abandons_and_the_late_reply_is_dropped() {
    let mut calls = Calls::new(1);
    let a = calls.add_link();
    let t = calls.sent(a, 0);
    let timeout = CallError::Timeout { after: Duration::from_millis(5) };
    assert_eq!(calls.wait_failed(t, timeout.clone()), Err(timeout));
    assert_eq!(calls.outstanding(), 0);
    assert!(calls.replies_due(a) && !calls.waiting(a), "its reply is still due, but nobody waits for it");
    assert_eq!(calls.begin_wait(t), Err(CallError::UnknownTicket { id: 1 }));
    assert_eq!(calls.begin_recv(), Err(CallError::NothingInFlight));
    assert_eq!(calls.arrived(a, &header(1, 0), Awaiting::Any), Ok(Arrival::Drop));
    assert!(!calls.replies_due(a));
}

#[test]
fn a_loss_decides_shutdown_or_disconnected_and_refuses_what_follows() {
    let mut calls = Calls::new(1);
    let (a, b) = (calls.add_link(), calls.add_link());
    let tickets = [0; 4].map(|_| calls.sent(a, 0));
    let other = calls.sent(b, 0);
    // Request 1 answered (claimed) before the loss; the peer took 2 and
    // said so; 3 and 4 it never took.
    assert_eq!(calls.arrived(a, &header(1, 0), Awaiting::Any), Ok(Arrival::Deliver(tickets[0])));
    calls.lose(a, "closed".into(), Some(2));
    assert_eq!(calls.refusal(a), Some(CallError::Shutdown));
    assert_eq!(calls.refusal(b), None);
    let got: Vec<_> = std::iter::from_fn(|| calls.next_settled()).collect();
    assert_eq!(
        got,
        [
            (tickets[1], Settled::Failed(lost("closed"))),
            (tickets[2], Settled::Failed(CallError::Shutdown)),
            (tickets[3], Settled::Failed(CallError::Shutdown)),
        ]
    );
    assert_eq!(calls.begin_wait(other), Ok(None), "the other link goes on");

    calls.lose(b, "died".into(), None);
    assert_eq!(calls.refusal(b), Some(CallError::NotConnected { reason: "died".into() }));
    assert_eq!(calls.wait_failed(other, lost("seen by the wait")), Ok(Settled::Failed(lost("died"))));
}

#[test]
fn tickets_of_another_client_are_refused() {
    let (mut mine, mut theirs) = (Calls::new(1), Calls::new(2));
    let (a, x) = (mine.add_link(), theirs.add_link());
    let _ = mine.sent(a, 0);
    let foreign = theirs.sent(x, 0);
    assert_eq!(mine.begin_wait(foreign), Err(CallError::ForeignTicket { id: 1 }));
    // Even one naming a link this client does not have.
    theirs.add_link();
    let far = theirs.sent(1, 0);
    assert_eq!(mine.begin_wait(far), Err(CallError::ForeignTicket { id: 1 }));
}

fn item(seq: u64) -> Vec<u8> {
    seq.to_le_bytes().to_vec()
}

#[test]
fn a_stream_hands_out_its_items_in_order_then_its_end_once() {
    let mut calls = Calls::new(1);
    let a = calls.add_link();
    let key = calls.open_stream(a, 5, 2);
    let call = calls.sent(a, 5);
    assert_eq!((key.id, call.id()), (1, 2), "streams and calls share the link's ids");
    assert!(calls.replies_due(a));
    assert_eq!(calls.take_next(key), None);
    assert_eq!(calls.item_begins(a, 1), Ok(true));
    calls.item(key, item(0));
    assert_eq!(calls.item_begins(a, 1), Ok(true));
    calls.item(key, item(1));
    // The window is spent: a third item before more credit breaks the
    // protocol.
    assert_eq!(calls.item_begins(a, 1), Err(Violation::NoCredit { id: 1, granted: 2 }));
    assert_eq!(calls.credit_due(key), None);
    assert_eq!(calls.take_next(key), Some(StreamNext::Item(item(0))));
    // Half the window (one item) taken: one more may come.
    assert_eq!(calls.credit_due(key), Some(1));
    calls.credited(key, 1);
    assert_eq!(calls.outstanding_credit(key), Some(2));
    assert_eq!(calls.item_begins(a, 1), Ok(true));
    calls.item(key, item(2));
    calls.stream_ended(a, 1, Ok(())).unwrap();
    assert_eq!(calls.stream_ended(a, 1, Ok(())), Err(Violation::NotInFlight { id: 1 }), "a second end");
    assert_eq!(calls.item_begins(a, 1), Err(Violation::NotInFlight { id: 1 }), "an item after the end");
    assert_eq!(calls.take_next(key), Some(StreamNext::Item(item(1))));
    assert_eq!(calls.credit_due(key), None, "no credit once ended");
    assert_eq!(calls.take_next(key), Some(StreamNext::Item(item(2))));
    assert_eq!(calls.take_next(key), Some(StreamNext::End(Ok(()))));
    assert_eq!(calls.take_next(key), None);
    assert_eq!(calls.streams(), 0, "ended and handed out: retired");
    assert_eq!(calls.outstanding(), 1, "the call is still in flight");
}

#[test]
fn a_cancel_drops_what_is_queued_and_what_comes_and_waits_for_the_end() {
    let mut calls = Calls::new(1);
    let a = calls.add_link();
    let key = calls.open_stream(a, 0, 4);
    for seq in 0..2 {
        assert_eq!(calls.item_begins(a, 1), Ok(true));
        calls.item(key, item(seq));
    }
    assert!(calls.cancel(key), "a cancel is sent");
    assert!(!calls.cancel(key), "once");
    assert_eq!(calls.item_begins(a, 1), Ok(false), "an item after the cancel is dropped");
    assert_eq!(calls.take_next(key), Some(StreamNext::End(Err(CallError::Cancelled))));
    assert_eq!(calls.streams(), 1, "still open on the wire");
    assert!(calls.replies_due(a));
    calls.stream_ended(a, 1, Err(CallError::Cancelled)).unwrap();
    assert_eq!(calls.streams(), 0);
    assert!(!calls.replies_due(a));

    // A dropped handle: the same, with nothing handed out.
    let key = calls.open_stream(a, 0, 4);
    assert!(calls.forget(key));
    assert_eq!(calls.take_next(key), None);
    calls.stream_ended(a, key.id, Ok(())).unwrap();
    assert_eq!(calls.streams(), 0);
}

#[test]
fn a_loss_ends_open_streams_after_their_items() {
    let mut calls = Calls::new(1);
    let a = calls.add_link();
    let taken = calls.open_stream(a, 0, 4);
    let never = calls.open_stream(a, 0, 4);
    assert_eq!(calls.item_begins(a, taken.id), Ok(true));
    calls.item(taken, item(0));
    calls.lose(a, "closed".into(), Some(taken.id));
    assert_eq!(calls.take_next(taken), Some(StreamNext::Item(item(0))));
    assert_eq!(calls.take_next(taken), Some(StreamNext::End(Err(lost("closed")))));
    assert_eq!(calls.take_next(never), Some(StreamNext::End(Err(CallError::Shutdown))));
    assert_eq!(calls.streams(), 0);
    // A deadline that passed gives its own terminal; the loss does not
    // replace it.
    calls.revive(a);
    let late = calls.open_stream(a, 0, 4);
    assert!(calls.give_up(late, CallError::Timeout { after: Duration::from_millis(5) }));
    calls.lose(a, "gone".into(), None);
    assert_eq!(
        calls.take_next(late),
        Some(StreamNext::End(Err(CallError::Timeout { after: Duration::from_millis(5) })))
    );
}

/// What a scenario does next.
#[derive(Clone, Debug)]
enum Op {
    /// A request to `service` on `link`.
    Send { link: usize, service: u16 },
    /// The peer of `link` publishes a reply.
    Reply { link: usize, pick: usize, kind: ReplyKind },
    /// `recv`: the next outcome of any link.
    Recv,
    /// `wait` for one of the tickets (or another client's).
    Wait { pick: usize, foreign: bool },
    /// A send short of room: every reply on every link is read aside.
    Room,
    /// `link` is lost; with `closed`, its peer said the last request it
    /// took (`closed` requests back from the newest).
    Lose { link: usize, closed: Option<u8> },
    /// A new link fills a lost one's place (a reconnection).
    Revive { link: usize },
    /// A stream opened on `link` with a window of `window` items.
    Open { link: usize, window: u32 },
    /// The peer of one of the streams sends it a frame.
    Stream { pick: usize, frame: StreamFrame },
    /// The client takes the next of a stream's items or its terminal, and
    /// grants credit as it is due.
    Next { pick: usize },
    /// The caller cancels a stream.
    Cancel { pick: usize },
    /// The caller drops a stream's handle.
    Drop { pick: usize },
    /// A stream's deadline passes with nothing for it.
    Expire { pick: usize },
}

#[derive(Clone, Copy, Debug)]
enum StreamFrame {
    /// An item within its credit.
    Item,
    /// Its end.
    End,
    /// Its end, with the handler's error.
    Error,
    /// An item beyond its credit.
    BeyondCredit,
    /// An item, or an end, after its end.
    AfterEnd,
}

#[derive(Clone, Copy, Debug)]
enum ReplyKind {
    /// To a request the peer holds.
    Good,
    /// To a request the peer holds, under the wrong service.
    WrongService,
    /// To an id never sent.
    Unknown,
    /// To a request already answered.
    Twice,
    /// The first chunk of a reply to a request the peer holds (its last
    /// comes with a later `Finish`).
    Chunked,
    /// The last chunk of a reply begun in chunks.
    Finish,
    /// The first chunk of a reply longer than the client takes: refused.
    TooLong,
}

const LINKS: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    let link = 0..LINKS;
    let kind = prop_oneof![
        12 => Just(ReplyKind::Good),
        1 => Just(ReplyKind::WrongService),
        1 => Just(ReplyKind::Unknown),
        1 => Just(ReplyKind::Twice),
        3 => Just(ReplyKind::Chunked),
        3 => Just(ReplyKind::Finish),
        1 => Just(ReplyKind::TooLong),
    ];
    prop_oneof![
        8 => (link.clone(), 0..2u16).prop_map(|(link, service)| Op::Send { link, service }),
        8 => (link.clone(), any::<usize>(), kind).prop_map(|(link, pick, kind)| Op::Reply { link, pick, kind }),
        4 => Just(Op::Recv),
        4 => (any::<usize>(), prop::bool::weighted(0.05)).prop_map(|(pick, foreign)| Op::Wait { pick, foreign }),
        1 => Just(Op::Room),
        1 => (link.clone(), prop::option::of(0..4u8)).prop_map(|(link, closed)| Op::Lose { link, closed }),
        1 => link.clone().prop_map(|link| Op::Revive { link }),
        2 => (link, 1..5u32).prop_map(|(link, window)| Op::Open { link, window }),
        8 => (any::<usize>(), stream_frame()).prop_map(|(pick, frame)| Op::Stream { pick, frame }),
        6 => any::<usize>().prop_map(|pick| Op::Next { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Expire { pick }),
    ]
}

fn stream_frame() -> impl Strategy<Value = StreamFrame> {
    prop_oneof![
        16 => Just(StreamFrame::Item),
        2 => Just(StreamFrame::End),
        1 => Just(StreamFrame::Error),
        1 => Just(StreamFrame::BeyondCredit),
        1 => Just(StreamFrame::AfterEnd),
    ]
}

/// What a peer publishes.
#[derive(Clone, Debug)]
enum Published {
    Reply(FrameHeader),
    /// Item `seq` of stream `id`.
    Item {
        id: u64,
        seq: u64,
    },
    /// Stream `id`'s terminal frame.
    End {
        id: u64,
        outcome: Result<(), CallError>,
    },
    /// The first chunk of a reply.
    FirstChunk(FrameHeader),
    /// The last chunk of a reply, which completes it.
    LastChunk(FrameHeader),
    /// The first chunk of a reply the client refuses as too long.
    Refused(FrameHeader),
}

fn handler_error() -> CallError {
    CallError::Remote { code: Some(7), message: "no more".into() }
}

/// A stream as the scenario plays both ends of it.
struct StreamModel {
    key: StreamKey,
    window: u32,
    /// The peer's side: the items it may send in all (its window and the
    /// credit it was granted), those it sent, whether it sent its end (or
    /// saw a cancel, or its link went).
    credit: u64,
    sent: u64,
    ended: bool,
    /// The client's side: items it took in and kept, the items handed
    /// out (their numbers), the terminals handed out.
    kept: u64,
    handed: Vec<u64>,
    terminals: Vec<Result<(), CallError>>,
    /// The handle is alive and was not handed the terminal.
    handle: bool,
    cancelled: bool,
    /// Its terminal frame was taken, or its link lost.
    closed: bool,
    /// The terminal it must be handed, once decided.
    expected: Option<Result<(), CallError>>,
}

/// One link's peer as the scenario plays it.
#[derive(Default)]
struct Peer {
    /// Requests it holds, unanswered: (id, service).
    holds: Vec<(u64, u16)>,
    /// Ids it answered.
    answered: Vec<u64>,
    /// Frames published, not yet read by the client.
    published: VecDeque<Published>,
    /// The highest id sent on the link.
    last_sent: u64,
    lost: bool,
    /// Replies begun in chunks, not yet finished.
    chunking: Vec<FrameHeader>,
}

/// An outcome handed out, as the scenario records it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A reply, which carried this header.
    Reply(FrameHeader),
    /// An error.
    Error(CallError),
}

/// The client as the scenario plays it: the state machine, the peers, and
/// every outcome handed out.
struct Scenario {
    calls: Calls,
    foreign: Ticket,
    peers: Vec<Peer>,
    tickets: Vec<Ticket>,
    outcomes: HashMap<Ticket, Vec<Outcome>>,
    /// Per request lost with its link, the `closed_after` of that loss.
    lost_with: HashMap<Ticket, Option<u64>>,
    /// Requests refused before they were sent (not tickets).
    refused: usize,
    /// Requests whose replies were too long.
    too_long: Vec<Ticket>,
    streams: Vec<StreamModel>,
}

impl Scenario {
    fn new() -> Scenario {
        let mut calls = Calls::new(1);
        for _ in 0..LINKS {
            calls.add_link();
        }
        let mut other = Calls::new(2);
        let link = other.add_link();
        let foreign = other.sent(link, 0);
        Scenario {
            calls,
            foreign,
            peers: (0..LINKS).map(|_| Peer::default()).collect(),
            tickets: Vec::new(),
            outcomes: HashMap::new(),
            lost_with: HashMap::new(),
            refused: 0,
            too_long: Vec::new(),
            streams: Vec::new(),
        }
    }

    /// Records an outcome handed out, checking it is the first for its
    /// ticket and the right one.
    fn hand_out(&mut self, ticket: Ticket, outcome: Outcome) {
        assert!(self.tickets.contains(&ticket), "an outcome for {ticket:?}, which was never sent");
        match &outcome {
            Outcome::Reply(h) => assert_eq!(h.request_id, ticket.id(), "{ticket:?} handed another's reply"),
            Outcome::Error(CallError::Shutdown) => {
                let lost_with = self.lost_with.get(&ticket).copied().flatten();
                let last = lost_with.expect("Shutdown only after a closing word");
                assert!(ticket.id() > last, "{ticket:?} ended Shutdown, but the peer took up to {last}");
            }
            Outcome::Error(CallError::Disconnected { .. }) => {
                let lost_with = self.lost_with.get(&ticket).expect("Disconnected only with a loss");
                assert!(lost_with.is_none_or(|last| ticket.id() <= last), "{ticket:?} ended Disconnected");
            }
            Outcome::Error(CallError::Timeout { .. }) => {}
            Outcome::Error(CallError::ReplyTooLarge { .. }) => {
                assert!(self.too_long.contains(&ticket), "{ticket:?} refused, but its reply was not too long")
            }
            Outcome::Error(e) => panic!("{ticket:?} handed an unexpected outcome {e:?}"),
        }
        let all = self.outcomes.entry(ticket).or_default();
        all.push(outcome);
        assert_eq!(all.len(), 1, "{ticket:?} got a second outcome: {all:?}");
    }

    fn settle(&mut self, ticket: Ticket, settled: Settled) {
        let outcome = match settled {
            Settled::Reply { header, body } => {
                assert_eq!(body, header.request_id.to_le_bytes(), "a kept reply's body");
                Outcome::Reply(header)
            }
            Settled::Failed(e) => Outcome::Error(e),
        };
        self.hand_out(ticket, outcome);
    }

    /// Requests sent that have no outcome yet.
    fn unsettled(&self) -> usize {
        self.tickets.iter().filter(|t| !self.outcomes.contains_key(t)).count()
    }

    /// Reads `link`'s published replies, as the client reads a link, until
    /// one is delivered; a violation loses the link.
    fn read(&mut self, link: usize, awaiting: Awaiting) -> Option<Ticket> {
        while let Some(frame) = self.peers[link].published.pop_front() {
            let h = match frame {
                Published::Reply(h) => h,
                stream_frame => {
                    if let Err(v) = self.take_other_frame(link, stream_frame) {
                        let reason = v.describe("the peer");
                        self.lose(link, reason, None);
                        return None;
                    }
                    continue;
                }
            };
            match self.calls.arrived(link, &h, awaiting) {
                Ok(Arrival::Deliver(t)) => {
                    self.hand_out(t, Outcome::Reply(h));
                    return Some(t);
                }
                Ok(Arrival::Keep(t)) => self.calls.keep(t, h, h.request_id.to_le_bytes().to_vec()),
                Ok(Arrival::Drop) => {}
                Err(v) => {
                    let reason = v.describe("the peer");
                    self.lose(link, reason, None);
                    return None;
                }
            }
        }
        None
    }

    /// The client takes a chunk of a reply, or a stream's item or end, off
    /// `link`. A reply in chunks is claimed at its last chunk (a loss
    /// before that is its outcome); one refused is claimed at once.
    fn take_other_frame(&mut self, link: usize, frame: Published) -> Result<(), Violation> {
        match frame {
            Published::FirstChunk(h) => {
                self.calls.expects(link, &h)?;
            }
            Published::LastChunk(h) => match self.calls.arrived(link, &h, Awaiting::Nothing)? {
                Arrival::Keep(t) | Arrival::Deliver(t) => self.calls.keep(t, h, h.request_id.to_le_bytes().to_vec()),
                Arrival::Drop => {}
            },
            Published::Refused(h) => {
                if let Some(ticket) = self.calls.expects(link, &h)? {
                    self.too_long.push(ticket);
                }
                let error = CallError::ReplyTooLarge { len: Some(u64::MAX - 1), max: 1 };
                self.calls.refuse(link, h.request_id, error);
            }
            Published::Item { id, seq } => {
                let keep = self.calls.item_begins(link, id)?;
                let model = self.stream_model(link, id);
                if keep {
                    model.kept += 1;
                    self.calls.item(StreamKey { link, id }, item(seq));
                }
            }
            Published::End { id, outcome } => {
                self.calls.stream_ended(link, id, outcome.clone())?;
                let model = self.stream_model(link, id);
                model.closed = true;
                if model.handle {
                    model.expected.get_or_insert(outcome);
                }
            }
            Published::Reply(_) => unreachable!("replies are claimed by the caller"),
        }
        Ok(())
    }

    fn stream_model(&mut self, link: usize, id: u64) -> &mut StreamModel {
        self.streams.iter_mut().find(|s| s.key == StreamKey { link, id }).expect("a stream of the scenario's")
    }

    /// A stream whose handle is alive, if any.
    fn pick_stream(&self, pick: usize) -> Option<usize> {
        let live: Vec<usize> = (0..self.streams.len()).filter(|&i| self.streams[i].handle).collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    }

    /// The peer of stream `i` sees its cancel and ends it, unless it had.
    fn peer_sees_cancel(&mut self, i: usize) {
        let model = &mut self.streams[i];
        let link = model.key.link;
        if !model.ended && !self.peers[link].lost {
            model.ended = true;
            self.peers[link]
                .published
                .push_back(Published::End { id: model.key.id, outcome: Err(CallError::Cancelled) });
        }
    }

    /// The loss of `link`: the replies still on it are read aside first
    /// (up to a violation), then the state machine decides the rest.
    fn lose(&mut self, link: usize, reason: String, closed_after: Option<u64>) {
        if self.peers[link].lost {
            return;
        }
        while let Some(frame) = self.peers[link].published.pop_front() {
            let h = match frame {
                Published::Reply(h) => h,
                stream_frame => match self.take_other_frame(link, stream_frame) {
                    Ok(()) => continue,
                    Err(_) => break,
                },
            };
            match self.calls.arrived(link, &h, Awaiting::Nothing) {
                Ok(Arrival::Keep(t) | Arrival::Deliver(t)) => {
                    self.calls.keep(t, h, h.request_id.to_le_bytes().to_vec())
                }
                Ok(Arrival::Drop) => {}
                Err(_) => break,
            }
        }
        let peer = &mut self.peers[link];
        peer.published.clear();
        peer.holds.clear();
        peer.chunking.clear();
        peer.lost = true;
        for ticket in self.tickets.iter().filter(|t| t.link() == link && !self.outcomes.contains_key(t)) {
            self.lost_with.entry(*ticket).or_insert(closed_after);
        }
        for model in self.streams.iter_mut().filter(|s| s.key.link == link && !s.closed) {
            model.closed = true;
            model.ended = true;
            let outcome = match closed_after {
                Some(last) if model.key.id > last => CallError::Shutdown,
                _ => CallError::Disconnected { reason: reason.clone() },
            };
            if model.handle {
                model.expected.get_or_insert(Err(outcome));
            }
        }
        self.calls.lose(link, reason, closed_after);
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Send { link, service } => match self.calls.refusal(link) {
                Some(e) => {
                    assert!(self.peers[link].lost);
                    assert!(matches!(e, CallError::Shutdown | CallError::NotConnected { .. }), "{e:?}");
                    self.refused += 1;
                }
                None => {
                    assert!(!self.peers[link].lost);
                    let ticket = self.calls.sent(link, service);
                    let peer = &mut self.peers[link];
                    assert!(ticket.id() > peer.last_sent, "ids must increase per link");
                    peer.last_sent = ticket.id();
                    peer.holds.push((ticket.id(), service));
                    self.tickets.push(ticket);
                }
            },
            Op::Reply { link, pick, kind } => {
                let peer = &mut self.peers[link];
                if peer.lost {
                    return;
                }
                let reply = match kind {
                    ReplyKind::Good | ReplyKind::WrongService if !peer.holds.is_empty() => {
                        let (id, service) = peer.holds.remove(pick % peer.holds.len());
                        peer.answered.push(id);
                        let wrong = matches!(kind, ReplyKind::WrongService);
                        header(id, if wrong { service + 1 } else { service })
                    }
                    ReplyKind::Unknown => header(peer.last_sent + 1 + pick as u64 % 3, 0),
                    ReplyKind::Twice if !peer.answered.is_empty() => {
                        header(peer.answered[pick % peer.answered.len()], 0)
                    }
                    ReplyKind::Chunked | ReplyKind::TooLong if !peer.holds.is_empty() => {
                        let (id, service) = peer.holds.remove(pick % peer.holds.len());
                        let reply = header(id, service);
                        if matches!(kind, ReplyKind::Chunked) {
                            peer.chunking.push(reply);
                            peer.published.push_back(Published::FirstChunk(reply));
                        } else {
                            peer.answered.push(id);
                            peer.published.push_back(Published::Refused(reply));
                        }
                        return;
                    }
                    ReplyKind::Finish if !peer.chunking.is_empty() => {
                        let reply = peer.chunking.remove(pick % peer.chunking.len());
                        peer.answered.push(reply.request_id);
                        peer.published.push_back(Published::LastChunk(reply));
                        return;
                    }
                    _ => return,
                };
                peer.published.push_back(Published::Reply(reply));
            }
            Op::Open { link, window } => {
                if self.calls.refusal(link).is_some() {
                    self.refused += 1;
                    return;
                }
                let key = self.calls.open_stream(link, 0, window);
                let peer = &mut self.peers[link];
                assert!(key.id > peer.last_sent, "ids must increase per link");
                peer.last_sent = key.id;
                self.streams.push(StreamModel {
                    key,
                    window,
                    credit: u64::from(window),
                    sent: 0,
                    ended: false,
                    kept: 0,
                    handed: Vec::new(),
                    terminals: Vec::new(),
                    handle: true,
                    cancelled: false,
                    closed: false,
                    expected: None,
                });
            }
            Op::Stream { pick, frame } => {
                if self.streams.is_empty() {
                    return;
                }
                let n = self.streams.len();
                let model = &mut self.streams[pick % n];
                let (link, id) = (model.key.link, model.key.id);
                if self.peers[link].lost {
                    return;
                }
                let published = match frame {
                    StreamFrame::Item if !model.ended && model.sent < model.credit => {
                        model.sent += 1;
                        Published::Item { id, seq: model.sent - 1 }
                    }
                    StreamFrame::End | StreamFrame::Error if !model.ended => {
                        model.ended = true;
                        let error = matches!(frame, StreamFrame::Error);
                        Published::End { id, outcome: if error { Err(handler_error()) } else { Ok(()) } }
                    }
                    // Sent beyond the credit granted so far: the client
                    // breaks the link if it reads it so, but it may read it
                    // only after granting more, when it is in order (so
                    // it is numbered as the peer's next item either way).
                    StreamFrame::BeyondCredit if !model.ended && model.sent >= model.credit => {
                        model.sent += 1;
                        Published::Item { id, seq: model.sent - 1 }
                    }
                    StreamFrame::AfterEnd if model.ended => {
                        if pick % 2 == 0 {
                            Published::Item { id, seq: model.sent }
                        } else {
                            Published::End { id, outcome: Ok(()) }
                        }
                    }
                    _ => return,
                };
                self.peers[link].published.push_back(published);
            }
            Op::Next { pick } => {
                let Some(i) = self.pick_stream(pick) else { return };
                let key = self.streams[i].key;
                match self.calls.take_next(key) {
                    Some(StreamNext::Item(body)) => {
                        let seq = u64::from_le_bytes(body.try_into().expect("an item's body"));
                        let model = &mut self.streams[i];
                        assert_eq!(seq, model.handed.len() as u64, "{key:?}: items in order, none lost or repeated");
                        assert!(!model.cancelled, "{key:?}: an item handed out after its cancel");
                        model.handed.push(seq);
                        if let Some(n) = self.calls.credit_due(key) {
                            self.calls.credited(key, n);
                            self.streams[i].credit += u64::from(n);
                        }
                    }
                    Some(StreamNext::End(outcome)) => {
                        let model = &mut self.streams[i];
                        model.terminals.push(outcome.clone());
                        assert_eq!(model.terminals.len(), 1, "{key:?}: a second terminal");
                        assert_eq!(Some(outcome), model.expected, "{key:?}: the terminal decided first");
                        if !model.cancelled {
                            assert_eq!(model.handed.len() as u64, model.kept, "{key:?}: every item before the end");
                        }
                        model.handle = false;
                    }
                    None => {
                        let model = &self.streams[i];
                        assert_eq!(model.expected, None, "{key:?}: a terminal decided and not handed out");
                        assert_eq!(model.handed.len() as u64, model.kept, "{key:?}: an item queued and not handed out");
                    }
                }
            }
            Op::Cancel { pick } => {
                let Some(i) = self.pick_stream(pick) else { return };
                let sent = self.calls.cancel(self.streams[i].key);
                let model = &mut self.streams[i];
                assert_eq!(sent, !model.closed && !model.cancelled, "a cancel is sent while it is open, once");
                model.cancelled = true;
                model.expected = Some(Err(CallError::Cancelled));
                if sent {
                    self.peer_sees_cancel(i);
                }
            }
            Op::Drop { pick } => {
                let Some(i) = self.pick_stream(pick) else { return };
                let sent = self.calls.forget(self.streams[i].key);
                let model = &mut self.streams[i];
                assert_eq!(sent, !model.closed && !model.cancelled, "a dropped stream is cancelled while it is open");
                model.handle = false;
                if sent {
                    self.peer_sees_cancel(i);
                }
            }
            Op::Expire { pick } => {
                let Some(i) = self.pick_stream(pick) else { return };
                let key = self.streams[i].key;
                // A wait runs out only with nothing for it.
                if self.calls.stream_ready(key) {
                    return;
                }
                let timeout = CallError::Timeout { after: Duration::from_millis(1) };
                let sent = self.calls.give_up(key, timeout.clone());
                let model = &mut self.streams[i];
                assert_eq!(sent, !model.closed && !model.cancelled);
                model.expected.get_or_insert(Err(timeout));
                model.cancelled |= sent;
                if sent {
                    self.peer_sees_cancel(i);
                }
            }
            Op::Recv => self.recv(),
            Op::Wait { pick, foreign } => {
                let ticket = match (foreign, self.tickets.len()) {
                    (true, _) | (false, 0) => self.foreign,
                    (false, n) => self.tickets[pick % n],
                };
                self.wait(ticket);
            }
            Op::Room => {
                for link in 0..LINKS {
                    self.read(link, Awaiting::Nothing);
                }
            }
            Op::Lose { link, closed } => {
                let closed_after = closed.map(|back| self.peers[link].last_sent.saturating_sub(u64::from(back)));
                self.lose(link, "lost".into(), closed_after);
            }
            Op::Revive { link } => {
                if self.peers[link].lost {
                    self.calls.revive(link);
                    self.peers[link].lost = false;
                }
            }
        }
        assert_eq!(self.calls.outstanding(), self.unsettled(), "the count of requests still to hand out");
        for model in &self.streams {
            if let Some(outstanding) = self.calls.outstanding_credit(model.key) {
                assert!(outstanding <= u64::from(model.window), "{:?}: credit beyond the window", model.key);
                assert!(
                    model.credit <= model.handed.len() as u64 + u64::from(model.window) || model.cancelled,
                    "{:?}: the peer was granted more than a window beyond the items handed out",
                    model.key
                );
            }
        }
    }

    /// `recv` as the client runs it: what is settled, else the next reply
    /// of any link; nothing published anywhere is a timeout.
    fn recv(&mut self) {
        for _ in 0..=LINKS {
            match self.calls.begin_recv() {
                Ok(Some((ticket, settled))) => return self.settle(ticket, settled),
                Ok(None) => {}
                Err(CallError::NothingInFlight) => {
                    let waiting = (0..LINKS).any(|l| self.calls.waiting(l));
                    assert!(!waiting, "NothingInFlight with requests waiting");
                    return;
                }
                Err(e) => panic!("recv: {e:?}"),
            }
            let mut lost_one = false;
            for link in 0..LINKS {
                if !self.calls.replies_due(link) {
                    continue;
                }
                let was_lost = self.peers[link].lost;
                if self.read(link, Awaiting::Any).is_some() {
                    return;
                }
                lost_one |= self.peers[link].lost && !was_lost;
            }
            if !lost_one {
                return; // Timeout: the requests stay in flight.
            }
        }
    }

    /// `wait` as the client runs it: what is settled, else its link's
    /// replies (others' kept aside) until its own; none is a timeout.
    fn wait(&mut self, ticket: Ticket) {
        match self.calls.begin_wait(ticket) {
            Err(CallError::ForeignTicket { id }) => {
                assert_eq!((ticket, id), (self.foreign, self.foreign.id()));
                return;
            }
            Err(CallError::UnknownTicket { id }) => {
                assert_eq!(id, ticket.id());
                assert!(self.outcomes.contains_key(&ticket), "{ticket:?} unknown without an outcome");
                return;
            }
            Err(e) => panic!("wait: {e:?}"),
            Ok(Some(settled)) => return self.settle(ticket, settled),
            Ok(None) => assert!(!self.outcomes.contains_key(&ticket), "{ticket:?} awaited after its outcome"),
        }
        let link = ticket.link();
        if self.read(link, Awaiting::Ticket(ticket)) == Some(ticket) {
            return;
        }
        for other in (0..LINKS).filter(|&l| l != link) {
            self.read(other, Awaiting::Ticket(ticket));
        }
        let error = if self.peers[link].lost {
            lost("seen by the wait")
        } else {
            CallError::Timeout { after: Duration::from_millis(1) }
        };
        match self.calls.wait_failed(ticket, error) {
            Ok(settled) => self.settle(ticket, settled),
            Err(e) => {
                assert!(matches!(e, CallError::Timeout { .. }), "{ticket:?}: {e:?} with no outcome settled");
                self.hand_out(ticket, Outcome::Error(e));
            }
        }
    }

    /// Every link is lost, and `recv` hands out all that is left.
    fn finish(mut self) {
        for link in 0..LINKS {
            self.lose(link, "the end".into(), None);
        }
        for _ in 0..=self.tickets.len() {
            self.recv();
        }
        assert_eq!(self.calls.begin_recv().map(|_| ()), Err(CallError::NothingInFlight));
        assert_eq!(self.calls.outstanding(), 0);
        for ticket in &self.tickets {
            assert_eq!(self.outcomes.get(ticket).map(Vec::len), Some(1), "{ticket:?} got no outcome");
        }
        // Every stream still held hands out what it has, then one terminal.
        for i in 0..self.streams.len() {
            let key = self.streams[i].key;
            for _ in 0..=self.streams[i].kept + 1 {
                if !self.streams[i].handle {
                    break;
                }
                self.run(Op::Next { pick: 0 }.with_stream(&self, i));
            }
            let model = &self.streams[i];
            assert!(!model.handle, "{key:?} never ended");
            assert!(model.terminals.len() <= 1, "{key:?}: {:?}", model.terminals);
            assert_eq!(self.calls.take_next(key), None, "{key:?}: anything after its terminal");
        }
        assert_eq!(self.calls.streams(), 0, "every stream retired");
    }
}

impl Op {
    /// This `Next` aimed at stream `i` of the scenario.
    fn with_stream(self, scenario: &Scenario, i: usize) -> Op {
        let live: Vec<usize> = (0..scenario.streams.len()).filter(|&j| scenario.streams[j].handle).collect();
        Op::Next { pick: live.iter().position(|&j| j == i).expect("a live stream") }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Whatever the client does and whatever its peers answer, each
    /// request sent gets exactly one outcome, the right one: its own reply
    /// if one was read before its link was lost, `Shutdown` only for a
    /// request the peer said it never took, never a second outcome, and
    /// none lost. Each stream hands out the items it took in, in order,
    /// none lost or repeated (fewer only after a cancel), then exactly
    /// one terminal outcome, the one decided first (a cancel's, the
    /// deadline's, its end, or its link's loss); it never has more than
    /// its window of credit outstanding; and every stream retires.
    #[test]
    fn every_request_gets_exactly_one_outcome(ops in prop::collection::vec(op(), 1..160)) {
        let mut scenario = Scenario::new();
        for op in ops {
            scenario.run(op);
        }
        scenario.finish();
    }
}
