//! Sealed memfds: created by the daemon, checked by the receiver.
//!
//! A peer that could shrink a shared file would make the other side's next
//! access past the new end raise SIGBUS. The daemon therefore creates every
//! segment itself, sizes it, allocates its pages (so tmpfs running out of
//! space shows up here as an error rather than as SIGBUS on first touch), and
//! seals it with exactly [`SEALS`] before the fd leaves the process. A
//! receiver maps nothing whose seals or size are not what it expects.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

/// The seals every segment carries: it can be neither shrunk nor grown, and
/// no further seal can be added or removed.
pub const SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW).union(SealFlags::SEAL);

/// Creates a close-on-exec memfd of `size` bytes with its pages allocated,
/// sealed with [`SEALS`].
pub fn create_sealed(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, size)?;
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)?;
    rustix::fs::fcntl_add_seals(&fd, SEALS)?;
    Ok(fd)
}

/// Why a received memfd was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum SealError {
    /// The seals are not exactly [`SEALS`].
    Seals {
        /// The seals found, as raw bits.
        found: u32,
        /// The seals required, as raw bits.
        expected: u32,
    },
    /// The size is not the one announced.
    Size {
        /// The size found.
        found: u64,
        /// The size expected.
        expected: u64,
    },
    /// Reading the seals or the size, or mapping, failed (not a memfd, for
    /// example).
    Io(io::Error),
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Seals { found, expected } => {
                write!(f, "memfd seals {found:#x} are not the required {expected:#x}")
            }
            SealError::Size { found, expected } => {
                write!(f, "memfd size {found} is not the announced {expected}")
            }
            SealError::Io(e) => write!(f, "cannot inspect or map memfd: {e}"),
        }
    }
}

impl std::error::Error for SealError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SealError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Checks that `fd` is sealed with exactly [`SEALS`] and is `size` bytes
/// long, so that mapping it cannot lead to SIGBUS.
pub fn check_sealed(fd: BorrowedFd<'_>, size: u64) -> Result<(), SealError> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| SealError::Io(e.into()))?;
    if seals != SEALS {
        return Err(SealError::Seals { found: seals.bits(), expected: SEALS.bits() });
    }
    let stat = rustix::fs::fstat(fd).map_err(|e| SealError::Io(e.into()))?;
    let found = stat.st_size as u64;
    if found != size {
        return Err(SealError::Size { found, expected: size });
    }
    Ok(())
}

/// Tries to resize `fd`; used by tests to show the seals hold.
pub fn try_resize(fd: impl AsFd, size: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, size)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfd_cannot_be_resized_and_passes_the_check() {
        let fd = create_sealed("test", 8192).unwrap();
        check_sealed(fd.as_fd(), 8192).unwrap();
        assert_eq!(try_resize(&fd, 4096).unwrap_err().raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()));
        assert_eq!(try_resize(&fd, 1 << 20).unwrap_err().raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()));
        assert!(matches!(check_sealed(fd.as_fd(), 4096), Err(SealError::Size { found: 8192, expected: 4096 })));
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = rustix::fs::memfd_create("unsealed", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        assert!(matches!(check_sealed(fd.as_fd(), 4096), Err(SealError::Seals { found: 0, .. })));
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        assert!(matches!(check_sealed(fd.as_fd(), 4096), Err(SealError::Seals { .. })));
    }
}
