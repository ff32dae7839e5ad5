//! Waiting on a client's links: until a reply may have come on any link
//! with replies due, or room on the link a request waits to be written to.
//!
//! A wait on one stream link blocks in the socket (`stream.rs`). Every
//! other wait, on one shared-memory link or on several, goes the same way:
//!
//! 1. Each link's written requests are published (and its peer rung if it
//!    sleeps).
//! 2. Spin, if the [`Spinner`] says it pays and a core is free, watching
//!    every link at once.
//! 3. Announce the sleep in every ring, one after the other, with the
//!    handshake of `ipc_core::ring`: a ring found ready at its
//!    announcement ends the wait before anything sleeps. Once all are
//!    announced, a peer that publishes on any of them sees its
//!    announcement and wakes us: no wake-up is lost, whichever link it
//!    comes on.
//! 4. Sleep on every announced word at once, and on the liveness
//!    watcher's word of rounds (`liveness.rs`): one `futex_waitv` (a word
//!    already cleared is a wake; before Linux 5.16, `futex_wait` on one
//!    word); with pollable doorbells, one `poll` over every bell and every
//!    control connection.
//! 5. Look at each peer: a `closed` word or a hung-up control connection
//!    marks that link gone, and the wait returns so that the client
//!    settles it (a dead provider is noticed, not waited for). A hang-up
//!    wakes the sleep: the poll watches the control connections of
//!    pollable doorbells, and the liveness watcher (`liveness.rs`) those
//!    of futex doorbells, ringing the link's alarm and waking its words;
//!    a peer that stops on purpose marks `closed` and rings. So a sleep
//!    lasts until the deadline, with no wake-up while idle. Only a link
//!    nothing watches (no watcher thread, or it was turned off with
//!    [`crate::watch_liveness`]) makes the sleep wake every
//!    [`LIVENESS_SLICE`] to look.
//! 6. Withdraw every announcement.
//!
//! A wait returns `Ok` once anything may have changed, a link found gone
//! included (its `gone` is set, and the caller reads what it left);
//! `Timeout` only at the deadline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ipc_core::Spinner;
use ipc_platform::futex::{self, WaitOn, Wake, WAIT_ANY_MAX};
use ipc_platform::CoreGauge;

use crate::error::CallError;
use crate::link::Link;
use crate::shm::{Bell, ShmLink, Sleep};

/// How long a sleeping wait on a link nothing watches sleeps between
/// checks that its peers are still there. Bounds how late a peer's crash
/// is noticed by a blocked call on such a link.
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(50);
/// The slice of a wait that must also look at links it cannot sleep on
/// (a futex word beside pollable doorbells, a kernel without
/// `futex_waitv`, more words than it takes).
const SHORT_SLICE: Duration = Duration::from_millis(1);

/// A word no one wakes, to fill the unused part of a `futex_waitv` list.
static UNUSED: AtomicU32 = AtomicU32::new(0);

/// What a wait on a link waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Await {
    /// A reply.
    Reply,
    /// Room for a request of `len` bytes. With replies still to come
    /// (`replies_due`), a shared-memory link waits for the next of them
    /// too: a client that slept on the request ring alone could sleep
    /// through the replies the peer waits for it to read, and one that
    /// slept for replies alone could sleep through room freed without a
    /// reply (a request cancelled, a stream waiting for credit).
    Room { len: usize, replies_due: bool },
    /// Room for a frame of `len` bytes that no reply follows (a chunk that
    /// goes on with a request, a credit, a cancel), or a reply: a
    /// shared-memory link waits on both rings at once, since the peer may
    /// free room without replying, and may wait for the client to read.
    RoomOrReply { len: usize },
}

impl Await {
    pub(crate) fn sleep(self) -> Sleep {
        match self {
            Await::Reply => Sleep::Reply,
            Await::Room { len, replies_due: true } => Sleep::Either(len),
            Await::Room { len, replies_due: false } => Sleep::Space(len),
            Await::RoomOrReply { len } => Sleep::Either(len),
        }
    }
}

/// How a client spins before it sleeps: one spinner for all its links,
/// since it waits for one thing at a time.
pub(crate) struct Pace {
    spinner: Spinner,
    gauge: CoreGauge,
}

impl Pace {
    pub(crate) fn new(spin: Duration) -> Pace {
        Pace { spinner: Spinner::new(spin), gauge: CoreGauge::new() }
    }
}

/// Waits until what `plan` says (per link: nothing, or what to wait for)
/// may have come on any link, or the deadline passes; see the module docs.
pub(crate) fn wait(
    links: &mut [Link],
    plan: &[Option<Await>],
    pace: &mut Pace,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), CallError> {
    let mut planned = plan.iter().enumerate().filter_map(|(i, what)| what.map(|w| (i, w)));
    let Some((first, what)) = planned.next() else { return Ok(()) };
    if planned.next().is_none() {
        if let Link::Stream(l) = &mut links[first] {
            let waited = match what {
                Await::Reply => l.wait_readable(deadline, timeout),
                Await::Room { .. } | Await::RoomOrReply { .. } => l.wait_writable(deadline, timeout),
            };
            return match waited {
                Err(CallError::Disconnected { reason }) => {
                    l.mark_gone(reason);
                    Ok(())
                }
                other => other,
            };
        }
    }
    wait_shm(links, plan, pace, deadline, timeout)
}

/// The planned links with what each waits for.
fn members<'a>(links: &'a mut [Link], plan: &'a [Option<Await>]) -> impl Iterator<Item = (&'a mut Link, Sleep)> + 'a {
    links.iter_mut().zip(plan).filter_map(|(link, what)| what.map(|w| (link, w.sleep())))
}

/// Step 2 of the module docs: spins while the spinner says it pays and a
/// core is free, watching every planned shared-memory link. Whether what
/// the plan waits for came. (The poll-style API spins the same way.)
pub(crate) fn spin(links: &mut [Link], plan: &[Option<Await>], pace: &mut Pace) -> bool {
    spin_unless(links, plan, pace, || false)
}

/// As [`spin`], giving up as soon as `stop` says so.
pub(crate) fn spin_unless(
    links: &mut [Link],
    plan: &[Option<Await>],
    pace: &mut Pace,
    stop: impl FnMut() -> bool,
) -> bool {
    let Pace { spinner, gauge } = pace;
    let ready = || {
        members(links, plan).any(|(link, what)| match link {
            Link::Shm(l) => l.ready(what),
            Link::Stream(_) => false,
        })
    };
    spinner.spin_unless(|| gauge.core_free(), ready, stop)
}

/// Steps 1 to 6 of the module docs.
fn wait_shm(
    links: &mut [Link],
    plan: &[Option<Await>],
    pace: &mut Pace,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), CallError> {
    for (link, _) in members(links, plan) {
        if link.gone().is_some() {
            return Ok(());
        }
        if let Err(CallError::Disconnected { reason }) = link.flush() {
            link.mark_gone(reason);
            return Ok(());
        }
    }
    if spin(links, plan, pace) {
        return Ok(());
    }
    let mut announced = true;
    for (link, what) in members(links, plan) {
        let Link::Shm(l) = link else { continue };
        match l.announce(what) {
            Ok(true) => {}
            Ok(false) => announced = false,
            Err(reason) => {
                l.gone = Some(reason);
                announced = false;
            }
        }
        if !announced {
            break;
        }
    }
    let slept = if announced { sleep(links, plan, deadline, timeout) } else { Ok(()) };
    for (link, what) in members(links, plan) {
        if let Link::Shm(l) = link {
            l.withdraw(what);
        }
    }
    slept
}

/// Sleeps, the announcements made, until a peer rings, one is found gone,
/// or the deadline passes.
fn sleep(links: &mut [Link], plan: &[Option<Await>], deadline: Instant, timeout: Duration) -> Result<(), CallError> {
    loop {
        // SYNC(liveness-rounds): before the alarms are read.
        let round = crate::liveness::rounds().load(Ordering::SeqCst);
        let mut watched = true;
        for (link, _) in members(links, plan) {
            if let Link::Shm(l) = link {
                if l.closed_after().is_some() {
                    l.gone = l.peer_gone();
                    return Ok(());
                }
                // SYNC(liveness-alarm): after the announcement.
                if l.check_alarm() {
                    return Ok(());
                }
                watched &= l.is_watched();
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CallError::Timeout { after: timeout });
        }
        // Every peer's hang-up wakes this sleep (a peer stopping on
        // purpose rings): it may last until the deadline.
        let slice = if watched { deadline - now } else { (deadline - now).min(LIVENESS_SLICE) };
        let pollable = members(links, plan).any(|(link, _)| matches!(link, Link::Shm(l) if l.doorbell_fd().is_some()));
        let woken = if pollable { poll_once(links, plan, slice) } else { futex_once(links, plan, slice, round) };
        if woken {
            // A round of alarms means a peer of this process died, and
            // the daemon's links hang up over some milliseconds: rather
            // than wait for a later round (which the threads this one woke
            // delay), look at the peers now. Rare: only after a death.
            if !pollable && crate::liveness::rounds().load(Ordering::Relaxed) != round {
                look_at_peers(links, plan);
            }
            return Ok(());
        }
        if look_at_peers(links, plan) {
            return Ok(());
        }
    }
}

/// Marks every member link whose peer is found gone; whether any changed
/// (a socket link's bytes received count too).
fn look_at_peers(links: &mut [Link], plan: &[Option<Await>]) -> bool {
    let mut changed = false;
    for (link, _) in members(links, plan) {
        match link {
            Link::Shm(l) => {
                if let Some(reason) = l.peer_gone() {
                    l.gone = Some(reason);
                    changed = true;
                }
            }
            // Not in a sleep it could wake: look at its socket.
            Link::Stream(l) => changed |= l.receive_left(),
        }
    }
    changed
}

/// One futex sleep on every member's word, and on the liveness watcher's
/// word of rounds expecting `round` (see `liveness.rs`), for at most
/// `slice`. Whether it was woken (or a word was cleared: a peer rang).
fn futex_once(links: &mut [Link], plan: &[Option<Await>], slice: Duration, round: u32) -> bool {
    let mut words = [WaitOn::shared(&UNUSED, 0); WAIT_ANY_MAX];
    let (mut n, mut unwatched, mut first) = (0, false, &UNUSED);
    for (link, what) in links.iter().zip(plan).filter_map(|(link, what)| what.map(|w| (link, w.sleep()))) {
        let Link::Shm(l) = link else {
            unwatched = true;
            continue;
        };
        for word in l.words(what).into_iter().flatten() {
            // The peer clears the word before it wakes us: cleared, the
            // wait is over. (Acquire as any read of a word the peer
            // writes; the ring's fences order its frames.)
            if word.load(Ordering::Acquire) != 1 {
                return true;
            }
            // One entry stays for the word of rounds.
            if n < WAIT_ANY_MAX - 1 {
                if n == 0 {
                    first = word;
                }
                words[n] = WaitOn::shared(word, 1);
                n += 1;
            } else {
                unwatched = true;
            }
        }
    }
    let slice = if unwatched { slice.min(SHORT_SLICE) } else { slice };
    let waited = match n {
        0 => {
            std::thread::sleep(slice);
            Ok(Wake::TimedOut)
        }
        _ => {
            words[n] = WaitOn::private(crate::liveness::rounds(), round);
            match futex::wait_any_of(&words[..=n], Some(slice)) {
                // Before Linux 5.16: sleep on one word (the watcher wakes
                // each link's words too), and look at the others often.
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    futex::wait(first, 1, Some(if n == 1 { slice } else { SHORT_SLICE }))
                }
                other => other,
            }
        }
    };
    match waited {
        Ok(Wake::Woken) => true,
        Ok(Wake::TimedOut) => false,
        Err(e) => {
            mark_all_gone(links, plan, &format!("futex wait failed: {e}"));
            true
        }
    }
}

/// One poll over every member's doorbell and control connection (with
/// pollable doorbells), for at most `slice`. Whether it was woken.
fn poll_once(links: &mut [Link], plan: &[Option<Await>], slice: Duration) -> bool {
    let mut fds = Vec::with_capacity(2 * plan.len());
    let mut unwatched = false;
    for (link, what) in links.iter().zip(plan).filter_map(|(link, what)| what.map(|w| (link, w.sleep()))) {
        match link {
            Link::Shm(l @ ShmLink { bell: Bell::Pollable(bell), .. }) => {
                fds.push(std::os::fd::AsFd::as_fd(bell));
                fds.push(std::os::fd::AsFd::as_fd(&l.control));
            }
            Link::Shm(l) => {
                if l.words(what).into_iter().flatten().any(|w| w.load(Ordering::Acquire) != 1) {
                    return true;
                }
                unwatched = true;
            }
            Link::Stream(_) => unwatched = true,
        }
    }
    let slice = if unwatched { slice.min(SHORT_SLICE) } else { slice };
    let ready = match ipc_platform::wait_readable(&fds, Some(slice)) {
        Ok(ready) => ready,
        Err(e) => {
            mark_all_gone(links, plan, &format!("poll failed: {e}"));
            return true;
        }
    };
    let mut ready = ready.into_iter();
    let mut woken = false;
    for (link, _) in members(links, plan) {
        let Link::Shm(l) = link else { continue };
        if l.doorbell_fd().is_none() {
            continue;
        }
        let (rang, control) = (ready.next().unwrap_or(false), ready.next().unwrap_or(false));
        if rang {
            match l.drain_bell() {
                Ok(()) => woken = true,
                Err(reason) => l.gone = Some(reason),
            }
        }
        if control {
            // The peer never writes on it: readable means hung up, or a
            // peer that breaks the protocol (and would keep the poll
            // spinning).
            l.gone =
                Some(l.peer_gone().unwrap_or_else(|| format!("{} sent data on the control connection", l.peer.name())));
        }
        woken |= l.gone.is_some();
    }
    woken
}

fn mark_all_gone(links: &mut [Link], plan: &[Option<Await>], reason: &str) {
    for (link, _) in members(links, plan) {
        link.mark_gone(reason.to_string());
    }
}
