//! The figures of a run, as JSON and as a human summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::daemon::ProcessUsage;
use crate::workload::{new_histogram, ClientOutcome};

/// Latency percentiles in microseconds.
#[derive(Serialize, Debug, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// Connect-time figures in microseconds.
#[derive(Serialize, Debug, Default)]
pub struct Connect {
    pub p50: f64,
    pub max: f64,
}

/// One run, with the keys documented in the README.
#[derive(Serialize, Debug)]
pub struct Run {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub clients: usize,
    pub messages_per_client: u64,
    pub payload_bytes: usize,
    pub window: u32,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub mismatched: u64,
    pub duration_s: f64,
    pub throughput_msgs_per_s: f64,
    pub latency_us: Latency,
    pub connect_us: Connect,
    pub daemon: ProcessUsage,
    pub peak_rss_anon_kb: u64,
    #[serde(skip)]
    pub first_error: Option<String>,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Run {
    /// Gathers the outcomes of every client into one run.
    pub fn from_outcomes(
        outcomes: &[ClientOutcome],
        messages: u64,
        payload: usize,
        duration: Duration,
        daemon: ProcessUsage,
        peak_rss_anon_kb: u64,
    ) -> Run {
        let mut latency: Histogram<u64> = new_histogram();
        let mut connect: Histogram<u64> = new_histogram();
        let (mut succeeded, mut failed, mut mismatched) = (0, 0, 0);
        let mut first_error = None;
        for o in outcomes {
            latency.add(&o.latency_ns).expect("histograms share bounds");
            connect.saturating_record(o.connect_ns.max(1));
            succeeded += o.succeeded;
            failed += o.failed;
            mismatched += o.mismatched;
            if first_error.is_none() {
                first_error.clone_from(&o.first_error);
            }
        }
        let secs = duration.as_secs_f64();
        let q = |h: &Histogram<u64>, q: f64| us(h.value_at_quantile(q));
        Run {
            scenario: "throughput",
            transport: "shm",
            clients: outcomes.len(),
            messages_per_client: messages,
            payload_bytes: payload,
            window: 1,
            sent: succeeded + failed + mismatched,
            succeeded,
            failed,
            mismatched,
            duration_s: secs,
            throughput_msgs_per_s: if secs > 0.0 { succeeded as f64 / secs } else { 0.0 },
            latency_us: Latency {
                p50: q(&latency, 0.50),
                p90: q(&latency, 0.90),
                p99: q(&latency, 0.99),
                p999: q(&latency, 0.999),
                max: us(latency.max()),
                mean: latency.mean() / 1000.0,
            },
            connect_us: Connect { p50: q(&connect, 0.50), max: us(connect.max()) },
            daemon,
            peak_rss_anon_kb,
            first_error,
        }
    }

    /// Whether every call succeeded with the right reply.
    pub fn passed(&self) -> bool {
        self.failed == 0 && self.mismatched == 0 && self.succeeded > 0
    }

    /// The human summary.
    pub fn summary(&self, mode: &str) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "ipcd stress: {} clients x {} calls, {}-byte payloads, {} transport, clients as {mode}\n",
            self.clients, self.messages_per_client, self.payload_bytes, self.transport
        );
        s += &format!(
            "  calls       sent {}  succeeded {}  failed {}  mismatched {}\n",
            self.sent, self.succeeded, self.failed, self.mismatched
        );
        s += &format!("  throughput  {:.0} msg/s over {:.3} s\n", self.throughput_msgs_per_s, self.duration_s);
        s += &format!(
            "  latency us  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}  (round trip, every call)\n",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        s += &format!("  connect us  p50 {:.1}  max {:.1}\n", self.connect_us.p50, self.connect_us.max);
        s += &format!(
            "  daemon      rss_anon {} kB (peak during run {} kB)  rss_shmem {} kB  fds {}\n",
            self.daemon.rss_anon_kb, self.peak_rss_anon_kb, self.daemon.rss_shmem_kb, self.daemon.fds
        );
        if let Some(e) = &self.first_error {
            s += &format!("  first error {e}\n");
        }
        s += if self.passed() { "  result      PASS\n" } else { "  result      FAIL\n" };
        s
    }
}

/// The JSON document: `{"runs": [RUN, ...]}`.
#[derive(Serialize)]
pub struct Report<'a> {
    pub runs: &'a [Run],
}
