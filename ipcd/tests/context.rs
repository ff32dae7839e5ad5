//! What a handler knows of its caller: the uid, gid and pid the kernel
//! reported for the connection (shared memory and Unix stream; none over
//! TCP), the session's id and the service's name, for every kind of
//! handler, on an embedded server. A client of another user (this binary
//! re-run as a helper process under another uid and gid, which takes
//! root; without it that part says "skipped") is seen as that user and
//! that process.

mod common;
#[path = "common/embedded.rs"]
mod embedded;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::{die_with_parent, watchdog, TEST_LIMIT};
use embedded::Embedded;
use ipc_client::{Client, ClientOptions, Transport};
use ipcd::{Request, ServerBuilder, ServiceError};

/// Set in the helper's environment to `shm:PATH` or `uds:PATH`.
const HELPER_TARGET_ENV: &str = "IPCD_TEST_CONTEXT_TARGET";
/// The helper "test" that the test binary re-runs as another user.
const HELPER_NAME: &str = "helper_reports_what_the_handlers_saw";
/// Starts each line the helper reports.
const MARKER: &str = "IPCD-CONTEXT ";
/// The uid and gid the helper runs as.
const OTHER_UID: u32 = 65533;
const OTHER_GID: u32 = 4242;

/// The services, one per kind of handler.
const SERVICES: [&str; 3] = ["whoami", "whoami.blocking", "whoami.deferred"];

/// What a handler saw: `pid uid gid session service`, or `none session
/// service` for a call without a caller.
fn seen(req: &Request<'_>) -> Vec<u8> {
    let caller = match req.caller() {
        Some(c) => format!("{} {} {}", c.pid, c.uid, c.gid),
        None => "none".to_string(),
    };
    format!("{caller} {} {}", req.session(), req.service()).into_bytes()
}

/// The three services, each replying what its handler saw.
fn whoami(builder: ServerBuilder) -> ServerBuilder {
    builder
        .service("whoami", |req| Ok::<_, ServiceError>(seen(req)))
        .blocking_service("whoami.blocking", |req| Ok(seen(req)))
        .deferred_service("whoami.deferred", |request, responder| {
            std::thread::spawn(move || responder.reply(seen(&request.as_request())));
        })
}

/// What each service says a client saw, in [`SERVICES`] order.
fn ask(client: &mut Client) -> Vec<String> {
    SERVICES
        .iter()
        .map(|name| {
            let service = client.service(name).unwrap();
            String::from_utf8(client.call(&service, b"").unwrap()).unwrap()
        })
        .collect()
}

#[test]
fn handlers_see_the_caller_the_session_and_the_service() {
    let server = Embedded::start(whoami);
    let (pid, uid, gid) = (std::process::id(), rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
    for transport in server.transports() {
        let name = transport.name();
        let mut client = server.client(&transport);
        let session = client.session_id();
        let said = watchdog(TEST_LIMIT, move || ask(&mut client));
        let caller = match transport {
            Transport::Tcp(_) => "none".to_string(),
            _ => format!("{pid} {uid} {gid}"),
        };
        let expected: Vec<String> = SERVICES.iter().map(|s| format!("{caller} {session} {s}")).collect();
        assert_eq!(said, expected, "{name}");
    }
}

/// Not a test: the client process of the test below, run as another user
/// with only this function selected. It calls the services over the
/// target in its environment and prints what they saw, with its session.
#[test]
#[ignore = "helper process for the context tests; does nothing when run directly"]
fn helper_reports_what_the_handlers_saw() {
    let Some(target) = std::env::var_os(HELPER_TARGET_ENV) else {
        return;
    };
    let target = target.into_string().expect("target is UTF-8");
    let transport = match target.split_once(':') {
        Some(("shm", path)) => Transport::Shm(path.into()),
        Some(("uds", path)) => Transport::Uds(path.into()),
        _ => panic!("bad target {target:?}"),
    };
    let mut client = Client::connect_with(transport, ClientOptions::default()).expect("the helper connects");
    // libtest has printed the test's name without a line break, so the
    // marker starts a fresh line of its own.
    println!("\n{MARKER}session {}", client.session_id());
    for line in ask(&mut client) {
        println!("{MARKER}{line}");
    }
    std::io::stdout().flush().unwrap();
}

#[test]
fn a_client_of_another_user_is_seen_as_that_user_and_process() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: running a client as another user takes root");
        return;
    }
    let dir = tempfile::Builder::new().prefix("ipcd-context-").tempdir().unwrap();
    // Others may pass through, not list: the socket names are known.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let server = Embedded::start_in(dir, |b| whoami(b.socket_mode(0o666)));
    for transport in &server.transports()[..2] {
        let target = match transport {
            Transport::Shm(p) => format!("shm:{}", p.display()),
            Transport::Uds(p) => format!("uds:{}", p.display()),
            _ => unreachable!("the helper speaks Unix sockets only"),
        };
        let exe = std::env::current_exe().unwrap();
        let mut cmd = Command::new(&exe);
        cmd.args([HELPER_NAME, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env(HELPER_TARGET_ENV, target)
            .uid(OTHER_UID)
            .gid(OTHER_GID)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: uid {OTHER_UID} cannot run {}: {e}", exe.display());
                return;
            }
            Err(e) => panic!("cannot run the helper: {e}"),
        };
        let pid = child.id();
        let output = watchdog(TEST_LIMIT, move || child.wait_with_output().expect("cannot wait for the helper"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix(MARKER)).collect();
        assert!(
            output.status.success() && lines.len() == 4,
            "the helper failed ({}); stdout:\n{stdout}",
            output.status
        );
        let session = lines[0].strip_prefix("session ").expect("the helper's session first");
        let expected: Vec<String> =
            SERVICES.iter().map(|s| format!("{pid} {OTHER_UID} {OTHER_GID} {session} {s}")).collect();
        assert_eq!(lines[1..], expected, "{}", transport.name());
    }
}
