//! What the client library holds of a message far longer than a ring, by
//! the calling thread's heap (a counting allocator): a reply read into a
//! buffer reserved beforehand costs nothing more, a plain call holds the
//! reply once, and a reader of an echo holds about a chunk of it however
//! long it is.

use std::io::Read;

#[path = "common/embedded.rs"]
mod embedded;

use embedded::Embedded;
use ipc_alloc_count::{reset_thread_heap_peak, thread_heap, thread_heap_peak, CountingAllocator};
use ipc_client::{Client, ClientOptions, Transport};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The most the library may hold beyond what its caller asked for: its
/// buffers of about a chunk, and bookkeeping.
const SLACK: i64 = 4 << 20;

const LEN: usize = 64 << 20;

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A client whose rings are the largest (frames of 8 MiB), over
/// `transport`, and the echo.
fn client(transport: &Transport) -> (Client, ipc_client::Service) {
    let options = ClientOptions::default().fit_payload(16 << 20);
    let mut client = Client::connect_with(transport.clone(), options).expect("connects");
    let echo = client.service("echo").expect("echo");
    (client, echo)
}

/// The calling thread's heap peak during `f` over its heap before it.
fn growth<T>(f: impl FnOnce() -> T) -> (T, i64) {
    reset_thread_heap_peak();
    let base = thread_heap();
    let out = f();
    (out, thread_heap_peak() - base)
}

#[test]
fn a_long_reply_is_held_once_where_its_caller_wants_it() {
    let server = Embedded::start(|b| b);
    let request = body(LEN);
    for transport in &server.transports()[..2] {
        let name = transport.name();
        let (mut client, echo) = client(transport);
        // Warm: the link's own buffers are in use before the peak is read.
        client.call(&echo, &request[..4 << 20]).unwrap();

        let mut reply = Vec::with_capacity(LEN);
        let (called, grew) = growth(|| client.call_into(&echo, &request, &mut reply));
        called.unwrap();
        assert!(reply == request, "{name}: the reply differs from the request");
        assert!(grew <= SLACK, "{name}: call_into into a reserved buffer held {grew} bytes more");
        drop(reply);

        let (reply, grew) = growth(|| client.call(&echo, &request));
        assert!(reply.unwrap() == request, "{name}: the reply differs from the request");
        assert!(grew <= LEN as i64 + SLACK, "{name}: call held {grew} bytes for a reply of {LEN}");
    }
}

#[test]
fn a_reader_of_a_long_echo_holds_about_a_chunk_of_it() {
    let server = Embedded::start(|b| b);
    let request = body(LEN);
    for transport in &server.transports()[..2] {
        let name = transport.name();
        let (mut client, echo) = client(transport);
        client.call(&echo, &request[..4 << 20]).unwrap();
        let mut piece = vec![0u8; 1 << 20];
        // The echo answers as it reads: its reply comes while the request
        // is still being sent, and the reader sends the rest as it reads.
        let (read, grew) = growth(|| {
            let mut reader = client.call_reader(&echo, &request).expect("call_reader");
            let mut at = 0;
            loop {
                let n = reader.read(&mut piece).expect("reading the reply");
                if n == 0 {
                    break;
                }
                assert!(piece[..n] == request[at..at + n], "{name}: reply bytes at {at} differ");
                at += n;
            }
            at
        });
        assert_eq!(read, LEN, "{name}: the reply's length");
        assert!(grew <= SLACK, "{name}: call_reader of a {LEN}-byte echo held {grew} bytes");
        // The link goes on.
        assert_eq!(client.call(&echo, b"after").unwrap(), b"after", "{name}");
    }
}
