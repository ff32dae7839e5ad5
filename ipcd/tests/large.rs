//! Messages longer than a frame end to end: the real client
//! (`ipc_client::Client`: `call`, `send`, `call_reader`, `upload`) against
//! the daemon, an embedded server and a provider, over shared memory, a
//! Unix socket and TCP. One byte over a frame each way, a 100 MiB call the
//! daemon passes on without holding it (its peak memory is read from
//! /proc), a 100 MiB reply, uploads of unknown and announced length, and
//! the two maximums: the client's (`ReplyTooLarge`) and the daemon's
//! `--max-message` (`MessageTooLarge`), after each of which the client
//! goes on. The same by raw frames, and hostile chunks, are in
//! `large_server.rs`.

mod common;
#[path = "common/embedded.rs"]
mod embedded;
#[path = "common/in_process.rs"]
mod in_process;

use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use common::{connect, start_with_streams, watchdog, Daemon, TEST_LIMIT};
use embedded::Embedded;
use in_process::InProcess;
use ipc_client::{CallError, Client, ClientOptions, Service, StreamOptions, Transport};
use ipcd::{Responder, ServiceError, Upload};

/// One test at a time: they move hundreds of MiB and read a daemon's
/// peak memory.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: usize = 1 << 20;
/// The long messages' length.
const LONG: usize = 100 * MIB;

/// Options for every client: calls wait long enough for a loaded machine.
fn options() -> ClientOptions {
    ClientOptions::default().call_timeout(Duration::from_secs(60)).connect_timeout(Duration::from_secs(10))
}

/// [`LONG`] bytes in which every 8-byte word is its index, scrambled: a
/// chunk lost, repeated or put in the wrong place changes the bytes at
/// that place. Made once per test process; every message is a prefix.
fn long() -> &'static [u8] {
    static LONG_BODY: OnceLock<Vec<u8>> = OnceLock::new();
    LONG_BODY.get_or_init(|| {
        // Word by word in place: an iterator of bytes takes seconds in a
        // debug build.
        let mut bytes = vec![0; LONG];
        for (w, word) in bytes.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&((w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555).to_le_bytes());
        }
        bytes
    })
}

/// The first `len` bytes of [`long`].
fn body(len: usize) -> &'static [u8] {
    &long()[..len]
}

/// Counts an upload's bytes and checks them against [`body`]; replies
/// with the count and the length announced (`u64::MAX` for none).
struct Checked {
    got: usize,
    announced: Option<u64>,
    wrong: bool,
}

impl Upload for Checked {
    fn chunk(&mut self, bytes: &[u8]) -> Result<(), ServiceError> {
        let end = self.got + bytes.len();
        self.wrong |= end > LONG || bytes != &long()[self.got..end];
        self.got = end;
        Ok(())
    }

    fn finish(self: Box<Self>, responder: Responder) {
        if self.wrong {
            return responder.fail(ServiceError::with_code(9, "bytes out of order"));
        }
        responder.reply([(self.got as u64).to_le_bytes(), self.announced.unwrap_or(u64::MAX).to_le_bytes()].concat());
    }
}

/// An upload's receipt from `t.upload`.
fn receipt(got: usize, announced: Option<u64>) -> Vec<u8> {
    [(got as u64).to_le_bytes(), announced.unwrap_or(u64::MAX).to_le_bytes()].concat()
}

/// Adds the test's services to a `ServerBuilder` or a `ProviderBuilder`:
/// - `t.echo`: the request back, assembled whole by the engine first (the
///   built-in `echo` reflects chunks as they come instead);
/// - `t.grow`: a request of a little-endian `u64` `len` is answered with
///   `body(len)`;
/// - `t.upload`: see [`Checked`].
macro_rules! large_services {
    ($builder:expr) => {
        $builder
            .service("t.echo", |req| Ok::<_, ServiceError>(req.payload().to_vec()))
            .service("t.grow", |req| {
                let len = <[u8; 8]>::try_from(req.payload()).map_err(|_| ServiceError::new("t.grow takes a u64"))?;
                match usize::try_from(u64::from_le_bytes(len)) {
                    Ok(len) if len <= LONG => Ok(body(len).to_vec()),
                    _ => Err(ServiceError::new("longer than the test's body")),
                }
            })
            .upload_service("t.upload", |_, announced| Ok(Checked { got: 0, announced, wrong: false }))
    };
}

fn grow(len: usize) -> [u8; 8] {
    (len as u64).to_le_bytes()
}

/// The daemon's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Calls `svc` with a request one byte longer than a frame's payload and
/// with one exactly that long, by `call` and by `send`/`wait`; both come
/// back whole.
fn echo_over_a_frame(client: &mut Client, svc: &Service, what: &str) {
    let max = client.max_payload_of(svc).unwrap();
    for len in [max, max + 1] {
        assert_eq!(client.call(svc, body(len)).unwrap(), body(len), "{what}: call of {len} bytes");
        let ticket = client.send(svc, body(len)).unwrap();
        assert_eq!(client.wait(ticket).unwrap(), body(len), "{what}: send of {len} bytes");
    }
}

#[test]
fn one_byte_over_a_frame_each_way_with_the_daemon_an_embedded_server_and_a_provider() {
    let _serial = serial();
    let (daemon, ends) = start_with_streams(&[]);
    let server = Embedded::start(|b| large_services!(b));
    let provider = InProcess::start(daemon.socket(), |b| large_services!(b));
    let embedded = server.transports();
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let mut client = connect(&transport, options());
            let echo = client.service("echo").unwrap();
            echo_over_a_frame(&mut client, &echo, &format!("daemon {}", transport.name()));
        }
        let provided = Transport::Shm(ends.shm.clone());
        for (i, transport) in embedded.iter().chain([&provided]).enumerate() {
            let what = if i < 3 { format!("embedded {}", transport.name()) } else { "provider".to_string() };
            let mut client = connect(transport, options());
            let (echo, grow_svc) = (client.service("t.echo").unwrap(), client.service("t.grow").unwrap());
            echo_over_a_frame(&mut client, &echo, &what);
            let max = client.max_payload_of(&grow_svc).unwrap();
            for len in [max, max + 1] {
                assert_eq!(client.call(&grow_svc, &grow(len)).unwrap(), body(len), "{what}: a reply of {len} bytes");
            }
            if i < 3 {
                let echo = client.service("echo").unwrap();
                echo_over_a_frame(&mut client, &echo, &format!("{what}, built-in echo"));
            }
        }
    });
    drop((provider, server));
}

#[test]
fn a_100_mib_call_passes_through_the_daemon_without_its_peak_memory_growing() {
    let _serial = serial();
    let (daemon, ends) = start_with_streams(&[]);
    let pid = daemon.pid();
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options());
            let echo = client.service("echo").unwrap();
            // Warm: the session's buffers are in use before the peak is read.
            assert_eq!(client.call(&echo, body(4 * MIB)).unwrap(), body(4 * MIB), "{name}");
            let before = peak_rss(pid);
            let reply = client.call(&echo, long()).unwrap();
            let grew = peak_rss(pid).saturating_sub(before);
            assert!(reply == long(), "{name}: the 100 MiB echo came back otherwise ({} bytes)", reply.len());
            eprintln!("{name}: the daemon's peak memory grew by {grew} bytes during a 100 MiB echo");
            // Held whole, it would be 100 MiB at least; passed on chunk by
            // chunk, a few buffers at most.
            assert!(grew < 4 * MIB as u64, "{name}: the daemon's peak memory grew by {grew} bytes");
        }
    });
}

/// Reads a [`LONG`] reply of `t.grow` through `call_reader`, checking each
/// piece where it belongs, in reads of an odd size.
fn read_long(client: &mut Client, svc: &Service, what: &str) {
    // The reader borrows its request (it sends what is left as it reads).
    let request = grow(LONG);
    let mut reader = client.call_reader(svc, &request).unwrap();
    assert_eq!(reader.len(), Some(LONG as u64), "{what}: the length its first chunk announced");
    let mut piece = vec![0; 3 * MIB + 7];
    let mut at = 0;
    loop {
        let n = reader.read(&mut piece).unwrap_or_else(|e| panic!("{what}: reading at {at}: {e}"));
        if n == 0 {
            break;
        }
        assert!(at + n <= LONG && piece[..n] == long()[at..at + n], "{what}: bytes {at}..{} differ", at + n);
        at += n;
    }
    assert_eq!(at, LONG, "{what}: the reply's length");
}

#[test]
fn a_100_mib_reply_is_read_with_call_reader_and_with_call() {
    let _serial = serial();
    let server = Embedded::start(|b| large_services!(b));
    let daemon = Daemon::start(&[]);
    let provider = InProcess::start(daemon.socket(), |b| large_services!(b));
    let transports = server.transports();
    let provided = Transport::Shm(daemon.socket().to_path_buf());
    watchdog(TEST_LIMIT, move || {
        for transport in &transports[..2] {
            let name = transport.name();
            let mut client = connect(transport, options());
            let svc = client.service("t.grow").unwrap();
            read_long(&mut client, &svc, name);
            let reply = client.call(&svc, &grow(LONG)).unwrap();
            assert!(reply == long(), "{name}: the 100 MiB reply came otherwise ({} bytes)", reply.len());
            // The reader was read to its end: nothing of it is left to
            // get in the way.
            let echo = client.service("echo").unwrap();
            assert_eq!(client.call(&echo, b"after").unwrap(), b"after", "{name}");
        }
        // A provider's long reply, a little over a frame's worth of
        // chunks apart (the 100 MiB ones are the daemon's and the embedded
        // server's: a provider's shared memory is the same code).
        let mut client = connect(&provided, options());
        let svc = client.service("t.grow").unwrap();
        let len = 3 * MIB + 1;
        let mut reply = Vec::new();
        client.call_reader(&svc, &grow(len)).unwrap().read_to_end(&mut reply).unwrap();
        assert!(reply == body(len), "provider: a reply of {len} bytes came otherwise ({} bytes)", reply.len());
    });
    drop((provider, server));
}

/// Uploads `len` bytes of [`body`] to `svc`, announced or not, in writes
/// of an odd size; returns the reply.
fn upload(client: &mut Client, svc: &Service, len: usize, announce: bool) -> Result<Vec<u8>, CallError> {
    let mut up = client.upload(svc, announce.then_some(len as u64))?;
    for piece in body(len).chunks(100_003) {
        if let Err(e) = up.write_all(piece) {
            let inner = e.into_inner().expect("an upload's error carries its CallError");
            return Err(inner.downcast_ref::<CallError>().expect("a CallError").clone());
        }
    }
    assert_eq!(up.written(), len as u64);
    up.finish()
}

#[test]
fn uploads_of_unknown_and_announced_length_to_an_embedded_server_a_provider_and_the_daemons_echo() {
    let _serial = serial();
    let server = Embedded::start(|b| large_services!(b));
    let (daemon, ends) = start_with_streams(&[]);
    let provider = InProcess::start(daemon.socket(), |b| large_services!(b));
    let embedded = server.transports();
    watchdog(TEST_LIMIT, move || {
        let len = 8 * MIB + 5;
        let provided = Transport::Shm(ends.shm.clone());
        for (i, transport) in embedded.iter().chain([&provided]).enumerate() {
            let what = if i < 3 { format!("embedded {}", transport.name()) } else { "provider".to_string() };
            let mut client = connect(transport, options());
            let svc = client.service("t.upload").unwrap();
            assert_eq!(upload(&mut client, &svc, len, false).unwrap(), receipt(len, None), "{what}: unknown length");
            let announced = Some(len as u64);
            assert_eq!(upload(&mut client, &svc, len, true).unwrap(), receipt(len, announced), "{what}: announced");
            // Short of what it announced: refused by the client, not sent.
            let mut up = client.upload(&svc, Some(10)).unwrap();
            up.write_all(b"short").unwrap();
            assert_eq!(up.finish(), Err(CallError::UploadLength { announced: 10, written: 5 }), "{what}");
            // An upload of one frame is an upload of one chunk.
            assert_eq!(upload(&mut client, &svc, 10, false).unwrap(), receipt(10, Some(10)), "{what}: one frame");
        }
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options());
            let echo = client.service("echo").unwrap();
            let reply = upload(&mut client, &echo, len, false).unwrap();
            assert!(reply == body(len), "{name}: an upload's echo came back otherwise ({} bytes)", reply.len());
        }
    });
    drop((provider, server));
}

#[test]
fn a_client_with_a_smaller_max_message_refuses_a_larger_reply_and_goes_on() {
    let _serial = serial();
    let server = Embedded::start(|b| large_services!(b));
    let (daemon, ends) = start_with_streams(&[]);
    let provider = InProcess::start(daemon.socket(), |b| large_services!(b));
    let embedded = server.transports();
    watchdog(TEST_LIMIT, move || {
        let max = MIB as u64;
        let refused = CallError::ReplyTooLarge { len: Some(2 * max), max };
        let provided = Transport::Shm(ends.shm.clone());
        for (i, transport) in embedded.iter().chain([&provided]).enumerate() {
            let what = if i < 3 { format!("embedded {}", transport.name()) } else { "provider".to_string() };
            let mut client = connect(transport, options().max_message(max));
            let svc = client.service("t.grow").unwrap();
            assert_eq!(client.call(&svc, &grow(2 * MIB)), Err(refused.clone()), "{what}: call");
            assert_eq!(client.call(&svc, &grow(MIB)).unwrap(), body(MIB), "{what}: up to the maximum");
            // Refused as its first chunk announces it: before any byte is read.
            let reader = client.call_reader(&svc, &grow(2 * MIB)).map(|r| r.len());
            assert_eq!(reader, Err(refused.clone()), "{what}: call_reader");
            let ticket = client.send(&svc, &grow(2 * MIB)).unwrap();
            assert_eq!(client.wait(ticket), Err(refused.clone()), "{what}: send");
            assert_eq!(client.call(&svc, &grow(1000)).unwrap(), body(1000), "{what}: after");
        }
        // The daemon's own: an item of a stream, too long for the client.
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options().max_message(max));
            let count = client.service("stream.count").unwrap();
            let request = [1u32.to_le_bytes(), (2 * MIB as u32).to_le_bytes()].concat();
            let mut s = client.stream_with(&count, &request, StreamOptions::default()).unwrap();
            assert_eq!(s.next(&mut client), Err(refused.clone()), "{name}: a stream's item");
            let echo = client.service("echo").unwrap();
            assert_eq!(client.call(&echo, body(MIB)).unwrap(), body(MIB), "{name}: after");
        }
    });
    drop((provider, server));
}

#[test]
fn a_daemon_with_max_message_1m_refuses_a_2_mib_call_and_the_client_goes_on() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&["--max-message", "1M"]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options());
            let echo = client.service("echo").unwrap();
            match client.call(&echo, body(2 * MIB)) {
                Err(CallError::MessageTooLarge { .. }) => {}
                other => panic!("{name}: a 2 MiB call to a daemon of --max-message 1M: {:?}", other.map(|r| r.len())),
            }
            assert_eq!(client.call(&echo, body(MIB)).unwrap(), body(MIB), "{name}: 1 MiB is taken");
            match upload(&mut client, &echo, 2 * MIB, false) {
                Err(CallError::MessageTooLarge { .. }) => {}
                other => panic!("{name}: a 2 MiB upload: {:?}", other.map(|r| r.len())),
            }
            assert_eq!(client.call(&echo, b"after").unwrap(), b"after", "{name}");
        }
    });
}

#[test]
fn chunked_stream_items_interleave_with_a_long_call_on_the_same_link() {
    let _serial = serial();
    let (_daemon, ends) = start_with_streams(&[]);
    watchdog(TEST_LIMIT, move || {
        for transport in ends.all() {
            let name = transport.name();
            let mut client = connect(&transport, options());
            let (echo, count) = (client.service("echo").unwrap(), client.service("stream.count").unwrap());
            // Items each three frames long, from three streams at once.
            let size = 3 * client.max_payload() as u32 + 1;
            const ITEMS: u32 = 8;
            let request = [ITEMS.to_le_bytes(), size.to_le_bytes()].concat();
            let mut streams: Vec<_> = (0..3)
                .map(|_| client.stream_with(&count, &request, StreamOptions::default().window(2)).unwrap())
                .collect();
            for i in 0..ITEMS {
                for (k, s) in streams.iter_mut().enumerate() {
                    let item = s.next(&mut client).unwrap().unwrap_or_else(|| panic!("{name}: stream {k} ended early"));
                    assert_eq!(item.len(), size as usize, "{name}: stream {k}, item {i}");
                    assert!(item[..8] == u64::from(i).to_le_bytes() && item[8..].iter().all(|&b| b == i as u8));
                }
                // Its chunks go out and come back among the items' chunks.
                let len = MIB + i as usize;
                assert!(client.call(&echo, body(len)).unwrap() == body(len), "{name}: the echo after item {i}");
            }
            for s in &mut streams {
                assert_eq!(s.next(&mut client).unwrap(), None, "{name}");
            }
        }
    });
}

#[test]
fn an_upload_to_the_daemons_echo_cut_by_its_stop_ends_shutdown() {
    let _serial = serial();
    watchdog(TEST_LIMIT, || {
        let (mut daemon, ends) = start_with_streams(&[]);
        let mut clients: Vec<Client> = ends.all().iter().map(|t| connect(t, options())).collect();
        let (mut uploads, mut maxes) = (Vec::new(), Vec::new());
        for client in &mut clients {
            let echo = client.service("echo").unwrap();
            let max = client.max_payload();
            maxes.push(max);
            let mut up = client.upload(&echo, None).unwrap();
            // Three frames' worth: the echo's reply has begun.
            up.write_all(body(3 * max)).unwrap();
            uploads.push(up);
        }
        // The daemon cuts each echo it has begun and not finished within
        // its drain with an error frame of its id saying it stopped (one
        // it never took is not run); one whose last chunk came within the
        // drain is answered whole. Never a broken link.
        daemon.signal(nix::sys::signal::Signal::SIGTERM);
        for ((up, transport), max) in uploads.into_iter().zip(ends.all()).zip(maxes) {
            match up.finish() {
                Err(CallError::Shutdown) => {}
                Ok(reply) => assert!(reply == body(3 * max), "{}: an echo of {} bytes", transport.name(), reply.len()),
                Err(e) => panic!("{}: an upload cut by a stop ended with {e:?}", transport.name()),
            }
        }
        assert!(daemon.wait_exit(common::EXIT_LIMIT).success());
    });
}
