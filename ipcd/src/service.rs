//! Services: named handlers that map a request's bytes to a reply.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use ipc_core::{encode_error, ErrorCode, FrameHeader, FLAG_ERROR};

/// An error a handler returns; the client receives its message as a remote
/// error for that call alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    message: String,
}

impl ServiceError {
    /// An error with `message` (cut to 1024 bytes on the wire).
    pub fn new(message: impl Into<String>) -> ServiceError {
        ServiceError { message: message.into() }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A handler that writes its reply into a buffer the worker reuses, so a
/// service that does not allocate costs no allocation per call.
///
/// `request` is a private copy of the client's bytes; `reply` arrives empty.
/// Handlers run on a worker thread: one that blocks delays the other
/// sessions of that worker.
pub type Handler = Arc<dyn Fn(&[u8], &mut Vec<u8>) -> Result<(), ServiceError> + Send + Sync + 'static>;

/// The services of a server, by id. Ids are indices: the first service is 0.
#[derive(Clone, Default)]
pub(crate) struct ServiceTable {
    entries: Vec<(String, Handler)>,
}

impl ServiceTable {
    pub(crate) fn add(&mut self, name: String, handler: Handler) -> Result<(), String> {
        if name.is_empty() || name.len() > 256 {
            return Err(format!("service name {name:?} must be 1 to 256 bytes"));
        }
        if self.entries.iter().any(|(n, _)| *n == name) {
            return Err(format!("service {name:?} is registered twice"));
        }
        if self.entries.len() >= usize::from(u16::MAX) {
            return Err(format!("more than {} services", u16::MAX));
        }
        self.entries.push((name, handler));
        Ok(())
    }

    /// The id of the service called `name`, if there is one.
    pub(crate) fn id(&self, name: &str) -> Option<u16> {
        self.entries.iter().position(|(n, _)| n == name).map(|i| i as u16)
    }

    pub(crate) fn get(&self, id: u16) -> Option<&Handler> {
        self.entries.get(usize::from(id)).map(|(_, h)| h)
    }

    pub(crate) fn directory(&self) -> Vec<ipc_core::ServiceEntry> {
        self.entries
            .iter()
            .enumerate()
            .map(|(id, (name, _))| ipc_core::ServiceEntry { name: name.clone(), id: id as u16 })
            .collect()
    }
}

/// The message of the answer to a request taken while shutting down.
const SHUTDOWN_MESSAGE: &str = "daemon is shutting down; the request was not executed";

/// The payload length of that answer (an error body: a `u32` code, then
/// the message), so a session can tell whether it fits before taking the
/// request it answers.
pub(crate) const SHUTDOWN_REPLY_LEN: usize = 4 + SHUTDOWN_MESSAGE.len();

/// Checks a request's header against the session's rules: no response
/// flags, and ids strictly increasing (so a reply can never be matched to
/// the wrong request). Returns the new last id.
pub(crate) fn check_request(header: &FrameHeader, last_id: u64) -> Result<u64, String> {
    if header.flags != 0 {
        return Err(format!("request {} carries response flags {:#x}", header.request_id, header.flags));
    }
    if header.request_id <= last_id {
        return Err(format!("request id {} is not above the previous {last_id}", header.request_id));
    }
    Ok(header.request_id)
}

/// Runs one request on any transport, leaving the reply or error body in
/// `reply`; returns the response flags. A handler's error, panic or
/// oversized reply becomes an error reply for this request alone. With
/// `shutting_down`, the handler is not run.
pub(crate) fn dispatch(
    services: &ServiceTable,
    header: &FrameHeader,
    request: &[u8],
    reply: &mut Vec<u8>,
    max_payload: usize,
    shutting_down: bool,
    session: u64,
) -> u16 {
    reply.clear();
    if shutting_down {
        encode_error(ErrorCode::Shutdown, SHUTDOWN_MESSAGE, reply);
        return FLAG_ERROR;
    }
    let Some(handler) = services.get(header.service) else {
        encode_error(ErrorCode::UnknownService, &format!("no service has id {}", header.service), reply);
        return FLAG_ERROR;
    };
    match catch_unwind(AssertUnwindSafe(|| handler(request, reply))) {
        Ok(Ok(())) if reply.len() <= max_payload => 0,
        Ok(Ok(())) => {
            let msg = format!("reply of {} bytes exceeds the negotiated maximum {max_payload}", reply.len());
            encode_error(ErrorCode::ReplyTooLarge, &msg, reply);
            FLAG_ERROR
        }
        Ok(Err(e)) => {
            encode_error(ErrorCode::Handler, e.message(), reply);
            FLAG_ERROR
        }
        Err(_) => {
            tracing::error!(session, service = header.service, "service handler panicked");
            encode_error(ErrorCode::HandlerPanicked, "service handler panicked", reply);
            FLAG_ERROR
        }
    }
}

/// `echo`: the reply is the request.
pub(crate) fn echo() -> Handler {
    Arc::new(|request, reply| {
        reply.extend_from_slice(request);
        Ok(())
    })
}

/// `ping`: an empty reply.
pub(crate) fn ping() -> Handler {
    Arc::new(|_, _| Ok(()))
}

/// `debug.sleep`: sleeps for the little-endian u32 of milliseconds in the
/// request (at most 10 s), then replies empty. Only registered with
/// `--debug-services`, for tests that need a call to stay in flight.
pub(crate) fn debug_sleep() -> Handler {
    Arc::new(|request, _| {
        let ms: [u8; 4] = request
            .try_into()
            .map_err(|_| ServiceError::new(format!("debug.sleep takes a 4-byte u32, got {} bytes", request.len())))?;
        let ms = u32::from_le_bytes(ms).min(10_000);
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
        Ok(())
    })
}

/// `debug.fail`: always returns an error naming the request length.
pub(crate) fn debug_fail() -> Handler {
    Arc::new(|request, _| Err(ServiceError::new(format!("debug.fail asked to fail ({} bytes)", request.len()))))
}
