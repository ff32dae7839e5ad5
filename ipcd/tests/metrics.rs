//! `ipcd --metrics`: a scrape after a run counts the calls made, by
//! service and outcome, and the sessions by transport; a non-loopback
//! address is refused unless asked for.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;

use common::{free_loopback_addr, ipcd_command, poll_until, watchdog, Daemon, CLEANUP_LIMIT, TEST_LIMIT};

/// `GET path` on `addr`: the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a header and a body");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample line that starts with `series ` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_counts_the_calls_made_by_service_and_outcome() {
    let addr = free_loopback_addr();
    let daemon = Daemon::start(&["--debug-services", "--metrics", &addr.to_string()]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        // The metrics listener may come up a moment after the socket.
        assert!(poll_until(CLEANUP_LIMIT, || TcpStream::connect(addr).is_ok()), "metrics at {addr}");
        let mut client = ipc_client::Client::connect_to(&socket).unwrap();
        let echo = client.service("echo").unwrap();
        let fail = client.service("debug.fail").unwrap();
        for i in 0..25u32 {
            client.call(&echo, &i.to_le_bytes()).unwrap();
        }
        for _ in 0..4 {
            assert!(client.call(&fail, b"no").is_err());
        }
        let (status, text) = get(addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        assert_eq!(sample(&text, r#"ipcd_calls_total{service="echo",outcome="ok"}"#), Some(25.0), "{text}");
        assert_eq!(sample(&text, r#"ipcd_calls_total{service="echo",outcome="error"}"#), Some(0.0));
        assert_eq!(sample(&text, r#"ipcd_calls_total{service="debug.fail",outcome="error"}"#), Some(4.0));
        assert_eq!(sample(&text, "ipcd_requests_total"), Some(29.0));
        assert_eq!(sample(&text, "ipcd_replies_error_total"), Some(4.0));
        assert_eq!(sample(&text, r#"ipcd_sessions{transport="shm"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"ipcd_build_info{version="0.1.0"}"#), Some(1.0));
        assert!(sample(&text, "ipcd_shm_in_use_bytes").unwrap() > 0.0, "one session is charged");
        assert!(sample(&text, "ipcd_shm_budget_bytes").unwrap() > sample(&text, "ipcd_shm_in_use_bytes").unwrap());
        assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text");

        // Scraping again after more calls counts them too.
        client.call(&echo, b"one more").unwrap();
        let (_, text) = get(addr, "/metrics");
        assert_eq!(sample(&text, r#"ipcd_calls_total{service="echo",outcome="ok"}"#), Some(26.0));
        assert!(get(addr, "/elsewhere").0.contains("404"));
    });
}

#[test]
fn a_metrics_address_other_hosts_reach_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let out = ipcd_command()
        .arg("--socket")
        .arg(dir.path().join("ipcd.sock"))
        .args(["--metrics", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("loopback") && stderr.contains("--metrics-allow-remote"), "{stderr}");
    assert!(!dir.path().join("ipcd.sock").exists());
}
