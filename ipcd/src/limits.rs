//! What the open sessions may cost together: the memory budget
//! (`--max-shm`) and the live sessions of each uid
//! (`--max-sessions-per-uid`).
//!
//! The acceptor asks for a [`Lease`] before it creates anything for a
//! session, naming the session's uid (none over TCP) and its worst-case
//! memory; the session holds the lease for its whole life and dropping it,
//! wherever the session ends, gives both back. So a client over a limit
//! costs the daemon no segment, and nothing is charged for a session that
//! is gone.
//!
//! What a session is charged, in bytes:
//!
//! - shared memory: its segment (header page and both rings, allocated in
//!   full at creation), plus one maximum payload for the reply that waits on
//!   the heap while the client leaves its response ring full;
//! - a stream: its input and output buffers at their bound
//!   ([`crate::stream_session::buffer_bound`]).
//!
//! Beyond what a session costs for its whole life, what it holds for a
//! while is charged against the same budget as it holds it (a [`Charge`]):
//! a request longer than a frame while it is assembled, a reply longer
//! than a frame until it is sent, a stream's items until they are sent. A
//! message whose charge would pass the budget is refused, for that call
//! alone: a request with `MessageTooLarge` (not run), a reply with
//! `ReplyTooLarge` (its handler ran).
//!
//! The segment pool (see [`crate::segment_pool`]) is charged too: each
//! segment it holds ready counts against the budget as a [`Charge`] of the
//! segment's size, until a session takes it (the charge becomes part of
//! the session's lease) or the pool gives it up. [`Limits::in_use`] is the
//! sessions' part, [`Limits::pooled`] the pool's.
//!
//! Not charged: kernel socket buffers and the fds, a worker's scratch
//! buffers (one set per worker, not per session), and the bookkeeping of a
//! few hundred bytes per session. The budget bounds what clients can make
//! the daemon allocate, not its whole footprint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use ipc_core::{Reject, SegmentLayout};
use mio::Waker;

/// Why a session was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The uid already has the most sessions one uid may have.
    Uid { uid: u32, max: usize },
    /// The session would take the memory in use past the budget.
    Memory { needed: u64, in_use: u64, budget: u64 },
}

impl Refusal {
    /// The answer the client gets.
    pub(crate) fn to_reject(&self) -> Reject {
        match *self {
            Refusal::Uid { uid, max } => Reject::TooManySessionsForUid { uid, max: saturate(max) },
            Refusal::Memory { needed, in_use, budget } => Reject::OverMemoryBudget { needed, in_use, budget },
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The budget and the counts, shared by the acceptor (which charges) and
/// the workers (whose sessions give back). A reload may change the budget
/// and the limit per uid: what is charged already stays charged, and a
/// lower limit refuses new sessions until enough have closed.
#[derive(Debug)]
pub(crate) struct Limits {
    budget: AtomicU64,
    in_use: AtomicU64,
    /// The part of `in_use` the segment pool holds.
    pooled: AtomicU64,
    max_per_uid: AtomicUsize,
    /// Live sessions per uid; a uid with none has no entry.
    per_uid: Mutex<HashMap<u32, usize>>,
    /// Set while the acceptor holds hellos refused by their uid's limit:
    /// a slot given back then sets `freed` and rings the acceptor.
    watching: AtomicBool,
    freed: AtomicBool,
    slot_waker: OnceLock<Arc<Waker>>,
}

impl Limits {
    pub(crate) fn new(budget: u64, max_per_uid: usize) -> Limits {
        Limits {
            budget: AtomicU64::new(budget),
            in_use: AtomicU64::new(0),
            pooled: AtomicU64::new(0),
            max_per_uid: AtomicUsize::new(max_per_uid),
            per_uid: Mutex::default(),
            watching: AtomicBool::new(false),
            freed: AtomicBool::new(false),
            slot_waker: OnceLock::new(),
        }
    }

    /// Sets what a slot given back rings while the acceptor watches.
    pub(crate) fn set_slot_waker(&self, waker: Arc<Waker>) {
        let _ = self.slot_waker.set(waker);
    }

    /// Starts or stops the watch for slots given back (see `watching`).
    pub(crate) fn watch_slots(&self, on: bool) {
        // SeqCst with the load in `give_back_slot`: a slot given back
        // after the watch starts either sees it and rings, or was given
        // back before, and the acceptor's next look at the limit finds it.
        self.watching.store(on, Ordering::SeqCst);
    }

    /// Whether a slot was given back while watched, clearing the mark.
    pub(crate) fn take_freed(&self) -> bool {
        // Relaxed: a hint to look again; the look itself takes the lock.
        self.freed.swap(false, Ordering::Relaxed)
    }

    /// Sets the budget and the limit per uid (a reload, on the acceptor's
    /// thread, which is the one that charges).
    pub(crate) fn set(&self, budget: u64, max_per_uid: usize) {
        // Relaxed: each is a value on its own; a charge racing with the
        // change is judged by the old value or the new.
        self.budget.store(budget, Ordering::Relaxed);
        self.max_per_uid.store(max_per_uid, Ordering::Relaxed);
    }

    /// The memory budget, in bytes.
    pub(crate) fn budget(&self) -> u64 {
        // Relaxed: see `set`.
        self.budget.load(Ordering::Relaxed)
    }

    /// What the live sessions are charged, in bytes (the segment pool's
    /// part left out: see [`Limits::pooled`]).
    pub(crate) fn in_use(&self) -> u64 {
        // Relaxed: figures for `stats`, each read on its own; a pooled
        // segment taken between the two loads is briefly counted in
        // neither, never twice.
        let pooled = self.pooled();
        self.in_use.load(Ordering::Relaxed).saturating_sub(pooled)
    }

    /// What the segments the pool holds ready are charged, in bytes.
    pub(crate) fn pooled(&self) -> u64 {
        // Relaxed: see `in_use`.
        self.pooled.load(Ordering::Relaxed)
    }

    /// The most live sessions one uid may have.
    pub(crate) fn max_per_uid(&self) -> usize {
        // Relaxed: see `set`.
        self.max_per_uid.load(Ordering::Relaxed)
    }

    /// The live sessions of each uid that has some.
    pub(crate) fn per_uid(&self) -> Vec<(u32, usize)> {
        self.per_uid.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(&u, &n)| (u, n)).collect()
    }

    /// Charges a session of `uid` (none over TCP, which carries no
    /// credentials and counts against no uid) `bytes` of memory, or says
    /// which limit it would pass. Nothing is charged on refusal.
    pub(crate) fn lease(self: &Arc<Self>, uid: Option<u32>, bytes: u64) -> Result<Lease, Refusal> {
        if let Some(uid) = uid {
            let mut per_uid = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            let max = self.max_per_uid();
            let count = per_uid.entry(uid).or_insert(0);
            if *count >= max {
                return Err(Refusal::Uid { uid, max });
            }
            *count += 1;
        }
        // Relaxed: the word is a count, not a guard for other memory; its
        // read-modify-writes are totally ordered among themselves, so two
        // charges can never both fit into the last room.
        let budget = self.budget();
        let charged = self.in_use.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |in_use| {
            in_use.checked_add(bytes).filter(|&total| total <= budget)
        });
        match charged {
            Ok(_) => Ok(Lease { limits: Arc::clone(self), uid, bytes }),
            Err(in_use) => {
                if let Some(uid) = uid {
                    self.give_back_slot(uid);
                }
                Err(Refusal::Memory { needed: bytes, in_use, budget })
            }
        }
    }

    /// As [`Limits::lease`], for a session that takes a pooled segment
    /// whose charge is `held`: only what the lease needs beyond it is
    /// charged anew, and the lease then holds both. On refusal `held` is
    /// handed back, still charged.
    pub(crate) fn lease_with(
        self: &Arc<Self>,
        uid: Option<u32>,
        bytes: u64,
        mut held: PoolCharge,
    ) -> Result<Lease, (Refusal, PoolCharge)> {
        match self.lease(uid, bytes.saturating_sub(held.bytes)) {
            Ok(mut lease) => {
                // Relaxed: see `lease`; the bytes stay in `in_use`, they
                // only change hands.
                self.pooled.fetch_sub(held.bytes, Ordering::Relaxed);
                lease.bytes += std::mem::take(&mut held.bytes);
                Ok(lease)
            }
            Err(refusal) => Err((refusal, held)),
        }
    }

    /// Charges a segment of `bytes` the pool is to hold, if the budget
    /// then still has room for `headroom` bytes more: the pool never takes
    /// the last room a session could have. `None` otherwise.
    pub(crate) fn charge_pooled(self: &Arc<Self>, bytes: u64, headroom: u64) -> Option<PoolCharge> {
        // Relaxed: see `lease`.
        let budget = self.budget();
        let charged = self.in_use.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |in_use| {
            in_use.checked_add(bytes).filter(|&total| total.saturating_add(headroom) <= budget)
        });
        charged.ok()?;
        // Relaxed: a figure for `stats`.
        self.pooled.fetch_add(bytes, Ordering::Relaxed);
        Some(PoolCharge { limits: Arc::clone(self), bytes })
    }

    /// Charges `bytes` held for a while (a message being assembled, a
    /// reply waiting to be sent), or `None` if that would pass the budget.
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        self.take(bytes).then(|| Charge { limits: Arc::clone(self), bytes })
    }

    /// Adds `bytes` to what is in use if that stays within the budget.
    fn take(&self, bytes: u64) -> bool {
        // Relaxed: see `lease`.
        let budget = self.budget();
        self.in_use
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |in_use| {
                in_use.checked_add(bytes).filter(|&total| total <= budget)
            })
            .is_ok()
    }

    fn give_back_slot(&self, uid: u32) {
        let mut per_uid = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_uid.get_mut(&uid) {
            *count -= 1;
            if *count == 0 {
                per_uid.remove(&uid);
            }
        }
        drop(per_uid);
        // SeqCst: see `watch_slots`.
        if self.watching.load(Ordering::SeqCst) {
            // Relaxed: see `take_freed`.
            self.freed.store(true, Ordering::Relaxed);
            if let Some(waker) = self.slot_waker.get() {
                let _ = waker.wake();
            }
        }
    }
}

/// What one live session is charged; dropping it gives that back.
#[derive(Debug)]
pub(crate) struct Lease {
    limits: Arc<Limits>,
    uid: Option<u32>,
    bytes: u64,
}

impl Lease {
    /// Takes the memory part of the lease out as a [`Charge`], leaving
    /// the uid's slot: a closing session gives its slot back at once and
    /// its memory when its mapping is unmapped (see
    /// [`crate::segment_pool::Retirer`]).
    pub(crate) fn take_memory(&mut self) -> Charge {
        Charge { limits: Arc::clone(&self.limits), bytes: std::mem::take(&mut self.bytes) }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Relaxed: see `Limits::lease`.
        self.limits.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(uid) = self.uid {
            self.limits.give_back_slot(uid);
        }
    }
}

/// What a segment the pool holds is charged; dropping it gives that back.
#[derive(Debug)]
pub(crate) struct PoolCharge {
    limits: Arc<Limits>,
    bytes: u64,
}

impl Drop for PoolCharge {
    fn drop(&mut self) {
        // Relaxed: see `Limits::lease`.
        self.limits.pooled.fetch_sub(self.bytes, Ordering::Relaxed);
        self.limits.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Memory held for a while, charged against the budget; dropping it gives
/// it back.
#[derive(Debug)]
pub(crate) struct Charge {
    limits: Arc<Limits>,
    bytes: u64,
}

impl Charge {
    /// Charges `more` bytes on top, if the budget has room; otherwise
    /// charges nothing and returns false.
    pub(crate) fn grow(&mut self, more: u64) -> bool {
        let grown = self.limits.take(more);
        if grown {
            self.bytes += more;
        }
        grown
    }

    /// The bytes charged.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        // Relaxed: see `Limits::lease`.
        self.limits.in_use.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What a shared-memory session with `layout` is charged: its segment and
/// one reply waiting on the heap.
pub(crate) fn shm_charge(layout: &SegmentLayout) -> u64 {
    layout.segment_size() as u64 + u64::from(layout.max_payload())
}

/// What a stream session whose frames carry at most `max_payload` bytes is
/// charged: its buffers at their bound.
pub(crate) fn stream_charge(max_payload: u32) -> u64 {
    crate::stream_session::buffer_bound(max_payload as usize) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_charged_until_dropped() {
        let limits = Arc::new(Limits::new(1000, 10));
        let a = limits.lease(Some(1), 600).unwrap();
        assert_eq!(limits.in_use(), 600);
        assert_eq!(limits.lease(Some(2), 401).unwrap_err(), Refusal::Memory { needed: 401, in_use: 600, budget: 1000 });
        let b = limits.lease(None, 400).expect("exactly the budget fits");
        assert_eq!(limits.in_use(), 1000);
        drop(a);
        assert_eq!(limits.in_use(), 400);
        drop(b);
        assert_eq!(limits.in_use(), 0);
        assert!(limits.per_uid.lock().unwrap().is_empty(), "no uid entry outlives its sessions");
    }

    #[test]
    fn charges_share_the_budget_with_leases_and_grow_within_it() {
        let limits = Arc::new(Limits::new(1000, 10));
        let lease = limits.lease(Some(1), 600).unwrap();
        let mut held = limits.charge(300).expect("within the budget");
        assert!(limits.charge(101).is_none(), "past the budget");
        assert!(!held.grow(101), "a growth past the budget is refused");
        assert_eq!((held.bytes(), limits.in_use()), (300, 900));
        assert!(held.grow(100));
        assert_eq!((held.bytes(), limits.in_use()), (400, 1000));
        assert!(matches!(limits.lease(None, 1), Err(Refusal::Memory { .. })), "a charge holds budget like a lease");
        drop(held);
        drop(lease);
        assert_eq!(limits.in_use(), 0);
    }

    #[test]
    fn each_uid_has_its_own_count() {
        let limits = Arc::new(Limits::new(u64::MAX, 2));
        let held: Vec<Lease> = (0..2).map(|_| limits.lease(Some(1000), 1).unwrap()).collect();
        assert_eq!(limits.lease(Some(1000), 1).unwrap_err(), Refusal::Uid { uid: 1000, max: 2 });
        let other = limits.lease(Some(1001), 1).expect("another uid is not held back");
        let tcp: Vec<Lease> = (0..5).map(|_| limits.lease(None, 1).unwrap()).collect();
        drop(held);
        let again = limits.lease(Some(1000), 1).expect("a slot freed");
        assert_eq!(limits.in_use(), 7);
        drop((other, tcp, again));
        assert_eq!(limits.in_use(), 0);
    }

    #[test]
    fn a_refusal_by_memory_gives_the_uid_slot_back() {
        let limits = Arc::new(Limits::new(10, 1));
        assert!(matches!(limits.lease(Some(5), 11), Err(Refusal::Memory { .. })));
        let fits = limits.lease(Some(5), 10).expect("the refused attempt held no slot");
        assert_eq!(limits.lease(Some(5), 0).unwrap_err(), Refusal::Uid { uid: 5, max: 1 });
        drop(fits);
    }

    #[test]
    fn new_limits_refuse_new_sessions_and_leave_the_charged_ones() {
        let limits = Arc::new(Limits::new(1000, 3));
        let held: Vec<Lease> = (0..3).map(|_| limits.lease(Some(1), 100).unwrap()).collect();
        limits.set(250, 2);
        assert_eq!(limits.lease(Some(1), 1).unwrap_err(), Refusal::Uid { uid: 1, max: 2 });
        assert_eq!(limits.lease(Some(2), 1).unwrap_err(), Refusal::Memory { needed: 1, in_use: 300, budget: 250 });
        assert_eq!(limits.per_uid(), [(1, 3)], "a uid refused for memory keeps no entry");
        drop(held);
        assert!(limits.lease(Some(1), 250).is_ok());
    }

    #[test]
    fn the_pool_leaves_headroom_and_its_charge_passes_to_the_lease_that_takes_it() {
        let limits = Arc::new(Limits::new(1000, 1));
        assert!(limits.charge_pooled(300, 701).is_none(), "no room left for a session after it");
        let a = limits.charge_pooled(300, 700).expect("room for the segment and a session");
        let b = limits.charge_pooled(300, 100).unwrap();
        assert_eq!((limits.in_use(), limits.pooled()), (0, 600));
        let lease = limits.lease_with(Some(1), 350, a).expect("only 50 bytes more are charged");
        assert_eq!((limits.in_use(), limits.pooled()), (350, 300));
        let (refusal, b) = limits.lease_with(Some(1), 350, b).unwrap_err();
        assert_eq!(refusal, Refusal::Uid { uid: 1, max: 1 });
        assert_eq!((limits.in_use(), limits.pooled()), (350, 300), "a refused lease leaves the pool's charge");
        drop(b);
        drop(lease);
        assert_eq!((limits.in_use(), limits.pooled()), (0, 0));
    }

    #[test]
    fn refusals_name_the_limit_and_the_numbers() {
        let text = Refusal::Memory { needed: 3, in_use: 8, budget: 10 }.to_reject().to_string();
        assert!(text.contains("3 bytes") && text.contains("8 of 10 bytes") && text.contains("budget"), "{text}");
        let text = Refusal::Uid { uid: 7, max: 2 }.to_reject().to_string();
        assert!(text.contains("uid 7") && text.contains("2 sessions"), "{text}");
    }

    #[test]
    fn charges_cover_the_segment_and_a_waiting_reply_or_the_stream_buffers() {
        let layout = SegmentLayout::new(65536).unwrap();
        assert_eq!(shm_charge(&layout), (4096 + 2 * 65536 + 32752) as u64);
        assert!(stream_charge(32752) > 2 * 32752, "{}", stream_charge(32752));
    }
}
