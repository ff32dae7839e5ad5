//! Many clients at once (the idle and scale scenarios): the open-files
//! limits they and their daemon need, the private daemon sized for them,
//! and a thread per client with a small stack.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::daemon::PrivateDaemon;

/// Open files beyond the clients' (the daemon's listeners, epoll and
/// eventfds, stdio: 22 are open before any client comes).
const FDS_SPARE: u64 = 64;
/// Shared memory each session may be charged in the daemon's budget: two
/// 64 KiB rings and the header, with room.
const SHM_PER_CLIENT: u64 = 256 << 10;
/// The stack of a client thread: a blocking client needs little, and
/// 10,000 threads of the default 2 MiB would reserve 20 GiB.
const CLIENT_STACK: usize = 256 << 10;

/// Raises this process's open-files limit to `fds` and some to spare,
/// for the processes it starts too (they inherit it); fails clearly if it
/// cannot.
pub fn raise_limits(fds: usize) -> anyhow::Result<u64> {
    let want = fds as u64 + FDS_SPARE;
    ipc_platform::raise_nofile_limit_to(want).with_context(|| {
        format!(
            "cannot raise the open-files limit to {want} (beyond the hard limit only a process with \
             CAP_SYS_RESOURCE may, up to /proc/sys/fs/nr_open): give fewer --clients"
        )
    })
}

/// A private daemon whose limits are given, not defaulted: `clients`
/// sessions of this uid, and the shared memory they may be charged.
pub fn start_daemon(binary: &Path, clients: usize, spin: Option<Duration>) -> anyhow::Result<PrivateDaemon> {
    let extra = [
        "--max-sessions-per-uid".to_string(),
        (clients + 16).to_string(),
        "--max-shm".to_string(),
        format!("{}K", (clients as u64 + 16) * SHM_PER_CLIENT / 1024),
        // All of them may connect at once, and the last of them waits
        // for the others' handshakes before the acceptor reads its hello.
        "--max-pending-handshakes".to_string(),
        (clients + 16).to_string(),
        "--handshake-timeout".to_string(),
        "60s".to_string(),
        // The budget holds the largest message to it, and says so.
        "--log-level".to_string(),
        "error".to_string(),
    ];
    PrivateDaemon::start_with(binary, clients, spin, &extra)
}

/// Starts a thread per client, `body(index)` on each.
pub fn spawn_clients<T: Send + 'static>(
    clients: usize,
    body: impl Fn(usize) -> T + Send + Sync + Clone + 'static,
) -> anyhow::Result<Vec<JoinHandle<T>>> {
    (0..clients)
        .map(|i| {
            let body = body.clone();
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(CLIENT_STACK)
                .spawn(move || body(i))
                .with_context(|| format!("cannot start client thread {i}"))
        })
        .collect()
}

/// Context switches (voluntary and not) of every thread of this process so
/// far, from `/proc/self/task/*/status`: each is a wake-up of a thread
/// that slept (or was preempted). Threads that ended are not counted.
pub fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}
