//! Prometheus metrics over HTTP (`ipcd --metrics ADDR`,
//! [`Server::serve_metrics`](crate::Server::serve_metrics),
//! [`ProviderBuilder::metrics`](crate::ProviderBuilder::metrics)).
//!
//! A scrape reads the counters the workers keep (plain atomics each worker
//! owns, `Relaxed`, see [`crate::stats`] and [`crate::durations`]) and sums
//! them, so the hot path pays no lock, no allocation and no system call for
//! them: a call costs a few stores to its worker's lines and, for its
//! duration, two vDSO clock reads. The encoding is
//! prometheus-client's (OpenMetrics text), the HTTP server tiny_http's, on
//! a thread of its own that answers `GET /metrics` and nothing else.
//!
//! The address must be a loopback one unless remote scrapes are asked for
//! explicitly: the metrics name services and count users' sessions.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::durations::{Snapshot, BOUNDS_NS};
use crate::introspect::Transport;
use crate::stats::{Stats, TRANSPORTS};
use crate::views::Introspection;

/// Why metrics cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The address is not a loopback one, and remote scrapes were not
    /// allowed.
    #[error("metrics address {addr} is not a loopback address (anyone who can reach it reads who uses the daemon); allow remote scrapes to mean it")]
    NotLoopback {
        /// The address refused.
        addr: SocketAddr,
    },
    /// The listener could not be bound.
    #[error("cannot serve metrics at {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
}

/// The HTTP server of the metrics; dropping it stops it.
pub struct MetricsServer {
    http: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// The address it listens on (with the port the system chose for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `collector`'s metrics at `addr` until the returned server drops.
pub(crate) fn serve(
    addr: SocketAddr,
    allow_remote: bool,
    collector: impl Collector,
) -> Result<MetricsServer, MetricsError> {
    if !addr.ip().is_loopback() && !allow_remote {
        return Err(MetricsError::NotLoopback { addr });
    }
    let http = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind { addr, reason: e.to_string() })?;
    let local = http.server_addr().to_ip().unwrap_or(addr);
    let http = Arc::new(http);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let serving = Arc::clone(&http);
    let thread = std::thread::Builder::new()
        .name("ipcd-metrics".into())
        .spawn(move || answer_scrapes(&serving, &registry))
        .map_err(|e| MetricsError::Bind { addr, reason: e.to_string() })?;
    tracing::info!(addr = %local, "serving metrics at http://{local}/metrics");
    Ok(MetricsServer { http, addr: local, thread: Some(thread) })
}

/// The server's loop: every `GET /metrics` gets the metrics of the moment,
/// anything else a 404 or 405.
fn answer_scrapes(http: &tiny_http::Server, registry: &Registry) {
    for request in http.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or_default();
        let response = if path != "/metrics" {
            tiny_http::Response::from_string("not found: the metrics are at /metrics\n").with_status_code(404)
        } else if *request.method() != tiny_http::Method::Get {
            tiny_http::Response::from_string("only GET\n").with_status_code(405)
        } else {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => {
                    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                    let header = tiny_http::Header::from_bytes("Content-Type", kind).expect("a valid header");
                    tiny_http::Response::from_string(text).with_header(header)
                }
                Err(_) => tiny_http::Response::from_string("cannot encode the metrics\n").with_status_code(500),
            }
        };
        // A scraper that went away is no concern of the daemon's.
        let _ = request.respond(response);
    }
}

/// Writes one metric without labels.
fn one(encoder: &mut DescriptorEncoder, name: &str, help: &str, metric: impl EncodeMetric) -> fmt::Result {
    let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(e)
}

/// Writes a family with one label, `values` giving each label value's
/// metric.
fn family<M: EncodeMetric, V: AsRef<str>>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (V, M)>,
) -> fmt::Result {
    let mut values = values.into_iter().peekable();
    let Some((_, first)) = values.peek() else { return Ok(()) };
    let mut e = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    for (value, metric) in values {
        let labels = [(label, value.as_ref())];
        metric.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The calls per service and outcome, from the workers' counters.
fn calls(encoder: &mut DescriptorEncoder, stats: &Stats, names: &[&str]) -> fmt::Result {
    let mut e = encoder.encode_descriptor(
        "ipcd_calls",
        "Calls taken by a worker, by service and outcome (error: answered with an error, at once or by a handed-off handler)",
        None,
        ConstCounter::new(0u64).metric_type(),
    )?;
    for (id, name) in names.iter().enumerate() {
        let (calls, errors) = stats.service_counts(id);
        for (outcome, n) in [("ok", calls.saturating_sub(errors)), ("error", errors)] {
            let labels = [("service", *name), ("outcome", outcome)];
            ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A histogram as the workers' buckets sum to at a scrape.
struct ConstHistogram(Snapshot);

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        let Snapshot { buckets, sum_ns } = self.0;
        let bounds = BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(buckets).collect();
        encoder.encode_histogram::<NoLabelSet>(sum_ns as f64 / 1e9, self.0.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The call durations per service, from the workers' histograms.
fn durations(encoder: &mut DescriptorEncoder, stats: &Stats, names: &[&str]) -> fmt::Result {
    family(
        encoder,
        "ipcd_call_duration_seconds",
        "How long calls took, from the dispatch of the whole request to its answer being ready, by service",
        "service",
        names.iter().enumerate().map(|(id, name)| (*name, ConstHistogram(stats.durations(id)))),
    )
}

/// The bytes of frames received and sent, by transport (`shm` named
/// `shm_name`: a provider's are brokered).
fn bytes(encoder: &mut DescriptorEncoder, stats: &Stats, shm_name: &str) -> fmt::Result {
    let by_transport = stats.bytes();
    let name = |t: usize| if t == 0 { shm_name } else { TRANSPORTS[t] };
    family(
        encoder,
        "ipcd_received_bytes",
        "Bytes of the frames taken from clients (headers and payloads), by transport",
        "transport",
        by_transport.iter().enumerate().map(|(t, (received, _))| (name(t), ConstCounter::new(*received))),
    )?;
    family(
        encoder,
        "ipcd_sent_bytes",
        "Bytes of the frames written to clients (headers and payloads), by transport",
        "transport",
        by_transport.iter().enumerate().map(|(t, (_, sent))| (name(t), ConstCounter::new(*sent))),
    )
}

/// The daemon's metrics, read from what its services about itself read.
pub(crate) struct DaemonMetrics(pub(crate) Arc<Introspection>);

impl fmt::Debug for DaemonMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonMetrics").finish_non_exhaustive()
    }
}

impl Collector for DaemonMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = &self.0;
        let stats = &view.stats;
        let e = &mut encoder;
        family(
            e,
            "ipcd_build_info",
            "The daemon's version",
            "version",
            [(env!("CARGO_PKG_VERSION"), ConstGauge::new(1i64))],
        )?;
        one(
            e,
            "ipcd_uptime_seconds",
            "Seconds since the daemon started",
            ConstGauge::new(stats.uptime().as_secs_f64()),
        )?;
        let counts = view.roster.counts();
        let transports = [Transport::Shm, Transport::Uds, Transport::Tcp, Transport::Brokered];
        family(
            e,
            "ipcd_sessions",
            "Live sessions by transport (brokered: handed to a provider, until it reports them closed)",
            "transport",
            transports.iter().map(|t| (t.name(), ConstGauge::new(counts[*t as usize] as i64))),
        )?;
        let (accepted, held, strikes) = stats.handshakes();
        family(
            e,
            "ipcd_handshakes",
            "Handshakes by outcome (rejected ones are in ipcd_rejects_total)",
            "outcome",
            [("accepted", ConstCounter::new(accepted)), ("held", ConstCounter::new(held))],
        )?;
        family(
            e,
            "ipcd_rejects",
            "Handshakes refused, by reason",
            "reason",
            stats.rejects().map(|(r, n)| (r, ConstCounter::new(n))),
        )?;
        one(e, "ipcd_strikes", "Strikes against peers that broke the protocol or stalled", ConstCounter::new(strikes))?;
        let disconnects: Vec<(&str, u64)> = stats.disconnects().collect();
        let stalls = disconnects.iter().find(|(r, _)| *r == "stalled").map_or(0, |d| d.1);
        one(
            e,
            "ipcd_stalls",
            "Sessions closed for leaving their replies unread past the stall timeout",
            ConstCounter::new(stalls),
        )?;
        family(
            e,
            "ipcd_disconnects",
            "Sessions ended, by reason",
            "reason",
            disconnects.into_iter().map(|(r, n)| (r, ConstCounter::new(n))),
        )?;
        let names: Vec<&str> = view.services.iter().map(|(n, _)| n.as_str()).collect();
        calls(e, stats, &names)?;
        durations(e, stats, &names)?;
        bytes(e, stats, "shm")?;
        let (requests, replies, errors) = stats.calls();
        one(e, "ipcd_requests", "Requests the workers took, every service", ConstCounter::new(requests))?;
        one(e, "ipcd_replies", "Replies the workers sent, every service", ConstCounter::new(replies))?;
        one(e, "ipcd_replies_error", "Of the replies, errors", ConstCounter::new(errors))?;
        one(
            e,
            "ipcd_shm_in_use_bytes",
            "Memory the live sessions are charged",
            ConstGauge::new(view.limits.in_use() as i64),
        )?;
        one(
            e,
            "ipcd_shm_budget_bytes",
            "Memory all sessions may be charged (--max-shm)",
            ConstGauge::new(view.limits.budget() as i64),
        )?;
        let (pending, max_pending) = stats.pending();
        one(e, "ipcd_pending_handshakes", "Handshakes unfinished now", ConstGauge::new(pending as i64))?;
        one(
            e,
            "ipcd_pending_handshakes_max",
            "The most handshakes that may be unfinished",
            ConstGauge::new(max_pending as i64),
        )?;
        let broker = stats.broker();
        family(
            e,
            "ipcd_providers",
            "Providers holding each provided name",
            "name",
            broker.names.iter().map(|n| (n.name.as_str(), ConstGauge::new(n.providers.len() as i64))),
        )?;
        one(e, "ipcd_reloads", "Configurations applied since the start", ConstCounter::new(view.settings.reloads()))?;
        Ok(())
    }
}

/// A provider's metrics: the calls it served, by service.
pub(crate) struct ProviderMetrics {
    pub(crate) stats: Arc<Stats>,
    pub(crate) names: Vec<String>,
}

impl fmt::Debug for ProviderMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderMetrics").field("names", &self.names).finish_non_exhaustive()
    }
}

impl Collector for ProviderMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        family(
            e,
            "ipcd_build_info",
            "The library's version",
            "version",
            [(env!("CARGO_PKG_VERSION"), ConstGauge::new(1i64))],
        )?;
        one(
            e,
            "ipcd_uptime_seconds",
            "Seconds since the provider started",
            ConstGauge::new(self.stats.uptime().as_secs_f64()),
        )?;
        let sessions: usize =
            self.stats.workers.iter().map(|w| w.sessions.load(std::sync::atomic::Ordering::Relaxed)).sum();
        family(
            e,
            "ipcd_sessions",
            "Live sessions by transport",
            "transport",
            [("brokered", ConstGauge::new(sessions as i64))],
        )?;
        let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        calls(e, &self.stats, &names)?;
        durations(e, &self.stats, &names)?;
        bytes(e, &self.stats, "brokered")?;
        let (requests, replies, errors) = self.stats.calls();
        one(e, "ipcd_requests", "Requests the workers took, every service", ConstCounter::new(requests))?;
        one(e, "ipcd_replies", "Replies the workers sent, every service", ConstCounter::new(replies))?;
        one(e, "ipcd_replies_error", "Of the replies, errors", ConstCounter::new(errors))?;
        Ok(())
    }
}
