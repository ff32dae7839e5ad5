//! Connecting a lost daemon link again from a send, without blocking the
//! runtime: the connect runs on tokio's blocking pool, and the pauses of
//! the reconnect policy between attempts are tokio timers.
//!
//! A send that finds its link lost (with a reconnect policy) keeps trying
//! until its own call timeout, as the blocking client's send does. One
//! send of a connection opens at a time (`State::opening`); the others
//! pause meanwhile and look again, so a restarted daemon sees one connect
//! per connection, not one per waiting task. An attempt's result is taken
//! only if the link is still lost: a link opened after another send
//! revived it closes unused. A send dropped while it opens gives the
//! connection's turn back; the connect finishes on the blocking pool and
//! its link is dropped there.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipc_core::Welcome;
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::State;
use crate::backoff::Backoff;
use crate::connect;
use crate::error::{with_causes, ConnectError};
use crate::link::Link;
use crate::{CallError, Service};

/// A send's reconnect under way.
pub(super) struct Reconnecting {
    deadline: Instant,
    backoff: Backoff,
    step: Step,
}

enum Step {
    /// About to open (or to pause, if another send of the connection is
    /// opening).
    Ready,
    /// This send's connect, on the blocking pool.
    Opening { since: Instant, handle: JoinHandle<Result<(Link, Welcome), ConnectError>> },
    /// Waiting out a pause of the policy.
    Pausing(Pin<Box<Sleep>>),
}

impl Reconnecting {
    /// Whether this send holds the connection's turn to open.
    pub(super) fn is_opening(&self) -> bool {
        matches!(self.step, Step::Opening { .. })
    }
}

/// Drives the reconnect of `service`'s lost daemon link for one send:
/// `Ready(Ok)` once the link is there (or was never lost, or is not the
/// daemon's), `Ready(Err)` when it cannot be had before the send's call
/// timeout or never could, `Pending` meanwhile (woken by the connect's
/// end or the pause's).
pub(super) fn poll(
    st: &mut State,
    cx: &mut Context<'_>,
    service: &Service,
    slot: &mut Option<Box<Reconnecting>>,
) -> Poll<Result<(), CallError>> {
    loop {
        let Some(r) = slot.as_deref_mut() else {
            let Some((_, options, policy)) = st.client.reconnect_plan(service) else { return Poll::Ready(Ok(())) };
            *slot = Some(Box::new(Reconnecting {
                deadline: Instant::now() + options.call_timeout,
                backoff: Backoff::new(policy),
                step: Step::Ready,
            }));
            continue;
        };
        match &mut r.step {
            Step::Ready => {
                let Some((target, mut options, _)) = st.client.reconnect_plan(service) else {
                    *slot = None;
                    return Poll::Ready(Ok(()));
                };
                let left = r.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    *slot = None;
                    return Poll::Ready(Err(CallError::NotConnected {
                        reason: "cannot reconnect within the call timeout".into(),
                    }));
                }
                if st.opening {
                    // Another send of this connection is opening: look
                    // again after a pause.
                    r.step = Step::Pausing(Box::pin(tokio::time::sleep(r.backoff.next_pause().min(left))));
                    continue;
                }
                options.connect_timeout = options.connect_timeout.min(left.max(Duration::from_millis(1)));
                st.opening = true;
                let handle = tokio::task::spawn_blocking(move || connect::open(&target, &options));
                r.step = Step::Opening { since: Instant::now(), handle };
            }
            Step::Opening { since, handle } => {
                let Poll::Ready(joined) = Pin::new(handle).poll(cx) else { return Poll::Pending };
                let since = *since;
                st.opening = false;
                let error = match joined {
                    Ok(Ok(opened)) => {
                        *slot = None;
                        return Poll::Ready(st.client.adopt_opened(opened, since.elapsed()));
                    }
                    Ok(Err(e)) => e,
                    Err(e) => {
                        *slot = None;
                        return Poll::Ready(Err(CallError::NotConnected {
                            reason: format!("the reconnect failed: {e}"),
                        }));
                    }
                };
                let left = r.deadline.saturating_duration_since(Instant::now());
                if connect::lasts(&error) || left.is_zero() {
                    *slot = None;
                    return Poll::Ready(Err(CallError::NotConnected {
                        reason: format!("cannot reconnect: {}", with_causes(&error)),
                    }));
                }
                r.step = Step::Pausing(Box::pin(tokio::time::sleep(r.backoff.next_pause().min(left))));
            }
            Step::Pausing(sleep) => {
                let Poll::Ready(()) = sleep.as_mut().poll(cx) else { return Poll::Pending };
                r.step = Step::Ready;
            }
        }
    }
}

/// Gives the connection's turn to open back when a send is dropped while
/// it opens.
pub(super) fn drop_send(st: &mut State, slot: &mut Option<Box<Reconnecting>>) {
    if slot.take().is_some_and(|r| r.is_opening()) {
        st.opening = false;
    }
}
