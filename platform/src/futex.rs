//! Futex wait and wake on words shared between processes.
//!
//! The words live in a `MAP_SHARED` mapping, so the private-futex flag (which
//! keys waiters by address in one process) must never be used on them: the
//! kernel has to key them by the underlying page. That holds for
//! [`wait_any`] too, whose words are 32-bit futexes without
//! `FUTEX2_PRIVATE`, so a plain [`wake_one`] on any of them reaches its
//! sleeper. Only a word of the process's own memory that only the process
//! wakes may be private ([`WaitOn::private`], [`wake_all_private`]).

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

/// The most words one [`wait_any`] may watch (the kernel's
/// `FUTEX_WAITV_MAX`).
pub const WAIT_ANY_MAX: usize = 128;

/// Sleeps while every one of `words` holds `expected`, for at most
/// `timeout`: the first wake of any of them (or a word found changed)
/// ends it. `futex_waitv`, Linux 5.16 or later; on an older kernel the
/// error is [`io::ErrorKind::Unsupported`], and the caller must wait some
/// other way.
///
/// An empty list, or one longer than [`WAIT_ANY_MAX`], is
/// [`io::ErrorKind::InvalidInput`].
pub fn wait_any(words: &[&AtomicU32], expected: u32, timeout: Option<Duration>) -> io::Result<Wake> {
    if words.is_empty() || words.len() > WAIT_ANY_MAX {
        return Err(list_length(words.len()));
    }
    let mut list = [WaitOn::shared(&UNUSED, 0); WAIT_ANY_MAX];
    for (on, word) in list.iter_mut().zip(words) {
        *on = WaitOn::shared(word, expected);
    }
    wait_any_of(&list[..words.len()], timeout)
}

/// One word of a [`wait_any_of`]: sleep while it holds `expected`.
#[derive(Clone, Copy, Debug)]
pub struct WaitOn<'a> {
    word: &'a AtomicU32,
    expected: u32,
    private: bool,
}

impl<'a> WaitOn<'a> {
    /// A word in shared memory, which another process may wake
    /// ([`wake_one`]).
    pub fn shared(word: &'a AtomicU32, expected: u32) -> WaitOn<'a> {
        WaitOn { word, expected, private: false }
    }

    /// A word only this process wakes ([`wake_all_private`]): the kernel
    /// keys it by address, without looking up its page.
    pub fn private(word: &'a AtomicU32, expected: u32) -> WaitOn<'a> {
        WaitOn { word, expected, private: true }
    }
}

/// Whether this kernel has `futex_waitv` (Linux 5.16 or later): asked
/// once, with a wait that ends at once.
pub fn wait_any_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let word = AtomicU32::new(0);
        let probe = wait_any_of(&[WaitOn::private(&word, 1)], Some(Duration::ZERO));
        !matches!(probe, Err(e) if e.kind() == io::ErrorKind::Unsupported)
    })
}

fn list_length(n: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("futex_waitv takes 1 to {WAIT_ANY_MAX} words, not {n}"))
}

/// A word for the unused entries of a list.
static UNUSED: AtomicU32 = AtomicU32::new(0);

/// As [`wait_any`], each word with its own expected value, shared or
/// private: sleeps while every word holds its value.
pub fn wait_any_of(words: &[WaitOn<'_>], timeout: Option<Duration>) -> io::Result<Wake> {
    if words.is_empty() || words.len() > WAIT_ANY_MAX {
        return Err(list_length(words.len()));
    }
    let mut waits = [futex::Wait::new(); WAIT_ANY_MAX];
    for (wait, on) in waits.iter_mut().zip(words) {
        wait.val = u64::from(on.expected);
        // The borrow of `words` keeps every word alive for the call, which
        // is all the kernel needs: it only reads the word and queues us on
        // its page.
        wait.uaddr = futex::WaitPtr::new(on.word.as_ptr().cast());
        // A shared word has no FUTEX2_PRIVATE: it lives in a shared
        // mapping, and the kernel must key it by the page.
        wait.flags = if on.private {
            futex::WaitFlags::SIZE_U32 | futex::WaitFlags::PRIVATE
        } else {
            futex::WaitFlags::SIZE_U32
        };
    }
    // The kernel takes an absolute time on the clock it is told.
    let deadline = timeout.map(|t| {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let t = timespec(t);
        let nanos = now.tv_nsec + t.tv_nsec;
        let carry = nanos / 1_000_000_000;
        rustix::time::Timespec {
            tv_sec: now.tv_sec.saturating_add(t.tv_sec).saturating_add(carry),
            tv_nsec: nanos % 1_000_000_000,
        }
    });
    match futex::waitv(&waits[..words.len()], futex::WaitvFlags::empty(), deadline.as_ref(), futex::ClockId::Monotonic)
    {
        Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => Ok(Wake::Woken),
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

/// Wakes every waiter of this process sleeping on `word` as a private
/// word ([`WaitOn::private`]), in one call. Returns how many.
pub fn wake_all_private(word: &AtomicU32) -> io::Result<usize> {
    // The kernel takes an int: a count above `i32::MAX` would be negative.
    Ok(futex::wake(word, futex::Flags::PRIVATE, i32::MAX as u32)?)
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

    /// Skips a test on a kernel without `futex_waitv` (before 5.16).
    fn supported() -> bool {
        wait_any_supported()
    }

    #[test]
    fn wait_any_returns_at_once_on_a_changed_word() {
        if !supported() {
            return;
        }
        let (a, b) = (AtomicU32::new(1), AtomicU32::new(0));
        assert_eq!(wait_any(&[&a, &b], 1, Some(Duration::from_secs(5))).unwrap(), Wake::Woken);
    }

    #[test]
    fn wait_any_times_out() {
        if !supported() {
            return;
        }
        let (a, b) = (AtomicU32::new(1), AtomicU32::new(1));
        assert_eq!(wait_any(&[&a, &b], 1, Some(Duration::from_millis(5))).unwrap(), Wake::TimedOut);
    }

    #[test]
    fn wait_any_refuses_empty_and_overlong_lists() {
        let w = AtomicU32::new(1);
        let words = vec![&w; WAIT_ANY_MAX + 1];
        for list in [&words[..0], &words[..]] {
            assert_eq!(wait_any(list, 1, None).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
    }

    /// Four sleepers, each on a word of its own (never changed) and on a
    /// shared count with the value each read: one `wake_all` of the count
    /// after its change ends every wait, whether the sleeper was asleep
    /// yet or not (then the changed count ends it at once).
    #[test]
    fn one_wake_all_of_a_shared_count_ends_every_wait_on_it() {
        if !supported() {
            return;
        }
        let count = Arc::new(AtomicU32::new(7));
        let read = Arc::new(std::sync::Barrier::new(5));
        let sleepers: Vec<_> = (0..4)
            .map(|_| {
                let (count, read) = (count.clone(), read.clone());
                std::thread::spawn(move || {
                    let own = AtomicU32::new(1);
                    let seen = count.load(Ordering::SeqCst);
                    read.wait();
                    wait_any_of(
                        &[WaitOn::shared(&own, 1), WaitOn::private(&count, seen)],
                        Some(Duration::from_secs(30)),
                    )
                    .unwrap()
                })
            })
            .collect();
        // Every sleeper read 7 before the count changes.
        read.wait();
        count.fetch_add(1, Ordering::SeqCst);
        wake_all_private(&count).unwrap();
        for s in sleepers {
            assert_eq!(s.join().unwrap(), Wake::Woken);
        }
    }

    /// A wake of any one word (here the last, by a plain `wake_one`)
    /// ends the wait: the words are shared futexes.
    #[test]
    fn wake_of_any_word_reaches_a_sleeper() {
        if !supported() {
            return;
        }
        let words: Arc<[AtomicU32; 3]> = Arc::new([AtomicU32::new(1), AtomicU32::new(1), AtomicU32::new(1)]);
        let sleeper = words.clone();
        let t = std::thread::spawn(move || {
            while sleeper[2].load(Ordering::Acquire) == 1 {
                let list: Vec<&AtomicU32> = sleeper.iter().collect();
                wait_any(&list, 1, Some(Duration::from_secs(10))).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        words[2].store(0, Ordering::Release);
        wake_one(&words[2]).unwrap();
        t.join().unwrap();
    }
}
