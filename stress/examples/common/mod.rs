//! What the baseline examples share: their command line, the payload each
//! call carries and its check, round-trip percentiles, and the one line of
//! figures each prints. Nothing here runs between a call's start and its
//! end except [`Rtts::record`] (one clock reading per call, as stress takes).
//!
//! Every example compiles its own copy of this module and uses only part of
//! it, hence the `dead_code` allowance.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// The options every baseline takes, so stress can run it with a
/// scenario's values.
#[derive(clap::Args, Debug)]
pub struct Common {
    /// Clients, each a thread making synchronous calls
    #[arg(long, default_value_t = 1)]
    pub clients: usize,

    /// Calls (round trips) per client
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,

    /// Print one JSON line of figures instead of a human one
    #[arg(long)]
    pub json: bool,
}

impl Common {
    /// Exits 2 (a usage error, as clap's own) unless clients and messages
    /// are at least 1.
    pub fn check(&self) {
        if self.clients == 0 || self.messages == 0 {
            usage_error("--clients and --messages must be at least 1");
        }
    }

    /// Exits 2 unless there is exactly one client: for the floors, which are
    /// one pair of threads.
    pub fn check_one_client(&self) {
        self.check();
        if self.clients != 1 {
            usage_error("this floor is one pair of threads: --clients must be 1");
        }
    }
}

/// Prints `message` as a usage error and exits 2.
pub fn usage_error(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

/// Prints `message` as a runtime failure (a reply that did not match, a
/// lost wake-up) and exits 1.
pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// Round-trip times, in the same histogram stress uses (1 ns to 100 s, 3
/// significant digits), so percentiles are read the same way.
pub struct Rtts(Histogram<u64>);

impl Rtts {
    pub fn new() -> Rtts {
        Rtts(Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records the round trip that started at `start`.
    pub fn record(&mut self, start: Instant) {
        self.0.saturating_record((start.elapsed().as_nanos() as u64).max(1));
    }

    /// Adds another client's round trips.
    pub fn add(&mut self, other: &Rtts) {
        self.0.add(&other.0).expect("histograms share bounds");
    }

    fn us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }
}

/// The figures of one baseline run: what stress reads (one JSON line) and
/// what a person reads.
#[derive(Serialize, Debug)]
pub struct Figures {
    pub name: &'static str,
    pub clients: usize,
    pub messages_per_client: u64,
    /// Payload bytes each way per call (0: the floors carry none).
    pub payload_bytes: usize,
    /// Round trips made, each checked.
    pub calls: u64,
    /// From the moment every client is ready until the last call returns.
    pub duration_s: f64,
    pub msgs_per_s: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Figures of this baseline alone (how often each side slept, what it
    /// spun), by name.
    #[serde(flatten)]
    pub notes: BTreeMap<&'static str, serde_json::Value>,
}

impl Figures {
    pub fn new(name: &'static str, common: &Common, payload_bytes: usize, elapsed: Duration, rtts: &Rtts) -> Figures {
        let calls = rtts.0.len();
        let secs = elapsed.as_secs_f64();
        Figures {
            name,
            clients: common.clients,
            messages_per_client: common.messages,
            payload_bytes,
            calls,
            duration_s: secs,
            msgs_per_s: if secs > 0.0 { calls as f64 / secs } else { 0.0 },
            p50_us: rtts.us(0.50),
            p90_us: rtts.us(0.90),
            p99_us: rtts.us(0.99),
            max_us: rtts.0.max() as f64 / 1000.0,
            notes: BTreeMap::new(),
        }
    }

    /// Adds a figure of this baseline alone.
    pub fn note(mut self, key: &'static str, value: impl Into<serde_json::Value>) -> Figures {
        self.notes.insert(key, value.into());
        self
    }

    /// Prints the figures: one JSON line with `--json`, else one line for a
    /// person.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("figures serialize"));
            return;
        }
        let mut line = format!(
            "{}: {} clients x {} round trips, {} B: {:.0} msg/s over {:.3} s; p50 {:.2} us  p90 {:.2} us  p99 {:.2} us  max {:.1} us",
            self.name,
            self.clients,
            self.messages_per_client,
            self.payload_bytes,
            self.msgs_per_s,
            self.duration_s,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.max_us
        );
        for (k, v) in &self.notes {
            line += &format!("  {k} {v}");
        }
        println!("{line}");
    }
}

/// The payload of call `seq` of client `client`, as 64-bit words: they
/// depend on both, so a reply meant for another call or another client
/// cannot pass the check.
pub fn payload_word(client: u32, seq: u64, i: usize) -> u64 {
    let mix = u64::from(client).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03);
    mix ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Fills `buf` with the payload of call `seq` of client `client`, as bytes.
pub fn fill_bytes(client: u32, seq: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = payload_word(client, seq, i).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}
