//! Streams on the async client (`AsyncClient::stream`, a
//! `futures_core::Stream`) against the daemon's own `stream.count`, over
//! shared memory and the Unix stream socket: every item in order and then
//! the end (credit granted as items are taken: a window of 8 carries a
//! thousand), items longer than a frame, the handler's error, streams and
//! calls of other tasks through the same connection at once, a dropped
//! stream cancelled (the daemon retires it), and the deadline.

mod common;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::time::{Duration, Instant};

use common::{count_item, start_with_streams, stream_count as count, watchdog, TEST_LIMIT};
use futures_core::Stream as _;
use ipc_client::{AsyncClient, AsyncStream, CallError, ClientOptions, StreamOptions, Transport};

macro_rules! on_shm_and_uds {
    ($($test:ident),* $(,)?) => {
        mod shm {
            $(#[test] fn $test() { super::$test("shm") })*
        }
        mod uds {
            $(#[test] fn $test() { super::$test("uds") })*
        }
    };
}

on_shm_and_uds!(
    items_come_in_order_then_the_end,
    streams_and_calls_of_many_tasks_share_a_connection,
    a_dropped_stream_is_cancelled,
    the_deadline_ends_a_stream,
);

/// Runs `body` with a daemon and an async client over `name`, on a
/// runtime of two workers, under the watchdog.
fn with_async<F, Fut>(name: &'static str, body: F)
where
    F: FnOnce(AsyncClient) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (_daemon, ends) = start_with_streams(&[]);
    let transport: Transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let options = ClientOptions::default().call_timeout(Duration::from_secs(60));
            let client = AsyncClient::connect_with(transport, options).await.expect("connect");
            body(client).await;
        })
    });
}

fn window(items: u32) -> StreamOptions {
    StreamOptions::default().window(items)
}

/// The stream's next item (what `StreamExt::next` would give).
async fn next(stream: &mut AsyncStream) -> Option<Result<Vec<u8>, CallError>> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// Takes `n` items of `size` bytes from `stream` in order, then its end.
async fn take_all(stream: &mut AsyncStream, n: u32, size: u32, what: &str) {
    for i in 0..n {
        assert_eq!(next(stream).await, Some(Ok(count_item(i, size))), "{what}: item {i}");
    }
    assert_eq!(next(stream).await, None, "{what}: the end");
    assert!(stream.is_finished(), "{what}");
    assert_eq!(next(stream).await, None, "{what}: after the end");
}

fn items_come_in_order_then_the_end(name: &'static str) {
    with_async(name, move |client| async move {
        let svc = client.service("stream.count").await.unwrap();
        let mut s = client.stream_with(&svc, &count(1000, 24), window(8)).await.unwrap();
        take_all(&mut s, 1000, 24, name).await;
        let size = client.with_client(|c| c.max_payload()) as u32 * 2 + 3;
        let mut s = client.stream_with(&svc, &count(3, size), window(2)).await.unwrap();
        take_all(&mut s, 3, size, &format!("{name}: items longer than a frame")).await;
        let mut s = client.stream(&svc, &count(0, 8)).await.unwrap();
        take_all(&mut s, 0, 8, &format!("{name}: no items")).await;

        // The handler's error is the stream's one terminal outcome.
        let mut s = client.stream(&svc, b"short").await.unwrap();
        match next(&mut s).await {
            Some(Err(CallError::Remote { code: None, message })) => {
                assert!(message.contains("two u32s"), "{name}: {message}")
            }
            other => panic!("{name}: a malformed request ended with {other:?}"),
        }
        assert_eq!(next(&mut s).await, None, "{name}: after the error");
        assert_eq!(client.with_client(|c| c.open_streams()), 0, "{name}");
    });
}

/// Four tasks each take a stream while four others call, all through one
/// connection: whichever task reads the links hands every stream its
/// items, so none waits for ever.
fn streams_and_calls_of_many_tasks_share_a_connection(name: &'static str) {
    with_async(name, move |client| async move {
        let svc = client.service("stream.count").await.unwrap();
        let echo = client.service("echo").await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..4u32 {
            let (streamer, svc) = (client.clone(), svc.clone());
            tasks.push(tokio::spawn(async move {
                let client = streamer;
                let size = 8 + t * 100;
                let mut s = client.stream_with(&svc, &count(300, size), window(4)).await.unwrap();
                take_all(&mut s, 300, size, &format!("{name}: stream task {t}")).await;
            }));
            let (caller, echo) = (client.clone(), echo.clone());
            tasks.push(tokio::spawn(async move {
                let client = caller;
                for i in 0..100 {
                    let request = format!("task {t} call {i}");
                    assert_eq!(client.call(&echo, request.as_bytes()).await.unwrap(), request.as_bytes(), "{name}");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

/// A stream with no end, dropped after one item: the drop cancels it at
/// once, and the daemon's terminal frame retires it. Without the cancel it
/// would stay open (its window full, no credit granted) for ever.
fn a_dropped_stream_is_cancelled(name: &'static str) {
    with_async(name, move |client| async move {
        let svc = client.service("stream.count").await.unwrap();
        let ping = client.service("ping").await.unwrap();
        let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(4)).await.unwrap();
        assert_eq!(next(&mut s).await, Some(Ok(count_item(0, 8))), "{name}");
        assert_eq!(client.with_client(|c| c.open_streams()), 1, "{name}");
        drop(s);
        // Calls read the links, and with them the stream's terminal frame.
        let limit = Instant::now() + Duration::from_secs(30);
        while client.with_client(|c| c.open_streams()) != 0 {
            assert!(Instant::now() < limit, "{name}: the dropped stream is still open");
            client.call(&ping, b"").await.unwrap();
        }
        // A stream opened and dropped before any item, and one whose
        // opening future is dropped before it is polled: neither stays.
        drop(client.stream_with(&svc, &count(u32::MAX, 8), window(4)).await.unwrap());
        drop(client.stream(&svc, &count(u32::MAX, 8)));
        while client.with_client(|c| c.open_streams()) != 0 {
            assert!(Instant::now() < limit, "{name}: a stream dropped unread is still open");
            client.call(&ping, b"").await.unwrap();
        }
    });
}

/// A deadline that passes while no one takes items: at most the window's
/// items, then `Timeout`; and one that passes while a task takes them as
/// fast as they come.
fn the_deadline_ends_a_stream(name: &'static str) {
    with_async(name, move |client| async move {
        let svc = client.service("stream.count").await.unwrap();
        let deadline = Duration::from_millis(100);
        let opened = Instant::now();
        let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(2).deadline(deadline)).await.unwrap();
        tokio::time::sleep_until((opened + deadline + Duration::from_millis(20)).into()).await;
        let mut taken = 0;
        let end = loop {
            match next(&mut s).await {
                Some(Ok(item)) => {
                    assert_eq!(item, count_item(taken, 8), "{name}");
                    taken += 1;
                }
                other => break other,
            }
        };
        assert!(taken <= 2, "{name}: {taken} items past the deadline with a window of 2");
        assert_eq!(end, Some(Err(CallError::Timeout { after: deadline })), "{name}");
        assert_eq!(next(&mut s).await, None, "{name}: after the timeout");

        let mut s = client.stream_with(&svc, &count(u32::MAX, 8), window(16).deadline(deadline)).await.unwrap();
        let mut taken = 0;
        let end = loop {
            match next(&mut s).await {
                Some(Ok(item)) => {
                    assert_eq!(item, count_item(taken, 8), "{name}");
                    taken += 1;
                }
                other => break other,
            }
        };
        assert!(opened.elapsed() >= deadline, "{name}: ended before its deadline");
        assert_eq!(end, Some(Err(CallError::Timeout { after: deadline })), "{name}: after {taken} items");
    });
}
