//! The daemon's configuration file (`ipcd --config PATH`, TOML): every
//! flag, under the flag's name without its dashes in front, and the access
//! rules for provided names. A flag given on the command line overrides the
//! file's value. `ipcd/dist/ipcd.toml` is a documented example.
//!
//! ```toml
//! max-clients = 512
//! stall-timeout = "5s"
//! max-shm = "1G"
//! max-message = "256M"
//! allow-gid = [100]
//!
//! [[access]]
//! pattern = "search.*"          # a name, `prefix.*`, or `*`
//! provide = { uids = [1000] }   # who may register the names it matches
//! call = { gids = [100] }       # who may resolve them
//! ```
//!
//! Rules are checked in order and the first whose pattern matches a name
//! decides; a list a rule leaves out keeps the default (only the daemon's
//! own uid and root provide; anyone who can open the socket calls). Unknown
//! keys are errors, so that a misspelt rule never silently admits more.
//!
//! What a reload (`SIGHUP`) changes is [`ipcd::Settings`]: the allow lists,
//! the access rules and the limits. The rest (sockets, workers, logging,
//! metrics) is read at the start only; a reload that finds it changed says
//! so and leaves it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ipcd::{AccessRule, Allowed, Settings};
use serde::Deserialize;

use crate::{parse_bytes, parse_duration, parse_log_level, parse_mode, Args, LogFormat};

/// The file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    socket: Option<PathBuf>,
    socket_mode: Option<IntOrText>,
    workers: Option<usize>,
    segment_pool: Option<usize>,
    max_clients: Option<usize>,
    handshake_timeout: Option<String>,
    max_pending_handshakes: Option<usize>,
    stall_timeout: Option<String>,
    max_ring_size: Option<u32>,
    max_shm: Option<IntOrText>,
    max_sessions_per_uid: Option<usize>,
    max_message: Option<IntOrText>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    debug_services: Option<bool>,
    uds: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    allow_uid: Option<Vec<u32>>,
    allow_gid: Option<Vec<u32>>,
    spin_us: Option<u64>,
    metrics: Option<SocketAddr>,
    metrics_allow_remote: Option<bool>,
    #[serde(default)]
    access: Vec<Access>,
}

/// A number written as a TOML integer (`0o660`, `1073741824`) or as text
/// the flag takes (`"660"`, `"1G"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntOrText {
    Int(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Access {
    pattern: String,
    provide: Option<Who>,
    call: Option<Who>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Who {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
}

impl From<Who> for Allowed {
    fn from(who: Who) -> Allowed {
        Allowed { uids: who.uids, gids: who.gids }
    }
}

/// Everything the daemon runs with: the command line over the file over
/// the defaults, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub socket_mode: u32,
    pub workers: Option<usize>,
    pub segment_pool: Option<usize>,
    pub log_level: String,
    pub log_format: LogFormat,
    pub debug_services: bool,
    pub uds: Option<PathBuf>,
    pub tcp: Option<SocketAddr>,
    pub spin: Option<Duration>,
    pub metrics: Option<SocketAddr>,
    pub metrics_allow_remote: bool,
    /// The largest message (fixed for the daemon's life).
    pub max_message: u64,
    /// What a reload may change.
    pub settings: Settings,
}

/// Reads and parses the file at `path`.
pub fn read(path: &Path) -> anyhow::Result<File> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<File> {
    Ok(toml::from_str(text)?)
}

/// `value` from the command line, else from the file (parsed by `parse`,
/// the error naming `key`), else `None`.
fn pick<T, F>(
    flag: Option<T>,
    file: Option<F>,
    key: &str,
    parse: impl FnOnce(F) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    match (flag, file) {
        (Some(v), _) => Ok(Some(v)),
        (None, Some(v)) => parse(v).map(Some).map_err(|e| anyhow::anyhow!("{key}: {e}")),
        (None, None) => Ok(None),
    }
}

fn same<T>(v: T) -> Result<T, String> {
    Ok(v)
}

impl Config {
    /// The command line `args` over `file` (none: an empty one) over the
    /// defaults, every value checked as the flags are, and the settings as
    /// [`Settings::check`] does.
    pub fn resolve(args: &Args, file: Option<File>) -> anyhow::Result<Config> {
        let file = file.unwrap_or_default();
        let defaults = Settings::default();
        let mode = |v: IntOrText| match v {
            IntOrText::Int(n) => {
                u32::try_from(n).map_err(|e| e.to_string()).and_then(|n| parse_mode(&format!("{n:o}")))
            }
            IntOrText::Text(s) => parse_mode(&s),
        };
        let bytes = |v: IntOrText| match v {
            IntOrText::Int(n) => Ok(n),
            IntOrText::Text(s) => parse_bytes(&s),
        };
        let positive = |n: usize| if n == 0 { Err("must be at least 1".to_string()) } else { Ok(n) };
        let duration = |s: String| parse_duration(&s);
        let mut settings = Settings::default();
        settings.max_clients =
            pick(args.max_clients, file.max_clients, "max-clients", positive)?.unwrap_or(defaults.max_clients);
        settings.handshake_timeout =
            pick(args.handshake_timeout, file.handshake_timeout, "handshake-timeout", duration)?
                .unwrap_or(defaults.handshake_timeout);
        settings.max_pending_handshakes =
            pick(args.max_pending_handshakes, file.max_pending_handshakes, "max-pending-handshakes", positive)?
                .unwrap_or(defaults.max_pending_handshakes);
        settings.stall_timeout =
            pick(args.stall_timeout, file.stall_timeout, "stall-timeout", duration)?.unwrap_or(defaults.stall_timeout);
        settings.max_ring_capacity =
            pick(args.max_ring_size, file.max_ring_size, "max-ring-size", same)?.unwrap_or(defaults.max_ring_capacity);
        settings.max_shm = pick(args.max_shm, file.max_shm, "max-shm", bytes)?;
        settings.max_sessions_per_uid =
            pick(args.max_sessions_per_uid, file.max_sessions_per_uid, "max-sessions-per-uid", positive)?
                .unwrap_or(defaults.max_sessions_per_uid);
        let list = |flag: &Vec<u32>| (!flag.is_empty()).then(|| flag.clone());
        settings.allow_uids = pick(list(&args.allow_uid), file.allow_uid, "allow-uid", same)?.unwrap_or_default();
        settings.allow_gids = pick(list(&args.allow_gid), file.allow_gid, "allow-gid", same)?.unwrap_or_default();
        settings.access_rules = file
            .access
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                AccessRule::check_pattern(&a.pattern).map_err(|e| anyhow::anyhow!("access rule {}: {e}", i + 1))?;
                Ok(AccessRule { pattern: a.pattern, provide: a.provide.map(Into::into), call: a.call.map(Into::into) })
            })
            .collect::<anyhow::Result<_>>()?;
        settings.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        let config = Config {
            socket: pick(args.socket.clone(), file.socket, "socket", same)?,
            socket_mode: pick(args.socket_mode, file.socket_mode, "socket-mode", mode)?.unwrap_or(0o600),
            workers: pick(args.workers, file.workers, "workers", positive)?,
            segment_pool: pick(args.segment_pool, file.segment_pool, "segment-pool", same)?,
            log_level: pick(args.log_level.clone(), file.log_level, "log-level", |s| parse_log_level(&s))?
                .unwrap_or_else(|| "info".into()),
            log_format: pick(args.log_format, file.log_format, "log-format", same)?.unwrap_or(LogFormat::Text),
            debug_services: args.debug_services || file.debug_services.unwrap_or(false),
            uds: pick(args.uds.clone(), file.uds, "uds", same)?,
            tcp: pick(args.tcp, file.tcp, "tcp", same)?,
            spin: pick(args.spin_us, file.spin_us, "spin-us", same)?.map(Duration::from_micros),
            metrics: pick(args.metrics, file.metrics, "metrics", same)?,
            metrics_allow_remote: args.metrics_allow_remote || file.metrics_allow_remote.unwrap_or(false),
            max_message: pick(args.max_message, file.max_message, "max-message", |v| match v {
                IntOrText::Int(0) => Err("must be at least 1 byte".to_string()),
                IntOrText::Int(n) => Ok(n),
                IntOrText::Text(s) => super::parse_positive_bytes(&s),
            })?
            .unwrap_or(ipcd::DEFAULT_MAX_MESSAGE),
            settings,
        };
        config.check()?;
        Ok(config)
    }

    /// What the parts cannot check alone.
    fn check(&self) -> anyhow::Result<()> {
        let allow_list = !(self.settings.allow_uids.is_empty() && self.settings.allow_gids.is_empty());
        if self.tcp.is_some() && allow_list {
            bail!(
                "--tcp cannot be combined with --allow-uid or --allow-gid (in the file: tcp, allow-uid, allow-gid): \
                 TCP carries no peer credentials to check, so it would admit anyone"
            );
        }
        if let Some(addr) = self.metrics {
            if !addr.ip().is_loopback() && !self.metrics_allow_remote {
                bail!(
                    "--metrics {addr} is not a loopback address: anyone who can reach it would read who uses \
                     the daemon; add --metrics-allow-remote (metrics-allow-remote = true) to mean it"
                );
            }
        }
        Ok(())
    }

    /// What differs between `self` and `new` beyond the settings, which a
    /// reload does not change: the keys, for the log.
    pub fn fixed_changes(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut note = |key, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        note("socket", self.socket != new.socket);
        note("socket-mode", self.socket_mode != new.socket_mode);
        note("workers", self.workers != new.workers);
        note("segment-pool", self.segment_pool != new.segment_pool);
        note("log-level", self.log_level != new.log_level);
        note("log-format", self.log_format != new.log_format);
        note("debug-services", self.debug_services != new.debug_services);
        note("uds", self.uds != new.uds);
        note("tcp", self.tcp != new.tcp);
        note("spin-us", self.spin != new.spin);
        note("max-message", self.max_message != new.max_message);
        note("metrics", self.metrics != new.metrics || self.metrics_allow_remote != new.metrics_allow_remote);
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("ipcd").chain(flags.iter().copied())).unwrap()
    }

    fn resolve(flags: &[&str], text: &str) -> anyhow::Result<Config> {
        Config::resolve(&args(flags), Some(parse(text)?))
    }

    #[test]
    fn rules_parse_in_order_with_left_out_lists_left_to_the_default() {
        let rules = resolve(
            &[],
            r#"
            [[access]]
            pattern = "search.*"
            provide = { uids = [1000] }
            call = { gids = [100, 101] }

            [[access]]
            pattern = "*"
            call = {}
            "#,
        )
        .unwrap()
        .settings
        .access_rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].pattern, "search.*");
        assert_eq!(rules[0].provide, Some(Allowed { uids: vec![1000], gids: vec![] }));
        assert_eq!(rules[0].call, Some(Allowed { uids: vec![], gids: vec![100, 101] }));
        assert_eq!(rules[1].provide, None, "left out: the default");
        assert_eq!(rules[1].call, Some(Allowed::default()), "given empty: nobody");
        assert!(resolve(&[], "").unwrap().settings.access_rules.is_empty());
    }

    #[test]
    fn every_flag_has_a_key_and_flags_override_the_file() {
        let file = r#"
            socket = "/run/x.sock"
            socket-mode = 0o660
            workers = 3
            max-clients = 10
            handshake-timeout = "3s"
            max-pending-handshakes = 7
            stall-timeout = "250ms"
            max-ring-size = 65536
            max-shm = "1G"
            max-sessions-per-uid = 5
            log-level = "debug"
            log-format = "json"
            debug-services = true
            uds = "/run/x-stream.sock"
            allow-uid = [0, 1000]
            allow-gid = [100]
            spin-us = 0
            metrics = "127.0.0.1:9464"
        "#;
        let c = resolve(&[], file).unwrap();
        assert_eq!(c.socket.as_deref(), Some(Path::new("/run/x.sock")));
        assert_eq!((c.socket_mode, c.workers, c.spin), (0o660, Some(3), Some(Duration::ZERO)));
        assert_eq!((c.log_level.as_str(), c.log_format, c.debug_services), ("debug", LogFormat::Json, true));
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        let s = &c.settings;
        assert_eq!((s.max_clients, s.max_pending_handshakes, s.max_sessions_per_uid), (10, 7, 5));
        assert_eq!((s.handshake_timeout, s.stall_timeout), (Duration::from_secs(3), Duration::from_millis(250)));
        assert_eq!((s.max_ring_capacity, s.max_shm), (65536, Some(1 << 30)));
        assert_eq!((s.allow_uids.as_slice(), s.allow_gids.as_slice()), (&[0, 1000][..], &[100][..]));

        let c =
            resolve(&["--max-clients", "20", "--allow-uid", "5", "--socket-mode", "600", "--log-level", "warn"], file)
                .unwrap();
        assert_eq!((c.settings.max_clients, c.socket_mode, c.log_level.as_str()), (20, 0o600, "warn"));
        assert_eq!(c.settings.allow_uids, [5], "a flag's list replaces the file's");
        assert_eq!(c.settings.allow_gids, [100], "and leaves the other list alone");

        let c = resolve(&[], "").unwrap();
        assert_eq!(c.settings, Settings::default(), "no file, no flags: the defaults");
        assert_eq!((c.socket_mode, c.log_level.as_str()), (0o600, "info"));
    }

    #[test]
    fn mistakes_are_errors_naming_them() {
        let error = |flags: &[&str], text: &str| format!("{:#}", resolve(flags, text).unwrap_err());
        assert!(error(&[], "[[access]]\npattern = \"a\"\ncall = { uid = [1] }\n").contains("uid"));
        assert!(error(&[], "[[access]]\npattern = \"a..b\"\n").contains("access rule 1"));
        assert!(resolve(&[], "[[access]]\n").is_err(), "a rule names its pattern");
        assert!(resolve(&[], "access = 3").is_err());
        assert!(error(&[], "max-client = 3").contains("max-client"), "a misspelt key");
        assert!(error(&[], "stall-timeout = \"soon\"").contains("stall-timeout"));
        assert!(error(&[], "max-clients = 0").contains("max-clients"));
        assert!(error(&[], "max-shm = \"lots\"").contains("max-shm"));
        assert!(error(&[], "log-level = \"loud\"").contains("log-level"));
        assert!(error(&[], "socket-mode = \"999\"").contains("socket-mode"));
        assert!(error(&[], "tcp = \"127.0.0.1:1\"\nallow-uid = [0]").contains("TCP"));
        assert!(error(&[], "max-shm = 4096").contains("smallest session"));
        assert!(error(&[], "metrics = \"0.0.0.0:9464\"").contains("loopback"));
        assert!(error(&["--metrics", "[::]:9464"], "").contains("loopback"));
        assert!(resolve(&[], "metrics = \"0.0.0.0:9464\"\nmetrics-allow-remote = true").is_ok());
        assert!(resolve(&["--metrics", "[::1]:9464"], "").is_ok());
        assert!(error(&[], "max-message = 0").contains("at least 1 byte"));
        assert!(error(&[], "max-message = \"lots\"").contains("max-message"));
    }

    #[test]
    fn the_largest_message_is_a_number_or_a_size_with_a_suffix() {
        assert_eq!(resolve(&[], "").unwrap().max_message, ipcd::DEFAULT_MAX_MESSAGE);
        assert_eq!(resolve(&[], "max-message = 4096").unwrap().max_message, 4096);
        assert_eq!(resolve(&[], "max-message = \"256M\"").unwrap().max_message, 256 << 20);
        assert_eq!(resolve(&["--max-message", "1M"], "max-message = 4096").unwrap().max_message, 1 << 20);
        let example = resolve(&[], include_str!("../../../dist/ipcd.toml")).expect("the shipped example parses");
        assert_eq!(example.max_message, 1 << 30);
    }

    #[test]
    fn a_reload_names_what_it_cannot_change() {
        let old = resolve(&[], "workers = 2").unwrap();
        let new = resolve(&[], "workers = 3\nmax-clients = 9\nuds = \"/x\"").unwrap();
        assert_eq!(old.fixed_changes(&new), ["workers", "uds"]);
        assert!(old.fixed_changes(&old).is_empty());
    }
}
