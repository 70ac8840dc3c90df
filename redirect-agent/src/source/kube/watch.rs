//! One kube-runtime watcher per resource, feeding a reflector store. Any watcher error drops the
//! watch and, after kube's default backoff (client-go's: 0.8 s doubling to 30 s, with jitter),
//! starts over with a fresh list. The store swaps to the new list only when it is complete
//! (reflector semantics), so while the API server is away the agent keeps what it has, and on
//! its return every object deleted meanwhile disappears with the re-list. An orderly end of a
//! watch (the server's timeout) resumes from the last resourceVersion, as kube's watcher does.
use std::{sync::Arc, time::Instant};

use futures::{StreamExt as _, stream::BoxStream};
use kube::{
    Resource,
    runtime::{
        reflector::store::Writer,
        watcher::{self, DefaultBackoff},
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
    let mut backoff = DefaultBackoff::default();
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
                            backoff = DefaultBackoff::default();
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
                warn!(
                    resource = resource.name(),
                    "watch failed, keeping the applied state and re-listing: {e}"
                );
            }
        }
        let delay = backoff.next().unwrap_or(std::time::Duration::from_secs(30));
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
