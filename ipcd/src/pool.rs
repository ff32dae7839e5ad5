//! The handler threads: a fixed number of threads that run the blocking
//! services' handlers, so a handler that takes its time holds up neither
//! its worker nor the other sessions and services.
//!
//! A worker hands a call over as a job that owns a copy of the request and
//! its [`Responder`](crate::Responder); the job runs the handler and
//! answers through the responder, which brings the answer back to the
//! worker. The queue is not bounded of itself: each session has at most
//! [`MAX_OUTSTANDING_CALLS`](crate::MAX_OUTSTANDING_CALLS) calls handed
//! off, and there are at most `--max-clients` sessions.
//!
//! The threads start with the workers, if any service needs them, and stop
//! when the last worker has stopped: jobs still queued then are dropped
//! (their sessions are gone) and the threads finish the handlers they run.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// A handler's run, with the responder it answers through.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// The default number of handler threads: more than the cores of most
/// machines, since blocking handlers mostly wait (on disk, the network, a
/// lock), and few enough to cost little when they are idle.
pub const DEFAULT_HANDLER_THREADS: usize = 8;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    /// The queue, whether or not a thread panicked holding it: it is only
    /// ever pushed to and popped from, which leave it whole.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handler threads; see the module docs.
pub(crate) struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// A pool of `threads` threads, not started.
    pub(crate) fn new(threads: usize) -> Pool {
        Pool { threads, shared: Arc::default(), handles: Mutex::new(Vec::new()) }
    }

    /// Starts the threads (once).
    pub(crate) fn start(&self) -> io::Result<()> {
        let mut handles = self.handles.lock().unwrap_or_else(PoisonError::into_inner);
        while handles.len() < self.threads {
            let shared = Arc::clone(&self.shared);
            let name = format!("ipcd-handler-{}", handles.len());
            match std::thread::Builder::new().name(name).spawn(move || run(&shared)) {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    drop(handles);
                    self.stop();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Queues `job` for the next free thread; once stopping, drops it.
    pub(crate) fn submit(&self, job: Job) {
        let mut queue = self.shared.lock();
        if queue.stopping {
            // Dropped outside the lock: its responder answers as it drops.
            drop(queue);
            drop(job);
            return;
        }
        queue.jobs.push_back(job);
        drop(queue);
        self.shared.ready.notify_one();
    }

    /// Drops the jobs not yet started, and waits for the threads to finish
    /// the ones they run.
    pub(crate) fn stop(&self) {
        let dropped = {
            let mut queue = self.shared.lock();
            queue.stopping = true;
            std::mem::take(&mut queue.jobs)
        };
        drop(dropped);
        self.shared.ready.notify_all();
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!("a handler thread panicked");
            }
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.lock();
            loop {
                if queue.stopping {
                    return;
                }
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                queue = shared.ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        // A job catches its handler's panics and answers for them; this
        // keeps the thread should anything else in it panic.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn jobs_run_on_the_threads_side_by_side_and_stop_drops_the_queued() {
        let pool = Pool::new(2);
        pool.start().unwrap();
        let (started_tx, started) = channel();
        let (release_tx, release) = channel::<()>();
        let release = Arc::new(Mutex::new(release));
        // Two jobs that block until released: both run at once.
        for i in 0..2 {
            let (started_tx, release) = (started_tx.clone(), Arc::clone(&release));
            pool.submit(Box::new(move || {
                started_tx.send(i).unwrap();
                let _ = release.lock().unwrap().recv();
            }));
        }
        let mut seen = [started.recv().unwrap(), started.recv().unwrap()];
        seen.sort_unstable();
        assert_eq!(seen, [0, 1]);
        // A third waits in the queue while both threads are busy; stopping
        // drops it (its sender with it) and waits for the two.
        let (never_tx, never) = channel::<()>();
        pool.submit(Box::new(move || never_tx.send(()).unwrap()));
        let stopper = std::thread::spawn({
            let release_tx = release_tx.clone();
            move || {
                // The running two are released only once `stop` has
                // dropped the queued one (its sender with it) unrun.
                assert!(never.recv().is_err(), "a queued job ran after the stop");
                release_tx.send(()).unwrap();
                release_tx.send(()).unwrap();
            }
        });
        pool.stop();
        stopper.join().unwrap();
        drop(release_tx);
        // After the stop a job is dropped, not run.
        let (after_tx, after) = channel::<()>();
        pool.submit(Box::new(move || after_tx.send(()).unwrap()));
        assert!(after.recv().is_err());
    }
}
