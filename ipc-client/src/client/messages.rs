//! Messages longer than a frame: requests sent as chunks (a call's whole
//! request, or an upload written as it is produced) and replies read as
//! their chunks come ([`ReplyReader`]). How chunks look on the wire is
//! `ipc_core::message`'s; how replies in chunks are assembled is
//! `client/inbound.rs`'s.
//!
//! A request in chunks is one request: its first chunk takes the link's
//! next id and records it as sent; the rest go out as room comes, the
//! client waiting for room as for any request (replies that come
//! meanwhile are taken aside, so a peer whose replies back up is never
//! stuck behind them). If no room comes in time, or the caller gives the
//! request up before its end (an upload dropped or given the wrong
//! length), the client sends a cancel for it: the peer drops what it has,
//! and the request did not run ([`CallError::SendTimeout`]). If the peer
//! answers before the last chunk (a refusal), the rest is not sent
//! (cancelled the same way), and the answer is the request's outcome. If
//! the link is lost on the way, the request never reached its peer whole
//! and was not run ([`CallError::NotConnected`] or [`CallError::Shutdown`]).

use std::io;

use super::inbound::Step;
use super::outgoing::{Gathered, Outgoing, Pushed};
use super::{Client, Deadline, Next, Service};
use crate::calls::{Awaiting, Settled, Ticket};
use crate::error::CallError;

impl Client {
    /// Sends `request` to `service`, waiting for room until the deadline:
    /// as one frame if it fits, else as chunks (see the module docs).
    pub(super) fn send_message(
        &mut self,
        service: &Service,
        request: &[u8],
        dl: &mut Deadline,
    ) -> Result<Ticket, CallError> {
        let link = self.link_of(service)?;
        self.check_message_len(request.len() as u64)?;
        let max = self.slots[link].max_payload;
        if request.len() <= max {
            return self.start(service, request.len(), |buf| buf.write_at(0, request), true, dl).map(|(t, _)| t);
        }
        let mut out = Outgoing::new(link, service.id, Some(request.len() as u64));
        let (first, mut rest) = request.split_at(out.room(max));
        self.send_chunk(service, &mut out, first, false, dl)?;
        let ticket = out.ticket().expect("a chunk was sent");
        // As many chunks as fit at a time, waiting for room between.
        while self.push_chunks(&mut out, &mut rest)? == Pushed::Full {
            let len = out.room(max).min(rest.len());
            if let Err(e) = self.wait_for_room(out.room_for(len), dl) {
                // Answered meanwhile: the next push stops and cancels.
                if !self.calls.kept(ticket) {
                    return Err(self.abort(&mut out, e));
                }
            }
        }
        Ok(ticket)
    }

    /// Starts an upload to `service`: a request written bit by bit through
    /// the returned [`Upload`] (an [`io::Write`]), sent in chunks as it is
    /// written, of `len` bytes if known (`None`: its length is known at
    /// [`Upload::finish`] only). Each chunk waits for room up to the call
    /// timeout, so a peer that reads slowly slows the writer down.
    ///
    /// At most [`ClientOptions::max_message`](crate::ClientOptions::max_message)
    /// bytes ([`CallError::TooLarge`]).
    ///
    /// ```no_run
    /// # let mut client = ipc_client::Client::connect()?;
    /// let store = client.service("blob.put")?;
    /// let mut upload = client.upload(&store, None)?;
    /// std::io::copy(&mut std::fs::File::open("/etc/hostname")?, &mut upload)?;
    /// let receipt = upload.finish()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn upload(&mut self, service: &Service, len: Option<u64>) -> Result<Upload<'_>, CallError> {
        let link = self.link_of(service)?;
        let mut dl = Deadline::new(self.options.call_timeout);
        self.ensure_connected(service, link, &mut dl)?;
        let buf = std::mem::take(&mut self.upload_buf);
        let g = self.gathered(service, len, buf)?;
        Ok(Upload { client: self, service: service.clone(), g, failed: None, done: false })
    }

    /// Calls `service` with `request` and returns a reader of the reply,
    /// which reads it as its chunks come, holding at most a chunk or so of
    /// it at a time (the link is the backpressure: a reader that reads
    /// slowly slows the peer down). The reply may be up to
    /// [`ClientOptions::max_message`](crate::ClientOptions::max_message)
    /// long. An outcome known before the reply's first bytes (an error
    /// reply, a reply whose first chunk announces more than the maximum
    /// ([`CallError::ReplyTooLarge`]), a loss or a timeout before it) is
    /// this call's error; one that comes later (a reply of unknown length
    /// found longer, its link lost, a chunk late by the call timeout, the
    /// peer cutting the reply short with an error) fails the read with an
    /// [`io::Error`] whose inner error is the [`CallError`].
    ///
    /// A request longer than a frame is not sent whole before this
    /// returns: its first chunk is, and the reader borrows the rest, which
    /// each read sends on as room comes before it returns reply bytes. So
    /// a peer that answers as it reads (the echo) is read while it is
    /// still being sent, and neither end holds more than a chunk or so of
    /// either message. Dropped before the request is sent whole, the
    /// reader cancels it.
    ///
    /// ```no_run
    /// # let mut client = ipc_client::Client::connect()?;
    /// let dump = client.service("db.dump")?;
    /// let mut reply = client.call_reader(&dump, b"all")?;
    /// std::io::copy(&mut reply, &mut std::io::sink())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_reader<'c>(&'c mut self, service: &Service, request: &'c [u8]) -> Result<ReplyReader<'c>, CallError> {
        let mut dl = Deadline::new(self.options.call_timeout);
        let link = self.link_of(service)?;
        let max = self.slots[link].max_payload;
        if request.len() <= max || request.len() as u64 > self.options.max_message {
            let ticket = self.send_message(service, request, &mut dl)?;
            let mut reader = ReplyReader::new(self, ticket, None);
            reader.begin(&mut dl)?;
            return Ok(reader);
        }
        let mut out = Outgoing::new(link, service.id, Some(request.len() as u64));
        let (first, rest) = request.split_at(out.room(max));
        self.send_chunk(service, &mut out, first, false, &mut dl)?;
        let ticket = out.ticket().expect("the first chunk was sent");
        let sending = Unsent { out, rest };
        let mut reader = ReplyReader::new(self, ticket, Some(sending));
        if let Err(e) = reader.pump() {
            reader.sending = None;
            return Err(e);
        }
        Ok(reader)
    }

    /// Waits for the start of `ticket`'s reply: the reply itself if it
    /// came whole, or `None` once its first chunk has come.
    fn await_start(&mut self, ticket: Ticket, dl: &mut Deadline) -> Result<Option<Vec<u8>>, CallError> {
        let link = ticket.link();
        let whole = |client: &Client, settled: Settled| match client.found(link, settled)? {
            super::Found::Stashed(body) => Ok(Some(body)),
            super::Found::Link(..) => unreachable!("a settled reply is read"),
        };
        if let Some(settled) = self.calls.begin_wait(ticket)? {
            return whole(self, settled);
        }
        self.flush_live();
        loop {
            if self.slots[link].inbound.partial_mut(ticket.id()).is_some() {
                return Ok(None);
            }
            match self.next_reply(Awaiting::Chunks(ticket), dl) {
                Err(e) => {
                    self.slots[link].inbound.forsake(ticket.id());
                    let settled = self.calls.wait_failed(ticket, e)?;
                    return whole(self, settled);
                }
                Ok(Next::Reply(_, r, _)) => {
                    let mut body = Vec::new();
                    self.links[link].read_all(&r, &mut body);
                    let outcome = self.outcome_on(link, r.header(), &mut body);
                    // Read, the reply is its request's outcome whatever
                    // `release` says.
                    let _ = self.release(link, &r);
                    return outcome.map(|()| Some(body));
                }
                Ok(Next::Settled) => {
                    if let Some(settled) = self.calls.take_settled(ticket) {
                        return whole(self, settled);
                    }
                }
            }
        }
    }
}

/// An upload: a request written bit by bit and sent in chunks as it is
/// written, from [`Client::upload`]. Write it ([`io::Write`]), then
/// [`Upload::finish`] sends its last chunk and waits for the reply. A
/// request that fits one frame is sent as one at the finish.
///
/// Dropped before its finish (or after an error), the request is
/// cancelled: its peer drops what it has, and it does not run. Writing
/// past the announced length, or finishing short of it, fails the upload
/// ([`CallError::UploadLength`]).
#[must_use = "an upload is cancelled unless it is finished"]
pub struct Upload<'c> {
    client: &'c mut Client,
    service: Service,
    g: Gathered,
    failed: Option<CallError>,
    done: bool,
}

impl std::fmt::Debug for Upload<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("service", &self.service.name())
            .field("written", &self.g.written())
            .finish_non_exhaustive()
    }
}

impl Upload<'_> {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.g.written()
    }

    /// The request's ticket, once its first chunk is sent.
    pub fn ticket(&self) -> Option<Ticket> {
        self.g.out.ticket()
    }

    /// Sends what is left and waits up to the call timeout for the reply.
    pub fn finish(self) -> Result<Vec<u8>, CallError> {
        let mut reply = Vec::new();
        self.finish_into(&mut reply)?;
        Ok(reply)
    }

    /// As [`Upload::finish`], writing the reply into `reply`.
    pub fn finish_into(mut self, reply: &mut Vec<u8>) -> Result<(), CallError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if let Err(e) = self.g.check_whole() {
            return Err(self.fail(e));
        }
        let mut dl = Deadline::new(self.client.options.call_timeout);
        let ticket = match self.g.out.ticket() {
            // All of it fits one frame.
            None => {
                let buf = &self.g.buf;
                let sent = self.client.start(&self.service, buf.len(), |b| b.write_at(0, buf), true, &mut dl);
                self.done = true;
                sent?.0
            }
            Some(ticket) => {
                if self.g.out.is_going() {
                    self.send_buffered(true, &mut dl)?;
                }
                ticket
            }
        };
        self.done = true;
        let mut dl = Deadline::new(self.client.options.call_timeout);
        let found = self.client.await_reply(ticket, &mut dl)?;
        self.client.take_found(found, reply);
        Ok(())
    }

    /// Sends the bytes written and not yet sent as the next chunk.
    fn send_buffered(&mut self, last: bool, dl: &mut Deadline) -> Result<(), CallError> {
        let sent = self.client.send_chunk(&self.service, &mut self.g.out, &self.g.buf, last, dl);
        self.g.buf.clear();
        sent.map_err(|e| self.fail(e))
    }

    /// Fails the upload with `error` (cancelling it if begun); the error
    /// to hand out.
    fn fail(&mut self, error: CallError) -> CallError {
        self.done = true;
        let error = self.client.abort(&mut self.g.out, error);
        self.failed = Some(error.clone());
        error
    }
}

impl io::Write for Upload<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(e.clone()));
        }
        if let Err(e) = self.g.admit(data.len()) {
            return Err(io::Error::other(self.fail(e)));
        }
        let mut rest = data;
        while !rest.is_empty() {
            if self.g.is_full() {
                let mut dl = Deadline::new(self.client.options.call_timeout);
                self.send_buffered(false, &mut dl).map_err(io::Error::other)?;
                continue;
            }
            rest = &rest[self.g.gather(rest)..];
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.client.abort(&mut self.g.out, CallError::Cancelled);
        }
        self.client.upload_buf = std::mem::take(&mut self.g.buf);
    }
}

/// A reply read as its chunks come, from [`Client::call_reader`]
/// ([`io::Read`]; `Ok(0)` at its end).
///
/// Dropped before its end, the rest of the reply is dropped as it comes
/// (and a request not yet sent whole is cancelled).
pub struct ReplyReader<'c> {
    client: &'c mut Client,
    ticket: Ticket,
    /// The rest of a request longer than a frame, sent as reading goes.
    sending: Option<Unsent<'c>>,
    /// Whether the reply has begun (its first chunk came, or all of it).
    begun: bool,
    /// The reply once it is in hand whole, and where reading is in it.
    whole: Option<(Vec<u8>, usize)>,
    total: Option<u64>,
    failed: Option<CallError>,
}

/// What is left to send of a reader's request.
struct Unsent<'c> {
    out: Outgoing,
    rest: &'c [u8],
}

impl std::fmt::Debug for ReplyReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyReader").field("ticket", &self.ticket).field("len", &self.total).finish_non_exhaustive()
    }
}

impl<'c> ReplyReader<'c> {
    fn new(client: &'c mut Client, ticket: Ticket, sending: Option<Unsent<'c>>) -> ReplyReader<'c> {
        ReplyReader { client, ticket, sending, begun: false, whole: None, total: None, failed: None }
    }

    /// The reply's length, if its first chunk announced it (or it came
    /// whole).
    pub fn len(&self) -> Option<u64> {
        self.total
    }

    /// Whether the reply is known to be empty.
    pub fn is_empty(&self) -> bool {
        self.total == Some(0)
    }

    fn fail(&mut self, error: CallError) -> io::Error {
        self.failed = Some(error.clone());
        io::Error::other(error)
    }

    /// Waits for the reply to begin, the request sent whole.
    fn begin(&mut self, dl: &mut Deadline) -> Result<(), CallError> {
        let whole = self.client.await_start(self.ticket, dl)?;
        self.begun = true;
        self.total = match &whole {
            Some(body) => Some(body.len() as u64),
            None => self.client.slots[self.ticket.link()].inbound.partial_mut(self.ticket.id()).and_then(|p| p.total),
        };
        self.whole = whole.map(|b| (b, 0));
        Ok(())
    }

    /// Sends as much of the rest of the request as fits now, without
    /// waiting; stops (cancelling the rest) once the peer has answered.
    fn pump(&mut self) -> Result<(), CallError> {
        let Some(s) = &mut self.sending else { return Ok(()) };
        let pushed = self.client.push_chunks(&mut s.out, &mut s.rest);
        if !matches!(pushed, Ok(Pushed::Full)) {
            self.sending = None;
        }
        pushed.map(|_| ())
    }

    /// While the request is still being sent: takes frames off the link
    /// one at a time until one is of this reply (so no more of it is held
    /// than the reader asked for), or sleeps until there is room for the
    /// next chunk or a frame comes.
    fn await_while_sending(&mut self, dl: &mut Deadline) -> Result<(), CallError> {
        let link = self.ticket.link();
        loop {
            match self.client.take_frame(link, Awaiting::Chunks(self.ticket)) {
                Ok(Step::Empty) => break,
                Ok(Step::Chunk) => {
                    self.begun = true;
                    return Ok(());
                }
                Ok(Step::Kept(t)) if t == self.ticket => return Ok(()),
                Ok(Step::Reply(r, _)) => {
                    // The whole reply in one frame (a refusal, say).
                    let mut body = Vec::new();
                    self.client.links[link].read_all(&r, &mut body);
                    let outcome = self.client.outcome_on(link, r.header(), &mut body);
                    let _ = self.client.release(link, &r);
                    outcome?;
                    self.begun = true;
                    self.total = Some(body.len() as u64);
                    self.whole = Some((body, 0));
                    return Ok(());
                }
                Ok(_) => {}
                Err(reason) => {
                    let _ = self.client.note::<()>(link, Err(crate::link::disconnected(reason)));
                    return Ok(());
                }
            }
        }
        let Some(s) = &self.sending else { return Ok(()) };
        let len = s.out.room(self.client.slots[link].max_payload).min(s.rest.len());
        match self.client.sleep(Some(s.out.room_for(len)), dl) {
            Ok(()) => {
                self.client.notice_losses();
                Ok(())
            }
            Err(e) => {
                let mut s = self.sending.take().expect("sending");
                Err(self.client.abort(&mut s.out, e))
            }
        }
    }
}

impl io::Read for ReplyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(e) = &self.failed {
            return Err(io::Error::other(e.clone()));
        }
        let link = self.ticket.link();
        let id = self.ticket.id();
        loop {
            if let Some((body, pos)) = &mut self.whole {
                let n = buf.len().min(body.len() - *pos);
                buf[..n].copy_from_slice(&body[*pos..*pos + n]);
                *pos += n;
                return Ok(n);
            }
            if let Err(e) = self.pump() {
                return Err(self.fail(e));
            }
            match self.client.slots[link].inbound.partial_mut(id) {
                Some(p) if p.taken < p.body.len() => {
                    let n = buf.len().min(p.body.len() - p.taken);
                    buf[..n].copy_from_slice(&p.body[p.taken..p.taken + n]);
                    p.taken += n;
                    if p.taken == p.body.len() {
                        p.body.clear();
                        p.taken = 0;
                    }
                    if self.total.is_none() {
                        self.total = p.total;
                    }
                    self.begun = true;
                    return Ok(n);
                }
                Some(_) => self.begun = true,
                // Whole now (the rest of it was kept aside), or failed.
                None => match self.client.calls.take_settled(self.ticket) {
                    Some(Settled::Reply { header, mut body }) => {
                        if let Err(e) = self.client.outcome_on(link, header, &mut body) {
                            return Err(self.fail(e));
                        }
                        self.total = Some(self.total.unwrap_or(body.len() as u64));
                        self.whole = Some((body, 0));
                        continue;
                    }
                    Some(Settled::Failed(e)) => return Err(self.fail(e)),
                    None if self.sending.is_some() => {}
                    None if !self.begun => {
                        let mut dl = Deadline::new(self.client.options.call_timeout);
                        if let Err(e) = self.begin(&mut dl) {
                            return Err(self.fail(e));
                        }
                        continue;
                    }
                    None => return Err(self.fail(CallError::UnknownTicket { id })),
                },
            }
            let mut dl = Deadline::new(self.client.options.call_timeout);
            if self.sending.is_some() {
                if let Err(e) = self.await_while_sending(&mut dl) {
                    return Err(self.fail(e));
                }
                continue;
            }
            self.client.flush_live();
            if let Err(e) = self.client.next_reply(Awaiting::Chunks(self.ticket), &mut dl) {
                self.client.slots[link].inbound.forsake(id);
                match self.client.calls.wait_failed(self.ticket, e) {
                    Ok(Settled::Failed(e)) | Err(e) => return Err(self.fail(e)),
                    Ok(Settled::Reply { header, mut body }) => {
                        if let Err(e) = self.client.outcome_on(link, header, &mut body) {
                            return Err(self.fail(e));
                        }
                        self.whole = Some((body, 0));
                    }
                }
            }
        }
    }
}

impl Drop for ReplyReader<'_> {
    fn drop(&mut self) {
        let link = self.ticket.link();
        // A request not sent whole is cancelled.
        if let Some(mut s) = self.sending.take() {
            let _ = self.client.abort(&mut s.out, CallError::Cancelled);
        }
        // Whatever is left of it is dropped as it comes.
        let _ = self.client.calls.take_settled(self.ticket);
        self.client.calls.abandon(self.ticket);
        self.client.slots[link].inbound.forsake(self.ticket.id());
    }
}

#[cfg(test)]
mod tests;
