//! Provided services end to end: the real daemon, providers in processes
//! of their own (`ipcd::Provider`, in the test binary run again as a
//! helper, see `procs`), and the real client (`ipc_client::Client`), in
//! this process or in helpers too. Who may provide and call is in
//! `provider_access.rs`; a provider that breaks the protocol in
//! `provider_hostile.rs`; the broker's wire protocol in `broker.rs`.

mod common;
mod procs;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use ipc_client::{CallError, Client, ClientOptions, Received, Reconnect, Ticket};
use ipc_core::control::RegisterError;
use ipcd::{Provider, ProviderError, Request, ServiceError};
use nix::sys::signal::Signal;
use procs::*;

/// Not a test: the helper processes of the tests below (see `procs`).
#[test]
#[ignore = "helper process for the provider tests; does nothing when run directly"]
fn helper_process() {
    procs::helper_main();
}

/// A client of the daemon at `daemon`'s socket whose calls wait long
/// enough for a loaded machine.
fn client_of(daemon: &Daemon, options: ClientOptions) -> Client {
    let options = options.call_timeout(Duration::from_secs(60)).connect_timeout(HANG_UP_LIMIT);
    Client::connect_with(daemon.socket(), options)
        .unwrap_or_else(|e| panic!("cannot connect to ipcd: {e}; stderr:\n{}", daemon.stderr()))
}

fn upper(req: &Request<'_>) -> Result<Vec<u8>, ServiceError> {
    Ok(req.payload().to_ascii_uppercase())
}

#[test]
fn a_provider_process_is_called_through_the_client_and_waited_for_by_an_earlier_caller() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut observer = client_of(&daemon, ClientOptions::default());
        // A caller that starts before the provider waits for it...
        let mut early = HelperBuilder::caller(&socket, "test.late").mode("wait").spawn();
        let broker = broker_eventually(&mut observer, |b| count(b, &["waiting_resolves"]) == 1);
        assert_eq!(count(&broker, &["waiting_resolves"]), 1, "the caller's resolve does not wait: {broker}");
        // ...and reaches it once it registers.
        let mut provider = HelperBuilder::provider(&socket, &["test.late", "test.upper"]).spawn();
        provider.expect("registered");
        let (uid, _) = own_ids();
        assert_eq!(Called::parse(&early.line()), Called::Ok { pid: provider.pid(), uid });
        assert!(early.wait_exit().success());

        // This process's client: the name resolves to the provider process,
        // and its other name comes with the same session.
        let mut client = client_of(&daemon, ClientOptions::default());
        let upper = client.service("test.upper").expect("resolve test.upper");
        assert_eq!(client.call(&upper, b"hello").unwrap(), b"HELLO");
        let who = client.provider(&upper).expect("a provided service names its provider");
        assert_eq!((who.pid, who.uid), (provider.pid() as i32, uid));
        let late = client.service("test.late").expect("resolve test.late");
        assert_eq!(client.call(&late, b"late").unwrap(), b"LATE");
        // The early caller's session ended with its process; this one's
        // is the provider's one session now.
        let broker = broker_eventually(&mut observer, |b| holders(b, "test.upper") == [(provider.pid(), uid, 1)]);
        assert_eq!(holders(&broker, "test.upper"), [(provider.pid(), uid, 1)], "{broker}");
        assert_eq!(number(&broker, &["resolves", "brokered"]), 2, "one session per caller: {broker}");
        // The daemon's own services are still its own.
        let echo = client.service("echo").unwrap();
        assert_eq!(client.provider(&echo), None);
    });
}

#[test]
fn an_exclusive_name_is_refused_to_a_second_provider_naming_the_first_by_pid_and_uid() {
    watchdog(TEST_LIMIT, || {
        // The holder runs as another user where it can, so that its uid is
        // told apart from this process's.
        let holder_uid = if is_root() { OTHER_UID } else { own_ids().0 };
        let config =
            format!("[[access]]\npattern = \"test.excl\"\nprovide = {{ uids = [{}, {holder_uid}] }}\n", own_ids().0);
        let daemon = start_daemon(Some(&config), &[]);
        let socket = daemon.socket().to_path_buf();
        let mut first = HelperBuilder::provider(&socket, &["test.excl"]);
        if is_root() {
            first = first.user(OTHER_UID, NOBODY);
        } else {
            eprintln!("not root: the holder runs as this process's uid");
        }
        let mut first = first.spawn();
        first.expect("registered");

        // A second provider process is refused, naming the holder...
        let mut second = HelperBuilder::provider(&socket, &["test.excl"]).spawn();
        assert_eq!(second.expect("refused"), format!("taken test.excl {} {holder_uid}", first.pid()));
        assert!(second.wait_exit().success());
        // ...and so is one in this process, with the error as it is typed.
        let again = || Provider::builder().socket(&socket).workers(1).service("test.excl", upper).connect();
        match again() {
            Err(e @ ProviderError::Refused(RegisterError::Taken { .. })) => {
                let ProviderError::Refused(RegisterError::Taken { name, holder }) = &e else { unreachable!() };
                assert_eq!(name, "test.excl");
                assert_eq!((holder.pid, holder.uid), (first.pid() as i32, holder_uid));
                let text = e.to_string();
                assert!(text.contains(&format!("pid {} uid {holder_uid}", first.pid())), "{text}");
            }
            other => panic!("a second exclusive provider: {:?}", other.map(|_| ())),
        }
        let mut observer = client_of(&daemon, ClientOptions::default());
        let broker = broker_stats(&mut observer);
        assert_eq!(number(&broker, &["registrations", "refused"]), 2, "{broker}");
        assert_eq!(holders(&broker, "test.excl"), [(first.pid(), holder_uid, 0)], "{broker}");

        // The holder's death frees the name at once: this process takes it.
        first.kill();
        let broker = broker_eventually(&mut observer, |b| holders(b, "test.excl").is_empty());
        assert!(holders(&broker, "test.excl").is_empty(), "the dead provider still holds the name: {broker}");
        let provider = again().expect("the name is free once its holder is gone");
        let stop = provider.shutdown_handle();
        let serving = std::thread::spawn(move || provider.run());
        let mut client = client_of(&daemon, ClientOptions::default());
        let excl = client.service("test.excl").unwrap();
        assert_eq!(client.call(&excl, b"mine").unwrap(), b"MINE");
        stop.shutdown();
        join_within(serving, EXIT_LIMIT, "the provider").expect("the provider ran");
    });
}

#[test]
fn a_provider_that_reads_late_takes_every_session_offered_meanwhile() {
    // Each offer carries its fds: a provider that finds many offers waiting
    // must take them all, not refuse the fds queued ahead of their messages.
    const CALLERS: usize = 24;
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &["--handshake-timeout", "60s"]);
        let socket = daemon.socket().to_path_buf();
        let mut provider = HelperBuilder::provider(&socket, &["test.upper"]).spawn();
        provider.expect("registered");
        let mut observer = client_of(&daemon, ClientOptions::default());
        provider.signal(Signal::SIGSTOP);
        // A stop takes effect as each thread of the provider next runs:
        // wait until all of them are stopped, or one may take an offer.
        let stopped = poll_until(REPORT_LIMIT, || all_threads_stopped(provider.pid()));
        assert!(stopped, "the provider's threads did not all stop");
        let callers: Vec<_> = (0..CALLERS)
            .map(|i| {
                let mut client = client_of(&daemon, ClientOptions::default());
                std::thread::spawn(move || {
                    let upper = client.service("test.upper").map_err(|e| format!("resolve: {e}"))?;
                    let reply =
                        client.call(&upper, format!("caller {i}").as_bytes()).map_err(|e| format!("call: {e}"))?;
                    Ok::<_, String>((reply, client))
                })
            })
            .collect();
        let broker = broker_eventually(&mut observer, |b| count(b, &["sessions_offered"]) == CALLERS as u64);
        assert_eq!(count(&broker, &["sessions_offered"]), CALLERS as u64, "{broker}");
        provider.signal(Signal::SIGCONT);
        let mut clients = Vec::new();
        for (i, caller) in callers.into_iter().enumerate() {
            let (reply, client) =
                join_within(caller, EXIT_LIMIT, "a caller").unwrap_or_else(|e| panic!("caller {i}: {e}"));
            assert_eq!(reply, format!("CALLER {i}").into_bytes());
            clients.push(client);
        }
        // Their sessions are all the provider's, and stay open.
        let broker = broker_eventually(&mut observer, |b| {
            holders(b, "test.upper").first().is_some_and(|h| h.2 == CALLERS as u64)
        });
        assert_eq!(holders(&broker, "test.upper"), [(provider.pid(), own_ids().0, CALLERS as u64)], "{broker}");
    });
}

/// Whether every thread of process `pid` is stopped (state `T` in its
/// `/proc` stat).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().all(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    })
}

#[test]
fn pooled_provider_processes_share_new_sessions() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut a = HelperBuilder::provider(&socket, &["test.pool"]).pooled().spawn();
        a.expect("registered");
        let mut b = HelperBuilder::provider(&socket, &["test.pool"]).pooled().spawn();
        b.expect("registered");
        let mut by_pid: BTreeMap<i32, usize> = BTreeMap::new();
        let clients: Vec<Client> = (0..6)
            .map(|i| {
                let mut client = client_of(&daemon, ClientOptions::default());
                let pool = client.service("test.pool").expect("resolve test.pool");
                let request = format!("client {i}");
                assert_eq!(client.call(&pool, request.as_bytes()).unwrap(), request.to_uppercase().into_bytes());
                *by_pid.entry(client.provider(&pool).unwrap().pid).or_default() += 1;
                client
            })
            .collect();
        // Each new session goes to the provider with the fewest.
        let expected = BTreeMap::from([(a.pid() as i32, 3), (b.pid() as i32, 3)]);
        assert_eq!(by_pid, expected, "sessions by provider pid");
        let mut observer = client_of(&daemon, ClientOptions::default());
        let broker = broker_stats(&mut observer);
        let (uid, _) = own_ids();
        assert_eq!(holders(&broker, "test.pool"), [(a.pid(), uid, 3), (b.pid(), uid, 3)], "{broker}");
        // An exclusive provider may not join the pool.
        let mut alone = HelperBuilder::provider(&socket, &["test.pool"]).spawn();
        assert_eq!(alone.expect("refused"), format!("taken test.pool {} {uid}", a.pid()));
        drop(clients);
    });
}

#[test]
fn a_provider_killed_mid_call_disconnects_each_call_once_and_a_reconnecting_caller_reaches_its_successor() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let names = ["test.hold", "test.upper"];
        let mut first = HelperBuilder::provider(&socket, &names).hold("test.hold").spawn();
        first.expect("registered");
        let mut client = client_of(&daemon, ClientOptions::default().reconnect(Reconnect::default()));
        let hold = client.service("test.hold").unwrap();
        let upper = client.service("test.upper").unwrap();
        // One call the provider is in the middle of, and more behind it.
        let mut sent: BTreeSet<Ticket> = BTreeSet::from([client.send(&hold, b"first").unwrap()]);
        client.flush().unwrap();
        assert_eq!(first.expect("held"), "first");
        sent.extend((0..8).map(|i| client.send(&upper, format!("behind {i}").as_bytes()).unwrap()));
        client.flush().unwrap();
        first.kill();

        // Each call in flight has exactly one outcome: nobody knows
        // whether it ran.
        let mut outcomes = BTreeSet::new();
        for _ in 0..sent.len() {
            let Received { ticket, outcome } = client.recv().expect("an outcome for each call in flight");
            assert!(matches!(outcome, Err(CallError::Disconnected { .. })), "request {}: {outcome:?}", ticket.id());
            assert!(outcomes.insert(ticket), "request {} has two outcomes", ticket.id());
        }
        assert_eq!(outcomes, sent);
        assert_eq!(client.recv().unwrap_err(), CallError::NothingInFlight);

        // A provider started again takes the name, and the same `Service`
        // reaches it.
        let mut observer = client_of(&daemon, ClientOptions::default());
        let broker = broker_eventually(&mut observer, |b| holders(b, "test.upper").is_empty());
        assert!(holders(&broker, "test.upper").is_empty(), "the killed provider still holds its names: {broker}");
        let mut second = HelperBuilder::provider(&socket, &names).spawn();
        second.expect("registered");
        assert_eq!(client.call(&upper, b"again").unwrap(), b"AGAIN");
        assert_eq!(client.provider(&upper).unwrap().pid, second.pid() as i32);
        assert_eq!(client.call(&hold, b"held no more").unwrap(), b"HELD NO MORE");
    });
}

#[test]
fn a_provider_stopped_by_sigterm_answers_the_calls_it_took_and_the_rest_end_shutdown() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut provider = HelperBuilder::provider(&socket, &["test.hold", "test.upper"]).hold("test.hold").spawn();
        provider.expect("registered");
        let mut client = client_of(&daemon, ClientOptions::default());
        let hold = client.service("test.hold").unwrap();
        let upper = client.service("test.upper").unwrap();
        let held = client.send(&hold, b"first").unwrap();
        client.flush().unwrap();
        assert_eq!(provider.expect("held"), "first");
        // More calls than one serving pass takes: those left when the
        // provider looks at its stop flag are never run.
        let behind: Vec<(Ticket, String)> = (0..300)
            .map(|i| {
                let request = format!("behind {i}");
                (client.send(&upper, request.as_bytes()).unwrap(), request)
            })
            .collect();
        client.flush().unwrap();
        provider.signal(Signal::SIGTERM);
        provider.expect("stopping");
        provider.send("release");

        assert_eq!(client.wait(held).unwrap(), b"FIRST", "the call it was running is answered");
        // The calls it took are answered, in order; every one after them
        // ends `Shutdown`, and none is left unknown.
        let mut answered = 0;
        let mut shut = 0;
        for (ticket, request) in behind {
            match client.wait(ticket) {
                Ok(reply) => {
                    assert_eq!(shut, 0, "request {} answered after one ended shutdown", ticket.id());
                    assert_eq!(reply, request.to_uppercase().into_bytes());
                    answered += 1;
                }
                Err(CallError::Shutdown) => shut += 1,
                Err(e) => panic!("request {}: {e:?} (answered {answered}, shut down {shut})", ticket.id()),
            }
        }
        assert!(shut > 0, "all 300 calls were answered: the stop came too late to test anything");
        assert_eq!(provider.expect("stopped"), "");
        assert!(provider.wait_exit().success());
        let after = client.call(&upper, b"later");
        assert!(matches!(after, Err(CallError::Shutdown | CallError::NotConnected { .. })), "{after:?}");
        // Its names are free.
        let mut observer = client_of(&daemon, ClientOptions::default());
        let broker = broker_eventually(&mut observer, |b| holders(b, "test.upper").is_empty());
        assert!(holders(&broker, "test.upper").is_empty(), "{broker}");
    });
}

/// Asks a looping caller helper how it fares: (calls, failures).
fn report(caller: &mut Helper) -> (u64, u64) {
    caller.send("report");
    let line = caller.expect("count");
    let (calls, failed) = line.split_once(' ').expect("count CALLS FAILED");
    (calls.parse().unwrap(), failed.parse().unwrap())
}

#[test]
fn brokered_calls_of_another_process_go_on_while_the_daemon_restarts_and_the_provider_registers_again() {
    watchdog(TEST_LIMIT, || {
        let mut daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut provider = HelperBuilder::provider(&socket, &["test.steady"]).spawn();
        provider.expect("registered");
        let mut caller = HelperBuilder::caller(&socket, "test.steady").mode("loop").spawn();
        caller.expect("ready");

        daemon.kill();
        // With no daemon at all, the calls go on.
        let (before, _) = report(&mut caller);
        assert!(poll_until(HANG_UP_LIMIT, || report(&mut caller).0 > before), "the calls stopped with the daemon");
        let daemon = start_daemon_in(daemon.into_dir(), &[]);

        // The provider registers again by itself, with the session it
        // kept, and a new caller resolves.
        let mut observer = client_of(&daemon, ClientOptions::default());
        let (uid, _) = own_ids();
        let broker = broker_eventually(&mut observer, |b| !holders(b, "test.steady").is_empty());
        assert_eq!(holders(&broker, "test.steady"), [(provider.pid(), uid, 1)], "{broker}");
        assert_eq!(number(&broker, &["registrations", "accepted"]), 1, "{broker}");
        let mut client = client_of(&daemon, ClientOptions::default());
        let steady = client.service("test.steady").expect("a new caller resolves");
        assert_eq!(client.call(&steady, b"new").unwrap(), b"NEW");
        assert_eq!(client.provider(&steady).unwrap().pid, provider.pid() as i32);

        let (during, failed) = report(&mut caller);
        assert_eq!(failed, 0);
        assert!(poll_until(HANG_UP_LIMIT, || report(&mut caller).0 > during), "the calls stopped");
        caller.send("stop");
        let done = caller.expect("done");
        let mut words = done.splitn(3, ' ');
        let (calls, failed, first) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap_or(""));
        assert_eq!(failed, "0", "{failed} of {calls} brokered calls failed, the first with: {first}");
        assert!(caller.wait_exit().success());
    });
}

#[test]
fn fds_of_the_daemon_and_a_provider_come_back_after_callers_and_providers_go() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut observer = client_of(&daemon, ClientOptions::default());
        let mut provider = HelperBuilder::provider(&socket, &["test.fds"]).spawn();
        provider.expect("registered");
        // One caller first, so that the provider's workers are up.
        assert!(matches!(run_caller(HelperBuilder::caller(&socket, "test.fds")), Called::Ok { .. }));
        broker_eventually(&mut observer, |b| count(b, &["sessions_handed_over"]) == 0);
        let daemon_baseline = settled_fd_count(daemon.pid());
        let provider_baseline = settled_fd_count(provider.pid());

        // Callers that call and exit, at once and in turn; one killed
        // mid-session; a second provider, called and stopped.
        let callers: Vec<Helper> =
            (0..3).map(|_| HelperBuilder::caller(&socket, "test.fds").calls(20).spawn()).collect();
        for mut caller in callers {
            assert!(matches!(Called::parse(&caller.line()), Called::Ok { .. }));
            assert!(caller.wait_exit().success());
        }
        let mut looping = HelperBuilder::caller(&socket, "test.fds").mode("loop").spawn();
        looping.expect("ready");
        looping.kill();
        let mut other = HelperBuilder::provider(&socket, &["test.fds-other"]).spawn();
        other.expect("registered");
        assert!(matches!(run_caller(HelperBuilder::caller(&socket, "test.fds-other")), Called::Ok { .. }));
        other.signal(Signal::SIGTERM);
        assert!(other.wait_exit().success());
        let broker = broker_eventually(&mut observer, |b| {
            count(b, &["sessions_handed_over"]) == 0 && holders(b, "test.fds-other").is_empty()
        });
        assert_eq!(number(&broker, &["sessions_handed_over"]), 0, "{broker}");
        assert_eq!(holders(&broker, "test.fds"), [(provider.pid(), own_ids().0, 0)], "{broker}");

        assert!(
            fds_back_to(daemon.pid(), daemon_baseline),
            "the daemon holds {} fds, {daemon_baseline} before",
            fd_count(daemon.pid())
        );
        assert!(
            fds_back_to(provider.pid(), provider_baseline),
            "the provider holds {} fds, {provider_baseline} before",
            fd_count(provider.pid())
        );
    });
}

#[test]
fn the_handler_of_a_provider_sees_each_callers_credentials() {
    watchdog(TEST_LIMIT, || {
        let daemon = start_daemon(None, &[]);
        let socket = daemon.socket().to_path_buf();
        let mut provider = HelperBuilder::provider(&socket, &["test.whoami"]).spawn();
        provider.expect("registered");
        // This process...
        let (uid, gid) = own_ids();
        let mut client = client_of(&daemon, ClientOptions::default());
        let whoami = client.service("test.whoami").unwrap();
        let reply = String::from_utf8(client.call(&whoami, b"").unwrap()).unwrap();
        assert_eq!(reply, format!("{} {uid} {gid}", std::process::id()));
        // ...and another, as another user and group where this one can
        // start it so.
        let mut caller = HelperBuilder::caller(&socket, "test.whoami").mode("whoami");
        let (uid, gid) = if is_root() {
            caller = caller.user(OTHER_UID, OTHER_GID);
            (OTHER_UID, OTHER_GID)
        } else {
            eprintln!("not root: the other caller runs as this process's uid");
            (uid, gid)
        };
        let mut caller = caller.spawn();
        assert_eq!(caller.expect("said"), format!("{} {uid} {gid}", caller.pid()));
        assert!(caller.wait_exit().success());
    });
}
