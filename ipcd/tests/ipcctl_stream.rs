//! `ipcctl stream` against a real daemon's `stream.count`: the items'
//! bytes exactly on stdout, or one JSON line per item; a refused request
//! and a stream cut at its deadline (`--timeout`) exit 1.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{watchdog, Daemon, TEST_LIMIT};

const IPCCTL: &str = env!("CARGO_BIN_EXE_ipcctl");

/// `ipcctl --socket SOCKET stream stream.count --file REQUEST ARGS`, the
/// request being `stream.count`'s `count` and `size`.
fn stream_count(socket: &Path, dir: &Path, count: u32, size: u32, args: &[&str]) -> Output {
    let request = dir.join(format!("count-{count}-{size}"));
    std::fs::write(&request, [count.to_le_bytes(), size.to_le_bytes()].concat()).unwrap();
    Command::new(IPCCTL)
        .arg("--socket")
        .arg(socket)
        .args(["stream", "stream.count", "--file"])
        .arg(&request)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ipcctl")
}

/// Item `i` of `stream.count`'s items of `size` bytes: `i` as a
/// little-endian u64 (cut to `size`), then `i as u8`.
fn item(i: u32, size: usize) -> Vec<u8> {
    let mut item = vec![i as u8; size];
    let head = u64::from(i).to_le_bytes();
    let n = head.len().min(size);
    item[..n].copy_from_slice(&head[..n]);
    item
}

#[test]
fn ipcctl_stream_writes_each_item_of_stream_count_and_exits_1_when_the_stream_fails() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.socket().to_path_buf();
    watchdog(TEST_LIMIT, move || {
        let dir = tempfile::tempdir().unwrap();

        // Raw: the items' bytes one after another, and nothing else; a
        // window of 2 makes the daemon wait for credit along the way.
        let out = stream_count(&socket, dir.path(), 40, 12, &["--window", "2"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let expected: Vec<u8> = (0..40).flat_map(|i| item(i, 12)).collect();
        assert_eq!(out.stdout, expected);

        // JSON: one line per item, in order, with its length and bytes.
        let out = stream_count(&socket, dir.path(), 3, 10, &["--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, line) in lines.iter().enumerate() {
            let hex: String = item(i as u32, 10).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(line["item"], i);
            assert_eq!(line["len"], 10);
            assert_eq!(line["hex"], hex.as_str());
        }

        // An empty stream: nothing written, success.
        let out = stream_count(&socket, dir.path(), 0, 4, &[]);
        assert!(out.status.success() && out.stdout.is_empty());

        // A request stream.count refuses: its error, exit 1.
        let out = Command::new(IPCCTL)
            .arg("--socket")
            .arg(&socket)
            .args(["stream", "stream.count", "abc"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("two u32s"), "{stderr}");

        // Empty items without end: the deadline cuts the stream, exit 1.
        let out = stream_count(&socket, dir.path(), u32::MAX, 0, &["--timeout", "300ms"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("stream.count failed after"), "{stderr}");
        assert!(out.stdout.is_empty());
        drop(daemon);
    });
}
