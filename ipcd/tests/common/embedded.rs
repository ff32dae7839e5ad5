//! An embedded server (`ipcd::Server`) on a thread of the test, serving
//! shared memory, a Unix stream socket and TCP on loopback, for the tests
//! of handlers that the daemon binary does not offer. Included by path
//! (`#[path = "common/embedded.rs"]`) by the test files that use it.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc_client::{Client, ClientOptions, Transport};
use ipcd::{Server, ServerBuilder, ServerError, ShutdownHandle};

/// How long a stopped server may take to return from `run` (a watchdog,
/// not a bound: the drain alone takes up to a second).
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// A running embedded server. Dropping it stops it and waits for it.
pub struct Embedded {
    socket: PathBuf,
    uds: PathBuf,
    tcp: SocketAddr,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    // Last, so the sockets' directory outlives the server.
    _dir: tempfile::TempDir,
}

impl Embedded {
    /// Starts a server with one worker, whose other settings and services
    /// `configure` adds, on all three transports.
    pub fn start(configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Embedded {
        let dir = tempfile::Builder::new().prefix("ipcd-embedded-").tempdir().unwrap();
        Embedded::start_in(dir, configure)
    }

    /// [`Embedded::start`] with its sockets in `dir`.
    pub fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(ServerBuilder) -> ServerBuilder) -> Embedded {
        let socket = dir.path().join("embedded.sock");
        let uds = dir.path().join("embedded-stream.sock");
        let builder = Server::builder().socket(&socket).uds(&uds).tcp("127.0.0.1:0".parse().unwrap()).workers(1);
        let server = configure(builder).build().expect("the embedded server builds");
        let tcp = server.tcp_addr().expect("a TCP address");
        let stop = server.shutdown_handle();
        let thread = std::thread::Builder::new().name("embedded-server".into()).spawn(move || server.run()).unwrap();
        Embedded { socket, uds, tcp, stop, thread: Some(thread), _dir: dir }
    }

    /// Shared memory, the Unix stream socket, TCP.
    pub fn transports(&self) -> [Transport; 3] {
        [Transport::Shm(self.socket.clone()), Transport::Uds(self.uds.clone()), Transport::Tcp(self.tcp)]
    }

    /// The control socket's path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// A client over `transport`.
    pub fn client(&self, transport: &Transport) -> Client {
        Client::connect_with(transport.clone(), ClientOptions::default())
            .unwrap_or_else(|e| panic!("cannot connect over {}: {e}", transport.name()))
    }

    /// Asks the server to stop, without waiting.
    pub fn begin_stop(&self) {
        self.stop.shutdown();
    }

    /// Whether `run` has returned.
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server and returns what `run` returned.
    ///
    /// # Panics
    ///
    /// Panics if it does not return within [`STOP_LIMIT`].
    pub fn stop(&mut self) -> Result<(), ServerError> {
        self.stop.shutdown();
        let thread = self.thread.take().expect("stopped once");
        let deadline = Instant::now() + STOP_LIMIT;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "the embedded server did not stop within {STOP_LIMIT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().expect("the embedded server thread panicked")
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if self.thread.is_some() && !std::thread::panicking() {
            self.stop().expect("the embedded server ran");
        } else if let Some(thread) = self.thread.take() {
            // Failing already: stop it, but do not wait on a stuck handler.
            self.stop.shutdown();
            drop(thread);
        }
    }
}
