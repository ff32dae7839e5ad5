//! The async client's steady state allocates nothing, by the calling
//! thread's allocations (a counting allocator, and a runtime on that one
//! thread, so that everything a call makes is counted): calls into a
//! buffer, and pipelined requests waited for, or received, into one, on
//! every transport. A call that returns a `Vec` allocates that `Vec`
//! (and so shows that the count counts).

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{pattern, start_with_streams, watchdog, TEST_LIMIT};
use ipc_alloc_count::{thread_allocations, CountingAllocator};
use ipc_client::{AsyncClient, ClientOptions, Service, Ticket, Transport};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Calls counted per kind, after as many to warm up.
const CALLS: u64 = 1000;

/// Below this many allocations a call, none is per call: what is left is
/// a table of the runtime's or the connection's growing once.
const PER_CALL: f64 = 0.01;

/// The requests in flight at once when pipelining.
const WINDOW: usize = 16;

#[test]
fn calls_into_a_buffer_allocate_nothing_in_steady_state() {
    let (_daemon, ends) = start_with_streams(&[]);
    for name in ["shm", "uds", "tcp"] {
        let transport: Transport = ends.transport(name);
        watchdog(TEST_LIMIT, move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let options = ClientOptions::default().spin(Duration::ZERO);
                let client = AsyncClient::connect_with(transport, options).await.expect("connect");
                let echo = client.service("echo").await.expect("echo");
                let request = pattern(7, 64);
                let mut reply = Vec::with_capacity(64);

                // Each kind warms up first, then is counted.
                for counting in [false, true] {
                    let before = thread_allocations();
                    for _ in 0..CALLS {
                        client.call_into(&echo, &request, &mut reply).await.expect("call_into");
                        assert_eq!(reply, request);
                    }
                    let per_call = since(before);
                    assert!(!counting || per_call < PER_CALL, "{name}: call_into made {per_call} allocations a call");
                }
                let mut tickets = VecDeque::with_capacity(WINDOW);
                for (receive, what) in [(false, "send and wait_into"), (true, "send and recv_into")] {
                    for counting in [false, true] {
                        let before = thread_allocations();
                        window(&client, &echo, &request, &mut reply, &mut tickets, receive).await;
                        let per_call = since(before);
                        assert!(!counting || per_call < PER_CALL, "{name}: {what} made {per_call} allocations a call");
                    }
                }
                // The plain call hands its reply out as a `Vec` of its own
                // (but for the first few, which take the spare buffers the
                // windows left): the count counts.
                let before = thread_allocations();
                for _ in 0..CALLS {
                    assert_eq!(client.call(&echo, &request).await.expect("call"), request);
                }
                let per_call = since(before);
                assert!(per_call > 0.9, "{name}: call made {per_call} allocations a call, not its reply's");
            })
        });
    }
}

/// Allocations a call since `before`, over `CALLS` calls.
fn since(before: u64) -> f64 {
    (thread_allocations() - before) as f64 / CALLS as f64
}

/// `CALLS` requests with `WINDOW` in flight, each reply taken by `wait_into`
/// (oldest first) or by `recv_into`.
async fn window(
    client: &AsyncClient,
    echo: &Service,
    request: &[u8],
    reply: &mut Vec<u8>,
    tickets: &mut VecDeque<Ticket>,
    receive: bool,
) {
    let mut sent = 0;
    while sent < CALLS || !tickets.is_empty() {
        while sent < CALLS && tickets.len() < WINDOW {
            tickets.push_back(client.send(echo, request).await.expect("send"));
            sent += 1;
        }
        if receive {
            let got = client.recv_into(reply).await.expect("recv_into");
            got.outcome.expect("an echo");
            tickets.retain(|t| *t != got.ticket);
        } else {
            let ticket = tickets.pop_front().expect("a ticket in flight");
            client.wait_into(ticket, reply).await.expect("wait_into");
        }
        assert_eq!(reply, request);
    }
}
