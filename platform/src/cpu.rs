//! Whether a core is free to spin on: from the kernel's count of runnable
//! threads, and, under a cgroup CPU quota (a container's limit), from the
//! cgroup's own counters.

use std::fs::File;
use std::io::Read;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cgroup::{CpuLimit, Sample};

/// How long a reading is trusted before the counters are read again.
const REFRESH: Duration = Duration::from_millis(20);

/// Tells whether spinning would take a core another thread is waiting for.
///
/// - The cores it may use: those of its affinity mask, and no more than
///   the whole cores of its cgroup's CPU quota. With one, never.
/// - The host: the runnable threads the kernel reports in `/proc/loadavg`
///   (the spinner itself included) against the cores of the affinity mask
///   (the run queue is the host's, so it is not compared with a quota).
/// - Under a quota: the cgroup was not throttled since the last reading,
///   and (cgroup v2 with pressure information) its threads waited for a
///   CPU less than a tenth of the time since.
///
/// The reading is cached for 20 ms, so asking costs a clock read; the file
/// reads (three system calls each, no allocation) happen at most 50 times a
/// second.
#[derive(Debug)]
pub struct CoreGauge {
    cores: u32,
    host_cores: u32,
    limit: Option<CpuLimit>,
    last: Option<Sample>,
    read_at: Option<Instant>,
    free: bool,
}

impl Default for CoreGauge {
    fn default() -> CoreGauge {
        CoreGauge::new()
    }
}

impl CoreGauge {
    /// A gauge for the cores this process may run on (as [`usable_cores`]
    /// found them).
    pub fn new() -> CoreGauge {
        let cores = process_cores();
        CoreGauge::with_limit(cores.host, cores.limit.clone())
    }

    fn with_limit(host_cores: u32, limit: Option<CpuLimit>) -> CoreGauge {
        let cores = limit.as_ref().map_or(host_cores, |l| l.cores.min(host_cores));
        CoreGauge { cores, host_cores, limit, last: None, read_at: None, free: cores > 1 }
    }

    /// The cores spinning may count on: the affinity mask's, within the
    /// cgroup's quota.
    pub fn cores(&self) -> u32 {
        self.cores
    }

    /// Whether no runnable thread is waiting for a core (as of the last
    /// reading, at most 20 ms old). With one core, never.
    pub fn core_free(&mut self) -> bool {
        if self.cores <= 1 {
            return false;
        }
        let now = Instant::now();
        if self.read_at.is_some_and(|t| now.duration_since(t) < REFRESH) {
            return self.free;
        }
        let elapsed = self.read_at.map(|t| now.duration_since(t));
        self.read_at = Some(now);
        // Unreadable (no /proc): assume free, as without the gauge.
        let host_free = runnable_threads().is_none_or(|n| n <= self.host_cores);
        let sample = self.limit.as_ref().and_then(CpuLimit::sample);
        let cgroup_free = match (self.last, sample, elapsed) {
            (Some(before), Some(now), Some(elapsed)) => quota_to_spare(before, now, elapsed),
            _ => true,
        };
        self.last = sample;
        self.free = host_free && cgroup_free;
        self.free
    }
}

/// The cores this process may count on: those of its affinity mask, and no
/// more than the whole cores of its cgroup's CPU quota; at least 1.
///
/// Read once per process (the affinity mask and the cgroup's files cost a
/// dozen system calls, which every new client and gauge would otherwise
/// pay): a quota or mask changed later is not seen.
pub fn usable_cores() -> u32 {
    let cores = process_cores();
    cores.limit.as_ref().map_or(cores.host, |l| l.cores.min(cores.host)).max(1)
}

/// What [`usable_cores`] and [`CoreGauge::new`] read once.
struct ProcessCores {
    /// The affinity mask's.
    host: u32,
    limit: Option<CpuLimit>,
}

fn process_cores() -> &'static ProcessCores {
    static CORES: OnceLock<ProcessCores> = OnceLock::new();
    CORES.get_or_init(|| {
        let host = rustix::thread::sched_getaffinity(None)
            .map(|set| set.count())
            .unwrap_or_else(|_| std::thread::available_parallelism().map_or(1, |n| n.get()) as u32)
            .max(1);
        ProcessCores { host, limit: CpuLimit::discover() }
    })
}

/// Whether a cgroup whose counters went from `before` to `now` over
/// `elapsed` has CPU time to spare: it was not throttled, and its threads
/// waited for a CPU less than a tenth of the time.
fn quota_to_spare(before: Sample, now: Sample, elapsed: Duration) -> bool {
    if now.throttled > before.throttled {
        return false;
    }
    match (before.waited_us, now.waited_us) {
        (Some(b), Some(n)) => u128::from(n.saturating_sub(b)) * 10 < elapsed.as_micros(),
        _ => true,
    }
}

/// The kernel's count of runnable threads (the fourth field of
/// `/proc/loadavg`, before the slash).
pub fn runnable_threads() -> Option<u32> {
    let mut buf = [0u8; 128];
    let mut file = File::open("/proc/loadavg").ok()?;
    let n = file.read(&mut buf).ok()?;
    parse_runnable(&buf[..n])
}

fn parse_runnable(text: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(text).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_runnable_field() {
        assert_eq!(parse_runnable(b"0.52 0.58 0.59 3/467 12345\n"), Some(3));
        assert_eq!(parse_runnable(b"garbage"), None);
    }

    #[test]
    fn a_cgroup_with_no_time_to_spare_is_busy() {
        let calm = Sample { throttled: 3, waited_us: Some(1_000) };
        let ms = Duration::from_millis(20);
        assert!(quota_to_spare(calm, calm, ms));
        assert!(!quota_to_spare(calm, Sample { throttled: 4, ..calm }, ms), "throttled since");
        assert!(quota_to_spare(calm, Sample { waited_us: Some(2_000), ..calm }, ms), "waited 5% of the time");
        assert!(!quota_to_spare(calm, Sample { waited_us: Some(3_000), ..calm }, ms), "waited 10% of the time");
        let v1 = Sample { throttled: 3, waited_us: None };
        assert!(quota_to_spare(v1, v1, ms));
    }

    #[test]
    fn a_quota_caps_the_cores_and_one_core_never_spins() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "cpu\n").unwrap();
        std::fs::create_dir(r.join("box")).unwrap();
        std::fs::write(r.join("box/cpu.max"), "150000 100000\n").unwrap();
        std::fs::write(r.join("box/cpu.stat"), "nr_throttled 0\n").unwrap();
        let limit = CpuLimit::discover_in(r, "0::/box\n");
        let mut gauge = CoreGauge::with_limit(64, limit);
        // 1.5 cores of quota on a host of 64: one whole core, so no spinning
        // however idle the host.
        assert_eq!(gauge.cores(), 1);
        assert!(!gauge.core_free());
        // Unlimited, the host's cores count.
        assert_eq!(CoreGauge::with_limit(64, None).cores(), 64);
    }

    #[test]
    fn this_machine_reports_at_least_the_reader() {
        let n = runnable_threads().expect("/proc/loadavg is readable on Linux");
        assert!(n >= 1, "the reading thread itself is runnable");
    }
}
