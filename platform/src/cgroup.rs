//! The CPU limit of this process's cgroup: how many whole cores its quota
//! allows, and whether the cgroup was throttled (or, on cgroup v2, kept a
//! thread waiting for a CPU) since the last look.
//!
//! A container's quota is not visible in `/proc/loadavg`, whose run queue
//! is the whole host's: what a spinner must know there is whether its own
//! cgroup has CPU time to spare, which the cgroup's `cpu.stat` (its
//! `nr_throttled`) and `cpu.pressure` tell.
//!
//! Both hierarchies are read: cgroup v2 (`cpu.max`, `cpu.stat`,
//! `cpu.pressure`) and v1's `cpu` controller (`cpu.cfs_quota_us`,
//! `cpu.cfs_period_us`, `cpu.stat`), mounted in the usual places under
//! `/sys/fs/cgroup`. A quota set on an ancestor binds its descendants, so
//! the tightest along the path to the root is the one taken.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where cgroup file systems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A CPU quota this process runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuLimit {
    /// Whole cores the quota gives (rounded down: spinning needs a whole
    /// one), the tightest along the path to the root.
    pub(crate) cores: u32,
    /// `cpu.stat` of the cgroup whose quota binds.
    stat: PathBuf,
    /// `cpu.pressure` of this process's cgroup (v2 with pressure stall
    /// information).
    pressure: Option<PathBuf>,
}

/// What the cgroup's counters say at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Periods in which the quota ran out.
    pub(crate) throttled: u64,
    /// Microseconds during which some thread of the cgroup waited for a CPU
    /// (v2 only).
    pub(crate) waited_us: Option<u64>,
}

impl CpuLimit {
    /// The quota of this process's cgroup, if it has one.
    pub(crate) fn discover() -> Option<CpuLimit> {
        let mut text = String::new();
        File::open("/proc/self/cgroup").ok()?.read_to_string(&mut text).ok()?;
        CpuLimit::discover_in(Path::new(CGROUP_ROOT), &text)
    }

    /// The quota found under `root` for a process whose `/proc/self/cgroup`
    /// reads `membership`.
    pub(crate) fn discover_in(root: &Path, membership: &str) -> Option<CpuLimit> {
        let mut found: Option<CpuLimit> = None;
        for line in membership.lines() {
            // "hierarchy-id:controllers:path"
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let path = path.trim_start_matches('/');
            let candidate = if id == "0" && controllers.is_empty() {
                // v2: a pure mount at the root, or the "unified" one of a
                // hybrid layout.
                [root.to_path_buf(), root.join("unified")]
                    .into_iter()
                    .filter(|mount| mount.join("cgroup.controllers").exists())
                    .find_map(|mount| tightest(&mount, path, Version::V2))
            } else if controllers.split(',').any(|c| c == "cpu") {
                [root.join(controllers), root.join("cpu"), root.join("cpu,cpuacct")]
                    .into_iter()
                    .filter(|mount| mount.join("cpu.cfs_quota_us").exists())
                    .find_map(|mount| tightest(&mount, path, Version::V1))
            } else {
                None
            };
            if let Some(c) = candidate {
                if found.as_ref().is_none_or(|f| c.cores < f.cores) {
                    found = Some(c);
                }
            }
        }
        found
    }

    /// The counters now (`None` if they cannot be read).
    pub(crate) fn sample(&self) -> Option<Sample> {
        let mut buf = [0u8; 1024];
        let throttled = field(read(&self.stat, &mut buf)?, "nr_throttled")?;
        let waited_us = self.pressure.as_ref().and_then(|p| pressure_total(read(p, &mut buf)?));
        Some(Sample { throttled, waited_us })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The tightest quota from `mount/path` up to `mount`.
fn tightest(mount: &Path, path: &str, version: Version) -> Option<CpuLimit> {
    let own = mount.join(path);
    let pressure = (version == Version::V2).then(|| own.join("cpu.pressure")).filter(|p| p.exists());
    let mut dir = own.as_path();
    let mut best: Option<(u32, PathBuf)> = None;
    loop {
        let mut buf = [0u8; 256];
        let quota = match version {
            Version::V2 => read(&dir.join("cpu.max"), &mut buf).and_then(parse_cpu_max),
            Version::V1 => {
                let quota = read(&dir.join("cpu.cfs_quota_us"), &mut buf).and_then(parse_number::<i64>);
                let mut buf = [0u8; 64];
                let period = read(&dir.join("cpu.cfs_period_us"), &mut buf).and_then(parse_number::<u64>);
                quota.zip(period).and_then(|(q, p)| u64::try_from(q).ok().map(|q| (q, p)))
            }
        };
        if let Some(cores) = quota.and_then(|(q, p)| q.checked_div(p)) {
            let cores = u32::try_from(cores).unwrap_or(u32::MAX);
            if best.as_ref().is_none_or(|(b, _)| cores < *b) {
                best = Some((cores, dir.join("cpu.stat")));
            }
        }
        if dir == mount {
            break;
        }
        dir = dir.parent()?;
    }
    let (cores, stat) = best?;
    Some(CpuLimit { cores, stat, pressure })
}

/// Reads a small file into `buf`: its text.
fn read<'b>(path: &Path, buf: &'b mut [u8]) -> Option<&'b str> {
    let mut file = File::open(path).ok()?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    std::str::from_utf8(&buf[..len]).ok()
}

fn parse_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.trim().parse().ok()
}

/// v2's `cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for
/// none.
fn parse_cpu_max(text: &str) -> Option<(u64, u64)> {
    let mut words = text.split_ascii_whitespace();
    let quota = words.next()?.parse().ok()?;
    let period = words.next()?.parse().ok()?;
    Some((quota, period))
}

/// The value of `name` in a "name value" per line file (`cpu.stat`).
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The `total=` of the "some" line of a pressure file, in microseconds.
fn pressure_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_ascii_whitespace().find_map(|w| w.strip_prefix("total=")?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn parses_the_files() {
        assert_eq!(parse_cpu_max("150000 100000\n"), Some((150000, 100000)));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(field("usage_usec 10\nnr_periods 4\nnr_throttled 3\n", "nr_throttled"), Some(3));
        assert_eq!(field("nr_periods 4\n", "nr_throttled"), None);
        let psi =
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(pressure_total(psi), Some(123456));
        assert_eq!(pressure_total("full avg10=0 total=7\n"), None);
    }

    #[test]
    fn a_v2_quota_on_an_ancestor_binds_and_the_tightest_wins() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(r, "cgroup.controllers", "cpu memory\n");
        write(&r.join("outer"), "cpu.max", "250000 100000\n");
        write(&r.join("outer"), "cpu.stat", "nr_throttled 5\n");
        write(&r.join("outer/inner"), "cpu.max", "max 100000\n");
        write(&r.join("outer/inner"), "cpu.stat", "nr_throttled 0\n");
        write(&r.join("outer/inner"), "cpu.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n");
        let limit = CpuLimit::discover_in(r, "0::/outer/inner\n").expect("the ancestor's quota");
        assert_eq!(limit.cores, 2, "2.5 cores of quota allow two whole ones");
        assert_eq!(limit.sample(), Some(Sample { throttled: 5, waited_us: Some(42) }));
        // A tighter one below wins.
        write(&r.join("outer/inner"), "cpu.max", "100000 100000\n");
        let limit = CpuLimit::discover_in(r, "0::/outer/inner\n").unwrap();
        assert_eq!(limit.cores, 1);
        assert_eq!(limit.sample().unwrap().throttled, 0);
    }

    #[test]
    fn a_v1_quota_is_found_and_no_quota_is_none() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let cpu = r.join("cpu,cpuacct");
        write(&cpu, "cpu.cfs_quota_us", "-1\n");
        write(&cpu, "cpu.cfs_period_us", "100000\n");
        write(&cpu.join("box"), "cpu.cfs_quota_us", "-1\n");
        write(&cpu.join("box"), "cpu.cfs_period_us", "100000\n");
        let membership = "4:memory:/box\n3:cpu,cpuacct:/box\n1:name=systemd:/box\n0::/box\n";
        assert_eq!(CpuLimit::discover_in(r, membership), None, "no quota anywhere");
        write(&cpu.join("box"), "cpu.cfs_quota_us", "300000\n");
        write(&cpu.join("box"), "cpu.stat", "nr_periods 10\nnr_throttled 2\nthrottled_time 99\n");
        let limit = CpuLimit::discover_in(r, membership).expect("the v1 quota");
        assert_eq!(limit.cores, 3);
        assert_eq!(limit.sample(), Some(Sample { throttled: 2, waited_us: None }));
    }

    /// The cgroup directory a real quota can be set in here (root, with a
    /// cpu controller mounted), and the file its quota goes to.
    fn real_cgroup() -> Result<(PathBuf, Version), String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let root = Path::new(CGROUP_ROOT);
        let name = format!("ipc-platform-test-{}", std::process::id());
        if root.join("cgroup.controllers").exists() {
            let controllers = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
            if controllers.split_ascii_whitespace().any(|c| c == "cpu") {
                return Ok((root.join(name), Version::V2));
            }
            return Err("cgroup v2 without the cpu controller enabled at the root".into());
        }
        for mount in ["cpu", "cpu,cpuacct"] {
            if root.join(mount).join("cpu.cfs_quota_us").exists() {
                return Ok((root.join(mount).join(name), Version::V1));
            }
        }
        Err("no cgroup cpu controller mounted".into())
    }

    /// Not a test: the process the quota test moves into its cgroup.
    #[test]
    #[ignore = "helper process of a_real_quota_is_found_and_its_throttling_seen"]
    fn quota_child() {
        let Ok(dir) = std::env::var("IPC_PLATFORM_TEST_CGROUP") else { return };
        fs::write(Path::new(&dir).join("cgroup.procs"), "0\n").unwrap();
        let limit = CpuLimit::discover().expect("the quota of the cgroup just joined");
        println!("cores {}", limit.cores);
        let first = limit.sample().expect("readable counters");
        // Busy until the kernel throttles the cgroup (half a core of quota).
        loop {
            std::hint::black_box((0..10_000u64).sum::<u64>());
            if limit.sample().expect("readable counters").throttled > first.throttled {
                println!("throttled");
                return;
            }
        }
    }

    #[test]
    fn a_real_quota_is_found_and_its_throttling_seen() {
        let (dir, version) = match real_cgroup() {
            Ok(found) => found,
            Err(reason) => return eprintln!("skipped: {reason}"),
        };
        fs::create_dir(&dir).unwrap();
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = fs::remove_dir(&self.0);
            }
        }
        let _remove = Remove(dir.clone());
        match version {
            Version::V2 => fs::write(dir.join("cpu.max"), "50000 100000\n").unwrap(),
            Version::V1 => {
                fs::write(dir.join("cpu.cfs_period_us"), "100000\n").unwrap();
                fs::write(dir.join("cpu.cfs_quota_us"), "50000\n").unwrap();
            }
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cgroup::tests::quota_child", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("IPC_PLATFORM_TEST_CGROUP", &dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the child failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("cores 0\n"), "half a core of quota is no whole core: {text}");
        assert!(text.contains("throttled\n"), "{text}");
    }

    #[test]
    fn this_machine_is_read_without_error() {
        // Whatever the machine's layout, discovery must not fail loudly,
        // and a limit it finds must be readable.
        if let Some(limit) = CpuLimit::discover() {
            assert!(limit.sample().is_some(), "a quota whose counters cannot be read: {limit:?}");
        }
    }
}
