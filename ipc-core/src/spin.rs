//! Adaptive spinning before sleeping.
//!
//! A sleeping side pays for its wake-up twice: the waker's system call and
//! the scheduler bringing the sleeper back (about 25 us across cores on a
//! small VM, a few us on one core). When the peer answers within a few
//! microseconds, spinning on the ring instead wins by an order of
//! magnitude; when it does not, spinning only burns a core another thread
//! could use. [`Spinner`] decides per wait, from what just happened: it
//! spins while recent spins ended with data, and once they keep failing it
//! only probes now and then.

use std::time::{Duration, Instant};

/// Consecutive failed spins, halving each time, before spinning stops.
const TRUST: u8 = 8;
/// While spinning is off, one wait in this many probes whether it pays again.
const PROBE_EVERY: u32 = 32;

/// Decides how long to spin before each sleep; see the module docs.
#[derive(Clone, Debug)]
pub struct Spinner {
    limit: Duration,
    trust: u8,
    since_probe: u32,
}

impl Spinner {
    /// A spinner that spins at most `limit` per wait; zero never spins.
    pub fn new(limit: Duration) -> Spinner {
        Spinner { limit, trust: TRUST, since_probe: 0 }
    }

    /// The configured limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// How long the next wait should spin before sleeping (zero: sleep at
    /// once).
    pub fn budget(&mut self) -> Duration {
        if self.limit.is_zero() {
            return Duration::ZERO;
        }
        if self.trust > 0 {
            return self.limit;
        }
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            return self.limit;
        }
        Duration::ZERO
    }

    /// Records whether the spin that [`Spinner::budget`] allowed found what
    /// it waited for.
    pub fn record(&mut self, found: bool) {
        self.trust = if found { TRUST } else { self.trust / 2 };
    }

    /// Spins for at most the next budget until `ready` returns true, and
    /// records the outcome. Returns whether `ready` became true; `false`
    /// means the caller should sleep.
    ///
    /// `core_free` is asked only when a spin is due: when it says another
    /// thread waits for a core, the wait does not spin (and nothing is
    /// recorded), since spinning would delay the very peer it waits for.
    pub fn spin(&mut self, core_free: impl FnOnce() -> bool, ready: impl FnMut() -> bool) -> bool {
        self.spin_unless(core_free, ready, || false)
    }

    /// As [`Spinner::spin`], giving up early (recording nothing) as soon
    /// as `stop` returns true: for a spinner that holds up others while
    /// it spins, such as one holding a lock they wait for.
    pub fn spin_unless(
        &mut self,
        core_free: impl FnOnce() -> bool,
        mut ready: impl FnMut() -> bool,
        mut stop: impl FnMut() -> bool,
    ) -> bool {
        let budget = self.budget();
        if budget.is_zero() || !core_free() {
            return false;
        }
        let start = Instant::now();
        loop {
            // Reading the clock costs more than a ring check: look at the
            // ring a few times per reading.
            for _ in 0..16 {
                if ready() {
                    self.record(true);
                    return true;
                }
                std::hint::spin_loop();
            }
            if stop() {
                return false;
            }
            if start.elapsed() >= budget {
                self.record(false);
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limit_never_spins() {
        let mut s = Spinner::new(Duration::ZERO);
        assert!(!s.spin(|| panic!("a zero limit must not ask"), || panic!("a zero limit must not look")));
    }

    #[test]
    fn a_stopped_spin_gives_up_at_once_and_records_nothing() {
        let mut s = Spinner::new(Duration::from_secs(3600));
        let mut looks = 0;
        assert!(!s.spin_unless(
            || true,
            || {
                looks += 1;
                false
            },
            || true
        ));
        assert_eq!(looks, 16, "one round of looks before the first stop check");
        // Eight failures would have halved trust to nothing; stops do not.
        for _ in 0..8 {
            assert!(!s.spin_unless(|| true, || false, || true));
        }
        assert_eq!(s.budget(), Duration::from_secs(3600));
    }

    #[test]
    fn failures_stop_spinning_except_for_probes_and_a_hit_restores_it() {
        let mut s = Spinner::new(Duration::from_micros(5));
        // Four halvings take trust from 8 to 0.
        for _ in 0..4 {
            assert!(!s.budget().is_zero());
            s.record(false);
        }
        let spins = (0..PROBE_EVERY * 4).filter(|_| !s.budget().is_zero()).count();
        assert_eq!(spins, 4, "only one wait in {PROBE_EVERY} probes");
        s.record(true);
        assert_eq!(s.budget(), Duration::from_micros(5));
    }

    #[test]
    fn spin_returns_as_soon_as_ready_and_gives_up_after_the_budget() {
        let mut s = Spinner::new(Duration::from_millis(2));
        let mut calls = 0;
        assert!(s.spin(
            || true,
            || {
                calls += 1;
                calls == 3
            }
        ));
        let start = Instant::now();
        assert!(!s.spin(|| true, || false));
        assert!(start.elapsed() >= Duration::from_millis(2));
        // No free core: no spin.
        assert!(!s.spin(|| false, || panic!("must not look without a free core")));
    }
}
