//! What a handler sees of a call: its payload, who made it, on which
//! session, to which service; and what a session carries for every call it
//! dispatches (its id, its caller, the services it may call).
//!
//! The caller is the process the kernel reported for the session's
//! connection (`SO_PEERCRED`, read once when it was accepted): for the
//! daemon's own sessions over the control socket and `--uds`, the client;
//! for a session the daemon brokered to a provider, the client as the
//! daemon saw it (`Incoming.caller`). TCP carries no credentials, so a TCP
//! call has no caller. A handler can thus decide per call whom it serves.

use std::sync::Arc;

use ipc_core::Credentials;

use crate::limits::Charge;
use crate::stats::SessionCalls;

/// The process that made a call, as the kernel reported it for the
/// connection it called on. The pid is 0 for a process in a pid namespace
/// the server cannot see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

impl From<Credentials> for Caller {
    fn from(c: Credentials) -> Caller {
        Caller { pid: c.pid, uid: c.uid, gid: c.gid }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// Who a session serves and what it may call: set when the session is
/// made, and passed with every request it dispatches.
#[derive(Clone, Debug)]
pub(crate) struct SessionContext {
    /// The session's id (the daemon's, for a brokered session).
    pub(crate) id: u64,
    /// Who is at the other end, where the transport says.
    pub(crate) caller: Option<Caller>,
    /// For a brokered session, the ids of the services it was granted,
    /// sorted; a call to any other is refused. `None`: every service.
    granted: Option<Box<[u16]>>,
    /// Its calls, counted by the dispatch (and read by `ipcd.clients`).
    pub(crate) calls: Arc<SessionCalls>,
}

impl SessionContext {
    /// A session that may call every service.
    pub(crate) fn new(id: u64, caller: Option<Caller>) -> SessionContext {
        SessionContext { id, caller, granted: None, calls: Arc::default() }
    }

    /// A session that may call only the services `granted` names (in any
    /// order, repeats allowed).
    pub(crate) fn brokered(id: u64, caller: Caller, granted: &[u16]) -> SessionContext {
        let mut granted = granted.to_vec();
        granted.sort_unstable();
        granted.dedup();
        SessionContext { id, caller: Some(caller), granted: Some(granted.into_boxed_slice()), calls: Arc::default() }
    }

    /// Whether this session may call the service with id `service`.
    pub(crate) fn may_call(&self, service: u16) -> bool {
        self.granted.as_ref().is_none_or(|granted| granted.binary_search(&service).is_ok())
    }
}

/// A call as its handler sees it: the request's bytes (a private copy:
/// the client cannot change them), and who asked, where.
///
/// ```no_run
/// use ipcd::{Request, Server, ServiceError};
///
/// fn whoami(req: &Request<'_>) -> Result<Vec<u8>, ServiceError> {
///     match req.caller() {
///         Some(caller) if caller.uid == 0 => Ok(b"root".to_vec()),
///         Some(caller) => Ok(format!("uid {} on session {}", caller.uid, req.session()).into_bytes()),
///         None => Err(ServiceError::with_code(403, "who are you? (TCP carries no credentials)")),
///     }
/// }
///
/// let server = Server::builder().socket("/tmp/whoami.sock").service("whoami", whoami).build()?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    payload: &'a [u8],
    service: &'a str,
    caller: Option<Caller>,
    session: u64,
    id: u64,
}

impl<'a> Request<'a> {
    pub(crate) fn new(payload: &'a [u8], service: &'a str, session: &SessionContext, id: u64) -> Request<'a> {
        Request { payload, service, caller: session.caller, session: session.id, id }
    }

    /// The request's bytes.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Who called: `None` over TCP, which carries no credentials.
    pub fn caller(&self) -> Option<Caller> {
        self.caller
    }

    /// The session's id, as the client sees it (`Client::session_id`) and
    /// the server logs it.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The name of the service called.
    pub fn service(&self) -> &'a str {
        self.service
    }

    /// The request's id on its session (increasing, chosen by the client).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// A call that a handler holds on to past its return, with the
/// [`Responder`](crate::Responder) that answers it: what
/// [`Request`] says, owned.
///
/// A request that came in chunks was assembled on the heap, and is
/// charged against the server's memory budget until this is dropped (a
/// clone is the handler's own copy, and is not charged).
#[derive(Debug)]
pub struct OwnedRequest {
    payload: Vec<u8>,
    service: Arc<str>,
    caller: Option<Caller>,
    session: u64,
    id: u64,
    /// What an assembled payload is charged.
    _charge: Option<Charge>,
}

impl Clone for OwnedRequest {
    fn clone(&self) -> OwnedRequest {
        OwnedRequest { payload: self.payload.clone(), service: Arc::clone(&self.service), _charge: None, ..*self }
    }
}

impl OwnedRequest {
    /// The request `id` of `session` to `service`, with its bytes (and
    /// what they are charged, if they were assembled).
    pub(crate) fn from_parts(
        payload: Vec<u8>,
        charge: Option<Charge>,
        service: Arc<str>,
        session: &SessionContext,
        id: u64,
    ) -> OwnedRequest {
        OwnedRequest { payload, service, caller: session.caller, session: session.id, id, _charge: charge }
    }

    /// The call as a [`Request`].
    pub fn as_request(&self) -> Request<'_> {
        Request {
            payload: &self.payload,
            service: &self.service,
            caller: self.caller,
            session: self.session,
            id: self.id,
        }
    }

    /// The request's bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The request's bytes, taken out.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Who called: `None` over TCP.
    pub fn caller(&self) -> Option<Caller> {
        self.caller
    }

    /// The session's id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The name of the service called.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The request's id on its session.
    pub fn id(&self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_brokered_session_may_call_only_what_it_was_granted() {
        let caller = Caller { pid: 7, uid: 1000, gid: 100 };
        let session = SessionContext::brokered(3, caller, &[5, 1, 5, 9]);
        for (service, allowed) in [(0, false), (1, true), (4, false), (5, true), (9, true), (u16::MAX, false)] {
            assert_eq!(session.may_call(service), allowed, "service {service}");
        }
        assert!(SessionContext::brokered(3, caller, &[]).granted.is_some_and(|g| g.is_empty()));
        assert!(!SessionContext::brokered(3, caller, &[]).may_call(0), "an empty grant grants nothing");
        let open = SessionContext::new(4, None);
        assert!(open.may_call(0) && open.may_call(u16::MAX));
    }

    #[test]
    fn an_owned_request_says_what_the_request_said() {
        let session = SessionContext::new(12, Some(Caller { pid: 1, uid: 2, gid: 3 }));
        let owned = OwnedRequest::from_parts(b"payload".to_vec(), None, Arc::from("kv.get"), &session, 99);
        let again = owned.as_request();
        assert_eq!(
            (again.payload(), again.service(), again.caller(), again.session(), again.id()),
            (&b"payload"[..], "kv.get", Some(Caller { pid: 1, uid: 2, gid: 3 }), 12, 99)
        );
        assert_eq!(owned.into_payload(), b"payload");
    }
}
