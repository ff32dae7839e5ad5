//! Whom a client trusts before it says hello: a socket in the fallback
//! directory only if that directory is the user's own, and over any Unix
//! socket only a daemon running as the user or as root.
//!
//! A client hands the daemon its requests and maps the memory the daemon
//! gives it, so it must know who listens. `/tmp/ipcd-<uid>` is the one
//! default place that is not private by construction: anyone may create it
//! in /tmp first, and with it the socket in it. The daemon's credentials,
//! as the kernel recorded them when it called `listen()` (`SO_PEERCRED`),
//! cannot be forged; TCP has none, and is trusted as configured.

use std::os::fd::AsFd;
use std::path::Path;

use crate::error::ConnectError;

/// Refuses a socket path in the fallback directory unless the directory is
/// the user's and writable by nobody else. A missing directory passes: the
/// connect then fails as not running.
pub(crate) fn check_directory(path: &Path) -> Result<(), ConnectError> {
    let fallback = ipc_platform::fallback_dir();
    if path.parent() != Some(fallback.as_path()) {
        return Ok(());
    }
    match ipc_platform::check_private_dir(&fallback) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ConnectError::Untrusted { path: path.to_path_buf(), reason: e.to_string() }),
    }
}

/// Refuses a daemon that runs as neither the user nor root.
pub(crate) fn check_daemon(socket: impl AsFd, path: &Path) -> Result<(), ConnectError> {
    let daemon = ipc_platform::peer_credentials(socket.as_fd())?;
    let uid = ipc_platform::current_uid();
    if daemon.uid == uid || daemon.uid == 0 {
        return Ok(());
    }
    Err(ConnectError::Untrusted {
        path: path.to_path_buf(),
        reason: format!("the daemon (pid {}) runs as uid {}, neither uid {uid} nor root", daemon.pid, daemon.uid),
    })
}
