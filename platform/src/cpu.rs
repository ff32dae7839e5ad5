//! Whether a core is free to spin on, from the kernel's count of runnable
//! threads.

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

/// How long a reading is trusted before `/proc/loadavg` is read again.
const REFRESH: Duration = Duration::from_millis(20);

/// Tells whether spinning would take a core another thread is waiting for:
/// it compares the runnable threads the kernel reports in `/proc/loadavg`
/// (the spinner itself included) with the cores this process may use. The
/// reading is cached for 20 ms, so asking costs a clock read; the file
/// read (three system calls, no allocation) happens at most 50 times a
/// second.
#[derive(Debug)]
pub struct CoreGauge {
    cores: u32,
    read_at: Option<Instant>,
    free: bool,
}

impl Default for CoreGauge {
    fn default() -> CoreGauge {
        CoreGauge::new()
    }
}

impl CoreGauge {
    /// A gauge for the cores this process may run on.
    pub fn new() -> CoreGauge {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        CoreGauge { cores, read_at: None, free: cores > 1 }
    }

    /// Whether no runnable thread is waiting for a core (as of the last
    /// reading, at most 20 ms old). With one core, never.
    pub fn core_free(&mut self) -> bool {
        if self.cores <= 1 {
            return false;
        }
        let now = Instant::now();
        if self.read_at.is_none_or(|t| now.duration_since(t) >= REFRESH) {
            self.read_at = Some(now);
            // Unreadable (no /proc): assume free, as without the gauge.
            self.free = runnable_threads().is_none_or(|n| n <= self.cores);
        }
        self.free
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
    fn this_machine_reports_at_least_the_reader() {
        let n = runnable_threads().expect("/proc/loadavg is readable on Linux");
        assert!(n >= 1, "the reading thread itself is runnable");
    }
}
