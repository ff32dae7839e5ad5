//! The ipcd daemon binary.

#![forbid(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use ipc_platform::ServiceState;

mod config;
mod systemd;

/// ipcd: request/response IPC over sealed shared-memory rings.
///
/// Listens on a Unix control socket; clients (ipc-client) handshake there and
/// then call services through shared memory. With --uds and --tcp it also
/// serves the same services over plain stream sockets. Who may connect: the
/// socket's mode, then (with --allow-uid or --allow-gid) the client's uid
/// or primary gid as the kernel reports it for the connection. SIGINT or
/// SIGTERM stops it: calls in flight get a shutdown error, the socket file
/// is removed, and it exits 0. A second SIGINT or SIGTERM while it waits
/// for a handler to finish makes it exit at once, with status 1. Exit
/// status 2 means a usage error.
///
/// Under a service manager: sockets passed with socket activation
/// (LISTEN_FDS) are served instead of being bound, told apart by their
/// FileDescriptorName=: control (the control socket, instead of --socket),
/// uds (instead of --uds) and tcp (instead of --tcp); a single socket with
/// another name, or none, is the control socket. Their files are the
/// manager's and stay when ipcd stops. With NOTIFY_SOCKET set, ipcd sends
/// READY=1 once it serves and STOPPING=1 when it begins to stop, and, with a
/// watchdog (WATCHDOG_USEC), WATCHDOG=1 every half interval as long as every
/// worker's loop (and the acceptor's) has turned since the last time: a
/// handler that does not return stops them.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Control socket path [default: $IPCD_SOCKET, else
    /// $XDG_RUNTIME_DIR/ipcd.sock, else /tmp/ipcd-<uid>/ipcd.sock]
    #[arg(long)]
    socket: Option<PathBuf>,

    /// Control socket permissions, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,

    /// Worker threads [default: the available cores]
    #[arg(long, value_parser = parse_positive)]
    workers: Option<usize>,

    /// Clients served at once; the next one is rejected.
    #[arg(long, default_value = "4096", value_parser = parse_positive)]
    max_clients: usize,

    /// Time a new connection has to send its hello (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    handshake_timeout: Duration,

    /// Connections whose hello is unfinished at once, shared between users
    /// (uids; TCP peers count as one): at the cap, a new connection takes
    /// the place of the oldest unfinished one of the user with the most, if
    /// that user has at least two more than the newcomer's, or is closed at
    /// once.
    #[arg(long, value_name = "N", default_value_t = ipcd::DEFAULT_MAX_PENDING_HANDSHAKES, value_parser = parse_positive)]
    max_pending_handshakes: usize,

    /// How long a client may leave its replies unread (e.g. 10s, 300ms).
    /// While its replies wait, its further requests wait too, and no other
    /// client is held up; after this long its session is closed, logged
    /// and counted as stalled.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stall_timeout: Duration,

    /// Largest ring a client may ask for, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_ring_size: u32,

    /// Memory all sessions together may be charged, in bytes (suffixes K,
    /// M, G, T: powers of 1024). A shared-memory session is charged its
    /// segment plus one maximum payload, a stream session its buffers'
    /// bound, from creation to close; a client whose session would pass the
    /// budget is rejected, naming it [default: a quarter of MemTotal]
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    max_shm: Option<u64>,

    /// Longest message (request, reply or stream item) a session takes or
    /// sends, in bytes (suffixes K, M, G, T); held to --max-shm. Longer
    /// than a frame, it goes in chunks; one being assembled or waiting to be
    /// sent is charged against --max-shm for what it holds. A longer request
    /// (or one the budget has no room for) is answered with an error for
    /// that call alone. Also the configuration file's `max_message`; this
    /// flag wins [default: 1G]
    #[arg(long, value_name = "BYTES", value_parser = parse_positive_bytes)]
    max_message: Option<u64>,

    /// Live sessions one uid may have over the control socket and --uds;
    /// the next is rejected, naming the uid and the limit. TCP sessions
    /// carry no uid and count only against --max-clients and --max-shm.
    #[arg(long, value_name = "N", default_value_t = ipcd::DEFAULT_MAX_SESSIONS_PER_UID, value_parser = parse_positive)]
    max_sessions_per_uid: usize,

    /// Log level: error, warn, info, debug, trace or off, or a tracing
    /// filter whose every directive names one (e.g. ipcd=debug,warn).
    #[arg(long, default_value = "info", value_parser = parse_log_level)]
    log_level: String,

    /// Also offer the debug.sleep and debug.fail services (for tests).
    #[arg(long)]
    debug_services: bool,

    /// Also serve the same services over a plain Unix stream socket at PATH
    /// (for clients that cannot map shared memory, and as a baseline).
    #[arg(long, value_name = "PATH")]
    uds: Option<PathBuf>,

    /// Also serve over TCP at ADDR, e.g. 127.0.0.1:7070. No access control:
    /// bind it to loopback. Not with --allow-uid or --allow-gid (TCP carries
    /// no credentials to check).
    #[arg(long, value_name = "ADDR")]
    tcp: Option<std::net::SocketAddr>,

    /// Admit only clients running as user UID, or (with --allow-gid) in a
    /// listed group; repeatable. Applies to the control socket and --uds.
    /// Others are refused with an explicit "not permitted" answer, logged
    /// and counted. Without either flag, anyone who can open the socket is
    /// admitted.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,

    /// Admit clients whose primary group (as the kernel reports it for the
    /// connection; supplementary groups do not count) is GID; repeatable.
    /// See --allow-uid.
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gid: Vec<u32>,

    /// Longest a worker spins on idle rings before sleeping, in
    /// microseconds (0: never) [default: 50 with more than one core]
    #[arg(long, value_name = "US")]
    spin_us: Option<u64>,

    /// The configuration file (TOML): who may provide and who may call
    /// brokered names. Without one, only ipcd's own uid and root may
    /// provide, and anyone who can open the socket may call. See
    /// ipcd/dist/ipcd.toml.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a number: {e}")),
    }
}

/// Accepts a level, or a tracing filter whose every directive ends in one
/// (`target=level`). Anything else is refused: tracing reads a bare word
/// that is no level, a misspelt one say, as a target name, and would log
/// nothing at all.
fn parse_log_level(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in s.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} names no level (use error, warn, info, debug, trace or off, alone or as target=level)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map_err(|e| format!("{s:?} is not a log filter: {e}"))?;
    Ok(s.to_string())
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (number, shift) = match s.strip_suffix(['K', 'k', 'M', 'm', 'G', 'g', 'T', 't']) {
        Some(number) => {
            let shift = match s.as_bytes()[s.len() - 1].to_ascii_uppercase() {
                b'K' => 10,
                b'M' => 20,
                b'G' => 30,
                _ => 40,
            };
            (number, shift)
        }
        None => (s, 0),
    };
    let n: u64 = number.parse().map_err(|e| format!("{s:?} is not a number of bytes: {e}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_positive_bytes(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err(format!("{s:?} must be at least 1 byte")),
        n => Ok(n),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|e| format!("{s:?} is not octal: {e}"))?;
    if mode > 0o777 {
        return Err(format!("mode {s} has bits beyond 0777"));
    }
    Ok(mode)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number.parse().map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, ms, us or m)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} is out of range: {e}"))
}

impl Args {
    /// Checks what clap cannot express: combinations that make no sense,
    /// with the sockets the service manager passed (`passed`).
    fn validate(&self, passed: &systemd::Passed<OwnedFd>) -> Result<(), String> {
        let allow_list = !(self.allow_uid.is_empty() && self.allow_gid.is_empty());
        if self.tcp.is_some() && allow_list {
            return Err("--tcp cannot be combined with --allow-uid or --allow-gid: TCP carries no peer \
                        credentials to check, so it would admit anyone"
                .into());
        }
        if passed.tcp.is_some() && allow_list {
            return Err("the service manager passed a TCP socket (tcp), which cannot be combined with \
                        --allow-uid or --allow-gid: TCP carries no peer credentials to check"
                .into());
        }
        let both = [
            ("--socket", self.socket.is_some(), passed.control.is_some()),
            ("--uds", self.uds.is_some(), passed.uds.is_some()),
            ("--tcp", self.tcp.is_some(), passed.tcp.is_some()),
        ];
        if let Some(((flag, ..), name)) =
            both.into_iter().zip(systemd::NAMES).find(|((_, flag, passed), _)| *flag && *passed)
        {
            return Err(format!(
                "{flag} and the socket the service manager passed as {name} are the same listener: give one"
            ));
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // First, while this is the only thread: taking the sockets removes
    // their variables from the environment.
    let passed = match ipc_platform::take_passed_sockets()
        .map_err(|e| e.to_string())
        .and_then(|sockets| systemd::assign(sockets.into_iter().map(|s| (s.name, s.fd))))
    {
        Ok(passed) => passed,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    if let Err(message) = args.validate(&passed) {
        // Exits 2, like every other usage error.
        Args::command().error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    // A configuration that cannot be used is a usage error too (exit 2),
    // found before anything starts.
    let config = match args.config.as_deref().map(config::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    // Checked when the arguments were parsed.
    let filter = tracing_subscriber::EnvFilter::new(&args.log_level);
    // Colours only on a terminal: a journal or a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_env_filter(filter)
        .with_target(false)
        .init();
    match run(args, config, passed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, config: config::Config, passed: systemd::Passed<OwnedFd>) -> anyhow::Result<()> {
    match ipc_platform::raise_nofile_limit() {
        Ok(limit) => tracing::debug!("open-files limit raised to {limit:?}"),
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
    let mut builder = ipcd::Server::builder()
        .socket_mode(args.socket_mode)
        .max_clients(args.max_clients)
        .handshake_timeout(args.handshake_timeout)
        .max_pending_handshakes(args.max_pending_handshakes)
        .stall_timeout(args.stall_timeout)
        .max_ring_capacity(args.max_ring_size)
        .max_sessions_per_uid(args.max_sessions_per_uid)
        .max_message(args.max_message.or(config.max_message).unwrap_or(ipcd::DEFAULT_MAX_MESSAGE))
        .debug_services(args.debug_services);
    if let Some(bytes) = args.max_shm {
        builder = builder.max_shm(bytes);
    }
    if let Some(socket) = args.socket {
        builder = builder.socket(socket);
    }
    if let Some(workers) = args.workers {
        builder = builder.workers(workers);
    }
    if let Some(path) = args.uds {
        builder = builder.uds(path);
    }
    if let Some(addr) = args.tcp {
        builder = builder.tcp(addr);
    }
    if let Some(us) = args.spin_us {
        builder = builder.spin(Duration::from_micros(us));
    }
    for uid in args.allow_uid {
        builder = builder.allow_uid(uid);
    }
    for gid in args.allow_gid {
        builder = builder.allow_gid(gid);
    }
    for rule in config.rules {
        builder = builder.access_rule(rule);
    }
    if let Some(fd) = passed.control {
        builder = builder.control_listener(fd.into());
    }
    if let Some(fd) = passed.uds {
        builder = builder.uds_listener(fd.into());
    }
    if let Some(fd) = passed.tcp {
        builder = builder.tcp_listener(fd.into());
    }
    let server = builder.build().context("cannot start ipcd")?;
    let status = format!("serving on {}", server.socket_path().display());
    let handle = server.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new().name("ipcd-signals".into()).spawn(move || {
        let mut signals = signals.forever();
        if let Some(sig) = signals.next() {
            tracing::info!(signal = sig, "stopping");
            systemd::tell(ServiceState::Stopping);
            handle.shutdown();
        }
        // The graceful stop waits for every worker, and so for any handler
        // still running; whoever sends a second signal does not want to.
        if let Some(sig) = signals.next() {
            tracing::warn!(
                signal = sig,
                "second signal while stopping: exiting at once, without waiting for the workers"
            );
            std::process::exit(1);
        }
    })?;
    server
        .run_with_ready(|health| {
            systemd::tell(ServiceState::Ready { status: &status });
            if let Some(interval) = ipc_platform::watchdog_interval() {
                systemd::start_watchdog(health, interval);
            }
        })
        .context("ipcd failed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_and_filters_are_accepted_and_other_words_refused() {
        for ok in ["info", "WARN", "off", "trace", "ipcd=debug", "ipcd=debug,warn", "ipcd::acceptor=trace,error"] {
            assert_eq!(parse_log_level(ok).as_deref(), Ok(ok));
        }
        for bad in ["bogus", "", "inf", "ipcd", "ipcd=loud", "warn,", "debug,ipcd"] {
            let err = parse_log_level(bad).unwrap_err();
            assert!(err.contains("names no level") || err.contains("not a log filter"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn byte_counts_take_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("3m"), Ok(3 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1T"), Ok(1 << 40));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999T").unwrap_err().contains("too large"));
    }
}
