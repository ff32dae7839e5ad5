//! Running under systemd: which socket the service manager passed is
//! which listener, telling it how ipcd is doing, and the watchdog thread.

use std::time::Duration;

use ipc_platform::ServiceState;

/// The `FileDescriptorName=`s ipcd serves, in the order of [`Passed`]'s
/// fields: the control socket, the `--uds` stream socket, the `--tcp`
/// listener.
pub(crate) const NAMES: [&str; 3] = ["control", "uds", "tcp"];

/// The sockets the service manager passed, by the listener each is.
#[derive(Debug)]
pub(crate) struct Passed<T> {
    pub(crate) control: Option<T>,
    pub(crate) uds: Option<T>,
    pub(crate) tcp: Option<T>,
}

/// Tells the passed sockets apart by name (see [`NAMES`]). A single socket
/// named otherwise (systemd names a socket after its unit when the unit
/// sets no `FileDescriptorName=`; `"unknown"` when nothing names it) is the
/// control socket. Of several, each must have one of the names, at most
/// once: guessing which is which could serve the control socket's clients
/// a stream transport, or the other way round.
pub(crate) fn assign<T>(sockets: impl IntoIterator<Item = (String, T)>) -> Result<Passed<T>, String> {
    let mut sockets: Vec<(String, T)> = sockets.into_iter().collect();
    let mut passed = Passed { control: None, uds: None, tcp: None };
    if let [(name, _)] = sockets.as_slice() {
        if !NAMES.contains(&name.as_str()) {
            passed.control = sockets.pop().map(|(_, fd)| fd);
            return Ok(passed);
        }
    }
    for (i, (name, fd)) in sockets.into_iter().enumerate() {
        let slot = match name.as_str() {
            "control" => &mut passed.control,
            "uds" => &mut passed.uds,
            "tcp" => &mut passed.tcp,
            _ => {
                return Err(format!(
                    "socket {i} passed by the service manager is named {name:?}; with several sockets, name each \
                     (FileDescriptorName=) control, uds or tcp"
                ))
            }
        };
        if slot.replace(fd).is_some() {
            return Err(format!("the service manager passed two sockets named {name:?}"));
        }
    }
    Ok(passed)
}

/// Tells the service manager `state`, if there is one; a failure is
/// logged, never fatal (the manager's own timeouts then decide).
pub(crate) fn tell(state: ServiceState<'_>) {
    if let Err(e) = ipc_platform::notify(state) {
        tracing::warn!("cannot notify the service manager of {state:?}: {e}");
    }
}

/// Starts the thread that sends `WATCHDOG=1` every half `interval` while
/// every loop of the server turns (see [`ipcd::Health`]), until the server
/// begins to stop.
///
/// A loop stuck for one check costs one ping; stuck for longer than about
/// half the interval, it costs all of them, and the manager restarts ipcd
/// once a whole interval passes without one. So a handler must not run
/// longer than half of `WatchdogSec=`.
pub(crate) fn start_watchdog(mut health: ipcd::Health, interval: Duration) {
    let period = interval / 2;
    tracing::info!(interval_ms = interval.as_millis() as u64, "watchdog on: pinging every half interval");
    let spawned = std::thread::Builder::new().name("ipcd-watchdog".into()).spawn(move || {
        let mut stuck = false;
        loop {
            std::thread::sleep(period);
            if health.is_stopping() {
                return;
            }
            match health.check() {
                Ok(()) => {
                    if std::mem::take(&mut stuck) {
                        tracing::info!("every loop turns again: pinging the watchdog again");
                    }
                    tell(ServiceState::Watchdog);
                }
                Err(e) => {
                    if !std::mem::replace(&mut stuck, true) {
                        tracing::warn!("{e}: not pinging the watchdog");
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        // Without pings the manager restarts ipcd after one interval.
        tracing::error!("cannot start the watchdog thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<(String, usize)> {
        names.iter().enumerate().map(|(i, n)| (n.to_string(), i)).collect()
    }

    #[test]
    fn sockets_are_told_apart_by_name() {
        let passed = assign(names(&["uds", "control", "tcp"])).unwrap();
        assert_eq!((passed.control, passed.uds, passed.tcp), (Some(1), Some(0), Some(2)));
        let passed = assign(names(&["control", "uds"])).unwrap();
        assert_eq!((passed.control, passed.uds, passed.tcp), (Some(0), Some(1), None));
        // One socket named by its unit, or by nothing, is the control socket.
        for name in ["ipcd.socket", "unknown", ""] {
            let passed = assign(names(&[name])).unwrap();
            assert_eq!((passed.control, passed.uds, passed.tcp), (Some(0), None, None), "{name:?}");
        }
        // One socket named uds is the stream socket, and there is no
        // control socket to take.
        let passed = assign(names(&["uds"])).unwrap();
        assert_eq!((passed.control, passed.uds), (None, Some(0)));
        let passed = assign(names(&[])).unwrap();
        assert_eq!((passed.control, passed.uds, passed.tcp), (None, None, None));
    }

    #[test]
    fn unnamed_or_doubled_sockets_among_several_are_refused() {
        let err = assign(names(&["control", "ipcd.socket"])).unwrap_err();
        assert!(err.contains("socket 1") && err.contains("\"ipcd.socket\""), "{err}");
        let err = assign(names(&["uds", "uds"])).unwrap_err();
        assert!(err.contains("two sockets named \"uds\""), "{err}");
    }
}
