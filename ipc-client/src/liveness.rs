//! The liveness watcher: one thread per process that sleeps in epoll on
//! the control connection of every shared-memory link with a futex
//! doorbell, and wakes that link's sleeper when its peer hangs up. A
//! client asleep on its futex words is then told of a dead daemon or
//! provider at once, and an idle one never wakes to look.
//!
//! (A link with a pollable doorbell needs none of this: its wait polls
//! the control connection beside the bell.)
//!
//! # Protocol
//!
//! Words: the link's `alarm` (process memory; written once, by the
//! watcher) and the ring words a client sleeps on (the response ring's
//! data waiter, the request ring's space waiter; shared memory).
//!
//! - The sleeper announces its sleep in the ring (stores 1 in a waiter
//!   word, then the ring's `SeqCst` fence), then reads `alarm`, and only
//!   if it is clear sleeps on the words while they hold 1.
//! - The watcher, on the connection's hang-up (or any byte on it: the
//!   peer never writes there), stores `alarm` (`SeqCst`), then swaps both
//!   waiter words to 0 (`SeqCst`) and futex-wakes each. (Of many links
//!   found at once, every link's store and swaps come before the first
//!   wake; each link's order is the same.)
//!
//! Why no wake-up is lost (`SYNC(liveness-alarm)`): the sleeper's fence
//! and the watcher's `SeqCst` store and swaps are in one total order. If
//! the sleeper's read of `alarm` comes first in it, its store of 1 is
//! before the watcher's swap, which then reads 1, clears it and wakes: the
//! futex wait either sees 0 and returns, or is queued before the wake and
//! is woken. Otherwise the read sees the alarm and the sleeper does not
//! sleep. A woken sleeper returns from its wait; the next wait (or the
//! next pass of the same one) reads the alarm and settles the link.
//!
//! The swap clears the client's own announcement, which the peer (gone)
//! would otherwise have cleared; a sleeper that wakes withdraws it anyway.
//!
//! # One wake for a dead daemon's every sleeper
//!
//! A daemon that dies hangs up all its links at once, and a thousand
//! sleepers woken one after another by this thread would be woken
//! slowly: each woken thread takes the core from it. So a sleeper sleeps
//! (`futex_waitv`) on its ring words and on the process's [`rounds`]
//! word too, expecting the value it read before it read its alarms. The
//! watcher, once it has raised every alarm it found (store and swaps),
//! adds one to `rounds` (`SeqCst`) and wakes every sleeper on it with one
//! call. Only a kernel without `futex_waitv` (before 5.16), where a
//! sleeper sleeps on one ring word alone, has the watcher futex-wake each
//! link's words as well. Before raising anything it takes every hang-up
//! already reported, so that one round covers as many as it can: a woken
//! thread takes the core from the watcher, and a thousand of them keep it
//! from its next round for as long as they run.
//!
//! Why no such sleeper is left asleep (`SYNC(liveness-rounds)`): it reads
//! `rounds`, then its alarm, in that order and `SeqCst`. If it found its
//! alarm clear, that read is before the watcher's store of the alarm, so
//! its read of `rounds` is before the watcher's increment: the value it
//! expects is stale by the time of the wake, and `futex_waitv` either
//! finds the word changed or is queued before the wake-all.
//!
//! Registration is one-shot: a connection found ready is reported once.
//! A link removes its registration before its connection closes (the
//! watch borrows the fd, never owns or copies it, so the peer sees the
//! client's hang-up when the link drops, as before).
//!
//! If the thread cannot be started, or its epoll fails, links are not
//! watched and waits look at their peers every [`crate::wait`] slice, as
//! they would without the watcher.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ipc_core::{Direction, SharedWords, Waiter};
use ipc_platform::HangupWatch;

/// What the watcher knows of one link.
struct Alarm {
    /// Set once the link's control connection was found hung up (or
    /// readable).
    rung: AtomicBool,
    /// The link's segment words, for the waiter words it sleeps on.
    words: SharedWords,
}

impl Alarm {
    /// The watcher's half of the protocol in the module docs, but the
    /// futex wakes, which [`Alarm::wake`] makes after.
    fn raise(&self) {
        // SYNC(liveness-alarm): SeqCst, in one order with the sleeper's
        // fence after its announcement; see the module docs.
        self.rung.store(true, Ordering::SeqCst);
        self.clear();
    }

    /// Clears both waiter words the sleeper may sleep on.
    fn clear(&self) {
        for word in self.words_slept_on() {
            // SYNC(liveness-alarm): SeqCst, after the store in `raise`.
            word.swap(0, Ordering::SeqCst);
        }
    }

    /// Wakes the sleeper, after `raise` or `clear`: the watcher stopping
    /// clears and wakes alone (the sleeper then looks at its peer for
    /// itself).
    fn wake(&self) {
        for word in self.words_slept_on() {
            // A wake that fails wakes no one, and there is no one else to
            // tell: the sleeper then finds the alarm at its next pass.
            let _ = ipc_platform::futex::wake_one(word);
        }
    }

    fn words_slept_on(&self) -> [&AtomicU32; 2] {
        [self.words.waiter(Direction::Response, Waiter::Data), self.words.waiter(Direction::Request, Waiter::Space)]
    }
}

/// Rounds of alarms raised in this process: see the module docs.
static ROUNDS: AtomicU32 = AtomicU32::new(0);

/// The process's word of alarm rounds, for a sleeper to sleep on beside
/// its ring words (see the module docs). Read it before the alarms.
pub(crate) fn rounds() -> &'static AtomicU32 {
    &ROUNDS
}

/// Starts a round: every sleeper on [`rounds`] is woken, by one call.
fn next_round() {
    // SYNC(liveness-rounds): SeqCst, after the alarms' stores.
    ROUNDS.fetch_add(1, Ordering::SeqCst);
    // A failed wake leaves the per-link wakes that follow.
    let _ = ipc_platform::futex::wake_all_private(&ROUNDS);
}

/// The one watcher of this process.
struct Watcher {
    watch: HangupWatch,
    alarms: Mutex<HashMap<u64, Arc<Alarm>>>,
    next_key: AtomicU64,
    /// Cleared if the thread's epoll failed: links registered are no
    /// longer watched.
    running: AtomicBool,
}

static WATCHER: OnceLock<Option<Arc<Watcher>>> = OnceLock::new();

/// Whether links made from now on are watched; see [`watch_liveness`].
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether the shared-memory links this process makes from now on (with
/// futex doorbells) are watched by the liveness thread (the default), or
/// their sleeping waits wake every 50 ms to look at their peers (no
/// thread, but an idle client wakes 20 times a second). Links made
/// before keep what they had. A blocked call notices a dead peer either
/// way.
pub fn watch_liveness(enabled: bool) {
    // Relaxed: read at each registration; no other memory depends on it.
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// The watcher, started at the first call; `None` if it cannot be.
fn watcher() -> Option<&'static Arc<Watcher>> {
    WATCHER
        .get_or_init(|| {
            let watcher = Arc::new(Watcher {
                watch: HangupWatch::new().ok()?,
                alarms: Mutex::new(HashMap::new()),
                next_key: AtomicU64::new(0),
                running: AtomicBool::new(true),
            });
            let w = Arc::clone(&watcher);
            std::thread::Builder::new().name("ipc-liveness".into()).stack_size(64 << 10).spawn(move || w.run()).ok()?;
            Some(watcher)
        })
        .as_ref()
}

impl Watcher {
    /// The thread: sleeps until a watched connection is ready, rings its
    /// alarm. Never wakes otherwise.
    fn run(&self) {
        let (mut keys, mut alarms) = (Vec::new(), Vec::new());
        loop {
            keys.clear();
            if self.watch.wait(&mut keys, None).is_err() {
                // Relaxed: a hint for later waits, which fall back to
                // looking at their peers every slice.
                self.running.store(false, Ordering::Relaxed);
                let alarms: Vec<Arc<Alarm>> = self.lock().values().cloned().collect();
                // Wake every sleeper, so each looks at its peer by itself.
                alarms.iter().for_each(|a| a.clear());
                next_round();
                alarms.iter().for_each(|a| a.wake());
                return;
            }
            // A dead daemon hangs up every link at once: every hang-up
            // reported is taken, every alarm raised, then one call wakes
            // every sleeper (see the module docs); the map is locked once.
            while !keys.is_empty() {
                let before = keys.len();
                if self.watch.wait(&mut keys, Some(Duration::ZERO)).is_err() || keys.len() == before {
                    break;
                }
            }
            {
                let map = self.lock();
                alarms.extend(keys.iter().filter_map(|key| map.get(key).cloned()));
            }
            alarms.iter().for_each(|a| a.raise());
            next_round();
            if ipc_platform::futex::wait_any_supported() {
                alarms.clear();
            } else {
                alarms.drain(..).for_each(|a| a.wake());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Alarm>>> {
        // The map holds no invariant a panic could break.
        self.alarms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A link's registration with the watcher. Remove it with
/// [`Watch::release`] before the connection closes.
pub(crate) struct Watch {
    key: u64,
    alarm: Arc<Alarm>,
    watcher: &'static Arc<Watcher>,
}

impl Watch {
    /// Registers `control` (the link's control connection) and the
    /// link's segment `words`; `None` if there is no watcher.
    pub(crate) fn register(control: BorrowedFd<'_>, words: &SharedWords) -> Option<Watch> {
        // Relaxed: see `watch_liveness`.
        if !ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        let watcher = watcher()?;
        // Relaxed: keys need only be unique.
        let key = watcher.next_key.fetch_add(1, Ordering::Relaxed);
        let alarm = Arc::new(Alarm { rung: AtomicBool::new(false), words: words.share() });
        watcher.lock().insert(key, Arc::clone(&alarm));
        if watcher.watch.add(control, key).is_err() {
            watcher.lock().remove(&key);
            return None;
        }
        Some(Watch { key, alarm, watcher })
    }

    /// Whether the watcher found the connection hung up (or readable).
    /// Read after the announcement: see the module docs.
    pub(crate) fn rung(&self) -> bool {
        // SYNC(liveness-alarm): SeqCst, after the ring's fence.
        self.alarm.rung.load(Ordering::SeqCst)
    }

    /// Whether the watcher still watches: else a wait must look at the
    /// peer itself every slice.
    pub(crate) fn is_watched(&self) -> bool {
        // Relaxed: see `Watcher::running`.
        self.watcher.running.load(Ordering::Relaxed)
    }

    /// Ends the registration; `control` is the connection registered,
    /// still open.
    pub(crate) fn release(self, control: BorrowedFd<'_>) {
        self.watcher.watch.remove(control);
        self.watcher.lock().remove(&self.key);
    }
}

/// Registers `control` if the link sleeps on futex words (`futex`).
pub(crate) fn watch(control: &impl AsFd, words: &SharedWords, futex: bool) -> Option<Watch> {
    if futex {
        Watch::register(control.as_fd(), words)
    } else {
        None
    }
}
