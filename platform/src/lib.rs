//! The only crate of ipcd that talks to the kernel: sealed memfds, shared
//! mappings, eventfds, futexes on shared words, `SCM_RIGHTS` fd passing and
//! peer credentials, the byte-stream calls of the Unix-socket and TCP
//! transports, child processes that cannot outlive their parent, what
//! `/proc` says about the machine (free cores, total memory), and the
//! service manager's side (sockets it passes, readiness and watchdog
//! notifications).
//!
//! ```
//! use std::os::fd::AsFd;
//! use ipc_platform::{check_sealed, create_sealed, Mapping};
//!
//! let fd = create_sealed("example", 8192).unwrap();
//! check_sealed(fd.as_fd(), 8192).unwrap();
//! let region = Mapping::map(fd.as_fd(), 8192).unwrap(); // checks the seals again
//! assert!(Mapping::map(fd.as_fd(), 4096).is_err()); // wrong size: refused
//! assert_eq!(region.len(), 8192);
//! ```

mod activation;
#[cfg(feature = "tokio")]
pub mod async_fd;
mod bell;
mod cgroup;
mod cpu;
mod eventfd;
mod fdpass;
pub mod futex;
mod hangup;
mod listener;
mod mapping;
mod memfd;
mod memory;
mod notify;
mod path;
mod process;
mod socket;
pub mod stream;

pub use activation::{take_passed_sockets, PassedSocket};
pub use bell::{Drained, SocketBell};
pub use cpu::{runnable_threads, usable_cores, CoreGauge};
pub use eventfd::EventFd;
pub use fdpass::{recv_refusing_fds, recv_with_fds, send_with_fds, MAX_FDS};
pub use hangup::HangupWatch;
pub use listener::{prepare_listener, unix_listener_path, ListenerFamily};
pub use mapping::Mapping;
pub use memfd::{check_sealed, create_sealed, try_resize, SealError, SEALS};
pub use memory::total_memory;
pub use notify::{notify, watchdog_interval, ServiceState};
pub use path::{
    bind_control_socket, check_private_dir, current_uid, default_socket_path, ensure_private_dir, fallback_dir,
    remove_control_socket, BoundSocket, SOCKET_ENV,
};
pub use process::{die_with_parent, ProcessHandle};
pub use socket::{
    connect_unix, peer_closed, peer_credentials, raise_nofile_limit, raise_nofile_limit_to, wait_readable,
    PeerCredentials,
};
