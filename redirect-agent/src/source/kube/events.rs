//! Kubernetes Events for what a reconcile pass rejected, posted on the pod (events.k8s.io/v1):
//! `RedirectPolicyInvalid` for a bad annotation or MeshConfig value (the note names the key and
//! the value, and what the pod runs with instead), `RedirectMapFull` / `RedirectApplyFailed` when
//! the kernel maps refused a write. One Event per pod and distinct message: passes repeat their
//! findings, the Events do not.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use k8s_openapi::api::core::v1::Pod;

use crate::{metrics::Metrics, reconcile::PassReport};

pub const REASON_INVALID: &str = "RedirectPolicyInvalid";
pub const REASON_MAP_FULL: &str = "RedirectMapFull";
pub const REASON_APPLY_FAILED: &str = "RedirectApplyFailed";
/// `reportingController` of our Events.
pub const CONTROLLER: &str = "flomesh.io/redirect-agent";

/// One finding to report.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub namespace: String,
    pub name: String,
    pub reason: &'static str,
    pub note: String,
}

/// The findings of one pass, as Event material.
pub fn findings(report: &PassReport) -> BTreeSet<Finding> {
    let mut out = BTreeSet::new();
    for i in &report.issues {
        let instead = i.fallback.describe();
        out.insert(Finding {
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            reason: REASON_INVALID,
            note: format!("{}; {instead}", i.error),
        });
    }
    for e in &report.apply_errors {
        let Some((namespace, name)) = e.workload.split_once('/') else {
            continue;
        };
        out.insert(Finding {
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: if e.map_full {
                REASON_MAP_FULL
            } else {
                REASON_APPLY_FAILED
            },
            note: format!(
                "writing the policy of cgroup {} failed: {}; {}",
                e.cgroup_id,
                e.error,
                e.fallback.describe()
            ),
        });
    }
    out
}

/// Follows the owner's reports and posts an Event for each new finding. Runs until the owner
/// stops.
pub async fn publish(
    client: Client,
    mut reports: watch::Receiver<Arc<PassReport>>,
    pods: Store<Pod>,
    node: String,
    metrics: Arc<Metrics>,
) {
    // Finding → the pod UID it was posted for (a re-created pod gets its own Event).
    let mut posted: BTreeMap<Finding, String> = BTreeMap::new();
    while reports.changed().await.is_ok() {
        let report = reports.borrow_and_update().clone();
        let current = findings(&report);
        posted.retain(|f, _| current.contains(f));
        for f in current {
            let Some(pod) = pods.get(&ObjectRef::new(&f.name).within(&f.namespace)) else {
                continue;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if posted.get(&f) == Some(&uid) {
                continue;
            }
            let event = event(&f, &pod, &node);
            let api: Api<Event> = Api::namespaced(client.clone(), &f.namespace);
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    debug!(pod = %format!("{}/{}", f.namespace, f.name), reason = f.reason, "event posted");
                    metrics
                        .events_posted
                        .get_or_create(&vec![("reason", f.reason.to_string())])
                        .inc();
                    posted.insert(f, uid);
                }
                // Not remembered: the next pass tries again.
                Err(e) => {
                    warn!(pod = %format!("{}/{}", f.namespace, f.name), "posting event {}: {e}", f.reason)
                }
            }
        }
    }
}

/// The events.k8s.io/v1 Event on `pod`.
pub fn event(f: &Finding, pod: &Pod, node: &str) -> Event {
    let now = Timestamp::now();
    let mut note = f.note.clone();
    // The API limits notes to 1 kB.
    if note.len() > 1024 {
        let mut cut = 1021;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", f.name, now.as_nanosecond())),
            namespace: Some(f.namespace.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some("ApplyRedirectPolicy".into()),
        reason: Some(f.reason.into()),
        note: Some(note),
        type_: Some("Warning".into()),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(format!("{CONTROLLER}-{node}")),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(f.name.clone()),
            namespace: Some(f.namespace.clone()),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
