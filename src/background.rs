//! Periodic background work (cache reloads, usage flushes) that stops at shutdown.

use std::{future::Future, time::Duration};

use tokio::sync::watch;

/// Runs `task` now and then every `period` until `shutdown` fires. A failure is logged and
/// the previous state kept; the next tick tries again.
pub async fn every<F, Fut, E>(
    period: Duration,
    what: &'static str,
    mut shutdown: watch::Receiver<bool>,
    mut task: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = task().await {
                    tracing::warn!(error = %e, "{what} failed; keeping the previous state");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}
