//! Where the control socket lives, and binding it safely.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// The environment variable that names the control socket.
pub const SOCKET_ENV: &str = "IPCD_SOCKET";

/// The default control socket path: `$IPCD_SOCKET`, else
/// `$XDG_RUNTIME_DIR/ipcd.sock`, else `/tmp/ipcd-<uid>/ipcd.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return Path::new(&dir).join("ipcd.sock");
    }
    fallback_dir().join("ipcd.sock")
}

/// `/tmp/ipcd-<uid>`.
pub fn fallback_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/ipcd-{}", current_uid()))
}

/// This process's (real) user id.
pub fn current_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Checks that `dir` is a directory (not a symbolic link) owned by this
/// process's user and writable by nobody else, so that only that user (or
/// root) can have put a socket in it: for a client about to trust whatever
/// listens there, such as in [`fallback_dir`], which anyone could have
/// created in /tmp first. A `PermissionDenied` error says what was found.
pub fn check_private_dir(dir: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    let (uid, mode) = (current_uid(), meta.permissions().mode() & 0o7777);
    let found = if meta.file_type().is_symlink() {
        "a symbolic link".to_string()
    } else if !meta.is_dir() {
        "not a directory".to_string()
    } else if meta.uid() != uid {
        format!("owned by uid {}, not {uid}", meta.uid())
    } else if mode & 0o022 != 0 {
        format!("mode {mode:o}, writable by its group or others")
    } else {
        return Ok(());
    };
    Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} is {found}", dir.display())))
}

/// Creates `dir` with mode 0700 if it is missing; if it exists it must be a
/// directory owned by us with mode 0700 (a directory someone else prepared
/// in /tmp must not be trusted).
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let uid = rustix::process::getuid().as_raw();
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o777 != 0o700 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} exists but is not a directory of uid {uid} with mode 0700 (found mode {:o}, owner {})",
                dir.display(),
                meta.permissions().mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// A bound, listening control socket, and the lock that makes it ours.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listening socket (non-blocking, close-on-exec).
    pub listener: OwnedFd,
    /// Held for the daemon's life: a second daemon on the same path fails to
    /// take it instead of replacing our socket.
    pub lock: OwnedFd,
}

/// Binds a listening Unix stream socket at `path` with permission `mode`.
///
/// A socket file left by a dead daemon is replaced. A live daemon on the
/// same path (it holds `PATH.lock`, or it accepts connections) is an error,
/// never a takeover. A path that exists and is not a socket is an error.
pub fn bind_control_socket(path: &Path, mode: u32, backlog: i32) -> io::Result<BoundSocket> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    let lock: OwnedFd = lock_file.into();
    if rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another ipcd is running on {} (it holds {})", path.display(), Path::new(&lock_path).display()),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Nobody holds the lock, but make sure nothing answers either.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a live daemon already accepts connections on {}", path.display()),
                    ))
                }
                Err(_) => std::fs::remove_file(path)?,
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::bind(&fd, &addr)?;
    // Set the mode before listen(): nobody can connect in between.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    rustix::net::listen(&fd, backlog)?;
    Ok(BoundSocket { listener: fd, lock })
}

/// Removes the socket file at `path`. Taking `bound` proves the caller
/// still holds the lock, so the file is ours: no other daemon can have bound
/// the path meanwhile.
pub fn remove_control_socket(path: &Path, bound: &BoundSocket) -> io::Result<()> {
    let _held = &bound.lock;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_dir_is_ours_and_writable_by_nobody_else() {
        let dir = tempfile::tempdir().unwrap();
        let set_mode = |mode| std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        for mode in [0o700, 0o755, 0o750, 0o711] {
            set_mode(mode);
            check_private_dir(dir.path()).unwrap_or_else(|e| panic!("mode {mode:o}: {e}"));
        }
        for (mode, shown) in [(0o777, "777"), (0o770, "770"), (0o702, "702"), (0o1777, "1777")] {
            set_mode(mode);
            let err = check_private_dir(dir.path()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
            assert!(err.to_string().contains(&format!("mode {shown},")), "{err}");
        }
        set_mode(0o700);

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(check_private_dir(&link).unwrap_err().to_string().contains("symbolic link"));
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(check_private_dir(&file).unwrap_err().to_string().contains("not a directory"));
        let missing = check_private_dir(&dir.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);

        // Another user's directory, made here where this runs as root.
        if current_uid() == 0 {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65533), None).unwrap();
            let err = check_private_dir(&theirs).unwrap_err();
            assert!(err.to_string().contains("owned by uid 65533, not 0"), "{err}");
        }
    }

    #[test]
    fn live_daemon_is_not_replaced_and_stale_socket_is() {
        let dir = std::env::temp_dir().join(format!("ipcd-path-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let first = bind_control_socket(&path, 0o600, 16).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = bind_control_socket(&path, 0o600, 16).unwrap_err();
        assert!(err.to_string().contains("another ipcd"), "{err}");
        drop(first); // lock released, socket file left behind: stale
        let second = bind_control_socket(&path, 0o600, 16).unwrap();
        remove_control_socket(&path, &second).unwrap();
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        drop(second);
        let err = bind_control_socket(&path, 0o600, 16).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
