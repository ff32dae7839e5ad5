//! The daemon's services about itself (`ipcd.status`, `ipcd.services`,
//! `ipcd.clients`, and `stats`), and who may see what of them.
//!
//! Each answer is made on the worker that takes the call, from what the
//! daemon's threads publish anyway: the counters (summed when asked), the
//! limits, the settings in force, the roster of sessions and what the
//! broker last published. None of it is asked of another thread, so an
//! answer waits for no worker and no worker waits for it; the roster's and
//! the limits' locks are held only while they are copied.
//!
//! Who sees what is decided by the caller's credentials as the kernel
//! reported them for its connection (`Request::caller`, `SO_PEERCRED`),
//! never by anything the caller says: root and the daemon's own uid see
//! everything, any other uid what is its own (see
//! [`crate::introspect`]).

use std::sync::{Arc, OnceLock};

use ipc_core::Credentials;

use crate::introspect::{
    Access, CallerInfo, ClientCounts, Handshakes, LimitsInfo, Listener, Page, Rule, Sees, ServedBy, ServiceInfo,
    ServiceList, SessionList, Status, UidSessions, Viewer, Who,
};
use crate::limits::Limits;
use crate::policy::Allowed;
use crate::request::{Caller, Request};
use crate::roster::Roster;
use crate::service::{Handler, ServiceError};
use crate::settings::LiveSettings;
use crate::stats::Stats;

/// The names of the services the daemon itself answers, before the debug
/// ones and the embedder's (their ids are their places here).
pub(crate) const BUILT_IN: [&str; 7] =
    ["echo", "ping", "stats", "ipcd.status", "ipcd.services", "ipcd.clients", "stream.count"];

/// What a page holds when its request names no size: less than any ring's
/// largest payload.
const DEFAULT_PAGE_BYTES: usize = 16 << 10;

/// Room left in a page for what surrounds its entries (the viewer, `next`).
const PAGE_ENVELOPE: usize = 512;

/// The most uids `ipcd.status` lists.
const MAX_UIDS_LISTED: usize = 64;

/// Everything the answers are made of.
pub(crate) struct Introspection {
    pub(crate) stats: Arc<Stats>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) settings: Arc<LiveSettings>,
    pub(crate) roster: Arc<Roster>,
    /// Each service of the daemon's by id, and who serves it.
    pub(crate) services: Vec<(String, ServedBy)>,
    /// Where the server listens, known once it is bound.
    pub(crate) listeners: OnceLock<Vec<Listener>>,
    pub(crate) daemon_uid: u32,
}

/// What a caller may see.
enum Scope {
    All,
    /// Its own: the uid and credentials the kernel reported.
    Own(Credentials),
    /// Nothing of anyone's: a caller without credentials (TCP).
    Anonymous,
}

impl Introspection {
    fn scope(&self, caller: Option<Caller>) -> Scope {
        match caller {
            Some(c) if c.uid == 0 || c.uid == self.daemon_uid => Scope::All,
            Some(c) => Scope::Own(Credentials { pid: c.pid, uid: c.uid, gid: c.gid }),
            None => Scope::Anonymous,
        }
    }

    fn viewer(&self, caller: Option<Caller>) -> Viewer {
        let sees = match self.scope(caller) {
            Scope::All => Sees::All,
            Scope::Own(_) | Scope::Anonymous => Sees::Own,
        };
        Viewer { caller: caller.map(|c| CallerInfo { pid: c.pid, uid: c.uid, gid: c.gid }), sees }
    }

    /// Whether the caller may see the provided name `name`: every name for
    /// those who see everything, the names the rules let it call for
    /// others, none without credentials.
    fn sees_name(&self, scope: &Scope, name: &str) -> bool {
        match scope {
            Scope::All => true,
            Scope::Own(creds) => self.settings.current().policy.may_call(name, creds).is_ok(),
            Scope::Anonymous => false,
        }
    }

    /// `ipcd.status`.
    pub(crate) fn status(&self, caller: Option<Caller>) -> Status {
        let scope = self.scope(caller);
        let current = self.settings.current();
        let settings = &current.settings;
        let [shm, uds, tcp, brokered] = self.roster.counts();
        let mut uids: Vec<(u32, usize)> = self.limits.per_uid();
        uids.retain(|&(uid, _)| match &scope {
            Scope::All => true,
            Scope::Own(creds) => creds.uid == uid,
            Scope::Anonymous => false,
        });
        uids.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let uids_with_sessions = uids.len();
        uids.truncate(MAX_UIDS_LISTED);
        let (accepted, held, strikes) = self.stats.handshakes();
        let (requests, replies, errors) = self.stats.calls();
        let (pending, max_pending) = self.stats.pending();
        let who = |a: &Allowed| Who { uids: a.uids.clone(), gids: a.gids.clone() };
        let access = matches!(scope, Scope::All).then(|| Access {
            allow_uids: settings.allow_uids.clone(),
            allow_gids: settings.allow_gids.clone(),
            rules: settings
                .access_rules
                .iter()
                .map(|r| Rule {
                    pattern: r.pattern.clone(),
                    provide: r.provide.as_ref().map(who),
                    call: r.call.as_ref().map(who),
                })
                .collect(),
        });
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uid: self.daemon_uid,
            uptime_s: self.stats.uptime().as_secs_f64(),
            workers: self.stats.workers.len(),
            viewer: self.viewer(caller),
            listeners: self.listeners.get().cloned().unwrap_or_default(),
            clients: ClientCounts {
                connected: self.stats.connected.load(std::sync::atomic::Ordering::Relaxed),
                max: settings.max_clients,
                shm,
                uds,
                tcp,
            },
            brokered_sessions: brokered,
            limits: LimitsInfo {
                memory_budget: self.limits.budget(),
                memory_in_use: self.limits.in_use(),
                max_sessions_per_uid: self.limits.max_per_uid(),
                sessions_per_uid: uids.into_iter().map(|(uid, sessions)| UidSessions { uid, sessions }).collect(),
                uids_with_sessions,
                pending_handshakes: pending,
                max_pending_handshakes: max_pending,
                max_ring_size: settings.max_ring_capacity,
                handshake_timeout_ms: millis(settings.handshake_timeout),
                stall_timeout_ms: millis(settings.stall_timeout),
            },
            handshakes: Handshakes {
                accepted,
                held,
                strikes,
                rejected: self.stats.rejects().map(|(n, c)| (n.to_string(), c)).collect(),
            },
            calls: crate::introspect::Calls { requests, replies, errors },
            disconnects: self.stats.disconnects().map(|(n, c)| (n.to_string(), c)).collect(),
            access,
            reloads: self.settings.reloads(),
        }
    }

    /// `ipcd.services`: the daemon's own names and the provided ones the
    /// caller may see, by name, a page from after `page.after`.
    pub(crate) fn services(&self, caller: Option<Caller>, page: &Page) -> Result<ServiceList, ServiceError> {
        let scope = self.scope(caller);
        let after = match &page.after {
            None => None,
            Some(serde_json::Value::String(name)) => Some(name.as_str()),
            Some(other) => return Err(ServiceError::new(format!("\"after\" is a service name, not {other}"))),
        };
        let mut all: Vec<ServiceInfo> = self
            .services
            .iter()
            .enumerate()
            .map(|(id, (name, served_by))| {
                let (calls, errors) = self.stats.service_counts(id);
                ServiceInfo {
                    name: name.clone(),
                    served_by: *served_by,
                    id: u16::try_from(id).ok(),
                    calls: Some(calls),
                    errors: Some(errors),
                    pooled: None,
                    providers: Vec::new(),
                }
            })
            .collect();
        all.extend(self.stats.broker().names.into_iter().filter(|n| self.sees_name(&scope, &n.name)).map(|n| {
            ServiceInfo {
                name: n.name,
                served_by: ServedBy::Provider,
                id: None,
                calls: None,
                errors: None,
                pooled: Some(n.pooled),
                providers: n.providers,
            }
        }));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let start = after.map_or(0, |after| all.partition_point(|s| s.name.as_str() <= after));
        let mut fits = Fits::new(page);
        let mut services = Vec::new();
        let mut next = None;
        for service in all.drain(start..) {
            if !fits.take(&service) {
                next = services.last().map(|s: &ServiceInfo| serde_json::Value::String(s.name.clone()));
                break;
            }
            services.push(service);
        }
        Ok(ServiceList { viewer: self.viewer(caller), services, next })
    }

    /// `ipcd.clients`: the sessions the caller may see, by id, a page from
    /// after `page.after`.
    pub(crate) fn clients(&self, caller: Option<Caller>, page: &Page) -> Result<SessionList, ServiceError> {
        let scope = self.scope(caller);
        let after = match &page.after {
            None => None,
            Some(value) => Some(
                value.as_u64().ok_or_else(|| ServiceError::new(format!("\"after\" is a session id, not {value}")))?,
            ),
        };
        let mut fits = Fits::new(page);
        let (sessions, more) = self.roster.page(
            after,
            |entry| match &scope {
                Scope::All => true,
                Scope::Own(creds) => entry.belongs_to(creds.uid),
                Scope::Anonymous => false,
            },
            |info| fits.take(info),
        );
        let next = if more { sessions.last().map(|s| serde_json::Value::from(s.id)) } else { None };
        Ok(SessionList { viewer: self.viewer(caller), sessions, next })
    }

    /// `stats`, with only the provided names the caller may see.
    pub(crate) fn stats(&self, caller: Option<Caller>) -> Vec<u8> {
        let scope = self.scope(caller);
        self.stats.to_json(&self.limits, |name| self.sees_name(&scope, name))
    }
}

/// Fills a page up to its size: every entry that fits, and at least one
/// (so that paging always moves on; one entry too large for the caller's
/// ring is then an error for that call, not a loop).
struct Fits {
    left: usize,
    taken: usize,
}

impl Fits {
    fn new(page: &Page) -> Fits {
        let max = page.max_bytes.unwrap_or(DEFAULT_PAGE_BYTES);
        Fits { left: max.saturating_sub(PAGE_ENVELOPE), taken: 0 }
    }

    /// Whether `entry` goes in the page, counting it if so.
    fn take(&mut self, entry: &impl serde::Serialize) -> bool {
        // A comma before each entry but the first.
        let len = serde_json::to_vec(entry).map_or(usize::MAX, |v| v.len()) + 1;
        if self.taken > 0 && len > self.left {
            return false;
        }
        self.left = self.left.saturating_sub(len);
        self.taken += 1;
        true
    }
}

/// The request of a paged service: empty for the first page, or a JSON
/// [`Page`].
fn page_of(request: &Request<'_>) -> Result<Page, ServiceError> {
    if request.payload().is_empty() {
        return Ok(Page::default());
    }
    serde_json::from_slice(request.payload())
        .map_err(|e| ServiceError::new(format!("{}: the request is empty or a JSON page: {e}", request.service())))
}

fn json(value: &impl serde::Serialize) -> Result<Vec<u8>, ServiceError> {
    serde_json::to_vec(value).map_err(|e| ServiceError::new(format!("cannot encode the answer: {e}")))
}

/// The daemon's handlers of its services about itself, by name (`stats`
/// and the `ipcd.*` ones), to go in the table at their [`BUILT_IN`] places.
pub(crate) fn handlers(view: &Arc<Introspection>) -> [(&'static str, Handler); 4] {
    let handler = |f: fn(&Introspection, &Request<'_>) -> Result<Vec<u8>, ServiceError>| {
        let view = Arc::clone(view);
        Handler::Inline(Arc::new(move |request: &Request<'_>, reply: &mut Vec<u8>| {
            *reply = f(&view, request)?;
            Ok(())
        }))
    };
    [
        ("stats", handler(|v, r| Ok(v.stats(r.caller())))),
        ("ipcd.status", handler(|v, r| json(&v.status(r.caller())))),
        ("ipcd.services", handler(|v, r| json(&v.services(r.caller(), &page_of(r)?)?))),
        ("ipcd.clients", handler(|v, r| json(&v.clients(r.caller(), &page_of(r)?)?))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::introspect::{ProviderInfo, Transport};
    use crate::policy::AccessRule;
    use crate::roster::Entry;
    use crate::settings::Settings;
    use crate::stats::{BrokerView, ProvidedName};
    use std::time::Instant;

    const DAEMON_UID: u32 = 500;

    fn view() -> Introspection {
        let rules = vec![AccessRule {
            pattern: "secret.*".into(),
            provide: None,
            call: Some(Allowed { uids: vec![1000], gids: vec![] }),
        }];
        let settings = Settings { access_rules: rules, ..Settings::default() };
        let stats = Arc::new(Stats::new(1, 8, 2));
        let provider = |uid| ProviderInfo { id: 1, pid: 77, uid, sessions: 1 };
        stats.set_broker(BrokerView {
            names: vec![
                ProvidedName { name: "open.echo".into(), pooled: false, providers: vec![provider(0)] },
                ProvidedName { name: "secret.key".into(), pooled: true, providers: vec![provider(0)] },
            ],
            counts: serde_json::Map::new(),
        });
        let roster = Arc::new(Roster::default());
        let entry = |uid: Option<u32>, transport| Entry {
            transport,
            caller: uid.map(|uid| Caller { pid: 9, uid, gid: uid }),
            address: None,
            ring_size: Some(65536),
            max_payload: 32752,
            opened: Instant::now(),
            worker: Some(0),
            calls: Some(Arc::default()),
            service: None,
            provider: None,
        };
        roster.insert(1, entry(Some(0), Transport::Shm));
        roster.insert(2, entry(Some(1000), Transport::Uds));
        roster.insert(3, entry(None, Transport::Tcp));
        let mut brokered = entry(Some(0), Transport::Brokered);
        brokered.provider = Some(provider(1000));
        roster.insert(4, brokered);
        let limits = Arc::new(Limits::new(1 << 30, 10));
        Introspection {
            stats,
            limits,
            settings: Arc::new(LiveSettings::new(settings, DAEMON_UID, false)),
            roster,
            services: vec![("echo".into(), ServedBy::Daemon), ("mine".into(), ServedBy::Embedded)],
            listeners: OnceLock::new(),
            daemon_uid: DAEMON_UID,
        }
    }

    fn caller(uid: u32) -> Option<Caller> {
        Some(Caller { pid: 1, uid, gid: uid })
    }

    fn names(list: &ServiceList) -> Vec<&str> {
        list.services.iter().map(|s| s.name.as_str()).collect()
    }

    fn ids(list: &SessionList) -> Vec<u64> {
        list.sessions.iter().map(|s| s.id).collect()
    }

    #[test]
    fn root_and_the_daemon_uid_see_everything() {
        let view = view();
        for uid in [0, DAEMON_UID] {
            let services = view.services(caller(uid), &Page::default()).unwrap();
            assert_eq!(names(&services), ["echo", "mine", "open.echo", "secret.key"]);
            assert_eq!(services.viewer.sees, Sees::All);
            assert_eq!(ids(&view.clients(caller(uid), &Page::default()).unwrap()), [1, 2, 3, 4]);
            assert!(view.status(caller(uid)).access.is_some());
        }
    }

    #[test]
    fn another_uid_sees_its_own_sessions_and_the_names_it_may_call() {
        let view = view();
        let outsider = view.services(caller(2000), &Page::default()).unwrap();
        assert_eq!(names(&outsider), ["echo", "mine", "open.echo"], "secret.* is not 2000's to call");
        assert_eq!(outsider.viewer.sees, Sees::Own);
        let allowed = view.services(caller(1000), &Page::default()).unwrap();
        assert_eq!(names(&allowed), ["echo", "mine", "open.echo", "secret.key"]);
        assert_eq!(ids(&view.clients(caller(1000), &Page::default()).unwrap()), [2, 4], "its client and provider");
        assert!(ids(&view.clients(caller(2000), &Page::default()).unwrap()).is_empty());
        let status = view.status(caller(2000));
        assert!(status.access.is_none(), "the rules are not shown");
        assert_eq!(status.clients.connected, 0);
        assert_eq!(
            (status.clients.shm, status.clients.uds, status.clients.tcp, status.brokered_sessions),
            (1, 1, 1, 1)
        );
        let stats = String::from_utf8(view.stats(caller(2000))).unwrap();
        assert!(stats.contains("open.echo") && !stats.contains("secret.key"), "{stats}");
    }

    #[test]
    fn a_caller_without_credentials_sees_no_one() {
        let view = view();
        assert_eq!(names(&view.services(None, &Page::default()).unwrap()), ["echo", "mine"]);
        assert!(view.clients(None, &Page::default()).unwrap().sessions.is_empty());
        assert!(view.status(None).limits.sessions_per_uid.is_empty());
    }

    #[test]
    fn pages_hold_what_fits_and_say_where_to_go_on() {
        let view = view();
        let small = Page { after: None, max_bytes: Some(PAGE_ENVELOPE + 10) };
        let first = view.clients(caller(0), &small).unwrap();
        assert_eq!((ids(&first), &first.next), (vec![1], &Some(serde_json::json!(1))), "at least one");
        let mut seen = ids(&first);
        let mut page = Page { after: first.next, ..small.clone() };
        while page.after.is_some() {
            let list = view.clients(caller(0), &page).unwrap();
            seen.extend(ids(&list));
            page.after = list.next;
        }
        assert_eq!(seen, [1, 2, 3, 4]);
        let mut page = small;
        let mut seen = Vec::new();
        loop {
            let list = view.services(caller(0), &page).unwrap();
            seen.extend(names(&list).into_iter().map(String::from));
            match list.next {
                Some(next) => page.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, ["echo", "mine", "open.echo", "secret.key"]);
        let bad = Page { after: Some(serde_json::json!("x")), max_bytes: None };
        assert!(view.clients(caller(0), &bad).is_err());
    }
}
