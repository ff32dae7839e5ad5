//! `ipcd --metrics`: the call durations by service and the bytes in and
//! out by transport that a scrape shows after a run match the calls made.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{poll_until, start_with_streams, watchdog, CLEANUP_LIMIT, TEST_LIMIT};
use ipc_client::{Client, ClientOptions, Transport};
use ipc_core::HEADER_LEN;

/// The metrics at `addr`, as text.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a header and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample line that starts with `series ` in `text`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[test]
fn durations_by_service_and_bytes_by_transport_match_the_calls_made() {
    let addr = common::free_loopback_addr();
    let (daemon, at) = start_with_streams(&["--debug-services", "--metrics", &addr.to_string()]);
    watchdog(TEST_LIMIT, move || {
        assert!(poll_until(CLEANUP_LIMIT, || TcpStream::connect(addr).is_ok()), "metrics at {addr}");
        let options = ClientOptions::default().call_timeout(Duration::from_secs(60));
        let mut shm = Client::connect_with(Transport::Shm(at.shm.clone()), options.clone()).unwrap();
        let mut uds = Client::connect_with(Transport::Uds(at.uds.clone()), options).unwrap();
        let before = scrape(addr);
        let bytes = |text: &str, dir: &str, transport: &str| {
            sample(text, &format!("ipcd_{dir}_bytes_total{{transport=\"{transport}\"}}"))
        };

        // Echo calls of 100 bytes: a frame of 16 + 100 bytes each way.
        let echo = shm.service("echo").unwrap();
        for _ in 0..10 {
            shm.call(&echo, &[7; 100]).unwrap();
        }
        let echo_uds = uds.service("echo").unwrap();
        for _ in 0..3 {
            uds.call(&echo_uds, &[7; 40]).unwrap();
        }
        // Calls that sleep 20 ms each land in buckets above 10 ms.
        let sleep = shm.service("debug.sleep").unwrap();
        for _ in 0..3 {
            shm.call(&sleep, &20u32.to_le_bytes()).unwrap();
        }

        let after = scrape(addr);
        let delta = |dir, transport| bytes(&after, dir, transport) - bytes(&before, dir, transport);
        let shm_frames = 10.0 * (HEADER_LEN + 100) as f64 + 3.0 * (HEADER_LEN + 4) as f64;
        assert_eq!(delta("received", "shm"), shm_frames, "{after}");
        assert_eq!(delta("sent", "shm"), 10.0 * (HEADER_LEN + 100) as f64 + 3.0 * HEADER_LEN as f64);
        assert_eq!(delta("received", "uds"), 3.0 * (HEADER_LEN + 40) as f64);
        assert_eq!(delta("sent", "uds"), 3.0 * (HEADER_LEN + 40) as f64);
        assert_eq!(delta("received", "tcp"), 0.0);

        let series = |service: &str, part: &str| format!("ipcd_call_duration_seconds_{part}{{service=\"{service}\"}}");
        let bucket = |service: &str, le: &str| {
            sample(&after, &format!("ipcd_call_duration_seconds_bucket{{le=\"{le}\",service=\"{service}\"}}"))
        };
        assert_eq!(sample(&after, &series("echo", "count")), 13.0, "{after}");
        assert_eq!(bucket("echo", "+Inf"), 13.0);
        assert_eq!(sample(&after, &series("debug.sleep", "count")), 3.0);
        assert_eq!(bucket("debug.sleep", "0.01"), 0.0, "a call that slept 20 ms took longer than 10 ms");
        assert_eq!(bucket("debug.sleep", "+Inf"), 3.0);
        assert!(sample(&after, &series("debug.sleep", "sum")) >= 0.06, "{after}");
        // Buckets are cumulative: they never fall as the bound rises.
        let echo_buckets: Vec<f64> = after
            .lines()
            .filter(|l| l.starts_with("ipcd_call_duration_seconds_bucket{") && l.contains("service=\"echo\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(echo_buckets.len(), 23, "22 bounds and +Inf");
        assert!(echo_buckets.windows(2).all(|w| w[0] <= w[1]), "{echo_buckets:?}");
        drop(daemon);
    });
}
