//! Sealed memfds: created by the daemon, checked by the receiver.
//!
//! A peer that could shrink a shared file would make the other side's next
//! access past the new end raise SIGBUS. The daemon therefore creates every
//! segment itself, sizes it, allocates its pages (so tmpfs running out of
//! space shows up here as an error rather than as SIGBUS on first touch), and
//! seals it with [`SEALS`] before the fd leaves the process. A receiver maps
//! nothing that lacks one of those seals, carries a seal that forbids
//! writing, or is not of the size it expects.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

/// The seals every segment carries, and a receiver requires: it can be
/// neither shrunk nor grown, and no further seal can be added or removed.
pub const SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW).union(SealFlags::SEAL);

/// The seals a receiver refuses: each forbids writing through a new shared
/// mapping, and both rings are written by both sides.
const WRITE_SEALS: SealFlags = SealFlags::WRITE.union(SealFlags::FUTURE_WRITE);

/// Creates a close-on-exec memfd of `size` bytes with its pages allocated,
/// sealed with [`SEALS`], and, where the kernel has `MFD_NOEXEC_SEAL`
/// (Linux 6.3), not executable and sealed so (`F_SEAL_EXEC`).
///
/// A segment is never executed, and asking for that explicitly is what
/// `vm.memfd_noexec` expects: at `1` the kernel adds `F_SEAL_EXEC` to a
/// memfd created without it anyway, and at `2` kernels 6.3 to 6.5 refuse
/// such a memfd outright.
pub fn create_sealed(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create_noexec(name)?;
    rustix::fs::ftruncate(&fd, size)?;
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)?;
    rustix::fs::fcntl_add_seals(&fd, SEALS)?;
    Ok(fd)
}

/// `memfd_create` with `MFD_NOEXEC_SEAL`, or without it on kernels that do
/// not know the flag.
///
/// The answer is not remembered: on a kernel older than 6.3 the refused
/// call costs one failed system call per segment, next to the several calls
/// and the page allocation that creating a segment takes anyway.
fn memfd_create_noexec(name: &str) -> io::Result<OwnedFd> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
        // An unknown flag is EINVAL. So is a name that is too long, which
        // the second call then reports in the same way.
        Err(rustix::io::Errno::INVAL) => Ok(rustix::fs::memfd_create(name, flags)?),
        created => Ok(created?),
    }
}

/// Why a received memfd was refused.
///
/// [`SealError::Io`]'s message includes the `io::Error`'s, so `source()` is
/// `None`: the daemon and the client pass the message on as it is (in a
/// log line, a reject reason, a connect error), and a printed chain names
/// the cause once. The `io::Error` itself is the variant's field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// One or more of [`SEALS`] is missing: the file could be resized, or
    /// its seals changed after the check.
    #[error("memfd seals {} lack the required {}", SealNames(*found), SealNames(*missing))]
    MissingSeals {
        /// The seals found, as raw bits.
        found: u32,
        /// The seals of [`SEALS`] not found, as raw bits.
        missing: u32,
    },
    /// A seal that forbids writing (`F_SEAL_WRITE` or `F_SEAL_FUTURE_WRITE`)
    /// is present, so the segment cannot be mapped read-write and shared.
    #[error(
        "memfd seals {} include {}, which forbids the read-write shared mapping a segment needs",
        SealNames(*found),
        SealNames(found & WRITE_SEALS.bits())
    )]
    WriteSealed {
        /// The seals found, as raw bits.
        found: u32,
    },
    /// The size is not the one announced.
    #[error("memfd size {found} is not the announced {expected}")]
    Size {
        /// The size found.
        found: u64,
        /// The size expected.
        expected: u64,
    },
    /// Reading the seals or the size, or mapping, failed (not a memfd, for
    /// example).
    #[error("cannot inspect or map memfd: {0}")]
    Io(io::Error),
}

/// Seal bits shown as hex and by name, `0x27 (SHRINK|GROW|SEAL|EXEC)`; bits
/// this code has no name for are shown as hex after the names.
struct SealNames(u32);

impl fmt::Display for SealNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(SealFlags, &str); 6] = [
            (SealFlags::SHRINK, "SHRINK"),
            (SealFlags::GROW, "GROW"),
            (SealFlags::SEAL, "SEAL"),
            (SealFlags::WRITE, "WRITE"),
            (SealFlags::FUTURE_WRITE, "FUTURE_WRITE"),
            (SealFlags::EXEC, "EXEC"),
        ];
        write!(f, "{:#x} (", self.0)?;
        let mut rest = self.0;
        let mut separator = "";
        for (flag, name) in NAMES {
            if rest & flag.bits() != 0 {
                write!(f, "{separator}{name}")?;
                rest &= !flag.bits();
                separator = "|";
            }
        }
        if rest != 0 {
            write!(f, "{separator}{rest:#x}")?;
        } else if separator.is_empty() {
            f.write_str("none")?;
        }
        f.write_str(")")
    }
}

/// Checks that `fd` carries every seal of [`SEALS`] and none that forbids
/// writing, and is `size` bytes long, so that it can be mapped read-write
/// and no access to the mapping can raise SIGBUS.
///
/// Other seals are accepted. A seal only ever forbids something, and with
/// `F_SEAL_SEAL` present the set cannot change after this check. The one
/// other seal the kernel has besides the write seals, `F_SEAL_EXEC`, forbids
/// making the file executable, which a segment never is (the kernel adds it
/// to every memfd under `vm.memfd_noexec=1` or `2`). A seal newer than this
/// code can at worst forbid something the receiver then does, which fails
/// as an error of that call, not as a fault later.
pub fn check_sealed(fd: BorrowedFd<'_>, size: u64) -> Result<(), SealError> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| SealError::Io(e.into()))?;
    if !seals.contains(SEALS) {
        return Err(SealError::MissingSeals { found: seals.bits(), missing: SEALS.difference(seals).bits() });
    }
    if seals.intersects(WRITE_SEALS) {
        return Err(SealError::WriteSealed { found: seals.bits() });
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
    use crate::Mapping;

    /// A memfd of `size` bytes that allows sealing and carries no seal of
    /// its own (but `F_SEAL_EXEC` where `vm.memfd_noexec` adds it).
    fn unsealed(size: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("unsealed", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    #[test]
    fn sealed_memfd_cannot_be_resized_and_passes_the_check() {
        let fd = create_sealed("test", 8192).unwrap();
        check_sealed(fd.as_fd(), 8192).unwrap();
        assert_eq!(try_resize(&fd, 4096).unwrap_err().raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()));
        assert_eq!(try_resize(&fd, 1 << 20).unwrap_err().raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()));
        assert!(matches!(check_sealed(fd.as_fd(), 4096), Err(SealError::Size { found: 8192, expected: 4096 })));
    }

    #[test]
    fn created_segment_is_not_executable_where_the_kernel_can_say_so() {
        match rustix::fs::memfd_create("probe", MemfdFlags::CLOEXEC | MemfdFlags::NOEXEC_SEAL) {
            Err(rustix::io::Errno::INVAL) => {
                eprintln!("skipped: this kernel has no MFD_NOEXEC_SEAL (added in Linux 6.3)");
                return;
            }
            created => drop(created.unwrap()),
        }
        let fd = create_sealed("test", 8192).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert_eq!(seals, SEALS | SealFlags::EXEC, "seals {seals:?}");
        let mode = rustix::fs::fstat(&fd).unwrap().st_mode;
        assert_eq!(mode & 0o111, 0, "mode {mode:o}");
        check_sealed(fd.as_fd(), 8192).unwrap();
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = unsealed(4096);
        let err = check_sealed(fd.as_fd(), 4096).unwrap_err();
        assert!(matches!(err, SealError::MissingSeals { missing: 0x7, .. }), "{err}");
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        let err = check_sealed(fd.as_fd(), 4096).unwrap_err();
        assert!(matches!(err, SealError::MissingSeals { missing: 0x5, .. }), "{err}");
    }

    #[test]
    fn extra_exec_seal_is_accepted() {
        let fd = unsealed(8192);
        // Sealing an executable memfd against exec seals it against writes
        // as well (the kernel takes it for a program being frozen), so the
        // execute bits go first, as MFD_NOEXEC_SEAL does.
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        match rustix::fs::fcntl_add_seals(&fd, SEALS | SealFlags::EXEC) {
            Err(rustix::io::Errno::INVAL) => {
                eprintln!("skipped: this kernel has no F_SEAL_EXEC (added in Linux 6.3)");
                return;
            }
            added => added.unwrap(),
        }
        check_sealed(fd.as_fd(), 8192).unwrap();
        let region = Mapping::map(fd.as_fd(), 8192).unwrap();
        assert_eq!(region.len(), 8192);
    }

    #[test]
    fn write_seals_are_refused_before_mapping() {
        for (seal, name) in [(SealFlags::WRITE, "WRITE"), (SealFlags::FUTURE_WRITE, "FUTURE_WRITE")] {
            let fd = unsealed(8192);
            rustix::fs::fcntl_add_seals(&fd, SEALS | seal).unwrap();
            let found = rustix::fs::fcntl_get_seals(&fd).unwrap();
            let exec = if found.contains(SealFlags::EXEC) { "|EXEC" } else { "" };
            let expected = format!(
                "memfd seals {:#x} (SHRINK|GROW|SEAL|{name}{exec}) include {:#x} ({name}), \
                 which forbids the read-write shared mapping a segment needs",
                found.bits(),
                seal.bits()
            );
            assert_eq!(check_sealed(fd.as_fd(), 8192).unwrap_err().to_string(), expected);
            // Refused by the check, not by mmap failing after it.
            let Err(err) = Mapping::map(fd.as_fd(), 8192) else { panic!("a segment sealed {name} was mapped") };
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn seals_are_named_in_messages() {
        assert_eq!(SealNames(0).to_string(), "0x0 (none)");
        assert_eq!(SealNames(0x27).to_string(), "0x27 (SHRINK|GROW|SEAL|EXEC)");
        assert_eq!(SealNames(0x47).to_string(), "0x47 (SHRINK|GROW|SEAL|0x40)");
        assert_eq!(SealNames(0x40).to_string(), "0x40 (0x40)");
        let err = SealError::MissingSeals { found: 0x22, missing: 0x5 };
        assert_eq!(err.to_string(), "memfd seals 0x22 (SHRINK|EXEC) lack the required 0x5 (GROW|SEAL)");
    }

    #[test]
    fn size_and_io_errors_name_their_values() {
        let err = SealError::Size { found: 8192, expected: 4096 };
        assert_eq!(err.to_string(), "memfd size 8192 is not the announced 4096");
        // Not a memfd: F_GET_SEALS fails with EINVAL.
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = check_sealed(file.as_fd(), 4096).unwrap_err();
        assert!(matches!(&err, SealError::Io(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())));
        let cause = io::Error::from(rustix::io::Errno::INVAL);
        assert_eq!(err.to_string(), format!("cannot inspect or map memfd: {cause}"));
        assert!(std::error::Error::source(&err).is_none(), "the message already names the cause");
    }
}
