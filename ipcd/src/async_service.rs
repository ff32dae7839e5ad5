//! Async handlers (the `tokio` feature): a handler that returns a future,
//! run as a task on a tokio runtime the application supplies, and answered
//! through a [`Responder`] when the future ends.
//!
//! An async service is a deferred service: the worker calls the handler
//! with the call's [`OwnedRequest`] to make the future, spawns it on the
//! runtime and goes on; the task answers the call through the call's
//! responder from whichever runtime thread runs it. So calls complete in
//! the order their futures end, not the order they came, and everything
//! [`crate::deferred`] promises holds: one outcome per call, and at most
//! [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS) calls (hence
//! tasks) per session at once, past which the session takes no request
//! until one is answered. That cap is the bound on a session's concurrency:
//! a client cannot make the server spawn more tasks than it has calls
//! handed off.
//!
//! How each call ends:
//! - the future's `Ok(reply)` or `Err(ServiceError)` answers it;
//! - a panic while polling it is caught in the task and answers
//!   `HandlerPanicked` (the future is not polled again), as does a panic
//!   in the handler while it makes the future;
//! - a task dropped before its future ends (the runtime shut down, or the
//!   server stopped and cancelled it) answers `Unfinished`: whether the
//!   request took effect is unknown.
//!
//! A stop first waits for the tasks within its drain, then answers the
//! calls still running as unfinished; and when the last worker has
//! stopped, the tasks still running are aborted (as they are if the
//! service is dropped), so a future that never ends does not outlive the
//! server. Their answers go to no one.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::Poll;

use ipc_core::ErrorCode;
use slab::Slab;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::deferred::{Responder, PANICKED};
use crate::request::OwnedRequest;
use crate::service::{Handler, ServiceError};

/// The message of the answer to a call whose task was dropped before its
/// future ended.
const DROPPED: &str = "the async handler's task was dropped before it finished (its runtime shut down or the server \
                       stopped); whether the request took effect is unknown";

/// The handler that runs `handler`'s futures on `runtime`: deferred, and
/// cancelled (its tasks aborted) when the last worker stops.
pub(crate) fn handler<F, Fut>(runtime: Handle, handler: F) -> Handler
where
    F: Fn(OwnedRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
{
    let tasks = Arc::new(Tasks::default());
    let cancel = {
        let tasks = Arc::clone(&tasks);
        move || tasks.abort_all()
    };
    let deferred = move |request, responder| {
        // Made on the worker, with the responder still held here: a panic
        // now drops it as it unwinds, which answers `HandlerPanicked`.
        let future = handler(request);
        tasks.spawn(&runtime, future, Pending(Some(responder)));
    };
    Handler::Cancellable { handler: Arc::new(deferred), cancel: Arc::new(cancel) }
}

/// The tasks of one async service still running, so that they can be
/// aborted when the service is dropped.
#[derive(Default)]
struct Tasks {
    running: Mutex<Slab<AbortHandle>>,
}

impl Tasks {
    fn running(&self) -> MutexGuard<'_, Slab<AbortHandle>> {
        // A panic while the lock is held leaves the slab whole: every
        // operation on it is a single insert, remove or drain.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `future` on `runtime`, answering through `pending` when it ends.
    fn spawn<Fut>(self: &Arc<Tasks>, runtime: &Handle, future: Fut, pending: Pending)
    where
        Fut: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
    {
        let tasks = Arc::downgrade(self);
        // The lock is held until the task's abort handle is in: the task
        // takes it to remove its entry, so it never finds the entry absent.
        let mut running = self.running();
        let entry = running.vacant_entry();
        let key = entry.key();
        let task = runtime.spawn(run(future, pending, tasks, key));
        entry.insert(task.abort_handle());
    }

    /// Aborts every task still running: each is dropped at its next
    /// await point (at once if idle), which answers its call.
    fn abort_all(&self) {
        for task in self.running().drain() {
            task.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// One call's task: polls the future, catching a panic, then answers.
async fn run<Fut>(future: Fut, pending: Pending, tasks: Weak<Tasks>, key: usize)
where
    Fut: Future<Output = Result<Vec<u8>, ServiceError>>,
{
    let mut future = pin!(future);
    let outcome = poll_fn(|cx| match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(result)) => Poll::Ready(Some(result)),
        Err(_) => Poll::Ready(None),
    })
    .await;
    if let Some(tasks) = tasks.upgrade() {
        tasks.running().try_remove(key);
    }
    pending.answer(outcome);
}

/// A call's responder while its task runs: dropped unanswered (the task
/// dropped, or never run), it answers `Unfinished`.
struct Pending(Option<Responder>);

impl Pending {
    /// Answers with the future's result, or `None` for a future that
    /// panicked.
    fn answer(mut self, outcome: Option<Result<Vec<u8>, ServiceError>>) {
        let Some(responder) = self.0.take() else { return };
        match outcome {
            Some(Ok(reply)) => responder.reply(reply),
            Some(Err(error)) => responder.fail(error),
            None => {
                tracing::error!("async service handler panicked");
                responder.fail_with(ErrorCode::HandlerPanicked, PANICKED);
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(responder) = self.0.take() {
            responder.fail_with(ErrorCode::Unfinished, DROPPED);
        }
    }
}

/// The builder method that adds an async service, the same on
/// [`crate::ServerBuilder`] and [`crate::ProviderBuilder`] (expanded by
/// `service_methods!`).
macro_rules! async_service_method {
    () => {
        /// Adds a service whose handler returns a future (an `async` block,
        /// say), run as a task on the tokio `runtime` the application
        /// supplies; the future's result answers the call, from whichever
        /// runtime thread ends it. The handler itself is called on the
        /// worker thread to make the future, and should return at once.
        ///
        /// Calls complete in the order their futures end. A session has at
        /// most [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS) calls
        /// of blocking, deferred and async services unanswered, so at most
        /// that many of its tasks at once; past it, the session takes no
        /// further request until one is answered. A future that panics
        /// answers its call `HandlerPanicked`; a task dropped before its
        /// future ends (the runtime shut down) answers `Unfinished`. When the
        /// server stops, it waits for the tasks within its drain, then
        /// answers the calls still running as unfinished, and the tasks are
        /// aborted once it lets go of its services.
        ///
        /// Requires the `tokio` feature.
        ///
        /// ```no_run
        /// use ipcd::{Server, ServiceError};
        ///
        /// let runtime = tokio::runtime::Runtime::new().unwrap();
        /// let server = Server::builder()
        ///     .socket("/tmp/async.sock")
        ///     .async_service("later", runtime.handle().clone(), |request| async move {
        ///         tokio::task::yield_now().await; // ... await whatever it needs
        ///         if request.payload().is_empty() {
        ///             return Err(ServiceError::with_code(22, "empty request"));
        ///         }
        ///         Ok(request.into_payload())
        ///     })
        ///     .build()?;
        /// server.run()?;
        /// # Ok::<(), ipcd::ServerError>(())
        /// ```
        #[cfg(feature = "tokio")]
        pub fn async_service<F, Fut>(
            mut self,
            name: impl Into<String>,
            runtime: tokio::runtime::Handle,
            handler: F,
        ) -> Self
        where
            F: Fn($crate::OwnedRequest) -> Fut + Send + Sync + 'static,
            Fut: std::future::Future<Output = Result<Vec<u8>, $crate::ServiceError>> + Send + 'static,
        {
            self.services.push((name.into(), $crate::async_service::handler(runtime, handler)));
            self
        }
    };
}
pub(crate) use async_service_method;
