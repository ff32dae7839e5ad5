//! Waiting between attempts to reach a peer again ([`Reconnect`]'s
//! delays): doubling from the first delay to the longest, each pause drawn
//! at random from the upper half of its delay, so clients that lost one
//! daemon at the same instant do not all come back at the same instant.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use crate::options::Reconnect;

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Backoff {
    delay: Duration,
    max: Duration,
    /// An xorshift64 state, never 0.
    rng: u64,
}

impl Backoff {
    /// Starts at `policy`'s first delay, seeded from the process's random
    /// hash keys (no system call after a thread's first).
    pub(crate) fn new(policy: Reconnect) -> Backoff {
        Backoff::with_seed(policy, RandomState::new().build_hasher().finish())
    }

    fn with_seed(policy: Reconnect, seed: u64) -> Backoff {
        Backoff { delay: policy.first_delay, max: policy.max_delay, rng: seed | 1 }
    }

    /// The next pause, in the upper half of the delay (`[delay / 2,
    /// delay]`); the delay then doubles, up to the longest.
    pub(crate) fn next_pause(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let nanos = u64::try_from(self.delay.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        let pause = Duration::from_nanos(half + self.rng % (nanos - half + 1));
        self.delay = (self.delay * 2).min(self.max);
        pause
    }

    /// Sleeps the next pause, but no longer than `left`.
    pub(crate) fn pause(&mut self, left: Duration) {
        std::thread::sleep(self.next_pause().min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_the_ceiling_each_within_the_upper_half_of_its_delay() {
        let policy = Reconnect::new(Duration::from_millis(1), Duration::from_millis(20));
        let mut b = Backoff::with_seed(policy, 7);
        let delays = [1u64, 2, 4, 8, 16, 20, 20, 20];
        for ms in delays {
            let delay = Duration::from_millis(ms);
            let pause = b.next_pause();
            assert!(pause >= delay / 2 && pause <= delay, "{pause:?} outside [{:?}, {delay:?}]", delay / 2);
        }
    }

    #[test]
    fn clients_seeded_apart_pause_apart() {
        let policy = Reconnect::new(Duration::from_millis(20), Duration::from_millis(20));
        let pauses = |seed| {
            let mut b = Backoff::with_seed(policy, seed);
            (0..8).map(|_| b.next_pause()).collect::<Vec<_>>()
        };
        let (a, b) = (pauses(1), pauses(2));
        assert_ne!(a, b, "two clients pause for the same times");
        // Spread over the half window, not stuck at one end.
        let all: Vec<Duration> = (1..=64).flat_map(pauses).collect();
        let low = all.iter().filter(|p| **p < Duration::from_millis(15)).count();
        assert!(low > all.len() / 4 && low < all.len() * 3 / 4, "{low} of {} pauses below 15 ms", all.len());
    }
}
