//! A provider: offers `example.upper` and `example.count` through the
//! running ipcd, until Ctrl-C (or SIGTERM).
//!
//! ```text
//! ./target/release/ipcd --socket /tmp/ipcd.sock &
//! IPCD_SOCKET=/tmp/ipcd.sock cargo run --release -p ipcd --example provider &
//! IPCD_SOCKET=/tmp/ipcd.sock cargo run --release -p ipc-client --example caller
//! ```
//!
//! The provider's uid must be allowed to provide the names: by default the
//! daemon's own uid or root (see `ipcd --config`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipcd::{Provider, ServiceError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&calls);
    let provider = Provider::builder()
        .service("example.upper", |req| Ok::<_, ServiceError>(req.payload().to_ascii_uppercase()))
        .service("example.count", move |_| {
            let n = counted.fetch_add(1, Ordering::Relaxed) + 1;
            Ok::<_, ServiceError>(n.to_le_bytes().to_vec())
        })
        .connect()?;
    println!("provider {} serving example.upper and example.count; Ctrl-C stops it", provider.provider_id());
    let stop = provider.shutdown_handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.shutdown();
        }
    });
    provider.run()?;
    println!("served {} counts", calls.load(Ordering::Relaxed));
    Ok(())
}
