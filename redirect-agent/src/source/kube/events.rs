//! Kubernetes Events (events.k8s.io/v1) for what the agent rejected, on the object at fault:
//! - on the pod: `RedirectPolicyInvalid` for a bad annotation (the note names the key and the
//!   value, and what the pod runs with instead), `RedirectMapFull` / `RedirectApplyFailed` when
//!   the kernel maps refused a write, `RedirectProxyNotExempt` when the pod's proxy cannot be
//!   exempted (so the pod is not registered);
//! - on the MeshConfig: `RedirectMeshConfigInvalid` when its `spec.traffic` is rejected and the last
//!   valid one stays in force.
//!
//! One Event per object and distinct message, also across agent restarts: before the first post
//! for an object, the Events already there (ours carry a label with the object's UID) are listed
//! and count as posted. Names and fields are bounded to the API's limits (name 253, reportingInstance
//! 128, note 1 kB), so that a long pod or node name cannot make every post fail.
//!
//! Why not `kube::runtime::events::Recorder`: in kube-runtime 5.0.0 (src/events.rs) it names the
//! Event `<regarding name>.<nanoseconds>` with no bound (rejected for pod names over 236
//! characters), keeps its de-duplication in memory only (lost on restart), and de-duplicates by
//! reason without the note, patching a repeat into a series of the first Event: a second, different
//! bad value on the same pod would show the first value's note. The Event built here has the same
//! shape as the Recorder's (same fields, `regarding`, `reportingController`).
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
    api::{ListParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use k8s_openapi::api::core::v1::Pod;

use crate::{metrics::Metrics, reconcile::PassReport};

pub const REASON_INVALID: &str = "RedirectPolicyInvalid";
pub const REASON_MAP_FULL: &str = "RedirectMapFull";
pub const REASON_APPLY_FAILED: &str = "RedirectApplyFailed";
pub const REASON_MESHCONFIG_INVALID: &str = "RedirectMeshConfigInvalid";
pub const REASON_NOT_EXEMPT: &str = "RedirectProxyNotExempt";
/// `reportingController` of our Events.
pub const CONTROLLER: &str = "flomesh.io/redirect-agent";
/// Label on our Events: the UID of the object they are about (for de-duplication on restart).
pub const LABEL_REGARDING_UID: &str = "redirect.flomesh.io/regarding-uid";

/// API limits (k8s.io/kubernetes pkg/apis/events validation).
pub const MAX_NAME: usize = 253;
pub const MAX_INSTANCE: usize = 128;
pub const MAX_NOTE: usize = 1024;

/// The object a finding is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Regarding {
    /// A pod, looked up in the pod store when the Event is posted.
    Pod,
    /// The MeshConfig, with its uid and resourceVersion.
    MeshConfig {
        uid: String,
        resource_version: String,
    },
}

/// One finding to report.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub regarding: Regarding,
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
            regarding: Regarding::Pod,
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
            regarding: Regarding::Pod,
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

/// What an Event is posted on.
#[derive(Clone, Debug)]
pub struct Target {
    pub api_version: String,
    pub kind: String,
    pub uid: String,
    pub resource_version: Option<String>,
}

/// (object uid, reason, note): what makes two Events the same.
type Key = (String, &'static str, String);

/// Follows the owner's reports and the source's own findings, and posts an Event for each new
/// finding. Runs until the owner stops.
pub async fn publish(
    client: Client,
    mut reports: watch::Receiver<Arc<PassReport>>,
    mut source: watch::Receiver<BTreeSet<Finding>>,
    pods: Store<Pod>,
    node: String,
    metrics: Arc<Metrics>,
) {
    let instance = reporting_instance(&node);
    let mut posted: BTreeSet<Key> = BTreeSet::new();
    // Objects whose existing Events have been read since the start.
    let mut checked: BTreeSet<String> = BTreeSet::new();
    // Failed posts, warned about once each.
    let mut failed: BTreeSet<Key> = BTreeSet::new();
    loop {
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            s = source.changed() => if s.is_err() { return },
        }
        let report = reports.borrow_and_update().clone();
        let mut current = findings(&report);
        current.extend(source.borrow_and_update().iter().cloned());
        let mut keys = BTreeMap::new();
        for f in current {
            let Some(target) = target(&f, &pods) else {
                continue;
            };
            let key: Key = (target.uid.clone(), f.reason, bound_note(&f.note));
            keys.insert(key, (f, target));
        }
        // A finding that went away and comes back is a new occurrence.
        posted.retain(|k| keys.contains_key(k));
        failed.retain(|k| keys.contains_key(k));
        for (key, (f, target)) in keys {
            if posted.contains(&key) {
                continue;
            }
            let api: Api<Event> = Api::namespaced(client.clone(), &f.namespace);
            if !checked.contains(&target.uid) {
                match existing(&api, &target.uid).await {
                    Ok(found) => {
                        posted.extend(found);
                        checked.insert(target.uid.clone());
                        if posted.contains(&key) {
                            debug!(object = %format!("{}/{}", f.namespace, f.name), reason = f.reason, "event exists already");
                            continue;
                        }
                    }
                    Err(e) => {
                        if failed.insert(key.clone()) {
                            warn!(object = %format!("{}/{}", f.namespace, f.name), "listing existing events: {e}; will retry");
                        }
                        continue;
                    }
                }
            }
            let event = event(&f, &target, &instance);
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    debug!(object = %format!("{}/{}", f.namespace, f.name), reason = f.reason, "event posted");
                    metrics
                        .events_posted
                        .get_or_create(&vec![("reason", f.reason.to_string())])
                        .inc();
                    failed.remove(&key);
                    posted.insert(key);
                }
                // Not remembered as posted: the next pass tries again, quietly.
                Err(e) => {
                    if failed.insert(key) {
                        warn!(object = %format!("{}/{}", f.namespace, f.name), "posting event {}: {e}; will retry", f.reason)
                    } else {
                        debug!(object = %format!("{}/{}", f.namespace, f.name), "posting event {}: {e}", f.reason)
                    }
                }
            }
        }
    }
}

fn target(f: &Finding, pods: &Store<Pod>) -> Option<Target> {
    match &f.regarding {
        Regarding::Pod => {
            let pod = pods.get(&ObjectRef::new(&f.name).within(&f.namespace))?;
            Some(Target {
                api_version: "v1".into(),
                kind: "Pod".into(),
                uid: pod.metadata.uid.clone()?,
                resource_version: pod.metadata.resource_version.clone(),
            })
        }
        Regarding::MeshConfig {
            uid,
            resource_version,
        } => Some(Target {
            api_version: "config.flomesh.io/v1alpha3".into(),
            kind: "MeshConfig".into(),
            uid: uid.clone(),
            resource_version: Some(resource_version.clone()),
        }),
    }
}

/// Our Events about the object `uid` that exist in the API, as keys.
async fn existing(api: &Api<Event>, uid: &str) -> Result<Vec<Key>, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{LABEL_REGARDING_UID}={uid}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some(CONTROLLER))
        .filter_map(|e| {
            let reason = known_reason(e.reason.as_deref()?)?;
            Some((uid.to_string(), reason, e.note.unwrap_or_default()))
        })
        .collect())
}

fn known_reason(r: &str) -> Option<&'static str> {
    [
        REASON_INVALID,
        REASON_MAP_FULL,
        REASON_APPLY_FAILED,
        REASON_MESHCONFIG_INVALID,
        REASON_NOT_EXEMPT,
    ]
    .into_iter()
    .find(|k| *k == r)
}

/// `s` cut to at most `max` bytes on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The API limits notes to 1 kB.
pub fn bound_note(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_string();
    }
    format!("{}...", cut(note, MAX_NOTE - 3))
}

/// FNV-1a: a short, stable tag for a name that had to be cut.
fn tag(s: &str) -> String {
    let h = s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{h:08x}")
}

/// `reportingInstance`: `<controller>-<node>`, within 128 characters. A longer node name is cut
/// and tagged with a hash of the whole name, so that two long node names stay distinct.
pub fn reporting_instance(node: &str) -> String {
    let full = format!("{CONTROLLER}-{node}");
    if full.len() <= MAX_INSTANCE {
        return full;
    }
    let room = MAX_INSTANCE - CONTROLLER.len() - 1 - 9;
    format!("{CONTROLLER}-{}-{}", cut(node, room), tag(node))
}

/// The Event's name: `<object name>.<nanoseconds, hex>` as kubectl and client-go make them, with
/// the object name cut so that the whole is a valid name of at most 253 characters.
pub fn event_name(object: &str, now: Timestamp) -> String {
    let suffix = format!(".{:x}", now.as_nanosecond());
    let stem = cut(object, MAX_NAME - suffix.len()).trim_end_matches(['.', '-']);
    format!("{stem}{suffix}")
}

/// The events.k8s.io/v1 Event for `f` on `target`.
pub fn event(f: &Finding, target: &Target, instance: &str) -> Event {
    let now = Timestamp::now();
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(&f.name, now)),
            namespace: Some(f.namespace.clone()),
            labels: Some(
                [
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "redirect-agent".to_string(),
                    ),
                    (LABEL_REGARDING_UID.to_string(), target.uid.clone()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some("ApplyRedirectPolicy".into()),
        reason: Some(f.reason.into()),
        note: Some(bound_note(&f.note)),
        type_: Some("Warning".into()),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(instance.to_string()),
        regarding: Some(ObjectReference {
            api_version: Some(target.api_version.clone()),
            kind: Some(target.kind.clone()),
            name: Some(f.name.clone()),
            namespace: Some(f.namespace.clone()),
            uid: Some(target.uid.clone()),
            resource_version: target.resource_version.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_instances_stay_within_the_api_limits() {
        let now = Timestamp::now();
        let long = format!("{}.x-", "a".repeat(250));
        let name = event_name(&long, now);
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert!(!name.contains("..") && !name.contains("-."), "{name}");
        assert_eq!(
            event_name("app", now),
            format!("app.{:x}", now.as_nanosecond())
        );

        assert_eq!(reporting_instance("node-1"), format!("{CONTROLLER}-node-1"));
        let (n1, n2) = ("n".repeat(150) + "1", "n".repeat(150) + "2");
        let (i1, i2) = (reporting_instance(&n1), reporting_instance(&n2));
        assert!(i1.len() <= MAX_INSTANCE && i2.len() <= MAX_INSTANCE);
        assert_ne!(i1, i2, "two long node names must stay distinct");
        // Exactly at the limit: kept whole.
        let n = "n".repeat(MAX_INSTANCE - CONTROLLER.len() - 1);
        assert_eq!(reporting_instance(&n), format!("{CONTROLLER}-{n}"));

        let note = "é".repeat(700);
        assert!(bound_note(&note).len() <= MAX_NOTE);
    }
}
