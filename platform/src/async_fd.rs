//! Registering an owned fd with tokio's reactor (feature `tokio`).
//!
//! tokio's `AsyncFd::register_with_interest` is `unsafe` for any `AsRawFd`:
//! the fd must stay open, and name the same file, while it is registered.
//! An [`OwnedFd`] moved into the `AsyncFd` meets that by construction (only
//! the `AsyncFd` can close it, and only when it is dropped, after the
//! reactor let go), so the registration of one is safe, and offered here
//! so that the crates above keep `forbid(unsafe_code)`.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `fd`, registered with the current tokio runtime's reactor for
/// `interest`. Must be called within a runtime (tokio panics otherwise).
pub fn register_owned(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is owned and moved into the `AsyncFd`: nothing else can
    // close it or put another file behind its number while it is
    // registered, and it is closed only when the `AsyncFd` is dropped,
    // which deregisters it first.
    let registered = unsafe { AsyncFd::register_with_interest(fd, interest) };
    registered.map_err(io::Error::from)
}
