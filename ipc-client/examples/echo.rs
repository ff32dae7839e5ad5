//! Connects to ipcd, calls `echo` and `ping`, makes a typed call, and prints
//! the daemon's stats.
//!
//! ```text
//! ipcd --socket /tmp/ipcd-example.sock &
//! IPCD_SOCKET=/tmp/ipcd-example.sock cargo run --release -p ipc-client --example echo
//! ```

use std::time::Instant;

use ipc_client::{CallError, Client};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Point {
    x: i32,
    y: i32,
    label: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut client = Client::connect()?;
    println!("connected: session {}, max payload {} bytes", client.session_id(), client.max_payload());

    let echo = client.service("echo")?;
    let reply = client.call(&echo, b"hello, ipcd")?;
    println!("echo replied {:?}", String::from_utf8_lossy(&reply));

    // The echo service returns the request bytes, so a typed call through it
    // decodes to the value sent.
    let point = Point { x: 3, y: -4, label: "p".into() };
    let back: Point = client.call_typed(&echo, &point)?;
    assert_eq!(back, point);
    println!("typed round trip: {back:?}");

    let ping = client.service("ping")?;
    let mut buf = Vec::new();
    let start = Instant::now();
    for _ in 0..10_000 {
        client.call_into(&ping, &[], &mut buf)?;
    }
    println!("10000 pings: {:.2} us per call", start.elapsed().as_secs_f64() * 1e6 / 10_000.0);

    match client.service("no-such-service") {
        Err(CallError::UnknownService { name }) => {
            println!("unknown service {name:?} reported as expected")
        }
        other => println!("unexpected: {other:?}"),
    }

    let stats = client.service("stats")?;
    println!("stats: {}", String::from_utf8_lossy(&client.call(&stats, &[])?));
    Ok(())
}
