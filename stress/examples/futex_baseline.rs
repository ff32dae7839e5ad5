//! The floor for a round trip between two sides that sleep: two threads
//! ping-ponging one futex word, nothing else. Run it beside a one-client
//! stress run to see what ipcd adds to the kernel's wake-up cost.
//!
//! What it leaves out: everything but the word. No payload, no spinning
//! (every wait that finds the word unchanged sleeps), no second process.
//! One round trip: this thread stores the next odd number and wakes the
//! peer, which stores the even number after it and wakes this thread.
//!
//! ```text
//! cargo run --release -p stress --example futex_baseline            # any cores
//! taskset -c 0 cargo run --release -p stress --example futex_baseline   # one core
//! cargo run --release -p stress --example futex_baseline -- --messages 100000 --json
//! ```
//!
//! # Protocol
//!
//! One word, written by both sides in turn: odd values by this thread,
//! even ones by the peer, each only after seeing the other's last. A side
//! waits with a futex wait on the value it saw, so a store and wake that
//! land between its check and its sleep make the wait return at once: no
//! wake-up can be lost. Each side wakes the other after every store, even
//! when it is not asleep (the system call the floor is about).

#![forbid(unsafe_code)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ipc_platform::futex;

use common::{fail, Common, Figures, Rtts};

/// Two threads ping-ponging one futex word: the floor of a round trip
/// between two sides that sleep.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    common: Common,
}

/// Waits until `word` holds `want`.
fn wait_for(word: &AtomicU32, want: u32) {
    loop {
        let now = word.load(Ordering::Acquire);
        if now == want {
            return;
        }
        futex::wait(word, now, Some(Duration::from_secs(5))).unwrap_or_else(|e| fail(&format!("futex wait: {e}")));
    }
}

fn wake(word: &AtomicU32) {
    futex::wake_one(word).unwrap_or_else(|e| fail(&format!("futex wake: {e}")));
}

fn main() {
    let args = Args::parse();
    args.common.check_one_client();
    // The values run to twice the round trips: they wrap, and are compared
    // for equality only.
    let rounds = args.common.messages;
    let word = Arc::new(AtomicU32::new(0));
    let peer = Arc::clone(&word);
    // The peer answers each odd value with the next even one.
    let echo = std::thread::spawn(move || {
        for i in 0..rounds {
            wait_for(&peer, (2 * i + 1) as u32);
            peer.store((2 * i + 2) as u32, Ordering::Release);
            wake(&peer);
        }
    });
    let mut rtts = Rtts::new();
    let begin = Instant::now();
    for i in 0..rounds {
        let start = Instant::now();
        word.store((2 * i + 1) as u32, Ordering::Release);
        wake(&word);
        wait_for(&word, (2 * i + 2) as u32);
        rtts.record(start);
    }
    let elapsed = begin.elapsed();
    echo.join().expect("echo thread");
    Figures::new("futex_baseline", &args.common, 0, elapsed, &rtts).print(args.common.json);
}
