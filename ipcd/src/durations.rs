//! How long calls take, by service: one histogram per service and worker,
//! for `ipcd_call_duration_seconds`.
//!
//! A call's duration runs from the moment its worker dispatches the
//! complete request to the moment its answer is ready to go out: an inline
//! handler's return, or the worker's taking of a handed-off call's answer
//! (blocking, deferred, upload). It is one pair of `Instant::now()` reads
//! (the vDSO clock, no system call) and a few plain atomic stores on lines
//! only the serving worker writes; a scrape sums the workers'.
//!
//! Every counter is written by its worker alone, with a load and a store
//! (`Relaxed`: a statistic with one writer, so no update is lost; a reader
//! sees some recent value, never a torn one).

// Without the metrics, nothing reads them (the counting stays, unread).
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The bucket bounds, in nanoseconds: 1, 2.5 and 5 of each decade from
/// 1 µs to 10 s (an shm call's handler takes microseconds, a blocking one
/// may take seconds). Past the last is the `+Inf` bucket.
pub(crate) const BOUNDS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets of a histogram: one per bound, and `+Inf`.
pub(crate) const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// Adds `n` to a counter only one thread writes (see the module docs).
fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One service's histogram on one worker: the count of each bucket (not
/// cumulative) and the sum of the durations, in nanoseconds. 128-byte
/// aligned, so that no line holds another worker's.
#[repr(align(128))]
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// What a scrape reads of a service's histograms: the count of each bucket
/// (not cumulative), and the sum of the durations in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) buckets: [u64; BUCKETS],
    pub(crate) sum_ns: u64,
}

impl Snapshot {
    /// The calls counted.
    pub(crate) fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub(crate) fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }
}

/// One worker's call durations, a histogram per service id.
#[derive(Default)]
pub(crate) struct CallDurations {
    services: Box<[Histogram]>,
}

impl CallDurations {
    /// Histograms for `services` services.
    pub(crate) fn new(services: usize) -> CallDurations {
        CallDurations { services: (0..services).map(|_| Histogram::default()).collect() }
    }

    /// Counts a call to `service` that took `took`. On the worker that owns
    /// these only; an id past the table (unit tests' workers have none) is
    /// not counted.
    pub(crate) fn record(&self, service: u16, took: Duration) {
        let Some(h) = self.services.get(usize::from(service)) else { return };
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        // Most calls take microseconds: the search ends in a few steps.
        let bucket = BOUNDS_NS.iter().position(|&bound| ns <= bound).unwrap_or(BOUNDS_NS.len());
        add(&h.buckets[bucket], 1);
        add(&h.sum_ns, ns);
    }

    /// What is counted of `service` so far.
    pub(crate) fn get(&self, service: usize) -> Snapshot {
        let Some(h) = self.services.get(service) else { return Snapshot::default() };
        Snapshot {
            buckets: std::array::from_fn(|i| h.buckets[i].load(Ordering::Relaxed)),
            sum_ns: h.sum_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_duration_lands_in_the_first_bucket_that_holds_it() {
        let d = CallDurations::new(2);
        d.record(1, Duration::from_nanos(300));
        d.record(1, Duration::from_micros(1));
        d.record(1, Duration::from_nanos(1_001));
        d.record(1, Duration::from_millis(7));
        d.record(1, Duration::from_secs(60));
        d.record(0, Duration::from_micros(3));
        d.record(7, Duration::from_micros(3));
        let got = d.get(1);
        let mut want = [0; BUCKETS];
        want[0] = 2;
        want[1] = 1;
        want[12] = 1;
        want[BUCKETS - 1] = 1;
        assert_eq!(got.buckets, want);
        assert_eq!(got.count(), 5);
        assert_eq!(got.sum_ns, 300 + 1_000 + 1_001 + 7_000_000 + 60_000_000_000);
        assert_eq!(d.get(0).count(), 1);
        assert_eq!(d.get(7), Snapshot::default());
        assert_eq!(std::mem::align_of::<Histogram>(), 128);
    }

    #[test]
    fn bounds_rise() {
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }
}
