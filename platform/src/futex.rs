//! Futex wait and wake on words shared between processes.
//!
//! The words live in a `MAP_SHARED` mapping, so the private-futex flag (which
//! keys waiters by address in one process) must never be used: the kernel
//! has to key them by the underlying page.

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use rustix::io::Errno;
use rustix::thread::futex;

/// How a [`wait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Woken by a peer, interrupted, or the word no longer held the
    /// expected value: re-check the state.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Sleeps while `word` holds `expected`, for at most `timeout`.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<Wake> {
    let ts = timeout.map(timespec);
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(Wake::Woken),
        Err(Errno::TIMEDOUT) => Ok(Wake::TimedOut),
        Err(e) => Err(e.into()),
    }
}

/// A relative timeout as the kernel takes it, saturating at `i64::MAX`
/// seconds.
pub(crate) fn timespec(t: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec { tv_sec: t.as_secs().min(i64::MAX as u64) as i64, tv_nsec: i64::from(t.subsec_nanos()) }
}

/// Wakes one waiter sleeping on `word`. Returns whether one was woken.
pub fn wake_one(word: &AtomicU32) -> io::Result<bool> {
    Ok(futex::wake(word, futex::Flags::empty(), 1)? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn wait_returns_at_once_on_a_changed_word() {
        let w = AtomicU32::new(0);
        assert_eq!(wait(&w, 1, Some(Duration::from_secs(5))).unwrap(), Wake::Woken);
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(1);
        assert_eq!(wait(&w, 1, Some(Duration::from_millis(5))).unwrap(), Wake::TimedOut);
    }

    #[test]
    fn wake_reaches_a_sleeper() {
        let w = Arc::new(AtomicU32::new(1));
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            while w2.load(Ordering::Acquire) == 1 {
                wait(&w2, 1, Some(Duration::from_secs(10))).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(0, Ordering::Release);
        wake_one(&w).unwrap();
        t.join().unwrap();
    }
}
