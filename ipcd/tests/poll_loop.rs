//! The client's poll-style API driven by a plain edge-triggered epoll loop
//! against the real daemon, on every transport: requests pipelined with
//! `try_send` (waiting for room with `arm_for_room`), outcomes taken with
//! `try_recv`, and every wait an `arm` followed by `epoll_wait`, readiness
//! forgotten only after `on_ready` reports an empty read. A lost wake-up
//! hangs the loop, which the watchdog turns into a failure.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use common::{connect, pattern, start_with_streams, watchdog, TEST_LIMIT};
use ipc_client::{Armed, CallError, Client, ClientOptions, DoorbellKind, FdToken};
use rustix::event::epoll;

on_every_transport!(an_epoll_loop_pipelines_through_tiny_rings, an_epoll_loop_waits_for_one_call_at_a_time);

/// An edge-triggered epoll set over a client's `wait_fds`, as a reactor
/// such as tokio or mio keeps one: readiness is remembered until an
/// `on_ready` read comes back empty.
struct Reactor {
    epoll: OwnedFd,
    epoch: Option<u64>,
    /// Tokens found ready whose last read was not empty: still ready.
    still: Vec<FdToken>,
    events: Vec<epoll::Event>,
    /// Waits that found nothing ready at once (went to sleep in the kernel).
    slept: u64,
}

impl Reactor {
    fn new() -> Reactor {
        Reactor {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll_create"),
            epoch: None,
            still: Vec::new(),
            events: Vec::with_capacity(16),
            slept: 0,
        }
    }

    /// Registers the client's fds anew when they changed.
    fn sync(&mut self, client: &Client) {
        if self.epoch == Some(client.fd_epoch()) {
            return;
        }
        self.epoll = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll_create");
        self.still.clear();
        for w in client.wait_fds() {
            let flags = epoll::EventFlags::IN | epoll::EventFlags::OUT | epoll::EventFlags::ET;
            epoll::add(&self.epoll, w.fd, epoll::EventData::new_u64(w.token.get() as u64), flags).expect("epoll_ctl");
            // Registered late: it may be ready already, and an edge
            // before the registration is not reported. Look once.
            self.still.push(w.token);
        }
        self.epoch = Some(client.fd_epoch());
    }

    /// Step 3 and 4 of the protocol: waits for an fd, then drains what
    /// is ready.
    fn wait(&mut self, client: &mut Client) {
        self.sync(client);
        if self.still.is_empty() {
            self.events.clear();
            self.slept += 1;
            epoll::wait(&self.epoll, rustix::buffer::spare_capacity(&mut self.events), None).expect("epoll_wait");
            self.still.extend(self.events.iter().map(|e| FdToken::from_usize(e.data.u64() as usize)));
        }
        for token in std::mem::take(&mut self.still) {
            if !client.on_ready(token) {
                self.still.push(token);
            }
        }
    }
}

fn options(name: &str) -> ClientOptions {
    let options = ClientOptions::default().ring_capacity(4096).spin(std::time::Duration::ZERO);
    if name == "shm" {
        options.doorbell(DoorbellKind::Pollable)
    } else {
        options
    }
}

/// 400 requests of up to 1,500 bytes, 24 in flight at most, through rings
/// of 4 KiB: room runs out again and again. Each ticket gets its own
/// request back, once.
fn an_epoll_loop_pipelines_through_tiny_rings(name: &'static str) {
    let (_daemon, ends) = start_with_streams(&["--spin-us", "0"]);
    let transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, options(name));
        let echo = client.service("echo").unwrap();
        let requests: Vec<Vec<u8>> = (0..400u64).map(|i| pattern(i, 1 + (i as usize * 37) % 1500)).collect();
        let mut reactor = Reactor::new();
        let mut pending = HashMap::new();
        let (mut next, mut done) = (0, 0);
        while done < requests.len() {
            let mut blocked = None;
            while next < requests.len() && pending.len() < 24 {
                match client.try_send(&echo, &requests[next]) {
                    Ok(ticket) => {
                        assert!(pending.insert(ticket, next).is_none(), "ticket {ticket:?} given twice");
                        next += 1;
                    }
                    Err(CallError::Full { .. }) => {
                        blocked = Some(requests[next].len());
                        break;
                    }
                    Err(e) => panic!("try_send: {e}"),
                }
            }
            let mut took = false;
            while !pending.is_empty() {
                let Some(ipc_client::Received { ticket, outcome }) = client.try_recv().expect("try_recv") else {
                    break;
                };
                let i = pending.remove(&ticket).unwrap_or_else(|| panic!("an outcome for {ticket:?}, not pending"));
                assert_eq!(outcome.expect("echo"), requests[i], "the reply to request {i}");
                done += 1;
                took = true;
            }
            if took {
                continue;
            }
            let armed = match blocked {
                Some(len) => client.arm_for_room(&echo, len),
                None => client.arm(),
            };
            if armed.expect("arm") == Armed::Wait {
                reactor.wait(&mut client);
            }
        }
        assert!(matches!(client.try_recv(), Err(CallError::NothingInFlight)));
    });
}

/// One call at a time with `try_wait`: every reply comes after the loop
/// armed and slept (the daemon does not spin), so each is a wake-up
/// through the doorbell or the socket.
fn an_epoll_loop_waits_for_one_call_at_a_time(name: &'static str) {
    let (_daemon, ends) = start_with_streams(&["--spin-us", "0"]);
    let transport = ends.transport(name);
    let slept = watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, options(name));
        let echo = client.service("echo").unwrap();
        let mut reactor = Reactor::new();
        // 300 calls, and on until one has slept (a busy machine can answer
        // a run of calls before the loop arms), up to 3,000.
        let mut i = 0u64;
        while i < 300 || (reactor.slept == 0 && i < 3_000) {
            i += 1;
            let request = pattern(i, 64);
            let ticket = client.try_send(&echo, &request).expect("try_send");
            let reply = loop {
                if let Some(reply) = client.try_wait(ticket).expect("try_wait") {
                    break reply;
                }
                if client.arm().expect("arm") == Armed::Wait {
                    reactor.wait(&mut client);
                }
            };
            assert_eq!(reply, request);
            // Taken: a second look is an error, not another outcome.
            assert!(matches!(client.try_wait(ticket), Err(CallError::UnknownTicket { .. })));
        }
        reactor.slept
    });
    assert!(slept > 0, "the loop never waited in epoll: it tested no wake-up");
}

/// A futex doorbell cannot be waited on by a poll loop: `arm` says so
/// rather than leave the loop waiting on nothing.
#[test]
fn arm_refuses_a_futex_doorbell() {
    let (_daemon, ends) = start_with_streams(&[]);
    let transport = ends.transport("shm");
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, ClientOptions::default().doorbell(DoorbellKind::Futex));
        let echo = client.service("echo").unwrap();
        let ticket = client.try_send(&echo, b"x").unwrap();
        assert_eq!(client.wait_fds().count(), 0);
        let armed = client.arm();
        // The reply may already be there (then there is nothing to wait for).
        if armed != Ok(Armed::Ready) {
            assert_eq!(armed, Err(CallError::NotPollable));
        }
        assert_eq!(client.wait(ticket).unwrap(), b"x");
    });
}

/// `wait_timeout` waits with its own timeout and hands out the reply.
#[test]
fn wait_timeout_hands_out_the_reply() {
    let (_daemon, ends) = start_with_streams(&[]);
    let transport = ends.transport("shm");
    watchdog(TEST_LIMIT, move || {
        let mut client = connect(&transport, ClientOptions::default());
        let echo = client.service("echo").unwrap();
        let ticket = client.send(&echo, b"in time").unwrap();
        assert_eq!(client.wait_timeout(ticket, std::time::Duration::from_secs(30)).unwrap(), b"in time");
        assert!(matches!(client.wait_timeout(ticket, std::time::Duration::ZERO), Err(CallError::UnknownTicket { .. })));
    });
}
