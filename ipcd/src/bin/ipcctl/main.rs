//! `ipcctl`: a client of a running ipcd's services about itself
//! (`ipcd.status`, `ipcd.services`, `ipcd.clients`), and a way to call any
//! service from a shell.

#![forbid(unsafe_code)]

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use ipc_client::{Client, ClientOptions, Service, StreamOptions};
use ipcd::introspect::{Page, ServiceList, SessionList, Status};

mod monitor;
mod show;

/// ipcctl: look at a running ipcd, and call its services.
///
/// Connects to the daemon's control socket like any client (the same path
/// rules: --socket, else $IPCD_SOCKET, else $XDG_RUNTIME_DIR/ipcd.sock, else
/// /tmp/ipcd-UID/ipcd.sock). What it is shown depends on who runs it, as
/// the kernel reports it to the daemon: root and the daemon's own user see
/// everything; any other user sees the daemon-wide counts, the daemon's own
/// services, the provided names it may call and its own sessions only.
///
/// --json prints the daemon's answer as JSON, one document: `status` an
/// ipcd::introspect::Status, `services` {"viewer", "services": a list of
/// ipcd::introspect::ServiceInfo}, `clients` {"viewer", "sessions": a list
/// of ipcd::introspect::SessionInfo} (every page joined).
/// Exit status: 0 success, 1 the daemon could not be reached or answered
/// with an error, 2 a usage error.
#[derive(Parser, Debug)]
#[command(version, name = "ipcctl")]
struct Args {
    /// The daemon's control socket [default: $IPCD_SOCKET, else
    /// $XDG_RUNTIME_DIR/ipcd.sock, else /tmp/ipcd-UID/ipcd.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// How long to wait for the daemon's answer to each call (e.g. 5s,
    /// 500ms); for `stream`, how long the whole stream may last.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The daemon: version, uptime, listeners, clients and sessions, the
    /// limits and what is in use of them, handshakes and rejects by reason.
    Status {
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every service name: who serves it (the daemon, the program that
    /// embeds it, a provider), its providers, and its calls and errors.
    Services {
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The sessions: client pid, uid, transport, ring size, age, calls.
    Clients {
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Calls NAME once and writes the reply to stdout. The request is
    /// PAYLOAD, or the contents of --file, or (with neither, or PAYLOAD "-")
    /// stdin when it is not a terminal, else empty.
    Call {
        /// The service's name (the daemon's own, or a provided one).
        name: String,
        /// The request, as given.
        payload: Option<String>,
        /// Read the request from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "payload")]
        file: Option<PathBuf>,
    },
    /// Opens a stream from NAME and writes each item to stdout as it comes,
    /// until the stream ends. The request is taken as `call` takes it;
    /// --timeout is the stream's deadline (the daemon ends it there, and
    /// ipcctl exits 1). Without --json, the items' bytes one after another,
    /// exactly; with --json, one line per item:
    /// {"item": N, "len": BYTES, "hex": "..."} (lowercase hex of the item).
    Stream {
        /// The stream service's name (the daemon's own, or a provided one).
        name: String,
        /// The request, as given.
        payload: Option<String>,
        /// Read the request from this file.
        #[arg(long, value_name = "PATH", conflicts_with = "payload")]
        file: Option<PathBuf>,
        /// Items the daemon may send ahead of those written out.
        #[arg(long, default_value_t = 16, value_name = "ITEMS")]
        window: u32,
        /// One JSON line per item, the bytes in hex.
        #[arg(long)]
        json: bool,
    },
    /// A live view of calls per second per service, errors and sessions,
    /// refreshed every --interval; plain lines when stdout is not a
    /// terminal.
    Monitor {
        /// Time between two samples (e.g. 1s, 250ms).
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Stop after this many samples [default: run until interrupted].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Prints a completion script for SHELL to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Prints the man page (roff) to stdout.
    Man,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = number.parse().map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, ms or m)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} is out of range: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed stdout (`ipcctl ... | head`) is no failure to report.
            if err.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match args.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Args::command(), "ipcctl", &mut out);
            return Ok(());
        }
        Command::Man => {
            clap_mangen::Man::new(Args::command()).render(&mut out)?;
            return Ok(());
        }
        _ => {}
    }
    let mut daemon = Daemon::connect(args.socket, args.timeout)?;
    match args.command {
        Command::Status { json } => {
            let status = daemon.status()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
            } else {
                show::status(&mut out, &status)?;
            }
        }
        Command::Services { json } => {
            let list = daemon.services()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                show::services(&mut out, &list)?;
            }
        }
        Command::Clients { json } => {
            let list = daemon.clients()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                show::clients(&mut out, &list)?;
            }
        }
        Command::Call { name, payload, file } => {
            let request = request(payload, file)?;
            let reply = daemon.call(&name, &request)?;
            out.write_all(&reply)?;
            // A reply of text ends its line on a terminal; piped bytes stay
            // exactly the reply.
            if std::io::stdout().is_terminal() && !reply.ends_with(b"\n") && !reply.is_empty() {
                writeln!(out)?;
            }
        }
        Command::Stream { name, payload, file, window, json } => {
            let request = request(payload, file)?;
            daemon.stream(&name, &request, window, |i, item| {
                if json {
                    writeln!(out, "{}", item_json(i, item))
                } else {
                    // Each item as it comes, not held in the buffer.
                    out.write_all(item).and_then(|()| out.flush())
                }
            })?;
        }
        Command::Monitor { interval, count } => monitor::run(&mut daemon, &mut out, interval, count)?,
        Command::Completions { .. } | Command::Man => unreachable!("answered above"),
    }
    out.flush()?;
    Ok(())
}

/// The request of `ipcctl call`.
fn request(payload: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = file {
        return std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()));
    }
    match payload.as_deref() {
        Some("-") => read_stdin(),
        Some(text) => Ok(text.as_bytes().to_vec()),
        None if std::io::stdin().is_terminal() => Ok(Vec::new()),
        None => read_stdin(),
    }
}

/// The JSON line of stream item `i`.
fn item_json(i: u64, item: &[u8]) -> String {
    let hex: String = item.iter().map(|b| format!("{b:02x}")).collect();
    format!(r#"{{"item":{i},"len":{},"hex":"{hex}"}}"#, item.len())
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut request = Vec::new();
    std::io::stdin().read_to_end(&mut request).context("cannot read the request from stdin")?;
    Ok(request)
}

/// A connection to the daemon, with the services it asks of it.
pub(crate) struct Daemon {
    client: Client,
    timeout: Duration,
    /// The `ipcd.*` services resolved so far.
    resolved: Vec<(&'static str, Service)>,
}

impl Daemon {
    fn connect(socket: Option<PathBuf>, timeout: Duration) -> anyhow::Result<Daemon> {
        let path = socket.unwrap_or_else(ipc_platform::default_socket_path);
        let options = ClientOptions::default().call_timeout(timeout).connect_timeout(timeout);
        let client = Client::connect_with(path.as_path(), options)
            .with_context(|| format!("cannot connect to ipcd at {}", path.display()))?;
        Ok(Daemon { client, timeout, resolved: Vec::new() })
    }

    /// The daemon's service `name`, resolved once.
    fn own(&mut self, name: &'static str) -> anyhow::Result<Service> {
        if let Some((_, service)) = self.resolved.iter().find(|(n, _)| *n == name) {
            return Ok(service.clone());
        }
        let service = self
            .client
            .service(name)
            .with_context(|| format!("the daemon offers no {name:?} (is it older than this ipcctl?)"))?;
        self.resolved.push((name, service.clone()));
        Ok(service)
    }

    /// `ipcd.status`.
    pub(crate) fn status(&mut self) -> anyhow::Result<Status> {
        let service = self.own("ipcd.status")?;
        let reply = self.client.call(&service, b"").context("ipcd.status")?;
        serde_json::from_slice(&reply).context("ipcd.status answered something else than a status")
    }

    /// Every page of the paged service `name`, joined by `join`, which
    /// returns where the next page starts.
    fn pages<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &'static str,
        mut join: impl FnMut(&mut Option<T>, T) -> Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let service = self.own(name)?;
        let mut page = Page { after: None, max_bytes: Some(self.client.max_payload()) };
        let mut joined = None;
        loop {
            let request = serde_json::to_vec(&page)?;
            let reply = self.client.call(&service, &request).context(name)?;
            let part: T = serde_json::from_slice(&reply).with_context(|| format!("{name} answered something else"))?;
            match join(&mut joined, part) {
                Some(after) => page.after = Some(after),
                None => break,
            }
        }
        joined.with_context(|| format!("{name} answered no page"))
    }

    /// `ipcd.services`, every page.
    pub(crate) fn services(&mut self) -> anyhow::Result<ServiceList> {
        self.pages("ipcd.services", |joined: &mut Option<ServiceList>, mut part| {
            let next = part.next.take();
            match joined {
                Some(list) => list.services.append(&mut part.services),
                None => *joined = Some(part),
            }
            next
        })
    }

    /// `ipcd.clients`, every page.
    pub(crate) fn clients(&mut self) -> anyhow::Result<SessionList> {
        self.pages("ipcd.clients", |joined: &mut Option<SessionList>, mut part| {
            let next = part.next.take();
            match joined {
                Some(list) => list.sessions.append(&mut part.sessions),
                None => *joined = Some(part),
            }
            next
        })
    }

    /// Opens a stream from `name` with `request`, at most `window` items
    /// ahead, and its deadline the timeout; hands each item to `each`
    /// with its index, until the stream's end.
    fn stream(
        &mut self,
        name: &str,
        request: &[u8],
        window: u32,
        mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        let service = self.client.service(name).with_context(|| format!("cannot resolve {name:?}"))?;
        let options = StreamOptions::default().window(window).deadline(self.timeout);
        let mut stream =
            self.client.stream_with(&service, request, options).with_context(|| format!("cannot open {name}"))?;
        let mut item = Vec::new();
        let mut i = 0;
        while stream.next_into(&mut self.client, &mut item).with_context(|| format!("{name} failed after {i} items"))? {
            if let Err(e) = each(i, &item) {
                // Whatever ends here (a closed stdout), the daemon is told.
                stream.cancel(&mut self.client);
                return Err(e.into());
            }
            i += 1;
        }
        Ok(())
    }

    /// Calls `name` (resolving a provided name through the broker).
    fn call(&mut self, name: &str, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let service = self.client.service(name).with_context(|| format!("cannot resolve {name:?}"))?;
        self.client.call_timeout(&service, request, self.timeout).with_context(|| format!("{name} failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn a_stream_item_is_one_json_line_with_its_bytes_in_hex() {
        assert_eq!(item_json(3, &[0, 0xab, 7]), r#"{"item":3,"len":3,"hex":"00ab07"}"#);
        assert_eq!(item_json(0, b""), r#"{"item":0,"len":0,"hex":""}"#);
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
    }
}
