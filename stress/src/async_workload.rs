//! `--client async`: the workload of [`crate::workload`] made with the
//! async client ([`AsyncClient`]) on one multi-thread tokio runtime. Each
//! logical client is a task; `share` tasks call through one connection
//! (one `AsyncClient`, cloned), so 1 gives every task its own connection
//! and more pipelines their calls on one. Every reply is checked and every
//! call counted as the blocking clients' are, with the same
//! [`ClientOutcome`].
//!
//! Synchronous calls are `call_into`; a window is `send` until it is full,
//! then `wait_into` for the oldest ticket (each wait bounded by the call
//! timeout): each task's replies go into one buffer of its own, as a
//! blocking client's do, so a run allocates nothing per call.
//! Once every task of a connection is done, what `recv` still hands out is
//! an outcome no call was waiting for: counted as `duplicated`.
//!
//! Allocations are counted per task, over the polls of its calls alone
//! (the allocator counts per thread and a task moves between threads):
//! what the task and the client library do for it, including the outcomes
//! it takes for the connection's other tasks while it is polled.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipc_client::{AsyncClient, CallError, Received, Service, Ticket};
use tokio::runtime::Runtime;

use crate::workload::{fill_payload, options, publish, ClientOutcome, Workload};

/// How the async run is laid out.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Tasks per connection (the last connection may have fewer).
    pub share: usize,
    /// Worker threads of the runtime.
    pub workers: usize,
}

/// What outlives the calls: the connections (so the daemon is measured
/// with them attached), then the runtime they are registered with.
pub struct Kept {
    _clients: Vec<AsyncClient>,
    _runtime: Runtime,
}

/// How long a connection's leftover outcomes are waited for after its
/// tasks are done (none should come: the wait only has to let one that is
/// on its way be seen).
const LEFTOVER_WAIT: Duration = Duration::from_millis(20);

/// Runs `clients` tasks as `layout` says. All connections are made first;
/// the clock starts when the tasks are spawned. Returns the outcomes (one
/// per task, in task order), the duration of the calling phase, and what
/// to keep until the daemon has been measured.
pub fn run(w: &Workload, clients: usize, layout: Layout) -> anyhow::Result<(Vec<ClientOutcome>, Duration, Kept)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(layout.workers.max(1))
        .thread_name("async-client")
        .enable_all()
        .build()?;
    let share = layout.share.clamp(1, clients.max(1));
    let connections = clients.div_ceil(share);
    let (outcomes, elapsed, kept) = runtime.block_on(async {
        let mut connected = Vec::with_capacity(connections);
        for _ in 0..connections {
            connected.push(connect(w).await);
        }
        let start = Instant::now();
        let mut groups = Vec::with_capacity(connections);
        for (c, (conn, connect_ns)) in connected.iter().enumerate() {
            let ids = (c * share)..((c + 1) * share).min(clients);
            let tasks: Vec<_> = ids
                .map(|id| match conn {
                    Ok((client, echo)) => {
                        let (client, echo, w, ns) = (client.clone(), echo.clone(), w.clone(), *connect_ns);
                        Ok(tokio::spawn(async move { calls(&client, &echo, &w, id as u32, ns).await }))
                    }
                    Err(e) => Err(Box::new(ClientOutcome::failed_to_connect(w.messages, *connect_ns, e.clone()))),
                })
                .collect();
            groups.push(tasks);
        }
        let mut outcomes = Vec::with_capacity(clients);
        for ((conn, _), tasks) in connected.iter().zip(groups) {
            let first = outcomes.len();
            for t in tasks {
                outcomes.push(match t {
                    Ok(handle) => handle.await.expect("an async client task panicked"),
                    Err(failed) => *failed,
                });
            }
            if let (Ok((client, _)), Some(out)) = (conn, outcomes.get_mut(first)) {
                leftovers(client, out).await;
            }
        }
        let elapsed = start.elapsed();
        let kept: Vec<AsyncClient> =
            connected.into_iter().filter_map(|(c, _)| c.ok().map(|(client, _)| client)).collect();
        (outcomes, elapsed, kept)
    });
    Ok((outcomes, elapsed, Kept { _clients: kept, _runtime: runtime }))
}

/// Connects one async client and resolves the workload's service; with
/// the time both took, in nanoseconds.
async fn connect(w: &Workload) -> (Result<(AsyncClient, Service), String>, u64) {
    let start = Instant::now();
    let result = match AsyncClient::connect_with(w.transport.clone(), options(w)).await {
        Ok(client) => match client.service(w.service).await {
            Ok(echo) => Ok((client, echo)),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(format!("{:#}", anyhow::Error::new(e))),
    };
    (result, start.elapsed().as_nanos() as u64)
}

/// The calls of task `id`: synchronous with a window of 1, else
/// pipelined.
async fn calls(client: &AsyncClient, echo: &Service, w: &Workload, id: u32, connect_ns: u64) -> ClientOutcome {
    let mut out = ClientOutcome::new(connect_ns);
    let mut request = vec![0u8; w.payload];
    let mut reply = Vec::with_capacity(w.payload);
    // Counted from the first call on, as a blocking client's thread is.
    let ((), allocations) = if w.window <= 1 {
        Counted::new(sync_calls(client, echo, w, id, &mut out, &mut request, &mut reply)).await
    } else {
        Counted::new(pipelined_calls(client, echo, w, id, &mut out, &mut request, &mut reply)).await
    };
    out.allocations = allocations;
    out.lost = out.made.saturating_sub(out.outcomes.total());
    publish(w, id, &out);
    out
}

/// Whether a task stops calling: its connection is lost (the workload of
/// a plain run has no reconnect policy), so every later call would be
/// refused at once.
fn gave_up(client: &AsyncClient, e: &CallError) -> bool {
    matches!(e, CallError::Disconnected { .. } | CallError::NotConnected { .. } | CallError::Shutdown)
        && !client.with_client(|c| c.is_connected())
}

async fn sync_calls(
    client: &AsyncClient,
    echo: &Service,
    w: &Workload,
    id: u32,
    out: &mut ClientOutcome,
    request: &mut [u8],
    reply: &mut Vec<u8>,
) {
    for seq in 0..w.messages {
        fill_payload(id, seq, request);
        out.made += 1;
        let start = Instant::now();
        match client.call_into(echo, request, reply).await {
            Ok(()) => out.reply(id, seq, start, reply, request, None),
            Err(e) => {
                out.error(id, seq, &e, None);
                if gave_up(client, &e) {
                    break;
                }
            }
        }
        publish(w, id, out);
    }
}

/// Keeps `window` requests in flight: sends until the window is full,
/// then waits for the oldest. Latency is from a request's send to its
/// reply's receipt by the task.
async fn pipelined_calls(
    client: &AsyncClient,
    echo: &Service,
    w: &Workload,
    id: u32,
    out: &mut ClientOutcome,
    request: &mut [u8],
    reply: &mut Vec<u8>,
) {
    let mut expected = vec![0u8; w.payload];
    let mut in_flight: VecDeque<(Ticket, u64, Instant)> = VecDeque::with_capacity(w.window as usize);
    let mut next = 0u64;
    let mut stopped = false;
    loop {
        while !stopped && in_flight.len() < w.window as usize && next < w.messages {
            fill_payload(id, next, request);
            out.made += 1;
            let sent = tokio::time::timeout(w.call_timeout, client.send(echo, request)).await;
            match sent {
                Ok(Ok(ticket)) => in_flight.push_back((ticket, next, Instant::now())),
                // Refused before it was sent: that is its outcome.
                Ok(Err(e)) => {
                    out.error(id, next, &e, None);
                    stopped = gave_up(client, &e);
                }
                // Dropped before it was sent: nothing was.
                Err(_) => out.error(id, next, &CallError::SendTimeout { after: w.call_timeout, in_flight: 0 }, None),
            }
            next += 1;
        }
        let Some((ticket, seq, sent)) = in_flight.pop_front() else { break };
        // Dropped at the timeout, the wait gives the ticket up: its
        // outcome is the timeout.
        match tokio::time::timeout(w.call_timeout, client.wait_into(ticket, reply)).await {
            Ok(Ok(())) => {
                fill_payload(id, seq, &mut expected);
                out.reply(id, seq, sent, reply, &expected, None);
            }
            Ok(Err(e)) => {
                out.error(id, seq, &e, None);
                stopped |= gave_up(client, &e);
            }
            Err(_) => out.error(id, seq, &CallError::Timeout { after: w.call_timeout }, None),
        }
        publish(w, id, out);
    }
}

/// Counts on `out` every outcome the connection still hands out once
/// all its tasks are done: each is a second outcome for some request.
async fn leftovers(client: &AsyncClient, out: &mut ClientOutcome) {
    loop {
        match tokio::time::timeout(LEFTOVER_WAIT, client.recv()).await {
            Ok(Ok(Received { ticket, .. })) => {
                out.duplicated += 1;
                out.first_error
                    .get_or_insert_with(|| format!("an outcome no call waited for (ticket {})", ticket.id()));
            }
            // Nothing in flight, or nothing came: no leftover.
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// A future with the allocations made on its thread while it was polled.
struct Counted<F> {
    inner: Pin<Box<F>>,
    allocations: u64,
}

impl<F: Future> Counted<F> {
    fn new(inner: F) -> Counted<F> {
        Counted { inner: Box::pin(inner), allocations: 0 }
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = (F::Output, u64);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let before = ipc_alloc_count::thread_allocations();
        let polled = self.inner.as_mut().poll(cx);
        self.allocations += ipc_alloc_count::thread_allocations() - before;
        polled.map(|out| (out, self.allocations))
    }
}
