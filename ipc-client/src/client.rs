//! The client: handshake, then calls over the session's rings.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::handshake::{self, LENGTH_PREFIX, MAX_CONTROL_MESSAGE};
use ipc_core::{
    decode_error, Consumer, Direction, DoorbellKind, ErrorCode, Hello, Producer, PushError, Reject, SegmentLayout,
    ServerMessage, Welcome, PROTOCOL_VERSION,
};
use ipc_platform::futex::{self, Wake};
use ipc_platform::{Drained, EventFd, Mapping, SocketBell};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CallError, ConnectError};

/// How long a sleeping call waits between checks that the daemon is still
/// there. Bounds how late a daemon crash is noticed by a blocked call.
const LIVENESS_SLICE: Duration = Duration::from_millis(50);
/// The longest call timeout honoured.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Settings for a connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Bytes per ring to ask for (the daemon rounds up to a power of two and
    /// caps it); the largest payload is about half of it. Default 64 KiB.
    pub ring_capacity: u32,
    /// How the daemon should wake this client. Default: a futex in shared
    /// memory; [`DoorbellKind::Pollable`] gives an fd for your own poll loop.
    pub doorbell: DoorbellKind,
    /// Timeout of [`Client::call`] and friends. Default 30 s.
    pub call_timeout: Duration,
    /// How long to wait for the daemon's answer to the hello. Default 5 s.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            ring_capacity: 64 * 1024,
            doorbell: DoorbellKind::Futex,
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl ClientOptions {
    /// Sets [`ClientOptions::ring_capacity`].
    pub fn ring_capacity(mut self, bytes: u32) -> Self {
        self.ring_capacity = bytes;
        self
    }

    /// Raises [`ClientOptions::ring_capacity`] so that payloads of `bytes`
    /// fit (the largest payload is about half a ring).
    pub fn fit_payload(mut self, bytes: usize) -> Self {
        self.ring_capacity = self.ring_capacity.max(SegmentLayout::capacity_for_payload(bytes));
        self
    }

    /// Sets [`ClientOptions::doorbell`].
    pub fn doorbell(mut self, kind: DoorbellKind) -> Self {
        self.doorbell = kind;
        self
    }

    /// Sets [`ClientOptions::call_timeout`].
    pub fn call_timeout(mut self, t: Duration) -> Self {
        self.call_timeout = t;
        self
    }

    /// Sets [`ClientOptions::connect_timeout`].
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
}

/// A service resolved by name, ready to call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    id: u16,
    name: Arc<str>,
}

impl Service {
    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id requests carry.
    pub fn id(&self) -> u16 {
        self.id
    }
}

/// How the daemon wakes us.
enum Bell {
    Futex,
    Pollable(SocketBell),
}

/// What a sleeping call waits for.
#[derive(Clone, Copy)]
enum Await {
    Reply,
    Space,
}

/// A connection to ipcd. Calls take `&mut self`: one call at a time per
/// client; use one client per thread (a client is `Send`).
pub struct Client {
    control: UnixStream,
    requests: Producer,
    responses: Consumer,
    daemon_bell: EventFd,
    bell: Bell,
    services: HashMap<String, u16>,
    max_payload: usize,
    session_id: u64,
    next_id: u64,
    call_timeout: Duration,
    broken: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.session_id)
            .field("max_payload", &self.max_payload)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the daemon at the default path: `$IPCD_SOCKET`, else
    /// `$XDG_RUNTIME_DIR/ipcd.sock`, else `/tmp/ipcd-<uid>/ipcd.sock`.
    pub fn connect() -> Result<Client, ConnectError> {
        Client::connect_to(ipc_platform::default_socket_path())
    }

    /// Connects to the daemon listening at `path`.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Client, ConnectError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects to the daemon at `path` with `options`.
    pub fn connect_with(path: impl AsRef<Path>, options: ClientOptions) -> Result<Client, ConnectError> {
        let path = path.as_ref();
        let mut control = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ConnectError::NotRunning { path: path.to_path_buf(), source }
            }
            _ => ConnectError::Io(source),
        })?;
        control.set_read_timeout(Some(options.connect_timeout))?;
        control.set_write_timeout(Some(options.connect_timeout))?;
        let hello = handshake::encode(&Hello::new(options.ring_capacity, options.doorbell))
            .map_err(|e| ConnectError::Protocol(e.to_string()))?;
        control.write_all(&hello).map_err(|e| timeout_or(e, options.connect_timeout))?;
        let (message, fds) = read_answer(&control, options.connect_timeout)?;
        let welcome = match message {
            ServerMessage::Welcome(w) => w,
            ServerMessage::Reject(Reject::VersionMismatch { daemon, client }) => {
                return Err(ConnectError::VersionMismatch { daemon, client })
            }
            ServerMessage::Reject(r) => return Err(ConnectError::Rejected(r)),
        };
        let client = Client::from_welcome(control, welcome, fds, &options)?;
        client.control.set_read_timeout(None)?;
        client.control.set_write_timeout(None)?;
        Ok(client)
    }

    fn from_welcome(
        control: UnixStream,
        welcome: Welcome,
        fds: Vec<OwnedFd>,
        options: &ClientOptions,
    ) -> Result<Client, ConnectError> {
        let protocol = |m: String| ConnectError::Protocol(m);
        if welcome.version != PROTOCOL_VERSION {
            return Err(ConnectError::VersionMismatch { daemon: welcome.version, client: PROTOCOL_VERSION });
        }
        if welcome.doorbell != options.doorbell {
            return Err(protocol(format!("asked for a {:?} doorbell, got {:?}", options.doorbell, welcome.doorbell)));
        }
        if fds.len() != welcome.fd_count() {
            return Err(protocol(format!("welcome carries {} fds, expected {}", fds.len(), welcome.fd_count())));
        }
        let layout = SegmentLayout::new(welcome.ring_capacity).map_err(|e| protocol(e.to_string()))?;
        if welcome.max_payload != layout.max_payload() {
            return Err(protocol(format!(
                "maximum payload {} does not match ring capacity {}",
                welcome.max_payload, welcome.ring_capacity
            )));
        }
        let mut fds = fds.into_iter();
        let (memfd, daemon_bell) = (fds.next().unwrap(), fds.next().unwrap());
        let size = layout.segment_size();
        // Refused unless sealed against resizing and of the announced size.
        let region = Mapping::map(memfd.as_fd(), size).map_err(|e| protocol(e.to_string()))?;
        drop(memfd);
        SegmentLayout::read_header(&region, welcome.ring_capacity).map_err(|e| protocol(e.to_string()))?;
        let bell = match fds.next() {
            Some(fd) => Bell::Pollable(SocketBell::from_fd(fd)),
            None => Bell::Futex,
        };
        let services = welcome.services.into_iter().map(|s| (s.name, s.id)).collect();
        Ok(Client {
            control,
            requests: Producer::new(&region, &layout, Direction::Request),
            responses: Consumer::new(&region, &layout, Direction::Response),
            daemon_bell: EventFd::from_fd(daemon_bell)?,
            bell,
            services,
            max_payload: welcome.max_payload as usize,
            session_id: welcome.session_id,
            next_id: 1,
            call_timeout: options.call_timeout,
            broken: None,
        })
    }

    /// Resolves a service by name.
    pub fn service(&self, name: &str) -> Result<Service, CallError> {
        match self.services.get(name) {
            Some(&id) => Ok(Service { id, name: Arc::from(name) }),
            None => Err(CallError::UnknownService { name: name.to_string() }),
        }
    }

    /// The names of the services the daemon offers.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The largest request (and reply) payload, in bytes.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The daemon's id for this session (it appears in the daemon's logs).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// With [`DoorbellKind::Pollable`], the fd that becomes readable when a
    /// reply may be waiting, for a poll loop of your own.
    pub fn doorbell_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.bell {
            Bell::Pollable(b) => Some(b.as_fd()),
            Bell::Futex => None,
        }
    }

    /// Calls `service` with `request` and returns the reply, waiting at most
    /// the client's call timeout.
    pub fn call(&mut self, service: &Service, request: &[u8]) -> Result<Vec<u8>, CallError> {
        self.call_timeout(service, request, self.call_timeout)
    }

    /// As [`Client::call`], with its own timeout.
    pub fn call_timeout(&mut self, service: &Service, request: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.call_into_timeout(service, request, &mut reply, timeout)?;
        Ok(reply)
    }

    /// As [`Client::call`], writing the reply into `reply` (replacing its
    /// contents). Allocates nothing once `reply` has grown large enough.
    pub fn call_into(&mut self, service: &Service, request: &[u8], reply: &mut Vec<u8>) -> Result<(), CallError> {
        self.call_into_timeout(service, request, reply, self.call_timeout)
    }

    /// As [`Client::call_into`], with its own timeout.
    pub fn call_into_timeout(
        &mut self,
        service: &Service,
        request: &[u8],
        reply: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        if let Some(reason) = &self.broken {
            return Err(CallError::Disconnected { reason: reason.clone() });
        }
        if request.len() > self.max_payload {
            return Err(CallError::TooLarge { len: request.len(), max: self.max_payload });
        }
        // Timeouts beyond a year are taken as a year, so the deadline never
        // overflows.
        let timeout = timeout.min(MAX_TIMEOUT);
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        self.send(service.id, id, request, deadline, timeout)?;
        self.receive(service, id, reply, deadline, timeout)
    }

    /// Calls `service` with a serde-encoded request and decodes the reply.
    ///
    /// Both travel as `bincode::serde` with `bincode::config::standard()`
    /// (bincode 2): a service decodes the request and encodes its reply the
    /// same way.
    pub fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        service: &Service,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(request, config).map_err(|e| CallError::Encode(e.to_string()))?;
        let reply = self.call(service, &bytes)?;
        let (value, used) =
            bincode::serde::decode_from_slice(&reply, config).map_err(|e| CallError::Decode(e.to_string()))?;
        if used != reply.len() {
            return Err(CallError::Decode(format!("{} stray bytes after the reply", reply.len() - used)));
        }
        Ok(value)
    }

    fn fail(&mut self, reason: String) -> CallError {
        self.broken = Some(reason.clone());
        CallError::Disconnected { reason }
    }

    fn ring_daemon(&mut self) -> Result<(), CallError> {
        self.daemon_bell.notify().map_err(|e| self.fail(format!("cannot ring the daemon's doorbell: {e}")))
    }

    fn send(
        &mut self,
        service: u16,
        id: u64,
        request: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), CallError> {
        loop {
            match self.requests.try_push(service, 0, id, request) {
                Ok(()) => break,
                Err(PushError::Full) => {
                    // Calls are synchronous, so every reply waiting now
                    // belongs to an earlier call that timed out. Dropping
                    // them frees the daemon if it stalled on a full response
                    // ring, which is what keeps our request ring full.
                    self.discard_late_replies(id)?;
                    match self.requests.prepare_wait_space(request.len()) {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => return Err(self.fail(format!("request ring corrupt: {e}"))),
                    }
                    let waited = self.sleep(Await::Space, deadline, timeout);
                    self.requests.finish_wait_space();
                    waited?;
                }
                Err(PushError::TooLarge { len, max }) => return Err(CallError::TooLarge { len, max: max as usize }),
                Err(PushError::Corrupt(e)) => return Err(self.fail(format!("request ring corrupt: {e}"))),
                Err(e) => return Err(self.fail(e.to_string())),
            }
        }
        if self.requests.publish() {
            self.ring_daemon()?;
        }
        Ok(())
    }

    /// Consumes the replies of calls before `id` (calls that timed out) and
    /// hands their space back to the daemon.
    fn discard_late_replies(&mut self, id: u64) -> Result<(), CallError> {
        loop {
            match self.responses.try_peek() {
                Ok(Some(frame)) if frame.header.request_id < id => self.responses.consume(&frame),
                Ok(_) => break,
                Err(e) => return Err(self.fail(format!("response ring corrupt: {e}"))),
            }
        }
        if self.responses.release() {
            self.ring_daemon()?;
        }
        Ok(())
    }

    fn receive(
        &mut self,
        service: &Service,
        id: u64,
        reply: &mut Vec<u8>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let mut daemon_gone = None;
        loop {
            let frame = match self.responses.try_peek() {
                Ok(frame) => frame,
                Err(e) => return Err(self.fail(format!("response ring corrupt: {e}"))),
            };
            let Some(frame) = frame else {
                if let Some(reason) = daemon_gone {
                    // The ring was checked once more after the hang-up.
                    return Err(CallError::Disconnected { reason });
                }
                match self.responses.prepare_sleep() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => return Err(self.fail(format!("response ring corrupt: {e}"))),
                }
                let waited = self.sleep(Await::Reply, deadline, timeout);
                self.responses.finish_sleep();
                match waited {
                    Ok(()) => {}
                    Err(CallError::Disconnected { reason }) => daemon_gone = Some(reason),
                    Err(e) => return Err(e),
                }
                continue;
            };
            let header = frame.header;
            if header.request_id < id {
                // The late reply of an earlier call that timed out. Hand its
                // space back at once: the daemon may need it for ours.
                self.responses.consume(&frame);
                if self.responses.release() {
                    self.ring_daemon()?;
                }
                continue;
            }
            if header.request_id > id {
                let reason = format!("reply to request {} arrived while request {id} waits", header.request_id);
                return Err(self.fail(reason));
            }
            self.responses.read_payload(&frame, reply);
            self.responses.consume(&frame);
            if self.responses.release() {
                self.ring_daemon()?;
            }
            if !header.is_error() {
                return Ok(());
            }
            let (code, message) = decode_error(reply);
            reply.clear();
            return Err(match code {
                ErrorCode::UnknownService => CallError::UnknownService { name: service.name().to_string() },
                ErrorCode::Shutdown => CallError::Shutdown,
                _ => CallError::Remote { message },
            });
        }
    }

    /// Sleeps until the daemon rings, the deadline passes, or the daemon is
    /// found gone (which marks the client broken; the caller may still find
    /// a reply the daemon left before it went). The caller has announced the
    /// sleep in the ring.
    fn sleep(&mut self, what: Await, deadline: Instant, timeout: Duration) -> Result<(), CallError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Timeout { after: timeout });
            }
            let slice = (deadline - now).min(LIVENESS_SLICE);
            let woken = match &self.bell {
                Bell::Futex => {
                    let word: &AtomicU32 = match what {
                        Await::Reply => self.responses.data_waiter(),
                        Await::Space => self.requests.space_waiter(),
                    };
                    // The daemon swaps the word to 0 before it wakes us.
                    if word.load(Ordering::Acquire) != 1 {
                        return Ok(());
                    }
                    match futex::wait(word, 1, Some(slice)) {
                        Ok(Wake::Woken) => true,
                        Ok(Wake::TimedOut) => false,
                        Err(e) => return Err(self.fail(format!("futex wait failed: {e}"))),
                    }
                }
                Bell::Pollable(bell) => {
                    match ipc_platform::wait_readable(&[bell.as_fd(), self.control.as_fd()], Some(slice)) {
                        Ok(ready) if ready[0] => match bell.drain() {
                            Ok(Drained::Rang) | Ok(Drained::Quiet) => true,
                            Ok(Drained::Closed) => return Err(self.fail("the daemon closed the session".into())),
                            Err(e) => return Err(self.fail(format!("doorbell read failed: {e}"))),
                        },
                        Ok(_) => false,
                        Err(e) => return Err(self.fail(format!("poll failed: {e}"))),
                    }
                }
            };
            if woken {
                return Ok(());
            }
            match ipc_platform::peer_closed(self.control.as_fd()) {
                Ok(false) => {}
                Ok(true) => return Err(self.fail("the daemon closed the session".into())),
                Err(e) => return Err(self.fail(format!("control connection failed: {e}"))),
            }
        }
    }
}

fn timeout_or(e: io::Error, after: Duration) -> ConnectError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectError::Timeout { after },
        _ => ConnectError::Io(e),
    }
}

/// Reads the daemon's answer to the hello, with the fds that come with it.
fn read_answer(control: &UnixStream, timeout: Duration) -> Result<(ServerMessage, Vec<OwnedFd>), ConnectError> {
    let mut buf = Vec::with_capacity(256);
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if buf.len() >= LENGTH_PREFIX {
            let len = handshake::body_len([buf[0], buf[1], buf[2], buf[3]])
                .map_err(|e| ConnectError::Protocol(e.to_string()))?;
            if buf.len() >= LENGTH_PREFIX + len {
                if buf.len() > LENGTH_PREFIX + len {
                    return Err(ConnectError::Protocol("stray bytes after the daemon's answer".into()));
                }
                let message = handshake::decode_server_message(&buf[LENGTH_PREFIX..])
                    .map_err(|e| ConnectError::Protocol(e.to_string()))?;
                return Ok((message, fds));
            }
        }
        let (n, got) = ipc_platform::recv_with_fds(control.as_fd(), &mut chunk).map_err(|e| timeout_or(e, timeout))?;
        fds.extend(got);
        if n == 0 {
            return Err(ConnectError::Protocol("the daemon closed the connection during the handshake".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > LENGTH_PREFIX + MAX_CONTROL_MESSAGE {
            return Err(ConnectError::Protocol("the daemon's answer is too long".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Client>();
    }

    #[test]
    fn missing_socket_is_not_running() {
        let err = Client::connect_to("/nonexistent/ipcd.sock").unwrap_err();
        assert!(matches!(err, ConnectError::NotRunning { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ipcd.sock"));
    }
}
