//! How much memory the machine has, from `/proc/meminfo`.

/// The machine's usable RAM in bytes (`MemTotal` in `/proc/meminfo`), or
/// `None` where it cannot be read. Read fresh on every call: the daemon
/// asks once, at start.
///
/// It is the machine's total, not a cgroup's limit: a daemon confined by
/// `MemoryMax=` sees the host's figure.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&text)
}

/// The `MemTotal:` line's value, which the kernel always gives in kB
/// (KiB).
fn parse_mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut fields = line.split_ascii_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    if fields.next() != Some("kB") {
        return None;
    }
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total() {
        let text = "MemTotal:       24683652 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(text), Some(24683652 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
    }

    #[test]
    fn this_machine_has_some_memory() {
        assert!(total_memory().expect("/proc/meminfo is readable on Linux") > 0);
    }
}
