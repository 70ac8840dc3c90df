//! One kube-runtime watcher per resource, feeding a reflector store. Any watcher error drops the
//! watch and, after [`backoff`] (0.5 s doubling to 30 s, no jitter, reset by a complete list),
//! starts over with a fresh list. kube's default (client-go's 0.8 s to 30 s with jitter of up to
//! the delay itself) resumed 32–51 s after an outage ended; this one resumes within 0.5 s of a short
//! outage and at most 30 s after a long one. The store swaps to the new list only when it is complete
//! (reflector semantics), so while the API server is away the agent keeps what it has, and on
//! its return every object deleted meanwhile disappears with the re-list. An orderly end of a
//! watch (the server's timeout) resumes from the last resourceVersion, as kube's watcher does.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt as _, stream::BoxStream};
use kube::{
    Resource,
    runtime::{
        reflector::store::Writer,
        watcher::{self, ExponentialBackoff},
    },
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// The watched resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Watched {
    Pods,
    Namespaces,
    MeshConfig,
}

impl Watched {
    pub fn name(self) -> &'static str {
        match self {
            Watched::Pods => "pods",
            Watched::Namespaces => "namespaces",
            Watched::MeshConfig => "meshconfigs",
        }
    }
}

/// What a watch loop tells the aggregator.
#[derive(Clone, Copy, Debug)]
pub enum Signal {
    /// The store holds a complete list (after the first list and after every re-list).
    Synced { resource: Watched, at: Instant },
    /// An object was added, changed or deleted.
    Changed { resource: Watched, at: Instant },
}

/// The first retry after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest wait between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The retry delays after watch failures: 0.5, 1, 2, 4, 8, 16, 30, 30, ... seconds. No jitter:
/// jitter would push the worst case past 30 s, and the API server's priority and fairness already
/// sheds a herd of re-lists (a 429 is just another failure here).
pub fn backoff() -> ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_factor(2.0)
        .without_max_times()
        .into()
}

pub type EventStream<T> = BoxStream<'static, Result<watcher::Event<T>, watcher::Error>>;

/// Runs forever: (re)creates the watch with `make`, applies its events to `writer`, and signals
/// `tx`. `absent_ok`: a 404 on the list (the CRD is not installed) means "no objects".
pub async fn follow<T, F>(
    resource: Watched,
    make: F,
    mut writer: Writer<T>,
    tx: mpsc::UnboundedSender<Signal>,
    metrics: Arc<Metrics>,
    absent_ok: bool,
) where
    T: Resource + Clone + 'static,
    T::DynamicType: Clone + Eq + std::hash::Hash,
    F: Fn() -> EventStream<T>,
{
    let mut delays = backoff();
    let mut lists = 0u64;
    loop {
        let mut stream = make();
        let error = loop {
            match stream.next().await {
                Some(Ok(ev)) => {
                    let at = Instant::now();
                    writer.apply_watcher_event(&ev);
                    let signal = match ev {
                        watcher::Event::Init => {
                            lists += 1;
                            debug!(resource = resource.name(), lists, "listing");
                            continue;
                        }
                        watcher::Event::InitApply(_) => continue,
                        watcher::Event::InitDone => {
                            // A complete list is the success the backoff waits for.
                            delays = backoff();
                            metrics.watch_down.up(resource.name());
                            info!(resource = resource.name(), lists, "watch synced");
                            Signal::Synced { resource, at }
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            Signal::Changed { resource, at }
                        }
                    };
                    if tx.send(signal).is_err() {
                        return;
                    }
                }
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        drop(stream);
        if let Some(e) = &error {
            metrics
                .watch_errors
                .get_or_create(&vec![("resource", resource.name().to_string())])
                .inc();
            if absent_ok && is_not_found(e) {
                metrics.watch_down.up(resource.name());
                // The CRD is not installed: no objects of this kind, which is a complete list.
                writer.apply_watcher_event(&watcher::Event::Init);
                writer.apply_watcher_event(&watcher::Event::InitDone);
                let _ = tx.send(Signal::Synced {
                    resource,
                    at: Instant::now(),
                });
                debug!(
                    resource = resource.name(),
                    "not found (CRD not installed?); using defaults"
                );
            } else {
                metrics.watch_down.down(resource.name());
                warn!(
                    resource = resource.name(),
                    "watch failed, keeping the applied state and re-listing: {e}"
                );
            }
        }
        let delay = delays.next().unwrap_or(BACKOFF_MAX);
        tokio::time::sleep(delay).await;
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_fast_first_and_caps_at_30s() {
        let secs: Vec<f64> = backoff().take(9).map(|d| d.as_secs_f64()).collect();
        assert_eq!(secs, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]);
    }
}
