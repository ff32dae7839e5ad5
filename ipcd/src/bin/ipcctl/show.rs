//! The daemon's answers as text for people: aligned columns, sizes in
//! binary units, ages in the largest unit that fits.

use std::io::{self, Write};

use ipcd::introspect::{Sees, ServedBy, ServiceList, SessionList, Status, Viewer};

/// `bytes` in the largest binary unit that keeps a number of at least 1.
pub(crate) fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `secs` as `3d4h`, `2h5m`, `4m10s` or `12.3s`.
pub(crate) fn age(secs: f64) -> String {
    let whole = secs as u64;
    let (d, h, m, s) = (whole / 86_400, whole / 3600 % 24, whole / 60 % 60, whole % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{secs:.1}s")
    }
}

fn viewer(out: &mut impl Write, viewer: &Viewer) -> io::Result<()> {
    let sees = match viewer.sees {
        Sees::All => "everything",
        Sees::Own => "the daemon-wide counts and its own sessions",
    };
    match viewer.caller {
        Some(c) => writeln!(out, "viewer:      uid {} (pid {}) sees {sees}", c.uid, c.pid),
        None => writeln!(out, "viewer:      without credentials, sees {sees}"),
    }
}

/// `ipcctl status`.
pub(crate) fn status(out: &mut impl Write, s: &Status) -> io::Result<()> {
    writeln!(out, "ipcd {}, pid {}, uid {}, up {}, {} workers", s.version, s.pid, s.uid, age(s.uptime_s), s.workers)?;
    viewer(out, &s.viewer)?;
    for l in &s.listeners {
        let given = if l.given { " (from the service manager)" } else { "" };
        writeln!(out, "listener:    {:<8} {}{given}", l.kind, l.address)?;
    }
    let c = &s.clients;
    writeln!(
        out,
        "clients:     {} of at most {} (shm {}, uds {}, tcp {}); brokered sessions {}",
        c.connected, c.max, c.shm, c.uds, c.tcp, s.brokered_sessions
    )?;
    let l = &s.limits;
    let share = if l.memory_budget > 0 { 100.0 * l.memory_in_use as f64 / l.memory_budget as f64 } else { 0.0 };
    writeln!(out, "memory:      {} of {} ({share:.2}%)", bytes(l.memory_in_use), bytes(l.memory_budget))?;
    let uids: Vec<String> = l.sessions_per_uid.iter().map(|u| format!("{}: {}", u.uid, u.sessions)).collect();
    let more = l.uids_with_sessions.saturating_sub(l.sessions_per_uid.len());
    let more = if more > 0 { format!(" and {more} more uids") } else { String::new() };
    writeln!(
        out,
        "per uid:     at most {} sessions; {}{more}",
        l.max_sessions_per_uid,
        if uids.is_empty() { "none".to_string() } else { uids.join(", ") }
    )?;
    writeln!(
        out,
        "handshakes:  {} pending of at most {}; timeout {} ms; rings up to {}; stall timeout {} ms",
        l.pending_handshakes,
        l.max_pending_handshakes,
        l.handshake_timeout_ms,
        bytes(u64::from(l.max_ring_size)),
        l.stall_timeout_ms
    )?;
    let h = &s.handshakes;
    writeln!(out, "accepted:    {}, held {}, strikes {}", h.accepted, h.held, h.strikes)?;
    writeln!(out, "rejected:    {}", nonzero(h.rejected.iter().map(|(k, v)| (k.as_str(), *v))))?;
    writeln!(
        out,
        "calls:       {} requests, {} replies, {} errors",
        s.calls.requests, s.calls.replies, s.calls.errors
    )?;
    writeln!(out, "disconnects: {}", nonzero(s.disconnects.iter().map(|(k, v)| (k.as_str(), *v))))?;
    writeln!(out, "reloads:     {}", s.reloads)?;
    if let Some(access) = &s.access {
        writeln!(
            out,
            "allow:       uids {:?}, gids {:?} (empty: anyone who can open the socket)",
            access.allow_uids, access.allow_gids
        )?;
        for r in &access.rules {
            let who = |w: &Option<ipcd::introspect::Who>| {
                w.as_ref().map_or("default".to_string(), |w| format!("uids {:?} gids {:?}", w.uids, w.gids))
            };
            writeln!(out, "rule:        {} provide: {}; call: {}", r.pattern, who(&r.provide), who(&r.call))?;
        }
    }
    Ok(())
}

/// `name count, ...` of the counts above zero, or `none`.
fn nonzero<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> String {
    let parts: Vec<String> = counts.filter(|&(_, n)| n > 0).map(|(name, n)| format!("{name} {n}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn served_by(s: ServedBy) -> &'static str {
    match s {
        ServedBy::Daemon => "built-in",
        ServedBy::Embedded => "embedded",
        ServedBy::Provider => "provided",
    }
}

/// `ipcctl services`.
pub(crate) fn services(out: &mut impl Write, list: &ServiceList) -> io::Result<()> {
    let width = list.services.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    writeln!(out, "{:<width$}  {:<8}  {:>10}  {:>8}  PROVIDERS", "NAME", "SERVED", "CALLS", "ERRORS")?;
    for s in &list.services {
        let count = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
        let mut providers: Vec<String> =
            s.providers.iter().map(|p| format!("pid {} uid {} ({} sessions)", p.pid, p.uid, p.sessions)).collect();
        if s.pooled == Some(true) {
            providers.insert(0, "pooled:".into());
        }
        writeln!(
            out,
            "{:<width$}  {:<8}  {:>10}  {:>8}  {}",
            s.name,
            served_by(s.served_by),
            count(s.calls),
            count(s.errors),
            providers.join(" ")
        )?;
    }
    Ok(())
}

/// `ipcctl clients`.
pub(crate) fn clients(out: &mut impl Write, list: &SessionList) -> io::Result<()> {
    writeln!(
        out,
        "{:>8}  {:<8}  {:>8}  {:>6}  {:>10}  {:>8}  {:>10}  DETAIL",
        "SESSION", "TRANSPORT", "PID", "UID", "RING", "AGE", "CALLS"
    )?;
    for s in &list.sessions {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let mut detail = Vec::new();
        if let Some(addr) = &s.address {
            detail.push(addr.clone());
        }
        if let Some(service) = &s.service {
            detail.push(format!("for {service}"));
        }
        if let Some(p) = &s.provider {
            detail.push(format!("provider pid {} uid {}", p.pid, p.uid));
        }
        if let Some(w) = s.worker {
            detail.push(format!("worker {w}"));
        }
        writeln!(
            out,
            "{:>8}  {:<8}  {:>8}  {:>6}  {:>10}  {:>8}  {:>10}  {}",
            s.id,
            s.transport.name(),
            opt(s.pid.map(|p| p.to_string())),
            opt(s.uid.map(|u| u.to_string())),
            opt(s.ring_size.map(|r| bytes(u64::from(r)))),
            age(s.age_s),
            opt(s.calls.map(|c| c.to_string())),
            detail.join(", ")
        )?;
    }
    if list.sessions.is_empty() {
        writeln!(out, "(no sessions this viewer may see)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 10), "64.0 KiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(age(4.25), "4.2s");
        assert_eq!(age(250.0), "4m10s");
        assert_eq!(age(7500.0), "2h5m");
        assert_eq!(age(3.0 * 86_400.0 + 4.0 * 3600.0), "3d4h");
    }

    #[test]
    fn only_counts_above_zero_are_listed() {
        assert_eq!(nonzero([("a", 0), ("b", 2)].into_iter()), "b 2");
        assert_eq!(nonzero([("a", 0)].into_iter()), "none");
    }
}
