//! A caller of a provided service: resolves `example.upper` (offered by
//! the `provider` example of the ipcd crate) through the running ipcd and
//! calls it straight, over the session the daemon brokered.
//!
//! ```text
//! ./target/release/ipcd --socket /tmp/ipcd.sock &
//! IPCD_SOCKET=/tmp/ipcd.sock cargo run --release -p ipcd --example provider &
//! IPCD_SOCKET=/tmp/ipcd.sock cargo run --release -p ipc-client --example caller
//! ```

use std::time::Duration;

use ipc_client::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut client = Client::connect()?;
    // Providers often start after their callers: wait for one a while.
    let upper = client.wait_for_service("example.upper", Duration::from_secs(10))?;
    let reply = client.call(&upper, b"hello from the caller")?;
    println!("{}", String::from_utf8_lossy(&reply));
    // The same session serves every name of that provider the caller may
    // call: this one is not asked of the daemon again.
    let count = client.service("example.count")?;
    for _ in 0..3 {
        let n = client.call(&count, b"")?;
        println!("count: {}", u64::from_le_bytes(n.as_slice().try_into()?));
    }
    if let Some(provider) = client.provider(&upper) {
        println!("served by {provider}");
    }
    Ok(())
}
