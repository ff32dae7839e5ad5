//! Segments made ready before they are asked for (`--segment-pool N`).
//!
//! Creating a session's segment (memfd, allocation, seals, a pre-faulted
//! mapping, the header) and its doorbell eventfd is most of what a
//! shared-memory connect costs the daemon. A thread of its own keeps up to
//! N of them ready, of the ring capacity a client asks for by default, and
//! the acceptor takes one for a hello that asks for that capacity; the
//! thread then makes the next. A hello that finds the pool empty, or asks
//! for another capacity, gets a segment made there and then, as without
//! a pool.
//!
//! A pooled segment is new: no client has seen it. A segment is handed to
//! one session only and never comes back: its client can keep the mapping
//! (or the memfd) for as long as it likes after the session ends, so a
//! segment used again would show the next client's calls to the last one
//! and let it write into them. Clearing it would not help; only a segment
//! no one else has ever received is private.
//!
//! Each pooled segment is charged against the memory budget (see
//! [`crate::limits`]) while it waits, and the pool never takes the room
//! one more default session would need. A session refused for memory while
//! the pool holds segments has them given up and is judged again, so the
//! pool never stands between a client and the budget.
//!
//! The thread also unmaps the daemon's side of closed sessions' segments
//! ([`Retirer::retire`]): an unmap costs the worker that closes a
//! session as much as the mapping did, and nothing waits for it.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ipc_core::{DoorbellKind, Retained, SegmentLayout};

use crate::limits::{self, Charge, Limits, PoolCharge};
use crate::segment::NewSegment;

/// A closed session's mapping, and the memory it is charged, to be let
/// go in that order.
pub(crate) struct Retired {
    _mapping: Retained,
    _charge: Option<Charge>,
}

impl Retired {
    pub(crate) fn new(mapping: Retained, charge: Option<Charge>) -> Retired {
        Retired { _mapping: mapping, _charge: charge }
    }
}

/// A segment the pool holds, and its charge.
pub(crate) struct Pooled {
    pub(crate) segment: NewSegment,
    pub(crate) charge: PoolCharge,
}

/// See the module docs.
pub(crate) struct SegmentPool {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

struct Inner {
    /// The ring capacity of the segments it makes.
    capacity: u32,
    /// How many it keeps ready.
    target: usize,
    limits: Arc<Limits>,
    state: Mutex<State>,
    /// Rung when a segment is taken or given up, a mapping is retired, or
    /// the pool stops.
    wanted: Condvar,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Pooled>,
    /// Closed sessions' mappings, to unmap.
    retired: Vec<Retired>,
    /// Set by a session refused for memory: no segment is made until one
    /// is taken or a session's mapping comes back, so the pool does not
    /// take back the room it gave.
    held_back: bool,
    stopping: bool,
}

impl SegmentPool {
    /// Starts the pool's thread, keeping `target` segments with rings of
    /// `capacity` bytes ready; with a `target` of 0, no thread and no
    /// pool (closed sessions' mappings are then unmapped where they close).
    pub(crate) fn start(capacity: u32, target: usize, limits: Arc<Limits>) -> io::Result<SegmentPool> {
        let inner = Arc::new(Inner { capacity, target, limits, state: Mutex::default(), wanted: Condvar::new() });
        let thread = if target == 0 {
            None
        } else {
            let inner = Arc::clone(&inner);
            Some(std::thread::Builder::new().name("ipcd-segments".into()).spawn(move || inner.run())?)
        };
        Ok(SegmentPool { inner, thread })
    }

    /// A ready segment with rings of `capacity` bytes, if the pool has one.
    pub(crate) fn take(&self, capacity: u32) -> Option<Pooled> {
        if capacity != self.inner.capacity || self.thread.is_none() {
            return None;
        }
        let mut state = self.inner.lock();
        let taken = state.ready.pop_front();
        state.held_back = false;
        drop(state);
        self.inner.wanted.notify_one();
        taken
    }

    /// Puts back a segment taken for a session that was then refused; no
    /// client has seen it.
    pub(crate) fn put_back(&self, pooled: Pooled) {
        self.inner.lock().ready.push_front(pooled);
    }

    /// Gives up every ready segment and their charges, for a session
    /// refused for memory. Returns whether there were any.
    pub(crate) fn give_way(&self) -> bool {
        let mut state = self.inner.lock();
        state.held_back = true;
        let given: VecDeque<Pooled> = std::mem::take(&mut state.ready);
        drop(state);
        let any = !given.is_empty();
        // Unmapped and uncharged here: the caller judges the session again
        // at once.
        drop(given);
        any
    }

    /// A handle for the workers to retire mappings with.
    pub(crate) fn retirer(&self) -> Retirer {
        Retirer { inner: Arc::clone(&self.inner), threaded: self.thread.is_some() }
    }

    /// How many segments are ready.
    #[cfg(test)]
    fn ready(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// Stops the thread, unmapping what it holds.
    pub(crate) fn stop(&mut self) {
        self.inner.lock().stopping = true;
        self.inner.wanted.notify_one();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("segment pool thread panicked");
            }
        }
        let mut state = self.inner.lock();
        state.ready.clear();
        state.retired.clear();
    }
}

impl Drop for SegmentPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Retires closed sessions' mappings to the pool's thread; held by the
/// workers.
#[derive(Clone)]
pub(crate) struct Retirer {
    inner: Arc<Inner>,
    threaded: bool,
}

impl Retirer {
    /// Hands the daemon's mapping of a closed session's segment to the
    /// pool's thread to unmap; without the thread (or once it stops) it is
    /// unmapped here.
    pub(crate) fn retire(&self, region: Retired) {
        if !self.threaded {
            return drop(region);
        }
        let mut state = self.inner.lock();
        if state.stopping {
            drop(state);
            return drop(region);
        }
        state.retired.push(region);
        state.held_back = false;
        drop(state);
        self.inner.wanted.notify_one();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the thread does: unmaps what was retired, and makes segments
    /// until `target` are ready (or the budget has no room), then sleeps
    /// until rung.
    fn run(&self) {
        let Ok(layout) = SegmentLayout::new(self.capacity) else { return };
        let bytes = layout.segment_size() as u64;
        // Room for one more default session is always left.
        let headroom = limits::shm_charge(&layout);
        let mut state = self.lock();
        loop {
            if state.stopping {
                return;
            }
            if !state.retired.is_empty() {
                let retired = std::mem::take(&mut state.retired);
                drop(state);
                drop(retired);
                state = self.lock();
                continue;
            }
            if state.ready.len() >= self.target || state.held_back {
                state = self.wanted.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(state);
            let made = self.make(bytes, headroom);
            state = self.lock();
            match made {
                Some(pooled) => state.ready.push_back(pooled),
                // Out of budget (or of memory or fds): wait for a segment
                // to be taken or a session to end.
                None => state.held_back = true,
            }
        }
    }

    /// A new segment and its charge, or `None` if the budget has no room
    /// for it or making it failed.
    fn make(&self, bytes: u64, headroom: u64) -> Option<Pooled> {
        let charge = self.limits.charge_pooled(bytes, headroom)?;
        match NewSegment::create(self.capacity, DoorbellKind::Futex) {
            Ok(segment) => Some(Pooled { segment, charge }),
            Err(e) => {
                tracing::warn!("cannot make a segment for the pool: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < until, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_pool_fills_is_charged_and_gives_way() {
        let layout = SegmentLayout::new(4096).unwrap();
        let limits = Arc::new(Limits::new(u64::MAX, 10));
        let mut pool = SegmentPool::start(4096, 3, Arc::clone(&limits)).unwrap();
        wait_for("three ready", || pool.ready() == 3);
        assert_eq!(limits.pooled(), 3 * layout.segment_size() as u64);
        assert!(pool.take(8192).is_none(), "another capacity is not pooled");
        let taken = pool.take(4096).expect("a ready segment");
        assert_eq!(taken.segment.layout.capacity(), 4096);
        wait_for("the pool to fill again", || pool.ready() == 3);
        assert!(pool.give_way());
        assert_eq!(pool.ready(), 0);
        assert_eq!(limits.pooled(), layout.segment_size() as u64, "only the taken one is still charged");
        drop(taken);
        assert_eq!((limits.pooled(), limits.in_use()), (0, 0));
        pool.stop();
    }

    #[test]
    fn the_pool_leaves_room_for_a_session() {
        let layout = SegmentLayout::new(4096).unwrap();
        let per_segment = layout.segment_size() as u64;
        // Room for two pooled segments and one session after them.
        let budget = 2 * per_segment + limits::shm_charge(&layout) + per_segment / 2;
        let limits = Arc::new(Limits::new(budget, 10));
        let mut pool = SegmentPool::start(4096, 5, Arc::clone(&limits)).unwrap();
        wait_for("two ready", || pool.ready() == 2);
        let session = limits.lease(Some(1), limits::shm_charge(&layout)).expect("room left for a session");
        assert_eq!(pool.ready(), 2, "the pool stops short of the budget");
        drop(session);
        pool.stop();
        assert_eq!(limits.pooled(), 0);
    }
}
