//! Who may provide and call provided names, end to end: the daemon's
//! access rules (`ipcd --config FILE`, and the defaults without one),
//! with providers and callers run as other users and groups (the test
//! binary run again as a helper, see `procs`). A refusal is an explicit
//! error naming who was refused what (`RegisterError::NotPermitted` for a
//! provider, `CallError::NotPermitted` for a caller), logged and counted in
//! the `broker` object of `stats`.
//!
//! Running helpers as other users takes root; without it the tests say
//! "skipped" and check only what this process's own credentials allow.

mod common;
mod procs;

use std::time::Duration;

use common::*;
use ipc_client::{CallError, Client, ClientOptions};
use ipc_core::control::RegisterError;
use ipcd::{Provider, ProviderError, Request, ServiceError};
use procs::*;

/// Not a test: the helper processes of the tests below (see `procs`).
#[test]
#[ignore = "helper process for the provider access tests; does nothing when run directly"]
fn helper_process() {
    procs::helper_main();
}

fn client_of(daemon: &Daemon) -> Client {
    let options = ClientOptions::default().call_timeout(Duration::from_secs(60)).connect_timeout(HANG_UP_LIMIT);
    Client::connect_with(daemon.socket(), options)
        .unwrap_or_else(|e| panic!("cannot connect to ipcd: {e}; stderr:\n{}", daemon.stderr()))
}

/// Asserts that a refusal's reason names the process (`pid`, `uid`) and
/// the name, and that the daemon logged it.
fn assert_names(reason: &str, pid: u32, uid: u32, name: &str, daemon: &Daemon) {
    for part in [format!("pid {pid} "), format!("uid {uid} "), format!("{name:?}")] {
        assert!(reason.contains(&part), "the reason does not name {part:?}: {reason}");
    }
    let logged = poll_until(CLEANUP_LIMIT, || daemon.stderr().lines().any(|l| l.contains(reason)));
    assert!(logged, "the refusal {reason:?} is not logged; stderr:\n{}", daemon.stderr());
}

/// A provider helper of `names` as `uid`:`gid` that must be refused:
/// returns the reason and its pid.
fn refused_provider(socket: &std::path::Path, names: &[&str], uid: u32, gid: u32) -> (String, u32) {
    let mut provider = HelperBuilder::provider(socket, names).user(uid, gid).spawn();
    let reason = provider.expect("refused not-permitted");
    assert!(provider.wait_exit().success());
    (reason, provider.pid())
}

/// A caller helper of `name` as `uid`:`gid` that must be refused: returns
/// the reason and its pid.
fn refused_caller(socket: &std::path::Path, name: &str, uid: u32, gid: u32) -> (String, u32) {
    let mut caller = HelperBuilder::caller(socket, name).user(uid, gid).spawn();
    let called = Called::parse(&caller.line());
    assert!(caller.wait_exit().success());
    match called {
        // "not permitted to call NAME: REASON"
        Called::Error { kind, message } if kind == "not-permitted" => {
            let (_, reason) = message.split_once(": ").unwrap_or_else(|| panic!("no reason in {message:?}"));
            (reason.to_string(), caller.pid())
        }
        other => panic!("{uid}:{gid} calling {name}: expected not-permitted, got {other:?}"),
    }
}

#[test]
fn without_a_config_only_the_daemons_uid_or_root_provides_and_anyone_calls() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let (uid, _) = own_ids();
        // The daemon's own uid (root here) provides.
        let mut provider = HelperBuilder::provider(&socket, &["test.open"]).spawn();
        provider.expect("registered");
        if !is_root() {
            eprintln!("skipped: providers and callers of other users need root to start; checking uid {uid} alone");
            let mut client = client_of(&daemon);
            let open = client.service("test.open").unwrap();
            assert_eq!(client.call(&open, b"x").unwrap(), b"X");
            return;
        }
        // Nobody does not...
        let (reason, pid) = refused_provider(&socket, &["test.nobody"], NOBODY, NOBODY);
        assert!(reason.contains("may not provide"), "{reason}");
        assert_names(&reason, pid, NOBODY, "test.nobody", &daemon);
        // ...but calls.
        let called = run_caller(HelperBuilder::caller(&socket, "test.open").user(NOBODY, NOBODY));
        assert_eq!(called, Called::Ok { pid: provider.pid(), uid });

        let mut observer = client_of(&daemon);
        let broker = broker_stats(&mut observer);
        assert_eq!(number(&broker, &["registrations", "refused"]), 1, "{broker}");
        assert_eq!(number(&broker, &["registrations", "accepted"]), 1, "{broker}");
        assert_eq!(number(&broker, &["resolves", "not_permitted"]), 0, "{broker}");
        assert!(holders(&broker, "test.nobody").is_empty(), "{broker}");
    });
}

/// Names provided and called by uid (`test.byuid.*`: uid [`OTHER_UID`])
/// and by primary gid (`test.bygid.*`: gid [`OTHER_GID`]); a rule's lists
/// replace the defaults, so root is refused both too.
const RULES: &str = r#"
[[access]]
pattern = "test.byuid.*"
provide = { uids = [65533] }
call = { uids = [65533] }

[[access]]
pattern = "test.bygid.*"
provide = { gids = [4242] }
call = { gids = [4242] }
"#;

#[test]
fn the_config_admits_providers_and_callers_by_uid_and_by_gid_and_refuses_the_others_by_name() {
    assert_eq!((OTHER_UID, OTHER_GID), (65533, 4242), "RULES names them");
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(Some(RULES), &[]);
        let socket = daemon.socket().to_path_buf();
        let mut observer = client_of(&daemon);
        if !is_root() {
            // This process is in neither list (unless it has one of the ids).
            eprintln!("skipped: providers and callers of other users need root to start");
            return;
        }
        // Admitted by uid, and by gid.
        let mut by_uid = HelperBuilder::provider(&socket, &["test.byuid.a"]).user(OTHER_UID, NOBODY).spawn();
        by_uid.expect("registered");
        let mut by_gid = HelperBuilder::provider(&socket, &["test.bygid.a"]).user(NOBODY, OTHER_GID).spawn();
        by_gid.expect("registered");
        let called = run_caller(HelperBuilder::caller(&socket, "test.byuid.a").user(OTHER_UID, NOBODY));
        assert_eq!(called, Called::Ok { pid: by_uid.pid(), uid: OTHER_UID });
        let called = run_caller(HelperBuilder::caller(&socket, "test.bygid.a").user(NOBODY, OTHER_GID));
        assert_eq!(called, Called::Ok { pid: by_gid.pid(), uid: NOBODY });

        // Refused providers: in neither list, and root (the default no
        // longer holds for these names).
        let (reason, pid) = refused_provider(&socket, &["test.byuid.b"], NOBODY, NOBODY);
        assert_names(&reason, pid, NOBODY, "test.byuid.b", &daemon);
        let (reason, pid) = refused_provider(&socket, &["test.bygid.b"], OTHER_UID, NOBODY);
        assert_names(&reason, pid, OTHER_UID, "test.bygid.b", &daemon);
        let refused = Provider::builder()
            .socket(&socket)
            .workers(1)
            .service("test.byuid.c", |r: &Request<'_>| Ok::<_, ServiceError>(r.payload().to_vec()))
            .connect();
        match refused {
            Err(ProviderError::Refused(RegisterError::NotPermitted { reason })) => {
                assert_names(&reason, std::process::id(), 0, "test.byuid.c", &daemon);
            }
            other => panic!("root providing test.byuid.c: {:?}", other.map(|_| ())),
        }

        // Refused callers, by uid and by gid, and root.
        let (reason, pid) = refused_caller(&socket, "test.byuid.a", NOBODY, OTHER_GID);
        assert!(reason.contains("may not call"), "{reason}");
        assert_names(&reason, pid, NOBODY, "test.byuid.a", &daemon);
        let (reason, pid) = refused_caller(&socket, "test.bygid.a", OTHER_UID, NOBODY);
        assert_names(&reason, pid, OTHER_UID, "test.bygid.a", &daemon);
        let mut client = client_of(&daemon);
        match client.service("test.byuid.a") {
            Err(CallError::NotPermitted { name, reason }) => {
                assert_eq!(name, "test.byuid.a");
                assert_names(&reason, std::process::id(), 0, "test.byuid.a", &daemon);
            }
            other => panic!("root calling test.byuid.a: {other:?}"),
        }

        // Each refusal is counted; the admitted ones are not. (The callers
        // are gone: so are their sessions.)
        let broker = broker_eventually(&mut observer, |b| count(b, &["sessions_handed_over"]) == 0);
        assert_eq!(number(&broker, &["registrations", "refused"]), 3, "{broker}");
        assert_eq!(number(&broker, &["registrations", "accepted"]), 2, "{broker}");
        assert_eq!(number(&broker, &["resolves", "not_permitted"]), 3, "{broker}");
        assert_eq!(number(&broker, &["resolves", "brokered"]), 2, "{broker}");
        assert_eq!(holders(&broker, "test.byuid.a"), [(by_uid.pid(), OTHER_UID, 0)], "{broker}");
        assert_eq!(holders(&broker, "test.bygid.a"), [(by_gid.pid(), NOBODY, 0)], "{broker}");
    });
}

#[test]
fn failed_resolves_are_in_stats_at_once() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(Some(RULES), &[]);
        let mut observer = client_of(&daemon);
        let mut client = client_of(&daemon);
        // Not permitted (root is in neither list of test.byuid.*)...
        assert!(matches!(client.service("test.byuid.a"), Err(CallError::NotPermitted { .. })));
        let broker = broker_eventually(&mut observer, |b| count(b, &["resolves", "not_permitted"]) == 1);
        assert_eq!(count(&broker, &["resolves", "not_permitted"]), 1, "{broker}");
        // ...unknown...
        assert!(matches!(client.service("test.nobody"), Err(CallError::UnknownService { .. })));
        let broker = broker_eventually(&mut observer, |b| count(b, &["resolves", "unknown_service"]) == 1);
        assert_eq!(count(&broker, &["resolves", "unknown_service"]), 1, "{broker}");
        // ...and a wait for a provider that never came, which waits no more.
        let waited = client.wait_for_service("test.never", Duration::from_millis(100));
        assert!(matches!(waited, Err(CallError::UnknownService { .. })), "{waited:?}");
        let broker = broker_eventually(&mut observer, |b| count(b, &["waiting_resolves"]) == 0);
        assert_eq!(count(&broker, &["waiting_resolves"]), 0, "{broker}");
    });
}
