//! The state machine alone: a few cases spelled out, then a property test
//! that drives it as the client does, over several links whose peers
//! answer in any order, break the protocol and go away, and checks that
//! every request sent gets exactly one outcome.

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
            (tickets[1], Settled::Lost(lost("closed"))),
            (tickets[2], Settled::Lost(CallError::Shutdown)),
            (tickets[3], Settled::Lost(CallError::Shutdown)),
        ]
    );
    assert_eq!(calls.begin_wait(other), Ok(None), "the other link goes on");

    calls.lose(b, "died".into(), None);
    assert_eq!(calls.refusal(b), Some(CallError::NotConnected { reason: "died".into() }));
    assert_eq!(calls.wait_failed(other, lost("seen by the wait")), Ok(Settled::Lost(lost("died"))));
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
}

const LINKS: usize = 3;

fn op() -> impl Strategy<Value = Op> {
    let link = 0..LINKS;
    let kind = prop_oneof![
        12 => Just(ReplyKind::Good),
        1 => Just(ReplyKind::WrongService),
        1 => Just(ReplyKind::Unknown),
        1 => Just(ReplyKind::Twice),
    ];
    prop_oneof![
        8 => (link.clone(), 0..2u16).prop_map(|(link, service)| Op::Send { link, service }),
        8 => (link.clone(), any::<usize>(), kind).prop_map(|(link, pick, kind)| Op::Reply { link, pick, kind }),
        4 => Just(Op::Recv),
        4 => (any::<usize>(), prop::bool::weighted(0.05)).prop_map(|(pick, foreign)| Op::Wait { pick, foreign }),
        1 => Just(Op::Room),
        1 => (link.clone(), prop::option::of(0..4u8)).prop_map(|(link, closed)| Op::Lose { link, closed }),
        1 => link.prop_map(|link| Op::Revive { link }),
    ]
}

/// One link's peer as the scenario plays it.
#[derive(Default)]
struct Peer {
    /// Requests it holds, unanswered: (id, service).
    holds: Vec<(u64, u16)>,
    /// Ids it answered.
    answered: Vec<u64>,
    /// Replies published, not yet read by the client.
    published: VecDeque<FrameHeader>,
    /// The highest id sent on the link.
    last_sent: u64,
    lost: bool,
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
            Settled::Lost(e) => Outcome::Error(e),
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
        while let Some(h) = self.peers[link].published.pop_front() {
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

    /// The loss of `link`: the replies still on it are read aside first
    /// (up to a violation), then the state machine decides the rest.
    fn lose(&mut self, link: usize, reason: String, closed_after: Option<u64>) {
        if self.peers[link].lost {
            return;
        }
        while let Some(h) = self.peers[link].published.pop_front() {
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
        peer.lost = true;
        for ticket in self.tickets.iter().filter(|t| t.link() == link && !self.outcomes.contains_key(t)) {
            self.lost_with.entry(*ticket).or_insert(closed_after);
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
                    _ => return,
                };
                peer.published.push_back(reply);
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
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Whatever the client does and whatever its peers answer, each
    /// request sent gets exactly one outcome, the right one: its own reply
    /// if one was read before its link was lost, `Shutdown` only for a
    /// request the peer said it never took, never a second outcome, and
    /// none lost.
    #[test]
    fn every_request_gets_exactly_one_outcome(ops in prop::collection::vec(op(), 1..120)) {
        let mut scenario = Scenario::new();
        for op in ops {
            scenario.run(op);
        }
        scenario.finish();
    }
}
