//! How far a run has come, while it runs: on a terminal a progress bar per
//! run (indicatif, on stderr): calls done of calls planned, or seconds
//! done of `--duration`, the rate and the time left. Elsewhere (stderr a
//! file, a pipe, or `TERM` unset or `dumb`) plain lines on stderr: one
//! [`LINE_EVERY`] while a run lasts, so a short run prints none, and never
//! an escape code. stdout, which holds the summaries, is the same either
//! way.
//!
//! The count comes from [`Calls`]: one word per client, on a cache line of
//! its own, that only its client's thread writes (a `Relaxed` store of its
//! own count after each call's outcome) and the progress thread reads. A
//! call costs no lock, no allocation and no shared cache line: the bar
//! changes neither `allocations_per_call` nor the figures. Clients that
//! are processes of their own (`--procs`) report nothing until they end:
//! their runs show the time elapsed alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{HumanCount, HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a bar is brought up to date (two draws each: indicatif's
/// `stderr()` draws at most 20 times a second).
const BAR_EVERY: Duration = Duration::from_millis(100);
/// How often a plain line is printed while a run lasts: every 5 s in its
/// first minute, then every minute, so a soak of hours stays a short log.
const LINE_EVERY: Duration = Duration::from_secs(5);
const LINE_EVERY_LATER: Duration = Duration::from_secs(60);
/// The rate shown on a bar is over about this much of the latest calls.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// The calls each client of a run has done (made and had an outcome).
#[derive(Debug)]
pub struct Calls {
    slots: Box<[Slot]>,
}

/// One client's count, alone on its cache line (128 bytes: the adjacent-
/// line prefetcher pairs lines), so clients never share a written line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

impl Calls {
    /// Room for `clients` clients, numbered from 0.
    pub fn new(clients: usize) -> Calls {
        Calls { slots: (0..clients).map(|_| Slot::default()).collect() }
    }

    /// Client `client` has done `done` calls. Called by that client's
    /// thread alone, after each call; a client beyond the room made is not
    /// counted.
    pub fn set(&self, client: u32, done: u64) {
        if let Some(slot) = self.slots.get(client as usize) {
            // Relaxed: a count for display, ordered with nothing else.
            slot.0.store(done, Ordering::Relaxed);
        }
    }

    /// Calls done by every client.
    pub fn total(&self) -> u64 {
        // Relaxed: each word is read whole; the sum may be a moment old.
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Where a run ends.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// After this many calls.
    Calls(u64),
    /// After this long (`--duration`).
    Lasts(Duration),
    /// Not known beforehand (calls until the daemon stops, or clients in
    /// processes of their own).
    Open,
}

/// The bar on display, if any, so that a message printed during a run
/// can clear it first ([`suspend`]) and a signal's exit can take it away
/// ([`clear`]).
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `f`, which prints on stderr, with the bar (if one is on display)
/// cleared meanwhile and drawn again after it.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    match active() {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

/// Takes the bar on display (if any) off the screen for good: stress is
/// about to exit.
pub fn clear() {
    let bar = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// The progress of one run on display, until [`Progress::finish`] (or a
/// drop).
pub struct Progress {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows the progress of the run called `label` towards `goal`, counting
    /// `calls` (`None`: clients that report nothing while they run).
    pub fn start(label: String, goal: Goal, calls: Option<Arc<Calls>>) -> Progress {
        let target = ProgressDrawTarget::stderr();
        let watch = Watch { label, goal, calls, start: Instant::now() };
        let (stop, stopped) = mpsc::channel();
        let thread = if target.is_hidden() {
            std::thread::Builder::new().name("progress".into()).spawn(move || watch.lines(&stopped))
        } else {
            let bar = watch.bar(target);
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
            std::thread::Builder::new().name("progress".into()).spawn(move || watch.draw(&bar, &stopped))
        };
        // Without a thread the run goes on, with no progress shown.
        if thread.is_err() {
            clear();
        }
        Progress { stop: Some(stop), thread: thread.ok() }
    }

    /// Takes the bar off the screen (before the run's summary is printed)
    /// and stops the lines.
    pub fn finish(mut self) {
        self.end();
    }

    fn end(&mut self) {
        // One run at a time shows progress: the bar on display, if any, is
        // this one's (unless a signal's exit took it already).
        ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.end();
    }
}

/// What the progress thread watches.
struct Watch {
    label: String,
    goal: Goal,
    calls: Option<Arc<Calls>>,
    start: Instant,
}

/// Calls done at a moment.
#[derive(Clone, Copy)]
struct Mark {
    at: Instant,
    done: u64,
}

impl Watch {
    fn mark(&self) -> Mark {
        Mark { at: Instant::now(), done: self.calls.as_ref().map_or(0, |c| c.total()) }
    }

    /// The bar, before its first update.
    fn bar(&self, target: ProgressDrawTarget) -> ProgressBar {
        let (len, template) = match self.goal {
            Goal::Calls(n) => (Some(n), "{prefix} [{bar:30}] {percent:>3}%  {msg}"),
            Goal::Lasts(d) => (Some(d.as_secs().max(1)), "{prefix} [{bar:30}] {percent:>3}%  {msg}"),
            Goal::Open => (None, "{prefix} {spinner}  {msg}"),
        };
        let style = ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> ")
            .tick_chars("-\\|/ ");
        let bar = ProgressBar::with_draw_target(len, target).with_style(style).with_prefix(self.label.clone());
        bar.set_message(self.status(self.mark(), None));
        bar
    }

    /// Brings the bar up to date every [`BAR_EVERY`] until told to stop,
    /// then clears it.
    fn draw(&self, bar: &ProgressBar, stopped: &mpsc::Receiver<()>) {
        let mut recent = std::collections::VecDeque::new();
        while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(BAR_EVERY) {
            let now = self.mark();
            recent.push_back(now);
            while recent.front().is_some_and(|m: &Mark| now.at - m.at > RATE_WINDOW) {
                recent.pop_front();
            }
            // Each of these draws: the message first, so the last draw of
            // the two shows the whole update.
            bar.set_message(self.status(now, recent.front().copied()));
            match self.goal {
                Goal::Calls(_) => bar.set_position(now.done),
                Goal::Lasts(_) => bar.set_position((now.at - self.start).as_secs()),
                Goal::Open => bar.tick(),
            }
        }
        bar.finish_and_clear();
    }

    /// Prints a line every [`LINE_EVERY`] until told to stop.
    fn lines(&self, stopped: &mpsc::Receiver<()>) {
        let mut last = self.mark();
        loop {
            let every = if last.at - self.start < Duration::from_secs(60) { LINE_EVERY } else { LINE_EVERY_LATER };
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = self.mark();
            eprintln!("stress: {}: {}", self.label, self.status(now, Some(last)));
            last = now;
        }
    }

    /// Where the run stands at `now`, with the rate since `since` (or
    /// since the start, if `since` is too close to tell): "52,000 of
    /// 100,000 calls, 95,000 calls/s, 1s left".
    fn status(&self, now: Mark, since: Option<Mark>) -> String {
        let elapsed = now.at - self.start;
        let since = since.filter(|m| now.at - m.at >= Duration::from_millis(500));
        let from = since.unwrap_or(Mark { at: self.start, done: 0 });
        let secs = (now.at - from.at).as_secs_f64();
        let per_s = if secs > 0.0 { now.done.saturating_sub(from.done) as f64 / secs } else { 0.0 };
        let rate = format!("{} calls/s", HumanCount(per_s.round() as u64));
        match (self.goal, &self.calls) {
            (Goal::Calls(total), _) => {
                let left = match total.saturating_sub(now.done) {
                    0 => "finishing".to_string(),
                    n if per_s < 1.0 => format!("{} to go", HumanCount(n)),
                    n => format!("{:#} left", HumanDuration(Duration::from_secs_f64(n as f64 / per_s))),
                };
                format!("{} of {} calls, {rate}, {left}", HumanCount(now.done), HumanCount(total))
            }
            (Goal::Lasts(d), _) => format!(
                "{} of {} s, {} calls, {rate}, {:#} left",
                elapsed.as_secs().min(d.as_secs()),
                d.as_secs(),
                HumanCount(now.done),
                HumanDuration(d.saturating_sub(elapsed))
            ),
            (Goal::Open, Some(_)) => {
                format!("{} calls, {rate}, {:#} so far", HumanCount(now.done), HumanDuration(elapsed))
            }
            (Goal::Open, None) => format!("clients in processes of their own, {:#} so far", HumanDuration(elapsed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_counts_alone_and_the_total_sums_them() {
        let calls = Calls::new(3);
        calls.set(0, 5);
        calls.set(2, 7);
        calls.set(0, 6);
        // A client beyond the room made is ignored, not a panic.
        calls.set(9, 100);
        assert_eq!(calls.total(), 13);
        assert_eq!(std::mem::align_of::<Slot>(), 128);
    }

    #[test]
    fn status_says_how_far_how_fast_and_how_long() {
        let start = Instant::now();
        let calls = Arc::new(Calls::new(1));
        let watch = Watch { label: "x".into(), goal: Goal::Calls(1000), calls: Some(calls), start };
        let now = Mark { at: start + Duration::from_secs(2), done: 200 };
        // 100 calls a second, 800 to go.
        assert_eq!(watch.status(now, None), "200 of 1,000 calls, 100 calls/s, 8s left");
        let soak = Watch { goal: Goal::Lasts(Duration::from_secs(60)), ..watch };
        assert_eq!(soak.status(now, None), "2 of 60 s, 200 calls, 100 calls/s, 58s left");
    }
}
