//! [`ReplyGuard`]: a reply read in place, where it landed.

use std::io;

use crate::calls::LinkId;
use crate::client::{Client, Found};
use crate::link::ReplyRef;

/// A reply read in place, from [`Client::call_with`]. Its space in the ring
/// (or input buffer) is handed back when the guard is dropped.
///
/// Like the request side, it hands out no reference to shared memory: read
/// with [`ReplyGuard::read_at`], [`std::io::Read`], or copy it all out with
/// [`ReplyGuard::to_vec`].
#[must_use = "the reply's space is handed back when the guard drops"]
pub struct ReplyGuard<'c> {
    client: &'c mut Client,
    reply: Held,
    pos: usize,
}

/// Where a guarded reply is.
enum Held {
    /// On a link; its space is handed back when the guard drops.
    Link(LinkId, ReplyRef),
    /// Read out already: the link was lost while the call waited, and the
    /// loss read every reply left on it.
    Read(Vec<u8>),
}

impl<'c> ReplyGuard<'c> {
    pub(crate) fn new(client: &'c mut Client, found: Found) -> ReplyGuard<'c> {
        let reply = match found {
            Found::Link(link, r) => Held::Link(link, r),
            Found::Stashed(body) => Held::Read(body),
        };
        ReplyGuard { client, reply, pos: 0 }
    }

    /// The reply's length in bytes.
    pub fn len(&self) -> usize {
        match &self.reply {
            Held::Link(_, r) => r.len(),
            Held::Read(body) => body.len(),
        }
    }

    /// Whether the reply is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    ///
    /// # Panics
    ///
    /// Panics if the range is past the reply's end.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        match &self.reply {
            Held::Link(link, r) => self.client.link(*link).read_at(r, offset, dst),
            Held::Read(body) => {
                let end = offset.checked_add(dst.len()).filter(|&end| end <= body.len());
                let end = end.unwrap_or_else(|| panic!("read of {} bytes at {offset} past the reply", dst.len()));
                dst.copy_from_slice(&body[offset..end]);
            }
        }
    }

    /// Copies the whole reply into `out`, replacing its contents.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        match &self.reply {
            Held::Link(link, r) => self.client.link(*link).read_all(r, out),
            Held::Read(body) => {
                out.clear();
                out.extend_from_slice(body);
            }
        }
    }

    /// The whole reply, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.copy_into(&mut out);
        out
    }
}

/// Sequential reads from the start of the reply.
impl io::Read for ReplyGuard<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.len() - self.pos);
        self.read_at(self.pos, &mut buf[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::fmt::Debug for ReplyGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyGuard").field("len", &self.len()).finish_non_exhaustive()
    }
}

impl Drop for ReplyGuard<'_> {
    fn drop(&mut self) {
        if let Held::Link(link, r) = &self.reply {
            // The reply was handed out with the guard; a failure to ring
            // the peer loses the link, and the next call on it reports it.
            let _ = self.client.release(*link, r);
        }
    }
}
