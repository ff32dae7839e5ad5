//! What the async client's tests share: a runtime of two workers, a
//! daemon and an async client over a named transport under the watchdog,
//! a future dropped after a given number of polls, and a seeded
//! generator. Included by the tests that need it (`#[path]`), beside
//! `common`.

#![allow(dead_code)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ipc_client::{AsyncClient, ClientOptions, Transport};

use super::common::{start_with_streams, watchdog, TEST_LIMIT};

/// A multi-threaded runtime of two workers, with its timers and I/O.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// 4 KiB rings and no spinning: every wait goes through the doorbell.
pub fn tiny() -> ClientOptions {
    ClientOptions::default().ring_capacity(4096).spin(Duration::ZERO)
}

/// How long a wait for the reply to a small message may take before it
/// counts as a lost wake-up: a round trip takes microseconds, so a wait
/// that lasts this long slept through its wake-up.
pub const WAKE_LIMIT: Duration = Duration::from_secs(5);

/// `fut`, failing the test if it is not done within [`WAKE_LIMIT`].
/// The limit is checked before `fut` is polled: a future whose wake-up
/// was lost is polled again when a call timeout fires, finds its reply
/// and would pass late, so a call's own timeout cannot catch it.
pub async fn woken<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::select! {
        biased;
        () = tokio::time::sleep(WAKE_LIMIT) => panic!("{what}: not woken within {WAKE_LIMIT:?}: a lost wake-up"),
        out = fut => out,
    }
}

/// Runs `body` with a daemon (started with `args`) and an async client
/// over `name`, on a runtime of two workers, under the watchdog.
pub fn with_async<F, Fut>(name: &'static str, args: &[&str], options: ClientOptions, body: F)
where
    F: FnOnce(AsyncClient, Transport) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (_daemon, ends) = start_with_streams(args);
    let transport: Transport = ends.transport(name);
    watchdog(TEST_LIMIT, move || {
        runtime().block_on(async move {
            let client = AsyncClient::connect_with(transport.clone(), options).await.expect("connect");
            body(client, transport).await;
        })
    });
}

/// Polls the inner future at most `polls` times, then drops it.
pub struct DropAfter<F> {
    inner: Option<Pin<Box<F>>>,
    polls: u32,
}

impl<F: Future> DropAfter<F> {
    /// `inner`, dropped after `polls` polls unless it is ready first.
    pub fn new(inner: F, polls: u32) -> DropAfter<F> {
        DropAfter { inner: Some(Box::pin(inner)), polls }
    }
}

impl<F: Future> Future for DropAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.polls -= 1;
        let inner = self.inner.as_mut().expect("polled after completion");
        match inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A small xorshift generator, seeded.
pub fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
