//! Whether the server's loops turn: what a watchdog asks before it says
//! the server is alive.
//!
//! Each worker, and the acceptor, counts the turns of its loop: one
//! `Relaxed` add per turn, on a cache line of its own (no system call, and
//! no line another thread writes). A loop that is alive either turns or
//! sleeps in its poll; one stuck outside it (a handler that never returns)
//! does neither. A loop asleep in its poll with nothing to do does not
//! turn either, so [`Health::check`], after reading the counts, rings
//! every loop's waker: a live loop wakes and turns before the next check,
//! whatever it was doing, and a stuck one does not. So a check says
//! "stuck" for a loop that has not turned since the check before it, and
//! only for one that has spent that whole time outside its poll.
//!
//! The counts are `Relaxed`: a count is a sign of life, and nothing is
//! read through it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mio::Waker;

use crate::engine::Engine;

/// A loop of the server that did not turn between two checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Stuck {
    /// The worker with this index (its thread is `ipcd-worker-<index>`).
    #[error("worker {0} has not turned its loop since the last check (a handler that does not return?)")]
    Worker(usize),
    /// The acceptor.
    #[error("the acceptor has not turned its loop since the last check")]
    Acceptor,
}

/// Tells whether every loop of a running server (each worker's and the
/// acceptor's) still turns; given by [`Server::run_with_ready`]. See the
/// module docs for how.
///
/// [`Server::run_with_ready`]: crate::Server::run_with_ready
///
/// ```no_run
/// use std::time::Duration;
///
/// let server = ipcd::Server::builder().socket("/tmp/health-example.sock").build()?;
/// server.run_with_ready(|mut health| {
///     std::thread::spawn(move || {
///         while !health.is_stopping() {
///             std::thread::sleep(Duration::from_secs(5));
///             match health.check() {
///                 Ok(()) => { /* tell the watchdog the server is alive */ }
///                 Err(stuck) => eprintln!("{stuck}"),
///             }
///         }
///     });
/// })?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
#[derive(Clone)]
pub struct Health {
    engine: Arc<Engine>,
    /// The workers' wakers, in worker order, then the acceptor's.
    wakers: Vec<Arc<Waker>>,
    /// The counts the last check read, in the same order.
    last: Vec<u64>,
}

impl Health {
    /// Reads the counts and wakes every loop: the first check compares with
    /// these.
    pub(crate) fn new(engine: Arc<Engine>, workers: Vec<Arc<Waker>>, acceptor: Arc<Waker>) -> Health {
        let mut wakers = workers;
        wakers.push(acceptor);
        let mut health = Health { engine, last: Vec::new(), wakers };
        health.last = (0..health.wakers.len()).map(|i| health.turns(i)).collect();
        health.wake_all();
        health
    }

    fn turns(&self, i: usize) -> u64 {
        let stats = &self.engine.stats;
        match stats.workers.get(i) {
            Some(worker) => worker.turns.load(Ordering::Relaxed),
            None => stats.acceptor_turns.0.load(Ordering::Relaxed),
        }
    }

    fn wake_all(&self) {
        for (i, waker) in self.wakers.iter().enumerate() {
            if let Err(e) = waker.wake() {
                // The loop is not woken, so it will likely count as stuck
                // at the next check: say why.
                tracing::warn!("cannot wake loop {i} for the health check: {e}");
            }
        }
    }

    /// Whether every loop has turned since the previous check (for the
    /// first, since the server became ready); if not, which (the first
    /// found). Then wakes every loop, so that a live one turns before the
    /// next check even with nothing to do.
    ///
    /// Check no more often than a live loop can be expected to turn: a
    /// worker inside a handler does not turn until it returns, so a handler
    /// that runs longer than the time between two checks makes its worker
    /// count as stuck for a check.
    pub fn check(&mut self) -> Result<(), Stuck> {
        let workers = self.engine.stats.workers.len();
        let mut stuck = None;
        for i in 0..self.last.len() {
            let now = self.turns(i);
            if now == self.last[i] && stuck.is_none() {
                stuck = Some(if i < workers { Stuck::Worker(i) } else { Stuck::Acceptor });
            }
            self.last[i] = now;
        }
        self.wake_all();
        stuck.map_or(Ok(()), Err)
    }

    /// Whether the server has begun to stop (its loops then end, and stop
    /// turning).
    pub fn is_stopping(&self) -> bool {
        self.engine.shutting_down.load(Ordering::Acquire)
    }
}
