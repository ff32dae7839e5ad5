//! Establishing a client's links after its first: resolving names that
//! providers offer through the daemon's broker, and re-establishing a
//! link that was lost (the daemon link by connecting again, a brokered
//! one by resolving again).

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use ipc_core::control::{Brokered, Resolution};
use ipc_core::{Credentials, Welcome};

use super::inbound::Inbound;
use super::{Client, Deadline, Provided, Service, Slot, DAEMON};
use crate::backoff::Backoff;
use crate::broker::{self, Broker, Exchange};
use crate::calls::LinkId;
use crate::connect;
use crate::error::{with_causes, CallError};
use crate::link::Link;
use crate::options::{ClientOptions, Reconnect, Transport};

impl Client {
    /// Resolves a service by name.
    ///
    /// A name in the daemon's welcome is one of its own services, called on
    /// the daemon link. Any other is asked of the daemon's broker (over
    /// [`Transport::Shm`] only; else [`CallError::NoBroker`]): it brokers a
    /// session with the name's provider, whose calls then go straight to
    /// the provider over shared memory. The session offers the services
    /// its answer lists, which later resolves find without asking again
    /// (while the session lasts). Failures: [`CallError::UnknownService`]
    /// (nobody provides it now), [`CallError::BadName`],
    /// [`CallError::NotPermitted`], [`CallError::Unavailable`],
    /// [`CallError::BadResolution`].
    pub fn service(&mut self, name: &str) -> Result<Service, CallError> {
        if let Some(&id) = self.services.get(name) {
            return Ok(self.handle(DAEMON, id, name));
        }
        self.provided_service(name, Duration::ZERO)
    }

    /// As [`Client::service`], waiting up to `timeout` for a provider of
    /// `name` to register if none has: the daemon waits for it, and while
    /// the daemon is out of reach (restarting), the client tries again with
    /// the [`ClientOptions::reconnect`](crate::ClientOptions::reconnect) policy's delays (or the default
    /// ones). [`CallError::UnknownService`] if none came in time; errors
    /// that waiting cannot cure ([`CallError::NotPermitted`], for one) come
    /// at once.
    pub fn wait_for_service(&mut self, name: &str, timeout: Duration) -> Result<Service, CallError> {
        if let Some(&id) = self.services.get(name) {
            return Ok(self.handle(DAEMON, id, name));
        }
        let policy = self.options.reconnect.unwrap_or_default();
        let mut backoff = Backoff::new(policy);
        let mut dl = Deadline::new(timeout);
        loop {
            let left = dl.at().saturating_duration_since(Instant::now());
            let error = match self.provided_service(name, left) {
                Ok(service) => return Ok(service),
                Err(e) => e,
            };
            let left = dl.at().saturating_duration_since(Instant::now());
            // A daemon without a broker will never know the name.
            let passing = matches!(error, CallError::UnknownService { .. } if !self.brokerless)
                || matches!(error, CallError::Unavailable { .. });
            if !passing || left.is_zero() {
                return Err(error);
            }
            backoff.pause(left);
        }
    }

    /// The provider of a service resolved through the broker, as the
    /// daemon reported it; `None` for the daemon's own services (and for
    /// another client's).
    pub fn provider(&self, service: &Service) -> Option<Credentials> {
        let link = self.link_of(service).ok()?;
        self.slots[link].provided.as_ref().map(|p| p.provider)
    }

    /// A provided name's service: on the session that offers it, if that
    /// is up, else on a new session from the broker (waiting up to `wait`
    /// for a provider).
    pub(super) fn provided_service(&mut self, name: &str, wait: Duration) -> Result<Service, CallError> {
        let known = self.provided.get(name).copied();
        if let Some((link, id)) = known {
            if self.calls.lost(link).is_none() {
                return Ok(self.handle(link, id, name));
            }
        }
        // A lost session's place is filled again if the new one is alike.
        self.resolve(name, wait, known.map(|(link, _)| link), false)?;
        let (link, id) = self.provided[name];
        Ok(self.handle(link, id, name))
    }

    /// Asks the broker for a session with a provider of `name` and puts it
    /// in lost link `reuse`'s place if given and the session offers every
    /// service that place had under the same ids (its services work
    /// again), else in a new place (or, `strict`, fails). Its services are
    /// recorded for later resolves.
    pub(super) fn resolve(
        &mut self,
        name: &str,
        wait: Duration,
        reuse: Option<LinkId>,
        strict: bool,
    ) -> Result<LinkId, CallError> {
        let (brokered, fds) = self.ask_broker(name, wait)?;
        let link = broker::session(name, &brokered, fds, &self.options).map_err(|untaken| match untaken {
            broker::Untaken::Broken(reason) => CallError::BadResolution { name: name.to_string(), reason },
            broker::Untaken::ProviderGone => CallError::Unavailable {
                name: name.to_string(),
                reason: "the provider went away as the session was handed over".into(),
            },
        })?;
        let slot = Slot::new(
            brokered.max_payload as usize,
            brokered.session_id,
            Some(Provided { provider: brokered.provider, services: brokered.services }),
            self.options.max_message,
        );
        let place = match reuse {
            Some(old) if self.alike(old, &slot) => {
                self.links[old] = Link::Shm(link);
                self.slots[old] = slot;
                self.calls.revive(old);
                self.fd_epoch += 1;
                old
            }
            Some(_) if strict => {
                let reason =
                    format!("the provider of {name:?} reached again offers other services; resolve them again");
                return Err(CallError::NotConnected { reason });
            }
            _ => self.add_link(Link::Shm(link), slot),
        };
        for entry in self.slots[place].provided.iter().flat_map(|p| &p.services) {
            if !self.services.contains_key(&entry.name) {
                self.provided.insert(entry.name.clone(), (place, entry.id));
            }
        }
        Ok(place)
    }

    /// Whether a new session `slot` offers every service that `link`'s did,
    /// under the same ids, so that `link`'s services may go on to it.
    pub(super) fn alike(&self, link: LinkId, slot: &Slot) -> bool {
        let (Some(old), Some(new)) = (&self.slots[link].provided, &slot.provided) else { return false };
        old.services.iter().all(|s| new.services.contains(s))
    }

    /// One exchange with the broker: a session and its fds, or the error.
    /// A kept connection found closed, or lost on the way (the daemon
    /// restarted), is replaced by a new one, once.
    pub(super) fn ask_broker(&mut self, name: &str, wait: Duration) -> Result<(Brokered, Vec<OwnedFd>), CallError> {
        let Transport::Shm(path) = &self.target else {
            return Err(CallError::NoBroker { name: name.to_string(), transport: self.target.name() });
        };
        let path = path.clone();
        let request = broker::request(name, wait, &self.options);
        // The daemon answers within its wait, plus the time to broker.
        let limit = wait.saturating_add(self.options.connect_timeout);
        self.brokerless = false;
        let unavailable = |reason: String| CallError::Unavailable { name: name.to_string(), reason };
        for _ in 0..2 {
            let kept = self.broker.take().filter(|conn| !conn.is_closed());
            let reused = kept.is_some();
            let mut conn = match kept {
                Some(conn) => conn,
                None => match Broker::open(&path, &self.options) {
                    Ok(Some(conn)) => conn,
                    Ok(None) => {
                        self.brokerless = true;
                        return Err(CallError::UnknownService { name: name.to_string() });
                    }
                    Err(e) => return Err(broker::unreachable(name, e)),
                },
            };
            match conn.exchange(&request, limit) {
                Ok((Resolution::Brokered(brokered), fds)) => {
                    self.broker = Some(conn);
                    return Ok((brokered, fds));
                }
                Ok((Resolution::Failed(error), fds)) => {
                    if !fds.is_empty() {
                        let reason = format!("a refusal came with {} fds", fds.len());
                        return Err(CallError::BadResolution { name: name.to_string(), reason });
                    }
                    self.broker = Some(conn);
                    return Err(broker::refused(name, error));
                }
                // The daemon that took the connection is gone: a new one
                // may be listening.
                Err(Exchange::Lost(_)) if reused => continue,
                Err(Exchange::Lost(reason)) => return Err(unavailable(format!("broker connection lost: {reason}"))),
                // Dropped: a late answer must not be taken for the next.
                Err(Exchange::Timeout) => {
                    return Err(unavailable(format!("no answer from the daemon within {limit:?}")))
                }
                Err(Exchange::Protocol(reason)) => {
                    return Err(CallError::BadResolution { name: name.to_string(), reason })
                }
            }
        }
        Err(unavailable("the daemon closed the broker connection twice".into()))
    }

    /// Connects to the daemon again now if the daemon link was lost,
    /// retrying with the [`ClientOptions::reconnect`](crate::ClientOptions::reconnect) policy (or the
    /// default one) for at most the call timeout. Does nothing while
    /// connected.
    pub fn reconnect(&mut self) -> Result<(), CallError> {
        if self.is_connected() {
            return Ok(());
        }
        let policy = self.options.reconnect.unwrap_or_default();
        let mut dl = Deadline::new(self.options.call_timeout);
        self.connect_again(policy, &mut dl)
    }

    /// Restores a lost link before a request to `service` is sent on it,
    /// with the policy until the deadline: the daemon link by connecting
    /// again, a brokered link by resolving the service's name again. Else
    /// the request fails as not sent.
    pub(super) fn ensure_connected(
        &mut self,
        service: &Service,
        link: LinkId,
        dl: &mut Deadline,
    ) -> Result<(), CallError> {
        let Some(refused) = self.calls.refusal(link) else { return Ok(()) };
        match self.options.reconnect {
            Some(policy) if link == DAEMON => self.connect_again(policy, dl),
            Some(policy) => self.resolve_again(link, &service.name, policy, dl),
            None => Err(refused),
        }
    }

    /// Fills lost brokered `link`'s place with a new session for `name`,
    /// retrying with `policy`'s backoff until the deadline; each resolve
    /// lets the daemon wait for a provider (restarted, or another of a
    /// pool) for what is left of it. The new session must offer the old
    /// one's services under the same ids.
    pub(super) fn resolve_again(
        &mut self,
        link: LinkId,
        name: &str,
        policy: Reconnect,
        dl: &mut Deadline,
    ) -> Result<(), CallError> {
        let mut backoff = Backoff::new(policy);
        loop {
            let left = dl.at().saturating_duration_since(Instant::now());
            let error = match self.resolve(name, left, Some(link), true) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let passing = matches!(error, CallError::UnknownService { .. } | CallError::Unavailable { .. });
            let left = dl.at().saturating_duration_since(Instant::now());
            if !passing || left.is_zero() {
                return Err(match error {
                    e @ CallError::NotConnected { .. } => e,
                    e => CallError::NotConnected { reason: format!("cannot reach {name:?} again: {e}") },
                });
            }
            backoff.pause(left);
        }
    }

    /// Connects again, retrying with `policy`'s backoff until the deadline.
    pub(super) fn connect_again(&mut self, policy: Reconnect, dl: &mut Deadline) -> Result<(), CallError> {
        let mut backoff = Backoff::new(policy);
        loop {
            let now = Instant::now();
            let left = dl.at().saturating_duration_since(now);
            let mut options = self.options.clone();
            // An attempt never outlasts the request's deadline by much.
            options.connect_timeout = options.connect_timeout.min(left.max(Duration::from_millis(1)));
            let error = match connect::open(&self.target, &options) {
                Ok((link, welcome)) => {
                    self.adopt(link, welcome)?;
                    self.last_reconnect = Some(now.elapsed());
                    return Ok(());
                }
                Err(e) => e,
            };
            let left = dl.at().saturating_duration_since(Instant::now());
            if connect::lasts(&error) || left.is_zero() {
                return Err(CallError::NotConnected { reason: format!("cannot reconnect: {}", with_causes(&error)) });
            }
            backoff.pause(left);
        }
    }

    /// What connecting the lost daemon link again takes, off this thread
    /// (the async client's reconnect): the transport, the options and the
    /// policy, when `service`'s calls go over the daemon link, that link
    /// is lost, and the client has a reconnect policy.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn reconnect_plan(&self, service: &Service) -> Option<(Transport, ClientOptions, Reconnect)> {
        let policy = self.options.reconnect?;
        let lost = self.link_of(service).ok()? == DAEMON && self.calls.refusal(DAEMON).is_some();
        lost.then(|| (self.target.clone(), self.options.clone(), policy))
    }

    /// Takes a daemon link opened off this thread (`took` to open) in
    /// place of the lost one, unless one was taken meanwhile (the link
    /// opened then closes unused).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn adopt_opened(&mut self, (link, welcome): (Link, Welcome), took: Duration) -> Result<(), CallError> {
        if self.calls.refusal(DAEMON).is_none() {
            return Ok(());
        }
        self.adopt(link, welcome)?;
        self.last_reconnect = Some(took);
        Ok(())
    }

    /// Takes a new daemon link in place of the lost one.
    pub(super) fn adopt(&mut self, link: Link, welcome: Welcome) -> Result<(), CallError> {
        let same = welcome.services.len() == self.services.len()
            && welcome.services.iter().all(|s| self.services.get(&s.name) == Some(&s.id));
        if !same {
            return Err(CallError::NotConnected {
                reason: "the daemon reached again offers other services; connect a new client".into(),
            });
        }
        if welcome.max_payload as usize != self.max_payload() {
            return Err(CallError::NotConnected {
                reason: format!(
                    "the daemon reached again offers payloads of {} bytes, not {}; connect a new client",
                    welcome.max_payload,
                    self.max_payload()
                ),
            });
        }
        self.links[DAEMON] = link;
        self.slots[DAEMON].session_id = welcome.session_id;
        self.slots[DAEMON].inbound = Inbound::new(self.options.max_message);
        self.slots[DAEMON].pending.clear();
        self.calls.revive(DAEMON);
        self.fd_epoch += 1;
        self.reconnects += 1;
        Ok(())
    }
}
