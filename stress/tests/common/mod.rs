//! What the stress tests share: the binaries under test, and the processes
//! a stress run leaves or should not leave, read from /proc.
//!
//! Every test file compiles its own copy of this module and uses only part
//! of it, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The stress binary and the ipcd beside it, both built by `cargo test`.
pub fn binaries() -> (PathBuf, PathBuf) {
    let stress = PathBuf::from(env!("CARGO_BIN_EXE_stress"));
    let ipcd = stress.with_file_name("ipcd");
    assert!(
        ipcd.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build it",
        ipcd.display()
    );
    (stress, ipcd)
}

/// Checks `cond` every 10 ms until it holds or `limit` has passed; returns
/// whether it held.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One process, named by its pid and its start time, so that a pid taken
/// over by another process later is not mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    start: u64,
}

/// The fields of `/proc/<pid>/stat` these tests read.
struct Stat {
    comm: String,
    state: char,
    ppid: i32,
    start: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: the other
    // fields are counted from the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    Some(Stat {
        comm: text[open + 1..close].to_string(),
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        // Field 22, the start time in clock ticks since boot.
        start: fields.get(19)?.parse().ok()?,
    })
}

impl Proc {
    /// Whether it has exited: its pid is gone, names another process, or
    /// is a zombie (exited, waiting to be reaped by its parent, or by an
    /// init that may never do so).
    pub fn is_gone(&self) -> bool {
        match stat(self.pid) {
            Some(s) => s.start != self.start || matches!(s.state, 'Z' | 'X'),
            None => true,
        }
    }

    /// Its command line, argument by argument.
    pub fn cmdline(&self) -> Vec<String> {
        let raw = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    }

    /// SIGKILLs it unless it is gone.
    pub fn kill(&self) {
        if !self.is_gone() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The live children of process `parent` whose command name is `comm`.
pub fn children(parent: u32, comm: &str) -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = stat(pid)?;
            (s.ppid == parent as i32 && s.comm == comm && !matches!(s.state, 'Z' | 'X'))
                .then_some(Proc { pid, start: s.start })
        })
        .collect()
}
