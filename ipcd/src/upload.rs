//! Uploads: a request taken as it arrives, chunk by chunk, so that a
//! request of any length need not be held whole.
//!
//! An upload service's handler is called on the worker when a request
//! begins, and returns an [`Upload`]: the value that takes the request's
//! bytes as they come ([`Upload::chunk`], on the worker, in order) and,
//! once the last has come, the responder that answers the call
//! ([`Upload::finish`]). A request of one frame is an upload of one
//! chunk. An upload dropped before `finish` was abandoned: its caller
//! cancelled it, hung up, sent more than the largest message, or the
//! server stopped.

use crate::deferred::Responder;
use crate::request::Request;
use crate::service::ServiceError;

/// A request being received chunk by chunk; see
/// [`ServerBuilder::upload_service`](crate::ServerBuilder::upload_service).
///
/// Its methods run on the worker thread that serves the session, like an
/// inline handler: they should be quick (copy the bytes on, write them to
/// a file, hash them), handing anything slow to another thread. Dropped
/// without [`finish`](Upload::finish), the upload was abandoned (the call
/// has been answered otherwise, or its caller is gone).
///
/// ```no_run
/// use ipcd::{Responder, Server, ServiceError, Upload};
///
/// /// Counts a request's bytes, however long it is.
/// struct Count(u64);
///
/// impl Upload for Count {
///     fn chunk(&mut self, bytes: &[u8]) -> Result<(), ServiceError> {
///         self.0 += bytes.len() as u64;
///         Ok(())
///     }
///
///     fn finish(self: Box<Self>, responder: Responder) {
///         responder.reply(self.0.to_le_bytes().to_vec());
///     }
/// }
///
/// let server = Server::builder()
///     .socket("/tmp/count.sock")
///     .upload_service("count", |_request, _announced| Ok(Count(0)))
///     .build()?;
/// # Ok::<(), ipcd::ServerError>(())
/// ```
pub trait Upload: Send {
    /// The request's next bytes, in order (a chunk's, after the length the
    /// first one carries). An error answers the call with it at once; the
    /// rest of the request is discarded as it comes.
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), ServiceError>;

    /// The whole request has come: answer the call through `responder`,
    /// now or later, from any thread (as a deferred handler does).
    fn finish(self: Box<Self>, responder: Responder);
}

/// An upload service's handler: called when a request begins, with the
/// call (its payload empty: the bytes come to the upload) and the length
/// its sender announced, if it did.
pub(crate) type UploadFn = dyn Fn(&Request<'_>, Option<u64>) -> Result<Box<dyn Upload>, ServiceError> + Send + Sync;
