//! Segments where `vm.memfd_noexec` is 1 or 2, as some distributions and
//! container runtimes set it. The kernel then adds `F_SEAL_EXEC` to every
//! memfd created without `MFD_EXEC` (and at 2, kernels 6.3 to 6.5 refuse a
//! memfd created without `MFD_NOEXEC_SEAL`).
//!
//! The sysctl belongs to a pid namespace, so each test re-runs this binary
//! as pid 1 of a new one (`unshare --pid --fork`), with only a helper test
//! selected; the helper sets the level there, leaving the machine's own
//! setting alone, and checks that a segment made by `create_sealed` passes
//! the receiver's checks and maps, or that a real daemon and a real client
//! in the namespace complete echo calls. Where the namespace or the level
//! cannot be set (not root, no `unshare`, a kernel without the sysctl), a
//! test prints why and passes.

mod common;

use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{die_with_parent, watchdog, Daemon, TEST_LIMIT};
use ipc_client::{Client, ClientOptions, DoorbellKind, Transport};
use ipc_core::SegmentLayout;
use ipc_platform::Mapping;
use rustix::fs::{MemfdFlags, SealFlags};

/// The sysctl, per pid namespace.
const SYSCTL: &str = "/proc/sys/vm/memfd_noexec";
/// Set in a helper's environment to the level it sets.
const LEVEL_ENV: &str = "IPCD_TEST_MEMFD_NOEXEC";
/// What a helper prints when its checks passed.
const RAN: &str = "IPCD-NOEXEC-RAN";
/// What a helper prints, followed by the reason, when it cannot set the level.
const SKIPPED: &str = "IPCD-NOEXEC-SKIPPED:";

#[test]
fn segment_passes_the_checks_under_memfd_noexec() {
    for level in [1, 2] {
        watchdog(TEST_LIMIT, move || in_noexec_namespace("helper_segment", level));
    }
}

#[test]
fn echo_works_under_memfd_noexec() {
    for level in [1, 2] {
        watchdog(TEST_LIMIT, move || in_noexec_namespace("helper_echo", level));
    }
}

/// Not a test: run by `segment_passes_the_checks_under_memfd_noexec` inside
/// the namespace.
#[test]
#[ignore = "helper of segment_passes_the_checks_under_memfd_noexec; does nothing when run directly"]
fn helper_segment() {
    let Some(level) = set_noexec_level() else {
        return;
    };
    let layout = SegmentLayout::new(4096).unwrap();
    let size = layout.segment_size();
    let fd = ipc_platform::create_sealed("ipcd-noexec-test", size as u64).expect("create_sealed");
    if let Err(e) = ipc_platform::check_sealed(fd.as_fd(), size as u64) {
        panic!("vm.memfd_noexec={level}: a segment from create_sealed is refused: {e}");
    }
    let region = match Mapping::map(fd.as_fd(), size) {
        Ok(region) => region,
        Err(e) => panic!("vm.memfd_noexec={level}: a segment from create_sealed does not map: {e}"),
    };
    // Written and read back through the mapping: it is read-write.
    layout.write_header(&region);
    SegmentLayout::read_header(&region, 4096).expect("the header just written");
    println!("{RAN}");
}

/// Not a test: run by `echo_works_under_memfd_noexec` inside the namespace.
#[test]
#[ignore = "helper of echo_works_under_memfd_noexec; does nothing when run directly"]
fn helper_echo() {
    let Some(level) = set_noexec_level() else {
        return;
    };
    // The daemon is a child of this process, so it runs in the namespace,
    // under the level just set, and dies with it.
    let daemon = Daemon::start(&[]);
    for doorbell in [DoorbellKind::Futex, DoorbellKind::Pollable] {
        let options = ClientOptions::default().doorbell(doorbell);
        let mut client = match Client::connect_with(Transport::Shm(daemon.socket().to_path_buf()), options) {
            Ok(c) => c,
            Err(e) => panic!("vm.memfd_noexec={level}, {doorbell:?}: cannot connect: {e}"),
        };
        assert_eq!(client.transport(), "shm");
        let echo = client.service("echo").unwrap();
        assert_eq!(client.call(&echo, b"not executable").unwrap(), b"not executable", "{doorbell:?}");
    }
    println!("{RAN}");
}

/// Runs the helper test `helper` of this binary as pid 1 of a new pid
/// namespace whose `vm.memfd_noexec` it sets to `level`, and fails if the
/// helper fails. Prints why and returns if that cannot be arranged here.
fn in_noexec_namespace(helper: &str, level: u8) {
    if !Path::new(SYSCTL).exists() {
        println!("skipped (vm.memfd_noexec={level}): this kernel has no {SYSCTL} (added in Linux 6.3)");
        return;
    }
    // A probe first, so that unshare failing is told apart from the helper
    // failing.
    match unshare().arg("true").stdin(Stdio::null()).output() {
        Err(e) => {
            println!("skipped (vm.memfd_noexec={level}): cannot run unshare: {e}");
            return;
        }
        Ok(probe) if !probe.status.success() => {
            let why = String::from_utf8_lossy(&probe.stderr);
            println!(
                "skipped (vm.memfd_noexec={level}): unshare --pid --fork fails here ({}): {}",
                probe.status,
                why.trim()
            );
            return;
        }
        Ok(_) => {}
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let output = unshare()
        .arg(exe)
        .args([helper, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(LEVEL_ENV, level.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("cannot run unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{helper} with vm.memfd_noexec={level} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    if let Some((_, why)) = stdout.lines().find_map(|l| l.split_once(SKIPPED)) {
        println!("skipped (vm.memfd_noexec={level}): {}", why.trim());
        return;
    }
    // libtest prints the test's name without a line break before running
    // it, so the marker may end a line rather than start it.
    assert!(stdout.contains(RAN), "{helper} with vm.memfd_noexec={level} did not run:\n{stdout}");
}

/// `unshare` making a new pid namespace whose pid 1 it forks. `--kill-child`
/// kills that pid 1 (and so everything in the namespace) when unshare dies,
/// and unshare dies with the thread that spawns it.
fn unshare() -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"]);
    die_with_parent(&mut cmd);
    cmd
}

/// In a helper: sets `vm.memfd_noexec` to the level in [`LEVEL_ENV`] and
/// checks the kernel applies it. `None` when run directly (no level asked
/// for), or when the level cannot be set, after printing [`SKIPPED`] and
/// why.
///
/// # Panics
///
/// Panics if this process is not pid 1 of its namespace (the sysctl must
/// never be written in the machine's own), or if the level is set but a
/// memfd created as before it shows no effect.
fn set_noexec_level() -> Option<u8> {
    let level: u8 = std::env::var(LEVEL_ENV).ok()?.parse().expect("a level in IPCD_TEST_MEMFD_NOEXEC");
    assert_eq!(std::process::id(), 1, "a helper that sets {SYSCTL} must run as pid 1 of a new pid namespace");
    // A child namespace may only be stricter than its parent: a lower level
    // is refused.
    if let Err(e) = std::fs::write(SYSCTL, format!("{level}\n")) {
        println!("{SKIPPED} cannot set {SYSCTL} to {level} in a new pid namespace: {e}");
        return None;
    }
    let now = std::fs::read_to_string(SYSCTL).expect("cannot read the sysctl back");
    assert_eq!(now.trim(), level.to_string(), "{SYSCTL} after writing {level}");
    // The level is in force: a memfd created with only CLOEXEC and
    // ALLOW_SEALING gets F_SEAL_EXEC, or at 2 (kernels 6.3 to 6.5) is
    // refused.
    match rustix::fs::memfd_create("probe", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING) {
        Ok(fd) => {
            let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
            assert!(seals.contains(SealFlags::EXEC), "vm.memfd_noexec={level} but a plain memfd has seals {seals:?}");
        }
        Err(rustix::io::Errno::ACCESS) if level == 2 => {}
        Err(e) => panic!("vm.memfd_noexec={level}: memfd_create: {e}"),
    }
    Some(level)
}
