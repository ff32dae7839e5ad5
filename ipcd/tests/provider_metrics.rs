//! `Provider::serve_metrics`: a provider serves the metrics of the calls
//! it serves (the daemon never sees brokered calls), by service and
//! outcome, errors of handed-off calls counted when they are answered.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{join_within, watchdog, Daemon, EXIT_LIMIT, TEST_LIMIT};
use ipc_client::{CallError, Client, ClientOptions};
use ipcd::{Provider, Request, ServiceError};

/// The metrics at `addr`, as text.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the provider's metrics");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a header and a body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample line that starts with `series ` in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn upper(req: &Request<'_>) -> Result<Vec<u8>, ServiceError> {
    if req.payload().is_empty() {
        return Err(ServiceError::with_code(9, "nothing to raise"));
    }
    Ok(req.payload().to_ascii_uppercase())
}

#[test]
fn a_providers_scrape_counts_the_calls_it_served_by_service_and_outcome() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let provider = Provider::builder()
            .socket(&socket)
            .workers(1)
            .blocking_service("test.upper", upper)
            .deferred_service("test.later", |request, responder| {
                if request.payload() == b"fail" {
                    responder.fail(ServiceError::new("asked to fail"));
                } else {
                    responder.reply(request.into_payload());
                }
            })
            .connect()
            .expect("the provider registers");
        let metrics = provider.serve_metrics("127.0.0.1:0".parse().unwrap(), false).expect("metrics served");
        let addr = metrics.local_addr();
        let stop = provider.shutdown_handle();
        let serving = std::thread::spawn(move || provider.run());

        let options = ClientOptions::default().call_timeout(Duration::from_secs(60));
        let mut client = Client::connect_with(&socket, options).unwrap();
        let up = client.service("test.upper").unwrap();
        let later = client.service("test.later").unwrap();
        for _ in 0..5 {
            assert_eq!(client.call(&up, b"abc").unwrap(), b"ABC");
        }
        assert!(matches!(client.call(&up, b""), Err(CallError::Remote { .. })));
        for _ in 0..3 {
            assert_eq!(client.call(&later, b"x").unwrap(), b"x");
        }
        for _ in 0..2 {
            assert!(matches!(client.call(&later, b"fail"), Err(CallError::Remote { .. })));
        }

        let text = scrape(addr);
        let calls = |service: &str, outcome: &str| {
            sample(&text, &format!("ipcd_calls_total{{service=\"{service}\",outcome=\"{outcome}\"}}"))
        };
        assert_eq!(calls("test.upper", "ok"), Some(5.0), "{text}");
        assert_eq!(calls("test.upper", "error"), Some(1.0), "{text}");
        assert_eq!(calls("test.later", "ok"), Some(3.0), "{text}");
        assert_eq!(calls("test.later", "error"), Some(2.0), "{text}");
        assert_eq!(sample(&text, "ipcd_requests_total"), Some(11.0), "{text}");
        assert_eq!(sample(&text, "ipcd_replies_error_total"), Some(3.0), "{text}");
        let count =
            |service: &str| sample(&text, &format!("ipcd_call_duration_seconds_count{{service=\"{service}\"}}"));
        assert_eq!((count("test.upper"), count("test.later")), (Some(6.0), Some(5.0)), "{text}");
        assert_eq!(sample(&text, r#"ipcd_sessions{transport="brokered"}"#), Some(1.0), "{text}");
        assert!(sample(&text, r#"ipcd_received_bytes_total{transport="brokered"}"#).unwrap_or(0.0) > 0.0, "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text");

        drop(client);
        stop.shutdown();
        join_within(serving, EXIT_LIMIT, "the provider").expect("the provider ran");
        drop(metrics);
        drop(daemon);
    });
}
