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
mod reload;
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
/// Every flag can be set in the --config file too, under its name without
/// the dashes in front (max-clients = 512); a flag given here wins. SIGHUP
/// reads the file again and applies its allow lists, access rules and
/// limits all at once, keeping every session (those the new rules would
/// refuse too: only new ones are judged by them), and logs what changed; a
/// file that fails to parse or check is logged and nothing changes.
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

    /// Control socket permissions, in octal [default: 600]
    #[arg(long, value_parser = parse_mode)]
    socket_mode: Option<u32>,

    /// Worker threads [default: the available cores]
    #[arg(long, value_parser = parse_positive)]
    workers: Option<usize>,

    /// Segments kept ready for connecting clients, each charged against
    /// --max-shm while it waits; 0 makes every segment at connect
    /// [default: 8]
    #[arg(long)]
    segment_pool: Option<usize>,

    /// Clients served at once; the next one is rejected [default: 4096]
    #[arg(long, value_parser = parse_positive)]
    max_clients: Option<usize>,

    /// Time a new connection has to send its hello (e.g. 2s, 500ms)
    /// [default: 2s]
    #[arg(long, value_parser = parse_duration)]
    handshake_timeout: Option<Duration>,

    /// Connections whose hello is unfinished at once, shared between users
    /// (uids; TCP peers count as one): at the cap, a new connection takes
    /// the place of the oldest unfinished one of the user with the most, if
    /// that user has at least two more than the newcomer's, or is closed at
    /// once [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    max_pending_handshakes: Option<usize>,

    /// How long a client may leave its replies unread (e.g. 10s, 300ms).
    /// While its replies wait, its further requests wait too, and no other
    /// client is held up; after this long its session is closed, logged
    /// and counted as stalled [default: 10s]
    #[arg(long, value_parser = parse_duration)]
    stall_timeout: Option<Duration>,

    /// Largest ring a client may ask for, in bytes [default: 16777216]
    #[arg(long)]
    max_ring_size: Option<u32>,

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
    /// that call alone. Also the configuration file's `max-message`; this
    /// flag wins [default: 1G]
    #[arg(long, value_name = "BYTES", value_parser = parse_positive_bytes)]
    max_message: Option<u64>,

    /// Live sessions one uid may have over the control socket and --uds;
    /// the next is rejected, naming the uid and the limit. TCP sessions
    /// carry no uid and count only against --max-clients and --max-shm
    /// [default: 1024]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    max_sessions_per_uid: Option<usize>,

    /// Log level: error, warn, info, debug, trace or off, or a tracing
    /// filter whose every directive names one (e.g. ipcd=debug,warn); the
    /// last one given counts [default: info]
    #[arg(long, value_parser = parse_log_level, overrides_with = "log_level")]
    log_level: Option<String>,

    /// Log lines as text, or as one JSON object each (for log collectors)
    /// [default: text]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,

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

    /// Serve Prometheus metrics over HTTP at ADDR (GET /metrics), e.g.
    /// 127.0.0.1:9464. A loopback address only, unless
    /// --metrics-allow-remote: the metrics name services and count users'
    /// sessions.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,

    /// Let --metrics listen on an address other hosts can reach.
    #[arg(long)]
    metrics_allow_remote: bool,

    /// The configuration file (TOML): any of the flags above, and who may
    /// provide and who may call brokered names. Without one, only ipcd's
    /// own uid and root may provide, and anyone who can open the socket may
    /// call. See ipcd/dist/ipcd.toml. SIGHUP reads it again.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Checks the configuration file at PATH (with the other flags given)
    /// and exits: 0 if ipcd would start with it, 2 with the first mistake
    /// otherwise. Starts nothing.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    check_config: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
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
pub(crate) fn parse_log_level(s: &str) -> Result<String, String> {
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

pub(crate) fn parse_bytes(s: &str) -> Result<u64, String> {
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

pub(crate) fn parse_positive_bytes(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err(format!("{s:?} must be at least 1 byte")),
        n => Ok(n),
    }
}

pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|e| format!("{s:?} is not octal: {e}"))?;
    if mode > 0o777 {
        return Err(format!("mode {s} has bits beyond 0777"));
    }
    Ok(mode)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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

/// Checks what the configuration cannot alone: its listeners against the
/// sockets the service manager passed (`passed`).
fn validate(config: &config::Config, passed: &systemd::Passed<OwnedFd>) -> Result<(), String> {
    let allow_list = !(config.settings.allow_uids.is_empty() && config.settings.allow_gids.is_empty());
    if passed.tcp.is_some() && allow_list {
        return Err("the service manager passed a TCP socket (tcp), which cannot be combined with \
                    --allow-uid or --allow-gid: TCP carries no peer credentials to check"
            .into());
    }
    let both = [
        ("--socket", config.socket.is_some(), passed.control.is_some()),
        ("--uds", config.uds.is_some(), passed.uds.is_some()),
        ("--tcp", config.tcp.is_some(), passed.tcp.is_some()),
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

/// The command line over the file at `path` (if any), checked.
fn load(args: &Args, path: Option<&std::path::Path>) -> anyhow::Result<config::Config> {
    let file = path.map(config::read).transpose()?;
    config::Config::resolve(args, file)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        // A usage error (2) like any other configuration that cannot be
        // used; nothing starts.
        return match load(&args, Some(path)) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    // A configuration that cannot be used is a usage error (exit 2), found
    // before anything starts.
    let config = match load(&args, args.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
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
    if let Err(message) = validate(&config, &passed) {
        // Exits 2, like every other usage error.
        Args::command().error(clap::error::ErrorKind::ArgumentConflict, message).exit();
    }
    // Checked when the configuration was resolved.
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_target(false);
    match config.log_format {
        // Colours only on a terminal: a journal or a log file gets plain
        // text.
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
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
        .socket_mode(config.socket_mode)
        .settings(config.settings.clone())
        .max_message(config.max_message)
        .debug_services(config.debug_services);
    if let Some(socket) = &config.socket {
        builder = builder.socket(socket);
    }
    if let Some(workers) = config.workers {
        builder = builder.workers(workers);
    }
    if let Some(n) = config.segment_pool {
        builder = builder.segment_pool(n);
    }
    if let Some(path) = &config.uds {
        builder = builder.uds(path);
    }
    if let Some(addr) = config.tcp {
        builder = builder.tcp(addr);
    }
    if let Some(spin) = config.spin {
        builder = builder.spin(spin);
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
    // Served until `run` returns.
    let _metrics = match config.metrics {
        Some(addr) => Some(server.serve_metrics(addr, config.metrics_allow_remote).context("cannot start ipcd")?),
        None => None,
    };
    let status = format!("serving on {}", server.socket_path().display());
    let handle = server.shutdown_handle();
    let mut reload = reload::Reload::new(args, config, server.reload_handle());
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    std::thread::Builder::new().name("ipcd-signals".into()).spawn(move || {
        let mut stopping = false;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                if !stopping {
                    reload.run();
                }
                continue;
            }
            if !stopping {
                stopping = true;
                tracing::info!(signal = sig, "stopping");
                systemd::tell(ServiceState::Stopping);
                handle.shutdown();
                continue;
            }
            // The graceful stop waits for every worker, and so for any
            // handler still running; whoever sends a second signal does not
            // want to.
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
