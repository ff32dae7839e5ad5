//! A provider (`ipcd::Provider`) on a thread of the test, registered with
//! a daemon under test, for tests whose handlers report to the test
//! through channels and counters. Included by path
//! (`#[path = "common/in_process.rs"]`) by the test files that use it;
//! providers in processes of their own, which a test can kill, are in
//! `procs`.

#![allow(dead_code)]

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipcd::{Provider, ProviderBuilder, ProviderError, ShutdownHandle};

/// How long a stopped provider may take to return from `run` (a watchdog,
/// not a bound).
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A running provider. Dropping it stops it and waits for it.
pub struct InProcess {
    stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), ProviderError>>>,
}

impl InProcess {
    /// Registers a provider with the daemon at `socket`, with one worker
    /// and the services `configure` adds, and runs it on a thread.
    ///
    /// # Panics
    ///
    /// Panics if the daemon refuses it.
    pub fn start(socket: &Path, configure: impl FnOnce(ProviderBuilder) -> ProviderBuilder) -> InProcess {
        let builder = Provider::builder().socket(socket).workers(1).connect_timeout(Duration::from_secs(10));
        let provider = configure(builder).connect().expect("the provider registers");
        let stop = provider.shutdown_handle();
        let thread = std::thread::Builder::new().name("provider".into()).spawn(move || provider.run()).unwrap();
        InProcess { stop, thread: Some(thread) }
    }

    /// Asks the provider to stop, without waiting.
    pub fn begin_stop(&self) {
        self.stop.shutdown();
    }

    /// Stops the provider and returns what `run` returned.
    ///
    /// # Panics
    ///
    /// Panics if it does not return within [`STOP_LIMIT`].
    pub fn stop(&mut self) -> Result<(), ProviderError> {
        self.stop.shutdown();
        let thread = self.thread.take().expect("stopped once");
        let deadline = Instant::now() + STOP_LIMIT;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "the provider did not stop within {STOP_LIMIT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().expect("the provider thread panicked")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            self.stop().expect("the provider ran");
        } else {
            self.stop.shutdown();
        }
    }
}
