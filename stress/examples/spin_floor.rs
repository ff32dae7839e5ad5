//! The floor of any round trip between two threads here: each busy-polls
//! one shared word for the other's write, nothing else. One round trip is
//! a ping (this thread writes the next number into its word) and a pong
//! (the peer, polling that word, writes the same number into its own);
//! the round trip ends when this thread sees the pong. What a round trip
//! costs is two cache-line transfers between cores and the polling loops'
//! reaction time. ipcd's one-client round trip with both sides spinning is
//! compared to it.
//!
//! What it leaves out: everything but the two words. No payload (a round
//! trip moves one number each way), no sleeping (so no system call ever),
//! no second process. Each thread needs a core of its own: on a machine
//! with fewer free, the figure is the scheduler's. So a side that has
//! polled [`POLLS_BEFORE_YIELD`] times without an answer yields its core
//! once before polling on, which matters only then.
//!
//! ```text
//! cargo run --release -p stress --example spin_floor
//! cargo run --release -p stress --example spin_floor -- --messages 100000 --json
//! ```
//!
//! # Protocol
//!
//! `ping` is written only by the caller, `pong` only by the echo thread,
//! each on a cache line of its own; both hold the number of the latest
//! round trip (wrapping, compared for equality only: consecutive numbers
//! always differ). Neither side writes its next value before it has seen
//! the other's answer to its last one, so each word has one writer at a
//! time and nothing to lose. No data rides on them, so the Release stores
//! and Acquire loads order nothing further: they are what a real protocol
//! would pay (free on x86), kept so the floor is not below one.

#![forbid(unsafe_code)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;

use common::{Common, Figures, Rtts};

/// Two threads busy-polling one shared word each way: the floor of a
/// round trip.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: Common,
}

/// Polls without an answer before a side yields its core once (about
/// 100 us of polling here).
const POLLS_BEFORE_YIELD: u32 = 1 << 14;

/// Keeps a word on a cache line of its own (128 bytes: the adjacent-line
/// prefetcher pulls pairs of 64-byte lines).
#[repr(align(128))]
struct Line(AtomicU32);

/// Polls `word` until it holds `want`.
fn poll_for(word: &AtomicU32, want: u32) {
    let mut polls = 0u32;
    while word.load(Ordering::Acquire) != want {
        std::hint::spin_loop();
        polls += 1;
        if polls == POLLS_BEFORE_YIELD {
            polls = 0;
            std::thread::yield_now();
        }
    }
}

fn main() {
    let args = Args::parse();
    args.common.check_one_client();
    let rounds = args.common.messages;
    let ping = Arc::new(Line(AtomicU32::new(0)));
    let pong = Arc::new(Line(AtomicU32::new(0)));
    let echo = {
        let (ping, pong) = (Arc::clone(&ping), Arc::clone(&pong));
        std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                for n in 1..=rounds {
                    poll_for(&ping.0, n as u32);
                    pong.0.store(n as u32, Ordering::Release);
                }
            })
            .expect("spawn the echo thread")
    };
    let mut rtts = Rtts::new();
    let start = Instant::now();
    for n in 1..=rounds {
        let t = Instant::now();
        ping.0.store(n as u32, Ordering::Release);
        poll_for(&pong.0, n as u32);
        rtts.record(t);
    }
    let elapsed = start.elapsed();
    echo.join().expect("echo thread panicked");
    Figures::new("spin_floor", &args.common, 0, elapsed, &rtts).print(args.common.json);
}
