//! (Tests only.) What a worker lends the sessions it serves: the service
//! table, its counters, the end handed-off answers come back to, the
//! memory budget and the scratch buffers, for the unit tests of both kinds
//! of session (`session.rs`, `stream_session.rs`) and of the worker.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::deferred::{Completion, Completions, Event};
use crate::limits::Limits;
use crate::service::{ServiceTable, Serving};
use crate::session::Scratch;
use crate::stats::WorkerCounters;

/// See the module docs.
pub(crate) struct Rig {
    pub(crate) services: ServiceTable,
    pub(crate) counters: WorkerCounters,
    completions: Completions,
    pub(crate) answers: Receiver<Event>,
    limits: Arc<Limits>,
    _poll: mio::Poll,
    scratch: Scratch,
}

impl Rig {
    pub(crate) fn new(services: ServiceTable) -> Rig {
        let (completions, answers, poll) = crate::deferred::tests::completions();
        Rig {
            services,
            counters: WorkerCounters::default(),
            completions,
            answers,
            limits: Arc::new(Limits::new(u64::MAX, usize::MAX)),
            _poll: poll,
            scratch: Scratch::default(),
        }
    }

    /// A pass's serving context (a stop signalled or not) and the scratch
    /// buffers, as the worker lends them to one session's serve.
    pub(crate) fn lend(&mut self, shutting_down: bool) -> (Serving<'_>, &mut Scratch) {
        let with = Serving {
            services: &self.services,
            counters: &self.counters,
            completions: &self.completions,
            limits: &self.limits,
            max_message: crate::DEFAULT_MAX_MESSAGE,
            shutting_down,
        };
        (with, &mut self.scratch)
    }

    /// The next answer to come back, waiting for it (under a watchdog).
    pub(crate) fn answer(&self) -> Completion {
        loop {
            match self.answers.recv_timeout(std::time::Duration::from_secs(60)).expect("an answer") {
                Event::Answer(a) => return a,
                Event::Stream { .. } => continue,
            }
        }
    }

    /// What the sessions' messages are charged against.
    pub(crate) fn limits(&self) -> Arc<Limits> {
        Arc::clone(&self.limits)
    }
}
