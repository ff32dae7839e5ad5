//! The floor for a round trip between two sides that sleep: two threads
//! ping-ponging one futex word, nothing else. Run it beside a one-client
//! stress run to see what ipcd adds to the kernel's wake-up cost.
//!
//! ```text
//! cargo run --release -p stress --example futex_baseline            # any cores
//! taskset -c 0 cargo run --release -p stress --example futex_baseline   # one core
//! ```

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_platform::futex;

const ROUNDS: u32 = 100_000;

/// Waits until `word` holds `want`.
fn wait_for(word: &AtomicU32, want: u32) {
    loop {
        let now = word.load(Ordering::Acquire);
        if now == want {
            return;
        }
        futex::wait(word, now, Some(Duration::from_secs(5))).expect("futex wait");
    }
}

fn main() {
    let word = Arc::new(AtomicU32::new(0));
    let peer = Arc::clone(&word);
    // The peer answers each odd value with the next even one.
    let echo = std::thread::spawn(move || {
        for i in 0..ROUNDS {
            wait_for(&peer, 2 * i + 1);
            peer.store(2 * i + 2, Ordering::Release);
            futex::wake_one(&peer).expect("futex wake");
        }
    });
    let mut rtt_ns = Vec::with_capacity(ROUNDS as usize);
    for i in 0..ROUNDS {
        let start = Instant::now();
        word.store(2 * i + 1, Ordering::Release);
        futex::wake_one(&word).expect("futex wake");
        wait_for(&word, 2 * i + 2);
        rtt_ns.push(start.elapsed().as_nanos() as u64);
    }
    echo.join().expect("echo thread");
    rtt_ns.sort_unstable();
    let at = |q: f64| rtt_ns[((rtt_ns.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "futex ping-pong, {ROUNDS} round trips: p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  max {:.1} us",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}
