//! A caller driven by a mio poll loop of its own, through the client's
//! poll-style API: pipelined requests, outcomes taken without blocking,
//! and every wait an `arm` before `Poll::poll` (see the protocol in the
//! `Client::arm` docs).
//!
//! Start a daemon (`cargo run -p ipcd`), then `cargo run -p ipc-client
//! --example mio_loop`.

use std::collections::HashSet;

use ipc_client::{Armed, Client, ClientOptions, DoorbellKind, FdToken};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A poll loop needs the pollable doorbell on shared memory.
    let options = ClientOptions::default().doorbell(DoorbellKind::Pollable);
    let mut client = Client::connect_with(ipc_platform_default_socket(), options)?;
    let echo = client.service("echo")?;

    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(16);
    let mut registered = None;
    // mio is edge-triggered: an fd stays ready until a read found it empty.
    let mut still_ready: HashSet<FdToken> = HashSet::new();

    let mut tickets: HashSet<_> =
        (0..100).map(|i| client.send(&echo, format!("request {i}").as_bytes())).collect::<Result<_, _>>()?;
    while !tickets.is_empty() {
        // 1. Take what is there.
        if let Some(got) = client.try_recv()? {
            tickets.remove(&got.ticket);
            println!("{}", String::from_utf8_lossy(&got.outcome?));
            continue;
        }
        // 2. Arm: announce the wait and re-check.
        if client.arm()? == Armed::Ready {
            continue;
        }
        // (Re-)register the fds when the client's links changed.
        if registered != Some(client.fd_epoch()) {
            poll = Poll::new()?;
            still_ready.clear();
            for w in client.wait_fds() {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&w.fd);
                poll.registry().register(
                    &mut SourceFd(&fd),
                    Token(w.token.get()),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                still_ready.insert(w.token);
            }
            registered = Some(client.fd_epoch());
        }
        // 3. Wait, unless an fd is known to be ready still.
        if still_ready.is_empty() {
            poll.poll(&mut events, None)?;
            still_ready.extend(events.iter().map(|e| FdToken::from_usize(e.token().0)));
        }
        // 4. Drain; forget readiness only after an empty read.
        still_ready.retain(|&token| !client.on_ready(token));
    }
    Ok(())
}

/// `$IPCD_SOCKET`, else `$XDG_RUNTIME_DIR/ipcd.sock`, else
/// `/tmp/ipcd-<uid>/ipcd.sock`, as `Client::connect` picks.
fn ipc_platform_default_socket() -> std::path::PathBuf {
    ipc_platform::default_socket_path()
}
